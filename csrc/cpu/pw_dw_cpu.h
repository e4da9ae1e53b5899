#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace bsconv_fast {
namespace cpu {
// The float32 CPU kernel family in use: "avx512", "avx2-fma" or "scalar" (the CPU's best,
// capped by the environment variable BSCONV_FAST_ISA=avx2|scalar).
const char* kernel_isa();
// BSCONV_FAST_POISON=1 (the test suite sets it): kernels fill their outputs with NaN before they
// run, so that an element a kernel forgets to write fails the comparison.
bool poison_outputs();
// A new output tensor, NaN-filled under BSCONV_FAST_POISON=1: every CPU op allocates its output here.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// The pair of per-channel operands (`names`, e.g. "scale and shift") of an op on x: shape (C), x's dtype
// and device, else an error that names them and says what was expected.
void check_channel_operands(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const char* op,
                            const char* names);

// k x k max pooling of a channels_last tensor (N, H, W, C) into (N, OH, OW, C), NaN winning as in
// torch.max_pool2d, padding ignored: bsconv_fast::max_pool and the pooled stem share these kernels.
struct PoolShape {
  int64_t N, H, W, C, KH, KW, sh, sw, ph, pw, OH, OW;
};
void max_pool(const PoolShape& s, const float* x, float* y);
void max_pool(const PoolShape& s, const double* x, double* y);

// W pixels of C planes (plane c at src + c * sC, pixel w at w * sW) made channels_last:
// dst[w * C + c] = src[c * sC + w * sW] (* scale[c] + shift[c] where scale is given). The stems' row
// conversion and bsconv_fast::channel_affine on an NCHW input share these kernels.
void to_channels_last(const float* src, int64_t sC, int64_t sW, int64_t C, int64_t W, const float* scale,
                      const float* shift, float* dst);
void to_channels_last(const double* src, int64_t sC, int64_t sW, int64_t C, int64_t W, const double* scale,
                      const double* shift, double* dst);
}  // namespace cpu
}  // namespace bsconv_fast
