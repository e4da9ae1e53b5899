"""bsconv_fast.heap.tune_malloc: activations freed by one forward are reused by the next without
page faults (checked in fresh processes: the setting is process-wide and permanent)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Per "forward", three 30 MiB activations alive at once, then all freed (90 MiB back at the top of
# the heap, more than twice glibc's adaptive mmap threshold, so by default it is trimmed and touched
# afresh every time); prints the minor page faults per forward after three warm-up passes.
_SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    import bsconv_fast.heap
    assert bsconv_fast.heap.tune_malloc() and bsconv_fast.heap.malloc_tuned()
def forward():
    alive = [torch.empty(30 << 18).fill_(1.0) for _ in range(3)]
    del alive
for _ in range(3):
    forward()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    forward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


def _faults_per_forward(mode):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


def test_tuned_heap_does_not_page_fault_again():
    default, tuned = _faults_per_forward("default"), _faults_per_forward("tuned")
    assert default > 1000, default  # measured 1,536-7,680 per forward on the project machine

    assert tuned < 50, tuned


def test_optimize_can_leave_the_heap_alone():
    script = ("import torch, bsconv_fast\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1), tune_malloc=False)\n"
              "assert not bsconv_fast.heap.malloc_tuned()\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1))\n"
              "assert bsconv_fast.heap.malloc_tuned()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
