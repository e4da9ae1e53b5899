#pragma once

namespace bsconv_fast {
namespace cpu {
// The float32 CPU kernel family in use: "avx512", "avx2-fma" or "scalar" (the CPU's best,
// capped by the environment variable BSCONV_FAST_ISA=avx2|scalar).
const char* kernel_isa();
}  // namespace cpu
}  // namespace bsconv_fast
