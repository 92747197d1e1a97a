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
