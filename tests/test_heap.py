"""worldmodel/heap.py: freed memory kept in the process. Each check runs in a fresh interpreter, since the
setting is the process's and cannot be undone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worldmodel import heap

# Steps of a training loop, in miniature: each allocates tensors of a few sizes, writes them and frees them all. The
# page faults (pages the kernel maps in on first touch) of the last 4 of 16 steps. With the heap kept, the first
# steps grow it (torch asks for 64-byte aligned blocks, which a freed block of the same size cannot serve until it
# has merged with its neighbours); after that a step runs in the pages of the steps before.
STEP_FAULTS = """
import resource, sys, torch
from worldmodel.heap import keep_freed_memory
print(keep_freed_memory(sys.argv[1] == "keep").reason, file=sys.stderr)
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(mib * 2**18).fill_(1.0) for mib in (64, 8, 32, 16, 4, 64)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([faults_of_one_step() for _ in range(16)][-4:]))
"""

PAGES_OF_64_MIB = 64 * 1024 * 1024 // 4096


def late_step_faults(mode: str) -> tuple[int, str]:
    """-> the late steps' page faults, and the decision the child printed."""
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1]), result.stderr


def huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: a fresh 64 MiB block then faults in 2 MiB at a time."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(heap.glibc() is None, reason="the setting is glibc's")
def test_a_freed_tensor_s_pages_are_reused_instead_of_faulted_in_again() -> None:
    # kept: the late steps reuse the pages of the earlier ones, and the decision says so
    faults, decision = late_step_faults("keep")
    assert faults < PAGES_OF_64_MIB // 20
    assert "heap: freed memory kept in the process (glibc 2." in decision
    if not huge_pages_always():
        # glibc's defaults unmap every freed block of 32 MiB or more, so each step faults its 64 MiB blocks in again
        assert late_step_faults("default")[0] > 4 * PAGES_OF_64_MIB


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
