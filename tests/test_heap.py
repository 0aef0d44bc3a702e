"""worldmodel/heap.py: freed memory kept in the process. Each check runs in a fresh interpreter, since the
setting is the process's and cannot be undone."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from worldmodel import heap

# Allocate 64 MiB, write it, free it, then do it again: the page faults of the second round (minor faults are
# pages the kernel maps in on first touch).
SECOND_ROUND_FAULTS = """
import resource, sys, torch
from worldmodel.heap import keep_freed_memory
print(keep_freed_memory(sys.argv[1] == "keep").reason, file=sys.stderr)
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.empty(16 * 1024 * 1024).fill_(1.0)  # 64 MiB, every page touched
    del tensor
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round()
print(faults_of_one_round())
"""

PAGES_OF_64_MIB = 64 * 1024 * 1024 // 4096


def second_round_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, mode], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def is_glibc() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's")
def test_a_freed_tensor_s_pages_are_reused_instead_of_faulted_in_again() -> None:
    # glibc's defaults unmap a freed 64 MiB block, so writing a new one faults in all of its 16,384 pages again
    assert second_round_faults("default") > PAGES_OF_64_MIB // 2
    # kept: the second tensor takes the first one's pages
    assert second_round_faults("keep") < PAGES_OF_64_MIB // 20


@pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's")
def test_the_decision_names_what_was_done() -> None:
    result = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, "keep"], capture_output=True, text=True,
                            timeout=120)
    assert "heap: freed memory kept in the process (glibc 2." in result.stderr


def test_turned_off_it_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: object) -> None:
        raise AssertionError("the C library was called although the setting is off")

    monkeypatch.setattr(heap.ctypes, "CDLL", no_library)
    assert heap.keep_freed_memory(False) == heap.HeapDecision(False, "heap: glibc's defaults (--no-keep-freed-memory)")


def test_another_c_library_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:  # a C library without glibc's functions
        pass

    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: Musl())
    assert heap.keep_freed_memory() == heap.HeapDecision(False, "heap: not glibc, its allocator left as it is")
