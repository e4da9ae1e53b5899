"""Run a process as on a CPU without AVX-512 (``python -m bsconv_fast bench --hide-avx512``).

Issue 3's targets are set for an AVX2 + FMA machine without AVX-512. On a CPU that has AVX-512, every
contender picks its AVX-512 kernels by itself (ONNX Runtime's MLAS, oneDNN under PyTorch eager, ATen,
bsconv_fast), and there is no switch that caps them all: oneDNN and bsconv_fast have environment
variables, MLAS has none. Linux can make the CPUID instruction fault for a thread (ARCH_SET_CPUID,
where the CPU offers "cpuid_fault"); a small library preloaded into the process turns the fault into
the real CPUID result with the AVX-512 feature bits cleared, before any library has looked. Every
library then finds an AVX2 + FMA CPU and runs the kernels it would run on one; the same cores, caches
and clocks, so contenders compare as on such a machine (not a measurement of one: no AVX2-only CPU
has this one's 512-bit data paths, e.g. its load width).

`environment` gives the environment that starts a process so, `relaunch` re-executes the current command
so, and `active` tells whether this process runs so, checked against PyTorch's own CPU detection.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

MARKER = "BSCONV_FAST_HIDE_AVX512"  # set in the relaunched process's environment

# CPUID faulting + a SIGSEGV handler: CPUID traps, the handler runs it with faulting briefly off,
# clears the AVX-512 bits of leaf 7 and steps over the instruction. Any other fault goes to the
# previous handler (re-executed under the previous disposition). Faulting is per thread and inherited
# by threads created later; the constructor runs before any other library's initialisation.
C_SOURCE = r"""
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>
#define ARCH_SET_CPUID 0x1012
static struct sigaction previous;
static void on_segv(int sig, siginfo_t* info, void* uc) {
  greg_t* r = ((ucontext_t*)uc)->uc_mcontext.gregs;
  const uint8_t* ip = (const uint8_t*)r[REG_RIP];
  if (ip[0] != 0x0f || ip[1] != 0xa2) {
    sigaction(SIGSEGV, &previous, NULL);
    return;
  }
  unsigned leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX], a, b, c, d;
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  __cpuid_count(leaf, sub, a, b, c, d);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
  if (leaf == 7 && sub == 0) {
    /* EBX: F, DQ, IFMA, PF, ER, CD, BW, VL; ECX: VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ;
       EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, FP16 */
    b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
    c &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
    d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 23));
  }
  if (leaf == 7 && sub == 1) a &= ~(1u << 5); /* AVX512_BF16 */
  r[REG_RAX] = a;
  r[REG_RBX] = b;
  r[REG_RCX] = c;
  r[REG_RDX] = d;
  r[REG_RIP] += 2;
}
__attribute__((constructor)) static void hide_avx512(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  if (sigaction(SIGSEGV, &sa, &previous) == 0) syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
"""


def unsupported_reason():
    """Why AVX-512 cannot be hidden here, or None."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "needs Linux on x86-64"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "cannot read /proc/cpuinfo"
    if "cpuid_fault" not in flags:
        return "the CPU (or hypervisor) offers no CPUID faulting ('cpuid_fault' in /proc/cpuinfo)"
    if "avx512f" not in flags:
        return "the CPU has no AVX-512 to hide"
    if shutil.which("cc") is None:
        return "no C compiler ('cc') to build the preloaded library"
    return None


def preload_library():
    """Path of the compiled library (built once per source version, in the temp directory)."""
    digest = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"bsconv_fast_hide_avx512_{digest}.so")
    if not os.path.exists(path):
        src = path[:-3] + ".c"
        with open(src, "w") as f:
            f.write(C_SOURCE)
        tmp = f"{path}.{os.getpid()}"
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", tmp, src], check=True)
        os.replace(tmp, path)  # atomic: a concurrent build never exposes a half-written file
    return path


def environment(base):
    """`base` (a mapping of environment variables) plus what starts a process with AVX-512 hidden."""
    reason = unsupported_reason()
    if reason is not None:
        raise SystemExit(f"--hide-avx512: {reason}")
    env = dict(base)
    env["LD_PRELOAD"] = " ".join(p for p in (preload_library(), env.get("LD_PRELOAD")) if p)
    env[MARKER] = "1"
    return env


def relaunch(argv):
    """Replace this process by `argv` with AVX-512 hidden (does not return)."""
    env = environment(os.environ)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)


def active():
    """True when this process was relaunched with AVX-512 hidden and PyTorch's own CPU detection
    found no AVX-512; a relaunch that did not take raises instead of reporting an AVX2 machine."""
    if os.environ.get(MARKER) != "1":
        return False
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        raise RuntimeError(f"AVX-512 was to be hidden, but PyTorch detected {capability}")
    return True
