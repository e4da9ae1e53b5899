"""bsconv_fast.heap.tune_malloc: activations freed by one forward are reused by the next without
page faults (checked in fresh processes: the setting is process-wide and permanent)."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# What glibc does with a 30 MiB activation (prints MiB): mmapped while it is alive, and free bytes
# kept in the heap after it is freed. glibc's defaults mmap it and give it back at once (the next
# forward page-faults it in again); tuned, it comes from the heap and stays there.
_MALLINFO_SCRIPT = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    import bsconv_fast.heap
    assert bsconv_fast.heap.tune_malloc() and bsconv_fast.heap.malloc_tuned()
t = torch.empty(30 << 18).fill_(1.0)
mapped = libc.mallinfo2().hblkhd
del t
print(mapped >> 20, libc.mallinfo2().fordblks >> 20)
"""

# The optimize()d official MobileNetV2 at batch 8 (224x224): minor page faults per forward after
# warm-up, the fewest of four rounds of five (the kernel's own reclaim of idle pages, DAMON on the
# project machine, now and then takes kept heap pages back, which is not what this test is about).
# Measured on the project machine: 3,200-8,000 per forward with glibc's defaults (in most runs;
# its adaptive thresholds sometimes settle after a round), 0 tuned.
_MODEL_SCRIPT = """
import resource, sys, torch
import bsconv.pytorch, bsconv_fast
torch.set_num_threads(1)
model = bsconv_fast.optimize(bsconv.pytorch.get_model("mobilenetv2_w1_bsconvs_p1d6", num_classes=10).eval())
assert bsconv_fast.heap.malloc_tuned()
x = torch.randn(8, 3, 224, 224)
rounds = []
with torch.inference_mode():
    for _ in range(3):
        model(x)
    for _ in range(4):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            model(x)
        rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
print(min(rounds))
"""


def _run(script, *args):
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [float(v) for v in proc.stdout.strip().splitlines()[-1].split()]


@pytest.mark.skipif(tuple(int(v) for v in (platform.libc_ver()[1] or "0.0").split(".")[:2]) < (2, 33),
                    reason="mallinfo2 is glibc 2.33+")
def test_tuned_heap_keeps_freed_activations():
    mapped, kept = _run(_MALLINFO_SCRIPT, "default")
    assert mapped >= 30 and kept < 30, (mapped, kept)  # glibc's defaults: mmapped, given back
    mapped, kept = _run(_MALLINFO_SCRIPT, "tuned")
    assert mapped < 30 and kept >= 30, (mapped, kept)  # tuned: from the heap, kept there


def test_tuned_heap_does_not_page_fault_again():
    pytest.importorskip("bsconv.pytorch")
    (faults,) = _run(_MODEL_SCRIPT)
    assert faults < 50, faults


def test_optimize_can_leave_the_heap_alone():
    script = ("import torch, bsconv_fast\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1), tune_malloc=False)\n"
              "assert not bsconv_fast.heap.malloc_tuned()\n"
              "bsconv_fast.optimize(torch.nn.Conv2d(3, 4, 1))\n"
              "assert bsconv_fast.heap.malloc_tuned()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
