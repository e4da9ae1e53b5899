// torch binding of the CUDA kernel (csrc/cuda/pw_dw_kernel.cu): bsconv_fast::pw_dw_cuda.
// Compiled only in CUDA builds of the extension (setup.py).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pw_dw_kernel.cuh"

namespace bsconv_fast {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "bsconv_fast::pw_dw_cuda: supports float32, float16, bfloat16; got ", x.scalar_type());
  }
}

at::Tensor pw_dw_cuda(const at::Tensor& x, const at::Tensor& pw_weight, const at::Tensor& dw_weight,
                      const c10::optional<at::Tensor>& mid_bias, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t mid_act,
                      int64_t out_act) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "bsconv_fast::pw_dw_cuda: x must be a 4-D CUDA tensor");
  const DType dtype = dtype_of(x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto wpw = pw_weight.reshape({pw_weight.size(0), pw_weight.size(1)}).contiguous();
  const auto wdw = dw_weight.reshape({dw_weight.size(0), -1}).contiguous();
  const auto b1 = mid_bias.has_value() ? mid_bias->contiguous() : at::Tensor();
  const auto b2 = bias.has_value() ? bias->contiguous() : at::Tensor();
  PwDwParams p{};
  p.N = x.size(0);
  p.Cin = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.Cout = wpw.size(0);
  p.KH = dw_weight.size(2);
  p.KW = dw_weight.size(3);
  p.SH = stride[0];
  p.SW = stride[1];
  p.PH = padding[0];
  p.PW = padding[1];
  p.DH = dilation[0];
  p.DW = dilation[1];
  p.OH = (p.H + 2 * p.PH - p.DH * (p.KH - 1) - 1) / p.SH + 1;
  p.OW = (p.W + 2 * p.PW - p.DW * (p.KW - 1) - 1) / p.SW + 1;
  p.mid_act = mid_act;
  p.out_act = out_act;
  auto y = at::empty({p.N, p.Cout, p.OH, p.OW}, x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  p.x = x.data_ptr();
  p.wpw = wpw.data_ptr();
  p.b1 = b1.defined() ? b1.data_ptr() : nullptr;
  p.wdw = wdw.data_ptr();
  p.b2 = b2.defined() ? b2.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.sxn = x.stride(0);
  p.sxc = x.stride(1);
  p.sxh = x.stride(2);
  p.sxw = x.stride(3);
  p.syn = y.stride(0);
  p.syc = y.stride(1);
  p.syh = y.stride(2);
  p.syw = y.stride(3);
  const cudaError_t err = launch_pw_dw(p, dtype, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "bsconv_fast::pw_dw_cuda: launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fast, CUDA, m) { m.impl("pw_dw_cuda", &pw_dw_cuda); }

}  // namespace cuda
}  // namespace bsconv_fast
