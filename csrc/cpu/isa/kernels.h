// The CPU inner loops, compiled once per instruction set and chosen at run time.
//
// csrc/cpu/isa/{baseline,avx2,avx512}.cpp each compile kernels_impl.h under their own
// `#pragma GCC target` into their own namespace (ddo_fast::baseline, ::avx2, ::avx512) and export
// one CpuKernels table; cpu_kernels() returns the table of the selected ISA (dispatch.cpp): the
// best one this CPU supports (cpuid), or the one $DDO_FAST_CPU_ISA names. The tables work on raw
// pointers and row/element ranges only: argument checks, allocation and threading stay in the
// baseline-compiled ATen code (token_logprobs.cpp, diffusion_ddo.cpp), so no ATen or standard
// library code is ever compiled for an ISA the machine may lack. No -march flag is used anywhere:
// one build (a wheel, a JIT build) runs on every x86-64 CPU.
#pragma once

#include <cstdint>

namespace ddo_fast {

// Element types of the kernels' inputs, in the order of the tables' dtype axes.
enum DtypeIndex : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kNumDtypes = 4 };

// A [B, L, V] logits view with unit stride over V, and its targets [B * L] (int64). Rows are
// numbered row = b * len + l.
struct TokenRows {
  const void* logits;
  int64_t stride0, stride1, len, vocab;
  const int64_t* targets;
  int64_t ignore_index;
};

// Forward of rows [begin, end): logp[row] = (x_t - m) - log s, max[row] = m,
// log_sum[row] = log s = log sum_v exp(x_v - m); ignored rows give 0 in all three. `scratch`
// holds `vocab` floats (an upcast row) for non-fp32 logits, else may be null.
using TokenForwardFn = void (*)(const TokenRows& rows, int64_t begin, int64_t end, float* logp,
                                float* max, float* log_sum, float* scratch);

// Backward of rows [begin, end): grad[row, :] = c * (onehot(t) - exp((x - m) - log s)) in the
// logits dtype, c = coef[row] (per token) or coef[row / len] (per sequence); ignored rows and
// c == 0 give zeros. grad is contiguous [B * L, V]; `scratch` holds 2 * vocab floats for
// non-fp32 logits.
using TokenBackwardFn = void (*)(const TokenRows& rows, int64_t begin, int64_t end,
                                 const float* max, const float* log_sum, const float* coef,
                                 bool per_sequence, void* grad, float* scratch);

// sum_i (p_i - t_i)^2 - (q_i - t_i)^2 over n elements, in fp32 (double if any input is double).
using SquaredErrorGapFn = double (*)(const void* p, const void* q, const void* t, int64_t n);

// g_i = coef * (p_i - t_i), g in the dtype of p.
using ScaledErrorFn = void (*)(const void* p, const void* t, void* g, double coef, int64_t n);

// out_i = fast_exp(x_i) (vec_math.h), exposed for the tests.
using FastExpFn = void (*)(const float* x, float* out, int64_t n);

// The memory floors of the benchmarks (test hooks, csrc/cpu/test_hooks.cpp): the least work a
// pass over the same bytes can do, in the kernels' own loop shape and ISA.
//   read_sum[k - 1]: sum_i (x0_i + ... + x{k-1}_i) over k = 1..3 fp32 arrays (fp32 lanes);
//   exp_sum:         sum_i fast_exp(x_i) (the token forward's exp, without its max pass);
//   sub:             out_i = a_i - b_i (the diffusion backward's bytes: read 2, write 1).
using ReadSumFn = double (*)(const float* const* xs, int64_t n);
using ExpSumFn = double (*)(const float* x, int64_t n);
using SubFn = void (*)(const float* a, const float* b, float* out, int64_t n);

struct CpuKernels {
  const char* isa;  // "baseline", "avx2" or "avx512"
  TokenForwardFn token_forward[kNumDtypes];
  TokenBackwardFn token_backward[kNumDtypes];
  SquaredErrorGapFn squared_error_gap[kNumDtypes][kNumDtypes][kNumDtypes];  // [p][q][t]
  ScaledErrorFn scaled_error[kNumDtypes][kNumDtypes];                      // [p][t]
  FastExpFn fast_exp;
  ReadSumFn read_sum[3];
  ExpSumFn exp_sum;
  SubFn sub;
};

namespace baseline {
extern const CpuKernels kKernels;
}
#if defined(__x86_64__) || defined(_M_X64)
#define DDO_FAST_X86 1
namespace avx2 {
extern const CpuKernels kKernels;
}
namespace avx512 {
extern const CpuKernels kKernels;
}
#endif

// The table of the selected ISA. The first call selects: $DDO_FAST_CPU_ISA if set (baseline,
// avx2 or avx512; an unknown name or one this CPU lacks raises), else the best one the CPU
// supports. Thread-safe.
const CpuKernels& cpu_kernels();

// The ISAs this build has and this CPU supports, best last ("baseline,avx2,avx512").
const char* supported_isas();

// Switches to `isa` (test hook: returns false, changing nothing, if it is not supported).
bool set_cpu_isa(const char* isa);

}  // namespace ddo_fast
