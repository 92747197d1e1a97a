"""Processes that start with TensorFlow and Keras already imported: ``Popen`` and ``run`` as in
subprocess, for ``[sys.executable, "-m", module, ...]``, ``[sys.executable, "-c", code, ...]`` and
``[sys.executable, script, ...]``.

The suite starts about forty kfine processes (killed at every moment of a run and resumed, searches
killed and resumed, two JAX processes on loopback, JAX runs). Each would spend 6 to 9 s of CPU
importing TensorFlow, Keras and JAX before its first line of work. Here one server process per
worker and backend imports them once, without starting any of their runtimes, and forks a child per
command: a real process with its own pid, working folder, environment and output files, which a
test signals, kills and waits for like any other (its exit status is the command's, or minus the
signal that ended it). What the few real-process smokes check (start-up lines on stderr, an
installed wheel) stays with subprocess.

One thing is fixed when the server starts and so keys it: the environment that Keras and JAX read
at import (KERAS_BACKEND; JAX_* for the JAX backend). XLA_FLAGS is read when JAX's runtime
starts, in the child. TensorFlow's C++ log level is the server's (3: quiet). KFINE_TESTS_FORK=0
runs every command as a fresh process instead (subprocess itself), to tell the two apart when a
test fails.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORK = os.environ.get("KFINE_TESTS_FORK", "1") != "0"
_SERVERS: dict[tuple, tuple[subprocess.Popen, str]] = {}


def _key(env: dict) -> tuple:
    backend = env.get("KERAS_BACKEND", "tensorflow")
    return backend, tuple(sorted((k, v) for k, v in env.items() if backend == "jax" and k.startswith("JAX_")))


def _server(env: dict) -> str:
    """The socket of the server for this environment, started on first use."""
    key = _key(env)
    if key not in _SERVERS:
        folder = tempfile.mkdtemp(prefix="kfine-forkserver-")
        address = os.path.join(folder, "socket")
        with open(os.path.join(folder, "log"), "w") as log:   # TensorFlow's start-up lines
            proc = subprocess.Popen([sys.executable, __file__, address], cwd=folder, stdin=subprocess.DEVNULL,
                                    env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not os.path.exists(address + ".ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the fork server did not start:\n{Path(folder, 'log').read_text()[-3000:]}")
            time.sleep(0.05)
        _SERVERS[key] = (proc, address)
    return _SERVERS[key][1]


@atexit.register
def _stop_servers():
    for proc, address in _SERVERS.values():
        proc.kill()
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)


def Popen(args, **kw):
    return _Forked(args, **kw) if FORK else subprocess.Popen(args, **kw)


class _Forked:
    """subprocess.Popen's args, cwd, env, stdout (None or an open file), stderr (None, an open file
    or STDOUT) and start_new_session; pid, poll(), wait(timeout), send_signal(), kill(), returncode."""

    def __init__(self, args, *, cwd=None, env=None, stdout=None, stderr=None, start_new_session=False):
        assert args[0] == sys.executable, args
        self.args, self.returncode, self._buffer = list(args), None, b""
        env = dict(os.environ if env is None else env)
        out = stdout.name if stdout is not None else os.devnull     # the child appends to the same file
        err = out if stderr == subprocess.STDOUT else stderr.name if stderr is not None else os.devnull
        self._conn = socket.socket(socket.AF_UNIX)
        self._conn.connect(_server(env))
        request = {"argv": self.args[1:], "cwd": str(cwd or os.getcwd()), "env": env, "stdout": out, "stderr": err,
                   "session": start_new_session}
        self._conn.sendall(json.dumps(request).encode() + b"\n")
        self.pid = int(self._line(None))

    def _line(self, timeout):
        """The server's next line: the child's pid, then its wait status; None if none came in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError(f"the fork server closed the connection of {self.args[1:3]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def wait(self, timeout=None):
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = os.waitstatus_to_exitcode(int(line))
            self._conn.close()
        return self.returncode

    def poll(self):
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig):
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run(args, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False):
    """subprocess.run for a command forked from the server (capture_output: its stdout and stderr)."""
    if not FORK:
        return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check)
    with tempfile.TemporaryDirectory(prefix="kfine-forked-") as tmp:
        files = [open(os.path.join(tmp, name), "w+b") if capture_output else None for name in ("stdout", "stderr")]
        proc = _Forked(args, cwd=cwd, env=env, stdout=files[0], stderr=files[1])
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        outs = [f.read() if f else None for f in files]
        for f in files:
            if f:
                f.close()
    if text and capture_output:
        outs = [o.decode(errors="replace") for o in outs]
    done = subprocess.CompletedProcess(args, proc.returncode, *outs)
    if check:
        done.check_returncode()
    return done


# ----------------------------------------------------------------------------- the server
def _child(request: dict):
    """In the forked child: become the requested command, then exit with its status."""
    import atexit as exits
    import random
    import runpy
    import threading
    import traceback
    status = 1
    try:
        if request["session"]:
            os.setsid()
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        def append(path):
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        out = append(request["stdout"])
        err = out if request["stderr"] == request["stdout"] else append(request["stderr"])
        for fd, to in ((os.open(os.devnull, os.O_RDONLY), 0), (out, 1), (err, 2)):
            os.dup2(fd, to)
        random.seed()                       # a fresh process's randomness, not the server's
        import numpy as np
        np.random.seed()
        argv = request["argv"]
        if argv[0] == "-m":
            sys.path[0] = os.getcwd()
            sys.argv = ["-m", *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.path[0] = ""
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        status = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:                               # sys.exit("message"), as Python prints it
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    try:                                    # what an interpreter's exit does: join the threads,
        threading._shutdown()               # run the atexit handlers (kfine's exit_main ends the
        exits._run_exitfuncs()              # process from there), flush
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _serve(address: str):
    import threading
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax":
        import jax  # noqa: F401  (imported only: its runtime starts in each child)
    import keras  # noqa: F401
    import numpy  # noqa: F401
    import tensorflow  # noqa: F401
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address)
    listener.listen(16)
    listener.settimeout(1.0)
    Path(address + ".ready").touch()
    parent = os.getppid()

    def report(conn, pid):
        _, status = os.waitpid(pid, 0)
        try:
            conn.sendall(f"{status}\n".encode())
        finally:
            conn.close()

    while os.getppid() == parent:           # the test worker is gone: so is its server
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            continue
        request = json.loads(conn.makefile("r").readline())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            _child(request)
        conn.sendall(f"{pid}\n".encode())
        threading.Thread(target=report, args=(conn, pid), daemon=True).start()


if __name__ == "__main__":
    _serve(sys.argv[1])
