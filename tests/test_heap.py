"""bsconv_fast.heap.tune_malloc: activations freed by one forward are reused by the next without
page faults (checked in fresh processes: the setting is process-wide and permanent)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# A chain of activations of growing then shrinking size, each freed when the next exists, like a
# forward pass; prints the minor page faults per "forward" after three warm-up passes.
_SCRIPT = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    import bsconv_fast.heap
    assert bsconv_fast.heap.tune_malloc() and bsconv_fast.heap.malloc_tuned()
def forward():
    t = torch.ones(1)
    for mb in (1, 2, 4, 8, 16, 24, 12, 6, 3):
        t = torch.empty(mb << 18).fill_(1.0)
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
    # 76 MiB touched per pass: glibc's adaptive thresholds hand much of it back every time
    assert default > 1000, default
    assert tuned < 50, tuned


def test_optimize_can_leave_the_heap_alone():
    script = ("import torch, bsconv_fast\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1), tune_malloc=False)\n"
              "assert not bsconv_fast.heap.malloc_tuned()\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1))\n"
              "assert bsconv_fast.heap.malloc_tuned()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
