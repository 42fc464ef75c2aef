"""Where the scheduler's own thread spends its time: a sampling profiler of its Python stack,
started and stopped by SGLang's `/start_profile` (activities ["HOST"]) and `/stop_profile`;
and where it is stuck when SGLang's watchdog finds it stalled (`log_stalled_stacks`).

SGLang's torch profiler shows the kernels and how long the GPU waited between them; it does not
say which Python kept the GPU waiting. This samples the scheduler thread's stack every
millisecond (a C call is counted at the Python line that made it: a wait on the GPU shows as the
line that synchronizes) and writes, beside SGLang's traces, a report of the lines and functions
that held the thread, and the folded stacks for a flame graph.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

HOST = "HOST"  # the /start_profile activity that starts this sampler
Frame = tuple[str, str, int]  # (file, function, line)
Stack = tuple[Frame, ...]  # outermost call first


def short_path(filename: str) -> str:
    """A source file by its package path (`sglang/srt/managers/scheduler.py`), not the install's."""
    for marker in ("site-packages/", "dist-packages/", "/lib/python3."):
        if marker in filename:
            tail = filename.rsplit(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." else tail
    parts = Path(filename).parts
    return "/".join(parts[-3:])


def stack_of(frame) -> Stack:
    """A frame and its callers, outermost first."""
    frames = []
    while frame is not None:
        code = frame.f_code
        frames.append((short_path(code.co_filename), code.co_name, frame.f_lineno))
        frame = frame.f_back
    return tuple(reversed(frames))


class StackSampler:
    """The seconds one thread spends in each stack, sampled by a daemon thread every `interval_s`.

    A sample weighs the time since the one before: the sampler needs the GIL, so it wakes late
    while the thread runs Python (every switch interval, 5 ms) and on time while the thread
    waits in C with the GIL released; counting samples would overweight the waits."""

    def __init__(self, thread_id: int, interval_s: float = 0.001):
        self.thread_id, self.interval_s = thread_id, interval_s
        self.counts: Counter[Stack] = Counter()  # seconds per stack
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epic-host-sampler", daemon=True)
        self.started = self.seconds = 0.0

    def start(self) -> StackSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval_s):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:  # the thread has exited
                return
            now = time.perf_counter()
            self.counts[stack_of(frame)] += now - last
            last = now

    def stop(self) -> Counter[Stack]:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started
        return self.counts


def self_shares(counts: Counter[Stack]) -> Counter[Frame]:
    """Seconds per innermost Python line: where the thread was (in that line's C calls included)."""
    lines: Counter[Frame] = Counter()
    for stack, n in counts.items():
        lines[stack[-1]] += n
    return lines


def inclusive_shares(counts: Counter[Stack]) -> Counter[tuple[str, str]]:
    """Seconds per function with everything it called; a recursive function counts once a sample."""
    functions: Counter[tuple[str, str]] = Counter()
    for stack, n in counts.items():
        for fn in {(file, name) for file, name, _ in stack}:
            functions[fn] += n
    return functions


def report(counts: Counter[Stack], seconds: float, top: int = 25) -> str:
    total = sum(counts.values())
    if not total:
        return "no samples (the scheduler thread was not seen)"
    lines = [f"the scheduler thread: {total:.2f} s sampled of {seconds:.2f} s, {len(counts):,} distinct stacks",
             "", "innermost Python line (its C calls included: a wait on the GPU is the line that waits):"]
    lines += [f"  {n / total:6.1%}  {file}:{line}  {name}" for (file, name, line), n in self_shares(counts).most_common(top)]
    lines += ["", "function, with everything it called:"]
    lines += [f"  {n / total:6.1%}  {file}  {name}" for (file, name), n in inclusive_shares(counts).most_common(top)]
    return "\n".join(lines) + "\n"


def folded(counts: Counter[Stack]) -> str:
    """Brendan Gregg's folded stacks (`flamegraph.pl`, speedscope): one line per stack, in microseconds."""
    return "".join(";".join(f"{name} ({file}:{line})" for file, name, line in stack) + f" {round(n * 1e6)}\n"
                   for stack, n in counts.most_common())


def write(sampler: StackSampler, out_dir: Path) -> Path:
    """The report and the folded stacks under `out_dir`; the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "host-profile.txt"
    path.write_text(report(sampler.counts, sampler.seconds))
    (out_dir / "host-profile.folded").write_text(folded(sampler.counts))
    return path


def profile_host(original, manager, recv_req):
    """SchedulerProfilerManager._profile: activities ["HOST"] start this sampler on the
    scheduler's thread (alone: SGLang's profilers would weigh on what it measures); the next
    stop writes its report. Every other request is SGLang's."""
    from sglang.srt.managers.io_struct import ProfileReqOutput, ProfileReqType

    sampler = getattr(manager, "epic_host_sampler", None)
    if recv_req.req_type == ProfileReqType.START_PROFILE and HOST in (recv_req.activities or ()):
        if sampler is not None or recv_req.activities != [HOST]:
            why = "already sampling" if sampler is not None else f'"{HOST}" runs alone, without {recv_req.activities}'
            return ProfileReqOutput(success=False, message=f"epic host profile: {why}")
        manager.epic_host_sampler = StackSampler(threading.get_ident()).start()
        manager.epic_host_dir = Path(recv_req.output_dir or "/tmp")
        return ProfileReqOutput(success=True, message="epic host profile: sampling the scheduler thread")
    if recv_req.req_type == ProfileReqType.STOP_PROFILE and sampler is not None:
        sampler.stop()
        manager.epic_host_sampler = None
        return ProfileReqOutput(success=True, message=f"epic host profile: {write(sampler, manager.epic_host_dir)}")
    return original(manager, recv_req)


def thread_stacks(skip: int | None = None) -> str:
    """Every thread's Python stack in this process but `skip`'s, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items() if ident != skip)


def log_stalled_stacks(original, *args, **kwargs):
    """sglang.srt.utils.watchdog.pyspy_dump_schedulers, as SGLang's watchdog calls it when it
    finds this process's forward stuck: it asks py-spy for the stack, and the GPU hosts have no
    py-spy (the first linked requests' 104 s stalls were left unexplained). This process's
    Python stacks are logged first, the watchdog's own thread left out; a C call shows as the
    Python line that made it (a kernel compile, as the line that built it)."""
    logger.error("epic: Python stacks of the stalled process:\n%s", thread_stacks(threading.get_ident()))
    return original(*args, **kwargs)
