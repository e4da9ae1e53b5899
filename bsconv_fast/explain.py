"""explain(model, x): which backend runs each BSConv layer, and why when it is the reference; which
convolutions are left to PyTorch."""
import copy

import torch
import torch.nn as nn

from bsconv_fast.frozen import Frozen
from bsconv_fast.patching import _fused_class


class Report(list):
    """A list of rows (dicts: module, type, input shape, backend, reason) that prints as a table."""

    def __str__(self):
        header = ("module", "type", "input", "backend", "reason")
        rows = [header] + [tuple(str(r[k]) for k in header) for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)

    def backends(self):
        return {row["module"]: row["backend"] for row in self}


def explain(model, example_input):
    """Run `model(example_input)` once (no grad) and report, for every BSConv layer, the backend
    that runs it: 'cpu-fused (...)', 'gpu-fused', or 'reference' with the reason; two layers that run as
    one call (a ResNet unit, a FusedPair of optimize()) are one row, 'cpu-fused-pair (...)'. Layers that are
    BSConv but not patched are listed as reference with reason 'not patched'. Any other convolution (not
    inside one of those layers) is listed as 'pytorch': no bsconv_fast kernel runs it, so a model made of
    dense k x k convolutions (a plain ResNet) shows where optimize() cannot help.

    It runs on a copy of the model, so training-mode BatchNorm statistics stay untouched. A frozen
    model (bsconv_fast.freeze) is explained by the model it replays."""
    if isinstance(model, Frozen):
        model = model.model
    with torch.inference_mode(False):  # a copy of ordinary tensors, also when called in inference mode
        model = copy.deepcopy(model)
    report = Report()
    handles = []

    def add_row(name, mod, x, backend, reason):
        report.append({"module": name or "(root)", "type": type(mod).__name__, "input": tuple(x.shape),
                       "backend": backend, "reason": reason})

    def record(name):
        def hook(mod, args):
            x = args[0]
            if hasattr(mod, "choice"):
                chosen = mod.choice(x)
                if chosen is None:  # a container whose layers report themselves for this input
                    return
                backend, reason = chosen
            else:
                backend, reason = "reference", "not patched (call bsconv_fast.patch(model))"
            add_row(name, mod, x, backend, reason)
        return hook

    def record_pytorch(name):
        def hook(mod, args):
            add_row(name, mod, args[0], "pytorch", _not_a_bsconv_layer(mod))
        return hook

    reporting = []  # names of the modules that report themselves; convolutions inside them are theirs
    for name, module in model.named_modules():
        if hasattr(module, "choice") or _fused_class(module) is not None:
            handles.append(module.register_forward_pre_hook(record(name)))
            reporting.append(name)
        elif isinstance(module, nn.Conv2d) and not any(_inside(name, owner) for owner in reporting):
            handles.append(module.register_forward_pre_hook(record_pytorch(name)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return report


def _inside(name, owner):
    return owner == "" or name.startswith(owner + ".")


def _not_a_bsconv_layer(conv):
    kh, kw = conv.kernel_size
    kind = "depthwise" if conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1 else (
        "grouped" if conv.groups > 1 else "dense")
    return (f"{kind} {kh}x{kw} conv {conv.in_channels}->{conv.out_channels}, not in a BSConv or fused layer: "
            "runs in PyTorch")
