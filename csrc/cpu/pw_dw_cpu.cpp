// CPU implementation of bsconv_fast::pw_dw: fused 1x1 (pointwise) -> kxk depthwise, and of
// bsconv_fast::pw_packed, the plain 1x1 convolution on the same GEMM micro-kernel (see below).
//
// One pass over the input. Each work item owns a slab of output channels and a band of
// output rows of one image. It keeps a ring of pointwise rows (W x channel-slab) in a
// thread-local buffer: when an output row needs input rows that are not in the ring yet,
// they are computed by a register-blocked GEMM (the pointwise stage, with the mid bias
// and activation applied in its epilogue) and consumed by the depthwise stage right
// away, from cache. Rows of the vertical halo stay in the ring and are reused, never
// recomputed; the full intermediate tensor is never allocated.
//
// Work is split over images, then output channels (no redundant work at all) and row bands
// (which recompute at most the (kh-1)*dilation halo rows per band); see run() for the order.
//
// Kernel families share the driver: SIMD for float32 (AVX-512 or AVX2/FMA, compiled with
// target attributes and chosen at run time, see simd_kernels.h) and a portable scalar
// template (float32 without AVX2, and float64 so that gradcheck runs through the fused op).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pw_dw_cpu.h"

namespace bsconv_fast {
namespace cpu {
namespace {

constexpr int64_t kNR = 16;         // output channels per packed weight panel
constexpr int64_t kMinPixels = 96;  // pointwise pixels per GEMM call we aim for
constexpr int kMaxFixedKernel = 5;  // largest kernel with a specialised depthwise path (5x5)
constexpr int kMaxPoolKernel = 16;  // largest max-pooling window height conv_pool_packed takes
constexpr int kStemRun = 21;        // KW * Cin of the 7x7 RGB stem: a GEMM run length compiled in
constexpr int kSmallStemRun = 9;    // KW * Cin of the 3x3 RGB stems: the same
constexpr int64_t kWinogradLanes = 16;  // floats per position of the Winograd stem's Q image (4 * Cin <= 16)
#define BSCONV_WINOGRAD_WEIGHTS
#include "winograd_f4x4_4x4.h"
#undef BSCONV_WINOGRAD_WEIGHTS

enum Act : int64_t { kIdentity = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3, kSilu = 4 };

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline T act_scalar(T v, int64_t act) {
  switch (act) {
    case kRelu: return v < T(0) ? T(0) : v;  // NaN stays NaN, as in torch.relu
    case kRelu6: return std::min(std::max(v, T(0)), T(6));
    case kHardswish: return v * std::min(std::max(v + T(3), T(0)), T(6)) / T(6);
    case kSilu: return v / (T(1) + std::exp(-v));
    default: return v;
  }
}

struct Geometry {
  int64_t N, H, W, Cin, Cout, Cp;
  int64_t KH, KW, sh, sw, ph, pw, dh, dw, OH, OW;
  int64_t mid_act, out_act;
  bool stream_out;  // write the output with non-temporal stores (see make_geometry)
  bool copy_in;     // no pointwise stage: the input rows are the intermediate (bsconv_fast::dw_packed),
                    // read in place (LayerRows::reads_in_place) or copied into the ring
};

template <typename T>
struct Operands {
  const T* x;   // [N, H, W, Cin]
  const T* pw;  // [Cp / kNR, Cin, kNR], zero-padded panels
  const T* b1;  // [Cp]
  const T* dw;  // [KH * KW, Cp]
  const T* b2;  // [Cp]
  T* y;         // [N, OH, OW, Cout]
  const T* res;  // [N, OH, OW, Cout], added before the output activation; nullptr: none
};

// How a GEMM reads one pixel's K = n * len inputs: n runs of len contiguous values, run s starting
// `stride` after run s - 1. One run is a plain row (1x1 convolutions, gathered patches); KH runs of
// KW * Cin values are a k x k convolution's patch read in place from a channels_last image.
struct Runs {
  int64_t n, len, stride;
};

// Which kernel columns of output pixel `ow` land inside the input row.
inline void valid_taps(const Geometry& g, int64_t ow, int64_t* lo, int64_t* hi) {
  const int64_t iw0 = ow * g.sw - g.pw;
  int64_t a = 0, b = g.KW;
  while (a < b && iw0 + a * g.dw < 0) ++a;
  while (b > a && iw0 + (b - 1) * g.dw >= g.W) --b;
  *lo = a;
  *hi = b;
}

// ---------------------------------------------------------------- scalar kernels
template <typename T>
struct ScalarKernels {
  static constexpr bool kWinograd = false;  // the Winograd stem runs on the SIMD kernels only
  static constexpr int64_t kVectorLanes = 1;  // channels one load reads

  // out[p, c - c0] = act1(b1[c] + sum_k x[p, k] * w[c, k]) for npix contiguous pixels.
  static void pw_rows(const Geometry& g, const Operands<T>& o, const T* a, int64_t npix,
                      int64_t c0, int64_t cg, T* out) {
    for (int64_t p = 0; p < npix; ++p) {
      const T* ap = a + p * g.Cin;
      for (int64_t panel = c0 / kNR; panel < (c0 + cg) / kNR; ++panel) {
        T acc[kNR];
        for (int64_t j = 0; j < kNR; ++j) acc[j] = o.b1[panel * kNR + j];
        const T* bp = o.pw + panel * g.Cin * kNR;
        for (int64_t k = 0; k < g.Cin; ++k) {
          const T av = ap[k];
          for (int64_t j = 0; j < kNR; ++j) acc[j] += av * bp[k * kNR + j];
        }
        T* op = out + p * cg + (panel * kNR - c0);
        for (int64_t j = 0; j < kNR; ++j) op[j] = act_scalar(acc[j], g.mid_act);
      }
    }
  }

  // y[p, c] = act(b[c] + sum_k a_p[k] * w[c, k] (+ res[p, c])), channels [c0, c0 + cg) of Cout, with
  // pixel p's inputs a_p at a + p * lda as `runs` says.
  static void pw_out(const T* a, int64_t lda, const Runs runs, int64_t npix, const T* w, const T* bias, int64_t c0,
                     int64_t cg, int64_t Cout, int64_t act, T* y, const T* res) {
    const int64_t K = runs.n * runs.len;
    for (int64_t p = 0; p < npix; ++p) {
      for (int64_t c = c0; c < std::min(c0 + cg, Cout); ++c) {
        const T* wc = w + (c / kNR) * K * kNR + c % kNR;
        T acc = bias[c];
        for (int64_t k = 0; k < K; ++k) acc += a[p * lda + k / runs.len * runs.stride + k % runs.len] * wc[k * kNR];
        if (res != nullptr) acc += res[p * Cout + c];
        y[p * Cout + c] = act_scalar(acc, act);
      }
    }
  }

  // One image row made channels_last: dst[w * C + c] = src[c * sC + w * sW] (* scale[c] + shift[c] where
  // scale is given), w < W.
  static void to_channels_last(const T* src, int64_t sC, int64_t sW, int64_t C, int64_t W, const T* scale,
                               const T* shift, T* dst) {
    for (int64_t c = 0; c < C; ++c) {
      const T* sc = src + c * sC;
      if (scale == nullptr) {
        for (int64_t w = 0; w < W; ++w) dst[w * C + c] = sc[w * sW];
      } else {
        const T a = scale[c], b = shift[c];
        for (int64_t w = 0; w < W; ++w) dst[w * C + c] = sc[w * sW] * a + b;
      }
    }
  }

  // Pooled output row: pixel q is the max of rows[0..nrows) over its window columns, NaN winning.
  static void max_pool_row(const T* const* rows, int64_t nrows, int64_t W, int64_t C, int64_t KW, int64_t sw,
                           int64_t pw, int64_t OW, T* y) {
    for (int64_t q = 0; q < OW; ++q) {
      const int64_t iw0 = q * sw - pw, lo = std::max<int64_t>(0, iw0), hi = std::min(W, iw0 + KW);
      for (int64_t c = 0; c < C; ++c) {
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t i = 0; i < nrows; ++i) {
          for (int64_t iw = lo; iw < hi; ++iw) {
            const T v = rows[i][iw * C + c];
            if (v > m || v != v) m = v;
          }
        }
        y[q * C + c] = m;
      }
    }
  }

  static void dw_row(const Geometry& g, const Operands<T>& o, const T* const* rows, int64_t ld, int64_t n,
                     int64_t oh, int64_t c0, int64_t cg) {
    const int64_t cend = std::min(c0 + cg, g.Cout);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      int64_t kw_lo, kw_hi;
      valid_taps(g, ow, &kw_lo, &kw_hi);
      const int64_t iw0 = ow * g.sw - g.pw;
      T* yp = o.y + ((n * g.OH + oh) * g.OW + ow) * g.Cout;
      for (int64_t c = c0; c < cend; ++c) {
        T acc = o.b2[c];
        for (int64_t kh = 0; kh < g.KH; ++kh) {
          if (rows[kh] == nullptr) continue;
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
            acc += rows[kh][(iw0 + kw * g.dw) * ld + (c - c0)] * o.dw[(kh * g.KW + kw) * g.Cp + c];
          }
        }
        if (o.res != nullptr) acc += o.res[yp - o.y + c];
        yp[c] = act_scalar(acc, g.out_act);
      }
    }
  }
};

