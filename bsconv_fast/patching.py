"""patch / unpatch: swap BSConv layers of a model for the fused modules and back, keeping
the very same child modules (and so the weights, buffers and state_dict keys)."""
from collections import OrderedDict

import torch.nn as nn

from bsconv_fast.modules import BSConvS, BSConvU

try:  # the official package is optional: patching also recognises equivalent own modules
    import bsconv.pytorch as _official
except ImportError:  # pragma: no cover - exercised only without bsconv installed
    _official = None

# Child layouts of BSConv-U / BSConv-S, as in bsconv.pytorch (names and order).
_LAYOUTS = {
    BSConvU: [("pw", "dw"), ("pw", "bn", "dw")],
    BSConvS: [("pw1", "pw2", "dw"), ("pw1", "bn1", "pw2", "bn2", "dw")],
}


def _is_pointwise(m):
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.groups == 1 and m.bias is None
            and m.stride == (1, 1) and m.padding in ((0, 0), "valid") and m.dilation == (1, 1))


def _is_depthwise(m, channels):
    return type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels == channels


def _fused_class(module):
    """BSConvU / BSConvS if `module` is a BSConv layer (official class or same structure), else None."""
    if isinstance(module, (BSConvU, BSConvS)) or not isinstance(module, nn.Sequential):
        return None
    names = tuple(module._modules.keys())
    for cls, layouts in _LAYOUTS.items():
        if names not in layouts:
            continue
        children = module._modules
        pws = [children[n] for n in names if n.startswith("pw")]
        bns = [children[n] for n in names if n.startswith("bn")]
        dw = children["dw"]
        if not all(_is_pointwise(p) for p in pws):
            return None
        if not all(type(b) is nn.BatchNorm2d for b in bns):
            return None
        return cls if _is_depthwise(dw, pws[-1].out_channels) else None
    return None


def _replace(module, convert):
    """Apply `convert` to module and, where it declines (returns None), to its children."""
    new = convert(module)
    if new is not None:
        return new, 1
    count = 0
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new_child, n = _replace(child, convert)
        if new_child is not child:
            module._modules[name] = new_child
        count += n
    return module, count


def _to_fused(module):
    cls = _fused_class(module)
    if cls is None:
        return None
    fused = cls.from_children(OrderedDict(module._modules))
    fused.training = module.training  # not .train(): children keep their own modes
    fused._bsconv_fast_original = type(module)
    return fused


def _to_standard(module):
    if not isinstance(module, (BSConvU, BSConvS)):
        return None
    original = getattr(module, "_bsconv_fast_original", None)
    if original is None:  # built as a bsconv_fast module: go back to the official class if present
        official = getattr(_official, type(module).__name__, None) if _official is not None else None
        original = official or nn.Sequential
    restored = original.__new__(original)
    nn.Sequential.__init__(restored, OrderedDict(module._modules))
    restored.training = module.training
    return restored


def patch(model, verbose=False):
    """Replace, in place, every BSConv-U/-S layer (bsconv.pytorch.BSConvU/BSConvS or an nn.Sequential
    of the same structure) by the fused bsconv_fast module, sharing its weights.

    Returns the model (a new object only when `model` itself is a BSConv layer). The number of
    replaced modules is stored as `model.bsconv_fast_patched` and printed with verbose=True.
    """
    model, count = _replace(model, _to_fused)
    object.__setattr__(model, "bsconv_fast_patched", count)
    if verbose:
        print(f"bsconv_fast.patch: replaced {count} BSConv module{'s' if count != 1 else ''}")
    return model


def unpatch(model):
    """Inverse of patch: fused modules become standard modules again (same child modules)."""
    model, _ = _replace(model, _to_standard)
    return model
