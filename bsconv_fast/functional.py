"""Functional, differentiable BSConv entry points: validate, choose a backend, run."""
import torch
import torch.nn.functional as F

from bsconv_fast import dispatch, ops, reference


def _pair(name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _normalize_padding(padding, kernel, dilation, stride):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride=1, as in torch.nn.Conv2d")
        spans = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(s % 2 for s in spans):
            raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} would pad "
                             "asymmetrically; pass explicit padding instead")
        return (spans[0] // 2, spans[1] // 2)
    return _pair("padding", padding)


def _check_tensor(name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {like.dtype}; they must match")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but x is on {like.device}; they must be on one device")


def check_args(x, pw_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1, mid_bias=None):
    """Validate the fused op's arguments; return (stride, padding, dilation) as pairs."""
    _check_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    _check_tensor("pw_weight", pw_weight, x)
    cin = x.shape[1]
    if pw_weight.dim() != 4 or pw_weight.shape[1:] != (cin, 1, 1):
        raise ValueError(f"pw_weight must have shape (Cout, {cin}, 1, 1) to match x with {cin} channels, "
                         f"got {tuple(pw_weight.shape)}")
    cout = pw_weight.shape[0]
    _check_tensor("dw_weight", dw_weight, x)
    if dw_weight.dim() != 4 or dw_weight.shape[:2] != (cout, 1):
        raise ValueError(f"dw_weight must have shape ({cout}, 1, kh, kw) for {cout} channels, "
                         f"got {tuple(dw_weight.shape)}")
    for name, b in (("bias", bias), ("mid_bias", mid_bias)):
        if b is not None:
            _check_tensor(name, b, x)
            if b.shape != (cout,):
                raise ValueError(f"{name} must have shape ({cout},), got {tuple(b.shape)}")
    stride = _pair("stride", stride)
    dilation = _pair("dilation", dilation)
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")
    kernel = tuple(dw_weight.shape[2:])
    padding = _normalize_padding(padding, kernel, dilation, stride)
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    out = ops.pw_dw_out_shape(x, pw_weight, dw_weight, stride, padding, dilation)
    if out[2] <= 0 or out[3] <= 0:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for kernel {kernel} with "
                         f"padding {padding} and dilation {dilation}")
    return stride, padding, dilation


def problem_of(x, dw_weight, stride, padding, dilation, padding_mode="zeros"):
    return dispatch.Problem(x.device.type, x.dtype, tuple(dw_weight.shape[2:]), stride, padding, dilation,
                            padding_mode)


def pw_dw(x, pw_weight, dw_weight, mid_bias=None, bias=None, stride=1, padding=0, dilation=1,
          mid_act=0, out_act=0, padding_mode="zeros"):
    """act2(depthwise(act1(conv1x1(x, pw_weight) + mid_bias), dw_weight) + bias), fused when a backend fits.

    Activation codes are those of bsconv_fast.reference.ACTIVATIONS.
    """
    stride, padding, dilation = check_args(x, pw_weight, dw_weight, bias, stride, padding, dilation, mid_bias)
    choice = dispatch.choose(problem_of(x, dw_weight, stride, padding, dilation, padding_mode))
    if choice.backend.name == "reference":
        dispatch.warn_fallback(choice.reason)
        return reference.pw_dw(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation,
                               mid_act, out_act, padding_mode)
    return ops.pw_dw(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act)


def bsconv_u(x, pw_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """BSConv-U: 1x1 pointwise (Cin->Cout, no bias) then kxk depthwise, in one fused pass.

    Weights in Conv2d shapes: pw_weight (Cout, Cin, 1, 1), dw_weight (Cout, 1, kh, kw).
    """
    return pw_dw(x, pw_weight, dw_weight, None, bias, stride, padding, dilation, padding_mode=padding_mode)


def bsconv_s(x, pw1_weight, pw2_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1,
             padding_mode="zeros"):
    """BSConv-S: 1x1 (Cin->M), then the fused 1x1 (M->Cout) + kxk depthwise.

    The first 1x1 runs as a standard convolution: its output has only M <= Cin channels, while
    the Cout-channel intermediate, the large one, never reaches memory.
    """
    _check_tensor("x", x)
    _check_tensor("pw1_weight", pw1_weight, x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if pw1_weight.dim() != 4 or pw1_weight.shape[1:] != (x.shape[1], 1, 1):
        raise ValueError(f"pw1_weight must have shape (M, {x.shape[1]}, 1, 1) to match x with "
                         f"{x.shape[1]} channels, got {tuple(pw1_weight.shape)}")
    return bsconv_u(F.conv2d(x, pw1_weight), pw2_weight, dw_weight, bias, stride, padding, dilation,
                    padding_mode)
