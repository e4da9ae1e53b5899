// CPU implementations of the small memory-bound ops that optimize() puts around the fused layers:
//   channel_affine   y = x * scale[c] + shift[c], written channels_last (the eval-mode BatchNorm on
//                    a network's input; an NCHW input is transposed in the same pass)
//   max_pool         k x k max pooling (the ResNet stem), NaN-propagating like torch.max_pool2d, on
//                    the fused op's kernel families (pw_dw_cpu.cpp, shared with the pooled stem)
//   global_avg_pool  mean over H x W -> (N, C, 1, 1) (before classifiers, in squeeze-excitation)
// They read and write channels_last, where the innermost loop runs over contiguous channels and
// vectorises. The channels_last affine and the mean loops are compiled for AVX-512, AVX2 and baseline
// x86-64 and the loader picks one (target_clones; BSCONV_FAST_ISA does not apply to them); an NCHW
// input's transpose runs the stems' to_channels_last (pw_dw_cpu.cpp's kernel families).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "pw_dw_cpu.h"

namespace bsconv_fast {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BSCONV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BSCONV_CLONES
#endif

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel chunk: below it one thread does it all

void check_float(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, "bsconv_fast::", op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "bsconv_fast::", op,
              " (CPU): supports float32 and float64, got ", x.scalar_type());
}

bool channels_last(const at::Tensor& x) { return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

// ---------------------------------------------------------------- channel_affine
// Channels-last input: the flat tensor is x * S + T with S, T repeating every C elements. The
// loop runs over blocks of `period` elements (a multiple of C and of 16 floats) so that it
// vectorises for any C, including the 3 channels of an image.
template <typename T>
BSCONV_CLONES void affine_periodic(const T* x, T* y, int64_t n, const T* s, const T* t, int64_t period) {
  for (int64_t i = 0; i < n; i += period) {
    const int64_t m = std::min(period, n - i);
    for (int64_t j = 0; j < m; ++j) y[i + j] = x[i + j] * s[j] + t[j];
  }
}

// NCHW input: channel planes [c][pixels] of pixels [p0, p1) into channels_last rows.
template <typename T>
void affine_transpose(const T* x, T* y, int64_t C, int64_t HW, int64_t p0, int64_t p1, const T* s, const T* t) {
  constexpr int64_t kBlock = 256;  // pixels per block: the output block stays in L1 across channels
  for (int64_t b = p0; b < p1; b += kBlock) {
    to_channels_last(x + b, HW, 1, C, std::min(p1, b + kBlock) - b, s, t, y + b * C);
  }
}

template <typename T>
void channel_affine_impl(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, at::Tensor& y) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* s = scale.data_ptr<T>();
  const T* t = shift.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  if (channels_last(x)) {
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t period = C * (16 / std::gcd<int64_t>(C, 16));
    std::vector<T> S(period), Tv(period);
    for (int64_t j = 0; j < period; ++j) {
      S[j] = s[j % C];
      Tv[j] = t[j % C];
    }
    const T* xp = xc.data_ptr<T>();
    const int64_t total = N * HW * C, blocks = (total + period - 1) / period;
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / period), [&](int64_t b0, int64_t b1) {
      const int64_t i0 = b0 * period, i1 = std::min(total, b1 * period);
      affine_periodic<T>(xp + i0, yp + i0, i1 - i0, S.data(), Tv.data(), period);
    });
    return;
  }
  const at::Tensor xc = x.contiguous();
  const T* xp = xc.data_ptr<T>();
  at::parallel_for(0, N * HW, std::max<int64_t>(1, kGrainElements / C), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1;) {  // q: flat pixel index over N x HW, split at image boundaries
      const int64_t n = q / HW, p0 = q % HW, p1 = std::min(HW, p0 + (q1 - q));
      affine_transpose<T>(xp + n * C * HW, yp + n * HW * C, C, HW, p0, p1, s, t);
      q += p1 - p0;
    }
  });
}

at::Tensor channel_affine_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_float(x, "channel_affine");
  check_channel_operands(x, scale, shift, "channel_affine", "scale and shift");
  auto y = new_output(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsconv_fast_channel_affine", [&] {
    channel_affine_impl<scalar_t>(x, scale.contiguous(), shift.contiguous(), y);
  });
  return y;
}

// ---------------------------------------------------------------- max_pool
// On the kernel families of the fused op (pw_dw_cpu.cpp), which the pooled stem uses too.
at::Tensor max_pool_cpu(const at::Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                        at::IntArrayRef padding) {
  check_float(x_in, "max_pool");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "bsconv_fast::max_pool: kernel, stride and padding need 2 values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(kernel[i] > 0 && stride[i] > 0, "bsconv_fast::max_pool: kernel and stride must be positive, got ",
                kernel, " and ", stride);
    TORCH_CHECK(padding[i] >= 0 && 2 * padding[i] <= kernel[i],
                "bsconv_fast::max_pool: padding must be in [0, kernel / 2], got ", padding, " for kernel ", kernel);
  }
  const int64_t OH = (x_in.size(2) + 2 * padding[0] - kernel[0]) / stride[0] + 1;
  const int64_t OW = (x_in.size(3) + 2 * padding[1] - kernel[1]) / stride[1] + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "bsconv_fast::max_pool: input ", x_in.size(2), "x", x_in.size(3),
              " is too small for kernel ", kernel, " with padding ", padding);
  auto y = new_output({x_in.size(0), x_in.size(1), OH, OW},
                      x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() > 0) {
    const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
    const PoolShape shape{x.size(0), x.size(2), x.size(3), x.size(1), kernel[0], kernel[1], stride[0], stride[1],
                          padding[0], padding[1], OH, OW};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsconv_fast_max_pool",
                               [&] { max_pool(shape, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>()); });
  }
  return channels_last(x_in) ? y : y.contiguous();
}

// ---------------------------------------------------------------- global_avg_pool
template <typename T>
BSCONV_CLONES void channel_sums(const T* x, int64_t pixels, int64_t C, T* acc) {
  for (int64_t c = 0; c < C; ++c) acc[c] = T(0);
  for (int64_t p = 0; p < pixels; ++p) {
    const T* xp = x + p * C;
    for (int64_t c = 0; c < C; ++c) acc[c] += xp[c];
  }
}

at::Tensor global_avg_pool_cpu(const at::Tensor& x_in) {
  check_float(x_in, "global_avg_pool");
  const int64_t N = x_in.size(0), C = x_in.size(1), HW = x_in.size(2) * x_in.size(3);
  TORCH_CHECK(HW > 0, "bsconv_fast::global_avg_pool: x has no pixels (", x_in.sizes(), ")");
  auto y = new_output({N, C, 1, 1}, x_in.options());
  if (y.numel() == 0) return y;
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsconv_fast_global_avg_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainElements / (HW * C)), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        channel_sums<scalar_t>(xp + n * HW * C, HW, C, yp + n * C);
        for (int64_t c = 0; c < C; ++c) yp[n * C + c] /= static_cast<scalar_t>(HW);
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(bsconv_fast, CPU, m) {
  m.impl("channel_affine", &channel_affine_cpu);
  m.impl("max_pool", &max_pool_cpu);
  m.impl("global_avg_pool", &global_avg_pool_cpu);
}

}  // namespace cpu
}  // namespace bsconv_fast