// ---------------------------------------------------------------- SIMD kernels
// One kernel source (simd_kernels.h), compiled for AVX2/FMA (8 lanes, 6-pixel x 16-channel tiles:
// 12 of the 16 ymm registers accumulate) and for AVX-512 (16 lanes, 8-pixel x 48-channel tiles: 24
// of the 32 zmm registers accumulate; a layer's last column blocks may be 32 or 16 channels, or in
// the 1x1 op and the stem convolutions one 6-pixel x 64-channel block), picked at run time.
// Both families enable prfchw for the depthwise stage's prefetchw (Kernels::prefetch_out). AMD CPUs have
// it since the K6-2, Intel's CPUID reports it since Broadwell; Haswell, the first AVX2 Intel CPU, is
// known to run the opcode (0F 0D /1) as a NOP (Windows 8.1 x64 requires PrefetchW and runs there), not
// checked on such a machine here.
namespace avx2 {
#define BSCONV_TARGET __attribute__((target("avx2,fma,prfchw")))
using VReg = __m256;
constexpr int64_t kLanes = 8;
constexpr int kMR = 6;
constexpr int kMaxNV = 2;  // 6 x 2 accumulators of 16 ymm registers
BSCONV_TARGET inline VReg vload(const float* p) { return _mm256_loadu_ps(p); }
BSCONV_TARGET inline void vstore(float* p, VReg v) { _mm256_storeu_ps(p, v); }
BSCONV_TARGET inline void vstream(float* p, VReg v) { _mm256_stream_ps(p, v); }
BSCONV_TARGET inline VReg vbcast(const float* p) { return _mm256_broadcast_ss(p); }
BSCONV_TARGET inline VReg vfma(VReg a, VReg b, VReg c) { return _mm256_fmadd_ps(a, b, c); }
BSCONV_TARGET inline VReg vset1(float v) { return _mm256_set1_ps(v); }
BSCONV_TARGET inline VReg vadd(VReg a, VReg b) { return _mm256_add_ps(a, b); }
BSCONV_TARGET inline VReg vmul(VReg a, VReg b) { return _mm256_mul_ps(a, b); }
BSCONV_TARGET inline VReg vdiv(VReg a, VReg b) { return _mm256_div_ps(a, b); }
BSCONV_TARGET inline VReg vmax(VReg a, VReg b) { return _mm256_max_ps(a, b); }
BSCONV_TARGET inline VReg vmin(VReg a, VReg b) { return _mm256_min_ps(a, b); }
BSCONV_TARGET inline VReg vsub(VReg a, VReg b) { return _mm256_sub_ps(a, b); }
BSCONV_TARGET inline VReg vround(VReg v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// p * 2^n for integral n in [-126, 129]: n + 127 placed in the exponent field, in two factors so
// that n = 128 (exp near its overflow bound) is representable
BSCONV_TARGET inline VReg vscale2(VReg p, VReg n) {
  const __m256i half = _mm256_srai_epi32(_mm256_cvtps_epi32(n), 1);
  const __m256i rest = _mm256_sub_epi32(_mm256_cvtps_epi32(n), half);
  const __m256i bias = _mm256_set1_epi32(127);
  const VReg f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const VReg f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}
alignas(32) static const int32_t kFirstLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
BSCONV_TARGET inline __m256i first_lanes(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kFirstLanes + 8 - n));
}
BSCONV_TARGET inline void vstore_first(float* p, VReg v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
// max(m, v), where a NaN v wins (torch.max_pool2d propagates NaN)
BSCONV_TARGET inline VReg vmax_nan(VReg m, VReg v) {
  return _mm256_blendv_ps(m, v, _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
BSCONV_TARGET inline VReg vload_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
// Three planes' 8 pixels interleaved (r0 g0 b0 r1 ...) into dst[0, 24): lane q of output vector j is
// pixel (8j + q) / 3 of plane (8j + q) % 3.
BSCONV_TARGET inline void vinterleave3(VReg r, VReg g, VReg b, float* dst) {
  alignas(32) static const int32_t kPixel[3][8] = {{0, 0, 0, 1, 1, 1, 2, 2}, {2, 3, 3, 3, 4, 4, 4, 5},
                                                   {5, 5, 6, 6, 6, 7, 7, 7}};
  const auto out = [&](int j, auto green, auto blue) BSCONV_TARGET {  // green, blue: the lanes of planes 1 and 2
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPixel[j]));
    VReg v = _mm256_blend_ps(_mm256_permutevar8x32_ps(r, idx), _mm256_permutevar8x32_ps(g, idx), green());
    vstore(dst + 8 * j, _mm256_blend_ps(v, _mm256_permutevar8x32_ps(b, idx), blue()));
  };
  out(0, std::integral_constant<int, 0x92>{}, std::integral_constant<int, 0x24>{});
  out(1, std::integral_constant<int, 0x24>{}, std::integral_constant<int, 0x49>{});
  out(2, std::integral_constant<int, 0x49>{}, std::integral_constant<int, 0x92>{});
}
#include "simd_kernels.h"
#undef BSCONV_TARGET
}  // namespace avx2

namespace avx512 {
#define BSCONV_TARGET __attribute__((target("avx512f,avx2,fma,prfchw")))
using VReg = __m512;
constexpr int64_t kLanes = 16;
constexpr int kMR = 8;  // measured: 8 beats 6, 10 and 12 (12 spills address registers)
// 8 x 3 accumulators of 32 zmm registers: 24 FMAs per 3 weight loads and 8 broadcasts, where 8 x 2
// did 16 per 2 + 8. Measured on an Intel Xeon with two 512-bit FMA ports (A/B in one process, 2
// threads): 1x1 GEMMs with K >= 512 5-7% faster, K = 128-256 1-3%; whole models 1.1-3.6% faster.
constexpr int kMaxNV = 3;
BSCONV_TARGET inline VReg vload(const float* p) { return _mm512_loadu_ps(p); }
BSCONV_TARGET inline void vstore(float* p, VReg v) { _mm512_storeu_ps(p, v); }
BSCONV_TARGET inline void vstream(float* p, VReg v) { _mm512_stream_ps(p, v); }
BSCONV_TARGET inline VReg vbcast(const float* p) { return _mm512_set1_ps(*p); }
BSCONV_TARGET inline VReg vfma(VReg a, VReg b, VReg c) { return _mm512_fmadd_ps(a, b, c); }
BSCONV_TARGET inline VReg vset1(float v) { return _mm512_set1_ps(v); }
BSCONV_TARGET inline VReg vadd(VReg a, VReg b) { return _mm512_add_ps(a, b); }
BSCONV_TARGET inline VReg vmul(VReg a, VReg b) { return _mm512_mul_ps(a, b); }
BSCONV_TARGET inline VReg vdiv(VReg a, VReg b) { return _mm512_div_ps(a, b); }
BSCONV_TARGET inline VReg vmax(VReg a, VReg b) { return _mm512_max_ps(a, b); }
BSCONV_TARGET inline VReg vmin(VReg a, VReg b) { return _mm512_min_ps(a, b); }
BSCONV_TARGET inline VReg vsub(VReg a, VReg b) { return _mm512_sub_ps(a, b); }
BSCONV_TARGET inline VReg vround(VReg v) {
  return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
BSCONV_TARGET inline VReg vscale2(VReg p, VReg n) { return _mm512_scalef_ps(p, n); }
BSCONV_TARGET inline void vstore_first(float* p, VReg v, int64_t n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), v);
}
BSCONV_TARGET inline VReg vload_first(const float* p, int64_t n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1u), p);
}
// Three planes' 16 pixels interleaved (r0 g0 b0 r1 ...) into dst[0, 48): lane q of output vector j is
// pixel (16j + q) / 3 of plane (16j + q) % 3; planes 0 and 1 are picked first, then plane 2 is merged in.
BSCONV_TARGET inline void vinterleave3(VReg r, VReg g, VReg b, float* dst) {
  alignas(64) static const int32_t kRedGreen[3][16] = {{0, 16, 0, 1, 17, 0, 2, 18, 0, 3, 19, 0, 4, 20, 0, 5},
                                                       {21, 0, 6, 22, 0, 7, 23, 0, 8, 24, 0, 9, 25, 0, 10, 26},
                                                       {0, 11, 27, 0, 12, 28, 0, 13, 29, 0, 14, 30, 0, 15, 31, 0}};
  alignas(64) static const int32_t kBlue[3][16] = {{0, 1, 16, 3, 4, 17, 6, 7, 18, 9, 10, 19, 12, 13, 20, 15},
                                                   {0, 21, 2, 3, 22, 5, 6, 23, 8, 9, 24, 11, 12, 25, 14, 15},
                                                   {26, 1, 2, 27, 4, 5, 28, 7, 8, 29, 10, 11, 30, 13, 14, 31}};
  for (int j = 0; j < 3; ++j) {
    const VReg rg = _mm512_permutex2var_ps(r, _mm512_load_si512(kRedGreen[j]), g);
    vstore(dst + 16 * j, _mm512_permutex2var_ps(rg, _mm512_load_si512(kBlue[j]), b));
  }
}
// max(m, v), where a NaN v wins (torch.max_pool2d propagates NaN)
BSCONV_TARGET inline VReg vmax_nan(VReg m, VReg v) {
  return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}
#include "simd_kernels.h"
#undef BSCONV_TARGET
}  // namespace avx512

enum class Isa { kScalar, kAvx2, kAvx512 };

// The widest ISA the CPU has, capped by BSCONV_FAST_ISA=scalar|avx2 (for tests and comparisons).
Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa best = Isa::kScalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
    const char* cap = std::getenv("BSCONV_FAST_ISA");
    if (cap != nullptr && std::string(cap) == "scalar") return Isa::kScalar;
    if (cap != nullptr && std::string(cap) == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

// Calls f(kernels) with the kernel family to run: for float32 the widest SIMD one the CPU has, for
// float64 the scalar one (so that gradcheck runs through the fused op).
template <typename T, typename F>
void with_kernels(F&& f) {
  if constexpr (std::is_same<T, float>::value) {
    switch (cpu_isa()) {
      case Isa::kAvx512: return f(avx512::Kernels{});
      case Isa::kAvx2: return f(avx2::Kernels{});
      default: break;
    }
  }
  f(ScalarKernels<T>{});
}

// ---------------------------------------------------------------- driver
// This thread's scratch buffer (the fused op's ring of pointwise rows, the stem convolution's
// gathered patches), 64-byte aligned: ring rows are whole 16-float channel vectors, and a vector
// load or store that straddles two cache lines costs two (on the 16-byte alignment std::vector
// gives, the depthwise stage ran 1.3-1.5x slower).
template <typename T>
T* thread_scratch(int64_t elems) {
  constexpr int64_t kPad = 64 / sizeof(T);
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < elems + kPad) buffer.resize(elems + kPad);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
}

// Threads for a problem of `macs` multiply-adds: one inside an outer parallel region (no
// oversubscription) and for problems too small to repay waking the thread team (~2.7 us measured
// for a 2-thread OpenMP region, about 300K multiply-adds of work).
int64_t threads_for(int64_t macs) {
  constexpr int64_t kSerialMacs = 300000;
  return (at::in_parallel_region() || macs < kSerialMacs) ? 1 : at::get_num_threads();
}

// Pointwise rows one fused layer keeps in its ring: the kernel's vertical span, plus rows to fill
// ahead so that one GEMM call sees about kMinPixels pixels.
int64_t ring_rows(const Geometry& g) {
  const int64_t span = (g.KH - 1) * g.dh + 1;  // input rows one output row reads
  const int64_t extra = std::max<int64_t>(0, ceil_div(kMinPixels, g.W) - 1);
  return std::max(span, std::min(span + extra, g.H));
}

// Output rows of one fused layer, channels [c0, c0 + cg), made in increasing order (below oh1). The
// pointwise rows live in `ring` (ring_rows(g) x W x cg); rows of the vertical halo stay there and are
// reused, never recomputed. Input rows come from `input(r, count)`: a pointer to `count` consecutive
// input rows from row r as contiguous pixels (count never crosses the end of the ring: a producer that
// keeps its rows in a ring of the same length and slot order, r % ring_rows, can hand them out in place).
template <typename T, typename K>
class LayerRows {
 public:
  LayerRows(const Geometry& g, const Operands<T>& o, int64_t c0, int64_t cg, int64_t oh1, T* ring)
      : g_(g), o_(o), c0_(c0), cg_(cg), ring_rows_(ring_rows(g)), row_elems_(g.W * cg), ring_(ring),
        band_last_(std::min(g.H - 1, (oh1 - 1) * g.sh - g.ph + (g.KH - 1) * g.dh)), rows_(g.KH),
        in_place_(reads_in_place(g)) {}

  // Whether a layer without a pointwise stage (dw_packed) reads its input rows where they are instead
  // of copying them into the ring: where every vector load stays inside its pixel's channels (Cin a
  // multiple of the lanes; otherwise the last load of the last pixel could run past the tensor's end).
  // Measured (the depthwise conv + BN + ReLU alone, inputs rotated through 8 copies, AVX2 kernels on a
  // Zen 4, 1 thread, A/B in one process): 16 channels @112 0.80x the time, 32 @112 0.91x, 32 @112 stride
  // 2 0.75x, 96 @56 stride 2 0.73x, 64 @56 0.88x.
  static bool reads_in_place(const Geometry& g) { return g.copy_in && g.Cin % K::kVectorLanes == 0; }

