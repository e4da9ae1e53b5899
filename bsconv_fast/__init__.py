"""bsconv_fast: fused Blueprint Separable Convolutions (BSConv-U / BSConv-S) for PyTorch.

The pointwise (1x1) and depthwise (kxk) stages run in one pass; the intermediate tensor never
reaches main memory. See README.md for the API and the supported configurations per backend.
"""
from bsconv_fast import _ext, ops  # noqa: F401  (loads the extension, registers fake/autograd)
from bsconv_fast import reference
from bsconv_fast.dispatch import choose
from bsconv_fast.explain import explain
from bsconv_fast.frozen import Frozen, freeze
from bsconv_fast.functional import bsconv_s, bsconv_u, pw_dw
from bsconv_fast.modules import BSConvS, BSConvU
from bsconv_fast.optimize import FusedPwDw, optimize
from bsconv_fast.patching import patch, unpatch
from bsconv_fast.profile import profile
from bsconv_fast.reference import ACTIVATIONS

__version__ = "0.1.0"

__all__ = ["BSConvU", "BSConvS", "bsconv_u", "bsconv_s", "pw_dw", "patch", "unpatch", "optimize", "freeze", "Frozen",
           "FusedPwDw", "explain", "profile", "reference", "choose", "ACTIVATIONS"]
