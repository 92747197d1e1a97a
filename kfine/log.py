"""What kfine prints besides its results: TensorFlow's start-up noise (off by default) and
progress lines for steps that take more than a few seconds.

TensorFlow writes two kinds of lines of its own to stderr:
- lines written before absl::InitializeLog() while ``import tensorflow`` loads its libraries
  (``WARNING: All log messages before absl::InitializeLog() ...``, oneDNN, ``cudart_stub``, the
  CPU-instructions note). No environment variable reaches them, so ``quiet_tensorflow`` imports
  TensorFlow with file descriptor 2 pointed at /dev/null;
- C++ log lines after that (``E0000 ... failed call to cuInit`` on a machine without a GPU,
  ``E0000 ... jpeg_mem.cc] Premature end of JPEG data`` for a truncated image). The ones at
  error level are hidden only by ``TF_CPP_MIN_LOG_LEVEL=3``; TensorFlow errors that matter reach
  Python as exceptions, which kfine reports.
libjpeg itself prints some messages (``Input file read error``) with fprintf from inside a decode:
wrap a bounded decoding pass in ``quiet_stderr()`` to hide them.

``KFINE_LOG=debug`` turns all of this off (TensorFlow logs everything, as without kfine). An
explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment is respected.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time


def debug() -> bool:
    """True when KFINE_LOG=debug: show every log line TensorFlow writes."""
    return os.environ.get("KFINE_LOG", "").strip().lower() == "debug"


@contextlib.contextmanager
def quiet_stderr():
    """Point file descriptor 2 at /dev/null for the block (C/C++ writes included), then restore it.
    Python's own sys.stderr is flushed first, so nothing written before the block is lost."""
    if debug():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_tensorflow() -> None:
    """Silence TensorFlow's start-up and C++ log lines; call at the start of every entry point,
    before anything imports TensorFlow (``import kfine`` does not). Sets TF_CPP_MIN_LOG_LEVEL=3
    (unless set) so that child processes are quiet too, then imports TensorFlow quietly."""
    if debug():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        with quiet_stderr():
            import tensorflow  # noqa: F401
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)   # TensorFlow's Python-side WARNING:absl lines


@contextlib.contextmanager
def progress(what: str):
    """``kfine: <what> ...`` now and ``kfine: <what>: done in 12.3 s`` when the block ends, so a
    step of several seconds (evaluation, export, report, a data pass) is never silent."""
    print(f"kfine: {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"kfine: {what}: done in {time.perf_counter() - start:.1f} s", flush=True)


# ----------------------------------------------------------------------------- where a run's time goes
# The stages of a run, in order; each run's seconds are printed at its end (format_timings) and kept
# in run_info.json ("timings"), the report and kfine.compare / kfine.tune's per-run lines.
STAGES = ("startup", "data", "model", "features", "training", "restore", "evaluation", "export", "plots")
STAGE_HELP = {"startup": "imports, config, run directory", "data": "index, decode, data check",
              "model": "build model and optimizer", "features": "backbone features (cache)",
              "training": "epochs and checkpoints", "restore": "best epoch, model.keras",
              "evaluation": "test predictions and metrics", "export": "export formats",
              "plots": "plots, heatmaps, report"}
_RUN: dict | None = None     # the run being timed: {"seconds": {stage: s}, "inner": [s, ...]}
_RUNS_TIMED = 0              # runs timed in this process (the first one pays the imports)


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc), 0 where that is unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@contextlib.contextmanager
def run_timings():
    """Time one run: yields its {stage: seconds} (STAGES, every key present, and "total": the
    run's wall time, which the stages account for up to small untimed steps), filled as timed()
    blocks end. The first run of a process counts the process's start (imports) as startup."""
    global _RUN, _RUNS_TIMED
    outer, seconds = _RUN, dict.fromkeys(STAGES, 0.0)
    seconds["startup"] = process_seconds() if _RUNS_TIMED == 0 else 0.0
    _RUNS_TIMED += 1
    _RUN = {"seconds": seconds, "inner": [], "start": time.perf_counter() - seconds["startup"]}
    try:
        yield seconds
    finally:
        seconds["total"] = time.perf_counter() - _RUN["start"]
        _RUN = outer


@contextlib.contextmanager
def timed(stage: str):
    """Add the block's seconds to ``stage`` of the run being timed (none: a no-op). Stages nest:
    an inner block's seconds count for the inner stage only."""
    run = _RUN
    if run is None:
        yield
        return
    start = time.perf_counter()
    run["inner"].append(0.0)
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        inner = run["inner"].pop()
        run["seconds"][stage] = run["seconds"].get(stage, 0.0) + elapsed - inner
        if run["inner"]:
            run["inner"][-1] += elapsed


def current_timings() -> dict | None:
    """The {stage: seconds} of the run being timed so far (a copy), None outside a run."""
    if _RUN is None:
        return None
    return {**_RUN["seconds"], "total": time.perf_counter() - _RUN["start"]}


def stage_split(seconds: dict) -> str:
    """``startup 5.9, data 3.1, ...``: the stages of format_timings, for one cell of a table."""
    return ", ".join(f"{s} {seconds.get(s, 0.0):.1f}" for s in STAGES)


def format_timings(seconds: dict) -> str:
    """``kfine: time 95.2 s: startup 5.9, data 3.1, ...`` (every stage, in order, in seconds)."""
    total = seconds.get("total", sum(seconds.get(s, 0.0) for s in STAGES))
    return f"kfine: time {total:.1f} s: {stage_split(seconds)}"