  // Output row oh, stored by the depthwise stage of `out` (its weights, y and residual) as row oh_out
  // of image n_out of its y.
  template <typename Input>
  void row(int64_t oh, const Operands<T>& out, int64_t n_out, int64_t oh_out, const Input& input) {
    const int64_t ih_first = oh * g_.sh - g_.ph;
    if (in_place_) {
      for (int64_t kh = 0; kh < g_.KH; ++kh) {
        const int64_t ih = ih_first + kh * g_.dh;
        rows_[kh] = (ih >= 0 && ih < g_.H) ? input(ih, 1) + c0_ : nullptr;
      }
      return K::dw_row(g_, out, rows_.data(), g_.Cin, n_out, oh_out, c0_, cg_);
    }
    const int64_t lo = std::max<int64_t>(ih_first, 0);
    const int64_t hi = std::min(ih_first + (g_.KH - 1) * g_.dh, g_.H - 1);
    next_row_ = std::max(next_row_, lo);  // rows above the window are never needed again
    if (hi >= next_row_) {
      // Fill ahead as far as the ring allows without evicting rows of this window.
      const int64_t last = std::min(lo + ring_rows_ - 1, band_last_);
      while (next_row_ <= last) {
        const int64_t slot = next_row_ % ring_rows_;
        const int64_t count = std::min(last - next_row_ + 1, ring_rows_ - slot);
        if (g_.copy_in) {
          copy_rows(input(next_row_, count), count * g_.W, ring_ + slot * row_elems_);
        } else {
          K::pw_rows(g_, o_, input(next_row_, count), count * g_.W, c0_, cg_, ring_ + slot * row_elems_);
        }
        next_row_ += count;
      }
    }
    for (int64_t kh = 0; kh < g_.KH; ++kh) {
      const int64_t ih = ih_first + kh * g_.dh;
      rows_[kh] = (ih >= 0 && ih < g_.H) ? ring_ + (ih % ring_rows_) * row_elems_ : nullptr;
    }
    K::dw_row(g_, out, rows_.data(), cg_, n_out, oh_out, c0_, cg_);
  }

 private:
  // Channels [c0, c0 + cg) of npix input pixels into the ring as they are (zeros past Cin): the depthwise
  // stage's rows of a layer without a pointwise stage.
  void copy_rows(const T* a, int64_t npix, T* out) const {
    const int64_t n = std::min(cg_, g_.Cin - c0_);
    for (int64_t p = 0; p < npix; ++p, a += g_.Cin, out += cg_) {
      std::copy(a + c0_, a + c0_ + n, out);
      std::fill(out + n, out + cg_, T(0));
    }
  }

  const Geometry& g_;
  const Operands<T>& o_;
  const int64_t c0_, cg_, ring_rows_, row_elems_;
  T* const ring_;
  const int64_t band_last_;
  int64_t next_row_ = 0;  // first input row not yet in the ring
  std::vector<const T*> rows_;
  const bool in_place_;
};

// Ring sizes in elements, rounded to whole 64-byte lines so that rings placed one after the other
// in the scratch buffer stay aligned.
int64_t ring_elems(const Geometry& g, int64_t cg) { return ceil_div(ring_rows(g) * g.W * cg, kNR) * kNR; }

// One work item: image n, channels [c0, c0 + cg), output rows [oh0, oh1).
template <typename T, typename K>
void run_item(const Geometry& g, const Operands<T>& o, int64_t n, int64_t c0, int64_t cg,
              int64_t oh0, int64_t oh1) {
  const int64_t ring = LayerRows<T, K>::reads_in_place(g) ? 0 : ring_elems(g, cg);
  LayerRows<T, K> layer(g, o, c0, cg, oh1, thread_scratch<T>(ring));
  const auto image_rows = [&](int64_t r, int64_t) { return o.x + ((n * g.H + r) * g.W) * g.Cin; };
  for (int64_t oh = oh0; oh < oh1; ++oh) layer.row(oh, o, n, oh, image_rows);
}

int64_t layer_macs(const Geometry& g) {
  return (g.copy_in ? 0 : g.N * g.H * g.W * g.Cin * g.Cp) + g.N * g.OH * g.OW * g.Cp * g.KH * g.KW;
}

template <typename T, typename K>
void run(const Geometry& g, const Operands<T>& o) {
  const int64_t panels = g.Cp / kNR;
  const int64_t threads = threads_for(layer_macs(g));
  // Images first, then channel slabs (no redundant work, but every slab streams the whole input),
  // then row bands. An image of many rows goes to bands before slabs: recomputing the few halo rows
  // per band costs less than every thread streaming the full input, half of it written by another
  // core, and the next layer reads rows its own core wrote. Measured in whole models (A/B in one
  // process, 2 threads): for a narrow input (Cin <= 64) at >= 28 rows, MobileNetV2 5-20%, ResNet-18
  // 9-10%, MobileNetV1 3-6% faster (an AMD EPYC). Wider inputs need bands of >= 14 rows (halo
  // rows <= 1/14 of the 1x1 work): on an Intel Xeon (AVX-512, 2 cores), where a line another core
  // wrote costs a cross-core transfer, ResNet-18 3.2% (2.3-5.5%) and cifar MobileNetV1 2.6% faster,
  // MobileNetV1, V2 and V3 unchanged (0.996-1.007); bands of 7 rows (14-row images) lost 1% on
  // MobileNetV1. On the EPYC wide inputs at 28 rows had run slower in bands.
  const int64_t band_rows = g.OH / ceil_div(threads, g.N);
  const bool bands_first = g.OH >= 28 && (g.Cin <= 64 || band_rows >= 14);
  const int64_t want_groups = bands_first ? 1 : std::min(panels, ceil_div(threads, g.N));
  const int64_t panels_per_group = ceil_div(panels, want_groups);
  const int64_t groups = ceil_div(panels, panels_per_group);
  const int64_t bands = std::min(g.OH, ceil_div(threads, g.N * groups));
  const int64_t rows_per_band = ceil_div(g.OH, bands);
  const int64_t items = g.N * groups * bands;
  at::parallel_for(0, items, ceil_div(items, threads), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t band = item % bands;
      const int64_t group = (item / bands) % groups;
      const int64_t n = item / (bands * groups);
      const int64_t c0 = group * panels_per_group * kNR;
      const int64_t cg = std::min(panels_per_group * kNR, g.Cp - c0);
      const int64_t oh0 = band * rows_per_band;
      const int64_t oh1 = std::min(g.OH, oh0 + rows_per_band);
      if (oh0 < oh1) run_item<T, K>(g, o, n, c0, cg, oh0, oh1);
    }
    if (g.stream_out) _mm_sfence();  // order this thread's streaming stores before returning
  });
}

// bsconv_fast::pw_dw_pair_packed: two fused layers in one pass, the second (gb) reading the first's
// (ga) output rows from a small ring as they are made, so the intermediate never leaves the cache,
// and the input as the second's optional residual (ob.res: a ResNet unit). A work item is a band of
// the second layer's output rows of one image with all channels of both layers; each band computes
// the first layer's rows its window needs, the few halo rows at a band edge twice.
template <typename T, typename K>
void run_pair(const Geometry& ga, const Operands<T>& oa, const Geometry& gb, const Operands<T>& ob) {
  const int64_t threads = threads_for(layer_macs(ga) + layer_macs(gb));
  const int64_t bands = std::min(gb.OH, ceil_div(threads, gb.N));
  const int64_t rows_per_band = ceil_div(gb.OH, bands);
  const int64_t items = gb.N * bands;
  // The first layer's output rows live in a ring of the second's ring length and slot order, so a
  // run of rows the second's pointwise stage asks for lies contiguous in it.
  const int64_t mid_rows = ring_rows(gb), mid_row = gb.W * gb.Cin;
  const int64_t ring_a = ring_elems(ga, ga.Cp), mid_elems = ceil_div(mid_rows * mid_row, kNR) * kNR;
  at::parallel_for(0, items, ceil_div(items, threads), [&](int64_t begin, int64_t end) {
    T* const scratch = thread_scratch<T>(ring_a + mid_elems + ring_elems(gb, gb.Cp));
    T* const mid = scratch + ring_a;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, oh0 = item % bands * rows_per_band;
      const int64_t oh1 = std::min(gb.OH, oh0 + rows_per_band);
      if (oh0 >= oh1) continue;
      const int64_t last_mid = std::min(ga.OH - 1, (oh1 - 1) * gb.sh - gb.ph + (gb.KH - 1) * gb.dh);
      LayerRows<T, K> first(ga, oa, 0, ga.Cp, last_mid + 1, scratch);
      LayerRows<T, K> second(gb, ob, 0, gb.Cp, oh1, mid + mid_elems);
      const auto image_rows = [&](int64_t r, int64_t) { return oa.x + ((n * ga.H + r) * ga.W) * ga.Cin; };
      const auto first_rows = [&](int64_t r, int64_t count) {
        for (int64_t i = r; i < r + count; ++i) {
          Operands<T> to = oa;  // the first layer's depthwise stage, stored into the ring's slot of row i
          to.y = mid + (i % mid_rows) * mid_row;
          to.res = nullptr;
          first.row(i, to, 0, 0, image_rows);
        }
        return static_cast<const T*>(mid + (r % mid_rows) * mid_row);
      };
      for (int64_t oh = oh0; oh < oh1; ++oh) second.row(oh, ob, n, oh, first_rows);
    }
    if (gb.stream_out) _mm_sfence();
  });
}

// ---------------------------------------------------------------- pointwise op
// bsconv_fast::pw_packed: y = act(conv1x1(x, w, stride) + b (+ residual)), the 1x1 convolutions
// around the fused layers (inverted-residual projections with their skip connection, ResNet
// shortcut projections, 1x1 heads), on the same GEMM micro-kernel with the residual added in
// the store.
struct PwGeometry {
  int64_t N, H, W, Cin, Cout, Cp, sh, sw, OH, OW, act;
};

template <typename T>
struct PwOperands {
  const T* x;    // [N, H, W, Cin]
  const T* w;    // [Cp / kNR][Cin][kNR]
  const T* b;    // [Cp]
  const T* res;  // [N, OH, OW, Cout] or nullptr
  T* y;          // [N, OH, OW, Cout]
};

constexpr int64_t kPwPixels = 192;  // pixels per GEMM call: their input rows stay in L2 across column blocks
// A 1x1 op on fewer pixels than this is bound by reading its weights, not by its multiply-adds, and
// asks threads_for for threads as if it had this many pixels: the 1-pixel excitation convolutions of
// MobileNetV3's squeeze-excitation units (480 <-> 120 to 960 <-> 240, 0.2-0.9 MB of weights, below 300K
// multiply-adds) streamed their weights on one thread at 8-11 GB/s. Measured (A/B in one process, 2
// threads): those ten calls 24-87 us -> 17-52 us, mobilenetv3_large 0.949x and 0.963x the time; 1
// thread unchanged. (4 pixels, which left the 480-channel units on one thread, ran 1.017x the time of 16.)
constexpr int64_t kWeightBoundPixels = 16;

// Output pixels [p0, p1) (flattened over N, OH, OW), channels [c0, c0 + cg).
template <typename T, typename K>
void pw_range(const PwGeometry& g, const PwOperands<T>& o, int64_t p0, int64_t p1, int64_t c0, int64_t cg) {
  const bool flat = g.sh == 1 && g.sw == 1;  // then output pixel q reads input pixel q
  for (int64_t q = p0; q < p1;) {
    const int64_t n = q / (g.OH * g.OW), oh = q / g.OW % g.OH, ow = q % g.OW;
    const int64_t end = std::min({p1, q + kPwPixels, flat ? p1 : q - ow + g.OW});
    const T* a = o.x + ((n * g.H + oh * g.sh) * g.W + ow * g.sw) * g.Cin;
    K::pw_out(a, g.sw * g.Cin, Runs{1, g.Cin, 0}, end - q, o.w, o.b, c0, cg, g.Cout, g.act, o.y + q * g.Cout,
              o.res == nullptr ? nullptr : o.res + q * g.Cout);
    q = end;
  }
}

