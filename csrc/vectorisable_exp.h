// exp for float in plain arithmetic, shared by the CPU kernels (posterior_step.cpp, attention.cpp): a call to
// libm's expf is scalar and keeps GCC from vectorising the loop around it; this compiles to SIMD.
#pragma once

#include <cstdint>
#include <cstring>

namespace ltm {

// Cephes expf: x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite: n * kLn2Hi is exact), exp(r) as
// 1 + r + r^2 P5(r), times 2^n built from bits. x is clamped to [-104, 88.73] first, which maps all below to
// exact 0 (exp(-104) < half the smallest denormal) and all above to +inf; NaN passes both comparisons and
// stays NaN (the clamps compile to maxps/minps, which return x for an unordered compare). 2^n is applied as
// two factors 2^(n/2) 2^(n - n/2), each a normal float for n in [-150, 128], so that the one rounding of
// the last product gives correct overflow to inf and gradual underflow to denormals.
// Measured against double-precision exp over all 2^32 float inputs: at most 0.99 ulp where the result is a
// normal float (libm's expf: 0.50), within one denormal ulp below that; +-inf, NaN, 0 as expf.
// Only IEEE +, -, *, comparisons and integer ops, and no FMA (-ffp-contract=off): SIMD lanes, the scalar
// remainder and every ISA give bit-identical results (checked over all 2^32 inputs for SSE2, AVX2, AVX-512).
inline float exp_vectorisable(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // 9 significant bits: n * kLn2Hi is exact for |n| < 2^15
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  x = x < -104.0f ? -104.0f : x;
  x = x > 88.73f ? 88.73f : x;
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n as an integer: t's significand holds kRound + n (kRound's ulp is 1).
  int32_t t_bits, round_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  std::memcpy(&round_bits, &kRound, sizeof round_bits);
  const int32_t ni = t_bits - round_bits;
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 64]
  const uint32_t s1_bits = static_cast<uint32_t>(n1 + 127) << 23;
  const uint32_t s2_bits = static_cast<uint32_t>(n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &s1_bits, sizeof s1);
  std::memcpy(&s2, &s2_bits, sizeof s2);
  return (p * s1) * s2;
}

// exp(x) for a softmax, x <= 0 (a score minus its row max or its lse; rounding may leave it a hair above 0):
// exp_vectorisable, with results below the smallest normal float (x < -87) returned as 0. A term 1e-38 of the
// row's largest cannot change the sum, and subnormal operands would slow the SIMD multiply-adds that follow
// (P V, P^T dO) on x86. For x >= -87 both scale factors and the product are normal: no subnormal anywhere.
inline float exp_softmax(float x) {
  const float e = exp_vectorisable(x);
  return x < -87.0f ? 0.0f : e;
}

}  // namespace ltm
