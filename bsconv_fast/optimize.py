"""optimize(model): an inference copy with every pointwise->depthwise pair fused, BatchNorms folded
and activations fused as epilogues.

Patterns rewritten (official bsconv.pytorch model zoo and equivalent own modules):
  * BSConv-U / BSConv-S followed by BN and an activation (ConvBlock(conv=BSConv, bn, act) of the
    ResNets, Sequential(BSConvU, BN, ReLU) of the MobileNetV1-BSConvU transform): the BN after the
    depthwise folds into the depthwise weights and bias, the activation becomes the out epilogue;
    a BN between the stages folds into the pointwise weights plus an intermediate (mid) bias.
  * Inverted-residual blocks (MobileNetV2/V3 LinearBottleneck): 1x1 expand -> BN -> act ->
    depthwise -> BN -> act become one fused op with mid bias and both activations.
  * Remaining ConvBlocks (plain conv -> BN -> act): the BN folds into the conv's bias.
"""
import copy

import torch
import torch.nn as nn

from bsconv_fast import dispatch, functional, reference
from bsconv_fast.modules import BSConvS, BSConvU, PackedInference, bn_uses_batch_stats, fold_bn
from bsconv_fast.patching import patch

_ACT_CODES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
# The official package's own activation modules, matched by name so bsconv stays optional.
_OFFICIAL_ACTS = {"HSwish": "hardswish", "Swish": "silu"}


def activation_code(module):
    """Activation code for `module` (None: identity), or -1 when it cannot be fused."""
    if module is None or isinstance(module, nn.Identity):
        return 0
    name = _ACT_CODES.get(type(module)) or _OFFICIAL_ACTS.get(type(module).__name__)
    return reference.ACTIVATIONS[name] if name else -1


