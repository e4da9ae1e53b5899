// Schema of the bsconv_fast operators, defined once. Backends register
// implementations per dispatch key: csrc/cpu/pw_dw_cpu.cpp and glue_cpu.cpp (CPU), Python
// (Triton, CUDA key) and the fake/autograd registrations in bsconv_fast/ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/pw_dw_cpu.h"
#include "program.h"

namespace {
using at::IntArrayRef;
using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

// Typed Python entry points of the inference ops: the same unboxed dispatcher call a C++ caller
// makes. From Python, torch.ops converts every argument through the schema (boxing), ~3.5 us of a
// ~5 us call on a small input; bsconv_fast.freeze replays recorded op calls through these.
template <typename Sig>
struct Typed;
template <typename R, typename... A>
struct Typed<R(A...)> {
  static auto bind(const char* name) {
    auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<R(A...)>();
    return [op](A... a) { return op.call(a...); };
  }
};
}  // namespace

// `import bsconv_fast._C` loads this library, which runs the static registrations below.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_kernel_isa", &bsconv_fast::cpu::kernel_isa, "CPU kernel family: 'avx512', 'avx2-fma' or 'scalar'.");
  m.def("pw_dw_packed", Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef,
                                     IntArrayRef, int64_t, int64_t, const OptTensor&)>::bind("bsconv_fast::pw_dw_packed"));
  m.def("dw_packed", Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef,
                                  IntArrayRef, int64_t, int64_t, const OptTensor&)>::bind("bsconv_fast::dw_packed"));
  m.def("pw_dw_pair_packed",
        Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                     int64_t, int64_t, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef,
                     int64_t, int64_t, bool)>::bind("bsconv_fast::pw_dw_pair_packed"));
  m.def("pw_packed", Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, int64_t, const OptTensor&)>::bind(
                         "bsconv_fast::pw_packed"));
  m.def("conv_packed", Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef,
                                    int64_t, const OptTensor&, const OptTensor&, bool)>::bind("bsconv_fast::conv_packed"));
  m.def("conv_pool_packed", Typed<Tensor(const Tensor&, const Tensor&, int64_t, IntArrayRef, IntArrayRef, IntArrayRef,
                                         int64_t, IntArrayRef, IntArrayRef, IntArrayRef, const OptTensor&,
                                         const OptTensor&, bool)>::bind("bsconv_fast::conv_pool_packed"));
  m.def("channel_affine",
        Typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>::bind("bsconv_fast::channel_affine"));
  m.def("max_pool",
        Typed<Tensor(const Tensor&, IntArrayRef, IntArrayRef, IntArrayRef)>::bind("bsconv_fast::max_pool"));
  m.def("global_avg_pool", Typed<Tensor(const Tensor&)>::bind("bsconv_fast::global_avg_pool"));
  bsconv_fast::bind_program(m);
}

