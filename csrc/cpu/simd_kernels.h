// SIMD kernels of the fused CPU op, written once and included once per instruction set by
// pw_dw_cpu.cpp, inside a namespace that defines:
//   BSCONV_TARGET  function attribute enabling the ISA
//   VReg, kLanes   vector register type and its float lanes
//   vload, vstore, vbcast, vfma, vset1, vadd, vmul, vdiv, vmax, vmin, vmax_nan, vstore_first(n),
//   vload_first(n), vsub, vround (to nearest), vscale2(p, n) = p * 2^n for integral n,
//   vinterleave3(r, g, b, dst) (three vectors' lanes interleaved into 3 * kLanes floats)
//   kMR            pixels per GEMM micro-tile (bounded by the register file)
//   kMaxNV         channel vectors per GEMM micro-tile (kMR * kMaxNV accumulators; > 2: also 6 x 4)
// Needs Geometry, Operands, Runs, valid_taps, ceil_div, the Act codes, kNR and ScalarKernels from the
// including file.
//
// Accumulators are named variables, not arrays: GCC keeps arrays of vectors in memory and
// stores them back on every k step, which halves the micro-kernel's speed.

#include "winograd_f4x4_4x4.h"

// exp(x) to about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r). x is clamped
// to [-87.3, 89]: below, exp would leave the normal range (callers add it to 1); above 88.72 the
// result overflows to inf as float exp does (SiLU(-inf) = -inf / inf = NaN, as in torch). A NaN x
// comes out of the clamps as -87.3: callers carry NaN in another operand (SiLU: the numerator).
BSCONV_TARGET __attribute__((always_inline)) inline VReg vexp(VReg x) {
  x = vmin(vmax(x, vset1(-87.33654f)), vset1(89.f));
  const VReg n = vround(vmul(x, vset1(1.44269504088896341f)));
  VReg r = vfma(n, vset1(-0.693359375f), x);
  r = vfma(n, vset1(2.12194440e-4f), r);
  VReg p = vset1(1.9875691500e-4f);
  p = vfma(p, r, vset1(1.3981999507e-3f));
  p = vfma(p, r, vset1(8.3334519073e-3f));
  p = vfma(p, r, vset1(4.1665795894e-2f));
  p = vfma(p, r, vset1(1.6666665459e-1f));
  p = vfma(p, r, vset1(5.0000001201e-1f));
  p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
  return vscale2(p, n);
}

// The activation as a compile-time parameter (with_act picks it once per GEMM call), SiLU included:
// its exp is vectorised (vexp), where it used to be finished in scalar code after the store.
// Measured single-thread, old vs new build in alternating processes: SiLU layers 2.0-3.6x faster
// (64->64 @56 fused: 1399 -> 385 us), ReLU layers unchanged (0.97-1.03x).
template <int64_t ACT>
BSCONV_TARGET __attribute__((always_inline)) inline VReg vact(VReg v) {
  const VReg zero = vset1(0.f);
  // max/min return their second operand when either is NaN: v goes second, so NaN stays NaN as in torch
  if constexpr (ACT == kRelu) return vmax(zero, v);
  if constexpr (ACT == kRelu6) return vmin(vset1(6.f), vmax(zero, v));
  if constexpr (ACT == kHardswish) return vdiv(vmul(v, vmin(vmax(vadd(v, vset1(3.f)), zero), vset1(6.f))), vset1(6.f));
  if constexpr (ACT == kSilu) return vdiv(v, vadd(vset1(1.f), vexp(vsub(zero, v))));
  return v;
}

// Store the first n (<= kLanes) lanes of act(v); `stream`: a whole aligned vector, non-temporal
// (Geometry::stream_out, where kStreamOut allows it).
template <int64_t ACT>
BSCONV_TARGET __attribute__((always_inline)) inline void store_act(float* dst, VReg v, int64_t n, bool stream = false) {
  if (n <= 0) return;
  v = vact<ACT>(v);
  if (stream) {
    vstream(dst, v);
  } else if (n >= kLanes) {
    vstore(dst, v);
  } else {
    vstore_first(dst, v, n);
  }
}

// Calls f(std::integral_constant<int64_t, act>) for a run-time activation code.
template <typename F>
BSCONV_TARGET inline void with_act(int64_t act, F&& f) {
  switch (act) {
    case kRelu: return f(std::integral_constant<int64_t, kRelu>{});
    case kRelu6: return f(std::integral_constant<int64_t, kRelu6>{});
    case kHardswish: return f(std::integral_constant<int64_t, kHardswish>{});
    case kSilu: return f(std::integral_constant<int64_t, kSilu>{});
    default: return f(std::integral_constant<int64_t, kIdentity>{});
  }
}

// Where a GEMM micro-tile goes: `st(r, col, v)` stores vector v of pixel r, columns
// [col, col + kLanes); `st.at(p)` is the same store moved p pixels on, `st.shifted(col)` col
// channels on; `st.for_tile(cols, f)` calls f with the store a tile of cols columns uses. The
// micro-kernel keeps its own copy (gemm_micro): Python's build flags include -fno-strict-aliasing,
// so through a reference every float store would force the fields to be reloaded (measured 2-3x).
// The pointwise rows of the fused op: whole vectors into the ring (channels padded to kNR).
template <int64_t ACT>
struct RingStore {
  // The fused op's GEMM runs out of line (see gemm_tile): inlined into the ring-filling loop, GCC ran
  // out of general registers and kept pixel offsets in vector registers, moved back on every k step
  // (measured: fused layers 3-5% faster out of line, single thread).
  static constexpr bool kOutOfLine = true;
  float* c;
  int64_t ldc;
  BSCONV_TARGET __attribute__((always_inline)) void operator()(int r, int64_t col, VReg v) const {
    store_act<ACT>(c + r * ldc + col, v, kLanes);
  }
  RingStore at(int64_t p) const { return {c + p * ldc, ldc}; }
  RingStore shifted(int64_t col) const { return {c + col, ldc}; }
  template <int MR, int NV>
  BSCONV_TARGET __attribute__((always_inline)) void prefetch_residual() const {}  // there is none
  template <typename F>
  BSCONV_TARGET __attribute__((always_inline)) void for_tile(int64_t, F&& f) const { f(*this); }
};

// OutStore for a tile whose every column exists: whole vectors, the residual (RES) added unmasked.
template <int64_t ACT, bool RES>
struct WholeStore {
  float* y;
  const float* res;
  int64_t ldc;
  BSCONV_TARGET __attribute__((always_inline)) void operator()(int r, int64_t col, VReg v) const {
    if constexpr (RES) v = vadd(v, vload(res + r * ldc + col));
    store_act<ACT>(y + r * ldc + col, v, kLanes);
  }
};

