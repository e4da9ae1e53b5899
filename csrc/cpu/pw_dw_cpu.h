#pragma once

namespace bsconv_fast {
namespace cpu {
// The float32 CPU kernel family in use: "avx512", "avx2-fma" or "scalar" (the CPU's best,
// capped by the environment variable BSCONV_FAST_ISA=avx2|scalar).
const char* kernel_isa();
// BSCONV_FAST_POISON=1 (the test suite sets it): kernels fill their outputs with NaN before they
// run, so that an element a kernel forgets to write fails the comparison.
bool poison_outputs();
}  // namespace cpu
}  // namespace bsconv_fast