TORCH_LIBRARY(bsconv_fast, m) {
  // y = act2(depthwise(act1(conv1x1(x, pw_weight) + mid_bias), dw_weight) + bias)
  // The depthwise zero padding applies to the intermediate after act1(. + mid_bias).
  // Activation codes: 0 identity, 1 relu, 2 relu6, 3 hardswish, 4 silu.
  m.def(
      "pw_dw(Tensor x, Tensor pw_weight, Tensor dw_weight, Tensor? mid_bias, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int mid_act, int out_act) -> Tensor");
  // The hand-written CUDA kernel (csrc/cuda/), same arguments as pw_dw; implemented only in CUDA
  // builds. On CUDA, pw_dw runs the Triton kernel or this one (bsconv_fast/dispatch.py).
  m.def(
      "pw_dw_cuda(Tensor x, Tensor pw_weight, Tensor dw_weight, Tensor? mid_bias, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] dilation, int mid_act, int out_act) -> Tensor");
  // Inference without autograd: weights (and biases) packed once in the backend's layout by
  // `pack`, then reused by `pw_dw_packed` on every call; its optional residual (the output's
  // shape) is added before out_act: y = out_act(depthwise(...) + bias + residual). The CPU layout is documented in
  // csrc/cpu/pw_dw_cpu.cpp.
  m.def("pack(Tensor pw_weight, Tensor dw_weight, Tensor? mid_bias, Tensor? bias) -> Tensor");
  m.def(
      "pw_dw_packed(Tensor x, Tensor packed, int out_channels, int[2] kernel, int[2] stride, "
      "int[2] padding, int[2] dilation, int mid_act, int out_act, Tensor? residual=None) -> Tensor");
  // A depthwise layer alone, on the packing of a layer whose pointwise weights are the identity: the input
  // rows go to the depthwise stage as they are (the pointwise weights and the mid bias are not read),
  // mid_act 0, out_channels = the input's channels. Same arguments as pw_dw_packed.
  m.def(
      "dw_packed(Tensor x, Tensor packed, int out_channels, int[2] kernel, int[2] stride, "
      "int[2] padding, int[2] dilation, int mid_act, int out_act, Tensor? residual=None) -> Tensor");
  // Two such layers in one pass, the second on the first's output (never written to memory); with
  // residual=True x is added before the second's out_act2 (a ResNet unit with an identity shortcut):
  // y = out_act2(layer2(layer1(x)) + x).
  m.def(
      "pw_dw_pair_packed(Tensor x, Tensor packed, int out_channels, int[2] kernel, int[2] stride, "
      "int[2] padding, int[2] dilation, int mid_act, int out_act, Tensor packed2, int out_channels2, "
      "int[2] kernel2, int[2] stride2, int[2] padding2, int[2] dilation2, int mid_act2, int out_act2, "
      "bool residual) -> Tensor");
  // The 1x1 convolutions around fused layers (inference, CPU): y = act(conv1x1(x, weight, stride)
  // + bias + residual), weights packed once by `pack_pw`; residual has the output's shape.
  m.def("pack_pw(Tensor weight, Tensor? bias) -> Tensor");
  m.def("pw_packed(Tensor x, Tensor packed, int out_channels, int[2] stride, int act, Tensor? residual) -> Tensor");
  // A dense k x k convolution on the same kernel (the image stems): y = act(conv(x', weight, stride,
  // padding) + bias), `packed` = pack_pw of the weight permuted to (Cout, KH, KW, Cin), x' = x * in_scale[c]
  // + in_shift[c] when they are given (an input BatchNorm; the zero padding applies to x'), else x. The
  // output is channels_last whatever x's layout (an NCHW x is read as it is, not copied first).
  // winograd=True (float32, a 7x7 kernel with stride 2 and padding 3, Cin <= 4: the ResNet stem): Winograd's
  // F(4x4, 4x4) on the space-to-depth image, `packed` = pack_winograd(weight, bias); float32 error 3-10x the
  // direct summation's, and a NaN or inf input spreads over the 4x4 output tiles that read it.
  m.def("conv_packed(Tensor x, Tensor packed, int out_channels, int[2] kernel, int[2] stride, int[2] padding, "
        "int act, Tensor? in_scale=None, Tensor? in_shift=None, bool winograd=False) -> Tensor");
  m.def("pack_winograd(Tensor weight, Tensor? bias) -> Tensor");
  // The same followed by max pooling (the ResNet stem), in one pass: max_pool2d(conv_packed(...),
  // pool_kernel, pool_stride, pool_padding).
  m.def("conv_pool_packed(Tensor x, Tensor packed, int out_channels, int[2] kernel, int[2] stride, int[2] padding, "
        "int act, int[2] pool_kernel, int[2] pool_stride, int[2] pool_padding, Tensor? in_scale=None, "
        "Tensor? in_shift=None, bool winograd=False) -> Tensor");
  // The memory-bound ops around them (inference, CPU; csrc/cpu/glue_cpu.cpp): y = x * scale[c] +
  // shift[c] written channels_last (an eval BatchNorm on the network input), k x k max pooling, and
  // the mean over H x W as an (N, C, 1, 1) tensor.
  m.def("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("max_pool(Tensor x, int[2] kernel, int[2] stride, int[2] padding) -> Tensor");
  m.def("global_avg_pool(Tensor x) -> Tensor");
}
