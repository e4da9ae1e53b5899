import os

# Before bsconv_fast loads: kernels fill their outputs with NaN first, so any element a kernel
# fails to write shows up as NaN in the comparison against the reference.
os.environ.setdefault("BSCONV_FAST_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. It must be set
# before triton.jit decorates them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