template <typename T, typename K>
void run_pw(const PwGeometry& g, const PwOperands<T>& o) {
  const int64_t P = g.N * g.OH * g.OW, panels = g.Cp / kNR;
  const int64_t threads = threads_for(std::max(P, kWeightBoundPixels) * g.Cin * g.Cp);
  // Few pixels (late stages, 1x1 heads): split the channels, so each thread reads only its share
  // of the weights. Otherwise split the pixels: no thread re-reads another's activations.
  const int64_t groups = P < 64 * threads ? std::min(panels, threads) : 1;
  const int64_t panels_per_group = ceil_div(panels, groups);
  const int64_t chunks = groups > 1 ? 1 : std::min(threads, ceil_div(P, 8));
  // Chunk boundaries on whole 8-pixel micro-tiles, as even as that allows: rounding every chunk up
  // to whole tiles gave 104 + 92 pixels at 14x14 (the first thread 6% over the mean); 96 + 100 runs
  // 512->512 @14 2-3% faster (A/B in one process, 2 threads).
  const auto chunk_start = [&](int64_t i) { return i * P / chunks / 8 * 8; };
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c0 = (item / chunks) * panels_per_group * kNR, i = item % chunks;
      const int64_t p0 = chunk_start(i), p1 = i + 1 == chunks ? P : chunk_start(i + 1);
      if (c0 < g.Cp && p0 < p1) {
        pw_range<T, K>(g, o, p0, p1, c0, std::min(panels_per_group * kNR, g.Cp - c0));
      }
    }
  });
}

// ---------------------------------------------------------------- stem convolution
// bsconv_fast::conv_packed: y = act(conv(x, w, stride, padding) + b), a dense k x k convolution with
// few input channels (the image stems: 3 -> 32 3x3, 3 -> 64 7x7) on the same GEMM micro-kernel. A
// pixel's patch is K = KH * KW * Cin values in (kh, kw, ci) order, the order of pack_pw's buffer
// for the weight permuted to (Cout, KH, KW, Cin). Where the whole window lies inside the image the
// GEMM reads the patch in place: KH runs of KW * Cin contiguous values of the channels_last input.
// Border pixels have their patches gathered into the thread's scratch buffer, zeros where the
// window leaves the image (gathering every patch cost ~14% of the 7x7 stem, measured).
struct ConvGeometry {
  int64_t N, H, W, Cin, Cout, Cp, KH, KW, sh, sw, ph, pw, OH, OW, act;
};

// Where a stem convolution reads its input: rows(n, ih) is row ih of image n as W * Cin channels_last
// values, and the rows of one window (rows.need(n, lo, hi) before it is read) lie W * Cin apart.
// A channels_last input is read in place.
template <typename T>
struct InPlaceRows {
  const T* x;
  int64_t H, row;  // rows per image, values per row
  void need(int64_t, int64_t, int64_t) {}
  const T* operator()(int64_t n, int64_t ih) const { return x + (n * H + ih) * row; }
};

// Any other input (the network's image as it comes, NCHW), optionally through an affine first (x * scale[c]
// + shift[c]: the models' input BatchNorm folded into the stem; the zero padding applies after it): each
// thread makes the rows its windows need channels_last in a buffer of `cap` rows as the windows move
// down, so that the input is read once and no transposed copy goes to memory. Measured (frozen models,
// 2 threads, per-op times of a replay): ResNet-18's channel_affine + pooled stem 1575 -> 1543 us and
// 1541 -> 1474 us in two runs, MobileNetV1's affine + stem 310 -> 245 us; whole models (A/B in one
// process) 0.968-1.000x the time, MobileNetV1/V2/V3 0.977-0.993x. Prefetching the next windows' input
// rows into L2 gained nothing (0.996x; MobileNetV1 1.033x).
template <typename T>
struct InputView {
  const T* x;
  int64_t sN, sC, sH, sW;  // x's strides
  const T* scale;          // nullptr: no affine
  const T* shift;
};

template <typename T, typename K>
class ConvertedRows {
 public:
  ConvertedRows(const InputView<T>& in, int64_t W, int64_t C, T* buf, int64_t cap)
      : in_(in), W_(W), C_(C), row_(W * C), cap_(cap), buf_(buf) {}

  // Rows [lo, hi) of image n in the buffer (hi - lo <= cap; windows only move down an image).
  void need(int64_t n, int64_t lo, int64_t hi) {
    if (n != n_ || lo < first_ || lo > end_) n_ = n, first_ = end_ = lo;
    if (hi - first_ > cap_) {  // slide: the rows kept move to the top
      std::copy(buf_ + (lo - first_) * row_, buf_ + (end_ - first_) * row_, buf_);
      first_ = lo;
    }
    for (; end_ < hi; ++end_) convert(end_, buf_ + (end_ - first_) * row_);
  }
  const T* operator()(int64_t, int64_t ih) const { return buf_ + (ih - first_) * row_; }

 private:
  void convert(int64_t ih, T* dst) const {
    K::to_channels_last(in_.x + n_ * in_.sN + ih * in_.sH, in_.sC, in_.sW, C_, W_, in_.scale, in_.shift, dst);
  }

  const InputView<T> in_;
  const int64_t W_, C_, row_, cap_;
  T* const buf_;
  int64_t n_ = -1, first_ = 0, end_ = 0;  // rows [first_, end_) of image n_ are in buf_
};

// A stem's input: read in place (channels_last, no affine) or through ConvertedRows.
template <typename T>
struct StemInput {
  InputView<T> view;
  bool in_place;
};

// ConvertedRows' buffer in rows: the window and 8 strides of rows ahead, so that it slides (copying
// the rows kept) once per 8 output rows.
int64_t window_rows(const ConvGeometry& g) { return g.KH + 8 * g.sh; }

// That buffer per thread, in values (none where the input is read in place).
int64_t window_elems(const ConvGeometry& g, bool in_place) {
  return in_place ? 0 : ceil_div(window_rows(g) * g.W * g.Cin, kNR) * kNR;
}

// Calls f(rows) with this thread's reader of the input; `buf`: window_elems(g, in.in_place) values.
template <typename T, typename K, typename F>
void with_rows(const ConvGeometry& g, const StemInput<T>& in, T* buf, F&& f) {
  if (in.in_place) {
    InPlaceRows<T> rows{in.view.x, g.H, g.W * g.Cin};
    f(rows);
  } else {
    ConvertedRows<T, K> rows(in.view, g.W, g.Cin, buf, window_rows(g));
    f(rows);
  }
}

// Patches of output pixels [ow0, ow1) of row oh of image n, one after the other in `cols`: per kernel
// row, the part inside the image is one contiguous copy, the columns outside it zeros.
template <typename T, typename Rows>
void gather_patches(const ConvGeometry& g, const Rows& rows, int64_t n, int64_t oh, int64_t ow0, int64_t ow1, T* cols) {
  const int64_t span = g.KW * g.Cin;  // one kernel row of a patch: contiguous in channels_last
  for (int64_t ow = ow0; ow < ow1; ++ow) {
    const int64_t iw0 = ow * g.sw - g.pw;
    const int64_t kw_lo = std::min(g.KW, std::max<int64_t>(0, -iw0));  // first kernel column inside the image
    const int64_t kw_hi = std::max(kw_lo, std::min(g.KW, g.W - iw0));  // one past the last
    T* dst = cols + (ow - ow0) * g.KH * span;
    for (int64_t kh = 0; kh < g.KH; ++kh, dst += span) {
      const int64_t ih = oh * g.sh - g.ph + kh;
      if (ih < 0 || ih >= g.H) {
        std::fill(dst, dst + span, T(0));
        continue;
      }
      std::fill(dst, dst + kw_lo * g.Cin, T(0));
      if (kw_hi > kw_lo) {
        const T* src = rows(n, ih) + (iw0 + kw_lo) * g.Cin;
        std::copy(src, src + (kw_hi - kw_lo) * g.Cin, dst + kw_lo * g.Cin);
      }
      std::fill(dst + kw_hi * g.Cin, dst + span, T(0));
    }
  }
}

// Output pixels [ow0, ow1) of row oh of image n from gathered patches, into out (pixel stride Cout).
template <typename T, typename K, typename Rows>
void conv_gathered(const ConvGeometry& g, const Rows& rows, const T* w, const T* b, int64_t n, int64_t oh, int64_t ow0,
                   int64_t ow1, T* out, T* cols) {
  if (ow0 >= ow1) return;
  const int64_t Kd = g.KH * g.KW * g.Cin;
  gather_patches(g, rows, n, oh, ow0, ow1, cols);
  // described as KH runs of KW * Cin, as the in-place patches are, so both take the same micro-kernel
  K::pw_out(cols, Kd, Runs{g.KH, g.KW * g.Cin, g.KW * g.Cin}, ow1 - ow0, w, b, 0, g.Cp, g.Cout, g.act,
            out + ow0 * g.Cout, nullptr);
}

// Output row oh of image n into out (OW pixels x Cout channels); cols: OW * KH * KW * Cin values.
template <typename T, typename K, typename Rows>
void conv_row(const ConvGeometry& g, Rows& rows, const T* w, const T* b, int64_t n, int64_t oh, T* out, T* cols) {
  // Columns whose window lies inside the image: iw0 >= 0 and iw0 + KW <= W.
  const int64_t lo = std::min(g.OW, ceil_div(g.pw, g.sw));
  const int64_t hi = g.W + g.pw < g.KW ? lo : std::max(lo, std::min(g.OW, (g.W + g.pw - g.KW) / g.sw + 1));
  const int64_t ih0 = oh * g.sh - g.ph;
  rows.need(n, std::max<int64_t>(ih0, 0), std::min(ih0 + g.KH, g.H));
  if (ih0 < 0 || ih0 + g.KH > g.H || lo >= hi) {  // the window leaves the image at the top or bottom
    conv_gathered<T, K>(g, rows, w, b, n, oh, 0, g.OW, out, cols);
    return;
  }
  conv_gathered<T, K>(g, rows, w, b, n, oh, 0, lo, out, cols);
  conv_gathered<T, K>(g, rows, w, b, n, oh, hi, g.OW, out, cols);
  const T* a = rows(n, ih0) + (lo * g.sw - g.pw) * g.Cin;
  K::pw_out(a, g.sw * g.Cin, Runs{g.KH, g.KW * g.Cin, g.W * g.Cin}, hi - lo, w, b, 0, g.Cp, g.Cout, g.act,
            out + lo * g.Cout, nullptr);
}

// A stem convolution's multiply-adds (what threads_for weighs).
int64_t stem_macs(const ConvGeometry& g) { return g.N * g.OH * g.OW * g.KH * g.KW * g.Cin * g.Cp; }

// Output rows split over threads in contiguous runs.
template <typename T, typename K>
void run_conv(const ConvGeometry& g, const StemInput<T>& in, const T* w, const T* b, T* y) {
  const int64_t Kd = g.KH * g.KW * g.Cin, rows = g.N * g.OH, cols_elems = ceil_div(g.OW * Kd, kNR) * kNR;
  const int64_t threads = threads_for(stem_macs(g));
  at::parallel_for(0, rows, ceil_div(rows, threads), [&](int64_t r0, int64_t r1) {
    T* const cols = thread_scratch<T>(cols_elems + window_elems(g, in.in_place));
    with_rows<T, K>(g, in, cols + cols_elems, [&](auto& src) {
      for (int64_t r = r0; r < r1; ++r) conv_row<T, K>(g, src, w, b, r / g.OH, r % g.OH, y + r * g.OW * g.Cout, cols);
    });
  });
}

// The pooling windows of image rows: pooled row r reads input rows [lo, last] (clamped to the image's OH rows).
struct PoolRows {
  const PoolShape& p;
  int64_t OH;  // rows of the pooled image (the convolution's output for a pooled stem)
  int64_t lo(int64_t r) const { return std::max<int64_t>(0, r * p.sh - p.ph); }
  int64_t last(int64_t r) const { return std::min(OH, r * p.sh - p.ph + p.KH) - 1; }
};

