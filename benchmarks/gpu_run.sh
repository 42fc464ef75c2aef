#!/usr/bin/env bash
# On the GPU host: install the offline SGLang/FlashInfer kit from gpu_bundle/, run the GPU
# tests and benchmarks/gpu_ttft.py, and leave BENCHMARKS.md and logs in $OUT.
#   bash benchmarks/gpu_run.sh [gpu_ttft.py args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PYTHON:-/opt/torch/.venv/bin/python3}; [ -x "$PY" ] || PY=$(command -v python3)
export PYTHON=$PY
bash gpu_bundle/load.sh gpu_bundle > "$OUT/load.log" 2>&1 || { tail -20 "$OUT/load.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
export PATH="$(dirname "$PY"):$PATH"
for c in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null); do
  [ -x "$c/bin/nvcc" ] && { export CUDA_HOME=$c; export PATH="$c/bin:$PATH"; break; }
done
# FlashInfer's JIT cache, carried between runs when present
if [ -f gpu_bundle/jit-cache.tar ]; then mkdir -p ~/.cache && tar -xf gpu_bundle/jit-cache.tar -C ~/.cache; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TOK=/tmp/devkit/devkit/tokenizer
EPIC_TOKENIZER_DIR=$TOK timeout 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
"$PY" benchmarks/gpu_ttft.py --tokenizer "$TOK" "$@" 2>&1 | tee "$OUT/gpu_ttft.log" | grep -v Warning | tail -40
cp BENCHMARKS.md "$OUT/" 2>/dev/null
(cd ~/.cache && tar -cf "$OUT/jit-cache.tar" flashinfer 2>/dev/null; ls -la "$OUT/jit-cache.tar")
