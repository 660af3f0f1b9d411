// The SIMD level the CPU kernels (posterior_step.cpp, attention.cpp) pick their loop copies by: one
// definition, so that ATEN_CPU_CAPABILITY lowers every kernel the same way and the tests can run each path.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

namespace ltm {

enum class Isa { kDefault, kAvx2, kAvx512 };

// The lower of what the CPU supports and what ATen's own kernels use, which ATEN_CPU_CAPABILITY
// (default / avx2 / avx512) can lower: the tests run every path that way.
inline Isa cpu_isa() {
  static const Isa isa = [] {
#if !defined(__x86_64__)
    return Isa::kDefault;
#else
    __builtin_cpu_init();
    Isa hw = Isa::kDefault;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      hw = Isa::kAvx512;
    } else if (__builtin_cpu_supports("avx2")) {
      hw = Isa::kAvx2;
    }
    const std::string aten = at::get_cpu_capability();
    const Isa cap = aten == "AVX512" ? Isa::kAvx512 : aten == "AVX2" ? Isa::kAvx2 : Isa::kDefault;
    return std::min(hw, cap);
#endif
  }();
  return isa;
}

}  // namespace ltm
