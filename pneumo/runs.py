"""Runs that end cleanly: a stop request ends the run ``KILLED``, and runs of dead processes are closed.

A SIGTERM or SIGINT used to leave the MLflow run RUNNING forever (or, under ``mlflow run``, the
child went on training and ended FINISHED). Raising from the signal handler itself is unsafe:
inside TensorFlow it hung once in 11 tries, because the exception can land at any bytecode,
halfway through the input pipeline's bookkeeping. So the handler only records the request, and
the work stops at the next safe point: between files in discovery, around decoding, and after
every Keras batch (:func:`keras_callback`). The run then ends ``KILLED`` with whatever it logged
so far, and the process exits with status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT). The
same signal again (Ctrl-C pressed twice) stops at once, from the handler.

Started by ``mlflow run`` (``MLFLOW_RUN_ID`` set), the entry point follows its parent: Linux's
``PR_SET_PDEATHSIG`` turns the parent's death into a SIGTERM here, and a watcher thread notices
a changed ``os.getppid()`` (the parent died before the request was armed, or the system has no
prctl). Launched directly (``nohup python -m entrypoints.X &``), it outlives its shell as before.

Every run records its process (``pneumo.process.host``, ``.pid``, ``.started``: the start time
from ``/proc``, which tells a reused pid apart). A process killed with SIGKILL cannot end its run;
``python -m pneumo.runs close-orphans`` ends, as KILLED, every RUNNING run of this host whose
process is gone, and each entry point does the same for its own experiment when it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import mlflow

log = logging.getLogger(__name__)

HOST_TAG = "pneumo.process.host"
PID_TAG = "pneumo.process.pid"
STARTED_TAG = "pneumo.process.started"
CLOSED_BY_TAG = "pneumo.closed_by"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Linux <sys/prctl.h>: deliver a signal to this process when the thread that started it dies.
_PR_SET_PDEATHSIG = 1
# How often the watcher thread compares os.getppid() with the parent at start.
_PARENT_POLL_SECONDS = 1.0
# Whether `mlflow run` (or another parent owning the run) started this process. Read at import:
# mlflow.start_run removes MLFLOW_RUN_ID from the environment once it has resumed the run.
_STARTED_FOR_A_RUN = bool(os.environ.get("MLFLOW_RUN_ID"))


class Stopped(SystemExit):
    """The run was asked to stop by a signal; exits with ``128 + signal`` (no traceback).

    A ``SystemExit``, so that ``except Exception`` blocks (a skipped image, an unreadable cache)
    never swallow it, while ``finally`` blocks and context managers still clean up on the way out.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class _State:
    """The stop request and what :func:`guarded` installed (one per process)."""

    requested: int | None = None
    # Set while a stopped run is being ended: a further signal must not interrupt that.
    ending = False
    depth = 0
    previous: dict[int, Any] = {}
    watcher_stop: threading.Event | None = None


def _handle(signum: int, frame: Any) -> None:
    # Only a flag: no logging here (the main thread may hold the logging lock), no raising unless
    # the user insists with the same signal again. Ctrl-C under `mlflow run` brings a SIGINT and
    # then the parent's SIGTERM: two different signals, still a stop at the next safe point.
    if _State.requested == signum and not _State.ending:
        raise Stopped(signum)
    _State.requested = _State.requested or signum


def stop_requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _State.requested


def check() -> None:
    """Stop here when a stop was requested: raise :class:`Stopped`. Call it only at safe points.

    Raises:
        Stopped: A SIGTERM or SIGINT arrived (or the parent died) since the work began.
    """
    if _State.requested is not None:
        raise Stopped(_State.requested)


def keras_callback():
    """A Keras callback that stops training at the next batch once a stop was requested."""
    import keras  # here: `python -m pneumo.runs close-orphans` must not import TensorFlow

    class StopOnRequest(keras.callbacks.Callback):
        """Raises :class:`Stopped` after the batch during which a stop was requested."""

        def on_train_batch_end(self, batch, logs=None):
            check()

        def on_test_batch_end(self, batch, logs=None):
            check()

        def on_predict_batch_end(self, batch, logs=None):
            check()

    return StopOnRequest()


def start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux ``/proc``); None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised name


