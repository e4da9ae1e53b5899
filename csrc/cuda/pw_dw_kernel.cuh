// Fused pointwise -> depthwise CUDA kernel, torch-free interface (plain nvcc compiles it;
// csrc/cuda/pw_dw_cuda.cpp binds it to torch).
//
// y = act2(depthwise(act1(conv1x1(x, w_pw) + b1), w_dw) + b2), fp32 accumulation.
#pragma once

#include <cuda_runtime.h>

namespace bsconv_fast {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct PwDwParams {
  const void* x;    // [N, Cin, H, W] with the strides below
  const void* wpw;  // [Cout, Cin] contiguous
  const void* b1;   // [Cout] or nullptr
  const void* wdw;  // [Cout, KH * KW] contiguous
  const void* b2;   // [Cout] or nullptr
  void* y;          // [N, Cout, OH, OW] with the strides below
  int N, Cin, H, W, Cout, OH, OW;
  int KH, KW, SH, SW, PH, PW, DH, DW;
  int mid_act, out_act;  // 0 identity, 1 relu, 2 relu6, 3 hardswish, 4 silu
  long long sxn, sxc, sxh, sxw, syn, syc, syh, syw;
};

// Output tile (TH x TW pixels) and channel block chosen for `p`, and the shared memory they
// need; exposed so that the host-side choice can be tested without a GPU.
struct TileConfig {
  int th, tw, cb;
  int hin, win;         // haloed input tile
  size_t smem_bytes;
};
TileConfig choose_tile(const PwDwParams& p);

// Launch on `stream`; returns the launch error (cudaSuccess on success).
cudaError_t launch_pw_dw(const PwDwParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace bsconv_fast