// bsconv_fast::conv_pool_packed: the stem convolution followed by k x k max pooling (the ResNet stem),
// in one pass: each thread keeps the last KH convolution rows of the pool in a ring and pools them as
// soon as a pooled row's window is complete, so the convolution's output (3.2 MB for ResNet-18)
// never leaves the cache. Padding is ignored by the max, as in torch.max_pool2d. `p` describes the
// pooling of the convolution's output (its H, W, C are OH, OW, Cout).
template <typename T, typename K>
void run_conv_pool(const ConvGeometry& g, const PoolShape& p, const StemInput<T>& in, const T* w, const T* b, T* y) {
  const int64_t Kd = g.KH * g.KW * g.Cin, rows = g.N * p.OH, row_elems = g.OW * g.Cout;
  const int64_t cols_elems = ceil_div(g.OW * Kd, kNR) * kNR, ring_elems = ceil_div(p.KH * row_elems, kNR) * kNR;
  const int64_t threads = threads_for(stem_macs(g));
  const PoolRows pool{p, g.OH};
  at::parallel_for(0, rows, ceil_div(rows, threads), [&](int64_t r0, int64_t r1) {
    T* const cols = thread_scratch<T>(cols_elems + ring_elems + window_elems(g, in.in_place));
    T* const ring = cols + cols_elems;  // 64-byte aligned rows when Cout % 16 == 0
    with_rows<T, K>(g, in, ring + ring_elems, [&](auto& src) {
      const T* window[kMaxPoolKernel];
      int64_t image = -1, next_row = 0;  // first convolution row of `image` not yet in the ring
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / p.OH, lo = pool.lo(r % p.OH), hi = pool.last(r % p.OH) + 1;
        if (n != image) image = n, next_row = lo;
        for (next_row = std::max(next_row, lo); next_row < hi; ++next_row) {
          conv_row<T, K>(g, src, w, b, n, next_row, ring + next_row % p.KH * row_elems, cols);
        }
        for (int64_t ih = lo; ih < hi; ++ih) window[ih - lo] = ring + ih % p.KH * row_elems;
        K::max_pool_row(window, hi - lo, g.OW, g.Cout, p.KW, p.sw, p.pw, p.OW, y + r * p.OW * g.Cout);
      }
    });
  });
}

// ---------------------------------------------------------------- Winograd stem
// conv_packed / conv_pool_packed with winograd=True: the ResNet stem (7x7, stride 2, padding 3, few input
// channels) by Winograd's F(4x4, 4x4) (Lavin & Gray 2016). The stride-2 7x7 convolution of Cin channels is
// a stride-1 4x4 convolution of the 4 * Cin channels of the space-to-depth image
// Q[y][x][(pr, pc, c)] = x[2y + pr - 3][2x + pc - 3][c] (zero-padded) with the kernel taps
// w[co][c][2a + pr][2b + pc] (zero where 2a + pr or 2b + pc is 7): 192 taps for 147. F(4x4, 4x4) turns a
// 4 x 4 tile of its outputs into 49 multiply-adds per channel pair where the direct convolution takes 16 x 147:
// per output pixel of a 3 -> 64 stem 2352 multiply-adds instead of 9408, plus the transforms of the 7 x 7
// input tiles (B^T d B, on 16-lane Q positions) and of the 49-point results (A^T M A). The 49 GEMMs (tiles x
// 4 * Cin times 4 * Cin x Cout, one per point) run on the 1x1 op's micro-kernel. Measured (ResNet-18's stem with
// its input BatchNorm, ReLU and pooling, 224 x 224, A/B in one process against the direct kernel, which runs at
// ~93% of the FMA peak): 0.53x the time on 1 thread, 0.57x on 2 (AVX-512), 0.67x (AVX2); whole ResNet-18
// 0.89-0.92x. Float32 error against float64, relative: 6-10e-7 at 224 x 224 (direct summation ~1e-7); a NaN or
// inf input spreads over the tiles that read it.
struct WinogradShape {
  int64_t TH, TW, QW, KQ;  // tile rows and columns, Q positions per row, Q channels the GEMMs read (4 * Cin)
};

WinogradShape winograd_shape(const ConvGeometry& g) {
  const int64_t TW = ceil_div(g.OW, 4);
  return {ceil_div(g.OH, 4), TW, 4 * TW + 3, 4 * g.Cin};
}

// pack_winograd's buffer: U[49 points][Cp / kNR][4 * Cin][kNR] (each point's weights in the 1x1 op's panel
// layout), then Cp zeros (the GEMMs' bias) and the bias [Cp].
int64_t winograd_packed_numel(int64_t Cin, int64_t Cp) { return 49 * 4 * Cin * Cp + 2 * Cp; }

// Floats of one thread's work on a tile row: Q (7 rows), V (49 points x TW tiles x 16 lanes), M (49 x TW x
// Cp), the transforms' scratch; each a multiple of 16 floats, so each stays 64-byte aligned.
int64_t winograd_scratch(const WinogradShape& s, int64_t Cp) {
  return 7 * s.QW * kWinogradLanes + 49 * s.TW * (kWinogradLanes + Cp) + 49 * kWinogradLanes;
}

// Q rows 4J .. 4J + 6 of image n into q (7 x QW positions of kWinogradLanes floats).
template <typename K, typename Rows>
void winograd_q(const ConvGeometry& g, const WinogradShape& s, Rows& rows, int64_t n, int64_t J, float* q) {
  const int64_t qrow = s.QW * kWinogradLanes, ih0 = 8 * J - g.ph;  // ih0: the input row of Q row 4J, phase 0
  std::fill(q, q + 7 * qrow, 0.f);
  rows.need(n, std::clamp<int64_t>(ih0, 0, g.H), std::clamp<int64_t>(ih0 + 14, 0, g.H));
  for (int64_t y = 0; y < 7; ++y) {
    for (int64_t pr = 0; pr < 2; ++pr) {
      const int64_t ih = ih0 + 2 * y + pr;
      if (ih >= 0 && ih < g.H) K::winograd_q_row(rows(n, ih), g.W, g.Cin, g.pw, s.QW, q + y * qrow + pr * 2 * g.Cin);
    }
    if (ih0 + 2 * y < g.H && ih0 + 2 * y + 1 >= g.H && ih0 + 2 * y >= 0) {  // phase 1 below the image: its lanes
      for (int64_t x = 0; x < s.QW; ++x) {                                      // hold phase 0's 8-wide copies
        std::fill(q + y * qrow + x * kWinogradLanes + 2 * g.Cin, q + y * qrow + x * kWinogradLanes + 8, 0.f);
      }
    }
  }
}

// Convolution rows 4J .. 4J + 3 of image n (those above OH): row oh goes to out_row(oh) (OW x Cout).
template <typename K, typename Rows, typename OutRow>
void winograd_tile_row(const ConvGeometry& g, const WinogradShape& s, const float* packed, Rows& rows, int64_t n,
                       int64_t J, const OutRow& out_row, float* scratch) {
  float* const q = scratch;
  float* const v = q + 7 * s.QW * kWinogradLanes;
  float* const m = v + 49 * s.TW * kWinogradLanes;
  float* const tmp = m + 49 * s.TW * g.Cp;
  winograd_q<K>(g, s, rows, n, J, q);
  for (int64_t t = 0; t < s.TW; ++t) {
    K::winograd_input(q + 4 * t * kWinogradLanes, s.QW * kWinogradLanes, v + t * kWinogradLanes,
                      s.TW * kWinogradLanes, tmp);
  }
  const float* const zeros = packed + 49 * s.KQ * g.Cp;
  for (int64_t p = 0; p < 49; ++p) {
    K::pw_out(v + p * s.TW * kWinogradLanes, kWinogradLanes, Runs{1, s.KQ, 0}, s.TW, packed + p * s.KQ * g.Cp, zeros,
              0, g.Cp, g.Cp, kIdentity, m + p * s.TW * g.Cp, nullptr);
  }
  const int64_t nrows = std::min<int64_t>(4, g.OH - 4 * J);
  float* rows_out[4];
  for (int64_t a = 0; a < nrows; ++a) rows_out[a] = out_row(4 * J + a);
  for (int64_t t = 0; t < s.TW; ++t) {
    float* out[4] = {};
    for (int64_t a = 0; a < nrows; ++a) out[a] = rows_out[a] + 4 * t * g.Cout;
    K::winograd_output(m + t * g.Cp, s.TW * g.Cp, zeros + g.Cp, g.act, g.Cout, out, nrows,
                       std::min<int64_t>(4, g.OW - 4 * t), tmp);
  }
}

// Tile rows split over threads in contiguous runs.
template <typename K>
void run_conv_winograd(const ConvGeometry& g, const StemInput<float>& in, const float* packed, float* y) {
  const WinogradShape s = winograd_shape(g);
  const int64_t items = g.N * s.TH, threads = threads_for(stem_macs(g)), work = winograd_scratch(s, g.Cp);
  at::parallel_for(0, items, ceil_div(items, threads), [&](int64_t i0, int64_t i1) {
    float* const scratch = thread_scratch<float>(work + window_elems(g, in.in_place));
    with_rows<float, K>(g, in, scratch + work, [&](auto& src) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / s.TH;
        const auto out_row = [&](int64_t oh) { return y + (n * g.OH + oh) * g.OW * g.Cout; };
        winograd_tile_row<K>(g, s, packed, src, n, i % s.TH, out_row, scratch);
      }
    });
  });
}

