"""The evaluation data a run needs, small enough to carry to the GPU host (which has no
network): HotpotQA trimmed to the sampled questions and the needle test's essays, laid out
as the `long_context_eval` package so that PYTHONPATH=DIR finds them.

    python -m epic_sglang.data.pack DIR --n 1500 [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from epic_sglang.data.hotpotqa import hotpotqa_path, long_context_eval_file


def pack(out: Path, n: int, seed: int) -> Path:
    from epic_sglang.evaluation import sample_questions

    wanted = {ex.id for ex in sample_questions(n, seed)}
    data = out / "long_context_eval" / "data" / "synthetic" / "json"
    data.mkdir(parents=True, exist_ok=True)
    for pkg in (out / "long_context_eval", out / "long_context_eval" / "data", data.parent):
        (pkg / "__init__.py").touch()
    rows = [r for r in json.loads(hotpotqa_path().read_text()) if r["_id"] in wanted]
    (data / "hotpotqa.json").write_text(json.dumps(rows))
    (data / "hotpotqa.sample.json").write_text(json.dumps({"n": n, "seed": seed}))
    shutil.copy(long_context_eval_file("PaulGrahamEssays.json"), data / "PaulGrahamEssays.json")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=1500, help="HotpotQA questions of the seeded sample")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = pack(args.out, args.n, args.seed)
    print(f"packed {args.n} HotpotQA questions and the essays into {data}")


if __name__ == "__main__":
    main()
