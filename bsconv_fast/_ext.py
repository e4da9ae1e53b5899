"""Loads the compiled extension once and remembers why it failed, for explain() and errors."""
import warnings

import torch  # noqa: F401  (must precede _C: it loads libc10 and libtorch)

_C = None
LOAD_ERROR = None
try:
    from bsconv_fast import _C  # noqa: F401  (registers the bsconv_fast:: ops)
except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "bsconv_fast: the C++ extension could not be loaded, so every layer runs the reference "
        f"implementation (standard PyTorch layers). Rebuild with `pip install --no-build-isolation -e .`. "
        f"Cause: {LOAD_ERROR}",
        RuntimeWarning,
        stacklevel=2,
    )


def available():
    return _C is not None


# Read once: the C++ side fixes its choice at first use, and torch.compile cannot trace a C call.
_CPU_KERNEL_ISA = _C.cpu_kernel_isa() if _C is not None else None


def cpu_kernel_isa():
    """'avx512', 'avx2-fma' or 'scalar' (the float32 CPU kernel family), None without the extension."""
    return _CPU_KERNEL_ISA
