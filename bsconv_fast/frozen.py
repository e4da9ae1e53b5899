"""bsconv_fast.freeze(model): a model's forward as the op calls it makes, without the Python around them.

An optimize()d model spends 6-9 us of Python per layer on top of its op calls (module calls, the
checks that keep packed weights current, argument lists): measured at 32x32, where the kernels take
little, 195 us of resnet18_bsconvu's forward and 490 us of mobilenetv3_large's. freeze() records the
ops one forward runs (a TorchDispatchMode sees every op call with its tensors) and emits them as a
torch.fx GraphModule: straight-line code calling the ops, the weights it reads as constants, the
bsconv_fast ops through the extension's typed entry points (torch.ops boxes every argument).

A program is recorded per input signature on first use (the model runs twice then: the first call
may do one-time work, such as packing weights, that must not be recorded) and replayed while its
guards hold; otherwise the model runs as it is:
  * the input's shape, dtype, device and strides are those recorded (at most MAX_PROGRAMS signatures);
  * no autograd: grad mode off or an input that does not require grad;
  * not under torch.compile (it traces the model itself);
  * the model's parameters and buffers are unchanged: in-place updates (load_state_dict, optimizer
    steps) bump version counters and drop the programs; .to()/.float()/... on the frozen module drop
    them too. Replacing a tensor attribute inside the model is not seen: call reset() after that.
"""
import operator
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bsconv_fast import _ext

MAX_PROGRAMS = 8


class _Recorder(TorchDispatchMode):
    """Every op call of the forward, in order, with its arguments and result (kept alive, so that tensor
    identities stay unique while the graph is built)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class DataDependent(Exception):
    """The forward turned a tensor into a Python value (.item(), a comparison): its later ops depend
    on data the program would bake in."""


def _direct_calls():
    """Op overloads -> callables making the same dispatcher call without converting each argument
    through the schema (torch.ops' path): the extension's typed entry points for the bsconv_fast ops
    (2.3 vs 4.9 us per call on a small input, measured), torch's own bindings for the aten ops around
    them (the squeeze-excitation gate and scale, the classifier's flatten)."""
    aten = torch.ops.aten
    direct = {aten.hardsigmoid.default: torch._C._nn.hardsigmoid, aten.sigmoid.default: torch.sigmoid,
              aten.mul.Tensor: torch.mul, aten.view.default: torch.Tensor.view}
    if _ext.available():
        names = ("pw_dw_packed", "pw_packed", "conv_packed", "conv_pool_packed", "channel_affine", "max_pool",
                 "global_avg_pool")
        direct.update({getattr(torch.ops.bsconv_fast, n).default: getattr(_ext._C, n) for n in names})
    return direct


def _with_defaults(op, args):
    """`args` with the trailing arguments the caller left to the schema's defaults filled in."""
    return tuple(args) + tuple(a.default_value for a in op._schema.arguments[len(args):])


def _program(calls, inputs, output):
    """GraphModule replaying `calls`: `inputs` become placeholders, tensors no call produced constants."""
    graph, root = fx.Graph(), nn.Module()
    env = {id(t): graph.placeholder(f"x{i}") for i, t in enumerate(inputs)}
    consts = []

    def node_of(value):
        if not isinstance(value, torch.Tensor):
            return value
        node = env.get(id(value))
        if node is None:  # a weight: a plain attribute (instance dict), not a buffer, for a fast lookup
            name = f"c{len(consts)}"
            consts.append(name)
            root.__dict__[name] = value.detach()
            node = env[id(value)] = graph.get_attr(name)
        return node

    direct = _direct_calls()
    for func, args, kwargs, out in calls:
        results = out if isinstance(out, (tuple, list)) else [out]
        if not all(o is None or isinstance(o, torch.Tensor) for o in results):
            raise DataDependent(f"{func} returned a Python value")
        if func in direct and not kwargs:
            func, args = direct[func], _with_defaults(func, args)
        node = graph.call_function(func, *pytree.tree_map(node_of, (args, kwargs)))
        if isinstance(out, torch.Tensor):
            env[id(out)] = node
        else:
            for i, o in enumerate(results):
                if o is not None:
                    env[id(o)] = graph.call_function(operator.getitem, (node, i))
    graph.output(pytree.tree_map(node_of, output))
    return fx.GraphModule(root, graph)


def _state(model):
    """(tensor, version) of every parameter and buffer; inference tensors have no version counter and
    can only change inside inference mode: they are compared by identity alone."""
    tensors = list(model.parameters()) + list(model.buffers())
    return [(t, None if t.is_inference() else t._version) for t in tensors]


class Frozen(nn.Module):
    """`model` run through recorded programs (see the module docstring); `model` itself is kept for
    the cases the guards send back to it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.reset()

    def reset(self):
        """Forget the recorded programs (after changing the model in a way the guards cannot see)."""
        self.__dict__["_programs"] = {}
        self.__dict__["_state"] = []

    def __getstate__(self):  # copies and pickles record their own programs
        state = self.__dict__.copy()
        state["_programs"], state["_state"] = {}, []
        return state

    def _apply(self, fn, *args, **kwargs):
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def _state_unchanged(self):
        return all(v is None or t._version == v for t, v in self.__dict__["_state"])

    def forward(self, *inputs):
        if torch.compiler.is_compiling() or not all(isinstance(t, torch.Tensor) for t in inputs) or (
                torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return self.model(*inputs)
        programs = self.__dict__["_programs"]
        if programs and not self._state_unchanged():
            programs.clear()
        key = tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs)
        program = programs.get(key, False)
        if program:
            return program(*inputs)
        if program is None or len(programs) >= MAX_PROGRAMS:  # None: this signature cannot be frozen
            return self.model(*inputs)
        # The recorded forward must be a steady-state one: a first call may do one-time work (packing
        # weights into their cached layout), which a recording would replay on every call.
        self.model(*inputs)
        recorder = _Recorder()
        with recorder:
            output = self.model(*inputs)
        try:
            programs[key] = _program(recorder.calls, inputs, output).forward
        except DataDependent as e:
            programs[key] = None
            warnings.warn(f"bsconv_fast.freeze: inputs {[tuple(t.shape) for t in inputs]} run the model as it is: {e}")
        self.__dict__["_state"] = _state(self.model)  # after the recording run: it may have packed weights
        return output

    def programs(self):
        """The recorded programs' code, one string per input signature (what a call runs), or None for a
        signature that runs the model (its forward turned tensors into Python values)."""
        return [fn if fn is None else fn.__self__.code for fn in self.__dict__["_programs"].values()]


def freeze(model):
    """`model` (typically bsconv_fast.optimize(model)) run as recorded op calls: same outputs, without
    the per-layer Python. See the module docstring for when it records and when it runs `model`."""
    return Frozen(model)
