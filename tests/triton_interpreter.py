"""A test module's `check_kernel('cpu')` run under Triton's interpreter, in a subprocess:
the interpreter is chosen when a kernel is defined, so this process (kernels already
imported) cannot switch to it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check_kernel_in_interpreter(module: str) -> None:
    """Runs `tests.<module>.check_kernel('cpu')` with TRITON_INTERPRET=1; fails with its stderr."""
    # tests/ too: the test modules import their helpers as pytest lets them, by bare name
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    code = f"from tests.{module} import check_kernel; check_kernel('cpu'); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
