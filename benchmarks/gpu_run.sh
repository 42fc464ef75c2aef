#!/usr/bin/env bash
# On the GPU host: install the offline SGLang/FlashInfer kit from gpu_bundle/ (built with
# ../shared/gpu-kit/build.sh), then run the GPU tests or benchmarks/gpu_ttft.py; logs,
# BENCHMARKS.md and FlashInfer's JIT cache go to $OUT (copy jit-cache.tar.xz into gpu_bundle/,
# or `cat` its parts into it).
#   bash benchmarks/gpu_run.sh tests [test files or pytest args]   # default: every GPU test
#   bash benchmarks/gpu_run.sh bench [gpu_ttft.py args...]
#   bash benchmarks/gpu_run.sh all [gpu_ttft.py args...]   # both
#   bash benchmarks/gpu_run.sh profile [gpu_profile.py args...]
#   bash benchmarks/gpu_run.sh link [gpu_link_attention.py args...]   # link attention alone
#   bash benchmarks/gpu_run.sh plugin-decode [gpu_plugin_decode.py args...]   # the plugin's attention alone (--part link: a link pass)
#   bash benchmarks/gpu_run.sh sglang [sglang_pic.py args...]   # real SGLang server + the plugin
#   bash benchmarks/gpu_run.sh sglang-profile [sglang_profile.py args...]   # a linked request under SGLang's profiler
#   bash benchmarks/gpu_run.sh cache   # only the JIT caches into $OUT
#   bash benchmarks/gpu_run.sh warm [gpu_warm.py args...]   # compile a model shape's kernels ahead
#   bash benchmarks/gpu_run.sh accuracy [accuracy.py args...]   # real weights and the data of
#       `python -m epic_sglang.data.pack .data`
#   bash benchmarks/gpu_run.sh NAME=VALUE... MODE [args]   # with those set in the environment
#       (e.g. EPIC_SGLANG_PREFILL_GRAPHS=1 sglang --part check --tag prefill-graphs: the plugin's servers get it)
# Real weights (../shared/gpu-kit/WEIGHTS.md): unpack them into /tmp/weights-site
# (`bash .wx/weights.sh unpack .wx /tmp/weights-site`), which is on the path of every mode here;
# not into /tmp/site, which the kit's first load here wipes.
set -uo pipefail
cd "$(dirname "$0")/.."
while [[ "${1:-}" =~ ^[A-Z_][A-Z0-9_]*= ]]; do export "$1"; shift; done
MODE=${1:?usage: gpu_run.sh [NAME=VALUE...] tests|bench [args]}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PYTHON:-/opt/torch/.venv/bin/python3}; [ -x "$PY" ] || PY=$(command -v python3)
export PYTHON=$PY
# Several calls in one command share one install (the kit and the JIT cache).
LOADED=/tmp/site/.epic-kit-loaded
if [ ! -f "$LOADED" ]; then
  bash gpu_bundle/load.sh gpu_bundle > "$OUT/load.log" 2>&1 || { tail -20 "$OUT/load.log"; exit 1; }
fi
export PYTHONPATH=/tmp/site:/tmp/weights-site:$PWD
# Triton keeps its kernels in ~/.triton unless told: under ~/.cache they travel in the JIT cache below.
export TRITON_CACHE_DIR=$HOME/.cache/triton
export PATH="$(dirname "$PY"):$PATH"
for c in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null); do
  [ -x "$c/bin/nvcc" ] && { export CUDA_HOME=$c; export PATH="$c/bin:$PATH"; break; }
done
# FlashInfer's JIT cache from an earlier run skips minutes of kernel compilation.
if [ ! -f "$LOADED" ] && [ -f gpu_bundle/jit-cache.tar.xz ]; then
  mkdir -p ~/.cache && xz -dc gpu_bundle/jit-cache.tar.xz | tar -xf - -C ~/.cache
fi
touch "$LOADED"
# The plugin is found through its entry point: what `pip install` would write for this checkout.
DIST=/tmp/site/epic_sglang-0.1.0.dist-info
mkdir -p "$DIST" && printf 'Metadata-Version: 2.1\nName: epic-sglang\nVersion: 0.1.0\n' > "$DIST/METADATA"
sed -n '/entry-points."sglang.srt.plugins"/,/^$/p' pyproject.toml | sed 's/^\[project.entry-points."sglang.srt.plugins"\]/[sglang.srt.plugins]/' | tr -d '"' > "$DIST/entry_points.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
TOK=/tmp/devkit/devkit/tokenizer
run_tests() {
  local which=("$@"); [ ${#which[@]} -gt 0 ] || which=(tests/test_gpu.py tests/test_rotate_copy.py tests/test_rms_norm.py tests/test_merge_states.py tests/test_sglang_plugin.py)
  EPIC_TOKENIZER_DIR=$TOK "$PY" -m pytest -q -p no:cacheprovider "${which[@]}" -m gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  return "${PIPESTATUS[0]}"
}
run_script() {  # benchmarks/<name>.py [args]; BENCHMARKS.md back to $OUT
  local name=$1; shift
  "$PY" "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -i warn | tail -60
  local rc=${PIPESTATUS[0]}; cp BENCHMARKS.md "$OUT/"; return "$rc"
}
case "$MODE" in
  all) run_tests; t=$?; run_script gpu_ttft --tokenizer "$TOK" "$@"; rc=$?; [ "$t" = 0 ] || rc=$t ;;
  tests) run_tests "$@"; rc=$? ;;
  bench) run_script gpu_ttft --tokenizer "$TOK" "$@"; rc=$? ;;
  link) run_script gpu_link_attention "$@"; rc=$? ;;
  plugin-decode) run_script gpu_plugin_decode "$@"; rc=$? ;;
  profile) run_script gpu_profile --tokenizer "$TOK" "$@"; rc=$? ;;
  sglang) run_script sglang_pic --tokenizer "$TOK" --logs "$OUT" "$@"; rc=$? ;;
  sglang-profile) run_script sglang_profile --tokenizer "$TOK" --logs "$OUT" "$@"; rc=$? ;;
  cache) rc=0 ;;
  warm) "$PY" benchmarks/gpu_warm.py --tokenizer "$TOK" "$@" 2>&1 | grep -v -i warn | tail -20; rc=${PIPESTATUS[0]} ;;
  accuracy) [ -d .data ] && export PYTHONPATH=$PWD/.data:$PYTHONPATH
    run_script accuracy --device cuda "$@"; rc=$?; cp benchmarks/accuracy-*.png "$OUT/" 2>/dev/null ;;
  *) echo "unknown mode $MODE"; exit 2 ;;
esac
[ -n "${SKIP_JIT_CACHE:-}" ] && exit "$rc"  # gpu_queue.sh: collected once, at the end
# $OUT brings back at most 8 files of 16 MiB: the JIT caches (FlashInfer's, SGLang's) as one
# xz file, gpu_bundle/jit-cache.tar.xz for the next run (split into 15 MiB parts only if larger).
(cd ~/.cache && tar -cf - --exclude=pip --exclude=huggingface --exclude=epic_sglang . 2>/dev/null | xz -T0 -3 > "$OUT/jit-cache.tar.xz" &&
  if [ "$(stat -c %s "$OUT/jit-cache.tar.xz")" -gt 15728640 ]; then
    split -b 15M -d -a 2 "$OUT/jit-cache.tar.xz" "$OUT/jit-cache.tar.xz." && rm "$OUT/jit-cache.tar.xz"
  fi; ls -la "$OUT"/jit-cache.tar.xz*)
exit "$rc"
