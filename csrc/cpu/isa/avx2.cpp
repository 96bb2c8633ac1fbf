// The kernels for AVX2 + FMA + F16C (x86-64 CPUs since Haswell / Zen); chosen when the CPU has
// them and no AVX-512. Compiled for that target by pragma (not by -mavx2), so the rest of the
// build stays runnable on any x86-64 CPU.
#include "kernels_deps.h"

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define DDO_FAST_ISA avx2
#define DDO_FAST_ISA_NAME "avx2"
#include "kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
