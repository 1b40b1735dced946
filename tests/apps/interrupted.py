"""`python -m tests.apps.interrupted POINT MARKER biasfast-args...`: `biasfast` that stops at POINT and waits to
be killed, after creating the file MARKER, so a test can SIGKILL it at a known moment.

POINT is `write:PREFIX:N` (halfway through the N-th atomic write of a file whose "folder/name" starts with
PREFIX: the temporary file holds half the bytes and the rename has not happened; `write:checkpoints/step_:1`
is the first checkpoint `biasfast run` writes, `write:models/pair_state.pt:2` the second training state of the pair of
`biasfast hierarchy`), `written:PREFIX:N` (just after the N-th such write is complete, under its final name),
`sampling:N` (inside the N-th `sample_coupled` call of `biasfast run`, before its samples exist) or `evaluating:N`
(inside the N-th checkpoint load of a `biasfast hierarchy` experiment, `PairTrainer.weights`, before it returns).
The patch wraps the real functions, so everything up to POINT runs as in `biasfast`. `start_biasfast`,
`wait_for` and `kill` are the test side.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from typing import Callable

import biasfast._core.io as atomic
import biasfast.apps.run as run
from biasfast.apps.main import main

WAIT_S = 600
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}


def start_biasfast(argv: list[str], *hook: str) -> subprocess.Popen:
    """`python -m biasfast ARGV` in a subprocess, or with hook = (POINT, MARKER) this module stopping there."""
    module = [__name__, *hook] if hook else ["biasfast"]
    return subprocess.Popen([sys.executable, "-m", *module, *argv], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float = 240) -> None:
    """Poll until `ready()`; fail with the process's stderr if it exits or the time runs out first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None:
        if ready():
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {what}; exit {process.poll()}: {process.stderr.read() if process.stderr else ''}")


def kill(process: subprocess.Popen) -> None:
    """SIGKILL, and check that it was the kill that ended the process (not a finished or failed run)."""
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the process ended before it could be killed"
    process.stderr.close()


def _stop(marker: str) -> None:
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(WAIT_S)
    raise SystemExit("interrupted: nobody killed this process")


def _at_write(prefix: str, nth: int, marker: str) -> None:
    real, seen = atomic.write_atomically, []

    def write_atomically(path, write, mode="w"):
        where = f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
        if not where.startswith(prefix):
            return real(path, write, mode)
        seen.append(path)
        if len(seen) < nth:
            return real(path, write, mode)

        def half_then_stop(stream):
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            stream.write(data[: len(data) // 2])
            stream.flush()
            _stop(marker)

        return real(path, half_then_stop, mode)

    atomic.write_atomically = write_atomically


def _after_write(prefix: str, nth: int, marker: str) -> None:
    real, seen = atomic.write_atomically, []

    def write_atomically(path, write, mode="w"):
        real(path, write, mode)
        if f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}".startswith(prefix):
            seen.append(path)
            if len(seen) == nth:
                _stop(marker)

    atomic.write_atomically = write_atomically


def _at_evaluation(nth: str, marker: str) -> None:
    from biasfast.hierarchy.train import PairTrainer

    real, calls = PairTrainer.weights, []

    def weights(self, name, epoch):
        calls.append(None)
        if len(calls) == int(nth):
            _stop(marker)
        return real(self, name, epoch)

    PairTrainer.weights = weights


def _at_sampling(nth: str, marker: str) -> None:
    real, calls = run.sample_coupled, []

    def sample_coupled(*args, **kwargs):
        calls.append(None)
        if len(calls) == int(nth):
            _stop(marker)
        return real(*args, **kwargs)

    run.sample_coupled = sample_coupled


if __name__ == "__main__":  # the hooked `biasfast`
    point, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    name, *where = point.split(":")
    {"write": lambda prefix, n, m: _at_write(prefix, int(n), m),
     "written": lambda prefix, n, m: _after_write(prefix, int(n), m),
     "sampling": _at_sampling, "evaluating": _at_evaluation}[name](*where, marker)
    sys.exit(main(argv))