// Tile rows split over threads in chunks, each keeping its convolution rows in a ring of pool-window + 3
// rows (a tile row makes 4 at once; a window's rows and the tile row just made always fit) and pooling
// every row whose window ends in the tile row just made. A window that starts in the previous chunk (the
// first pooled row after a chunk boundary inside an image) is pooled after the threads are done, from
// the rows either side of the boundary that the two chunks saved. Deriving each chunk's first rows from
// the previous tile row instead (pooled rows split over threads) made the second thread compute 15 tile
// rows of ResNet-18's 28 where the first computed 14: measured 1.046x the time (2 threads, median of 10
// process pairs alternating the two builds).
template <typename K>
void run_conv_pool_winograd(const ConvGeometry& g, const PoolShape& p, const StemInput<float>& in,
                            const float* packed, float* y) {
  const WinogradShape s = winograd_shape(g);
  const PoolRows pool{p, g.OH};
  const int64_t items = g.N * s.TH, row_elems = g.OW * g.Cout, slots = p.KH + 3, halo = p.KH - 1;
  const int64_t work = winograd_scratch(s, g.Cp), ring_elems = ceil_div(slots * row_elems, kNR) * kNR;
  // chunks of at least `halo` rows, so that a window straddles two chunks at most
  const int64_t min_tiles = std::max<int64_t>(1, ceil_div(halo, 4));
  const int64_t chunks = std::max<int64_t>(1, std::min(threads_for(stem_macs(g)), items / min_tiles));
  const auto first_tile = [&](int64_t c) { return c * items / chunks; };
  // Per chunk c, the convolution rows [S - halo, S + halo) around its first row S = 4 * J of its first image:
  // the first half saved by chunk c - 1, the second by c (where the chunk starts inside an image).
  // The calling thread's buffer, kept between calls (no allocation or zero-filling per call).
  thread_local std::vector<float> edge_buffer;
  const int64_t edge_elems = chunks * 2 * halo * row_elems;
  if (static_cast<int64_t>(edge_buffer.size()) < edge_elems) edge_buffer.resize(edge_elems);
  float* const edges = edge_buffer.data();
  const auto edge = [&](int64_t c, int64_t ih) {
    return edges + (c * 2 * halo + ih - (first_tile(c) % s.TH * 4 - halo)) * row_elems;
  };
  // pooled row r of image n from its window's convolution rows, row ih at row(ih)
  const auto pool_row = [&](int64_t n, int64_t r, const auto& row) {
    const float* window[kMaxPoolKernel];
    for (int64_t ih = pool.lo(r); ih <= pool.last(r); ++ih) window[ih - pool.lo(r)] = row(ih);
    K::max_pool_row(window, pool.last(r) - pool.lo(r) + 1, g.OW, g.Cout, p.KW, p.sw, p.pw, p.OW,
                    y + (n * p.OH + r) * p.OW * g.Cout);
  };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    float* const scratch = thread_scratch<float>(work + ring_elems + window_elems(g, in.in_place));
    float* const ring = scratch + work;
    const auto slot = [&](int64_t oh) { return ring + oh % slots * row_elems; };
    with_rows<float, K>(g, in, ring + ring_elems, [&](auto& src) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = first_tile(c), i1 = first_tile(c + 1);
        int64_t r = 0, start = 0;  // next pooled row of image n, the first convolution row this chunk makes of it
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / s.TH, J = i % s.TH, end = std::min(g.OH, 4 * J + 4);
          if (i == i0 || J == 0) {
            start = 4 * J;
            for (r = 0; r < p.OH && pool.last(r) < start; ++r) {
            }
          }
          winograd_tile_row<K>(g, s, packed, src, n, J, slot, scratch);
          for (int64_t oh = 4 * J; start > 0 && oh < std::min(end, start + halo); ++oh) {  // after a boundary
            std::copy(slot(oh), slot(oh) + row_elems, edge(c, oh));
          }
          for (; r < p.OH && pool.last(r) < end; ++r) {
            if (pool.lo(r) >= start) pool_row(n, r, slot);  // else it straddles the chunk boundary: pooled below
          }
        }
        if (c + 1 < chunks && first_tile(c + 1) % s.TH != 0) {  // the next chunk starts inside this image
          const int64_t next = first_tile(c + 1) % s.TH * 4;
          for (int64_t oh = std::max<int64_t>(0, next - halo); oh < next; ++oh) {
            std::copy(slot(oh), slot(oh) + row_elems, edge(c + 1, oh));
          }
        }
      }
    });
  });
  for (int64_t c = 1; c < chunks; ++c) {
    if (first_tile(c) % s.TH == 0) continue;
    const int64_t n = first_tile(c) / s.TH, start = first_tile(c) % s.TH * 4;
    const auto edge_row = [&](int64_t ih) { return edge(c, ih); };
    for (int64_t r = 0; r < p.OH && pool.lo(r) < start; ++r) {
      if (pool.last(r) >= start) pool_row(n, r, edge_row);
    }
  }
}

// bsconv_fast::max_pool: pooled rows split over threads; each reads its window's input rows in place.
template <typename T, typename K>
void run_max_pool(const PoolShape& s, const T* x, T* y) {
  const int64_t rows = s.N * s.OH, threads = threads_for(rows * s.OW * s.C * s.KH * s.KW);
  const PoolRows pool{s, s.H};
  at::parallel_for(0, rows, ceil_div(rows, threads), [&](int64_t r0, int64_t r1) {
    std::vector<const T*> window(s.KH);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.OH, lo = pool.lo(r % s.OH), hi = pool.last(r % s.OH) + 1;
      for (int64_t ih = lo; ih < hi; ++ih) window[ih - lo] = x + (n * s.H + ih) * s.W * s.C;
      K::max_pool_row(window.data(), hi - lo, s.W, s.C, s.KW, s.sw, s.pw, s.OW, y + r * s.OW * s.C);
    }
  });
}

// ---------------------------------------------------------------- packing
// All weights of one layer in one buffer, in the order the kernels read them:
//   pw [Cp / kNR][Cin][kNR]  (16-channel panels, zero-padded to Cp channels)
//   dw [KH * KW][Cp]         (channel-contiguous per tap)
//   b1 [Cp], b2 [Cp]         (mid bias, output bias; zeros when absent)
// The pointwise op's buffer (pack_pw) is the same with no depthwise taps: pw, then its bias as b1.
int64_t packed_numel(int64_t Cin, int64_t Cp, int64_t taps) { return Cp * Cin + taps * Cp + 2 * Cp; }

template <typename T>
void pack_into(T* dst, const T* pw, const T* dw, const T* b1, const T* b2, int64_t Cout, int64_t Cin,
               int64_t Cp, int64_t taps) {
  for (int64_t panel = 0; panel < Cp / kNR; ++panel) {  // sequential writes, 16 read streams
    for (int64_t k = 0; k < Cin; ++k) {
      for (int64_t j = 0; j < kNR; ++j) {
        const int64_t co = panel * kNR + j;
        *dst++ = co < Cout ? pw[co * Cin + k] : T(0);
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t c = 0; c < Cp; ++c) *dst++ = c < Cout ? dw[c * taps + t] : T(0);
  }
  for (const T* b : {b1, b2}) {
    for (int64_t c = 0; c < Cp; ++c) *dst++ = (b != nullptr && c < Cout) ? b[c] : T(0);
  }
}

template <typename T>
const T* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

at::Tensor pack_checked(const at::Tensor& pw_weight, const at::Tensor& dw_weight,
                        const c10::optional<at::Tensor>& mid_bias, const c10::optional<at::Tensor>& bias) {
  const int64_t Cout = pw_weight.size(0), Cin = pw_weight.size(1);
  const int64_t Cp = ceil_div(Cout, kNR) * kNR, taps = dw_weight.size(2) * dw_weight.size(3);
  auto packed = at::empty({packed_numel(Cin, Cp, taps)}, pw_weight.options());
  const auto pw = pw_weight.contiguous(), dw = dw_weight.contiguous();
  const auto b1 = mid_bias.has_value() ? c10::optional<at::Tensor>(mid_bias->contiguous()) : c10::nullopt;
  const auto b2 = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES(pw.scalar_type(), "bsconv_fast_pack", [&] {
    pack_into<scalar_t>(packed.data_ptr<scalar_t>(), pw.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                        data_or_null<scalar_t>(b1), data_or_null<scalar_t>(b2), Cout, Cin, Cp, taps);
  });
  return packed;
}

void check_inputs(const at::Tensor& x, const at::Tensor& pw_weight, const at::Tensor& dw_weight,
                  const c10::optional<at::Tensor>& mid_bias, const c10::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                  int64_t mid_act, int64_t out_act) {
  TORCH_CHECK(x.dim() == 4, "bsconv_fast::pw_dw: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bsconv_fast::pw_dw (CPU): supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(pw_weight.dim() == 4 && pw_weight.size(2) == 1 && pw_weight.size(3) == 1,
              "bsconv_fast::pw_dw: pw_weight must have shape (Cout, Cin, 1, 1), got ", pw_weight.sizes());
  TORCH_CHECK(pw_weight.size(1) == x.size(1), "bsconv_fast::pw_dw: pw_weight expects ",
              pw_weight.size(1), " input channels but x has ", x.size(1));
  const int64_t Cout = pw_weight.size(0);
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == Cout && dw_weight.size(1) == 1,
              "bsconv_fast::pw_dw: dw_weight must have shape (", Cout, ", 1, kh, kw), got ",
              dw_weight.sizes());
  for (const auto& b : {mid_bias, bias}) {
    if (b.has_value()) {
      TORCH_CHECK(b->dim() == 1 && b->size(0) == Cout, "bsconv_fast::pw_dw: biases must have shape (",
                  Cout, "), got ", b->sizes());
      TORCH_CHECK(b->scalar_type() == x.scalar_type(), "bsconv_fast::pw_dw: bias dtype ",
                  b->scalar_type(), " does not match x dtype ", x.scalar_type());
    }
  }
  TORCH_CHECK(pw_weight.scalar_type() == x.scalar_type() && dw_weight.scalar_type() == x.scalar_type(),
              "bsconv_fast::pw_dw: weights must have the dtype of x (", x.scalar_type(), ")");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "bsconv_fast::pw_dw: stride, padding and dilation need 2 values each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "bsconv_fast::pw_dw: stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "bsconv_fast::pw_dw: dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "bsconv_fast::pw_dw: padding must be >= 0, got ", padding);
  TORCH_CHECK(mid_act >= 0 && mid_act <= 4 && out_act >= 0 && out_act <= 4,
              "bsconv_fast::pw_dw: activation codes must be in [0, 4]");
}

}  // namespace

void max_pool(const PoolShape& s, const float* x, float* y) {
  with_kernels<float>([&](auto k) { run_max_pool<float, decltype(k)>(s, x, y); });
}

void max_pool(const PoolShape& s, const double* x, double* y) {
  with_kernels<double>([&](auto k) { run_max_pool<double, decltype(k)>(s, x, y); });
}

void to_channels_last(const float* src, int64_t sC, int64_t sW, int64_t C, int64_t W, const float* scale,
                      const float* shift, float* dst) {
  with_kernels<float>([&](auto k) { decltype(k)::to_channels_last(src, sC, sW, C, W, scale, shift, dst); });
}

void to_channels_last(const double* src, int64_t sC, int64_t sW, int64_t C, int64_t W, const double* scale,
                      const double* shift, double* dst) {
  with_kernels<double>([&](auto k) { decltype(k)::to_channels_last(src, sC, sW, C, W, scale, shift, dst); });
}

bool poison_outputs() {
  static const bool poison = [] {
    const char* v = std::getenv("BSCONV_FAST_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return poison;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto y = at::empty(sizes, options);
  if (poison_outputs()) y.fill_(std::numeric_limits<double>::quiet_NaN());
  return y;
}

void check_channel_operands(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, const char* op,
                            const char* names) {
  for (const auto* v : {&a, &b}) {
    TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1) && v->scalar_type() == x.scalar_type() &&
                    v->device() == x.device(),
                "bsconv_fast::", op, ": ", names, " must have shape (", x.size(1), "), dtype ", x.scalar_type(),
                ", got ", v->sizes(), " ", v->scalar_type(), " (and x's device ", x.device(), ", got ", v->device(),
                ")");
  }
}

const char* kernel_isa() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2-fma";
    default: return "scalar";
  }
}