def process_tags() -> dict[str, str]:
    """The tags naming this process: host, pid and start time (empty where /proc is absent)."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), STARTED_TAG: start_time(pid) or ""}


def process_alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` exists and, when ``started`` is known, is the one that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = start_time(pid)
    return not started or now is None or now == started


def _follow_parent() -> None:
    """Stop (as if sent SIGTERM) when the parent process dies."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); watching the parent only", ctypes.get_errno())
        except (OSError, AttributeError) as error:
            log.warning("prctl is unavailable (%s); watching the parent pid only", error)
    stop = threading.Event()
    _State.watcher_stop = stop

    def watch() -> None:
        while not stop.wait(_PARENT_POLL_SECONDS):
            if os.getppid() != parent:
                # The flag, not a signal: PR_SET_PDEATHSIG has likely sent SIGTERM already, and the
                # same signal twice would stop at once, outside a safe point.
                if _State.requested is None:
                    log.warning("the parent process (pid %d) is gone: stopping", parent)
                    _State.requested = signal.SIGTERM
                return

    threading.Thread(target=watch, name="pneumo-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died between reading its pid and arming the request
        _State.requested = _State.requested or signal.SIGTERM


def _install() -> bool:
    """Install the handlers (main thread only); True when this call installed them."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _State.requested = None
    _State.previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    if _STARTED_FOR_A_RUN:
        _follow_parent()
    return True


def _uninstall() -> None:
    for signum, previous in _State.previous.items():
        signal.signal(signum, previous)
    _State.previous = {}
    if _State.watcher_stop is not None:
        _State.watcher_stop.set()
        _State.watcher_stop = None
    _State.requested = None
    _State.ending = False


@contextlib.contextmanager
def guarded(run: mlflow.ActiveRun, nested: bool = False) -> Iterator[None]:
    """Inside an active run: record its process, stop it cleanly on a signal, end it KILLED then.

    The outermost call installs the SIGTERM/SIGINT handlers (restoring the previous ones on exit,
    so a test process or notebook gets its Ctrl-C back) and, for a top-level run, first closes the
    runs of dead processes of this host in the run's experiment.

    Args:
        run: The active run (the innermost one when ``nested``).
        nested: A child run of another guarded run.

    Raises:
        Stopped: A stop was requested; the run has been ended KILLED.
    """
    import mlflow  # here: pneumo.data imports this module for check(), and must stay light

    installed = _State.depth == 0 and _install()
    _State.depth += 1
    try:
        mlflow.set_tags(process_tags())
        if not nested:
            try:
                close_orphans([run.info.experiment_id])
            except Exception as error:  # a convenience at start: never the reason a run fails
                log.warning("could not check for runs of dead processes: %s", error)
        yield
        check()  # a stop requested after the last safe point still ends the run KILLED
    except Stopped as stop:
        _State.ending = True
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run("KILLED")
        log.warning("stopped by %s: run %s ended KILLED", stop.signal_name, run.info.run_id)
        raise
    finally:
        _State.depth -= 1
        if installed:
            _uninstall()


def close_orphans(experiment_ids: list[str] | None = None, host: str | None = None) -> list[str]:
    """End, as KILLED, the RUNNING runs of ``host`` whose recorded process no longer exists.

    Runs without the process tags (made by other tools, or older than them) and runs of other
    hosts are left alone: whether their process lives cannot be told from here.

    Args:
        experiment_ids: Where to look; None = every active experiment.
        host: The host whose runs are checked; None = this one.

    Returns:
        The ids of the runs closed.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    host = host or socket.gethostname()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in mlflow.search_experiments()]
    if not experiment_ids:
        return []
    quoted = host.replace("'", "\\'")
    runs = mlflow.search_runs(
        experiment_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{quoted}'",
        output_format="list",
    )
    client = MlflowClient()
    closed = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if process_alive(pid, tags.get(STARTED_TAG)):
            continue
        client.set_tag(run.info.run_id, CLOSED_BY_TAG, "close-orphans")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
        log.warning("run %s: its process (pid %d) is gone; ended KILLED", run.info.run_id, pid)
    return closed


def main(argv: list[str] | None = None) -> int:
    """``python -m pneumo.runs close-orphans [--experiment-id ID ...]``: close runs of dead processes."""
    parser = argparse.ArgumentParser(prog="python -m pneumo.runs", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    orphans = commands.add_parser("close-orphans", help="end, as KILLED, RUNNING runs of dead processes of this host")
    orphans.add_argument("--experiment-id", action="append", help="only this experiment (repeatable); default: all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    closed = close_orphans(args.experiment_id)
    print(f"closed {len(closed)} run(s) of dead processes on {socket.gethostname()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
