// Branch-free float math written so that GCC vectorises the loops that call it (-O3, under each
// ISA's target pragma): the CPU kernels are bound by exp() and memory bandwidth. Included only by
// csrc/cpu/isa/kernels_impl.h, once per ISA, into that ISA's namespace ddo_fast::DDO_FAST_ISA:
// the same inline function compiled for two ISAs must not share a symbol (the linker would keep
// one copy, possibly the AVX-512 one, for every caller).
#pragma once

#ifndef DDO_FAST_ISA
#error "vec_math.h is compiled per ISA: include it through csrc/cpu/isa/kernels_impl.h"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

namespace ddo_fast {
namespace DDO_FAST_ISA {

// exp(x) as 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for accuracy),
// p a degree-6 minimax polynomial (Cephes expf). Correct on the whole float range:
//   * within 2 ulp of exp(x) wherever the result is a normal float (tests/test_token_logprobs.py
//     measures it against double exp on a dense sweep of [-110, 90]);
//   * subnormal results (-103.97 < x < -87.34) get a single rounding of p(r) 2^n, so they are
//     within 1 ulp of the subnormal grid; below that the result is +0 (exp(-inf) = 0 exactly, so
//     masked vocabulary entries get exactly zero probability);
//   * x > 88.7228 (the overflow threshold) gives +inf; NaN gives NaN.
inline float fast_exp(float x) {
  // Written with plain selects (no std::fmin/fmax, no memcpy) so that GCC if-converts and
  // vectorises loops that store the result (needs -fno-trapping-math for the selects).
  // Clamping to [-104, 89] bounds n to [-150, 128]; past either end the result is already 0 or
  // inf. The comparisons send NaN to `lo` (no NaN reaches the int conversion) and the final
  // select returns it.
  const float lo = -104.0f, hi = 89.0f;
  float xc = x > lo ? x : lo;
  xc = xc < hi ? xc : hi;
  // n = round(x / ln 2) by adding and removing 1.5 * 2^23 (exact for |v| < 2^22; here
  // |v| <= 151): plain float arithmetic, so it vectorises on every ISA, where floor() has no
  // vector form before SSE4.1 (the baseline build called libm's floorf per element, 9x slower).
  // Halfway cases round to even instead of up: r stays within [-ln 2 / 2, ln 2 / 2] either way.
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // 2^n as two normal powers of two 2^n1 * 2^n2 (n1, n2 in [-75, 64]): y * 2^n1 is exact, so the
  // second product rounds once, to a subnormal where the result is one, or overflows to inf.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;  // floor(n / 2)
  const int32_t n2 = ni - n1;
  const float s1 = __builtin_bit_cast(float, (n1 + 127) << 23);
  const float s2 = __builtin_bit_cast(float, (n2 + 127) << 23);
  const float out = (y * s1) * s2;
  return x != x ? x : out;
}

// Upcast a row of any supported dtype into float (a plain copy for float inputs is avoided by
// the callers, which read float rows in place).
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace DDO_FAST_ISA
}  // namespace ddo_fast
