"""The fused op called from inside an outer ATen parallel region (a C++ caller splitting a batch over
threads): concurrent calls on different threads, each with its own thread-local ring (and, by
threads_for, no team of its own: ATen would not nest one either), return what a lone call returns.
Driven by a helper compiled at test time, since Python cannot open an ATen parallel region."""
import pytest
import torch

import bsconv_fast  # noqa: F401  (registers the ops)

_HELPER = r"""
#include <ATen/Parallel.h>
#include <torch/extension.h>

// Calls bsconv_fast::pw_dw_packed on each image of x from inside one at::parallel_for over the batch;
// returns the outputs and, per image, whether the call ran inside the region.
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> per_image_in_region(
    const at::Tensor& x, const at::Tensor& packed, int64_t out_channels) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bsconv_fast::pw_dw_packed", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, const c10::optional<at::Tensor>&)>();
  const int64_t n = x.size(0);
  std::vector<at::Tensor> out(n);
  std::vector<int64_t> in_region(n, 0);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      in_region[i] = at::in_parallel_region();
      out[i] = op.call(x.slice(0, i, i + 1), packed, out_channels, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, 2,
                       c10::nullopt);
    }
  });
  return {out, in_region};
}

// The same with bsconv_fast::pw_dw_pair_packed (two fused layers, x as the residual).
std::vector<at::Tensor> pairs_per_image_in_region(const at::Tensor& x, const at::Tensor& packed,
                                                  const at::Tensor& packed2, int64_t mid_channels) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bsconv_fast::pw_dw_pair_packed", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, const at::Tensor&, int64_t,
                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, bool)>();
  const int64_t n = x.size(0);
  std::vector<at::Tensor> out(n);
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      out[i] = op.call(x.slice(0, i, i + 1), packed, mid_channels, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, 1, packed2,
                       x.size(1), {3, 3}, {1, 1}, {1, 1}, {1, 1}, 0, 1, true);
    }
  });
  return out;
}
"""


@pytest.fixture(scope="module")
def helper():
    from torch.utils import cpp_extension
    try:
        return cpp_extension.load_inline("bsconv_fast_nested_helper", cpp_sources=_HELPER,
                                         functions=["per_image_in_region", "pairs_per_image_in_region"],
                                         extra_cflags=["-O1", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler on this machine
        pytest.skip(f"cannot compile the helper: {exc}")


def test_fused_op_inside_an_outer_parallel_region(helper):
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    torch.manual_seed(3)
    x = torch.randn(6, 37, 61, 47).contiguous(memory_format=torch.channels_last)  # 61 rows: bands and rings
    packed = torch.ops.bsconv_fast.pack(torch.randn(45, 37, 1, 1), torch.randn(45, 1, 3, 3), torch.randn(45),
                                        torch.randn(45))
    with torch.inference_mode():
        outs, in_region = helper.per_image_in_region(x, packed, 45)
        alone = torch.ops.bsconv_fast.pw_dw_packed(x, packed, 45, [3, 3], [1, 1], [1, 1], [1, 1], 1, 2)
    assert all(in_region), "the helper's calls did not run inside a parallel region"
    for i, y in enumerate(outs):
        assert torch.equal(y, alone[i:i + 1]), f"image {i}"


def test_pair_op_inside_an_outer_parallel_region(helper):
    """The same for the pair op, whose threads each keep three rings (two layers' and the intermediate's)."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    torch.manual_seed(4)
    x = torch.randn(5, 24, 61, 47).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.bsconv_fast.pack(torch.randn(40, 24, 1, 1), torch.randn(40, 1, 3, 3), None, torch.randn(40))
    packed2 = torch.ops.bsconv_fast.pack(torch.randn(24, 40, 1, 1), torch.randn(24, 1, 3, 3), None, torch.randn(24))
    with torch.inference_mode():
        outs = helper.pairs_per_image_in_region(x, packed, packed2, 40)
        alone = torch.ops.bsconv_fast.pw_dw_pair_packed(x, packed, 40, [3, 3], [1, 1], [1, 1], [1, 1], 1, 1, packed2,
                                                        24, [3, 3], [1, 1], [1, 1], [1, 1], 0, 1, True)
    for i, y in enumerate(outs):
        assert torch.equal(y, alone[i:i + 1]), f"image {i}"
