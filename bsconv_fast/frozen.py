"""bsconv_fast.freeze(model): a model's forward as the op calls it makes, without the Python around them.

An optimize()d model spends 6-9 us of Python per layer on top of its op calls (module calls, the
checks that keep packed weights current, argument lists): measured at 32x32, where the kernels take
little, 195 us of resnet18_bsconvu's forward and 490 us of mobilenetv3_large's. freeze() records the
ops one forward runs (a TorchDispatchMode sees every op call with its tensors) and emits them as a
torch.fx GraphModule: straight-line code calling the ops, the weights it reads as constants, the
bsconv_fast ops through the extension's typed entry points (torch.ops boxes every argument). Where
the extension is loaded and every call returns one tensor, the same calls run from C++ instead
(bsconv_fast._C.Program: one call from Python for the whole forward, its arguments converted once);
programs() shows the code and says which of the two runs. The C++ program that ran last is offered
each call first and checks the guards below itself.

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
_is_compiling = torch.compiler.is_compiling  # bound once: forward reads it with cold caches


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
        names = ("pw_dw_packed", "dw_packed", "pw_dw_pair_packed", "pw_packed", "conv_packed", "conv_pool_packed",
                 "channel_affine", "max_pool", "global_avg_pool")
        direct.update({getattr(torch.ops.bsconv_fast, n).default: getattr(_ext._C, n) for n in names})
    return direct


def _with_defaults(op, args, kwargs=None):
    """Every argument of the call, in schema order: `args`, then the rest from `kwargs` or the schema's
    defaults."""
    kwargs = kwargs or {}
    return tuple(args) + tuple(kwargs.get(a.name, a.default_value) for a in op._schema.arguments[len(args):])


def _signature(inputs):
    """What a recorded program is keyed and guarded by."""
    return tuple((t.shape, t.dtype, t.device, t.stride()) for t in inputs)


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


def _native_program(calls, inputs, output):
    """bsconv_fast._C.Program making `calls`, or (None, why not). Tensors are held in numbered slots
    (the inputs first, then each call's result), released after their last use."""
    if not _ext.available():
        return None, "the C++ extension is not loaded"
    if not isinstance(output, torch.Tensor):
        return None, "the forward returns more than one tensor"
    slot = {id(t): i for i, t in enumerate(inputs)}  # a tensor's latest slot
    n_slots, steps, last_use = len(inputs), [], {}
    for n, (func, args, kwargs, out) in enumerate(calls):
        if not isinstance(func, torch._ops.OpOverload) or not isinstance(out, torch.Tensor):
            return None, f"{func} does not return one tensor"
        schema = func._schema
        values = list(_with_defaults(func, args, kwargs))
        from_slots = []
        for i, v in enumerate(values):
            if isinstance(v, (list, tuple)) and any(id(t) in slot for t in v if isinstance(t, torch.Tensor)):
                return None, f"{func} takes a list of computed tensors"
            if isinstance(v, torch.Tensor) and id(v) in slot:
                from_slots.append((i, slot[id(v)]))
                last_use[slot[id(v)]] = n
                values[i] = None
        slot[id(out)] = n_slots  # a new slot also for an in-place op's result (its input's object)
        n_slots += 1
        last_use.setdefault(slot[id(out)], n)  # a result nobody reads goes at once
        steps.append([schema.name, schema.overload_name, values, from_slots, slot[id(out)], []])
    if id(output) not in slot or slot[id(output)] < len(inputs):
        return None, "the output is not computed by the recorded calls"
    for s, n in last_use.items():
        if s != slot[id(output)]:
            steps[n][5].append(s)
    return _ext._C.Program(len(inputs), n_slots, [tuple(step) for step in steps], slot[id(output)]), None


def _state(model):
    """Every parameter and buffer of `model`, which the recorded calls' weights were derived from."""
    return list(model.parameters()) + list(model.buffers())


class _Replay:
    """One recorded forward: the torch.fx program and, where the extension takes the calls, the C++
    Program that runs them instead. run(inputs) returns None once a tensor of `watched` has changed
    in place (load_state_dict, an optimizer step): the weights the calls read are stale then.
    Inference tensors have no version counter and can only change inside inference mode: they are
    not watched."""

    def __init__(self, calls, inputs, output, watched):
        self.graph_module = _program(calls, inputs, output)
        try:
            self.native, why = _native_program(calls, inputs, output)
        except (RuntimeError, TypeError, ValueError) as e:  # an argument the schema's types do not take
            self.native, why = None, f"{type(e).__name__}: {e}"
        if self.native is not None:
            self.native.watch(watched)  # checked in C++ on every call: ~0 vs 20 us for 130 tensors in Python
            self.native.expect(list(inputs))  # the signature run_if_expected checks
            self.run = self.native
            self.note = f"# replayed from C++ (bsconv_fast._C.Program, {len(self.native)} calls)"
        else:
            self.versions = [(t, t._version) for t in watched if not t.is_inference()]
            self.run = self._run_python
            self.note = f"# replayed from Python: {why}"

    def _run_python(self, inputs):
        if any(t._version != v for t, v in self.versions):
            return None
        return self.graph_module(*inputs)


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
        self.__dict__["_fast"] = None  # the C++ program that ran last: forward tries it first

    def __getstate__(self):  # copies and pickles record their own programs
        state = self.__dict__.copy()
        state["_programs"] = {}
        state["_fast"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        self.reset()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *inputs):
        # The C++ program that ran last checks the guards below itself (Program.run_if_expected): in
        # Python they run with the caches the previous forward has just evicted.
        fast = self.__dict__["_fast"]
        if fast is not None and not _is_compiling():
            output = fast.run_if_expected(inputs)
            if output is not None:
                return output
        if _is_compiling() or not all(isinstance(t, torch.Tensor) for t in inputs) or (
                torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
            return self.model(*inputs)
        programs = self.__dict__["_programs"]
        key = _signature(inputs)
        program = programs.get(key, False)
        if program:
            output = program.run(inputs)
            if output is not None:
                self.__dict__["_fast"] = program.native
                return output
            programs.clear()  # a weight changed: every program read the old ones
            program = False
        if program is None or len(programs) >= MAX_PROGRAMS:  # None: this signature cannot be frozen
            return self.model(*inputs)
        # The recorded forward must be a steady-state one: a first call may do one-time work (packing
        # weights into their cached layout), which a recording would replay on every call.
        self.model(*inputs)
        recorder = _Recorder()
        with recorder:
            output = self.model(*inputs)
        try:
            # the state after the recording run: that run may have packed weights
            programs[key] = _Replay(recorder.calls, inputs, output, _state(self.model))
            self.__dict__["_fast"] = programs[key].native
        except DataDependent as e:
            programs[key] = None
            warnings.warn(f"bsconv_fast.freeze: inputs {[tuple(t.shape) for t in inputs]} run the model as it is: {e}")
        return output

    def profile(self, *inputs):
        """One replay of the program recorded for `inputs`, each call timed: [(op name, seconds)], in
        order (C++ replays only; a forward first records the program, or re-records a stale one)."""
        with torch.inference_mode():
            self(*inputs)
        key = _signature(inputs)
        replay = self.__dict__["_programs"].get(key)
        if replay is None or replay.native is None:
            raise RuntimeError("bsconv_fast.Frozen.profile: these inputs are not replayed from C++ "
                               f"({'not frozen' if replay is None else replay.note})")
        with torch.inference_mode():
            return replay.native.profile(list(inputs))

    def programs(self):
        """The recorded programs' code, one string per input signature (the calls a replay makes, and
        its first line whether C++ or Python makes them), or None for a signature that runs the model
        (its forward turned tensors into Python values)."""
        return [r if r is None else r.note + "\n" + r.graph_module.code for r in self.__dict__["_programs"].values()]


def freeze(model):
    """`model` (typically bsconv_fast.optimize(model)) run as recorded op calls: same outputs, without
    the per-layer Python. See the module docstring for when it records and when it runs `model`."""
    return Frozen(model)
