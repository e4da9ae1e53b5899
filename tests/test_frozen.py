"""bsconv_fast.freeze: recorded op calls replayed instead of the model's Python, under guards."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import bsconv_fast
from helpers import randomize_bn

B = pytest.importorskip("bsconv.pytorch")


class _Counter:
    """Counts the forward calls of one submodule: they happen only when the model itself runs."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


def _model(name="resnet10_bsconvu", classes=7):
    model = B.get_model(name, num_classes=classes).eval()
    randomize_bn(model, 0.2, (0.5, 1.5), 0.3)
    return bsconv_fast.optimize(model, tune_malloc=False)


def _replay(frozen):
    """The one recorded replay of `frozen` (its torch.fx program and C++ Program)."""
    (replay,) = frozen.__dict__["_programs"].values()
    return replay


def _first_fused(model):
    return next(m for m in model.modules() if isinstance(m, bsconv_fast.FusedPwDw))


def test_replay_matches_the_model_bitwise_and_skips_its_python():
    model = _model()
    frozen = bsconv_fast.freeze(model)
    calls = _Counter(_first_fused(model))
    with torch.inference_mode():
        for size in (37, 53):  # two input signatures: a program each
            x = torch.randn(2, 3, size, size + 4)
            want = model(x)
            first = frozen(x)  # records (runs the model)
            n = calls.n
            again = frozen(x)  # replays
            assert calls.n == n, "the replay ran the model's modules"
            assert torch.equal(first, want) and torch.equal(again, want)
    programs = frozen.programs()
    # the bsconv_fast ops through the extension's typed entry points
    assert len(programs) == 2 and all("bsconv_fast__C_pw_dw_packed(" in p for p in programs)


def test_in_place_weight_update_is_seen():
    model = _model()
    frozen = bsconv_fast.freeze(model)
    x = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        before = frozen(x)
        frozen(x)
        assert frozen.programs()[0].startswith("# replayed from C++")  # the version check is the C++ one
        _first_fused(model).pw_weight.mul_(-1.5)  # what load_state_dict's copy_ does to a version counter
        after = frozen(x)
        assert not torch.equal(after, before)
        assert torch.equal(after, model(x))
        assert torch.equal(frozen(x), after)


def test_the_last_programs_own_guards_send_other_calls_to_the_slow_path():
    # forward first offers the inputs to the C++ program that ran last (run_if_expected), which checks
    # the signature and autograd itself: other strides, shapes or a grad input must not run it
    model = _model()
    frozen = bsconv_fast.freeze(model)
    calls = _Counter(_first_fused(model))
    x = torch.randn(1, 3, 39, 43)
    others = (x.contiguous(memory_format=torch.channels_last),  # same shape, other strides
              torch.randn(1, 3, 43, 39))  # the transposed shape
    with torch.no_grad():
        want = model(x)
        frozen(x)
        n = calls.n
        assert torch.equal(frozen(x), want) and calls.n == n
        for other in others:
            expected = model(other)
            assert torch.equal(frozen(other), expected)  # recorded for its own signature
            assert torch.equal(frozen(other), expected)
        assert len(frozen.programs()) == 3
        n = calls.n
        assert torch.equal(frozen(x), want) and calls.n == n  # the first program again, replayed
    y = frozen(x.clone().requires_grad_())  # grad mode on and an input that requires grad: the model
    assert y.requires_grad and calls.n == n + 1


