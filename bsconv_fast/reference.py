"""Ground truth built from standard layers (F.conv2d). Every fused path is tested against these."""
import torch
import torch.nn.functional as F

# Activation codes shared with the C++ schema (csrc/bsconv.cpp) and the Triton kernels.
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "hardswish": 3, "silu": 4}


def activation(t, code):
    """Apply activation `code` (see ACTIVATIONS) out of place."""
    if code == 0:
        return t
    if code == 1:
        return F.relu(t)
    if code == 2:
        return F.relu6(t)
    if code == 3:
        return F.hardswish(t)
    if code == 4:
        return F.silu(t)
    raise ValueError(f"activation code must be one of {sorted(ACTIVATIONS.values())}, got {code}")


def pw_dw(x, pw_weight, dw_weight, mid_bias=None, bias=None, stride=1, padding=0, dilation=1,
          mid_act=0, out_act=0, padding_mode="zeros"):
    """act2(depthwise(act1(conv1x1(x) + mid_bias)) + bias); zero padding applies after act1."""
    t = F.conv2d(x, pw_weight)
    if mid_bias is not None:
        t = t + mid_bias.view(1, -1, 1, 1)
    t = activation(t, mid_act)
    groups = pw_weight.shape[0]
    if padding_mode != "zeros":
        pads = _pair(padding)
        t = F.pad(t, (pads[1], pads[1], pads[0], pads[0]), mode=padding_mode)
        padding = 0
    return activation(F.conv2d(t, dw_weight, bias, stride, padding, dilation, groups), out_act)


def bsconv_u(x, pw_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """BSConv-U: 1x1 pointwise (no bias) then kxk depthwise."""
    return pw_dw(x, pw_weight, dw_weight, None, bias, stride, padding, dilation, padding_mode=padding_mode)


def bsconv_s(x, pw1_weight, pw2_weight, dw_weight, bias=None, stride=1, padding=0, dilation=1,
             padding_mode="zeros"):
    """BSConv-S: 1x1 (Cin->M), 1x1 (M->Cout), then kxk depthwise."""
    return bsconv_u(F.conv2d(x, pw1_weight), pw2_weight, dw_weight, bias, stride, padding, dilation,
                    padding_mode)


def orth_reg_loss(pw1_weight):
    """||W W^T - I||_F of the first 1x1 of BSConv-S, as bsconv.pytorch.BSConvS._reg_loss."""
    w = pw1_weight[:, :, 0, 0]
    wwt = torch.mm(w, w.t())
    eye = torch.eye(wwt.shape[0], device=wwt.device, dtype=wwt.dtype)
    return torch.norm(wwt - eye, p="fro")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