namespace {

// The layer's geometry for an input of sizes `in` (N, C, H, W) and dtype `dtype`.
Geometry make_geometry(at::IntArrayRef in, at::ScalarType dtype, int64_t Cout, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t mid_act,
                       int64_t out_act) {
  Geometry g{};
  g.N = in[0];
  g.Cin = in[1];
  g.H = in[2];
  g.W = in[3];
  g.Cout = Cout;
  g.Cp = ceil_div(Cout, kNR) * kNR;
  g.KH = kernel[0];
  g.KW = kernel[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  g.mid_act = mid_act;
  g.out_act = out_act;
  // An output larger than the last-level cache would be evicted before the next layer reads it:
  // non-temporal stores skip the read-for-ownership of every line. They need whole, aligned
  // vectors per pixel (Cout a multiple of 16 floats; at::empty aligns the base to 64 bytes).
  constexpr int64_t kStreamBytes = 24 << 20;
  g.stream_out = Cout % 16 == 0 && g.N * Cout * g.OH * g.OW * c10::elementSize(dtype) > kStreamBytes &&
                 dtype == at::kFloat;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "bsconv_fast::pw_dw: input ", g.H, "x", g.W, " is too small for kernel ",
              g.KH, "x", g.KW, " with this padding and dilation");
  return g;
}

// The residual as the kernels read it (channels_last, the output's shape and dtype), or undefined.
at::Tensor residual_operand(const c10::optional<at::Tensor>& residual, const at::Tensor& y, const char* op) {
  if (!residual.has_value()) return at::Tensor();
  TORCH_CHECK(residual->sizes() == y.sizes() && residual->scalar_type() == y.scalar_type() &&
                  residual->device() == y.device(),
              "bsconv_fast::", op, ": residual must have the output's shape ", y.sizes(), ", dtype ",
              y.scalar_type(), " and device, got ", residual->sizes(), " ", residual->scalar_type(), " ",
              residual->device());
  return residual->contiguous(at::MemoryFormat::ChannelsLast);
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The operands of a layer whose weights `packed` holds (the layout pack_into writes).
template <typename T>
Operands<T> packed_operands(const Geometry& g, const at::Tensor& packed, const T* x, T* y, const T* res) {
  const T* pw = packed.data_ptr<T>();
  const T* dw = pw + g.Cp * g.Cin;
  const T* b1 = dw + g.KH * g.KW * g.Cp;
  return Operands<T>{x, pw, b1, dw, b1 + g.Cp, y, res};
}

// An op's output: a new channels_last tensor of `sizes` (NaN first under BSCONV_FAST_POISON) that
// run(kernels, x, y, residual) fills, with pointers of x's dtype and the kernel family to use (x made
// channels_last; residual checked against the output by residual_operand, or nullptr); returned in
// the input's memory format.
template <typename Run>
at::Tensor kernel_output(const at::Tensor& x_in, at::IntArrayRef sizes, const c10::optional<at::Tensor>& residual,
                         const char* op, const Run& run) {
  auto y = new_output(sizes, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor res = residual_operand(residual, y, op);
  if (y.numel() > 0) {
    const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsconv_fast_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      const scalar_t* rp = data_or_null<scalar_t>(res);
      with_kernels<scalar_t>([&](auto k) { run(k, xp, yp, rp); });
    });
  }
  return x_in.suggest_memory_format() == at::MemoryFormat::ChannelsLast ? y : y.contiguous();
}

// Run the kernels on packed weights; the output keeps the input's memory format.
at::Tensor run_packed(const at::Tensor& x_in, const at::Tensor& packed, const Geometry& g,
                      const c10::optional<at::Tensor>& residual = c10::nullopt) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "bsconv_fast::pw_dw (CPU): supports float32 and float64, got ", x_in.scalar_type());
  return kernel_output(x_in, {g.N, g.Cout, g.OH, g.OW}, residual, "pw_dw_packed",
                       [&](auto k, const auto* xp, auto* yp, const auto* rp) {
                         using T = std::remove_pointer_t<decltype(yp)>;
                         run<T, decltype(k)>(g, packed_operands<T>(g, packed, xp, yp, rp));
                       });
}

}  // namespace

at::Tensor pw_dw_cpu(const at::Tensor& x, const at::Tensor& pw_weight, const at::Tensor& dw_weight,
                     const c10::optional<at::Tensor>& mid_bias, const c10::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                     int64_t mid_act, int64_t out_act) {
  check_inputs(x, pw_weight, dw_weight, mid_bias, bias, stride, padding, dilation, mid_act, out_act);
  const Geometry g = make_geometry(x.sizes(), x.scalar_type(), pw_weight.size(0), dw_weight.sizes().slice(2), stride,
                                   padding, dilation, mid_act, out_act);
  return run_packed(x, pack_checked(pw_weight, dw_weight, mid_bias, bias), g);
}

at::Tensor pack_cpu(const at::Tensor& pw_weight, const at::Tensor& dw_weight,
                    const c10::optional<at::Tensor>& mid_bias, const c10::optional<at::Tensor>& bias) {
  const auto x_like = at::empty({0, pw_weight.size(1), 1, 1}, pw_weight.options());
  check_inputs(x_like, pw_weight, dw_weight, mid_bias, bias, {1, 1}, {0, 0}, {1, 1}, 0, 0);
  return pack_checked(pw_weight, dw_weight, mid_bias, bias);
}

namespace {

// The geometry of a layer on packed weights for an input of sizes `in` and dtype `dtype`, its arguments
// checked; `op` names the op (and the layer) in the errors.
Geometry packed_geometry(const std::string& op, at::IntArrayRef in, at::ScalarType dtype, const at::Tensor& packed,
                         int64_t out_channels, at::IntArrayRef kernel, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t mid_act, int64_t out_act) {
  TORCH_CHECK(kernel.size() == 2 && kernel[0] > 0 && kernel[1] > 0, op, ": bad kernel ", kernel);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op, ": bad stride ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0, op, ": bad dilation ", dilation);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op, ": bad padding ", padding);
  TORCH_CHECK(mid_act >= 0 && mid_act <= 4 && out_act >= 0 && out_act <= 4, op,
              ": activation codes must be in [0, 4]");
  TORCH_CHECK(packed.scalar_type() == dtype && packed.dim() == 1 && packed.is_contiguous(), op,
              ": packed must be a contiguous 1-D buffer from bsconv_fast::pack with the dtype of x");
  const Geometry g = make_geometry(in, dtype, out_channels, kernel, stride, padding, dilation, mid_act, out_act);
  TORCH_CHECK(packed.numel() == packed_numel(g.Cin, g.Cp, g.KH * g.KW), op, ": packed has ", packed.numel(),
              " elements, not what bsconv_fast::pack gives for ", g.Cin, " input channels, ", out_channels,
              " output channels and a ", g.KH, "x", g.KW, " kernel");
  return g;
}

}  // namespace

at::Tensor pw_dw_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                            at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t mid_act, int64_t out_act,
                            const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "bsconv_fast::pw_dw_packed: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  const Geometry g = packed_geometry("bsconv_fast::pw_dw_packed", x.sizes(), x.scalar_type(), packed, out_channels,
                                     kernel, stride, padding, dilation, mid_act, out_act);
  return run_packed(x, packed, g, residual);
}

at::Tensor dw_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels, at::IntArrayRef kernel,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t mid_act,
                         int64_t out_act, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 4, "bsconv_fast::dw_packed: x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == out_channels, "bsconv_fast::dw_packed: a depthwise layer keeps its channels: x has ",
              x.size(1), ", out_channels is ", out_channels);
  TORCH_CHECK(mid_act == 0, "bsconv_fast::dw_packed: mid_act must be 0 (there is no pointwise stage), got ", mid_act);
  Geometry g = packed_geometry("bsconv_fast::dw_packed", x.sizes(), x.scalar_type(), packed, out_channels, kernel,
                               stride, padding, dilation, mid_act, out_act);
  g.copy_in = true;
  return run_packed(x, packed, g, residual);
}

at::Tensor pw_dw_pair_packed_cpu(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_channels,
                                 at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t mid_act, int64_t out_act, const at::Tensor& packed2,
                                 int64_t out_channels2, at::IntArrayRef kernel2, at::IntArrayRef stride2,
                                 at::IntArrayRef padding2, at::IntArrayRef dilation2, int64_t mid_act2,
                                 int64_t out_act2, bool residual) {
  const std::string op = "bsconv_fast::pw_dw_pair_packed";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble, op,
              " (CPU): supports float32 and float64, got ", x_in.scalar_type());
  const Geometry ga = packed_geometry(op + " (first layer)", x_in.sizes(), x_in.scalar_type(), packed, out_channels,
                                      kernel, stride, padding, dilation, mid_act, out_act);
  const Geometry gb = packed_geometry(op + " (second layer)", {ga.N, ga.Cout, ga.OH, ga.OW}, x_in.scalar_type(),
                                      packed2, out_channels2, kernel2, stride2, padding2, dilation2, mid_act2,
                                      out_act2);
  TORCH_CHECK(!residual || (gb.Cout == ga.Cin && gb.OH == ga.H && gb.OW == ga.W), op,
              ": residual=True adds x to the output, which needs the output's shape (", gb.N, ", ", gb.Cout, ", ",
              gb.OH, ", ", gb.OW, ") to be x's ", x_in.sizes());
  Geometry first = ga;
  first.stream_out = false;  // its rows go to a ring in the cache
  return kernel_output(x_in, {gb.N, gb.Cout, gb.OH, gb.OW}, c10::nullopt, "pw_dw_pair_packed",
                       [&](auto k, const auto* xp, auto* yp, const auto*) {
                         using T = std::remove_pointer_t<decltype(yp)>;
                         const auto oa = packed_operands<T>(first, packed, xp, nullptr, nullptr);
                         const auto ob = packed_operands<T>(gb, packed2, nullptr, yp, residual ? xp : nullptr);
                         run_pair<T, decltype(k)>(first, oa, gb, ob);
                       });
}

at::Tensor pack_pw_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1,
              "bsconv_fast::pack_pw: weight must have shape (Cout, Cin, 1, 1), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "bsconv_fast::pack_pw: weight must be float32 or float64, got ", weight.scalar_type());
  const int64_t Cout = weight.size(0), Cin = weight.size(1), Cp = ceil_div(Cout, kNR) * kNR;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == weight.scalar_type(),
                "bsconv_fast::pack_pw: bias must have shape (", Cout, ") and the weight's dtype, got ", bias->sizes(),
                " ", bias->scalar_type());
  }
  auto packed = at::empty({packed_numel(Cin, Cp, 0)}, weight.options());
  const auto w = weight.contiguous();
  const auto b = bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "bsconv_fast_pack_pw", [&] {
    pack_into<scalar_t>(packed.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), nullptr, data_or_null<scalar_t>(b),
                        nullptr, Cout, Cin, Cp, 0);
  });
  return packed;
}

// bsconv_fast::pack_winograd: a (Cout, Cin, 7, 7) stem weight (Cin <= 4) and its bias as the Winograd stem
// takes them (winograd_packed_numel): per point (i, j) of F(4x4, 4x4), U = G w_q G^T of each 4x4 phase kernel
// w_q[a][b] = w[co][c][2a + pr][2b + pc], channel (pr, pc, c) of Q, computed in double.
at::Tensor pack_winograd_cpu(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 7 && weight.size(3) == 7 && weight.size(1) >= 1 &&
                  weight.size(1) <= 4 && weight.size(0) > 0,
              "bsconv_fast::pack_winograd: weight must have shape (Cout, Cin, 7, 7) with 1 <= Cin <= 4, got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "bsconv_fast::pack_winograd: weight must be float32, got ",
              weight.scalar_type());
  const int64_t Cout = weight.size(0), Cin = weight.size(1), Cp = ceil_div(Cout, kNR) * kNR, KQ = 4 * Cin;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == at::kFloat,
                "bsconv_fast::pack_winograd: bias must have shape (", Cout, ") and dtype float32, got ",
                bias->sizes(), " ", bias->scalar_type());
  }
  auto packed = at::zeros({winograd_packed_numel(Cin, Cp)}, weight.options());
  const auto w = weight.contiguous().to(at::kDouble);
  const auto wa = w.accessor<double, 4>();
  float* const u = packed.data_ptr<float>();
  for (int64_t co = 0; co < Cout; ++co) {
    for (int64_t ch = 0; ch < KQ; ++ch) {  // ch = (pr * 2 + pc) * Cin + c
      const int64_t pr = ch / (2 * Cin), pc = ch / Cin % 2, c = ch % Cin;
      double gw[7][4] = {};  // G w_q
      for (int64_t i = 0; i < 7; ++i) {
        for (int64_t b = 0; b < 4; ++b) {
          for (int64_t a = 0; a < 4 && 2 * a + pr < 7; ++a) {
            if (2 * b + pc < 7) gw[i][b] += kWinogradG[i][a] * wa[co][c][2 * a + pr][2 * b + pc];
          }
        }
      }
      for (int64_t i = 0; i < 7; ++i) {
        for (int64_t j = 0; j < 7; ++j) {
          double v = 0;
          for (int64_t b = 0; b < 4; ++b) v += gw[i][b] * kWinogradG[j][b];
          u[(i * 7 + j) * KQ * Cp + (co / kNR * KQ + ch) * kNR + co % kNR] = static_cast<float>(v);
        }
      }
    }
  }
  if (bias.has_value()) {
    const auto b = bias->contiguous();
    std::copy(b.data_ptr<float>(), b.data_ptr<float>() + Cout, u + 49 * KQ * Cp + Cp);
  }
  return packed;
}