def test_torch_compile_traces_the_model_not_the_replay():
    # under torch.compile neither the last program's fast path nor a replay may run: fullgraph=True
    # fails on the opaque C++ call, and the model's own ops are what the graph must hold
    module = nn.Sequential(B.BSConvU(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()).eval()
    randomize_bn(module, 0.2, (0.5, 1.5), 0.3)
    frozen = bsconv_fast.optimize(module, freeze=True, tune_malloc=False)
    x = torch.randn(1, 8, 9, 11)
    with torch.no_grad():
        want = frozen(x)
        assert torch.equal(frozen(x), want) and frozen.__dict__["_fast"] is not None  # replayed from C++
        assert torch.equal(torch.compile(frozen, fullgraph=True, backend="eager")(x), want)


def test_guards_send_autograd_and_dtype_changes_to_the_model():
    model = _model()
    frozen = bsconv_fast.freeze(model)
    calls = _Counter(_first_fused(model))
    x = torch.randn(1, 3, 33, 33, requires_grad=True)
    y = frozen(x)  # autograd: the model itself, every time
    frozen(x)
    assert calls.n == 2 and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        frozen.double()  # .to()-like conversions drop the programs
        x64 = x.detach().double()
        assert torch.equal(frozen(x64), model(x64)) and frozen(x64).dtype == torch.float64


def test_copies_and_pickles_record_their_own_programs():
    frozen = bsconv_fast.freeze(_model())
    x = torch.randn(1, 3, 35, 35)
    with torch.inference_mode():
        want = frozen(x)
        for other in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
            assert other.programs() == []
            assert torch.equal(other(x), want) and torch.equal(other(x), want)
            assert len(other.programs()) == 1


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x - 1


def test_data_dependent_forward_runs_the_model_and_warns():
    frozen = bsconv_fast.freeze(_DataDependent())
    x = torch.rand(3, 5) + 0.1
    with pytest.warns(UserWarning, match="run the model as it is"):
        assert torch.equal(frozen(x), x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per signature
        assert torch.equal(frozen(-x), -x - 1)  # same signature: the branch is re-evaluated
    assert frozen.programs() == [None]


def test_optimize_freeze_flag_on_an_official_model():
    model = B.get_model("mobilenetv3_small_w1_bsconvs_p1d6", num_classes=9).eval()
    randomize_bn(model, 0.2, (0.5, 1.5), 0.3)
    frozen = bsconv_fast.optimize(model, tune_malloc=False, freeze=True)
    assert isinstance(frozen, bsconv_fast.Frozen)
    x = torch.randn(1, 3, 67, 61)
    with torch.inference_mode():
        first = frozen(x)  # the first call of a fresh model: it packs its weights, which is not recorded
        (program,) = frozen.programs()
        assert "pw_dw_packed(" in program
        assert "bsconv_fast.pack." not in program and "bsconv_fast.pack_pw." not in program
        want = frozen.model(x)
        assert torch.equal(first, want) and torch.equal(frozen(x), want)
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-3, atol=1e-3)
    # explain() reports the replayed model's layers, once each
    assert [(r["module"], r["backend"]) for r in bsconv_fast.explain(frozen, x)] == [
        (r["module"], r["backend"]) for r in bsconv_fast.explain(frozen.model, x)]
    assert len(bsconv_fast.explain(frozen, x)) > 0


def test_typed_entry_points_match_torch_ops():
    """The extension's typed entry points the programs call are the same dispatcher call as torch.ops."""
    from bsconv_fast import _ext, frozen
    ops = torch.ops.bsconv_fast
    x = torch.randn(2, 5, 13, 11).contiguous(memory_format=torch.channels_last)
    x3 = x[:, :3].contiguous(memory_format=torch.channels_last)
    packed = ops.pack(torch.randn(19, 5, 1, 1), torch.randn(19, 1, 3, 3), torch.randn(19), None)
    packed_pw = ops.pack_pw(torch.randn(19, 5, 1, 1), torch.randn(19))
    packed2 = ops.pack(torch.randn(5, 19, 1, 1), torch.randn(5, 1, 3, 3), None, torch.randn(5))
    packed_conv = ops.pack_pw(torch.randn(19, 27, 1, 1), None)
    residual = torch.randn(2, 19, 7, 6).contiguous(memory_format=torch.channels_last)
    packed_dw = ops.pack(torch.eye(5)[:, :, None, None], torch.randn(5, 1, 3, 3), None, torch.randn(5))
    calls = [(ops.pw_dw_packed, (x, packed, 19, [3, 3], [2, 2], [1, 1], [1, 1], 1, 3)),
             (ops.dw_packed, (x, packed_dw, 5, [3, 3], [2, 2], [1, 1], [1, 1], 0, 2)),
             (ops.pw_dw_packed, (x, packed, 19, [3, 3], [2, 2], [1, 1], [1, 1], 1, 3, residual)),
             (ops.pw_dw_pair_packed, (x, packed, 19, [3, 3], [2, 2], [1, 1], [1, 1], 1, 3, packed2, 5, [3, 3], [1, 1],
                                      [1, 1], [1, 1], 0, 1, False)),
             (ops.pw_packed, (x, packed_pw, 19, [2, 2], 2, residual)),
             (ops.conv_packed, (x3, packed_conv, 19, [3, 3], [2, 2], [1, 1], 4)),
             (ops.conv_pool_packed, (x3, packed_conv, 19, [3, 3], [1, 1], [1, 1], 1, [3, 3], [2, 2], [1, 1])),
             (ops.channel_affine, (x, torch.randn(5), torch.randn(5))),
             (ops.max_pool, (x, [3, 2], [2, 2], [1, 0])),
             (ops.global_avg_pool, (x,))]
    aten = torch.ops.aten
    calls = [(op.default, args) for op, args in calls] + [
        (aten.hardsigmoid.default, (x * 4,)), (aten.sigmoid.default, (x,)), (aten.mul.Tensor, (x, x[:, :, :1])),
        (aten.view.default, (x.contiguous(), [2, -1]))]
    direct = frozen._direct_calls()
    assert set(direct) == {op for op, _ in calls}
    with torch.inference_mode():
        for op, args in calls:
            fast = direct[op](*frozen._with_defaults(op, args))
            assert torch.equal(fast, op(*args)), op
    with pytest.raises(TypeError):
        _ext._C.pw_packed(x, packed_pw, 19, [2, 2], 2)  # a missing argument is an error, not garbage


def test_cpp_replay_matches_the_python_replay_bitwise():
    """The C++ Program makes the calls the torch.fx program makes (SE units: aten ops between ours)."""
    model = B.get_model("mobilenetv3_small_w1_bsconvs_p1d6", num_classes=9).eval()
    randomize_bn(model, 0.2, (0.5, 1.5), 0.3)
    frozen = bsconv_fast.optimize(model, tune_malloc=False, freeze=True)
    x = torch.randn(2, 3, 45, 51)
    with torch.inference_mode():
        frozen(x)
        replay = _replay(frozen)
        assert replay.native is not None and len(replay.native) > 20
        assert frozen.programs()[0].startswith(f"# replayed from C++ (bsconv_fast._C.Program, {len(replay.native)} calls)")
        assert "hardsigmoid" in frozen.programs()[0]  # an aten op between the bsconv_fast ones
        want = replay.graph_module(x)
        assert torch.equal(replay.native([x]), want) and torch.equal(frozen(x), want)
        with pytest.raises(RuntimeError, match="expected 1 inputs, got 2"):
            replay.native([x, x])


class _TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, y.relu()


def test_python_replay_where_cpp_cannot_and_it_says_why():
    module = _TwoOutputs().eval()
    frozen = bsconv_fast.freeze(module)
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        frozen(x)
        assert _replay(frozen).native is None
        assert frozen.programs()[0].startswith("# replayed from Python: the forward returns more than one tensor")
        before = frozen(x)
        module.conv.weight.mul_(-2.0)  # the Python replay's version check
        after = frozen(x)
        assert not torch.equal(after[0], before[0]) and torch.equal(after[0], module(x)[0])


def test_cpp_replay_runs_from_threads_at_once():
    """The C++ replay releases the GIL: forwards from several Python threads run side by side and agree."""
    from concurrent.futures import ThreadPoolExecutor
    frozen = bsconv_fast.freeze(_model())
    xs = [torch.randn(1, 3, 29, 31) for _ in range(6)]
    with torch.inference_mode():
        want = [frozen.model(x) for x in xs]
        frozen(xs[0])
        frozen(xs[0])

        def forward(x):
            with torch.inference_mode():
                return frozen(x)

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(forward, xs * 3))
    assert all(torch.equal(g, w) for g, w in zip(got, want * 3))


def test_profile_times_each_call_of_the_cpp_replay():
    frozen = bsconv_fast.freeze(_model())
    x = torch.randn(1, 3, 33, 37)
    steps = frozen.profile(x)
    replay = _replay(frozen)
    assert len(steps) == len(replay.native) and all(t > 0 for _, t in steps)
    names = [name for name, _ in steps]
    assert names.count("bsconv_fast::pw_dw_packed") == sum(p.count("pw_dw_packed(") for p in frozen.programs())
    two = bsconv_fast.freeze(_TwoOutputs().eval())
    with pytest.raises(RuntimeError, match="not replayed from C\\+\\+.*more than one tensor"):
        two.profile(torch.randn(1, 3, 9, 9))


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 3), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y.relu_()  # an in-place op: its result is its input's tensor
        z = self.b(y).mul_(0.5)
        return z + y[:, :4]


def test_cpp_replay_of_in_place_ops():
    module = _InPlace().eval()
    frozen = bsconv_fast.freeze(module)
    x = torch.randn(2, 3, 11, 13)
    with torch.inference_mode():
        frozen(x)
        replay = _replay(frozen)
        assert replay.native is not None
        want = module(x)
        assert torch.equal(replay.native([x]), want) and torch.equal(frozen(x), want)
