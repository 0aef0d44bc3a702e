"""Test helpers: start a command in its own session, wait for a condition on disk, and kill the command with
every process it started, as a machine or a job scheduler does (SIGKILL, no chance to clean up).

Killing one process group is not enough: ``torchrun`` starts each worker in a new session, and a killed
``torchrun`` leaves them running. So ``kill_tree`` freezes the whole tree (SIGSTOP, repeated until no new
process appears), kills every member and waits until none is alive: only then is the output folder what a
resume will see.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def start(
    command: Sequence[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``command`` in a new session (its own process group); its output goes to ``log`` (stdout and stderr
    together, so that a failing test can show what the killed run said; ``log_tail``), else is discarded."""
    # the child keeps its own copy of the log's descriptor, so ours is closed at once
    with log.open("wb") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as output:
        return subprocess.Popen(list(command), cwd=cwd, env=env, start_new_session=True,
                                stdout=output, stderr=subprocess.STDOUT)  # fmt: skip


def log_tail(log: Path, characters: int = 3000) -> str:
    """The end of a ``start`` log, for an assertion message."""
    try:
        return log.read_text(errors="replace")[-characters:]
    except OSError as error:
        return f"(no log: {error})"


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], timeout: float = 300) -> bool:
    """Poll ``condition()`` until it holds (True) or the process has ended (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError(f"no progress in {timeout} s: {process.args}")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except OSError:  # ended while we looked
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def descendants(root: int) -> set[int]:
    """``root`` and every live (not zombie) process below it."""
    table = _processes()
    found, frontier = set(), [root]
    while frontier:
        pid = frontier.pop()
        if pid in found or table.get(pid, (0, "X"))[1] in ("Z", "X"):
            continue
        found.add(pid)
        frontier.extend(child for child, (parent, _) in table.items() if parent == pid)
    return found


def _signal(pids: set[int], number: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def kill_tree(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGKILL ``process`` and all its descendants; return once none of them is alive."""
    frozen: set[int] = set()
    while True:  # freeze first, so that nobody starts a child (or writes a file) after we looked
        members = descendants(process.pid) - frozen
        if not members:
            break
        _signal(members, signal.SIGSTOP)
        frozen |= members
    _signal(frozen, signal.SIGKILL)
    process.wait(timeout=timeout)
    wait_until_gone(frozen, timeout, "killed processes still alive")


def alive(pids: set[int]) -> set[int]:
    """The members of ``pids`` still running (a zombie counts as gone: it runs nothing and holds no file)."""
    table = _processes()
    return {pid for pid in pids if table.get(pid, (0, "X"))[1] not in ("Z", "X")}


def wait_until_gone(pids: set[int], timeout: float, what: str) -> None:
    """Return once none of ``pids`` is alive; TimeoutError naming them after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while running := alive(pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s: {sorted(running)}")
        time.sleep(0.01)