at::Tensor pw_packed_cpu(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_channels, at::IntArrayRef stride,
                         int64_t act, const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x_in.dim() == 4, "bsconv_fast::pw_packed: x must be 4-D (N, C, H, W), got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "bsconv_fast::pw_packed (CPU): supports float32 and float64, got ", x_in.scalar_type());
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "bsconv_fast::pw_packed: bad stride ", stride);
  TORCH_CHECK(act >= 0 && act <= 4, "bsconv_fast::pw_packed: activation code must be in [0, 4], got ", act);
  TORCH_CHECK(out_channels > 0, "bsconv_fast::pw_packed: out_channels must be positive, got ", out_channels);
  PwGeometry g{x_in.size(0), x_in.size(2), x_in.size(3), x_in.size(1), out_channels, ceil_div(out_channels, kNR) * kNR,
               stride[0], stride[1], 0, 0, act};
  g.OH = (g.H - 1) / g.sh + 1;
  g.OW = (g.W - 1) / g.sw + 1;
  TORCH_CHECK(packed.scalar_type() == x_in.scalar_type() && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() == packed_numel(g.Cin, g.Cp, 0),
              "bsconv_fast::pw_packed: packed must be the contiguous buffer bsconv_fast::pack_pw gives for ", g.Cin,
              " input and ", out_channels, " output channels, with the dtype of x");
  return kernel_output(x_in, {g.N, g.Cout, g.OH, g.OW}, residual, "pw_packed",
                       [&](auto k, const auto* xp, auto* yp, const auto* rp) {
                         using T = std::remove_pointer_t<decltype(yp)>;
                         const T* w = packed.data_ptr<T>();
                         run_pw<T, decltype(k)>(g, PwOperands<T>{xp, w, w + g.Cp * g.Cin, rp, yp});
                       });
}

namespace {

// The stem convolution's geometry, with its arguments checked (`op` names the caller in errors).
ConvGeometry conv_geometry(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, int64_t act, bool winograd,
                           const char* op) {
  TORCH_CHECK(x.dim() == 4, "bsconv_fast::", op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "bsconv_fast::", op,
              " (CPU): supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(kernel.size() == 2 && kernel[0] > 0 && kernel[1] > 0, "bsconv_fast::", op, ": bad kernel ", kernel);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "bsconv_fast::", op, ": bad stride ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "bsconv_fast::", op, ": bad padding ",
              padding);
  TORCH_CHECK(act >= 0 && act <= 4, "bsconv_fast::", op, ": activation code must be in [0, 4], got ", act);
  TORCH_CHECK(out_channels > 0, "bsconv_fast::", op, ": out_channels must be positive, got ", out_channels);
  ConvGeometry g{x.size(0), x.size(2), x.size(3), x.size(1), out_channels, ceil_div(out_channels, kNR) * kNR,
                 kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], 0, 0, act};
  g.OH = (g.H + 2 * g.ph - g.KH) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.KW) / g.sw + 1;
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "bsconv_fast::", op, ": input ", g.H, "x", g.W, " is too small for kernel ",
              kernel, " with padding ", padding);
  if (winograd) {
    TORCH_CHECK(g.KH == 7 && g.KW == 7 && g.sh == 2 && g.sw == 2 && g.ph == 3 && g.pw == 3 && g.Cin <= 4 &&
                    x.scalar_type() == at::kFloat,
                "bsconv_fast::", op, ": winograd=True takes a float32 7x7 convolution with stride 2, padding 3 and "
                "at most 4 input channels; got kernel ", kernel, ", stride ", stride, ", padding ", padding, ", ",
                g.Cin, " input channels, ", x.scalar_type());
    TORCH_CHECK(packed.scalar_type() == at::kFloat && packed.dim() == 1 && packed.is_contiguous() &&
                    packed.numel() == winograd_packed_numel(g.Cin, g.Cp),
                "bsconv_fast::", op, ": with winograd=True, packed must be the contiguous buffer "
                "bsconv_fast::pack_winograd gives for a (", out_channels, ", ", g.Cin, ", 7, 7) weight");
    return g;
  }
  TORCH_CHECK(packed.scalar_type() == x.scalar_type() && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() == packed_numel(g.Cin * g.KH * g.KW, g.Cp, 0),
              "bsconv_fast::", op, ": packed must be the contiguous buffer bsconv_fast::pack_pw gives for the "
              "weight permuted to (", out_channels, ", ", g.KH, ", ", g.KW, ", ", g.Cin,
              ") and flattened, with the dtype of x");
  return g;
}

// The stem's weights and bias in its packed buffer (pack_pw's layout: the weights, then the bias).
template <typename T>
std::pair<const T*, const T*> conv_weights(const ConvGeometry& g, const at::Tensor& packed) {
  const T* w = packed.data_ptr<T>();
  return {w, w + g.Cp * g.Cin * g.KH * g.KW};
}

// Runs the Winograd stem `run(kernels)` where the kernel family has it, else fails naming the op.
template <typename K, typename Run>
void with_winograd(const char* op, const Run& run) {
  if constexpr (K::kWinograd) {
    run(K{});
  } else {
    TORCH_CHECK(false, "bsconv_fast::", op, ": winograd=True needs the AVX2 or AVX-512 kernels; this process runs ",
                kernel_isa(), " ones (BSCONV_FAST_ISA or the CPU)");
  }
}

// A stem op's output, channels_last (the layout of the fused layers after a stem, whatever x's), which
// run(kernels, input, y) fills: x is read in place where it is channels_last and no input affine is given,
// else through ConvertedRows (its strides as they are, the affine applied).
template <typename Run>
at::Tensor stem_output(const at::Tensor& x, at::IntArrayRef sizes, const c10::optional<at::Tensor>& in_scale,
                       const c10::optional<at::Tensor>& in_shift, const char* op, const Run& run) {
  TORCH_CHECK(in_scale.has_value() == in_shift.has_value(), "bsconv_fast::", op,
              ": in_scale and in_shift come together (an input affine x * in_scale + in_shift) or not at all");
  at::Tensor scale, shift;
  if (in_scale.has_value()) {
    check_channel_operands(x, *in_scale, *in_shift, op, "in_scale and in_shift");
    scale = in_scale->contiguous();
    shift = in_shift->contiguous();
  }
  auto y = new_output(sizes, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bsconv_fast_stem", [&] {
    const bool in_place = !scale.defined() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    const StemInput<scalar_t> in{{x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                  data_or_null<scalar_t>(scale), data_or_null<scalar_t>(shift)},
                                 in_place};
    scalar_t* yp = y.data_ptr<scalar_t>();
    with_kernels<scalar_t>([&](auto k) { run(k, in, yp); });
  });
  return y;
}

}  // namespace

at::Tensor conv_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                           at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, int64_t act,
                           const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& in_shift,
                           bool winograd) {
  const ConvGeometry g = conv_geometry(x, packed, out_channels, kernel, stride, padding, act, winograd, "conv_packed");
  return stem_output(x, {g.N, g.Cout, g.OH, g.OW}, in_scale, in_shift, "conv_packed",
                     [&](auto k, const auto& in, auto* yp) {
                       using T = std::remove_pointer_t<decltype(yp)>;
                       if constexpr (std::is_same<T, float>::value) {
                         if (winograd) {
                           return with_winograd<decltype(k)>("conv_packed", [&](auto wk) {
                             run_conv_winograd<decltype(wk)>(g, in, packed.data_ptr<float>(), yp);
                           });
                         }
                       }
                       const auto [w, b] = conv_weights<T>(g, packed);
                       run_conv<T, decltype(k)>(g, in, w, b, yp);
                     });
}

at::Tensor conv_pool_packed_cpu(const at::Tensor& x, const at::Tensor& packed, int64_t out_channels,
                                at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding, int64_t act,
                                at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
                                at::IntArrayRef pool_padding, const c10::optional<at::Tensor>& in_scale,
                                const c10::optional<at::Tensor>& in_shift, bool winograd) {
  const ConvGeometry g =
      conv_geometry(x, packed, out_channels, kernel, stride, padding, act, winograd, "conv_pool_packed");
  TORCH_CHECK(pool_kernel.size() == 2 && pool_stride.size() == 2 && pool_padding.size() == 2,
              "bsconv_fast::conv_pool_packed: pool_kernel, pool_stride and pool_padding need 2 values each");
  PoolShape p{g.N, g.OH, g.OW, g.Cout, pool_kernel[0], pool_kernel[1], pool_stride[0], pool_stride[1],
              pool_padding[0], pool_padding[1], 0, 0};
  TORCH_CHECK(p.KH > 0 && p.KW > 0 && p.KH <= kMaxPoolKernel && p.sh > 0 && p.sw > 0,
              "bsconv_fast::conv_pool_packed: pool_kernel must be in [1, ", kMaxPoolKernel,
              "] and pool_stride positive, got ", pool_kernel, " and ", pool_stride);
  TORCH_CHECK(p.ph >= 0 && p.pw >= 0 && 2 * p.ph <= p.KH && 2 * p.pw <= p.KW,
              "bsconv_fast::conv_pool_packed: pool_padding must be in [0, pool_kernel / 2], got ", pool_padding);
  p.OH = (g.OH + 2 * p.ph - p.KH) / p.sh + 1;
  p.OW = (g.OW + 2 * p.pw - p.KW) / p.sw + 1;
  TORCH_CHECK(p.OH > 0 && p.OW > 0, "bsconv_fast::conv_pool_packed: the convolution's ", g.OH, "x", g.OW,
              " output is too small for pool_kernel ", pool_kernel);
  return stem_output(x, {g.N, g.Cout, p.OH, p.OW}, in_scale, in_shift, "conv_pool_packed",
                     [&](auto k, const auto& in, auto* yp) {
                       using T = std::remove_pointer_t<decltype(yp)>;
                       if constexpr (std::is_same<T, float>::value) {
                         if (winograd) {
                           return with_winograd<decltype(k)>("conv_pool_packed", [&](auto wk) {
                             run_conv_pool_winograd<decltype(wk)>(g, p, in, packed.data_ptr<float>(), yp);
                           });
                         }
                       }
                       const auto [w, b] = conv_weights<T>(g, packed);
                       run_conv_pool<T, decltype(k)>(g, p, in, w, b, yp);
                     });
}

TORCH_LIBRARY_IMPL(bsconv_fast, CPU, m) {
  m.impl("pw_dw", &pw_dw_cpu);
  m.impl("pack", &pack_cpu);
  m.impl("pw_dw_packed", &pw_dw_packed_cpu);
  m.impl("dw_packed", &dw_packed_cpu);
  m.impl("pw_dw_pair_packed", &pw_dw_pair_packed_cpu);
  m.impl("pack_pw", &pack_pw_cpu);
  m.impl("pack_winograd", &pack_winograd_cpu);
  m.impl("pw_packed", &pw_packed_cpu);
  m.impl("conv_packed", &conv_packed_cpu);
  m.impl("conv_pool_packed", &conv_pool_packed_cpu);
}

}  // namespace cpu
}  // namespace bsconv_fast