class FusedPwDw(PackedInference, nn.Module):
    """Inference layer act2(dw(act1(pw(x) + mid_bias)) + bias) with folded, frozen weights.

    `prefix` is an optional module run first (BSConv-S's first 1x1, its BN folded in)."""

    def __init__(self, pw_weight, mid_bias, dw_weight, bias, stride, padding, dilation, mid_act, out_act,
                 prefix=None):
        super().__init__()
        self.prefix = prefix
        for name, t in (("pw_weight", pw_weight), ("mid_bias", mid_bias), ("dw_weight", dw_weight), ("bias", bias)):
            self.register_buffer(name, None if t is None else t.detach().clone())
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.mid_act, self.out_act = mid_act, out_act

    @property
    def _acts(self):
        return (self.mid_act, self.out_act)

    def _operands(self):
        return self.pw_weight, self.dw_weight, self.mid_bias, self.bias

    def _source_tensors(self):
        return [t for t in self._operands() if t is not None]

    def _trainable(self):
        return False  # folded buffers; gradients can still flow to the input

    def extra_repr(self):
        acts = {v: k for k, v in reference.ACTIVATIONS.items()}
        return (f"{self.pw_weight.shape[1]}->{self.pw_weight.shape[0]}, kernel={tuple(self.dw_weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"mid_act={acts[self.mid_act]}, out_act={acts[self.out_act]}, mid_bias={self.mid_bias is not None}")

    def _problem(self, x):
        stride, padding, dilation = functional.check_args(x, self.pw_weight, self.dw_weight, self.bias, self.stride,
                                                          self.padding, self.dilation, self.mid_bias)
        return functional.problem_of(x, self.dw_weight, stride, padding, dilation)

    def choice(self, x):
        if self.prefix is not None:
            x = self.prefix(x)
        chosen = dispatch.choose(self._problem(x))
        return chosen.backend.name, chosen.reason

    def forward(self, x):
        if self.prefix is not None:
            x = self.prefix(x)
        plan = self._inference_plan(x)
        if plan is not None:
            return torch.ops.bsconv_fast.pw_dw_packed(x, self._packed_weights(), *plan)
        return functional.pw_dw(x, self.pw_weight, self.dw_weight, self.mid_bias, self.bias, self.stride,
                                self.padding, self.dilation, self.mid_act, self.out_act)


def _bn_ok(bn):
    return bn is None or (isinstance(bn, nn.BatchNorm2d) and not bn_uses_batch_stats(bn))


def fuse_bsconv(block, bn=None, act=None):
    """FusedPwDw for a (patched) BSConv-U/-S module followed by an optional BN and activation."""
    code = activation_code(act)
    inner_bn = block._stage_bn()
    if code < 0 or not _bn_ok(bn) or not _bn_ok(inner_bn) or block.dw.padding_mode != "zeros":
        return None
    weight, mid_bias = block._folded_weights()
    dw_weight, bias = block.dw.weight, block.dw.bias
    if bn is not None:
        dw_weight, bias = fold_bn(dw_weight, bn, bias)
    prefix = None
    if isinstance(block, BSConvS):
        bn1 = getattr(block, "bn1", None)
        if not _bn_ok(bn1):
            return None
        w1, b1 = fold_bn(block.pw1.weight, bn1) if bn1 is not None else (block.pw1.weight, None)
        prefix = nn.Conv2d(w1.shape[1], w1.shape[0], 1, bias=b1 is not None)
        prefix.weight.data.copy_(w1)
        if b1 is not None:
            prefix.bias.data.copy_(b1)
    dw = block.dw
    return FusedPwDw(weight, mid_bias, dw_weight, bias, dw.stride, dw.padding, dw.dilation, 0, code, prefix)


def _is_conv_block(m):
    return type(m).__name__ == "ConvBlock" and hasattr(m, "conv") and hasattr(m, "use_bn")


def _block_parts(block):
    return block.conv, getattr(block, "bn", None) if block.use_bn else None, (
        getattr(block, "activation", None) if block.use_activation else None)


def fuse_inverted_residual(expand, depthwise):
    """FusedPwDw for ConvBlock(1x1 conv, BN, act) -> ConvBlock(depthwise conv, BN, act)."""
    pw, bn1, act1 = _block_parts(expand)
    dw, bn2, act2 = _block_parts(depthwise)
    c1, c2 = activation_code(act1), activation_code(act2)
    if (type(pw) is not nn.Conv2d or pw.kernel_size != (1, 1) or pw.groups != 1 or pw.stride != (1, 1)
            or type(dw) is not nn.Conv2d or not (dw.groups == dw.in_channels == dw.out_channels == pw.out_channels)
            or min(c1, c2) < 0 or not _bn_ok(bn1) or not _bn_ok(bn2) or dw.padding_mode != "zeros"):
        return None
    weight, mid_bias = pw.weight, pw.bias
    if bn1 is not None:
        weight, mid_bias = fold_bn(weight, bn1, mid_bias)
    dw_weight, bias = dw.weight, dw.bias
    if bn2 is not None:
        dw_weight, bias = fold_bn(dw_weight, bn2, bias)
    return FusedPwDw(weight, mid_bias, dw_weight, bias, dw.stride, dw.padding, dw.dilation, c1, c2)


def fold_conv_block(block):
    """conv -> BN -> act with the BN folded into the conv's bias (a plain Conv2d and the act)."""
    conv, bn, act = _block_parts(block)
    if type(conv) is not nn.Conv2d or not _bn_ok(bn) or bn is None:
        return None
    weight, bias = fold_bn(conv.weight, bn, conv.bias)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    folded.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return nn.Sequential(folded, act) if act is not None else folded


def _rewrite(module):
    """Rewrite patterns below `module` in place; returns the number of fused pointwise->depthwise pairs."""
    count = 0
    if type(module).__name__ == "LinearBottleneck" and _is_conv_block(getattr(module, "conv1", None)):
        fused = fuse_inverted_residual(module.conv1, module.conv2)
        if fused is not None:
            module.conv1, module.conv2 = fused, nn.Identity()
            count += 1
    for name, child in list(module._modules.items()):
        new = None
        if _is_conv_block(child) and isinstance(child.conv, (BSConvU, BSConvS)):
            new = fuse_bsconv(*_block_parts(child))
            count += new is not None
        elif isinstance(child, nn.Sequential) and len(child) in (2, 3) and isinstance(child[0], (BSConvU, BSConvS)) \
                and isinstance(child[1], nn.BatchNorm2d) and activation_code(child[2] if len(child) == 3 else None) >= 0:
            new = fuse_bsconv(child[0], child[1], child[2] if len(child) == 3 else None)
            count += new is not None
        elif isinstance(child, (BSConvU, BSConvS)):
            new = fuse_bsconv(child)
            count += new is not None
        elif _is_conv_block(child):
            new = fold_conv_block(child)
        if new is not None:
            module._modules[name] = new
        else:
            count += _rewrite(child)
    return count


def _to_channels_last(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def optimize(model, channels_last=True, verbose=False):
    """Inference copy of `model` (eval mode, no gradients): BSConv layers and inverted-residual blocks
    fused with their BatchNorms and activations, other conv+BN pairs folded, and the input turned
    channels_last on entry. The original model is left untouched."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = patch(model)
    fused = _rewrite(model)
    if isinstance(model, (BSConvU, BSConvS)):
        model = fuse_bsconv(model) or model
        fused += isinstance(model, FusedPwDw)
    if channels_last:
        model.register_forward_pre_hook(_to_channels_last)
    object.__setattr__(model, "bsconv_fast_fused", fused)
    if verbose:
        print(f"bsconv_fast.optimize: {fused} fused pointwise->depthwise layers")
    return model
