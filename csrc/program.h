#pragma once

#include <torch/extension.h>

namespace bsconv_fast {
// Adds bsconv_fast._C.Program (csrc/program.cpp) to the extension module.
void bind_program(pybind11::module& m);
}  // namespace bsconv_fast
