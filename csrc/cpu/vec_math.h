// Branch-free float math written so that GCC vectorises the loops that call it (-O3, AVX2/FMA
// when the build machine has them): the CPU kernels are bound by exp() and memory bandwidth.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>

namespace ddo_fast {

// exp(x) as 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for accuracy),
// p a degree-6 minimax polynomial (Cephes expf): about 2 ulp on the whole float range.
// exp(-inf) = 0 exactly (masked vocabulary entries get exactly zero probability); NaN propagates.
inline float fast_exp(float x) {
  // Written with plain selects (no std::fmin/fmax, no memcpy) so that GCC if-converts and
  // vectorises loops that store the result; needs -fno-trapping-math for the floor.
  const float lo = -87.0f, hi = 88.0f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out = y * __builtin_bit_cast(float, bits);
  out = x < lo ? 0.0f : out;
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

}  // namespace ddo_fast
