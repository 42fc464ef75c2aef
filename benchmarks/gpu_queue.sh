#!/usr/bin/env bash
# gpu_run.sh jobs one after another in the background on the GPU host, in a private copy of
# the checkout (each device call replaces the checkout's files, and would drop the sections a
# job writes into BENCHMARKS.md). Weight chunks can then travel (../shared/gpu-kit/WEIGHTS.md)
# while the GPU works.
#   bash benchmarks/gpu_queue.sh add 'tests' 'bench --contexts 16384 32768'   # starts the runner if needed
#       (a job is read as a shell line: quote an argument with spaces,
#       'sglang --part load --load-flags="--enable-prefill-delayer --prefill-delayer-queue-min-ratio 0.25"')
#   bash benchmarks/gpu_queue.sh status        # the jobs, and the log's tail
#   bash benchmarks/gpu_queue.sh collect       # $OUT: BENCHMARKS.md, results.tar.xz (logs, runs/, PNGs), JIT caches
#   bash benchmarks/gpu_queue.sh sync          # this checkout's code into the private copy (a fix; outputs stay)
#   bash benchmarks/gpu_queue.sh stop          # the runner exits once the queue is empty
# `add` also copies .data (the evaluation data) into the private copy.
set -uo pipefail
cd "$(dirname "$0")/.."
Q=/tmp/gpu-queue; REPO=$Q/repo
cmd=${1:?usage: gpu_queue.sh add|status|collect|stop ...}; shift
case "$cmd" in
  add)
    mkdir -p "$Q/out"
    [ -d "$REPO" ] || { mkdir -p "$REPO" && tar -cf - . | tar -xf - -C "$REPO"; }
    [ -d .data ] && { rm -rf "$REPO/.data"; cp -r .data "$REPO/.data"; }
    for job in "$@"; do echo "$job" >> "$Q/jobs"; done
    if ! [ -f "$Q/pid" ] || ! kill -0 "$(cat "$Q/pid")" 2>/dev/null; then
      setsid nohup bash -c '
        i=0; Q='"$Q"'
        while true; do
          job=$(sed -n "$((i + 1))p" "$Q/jobs")
          if [ -z "$job" ]; then [ -f "$Q/stop" ] && exit 0; sleep 2; continue; fi
          echo "=== job $i: $job ($(date +%T))" >> "$Q/log"
          (cd "$Q/repo" && eval "OUT=$Q/out SKIP_JIT_CACHE=1 bash benchmarks/gpu_run.sh $job") >> "$Q/log" 2>&1
          echo "=== job $i done: rc $? ($(date +%T))" >> "$Q/log"
          i=$((i + 1))
        done' > /dev/null 2>&1 < /dev/null &
      echo $! > "$Q/pid"
    fi
    cat "$Q/jobs" ;;
  sync) tar -cf - --exclude=./BENCHMARKS.md --exclude=./runs --exclude='./benchmarks/*.png' --exclude=./gpu_bundle . \
          | tar -xf - -C "$REPO" && echo synced ;;
  status) grep "^=== " "$Q/log" 2>/dev/null; tail -n "${1:-5}" "$Q/log" 2>/dev/null ;;
  collect)
    cp "$REPO/BENCHMARKS.md" "$OUT/" 2>/dev/null
    bash benchmarks/gpu_run.sh cache > /dev/null  # the JIT caches, as gpu_run.sh returns them
    (cd "$Q" && tar -cf - log out repo/runs repo/benchmarks/*.png 2>/dev/null | xz -T0 -3 > "$OUT/results.tar.xz")
    ls -la "$OUT" ;;
  stop) touch "$Q/stop" ;;
  *) echo "unknown command $cmd"; exit 2 ;;
esac
