// The kernels for AVX-512 (F, BW, VL, DQ; 512-bit vectors) + FMA + F16C: Skylake-SP and later
// Xeons, Zen 4 and later EPYC/Ryzen. Chosen when the CPU has all of them.
#include "kernels_deps.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#else
#pragma GCC push_options
// prefer-vector-width=512: GCC's cost model otherwise keeps 256-bit vectors for some tunings.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif

#define DDO_FAST_ISA avx512
#define DDO_FAST_ISA_NAME "avx512"
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