// The pointwise op's output: y = act(acc + residual), only the first `ncols` columns exist.
template <int64_t ACT>
struct OutStore {
  static constexpr bool kOutOfLine = false;  // GCC inlines some: forced out of line, 1x1 op 0-2% slower
  float* y;
  const float* res;  // nullptr: no residual
  int64_t ldc, ncols;
  BSCONV_TARGET __attribute__((always_inline)) void operator()(int r, int64_t col, VReg v) const {
    const int64_t n = std::min<int64_t>(kLanes, ncols - col);
    if (n <= 0) return;
    if (res != nullptr) v = vadd(v, vload_first(res + r * ldc + col, n));
    store_act<ACT>(y + r * ldc + col, v, n);
  }
  OutStore at(int64_t p) const { return {y + p * ldc, res == nullptr ? nullptr : res + p * ldc, ldc, ncols}; }
  OutStore shifted(int64_t col) const { return {y + col, res == nullptr ? nullptr : res + col, ldc, ncols - col}; }
  // The residual lines of an MR-pixel x NV-vector tile into L1, while its k loop runs: added in the
  // epilogue, each had been a cache miss there (the residual is the block's input, written a few
  // layers before). Measured (the 1x1 op with a residual alone, inputs rotated through 4 copies, AVX2
  // kernels on a Zen 4, A/B in one process, 1 / 2 threads): 64 -> 256 @56 0.88 / 0.97x the time,
  // 128 -> 512 @28 0.85 / 0.97x, 256 -> 1024 @14 0.94 / 1.00x, 512 -> 2048 @7 0.96 / 0.99x. Prefetching
  // the output lines for writing as well cost up to 2% without a residual and gained nothing with one.
  template <int MR, int NV>
  BSCONV_TARGET __attribute__((always_inline)) void prefetch_residual() const {
    if (res == nullptr) return;
    constexpr int kLine = 64 / sizeof(float);
    for (int r = 0; r < MR; ++r) {
      for (int l = 0; l < NV * kLanes; l += kLine) __builtin_prefetch(res + r * ldc + l, 0, 3);
    }
  }
  // f(store) for a tile of `cols` columns: a WholeStore unless the tile reaches past the last column. Checked
  // per vector, the lane count, its mask and the residual test were ~12 instructions a vector, ~300 a 6 x 4
  // tile. Measured (old and new kernels in one library, alternating rounds): chains of 1x1 convolutions
  // 64 -> 64 @56 0.97x the time (1 and 2 threads), 128 -> 128 @28 0.98x, 256 @14 and 512 @7 0.98-1.00x;
  // 24 and 40 channels (a partial last vector: the checked path) 0.99-1.01x; stems 1.00x; whole models on
  // 1 thread ResNet-18 0.988-0.992x, MobileNetV2 0.979-0.990x, MobileNetV3 0.988-0.996x, MobileNetV1 1.00x.
  template <typename F>
  BSCONV_TARGET __attribute__((always_inline)) void for_tile(int64_t cols, F&& f) const {
    if (ncols < cols) {
      f(*this);
    } else if (res != nullptr) {
      f(WholeStore<ACT, true>{y, res, ldc});
    } else {
      f(WholeStore<ACT, false>{y, nullptr, ldc});
    }
  }
};

// K from which a 1x1 GEMM's column blocks prefetch the next block's weights (gemm_columns_pf): a block
// of 48 channels then holds 48 KB of weights or more. Smaller K was not measured with the prefetch
// on its own path (64->64 and 128->128 layers, whose weights stay in cache between calls, lost 2-9%
// to a first form that tested every k step).
constexpr int64_t kPrefetchK = 256;

// AVX2: k steps ahead at which a 1x1 GEMM with K >= kPrefetchK prefetches its own weight panel into L1
// (a 16-channel panel is K lines, 16-64 KB at K = 256-1024: it does not stay in the 32-48 KB L1 from one
// pixel tile to the next, and from L3, for the first tile, the loads wait). With the next-panel
// prefetch into L2 (gemm_columns_pf), measured on a Zen 4 running the AVX2 kernels (A/B in one process,
// weights cold: 48 MB of copies rotated, 2 threads): 1x1 512->512 @8 0.90x the time, 1024->1024 @4 0.71x,
// @2 0.70x, 512->512 @14 0.91x, 256->256 @8 0.90x (1 thread 0.61-0.88x; the L2 prefetch alone: @2 1.07x,
// 32 steps ahead: @2 0.81x, else the same); 128->128 @28 (K below the bound) unchanged. Whole frozen
// models (hot loop, 2 / 1 threads): cifar_mobilenetv1 0.94x / 0.91x, mobilenetv1 0.98x / 0.97x, resnet18
// 0.99x, mobilenetv2 0.99x. The AVX-512 blocks (three panels) are not measured with it.
constexpr int64_t kAheadK = kMaxNV == 2 ? 64 : 0;

// One column block of packed weights: NV vectors of kLanes output channels, vector v's k = 0 row at
// b[v] (k stride kNR), its bias at bias[v], its columns at offset v * kLanes of the store.
template <int NV>
struct Panels {
  const float* b[NV];
  const float* bias[NV];
};

// MR pixels x NV vectors of output channels. Pixel r's K = runs.n * runs.len inputs are runs.n runs
// of runs.len values, run s at a + s * runs.stride + r * lda.
// PF: prefetch the next tile's pixels (one line every other k step: a tile of contiguous pixels
// spans MR * K / 16 lines, at most K / 2 for MR = 8). LEN > 0: runs.len is LEN. PFW: prefetch into L2
// one line from pfw per k step (gemm_columns_pf).
// The column block's operands come by reference and the tile's store as the block's store plus the tile's
// first pixel p. GCC does not inline this kernel, and passed by value, a tile's store built in the caller (a
// 32-byte OutStore written field by field, then copied into the call's stack arguments with one 32-byte load;
// the Runs likewise) made that load wait for the store buffer to drain, the previous tile's 24 output vectors
// included: up to ~200 cycles a tile, 12% of a 1x1 op's samples. Measured (standalone A/B, both variants in
// one binary, 1 / 2 threads): 1x1 64 -> 64 @56 0.90 / 0.94x the time, 64 -> 128 @28 0.94 / 0.92x, 144 -> 24
// @56 0.96 / 0.98x, K >= 384 0.97-1.01x; the 7x7 stem with its pooling 0.97-0.98 / 0.99x; fused 64 -> 64 @56
// 0.88 / 0.93x and ResNet-18's 64-channel pair 0.94 / 0.93x. In the extension (old and new kernels in one
// library, alternating rounds): whole models 0.959-0.977x the time on 1 thread, 0.968-0.985x on 2; layer suite
// (batch 1, 2 threads) geomean 0.976x, 0.925-0.999x.
// Pixels of a full GEMM tile of NV channel vectors: 6 x 4 accumulators for 4-vector blocks, else kMR.
template <int NV>
constexpr int kTilePixels = NV == 4 ? 6 : kMR;

