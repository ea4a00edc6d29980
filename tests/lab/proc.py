"""Running commands and owning process groups for the lab.

Every long-running process the lab starts gets its own session (``start_new_session=True``), so its PID is also
its process-group id. Stopping it means signalling exactly that group (``os.killpg``) — never a search by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Self

from tests.waiting import eventually_sync

log = logging.getLogger(__name__)


class LabCommandError(RuntimeError):
    """A lab command exited non-zero; carries the command line, exit status and output."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"command {' '.join(self.argv)!r} exited {returncode}: {stderr.strip() or stdout.strip()}"
        )


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion (bounded by ``timeout``), capturing text output.

    Raises :class:`LabCommandError` (with stderr in the message) when ``check`` and the exit status is not 0,
    and :class:`subprocess.TimeoutExpired` when the command outlives ``timeout`` (it is killed first).
    """
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise LabCommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is ``pgid``, read from ``/proc``."""
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." — comm may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()
    return bool(fields) and fields[0] != "Z"


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class ProcessRegistry:
    """The process groups one lab started; :meth:`stop_all` ends each of them (by group id) at teardown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.append(proc)

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        with self._lock:
            return list(self._procs)

    def stop_all(self, timeout: float = 3.0) -> None:
        """SIGTERM every tracked group, wait up to ``timeout`` s, then SIGKILL what is left. Never raises."""
        procs = self.processes
        for proc in procs:
            if proc.poll() is None or group_members(proc.pid):
                signal_group(proc.pid, signal.SIGTERM)
        for proc in procs:
            terminate_group(proc, timeout=timeout, term_first=False)


def terminate_group(proc: subprocess.Popen[bytes], timeout: float = 3.0, *, term_first: bool = True) -> None:
    """End the process group led by ``proc`` (SIGTERM, bounded wait, then SIGKILL) and reap the leader.

    ``proc`` must have been started with ``start_new_session=True`` so that its PID is its group id. A signal
    is only sent while the group still has live members (so a recycled PID is never hit). Never raises.
    """
    pgid = proc.pid
    try:
        if term_first and group_members(pgid):
            signal_group(pgid, signal.SIGTERM)
        if not _wait_group_empty(proc, timeout):
            log.warning("process group %d outlived SIGTERM by %.1f s; sending SIGKILL", pgid, timeout)
            signal_group(pgid, signal.SIGKILL)
            if not _wait_group_empty(proc, timeout):
                log.warning("process group %d still has members after SIGKILL", pgid)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("process %d did not exit", pgid)
    except Exception:  # teardown is best effort
        log.exception("ending process group %d failed", pgid)


def _wait_group_empty(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    def empty() -> bool:
        proc.poll()  # reap the leader as soon as it exits
        return not group_members(proc.pid)

    try:
        eventually_sync(empty, timeout=timeout, what=f"process group {proc.pid} empty")
    except TimeoutError:
        return False
    return True


class StartedInContext:
    """`with thing:` runs `start()` and, on the way out, `stop()` — also when `start()` fails half-way, so that
    what it had started is stopped all the same."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