template <int MR, int NV, bool PF, int LEN, bool PFW = false, typename Store>
BSCONV_TARGET inline void gemm_micro(const float* a, int64_t lda, const Panels<NV>& w, const Runs& runs,
                                     const Store& block, int64_t p, const float* pfw = nullptr) {
  const Store st = block.at(p);
  st.template prefetch_residual<MR, NV>();
  const float* next = a + MR * lda;
  const int64_t len = LEN > 0 ? LEN : runs.len;
  const int64_t ahead = (kAheadK > 0 && LEN == 0 && len >= kPrefetchK) ? kAheadK : 0;  // see kAheadK
  static_assert(MR <= 12 && NV >= 1 && NV <= 4 && MR * NV <= 24, "micro-tile too large");
  const float* b0 = w.b[0];
  const float* b1 = w.b[NV > 1 ? 1 : 0];
  const float* b2 = w.b[NV > 2 ? 2 : 0];
  const float* b3 = w.b[NV > 3 ? 3 : 0];
  const VReg i0 = vload(w.bias[0]), i1 = vload(w.bias[NV > 1 ? 1 : 0]), i2 = vload(w.bias[NV > 2 ? 2 : 0]);
  const VReg i3 = vload(w.bias[NV > 3 ? 3 : 0]);
  VReg c03 = i3, c13 = i3, c23 = i3, c33 = i3, c43 = i3, c53 = i3, c63 = i3, c73 = i3, c83 = i3, c93 = i3;
  VReg ca3 = i3, cb3 = i3;
  VReg c00 = i0, c01 = i1, c02 = i2, c10 = i0, c11 = i1, c12 = i2, c20 = i0, c21 = i1, c22 = i2;
  VReg c30 = i0, c31 = i1, c32 = i2, c40 = i0, c41 = i1, c42 = i2, c50 = i0, c51 = i1, c52 = i2;
  VReg c60 = i0, c61 = i1, c62 = i2, c70 = i0, c71 = i1, c72 = i2, c80 = i0, c81 = i1, c82 = i2;
  VReg c90 = i0, c91 = i1, c92 = i2, ca0 = i0, ca1 = i1, ca2 = i2, cb0 = i0, cb1 = i1, cb2 = i2;
  for (int64_t s = 0; s < runs.n; ++s, a += runs.stride, b0 += len * kNR, b1 += len * kNR, b2 += len * kNR,
                                b3 += len * kNR) {
    for (int64_t k = 0; k < len; ++k) {
      if constexpr (PF) __builtin_prefetch(next + (k >> 1) * 16, 0, 3);
      if constexpr (PFW) __builtin_prefetch(pfw + k * kNR, 0, 2);
      if constexpr (kAheadK > 0 && LEN == 0) {
        if (ahead > 0) __builtin_prefetch(b0 + (k + ahead) * kNR, 0, 3);  // loop-invariant: GCC unswitches it
      }
      const VReg w0 = vload(b0 + k * kNR);
      const VReg w1 = NV > 1 ? vload(b1 + k * kNR) : w0;
      const VReg w2 = NV > 2 ? vload(b2 + k * kNR) : w0;
      const VReg w3 = NV > 3 ? vload(b3 + k * kNR) : w0;
#define BSCONV_ROW(r, R)                                     \
  if constexpr (MR > r) {                                    \
    const VReg av = vbcast(a + r * lda + k);                 \
    c##R##0 = vfma(av, w0, c##R##0);                         \
    if constexpr (NV > 1) c##R##1 = vfma(av, w1, c##R##1);   \
    if constexpr (NV > 2) c##R##2 = vfma(av, w2, c##R##2);   \
    if constexpr (NV > 3) c##R##3 = vfma(av, w3, c##R##3);   \
  }
      BSCONV_ROW(0, 0) BSCONV_ROW(1, 1) BSCONV_ROW(2, 2) BSCONV_ROW(3, 3) BSCONV_ROW(4, 4) BSCONV_ROW(5, 5)
      BSCONV_ROW(6, 6) BSCONV_ROW(7, 7) BSCONV_ROW(8, 8) BSCONV_ROW(9, 9) BSCONV_ROW(10, a) BSCONV_ROW(11, b)
#undef BSCONV_ROW
    }
  }
  const auto store_tile = [&](const auto& put) BSCONV_TARGET __attribute__((always_inline)) {
#define BSCONV_STORE(r, R)                                \
  if constexpr (MR > r) {                                 \
    put(r, 0, c##R##0);                                   \
    if constexpr (NV > 1) put(r, kLanes, c##R##1);        \
    if constexpr (NV > 2) put(r, 2 * kLanes, c##R##2);    \
    if constexpr (NV > 3) put(r, 3 * kLanes, c##R##3);    \
  }
    BSCONV_STORE(0, 0) BSCONV_STORE(1, 1) BSCONV_STORE(2, 2) BSCONV_STORE(3, 3) BSCONV_STORE(4, 4)
    BSCONV_STORE(5, 5) BSCONV_STORE(6, 6) BSCONV_STORE(7, 7) BSCONV_STORE(8, 8) BSCONV_STORE(9, 9)
    BSCONV_STORE(10, a) BSCONV_STORE(11, b)
#undef BSCONV_STORE
  };
  // Full tiles (gemm_columns' kTile and kTile - 1 pixels) ask the store once (for_tile); the short tails
  // are few and keep the store's own checks: the two more epilogues in every instance had cost 21% more
  // compile time and 39% more compiler memory for this file. (One whole-tile epilogue testing the residual
  // per vector instead: GCC unswitched it anyway, after computing and spilling the 24 addresses.)
  if constexpr (MR + 1 >= kTilePixels<NV>) {
    st.for_tile(NV * kLanes, store_tile);
  } else {
    store_tile(st);
  }
}

// gemm_micro as a call of its own where the Store asks for it.
template <int MR, int NV, bool PF, int LEN, bool PFW = false, typename Store>
BSCONV_TARGET __attribute__((noinline)) void gemm_micro_call(const float* a, int64_t lda, const Panels<NV>& w,
                                                           const Runs& runs, const Store& st, int64_t p,
                                                           const float* pfw = nullptr) {
  gemm_micro<MR, NV, PF, LEN, PFW>(a, lda, w, runs, st, p, pfw);
}

template <int MR, int NV, bool PF, int LEN, bool PFW = false, typename Store>
BSCONV_TARGET inline void gemm_tile(const float* a, int64_t lda, const Panels<NV>& w, const Runs& runs,
                                    const Store& st, int64_t p, const float* pfw = nullptr) {
  if constexpr (Store::kOutOfLine) {
    gemm_micro_call<MR, NV, PF, LEN, PFW>(a, lda, w, runs, st, p, pfw);
  } else {
    gemm_micro<MR, NV, PF, LEN, PFW>(a, lda, w, runs, st, p, pfw);
  }
}

// All pixel tiles of one column block: npix pixels, pixel p at a + p * lda. The tiles are as even as
// possible (49 pixels: 7 x 7, not 6 x 8 + 1): a tile of a few pixels loads the whole column block of
// weights for a few FMAs per load, and with K in the hundreds those loads come from L2. Measured
// (A/B in one process, 2 threads): 512->512 @7 1x1 3.2%, fused 2.2% faster; models 0.3-0.4%.
template <int NV, bool PF, int LEN, typename Store>
BSCONV_TARGET inline void gemm_columns(const float* a, int64_t lda, const Runs runs, int64_t npix,
                                       const Panels<NV> w, const Store st) {
  constexpr int kTile = kTilePixels<NV>;
  const int64_t tiles = ceil_div(npix, kTile);
  // tiles of base pixels, the first plus_one of them one more
  const int64_t base = tiles > 0 ? npix / tiles : 0, plus_one = tiles > 0 ? npix % tiles : 0;
  int64_t p = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t mr = base + (t < plus_one);
    const float* ap = a + p * lda;
    if (mr == kTile) {
      gemm_tile<kTile, NV, PF, LEN>(ap, lda, w, runs, st, p);
    } else if (mr == kTile - 1) {
      gemm_tile<kTile - 1, NV, PF, LEN>(ap, lda, w, runs, st, p);
    } else {
      switch (mr) {
#define BSCONV_TAIL(r) \
  case r: gemm_tile<(r < kTile - 1 ? r : 1), NV, false, 0>(ap, lda, w, runs, st, p); break;
        BSCONV_TAIL(1) BSCONV_TAIL(2) BSCONV_TAIL(3) BSCONV_TAIL(4) BSCONV_TAIL(5) BSCONV_TAIL(6)
#undef BSCONV_TAIL
        default: break;
      }
    }
    p += mr;
  }
}

// gemm_columns for 1x1 GEMMs with K >= kPrefetchK: the first `panels` tiles each prefetch into L2 one
// panel of the next column block (`next`: K lines, one per k step), so that the next block does not
// stream its weights from L3 at the FMAs' pace. A deep layer's weights (1 MB at 512 -> 512) do not stay
// in L2 from one inference to the next. Measured (standalone replica, A/B in one binary, the weights
// cold: 24 copies rotated): 1x1 512->512 @14 0.93-0.94x the time (1 and 2 threads), fused 512->512 @7
// 0.94-0.95x, 1024->1024 @7 0.92-0.93x; with hot weights 0.98-1.05x. The AVX2 kernels (blocks of one
// 16-channel panel) had measured 1.00-1.04x on an Intel Xeon; on a Zen 4 (AVX2 kernels, with kAheadK's
// prefetch) they gain as much: see kAheadK. The tile split and dispatch repeat gemm_columns' on purpose:
// folding them into gemm_columns with a per-tile test slowed 64->64 @56, which never prefetches, 4-9%.
template <int NV, bool PF, typename Store>
BSCONV_TARGET inline void gemm_columns_pf(const float* a, int64_t lda, const Runs runs, int64_t npix,
                                          const Panels<NV> w, const Store st, const float* next, int64_t panels) {
  const int64_t tiles = ceil_div(npix, kMR);
  const int64_t base = tiles > 0 ? npix / tiles : 0, plus_one = tiles > 0 ? npix % tiles : 0;
  int64_t p = 0, t = 0;
  for (; t < std::min(tiles, panels); ++t) {  // as gemm_columns splits them; a short tile does not prefetch
    const int64_t mr = base + (t < plus_one);
    const float* pf = next + t * runs.len * kNR;
    if (mr == kMR) {
      gemm_tile<kMR, NV, PF, 0, true>(a + p * lda, lda, w, runs, st, p, pf);
    } else if (mr == kMR - 1) {
      gemm_tile<kMR - 1, NV, PF, 0, true>(a + p * lda, lda, w, runs, st, p, pf);
    } else {
      gemm_columns<NV, PF, 0>(a + p * lda, lda, runs, mr, w, st.at(p));
    }
    p += mr;
  }
  gemm_columns<NV, PF, 0>(a + p * lda, lda, runs, npix - p, w, st.at(p));
}

// Output channels [c0, c0 + cg) of npix pixels (pixel p at a + p * lda, its inputs as `runs`
// say), packed weights `w` and bias as pack_into lays them out, in column blocks of kMaxNV vectors
// while at least that many are left, then 2, then 1; on AVX-512 the last 4 or 8 vectors go as blocks of
// 4 (6 x 64-channel tiles, see kQuad below).
// LEN > 0: runs.len is LEN (a compile-time constant for the micro-kernel's inner loop).
template <int LEN = 0, typename Store>
BSCONV_TARGET inline void gemm_panels(const float* a, int64_t lda, const Runs runs, int64_t npix, const float* w,
                                      const float* bias, int64_t c0, int64_t cg, const Store st) {
  const int64_t K = runs.n * runs.len;
  // The first column block meets the pixels cold (the previous layer's output, L3 or further): its
  // tiles prefetch the next tile's pixels. Later blocks find them in L1/L2, where the prefetches
  // would only cost issue slots. Measured in whole models (A/B in one process): mobilenetv1 3-4%,
  // cifar_mobilenetv1 3-4%, mobilenetv3 2% faster, resnet18 and mobilenetv2 unchanged. Plain rows
  // only (runs.n == 1): a stem's patches overlap, its few input rows stay in L1 for every tile, and
  // the prefetch's address arithmetic took a spilled register reload per k step; without it the 7x7
  // stem with its pooling ran 0.96-0.97x the time (standalone A/B in one binary, 1 and 2 threads).
  int64_t c = c0;
  const auto block = [&](auto nv) BSCONV_TARGET {  // the column block of nv vectors from channel c
    constexpr int NV = decltype(nv)::value;
    Panels<NV> p;
    for (int v = 0; v < NV; ++v) {
      const int64_t cv = c + v * kLanes;
      p.b[v] = w + (cv / kNR) * K * kNR + (cv % kNR);
      p.bias[v] = bias + cv;
    }
    const Store sc = st.shifted(c - c0);
    if constexpr (LEN == 0 && NV == kMaxNV) {  // the widest blocks (see gemm_columns_pf)
      const int64_t next = c + NV * kLanes, next_panels = ceil_div(c0 + cg - next, kNR);
      if (runs.n == 1 && K >= kPrefetchK && next_panels > 0) {
        const float* pf = w + (next / kNR) * K * kNR;
        const int64_t panels = std::min<int64_t>(next_panels, kMaxNV * kLanes / kNR);
        if (c == c0) {
          gemm_columns_pf<NV, true>(a, lda, runs, npix, p, sc, pf, panels);
        } else {
          gemm_columns_pf<NV, false>(a, lda, runs, npix, p, sc, pf, panels);
        }
        c = next;
        return;
      }
    }
    if (NV > 1 && c == c0 && runs.n == 1) {
      gemm_columns<NV, (NV > 1), LEN>(a, lda, runs, npix, p, sc);
    } else {
      gemm_columns<NV, false, LEN>(a, lda, runs, npix, p, sc);
    }
    c += NV * kLanes;
  };
  // AVX-512: a last 4 or 8 vectors (64 or 128 channels) as 6 x 4-vector tiles (24 accumulators), not
  // 3 + 3 + 2 or 2 + 2. Register-only loops of 64 k steps on an Intel Xeon (AVX-512, 2.1 GHz): 8 x 2
  // tiles reach 78% of the FMA peak, 8 x 3 86%, 6 x 4 90%. Measured: the pointwise rows alone (hot,
  // 64 -> 64 @56) 0.92x the time; standalone A/B of ResNet-18's 64-channel pair 0.93-0.97x (1 and 2
  // threads); in the extension (both in one library) fused 64 -> 64 @56 0.95x, 128 -> 128 @56 0.96x,
  // 128 -> 128 @28 0.97x (1 thread), 0.94-1.00x on 2; whole models within their noise (0.96-1.02x).
  // (The 1x1 op's last 64 channels had gone this way before: 64 -> 64 @56 2-6%, 3 -> 64 16-22% faster.)
  constexpr int kWide = kMaxNV > 2 ? 3 : 2, kQuad = kMaxNV > 2 ? 4 : 2;  // AVX2: blocks of 2, then 1
  while (c < c0 + cg) {
    const int64_t left = (c0 + cg - c) / kLanes;
    if (kMaxNV > 2 && (left == 4 || left == 8)) {
      block(std::integral_constant<int, kQuad>{});
    } else if (left >= kWide) {
      block(std::integral_constant<int, kWide>{});
    } else if (left >= 2) {
      block(std::integral_constant<int, 2>{});
    } else {
      block(std::integral_constant<int, 1>{});  // a last single vector (AVX-512: an odd 16-channel panel)
    }
  }
}

// One pixel's 1x1 GEMM, a matrix-vector product (a squeeze-excitation unit's convolutions, a classifier's
// Linear at batch 1): channels [c0, c0 + cg) of y = b + W a, into st. Every weight is read once and serves
// one FMA, so the weights' bandwidth bounds it, not the FMAs; the GEMM's 1-pixel tile summed each output
// vector in one chain, an FMA latency per k step (one 64-byte line per ~4 cycles). Here kChains k steps are
// in flight per vector (partial sums added at the end). Measured (the op alone, AVX2 kernels on a Zen 4, A/B
// in one process, 1 / 2 threads): 960 -> 1280 0.70 / 0.74x the time with hot weights, 0.72 / 0.62x with
// weights rotated through 8 copies (from memory); 1280 -> 1000 0.70 / 0.74x and 0.65 / 0.82x;
// squeeze-excitation sizes (672 <-> 168, 240 -> 960, 120 -> 480) 0.72-0.88x. The panels lie one after the
// other, one stream the hardware prefetcher follows: software prefetches 32-256 lines ahead ran 1.05-1.27x
// the time of none.
template <typename Store>
BSCONV_TARGET inline void gemv_panels(const float* a, int64_t K, const float* w, const float* bias, int64_t c0,
                                      int64_t cg, const Store& st) {
  constexpr int kVec = kNR / kLanes;     // vectors per packed panel: AVX2 2, AVX-512 1
  constexpr int kChains = 8 / kVec;      // 8 accumulators
  for (int64_t c = c0; c < c0 + cg; c += kNR) {
    const float* p = w + (c / kNR) * K * kNR;
    VReg acc[kChains][kVec];
    for (int v = 0; v < kVec; ++v) {
      acc[0][v] = vload(bias + c + v * kLanes);
      for (int j = 1; j < kChains; ++j) acc[j][v] = vset1(0.f);
    }
    int64_t k = 0;
    for (; k + kChains <= K; k += kChains) {
      for (int j = 0; j < kChains; ++j) {
        const VReg av = vbcast(a + k + j);
        for (int v = 0; v < kVec; ++v) acc[j][v] = vfma(av, vload(p + (k + j) * kNR + v * kLanes), acc[j][v]);
      }
    }
    for (; k < K; ++k) {
      const VReg av = vbcast(a + k);
      for (int v = 0; v < kVec; ++v) acc[0][v] = vfma(av, vload(p + k * kNR + v * kLanes), acc[0][v]);
    }
    const Store sc = st.shifted(c - c0);
    for (int v = 0; v < kVec; ++v) {
      for (int j = 1; j < kChains; ++j) acc[0][v] = vadd(acc[0][v], acc[j][v]);
      sc(0, v * kLanes, acc[0][v]);
    }
  }
}

// Whether the depthwise stage writes outputs larger than the last-level cache with non-temporal stores
// (Geometry::stream_out): only where one vector is a whole 64-byte line. It stores one channel vector
// for a row's pixels, then the next, so an AVX2 vector is half a line whose other half comes a row of
// pixels later: the write-combining buffer goes out half full and memory merges the halves. Measured
// (A/B in one process, 2 threads, Zen 4, outputs of 26-103 MB): AVX2 streaming 1.34-1.68x the time of
// plain stores (32->64 @112 batch 8: 7.15 vs 4.25 ms; 64->64 @56 batch 32 1.52x; 64->128 @112 stride 2
// batch 8 even), AVX-512 streaming 0.87-1.00x (3.09 vs 3.53 ms).
constexpr bool kStreamOut = kLanes * sizeof(float) >= 64;

struct Kernels {
  static constexpr int64_t kVectorLanes = kLanes;  // channels one load reads

  // out[p, c - c0] = act1(b1[c] + sum_k x[p, k] * w[c, k]) for npix contiguous pixels.
  BSCONV_TARGET static void pw_rows(const Geometry& g, const Operands<float>& o, const float* a, int64_t npix,
                                    int64_t c0, int64_t cg, float* out) {
    const int64_t cn = used_columns(c0, cg, g.Cout);
    with_act(g.mid_act, [&](auto act) BSCONV_TARGET {
      gemm_panels(a, g.Cin, Runs{1, g.Cin, 0}, npix, o.pw, o.b1, c0, cn, RingStore<act()>{out, cg});
    });
  }

  // Of the columns [c0, c0 + cg) of a packing padded to kNR, those up to the vector holding channel
  // Cout - 1: the rest are padding no store and no depthwise load reaches. On AVX2 a layer of 24, 40 or
  // 72 channels had computed 32, 48 or 80. Measured (A/B in one process, Zen 4, 1 / 2 threads): 1x1
  // 72 -> 24 @56 0.85 / 0.89x the time, 144 -> 24 @56 0.84 / 0.85x, 120 -> 40 @28 0.90 / 0.93x; fused
  // 24 -> 72 @56 0.96x, 40 -> 120 @28 0.98x.
  BSCONV_TARGET static int64_t used_columns(int64_t c0, int64_t cg, int64_t Cout) {
    return std::min(cg, ceil_div(Cout - c0, kLanes) * kLanes);
  }

  // y[p, c] = act(b[c] + sum_k a_p[k] * w[c, k] (+ res[p, c])), channels [c0, c0 + cg) of Cout, with
  // pixel p's inputs a_p at a + p * lda as `runs` says.
  BSCONV_TARGET static void pw_out(const float* a, int64_t lda, const Runs runs, int64_t npix, const float* w,
                                   const float* bias, int64_t c0, int64_t cg, int64_t Cout, int64_t act, float* y,
                                   const float* res) {
    with_act(act, [&](auto a_) BSCONV_TARGET {
      const OutStore<a_()> st{y + c0, res == nullptr ? nullptr : res + c0, Cout, Cout - c0};
      const int64_t cn = used_columns(c0, cg, Cout);
      // The 7x7 RGB stem's runs (7 x 3 = 21 values) with their length known at compile time: the
      // k loop unrolled, constant offsets. Measured (A/B in one process, 2 threads): ResNet-18's
      // conv_pool 1216 vs 1273 us, the whole model 1.6-2.1% faster. The 3x3 stems' runs (9 values) too:
      // their k loop of 9 steps had as much loop overhead as FMAs in a 16-channel tile. Measured (the
      // op on an NCHW image with an input affine, both variants in one library, 1 and 2 threads): 224 x
      // 224 3 -> 16 s2 (MobileNetV3) 0.76-0.77x the time, 3 -> 32 s2 (MobileNetV1/V2) 0.96x, 32 x 32
      // 3 -> 32 s1 (cifar) 0.96x; whole models within their noise (0.99-1.02x).
      if (npix == 1 && runs.n == 1) {
        gemv_panels(a, runs.len, w, bias, c0, cn, st);
      } else if (runs.len == kStemRun) {
        gemm_panels<kStemRun>(a, lda, runs, npix, w, bias, c0, cn, st);
      } else if (runs.len == kSmallStemRun) {
        gemm_panels<kSmallStemRun>(a, lda, runs, npix, w, bias, c0, cn, st);
      } else {
        gemm_panels(a, lda, runs, npix, w, bias, c0, cn, st);
      }
    });
  }

  // One image row made channels_last: dst[w * C + c] = src[c * sC + w * sW] (* scale[c] + shift[c] where
  // scale is given), w < W. Three planes of contiguous pixels (an NCHW RGB image) go a vector of pixels at
  // a time (vinterleave3), anything else the scalar way. Measured on the ResNet stem (7x7 on 224 x 224,
  // conv_pool_packed, hot cache): the scalar loop alone cost as much as the separate channel_affine op.
  BSCONV_TARGET static void to_channels_last(const float* src, int64_t sC, int64_t sW, int64_t C, int64_t W,
                                             const float* scale, const float* shift, float* dst) {
    int64_t w = 0;
    if (C == 3 && sW == 1) {
      const VReg one = vset1(1.f), zero = vset1(0.f);
      const VReg s0 = scale ? vset1(scale[0]) : one, s1 = scale ? vset1(scale[1]) : one;
      const VReg s2 = scale ? vset1(scale[2]) : one, t0 = scale ? vset1(shift[0]) : zero;
      const VReg t1 = scale ? vset1(shift[1]) : zero, t2 = scale ? vset1(shift[2]) : zero;
      for (; w + kLanes <= W; w += kLanes) {
        VReg r = vload(src + w), g = vload(src + sC + w), b = vload(src + 2 * sC + w);
        if (scale != nullptr) {
          r = vadd(vmul(r, s0), t0);
          g = vadd(vmul(g, s1), t1);
          b = vadd(vmul(b, s2), t2);
        }
        vinterleave3(r, g, b, dst + 3 * w);
      }
    }
    ScalarKernels<float>::to_channels_last(src + w * sW, sC, sW, C, W - w, scale, shift, dst + w * C);
  }

  // ---- the Winograd stem (winograd_tile_row in pw_dw_cpu.cpp)
  static constexpr bool kWinograd = true;

  // One Q row from an input row (channels_last, W pixels of Cin values): Q[x] takes the 2 * Cin values of
  // input pixels 2x - pw and 2x - pw + 1 (zeros outside the row) at dst[x * kWinogradLanes], x < QW. The
  // copies are 8 values wide; lanes past 2 * Cin get the next pixels' values (the other phase, written
  // after, or lanes the GEMM never reads), and only where the 8 values lie inside the row.
  BSCONV_TARGET static void winograd_q_row(const float* src, int64_t W, int64_t Cin, int64_t pw, int64_t QW,
                                           float* dst) {
    const int64_t span = 2 * Cin;
    for (int64_t x = 0; x < QW; ++x, dst += kWinogradLanes) {
      const int64_t iw = 2 * x - pw;
      if (iw >= 0 && iw * Cin + 8 <= W * Cin) {
        if constexpr (kLanes == 8) {
          vstore(dst, vload(src + iw * Cin));
        } else {
          vstore_first(dst, vload_first(src + iw * Cin, 8), 8);
        }
        continue;
      }
      for (int64_t i = 0; i < span; ++i) {
        const int64_t col = iw + i / Cin;
        dst[i] = col >= 0 && col < W ? src[col * Cin + i % Cin] : 0.f;
      }
    }
  }

  // The 7 x 7 Q tile at q (positions kWinogradLanes floats apart, rows qrow) as its 49 points B^T d B:
  // point i * 7 + j at v + (i * 7 + j) * vstride. tmp: 49 * kLanes floats.
  BSCONV_TARGET static void winograd_input(const float* q, int64_t qrow, float* v, int64_t vstride, float* tmp) {
    for (int64_t l = 0; l < kWinogradLanes; l += kLanes) {
      for (int64_t x = 0; x < 7; ++x) {
        wino_bt(q + x * kWinogradLanes + l, qrow,
                [&](int i, VReg r) BSCONV_TARGET { vstore(tmp + (i * 7 + x) * kLanes, r); });
      }
      for (int64_t i = 0; i < 7; ++i) {
        wino_bt(tmp + i * 7 * kLanes, kLanes,
                [&](int j, VReg r) BSCONV_TARGET { vstore(v + (i * 7 + j) * vstride + l, r); });
      }
    }
  }

  // One tile's 4 x 4 output pixels from its 49 points M (point p, channel c at m[p * mstride + c]):
  // pixel (a, b) at out[a] + b * C gets act(A^T M A + bias), channels [0, C); rows a >= nrows and
  // columns b >= ncols (past the image) are not stored. tmp: 28 * kLanes floats.
  BSCONV_TARGET static void winograd_output(const float* m, int64_t mstride, const float* bias, int64_t act, int64_t C,
                                            float* const* out, int64_t nrows, int64_t ncols, float* tmp) {
    with_act(act, [&](auto a_) BSCONV_TARGET {
      for (int64_t c = 0; c < C; c += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, C - c);
        for (int64_t j = 0; j < 7; ++j) {
          wino_at(m + j * mstride + c, 7 * mstride,
                  [&](int a, VReg r) BSCONV_TARGET { vstore(tmp + (a * 7 + j) * kLanes, r); });
        }
        const VReg b = vload(bias + c);
        for (int64_t a = 0; a < nrows; ++a) {
          wino_at(tmp + a * 7 * kLanes, kLanes, [&](int col, VReg r) BSCONV_TARGET {
            if (col < ncols) store_act<a_()>(out[a] + col * C + c, vadd(r, b), n);
          });
        }
      }
    });
  }

  // Pooled output row: pixel q is the max of rows[0..nrows) over its window columns (NaN winning),
  // four channel vectors at a time (then one, then a masked tail), each with its running max in a register.
  // A vmax_nan is a chain of ~5 cycles (compare, or, blend): one vector at a time, the window's 9 steps ran
  // back to back, ~45 cycles an output vector. Measured (A/B in one process): the 3x3 stride-2 max_pool of
  // 64 x 112 x 112 0.67x the time on 1 thread, 0.70x on 2; ResNet-18's Winograd stem with its pooling
  // 0.97x / 0.96x, the direct one 0.98x; resnet18_bsconvu 0.99x. Same outputs bitwise.
  BSCONV_TARGET static void max_pool_row(const float* const* rows, int64_t nrows, int64_t W, int64_t C, int64_t KW,
                                         int64_t sw, int64_t pw, int64_t OW, float* y) {
    const VReg ninf = vset1(-std::numeric_limits<float>::infinity());
    for (int64_t q = 0; q < OW; ++q, y += C) {
      const int64_t iw0 = q * sw - pw, lo = std::max<int64_t>(0, iw0), hi = std::min(W, iw0 + KW);
      int64_t c = 0;
      for (; c + 4 * kLanes <= C; c += 4 * kLanes) {
        VReg m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
        for (int64_t i = 0; i < nrows; ++i) {
          for (int64_t iw = lo; iw < hi; ++iw) {
            const float* p = rows[i] + iw * C + c;
            m0 = vmax_nan(m0, vload(p));
            m1 = vmax_nan(m1, vload(p + kLanes));
            m2 = vmax_nan(m2, vload(p + 2 * kLanes));
            m3 = vmax_nan(m3, vload(p + 3 * kLanes));
          }
        }
        vstore(y + c, m0);
        vstore(y + c + kLanes, m1);
        vstore(y + c + 2 * kLanes, m2);
        vstore(y + c + 3 * kLanes, m3);
      }
      for (; c + kLanes <= C; c += kLanes) {
        VReg m = ninf;
        for (int64_t i = 0; i < nrows; ++i) {
          for (int64_t iw = lo; iw < hi; ++iw) m = vmax_nan(m, vload(rows[i] + iw * C + c));
        }
        vstore(y + c, m);
      }
      if (c < C) {  // a channel tail: masked loads and store
        VReg m = ninf;
        for (int64_t i = 0; i < nrows; ++i) {
          for (int64_t iw = lo; iw < hi; ++iw) m = vmax_nan(m, vload_first(rows[i] + iw * C + c, C - c));
        }
        vstore_first(y + c, m, C - c);
      }
    }
  }

  // One output row of the depthwise stage, channels [c0, c0 + cg): rows[kh] is input row kh of its window
  // (nullptr: padding) from channel c0, pixel p at rows[kh] + p * ld.
  BSCONV_TARGET static void dw_row(const Geometry& g, const Operands<float>& o, const float* const* rows,
                                   int64_t ld, int64_t n, int64_t oh, int64_t c0, int64_t cg) {
    if (g.KH == 3 && g.KW == 3) return dw_row_fixed<3, 3>(g, o, rows, ld, n, oh, c0, cg);
    if (g.KH == 5 && g.KW == 5) return dw_row_fixed<5, 5>(g, o, rows, ld, n, oh, c0, cg);
    dw_row_generic(g, o, rows, ld, n, oh, c0, cg, 0, g.OW);
  }

  // Depthwise result for channels [cc, cc + kLanes) at output offset `off`: + residual, act, store.
  BSCONV_TARGET __attribute__((always_inline)) static void store_out(const Geometry& g, const Operands<float>& o,
                                                                    int64_t off, VReg acc, int64_t cc) {
    if (o.res != nullptr) acc = vadd(acc, vload_first(o.res + off, std::min<int64_t>(g.Cout - cc, kLanes)));
    with_act(g.out_act, [&](auto act) BSCONV_TARGET {
      store_act<act()>(o.y + off, acc, g.Cout - cc, kStreamOut && g.stream_out);
    });
  }

  // Output pixels [ow0, ow1) of one row, any kernel size; taps outside the input are skipped (the
  // border pixels of the 3x3 and 5x5 rows too). Four channel vectors at a time: four independent FMA
  // chains, where one chain waited on every FMA's latency. Measured (depthwise rows alone, 1 thread):
  // 64 channels @56 3x3 12% faster, @18 18%.
  BSCONV_TARGET static void dw_row_generic(const Geometry& g, const Operands<float>& o, const float* const* rows,
                                           int64_t ld, int64_t n, int64_t oh, int64_t c0, int64_t cg, int64_t ow0,
                                           int64_t ow1) {
    const int64_t cvalid = std::min(cg, g.Cout - c0);  // padded channels are never stored
    for (int64_t ow = ow0; ow < ow1; ++ow) {
      int64_t kw_lo, kw_hi;
      valid_taps(g, ow, &kw_lo, &kw_hi);
      const int64_t iw0 = ow * g.sw - g.pw;
      const int64_t yoff = ((n * g.OH + oh) * g.OW + ow) * g.Cout;
      int64_t c = 0;
      for (; c + 4 * kLanes <= cvalid; c += 4 * kLanes) dw_taps<4>(g, o, rows, ld, c0, c, iw0, kw_lo, kw_hi, yoff);
      for (; c < cvalid; c += kLanes) dw_taps<1>(g, o, rows, ld, c0, c, iw0, kw_lo, kw_hi, yoff);
    }
  }

  // NV channel vectors from c of one output pixel (dw_row_generic), taps kw_lo..kw_hi of each kernel row.
  template <int NV>
  BSCONV_TARGET __attribute__((always_inline)) static void dw_taps(const Geometry& g, const Operands<float>& o,
                                                                  const float* const* rows, int64_t ld, int64_t c0,
                                                                  int64_t c, int64_t iw0, int64_t kw_lo,
                                                                  int64_t kw_hi, int64_t yoff) {
    const int64_t cc = c0 + c;
    VReg acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = vload(o.b2 + cc + v * kLanes);
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const float* row = rows[kh];
      if (row == nullptr) continue;
      const float* wk = o.dw + kh * g.KW * g.Cp + cc;
      for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
        const float* in = row + (iw0 + kw * g.dw) * ld + c;
        for (int v = 0; v < NV; ++v) acc[v] = vfma(vload(in + v * kLanes), vload(wk + kw * g.Cp + v * kLanes), acc[v]);
      }
    }
    for (int v = 0; v < NV; ++v) store_out(g, o, yoff + cc + v * kLanes, acc[v], cc + v * kLanes);
  }

  // KH x KW known at compile time: the row's interior pixels (all taps inside the input) run
  // dw_interior, the border pixels (and dilated or stride > 2 rows) the generic path.
  template <int KH, int KW>
  BSCONV_TARGET static void dw_row_fixed(const Geometry& g, const Operands<float>& o, const float* const* rows,
                                         int64_t ld, int64_t n, int64_t oh, int64_t c0, int64_t cg) {
    // interior: ow * sw - pw >= 0 and ow * sw - pw + (KW - 1) * dw <= W - 1
    const int64_t lo = std::min(g.OW, ceil_div(g.pw, g.sw));
    const int64_t last = g.W - 1 - (KW - 1) * g.dw + g.pw;
    const int64_t hi = last < 0 ? lo : std::max(lo, std::min(g.OW, last / g.sw + 1));
    if (g.dw != 1 || g.sw > 2 || lo >= hi) return dw_row_generic(g, o, rows, ld, n, oh, c0, cg, 0, g.OW);
    dw_row_generic(g, o, rows, ld, n, oh, c0, cg, 0, lo);
    dw_row_generic(g, o, rows, ld, n, oh, c0, cg, hi, g.OW);
    const int64_t first = ((n * g.OH + oh) * g.OW + lo) * g.Cout + c0;  // output offset of the first interior pixel
    const int64_t next_row = oh + 1 < g.OH ? g.OW * g.Cout : 0;
    DwRow r{{}, o.dw + c0, o.b2 + c0, o.y + first, o.res == nullptr ? nullptr : o.res + first,
            g.Cp, g.Cout, ld, std::min(cg, g.Cout - c0), hi - lo, next_row, kStreamOut && g.stream_out};
    for (int kh = 0; kh < KH; ++kh) r.src[kh] = rows[kh] == nullptr ? nullptr : rows[kh] + (lo * g.sw - g.pw) * ld;
    const bool s1 = g.sw == 1;
    switch (g.out_act) {
#define BSCONV_ACT_CASE(A) \
  case A: return s1 ? dw_interior<KH, KW, 1, A>(r) : dw_interior<KH, KW, 2, A>(r);
      BSCONV_ACT_CASE(kIdentity) BSCONV_ACT_CASE(kRelu) BSCONV_ACT_CASE(kRelu6) BSCONV_ACT_CASE(kHardswish)
      BSCONV_ACT_CASE(kSilu)
#undef BSCONV_ACT_CASE
      default: return;
    }
  }

  // One row's interior, as plain values: with -fno-strict-aliasing (Python's build flags) every
  // float store would otherwise force the Geometry fields it is computed from to be reloaded.
  struct DwRow {
    const float* src[kMaxFixedKernel];  // per kernel row: input of the first interior pixel, channel c0
                                        // (nullptr: a padding row)
    const float* w;                // tap t of channel c0 + c at w[t * Cp + c]
    const float* bias;
    float* y;                      // output of the first interior pixel, channel c0; pixel stride Cout
    const float* res;              // the residual, laid out like y, or nullptr
    int64_t Cp, Cout, ld, cvalid, npix;  // ld: the input rows' pixel stride
    int64_t next_row;              // y's offset to the same pixels one row down; 0: this is the last row
    bool stream;
  };

  template <int64_t ACT>
  BSCONV_TARGET __attribute__((always_inline)) static void dw_store(const DwRow& r, int64_t off, VReg v, int64_t n) {
    if (r.res != nullptr) v = vadd(v, vload_first(r.res + off, n));
    store_act<ACT>(r.y + off, v, n, r.stream);
  }

  // The output (and residual) lines of pixels [ow, ow + kPx), channel c, that a later pass will store:
  // the line one 64-byte step on (the next pass on AVX-512, the one after next on AVX2), or from the
  // last pass the next row's first. The output is written once and, past a layer's first rows, is
  // not in this core's cache: without the prefetch every store waits for its line (read for
  // ownership). Measured on
  // an Intel Xeon (AVX-512, 2 cores; both variants built into one library, alternated in one
  // process): batch 8 layers 3-17% faster (64->64 @56 17%, 64->128 @112 s2 14%, 512->512 @14 3%),
  // whole models at batch 1 1-5% (2 threads) and 1.6-5% (1 thread).
  BSCONV_TARGET __attribute__((always_inline)) static void prefetch_out(const DwRow& r, int64_t ow, int64_t c,
                                                                        int kPx) {
    constexpr int64_t kLine = 64 / sizeof(float);  // floats per cache line
    const int64_t off = ow * r.Cout + c;
    const int64_t ahead = c + kLine < r.cvalid ? kLine : (r.next_row != 0 ? r.next_row - c : -1);
    if (ahead < 0 || r.stream) return;  // streaming stores bypass the cache: a prefetch would only add a read
    for (int j = 0; j < kPx; ++j) {
      __builtin_prefetch(r.y + off + j * r.Cout + ahead, 1, 3);
      if (r.res != nullptr) __builtin_prefetch(r.res + off + j * r.Cout + ahead, 0, 3);
    }
  }

  // The store of one output vector: kStore 0 = any (residual, streaming, a partial vector: checked per
  // store), 1 = a whole vector, no residual, 2 = a whole vector plus the residual. y and res are r's,
  // held in locals by the caller: a float store could otherwise force them to be reloaded (see DwRow).
  template <int64_t ACT, int kStore>
  BSCONV_TARGET __attribute__((always_inline)) static void dw_put(const DwRow& r, float* y, const float* res,
                                                                 int64_t off, VReg v, int64_t n) {
    if constexpr (kStore == 0) {
      dw_store<ACT>(r, off, v, n);
    } else {
      if constexpr (kStore == 2) v = vadd(v, vload(res + off));
      store_act<ACT>(y + off, v, kLanes);
    }
  }

  // Per channel vector: the taps' weights stay in registers while the row's pixels stream by,
  // kPx output pixels per step (independent FMA chains), and each input vector is loaded once per
  // kernel row for every tap that reads it. A step is 6 pixels (3x3) or 8 (5x5 at stride 1, 4 at
  // stride 2). 3-wide kernels pin the loaded vectors in registers: GCC otherwise folds them back into
  // the FMAs as memory operands, one load per tap (measured on the 3x3 stage of 32->64 @112: 1.5 ->
  // 1.1 cycles per FMA; without the pin 9% slower again here); 5x5 has too few registers for that.
  // 3x3 at stride 1 stepped 8 pixels before: 6 leaves registers for the pinned inputs (depthwise
  // rows alone, AVX-512 0.90-0.93x the time, AVX2 0.81-0.86x; 4 pixels: AVX2 1.04-1.10x that of 6;
  // the fused 64->64 @56 on AVX2 0.94x, on AVX-512 0.99x). The store is chosen once per channel
  // vector (dw_put), not per pixel: the residual, streaming and partial-vector checks had cost about
  // ten instructions and three branches per stored vector. Measured on the depthwise rows alone (ring
  // in cache, 1 thread, both variants in one binary, AVX-512): 64 channels @56 3x3 stride 1 17%
  // faster (8 pixels a step then); stride 2 with 6 pixels a step (was 4) another 17%; 5x5 stride 1
  // with 8 (was 4) 120 channels @28 7%, 480 @14 4% (at stride 2, 6 pixels ran 4-6% slower than 4).
  template <int KH, int KW, int SW, int64_t ACT>
  BSCONV_TARGET static void dw_interior(const DwRow& r) {
    for (int64_t c = 0; c < r.cvalid; c += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, r.cvalid - c);
      if (n < kLanes || r.stream) {
        dw_channel<KH, KW, SW, ACT, 0>(r, c, n);
      } else if (r.res == nullptr) {
        dw_channel<KH, KW, SW, ACT, 1>(r, c, n);
      } else {
        dw_channel<KH, KW, SW, ACT, 2>(r, c, n);
      }
    }
  }

  template <int KH, int KW, int SW, int64_t ACT, int kStore>
  BSCONV_TARGET __attribute__((always_inline)) static void dw_channel(const DwRow& r, int64_t c, int64_t n) {
    constexpr int kPx = KW <= 3 ? 6 : (SW == 1 ? 8 : 4);
    constexpr int kIn = (kPx - 1) * SW + KW;  // input vectors per kernel row and step
    const int64_t ld = r.ld, Cout = r.Cout, npix = r.npix;
    float* const y = r.y;
    const float* const res = r.res;
    VReg w[KH * KW];
    for (int t = 0; t < KH * KW; ++t) w[t] = vload(r.w + t * r.Cp + c);
    const VReg bias = vload(r.bias + c);
    int64_t ow = 0;
    for (; ow + kPx <= npix; ow += kPx) {
      VReg a[kPx];
      for (int j = 0; j < kPx; ++j) a[j] = bias;
      for (int kh = 0; kh < KH; ++kh) {
        if (r.src[kh] == nullptr) continue;
        const float* p = r.src[kh] + ow * SW * ld + c;
        VReg v[kIn];
        for (int i = 0; i < kIn; ++i) {
          v[i] = vload(p + i * ld);
          if constexpr (KW <= 3) __asm__("" : "+v"(v[i]));
        }
        for (int kw = 0; kw < KW; ++kw) {
          for (int j = 0; j < kPx; ++j) a[j] = vfma(v[j * SW + kw], w[kh * KW + kw], a[j]);
        }
      }
      for (int j = 0; j < kPx; ++j) dw_put<ACT, kStore>(r, y, res, (ow + j) * Cout + c, a[j], n);
      prefetch_out(r, ow, c, kPx);
    }
    for (; ow < npix; ++ow) {
      VReg a = bias;
      for (int kh = 0; kh < KH; ++kh) {
        if (r.src[kh] == nullptr) continue;
        const float* p = r.src[kh] + ow * SW * ld + c;
        for (int kw = 0; kw < KW; ++kw) a = vfma(vload(p + kw * ld), w[kh * KW + kw], a);
      }
      dw_put<ACT, kStore>(r, y, res, ow * Cout + c, a, n);
    }
  }
};
