// The CPU inner loops (see kernels.h), compiled once per ISA: csrc/cpu/isa/<isa>.cpp includes
// kernels_deps.h, opens its `#pragma GCC target`, defines DDO_FAST_ISA and includes this file, so
// everything below lands in namespace ddo_fast::<isa> and is compiled for that ISA only. Every
// header it needs was included before the pragma (kernels_deps.h): library inline functions stay
// baseline code, which the ISA code may inline but never replaces.
//
// Token rows (log-probs): per row x = logits[b, l], m = max_v x_v, log s = log sum_v exp(x_v - m),
// logp = (x_t - m) - log s; the backward writes c * (onehot(t) - exp((x - m) - log s)).
// Diffusion: sum_i (p_i - t_i)^2 - (q_i - t_i)^2 and c * (p_i - t_i) over chunks of a sample.
#ifndef DDO_FAST_ISA
#error "kernels_impl.h is compiled per ISA: include it from csrc/cpu/isa/<isa>.cpp"
#endif

#include "../vec_math.h"

namespace ddo_fast {
namespace DDO_FAST_ISA {
namespace {

// Softmax statistics of one row: m = max_v x_v and log s, s = sum_v exp(x_v - m). A row of only
// -inf, or one holding +inf or NaN, gives NaN log s (and so NaN logp and gradient).
struct RowStats {
  float max;
  float log_sum;
};

// The exp pass runs on the row the max pass has just brought into L1, so on its own it would
// leave DRAM idle while it computes; it therefore prefetches `next` (the next row's
// `next_bytes`, null for none) into L2 a few lines per block of the exp loop, and the next
// row's max pass finds it there: memory and exp overlap as in one streaming pass.
RowStats row_stats(const float* x, int64_t vocab, const void* next, int64_t next_bytes) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < vocab; ++v) m = x[v] > m ? x[v] : m;
  constexpr int64_t kBlock = 256;  // floats per exp block (1 KiB)
  constexpr int64_t kLine = 64;    // bytes per cache line
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  const int64_t lines = next == nullptr ? 0 : (next_bytes + kLine - 1) / kLine;
  const int64_t lines_per_block = blocks == 0 ? 0 : (lines + blocks - 1) / blocks;
  const char* ahead = static_cast<const char*>(next);
  float s = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t l = b * lines_per_block, e = std::min(lines, l + lines_per_block); l < e; ++l)
      __builtin_prefetch(ahead + l * kLine, 0, 2);
    const float* xb = x + b * kBlock;
    const int64_t n = std::min(kBlock, vocab - b * kBlock);
    float bs = 0.0f;
#pragma omp simd reduction(+ : bs)
    for (int64_t v = 0; v < n; ++v) bs += fast_exp(xb[v] - m);
    s += bs;
  }
  return {m, std::log(s)};
}

// out[v] = -coef * exp((x[v] - m) - log s), then out[target] += coef.
void row_grad(const float* x, int64_t vocab, RowStats st, int64_t target, float coef, float* out) {
  const float neg = -coef;
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) out[v] = neg * fast_exp((x[v] - st.max) - st.log_sum);
  out[target] += coef;
}

// A float view of one row: the row itself for float inputs, else an upcast copy in `buf`.
template <typename T>
const float* float_row(const T* x, int64_t vocab, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    to_float(x, buf, vocab);
    return buf;
  }
}

template <typename T>
void token_forward(const TokenRows& rows, int64_t begin, int64_t end, float* lp, float* mp,
                   float* sp, float* scratch) {
  const T* xp = static_cast<const T*>(rows.logits);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t target = rows.targets[row];
    if (target == rows.ignore_index) {
      lp[row] = 0.0f;
      mp[row] = 0.0f;
      sp[row] = 0.0f;
      continue;
    }
    const T* xr = xp + (row / rows.len) * rows.stride0 + (row % rows.len) * rows.stride1;
    const float* xf = float_row(xr, rows.vocab, scratch);
    const int64_t nr = row + 1;
    const T* next =
        nr < end ? xp + (nr / rows.len) * rows.stride0 + (nr % rows.len) * rows.stride1 : nullptr;
    const RowStats st =
        row_stats(xf, rows.vocab, next, rows.vocab * static_cast<int64_t>(sizeof(T)));
    mp[row] = st.max;
    sp[row] = st.log_sum;
    lp[row] = (xf[target] - st.max) - st.log_sum;
  }
}

template <typename T>
void token_backward(const TokenRows& rows, int64_t begin, int64_t end, const float* mp,
                    const float* sp, const float* cp, bool per_sequence, void* grad,
                    float* scratch) {
  const T* xp = static_cast<const T*>(rows.logits);
  T* gp = static_cast<T*>(grad);
  const int64_t vocab = rows.vocab;
  for (int64_t row = begin; row < end; ++row) {
    T* gr = gp + row * vocab;
    const int64_t target = rows.targets[row];
    const float k = cp[per_sequence ? row / rows.len : row];
    if (target == rows.ignore_index || k == 0.0f) {
      for (int64_t v = 0; v < vocab; ++v) gr[v] = T(0);
      continue;
    }
    const T* xr = xp + (row / rows.len) * rows.stride0 + (row % rows.len) * rows.stride1;
    const RowStats st{mp[row], sp[row]};
    if constexpr (std::is_same_v<T, float>) {
      row_grad(xr, vocab, st, target, k, gr);
    } else {
      // scratch = [upcast row | float gradient], written back in the row's dtype.
      const float* xf = float_row(xr, vocab, scratch);
      row_grad(xf, vocab, st, target, k, scratch + vocab);
      from_float(scratch + vocab, gr, vocab);
    }
  }
}

// The arithmetic type for a set of input element types: float, or double if any input is double.
template <typename... Ts>
using math_t = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

template <typename P, typename Q, typename T>
double squared_error_gap(const void* pv, const void* qv, const void* tv, int64_t n) {
  using M = math_t<P, Q, T>;
  const P* p = static_cast<const P*>(pv);
  const Q* q = static_cast<const Q*>(qv);
  const T* t = static_cast<const T*>(tv);
  M acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const M tm = static_cast<M>(t[i]);
    const M dp = static_cast<M>(p[i]) - tm;
    const M dq = static_cast<M>(q[i]) - tm;
    // (dp - dq)(dp + dq), not dp^2 - dq^2: exactly 0 where pred == pred_ref (theta = ref gives
    // r = 0 to the bit, whatever FMA contraction the compiler picks), and no cancellation.
    acc += (dp - dq) * (dp + dq);
  }
  return static_cast<double>(acc);
}

template <typename P, typename T>
void scaled_error(const void* pv, const void* tv, void* gv, double coef, int64_t n) {
  using M = math_t<P, T>;
  const P* p = static_cast<const P*>(pv);
  const T* t = static_cast<const T*>(tv);
  P* g = static_cast<P*>(gv);
  const M k = static_cast<M>(coef);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<P>(k * (static_cast<M>(p[i]) - static_cast<M>(t[i])));
  }
}

void fast_exp_n(const float* x, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = fast_exp(x[i]);
}

// Floors (kernels.h): the same vector loops with the least arithmetic over the same bytes.
template <int K>
double read_sum(const float* const* xs, int64_t n) {
  const float* a = xs[0];
  const float* b = K > 1 ? xs[1] : nullptr;
  const float* c = K > 2 ? xs[2] : nullptr;
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    float v = a[i];
    if constexpr (K > 1) v += b[i];
    if constexpr (K > 2) v += c[i];
    acc += v;
  }
  return static_cast<double>(acc);
}

double exp_sum(const float* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += fast_exp(x[i]);
  return static_cast<double>(acc);
}

void sub(const float* a, const float* b, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] - b[i];
}

}  // namespace

// Tables indexed in DtypeIndex order: fp32, fp64, fp16, bf16.
#define DDO_FAST_BY_DTYPE(F) {F(float), F(double), F(c10::Half), F(c10::BFloat16)}
#define DDO_FAST_TOKEN_FWD(T) &token_forward<T>
#define DDO_FAST_TOKEN_BWD(T) &token_backward<T>
#define DDO_FAST_GAP_T(P, Q) \
  {&squared_error_gap<P, Q, float>, &squared_error_gap<P, Q, double>, \
   &squared_error_gap<P, Q, c10::Half>, &squared_error_gap<P, Q, c10::BFloat16>}
#define DDO_FAST_GAP_Q(P) \
  {DDO_FAST_GAP_T(P, float), DDO_FAST_GAP_T(P, double), DDO_FAST_GAP_T(P, c10::Half), \
   DDO_FAST_GAP_T(P, c10::BFloat16)}
#define DDO_FAST_ERR_T(P) \
  {&scaled_error<P, float>, &scaled_error<P, double>, &scaled_error<P, c10::Half>, \
   &scaled_error<P, c10::BFloat16>}

extern const CpuKernels kKernels = {
    DDO_FAST_ISA_NAME,
    DDO_FAST_BY_DTYPE(DDO_FAST_TOKEN_FWD),
    DDO_FAST_BY_DTYPE(DDO_FAST_TOKEN_BWD),
    DDO_FAST_BY_DTYPE(DDO_FAST_GAP_Q),
    DDO_FAST_BY_DTYPE(DDO_FAST_ERR_T),
    &fast_exp_n,
    {&read_sum<1>, &read_sum<2>, &read_sum<3>},
    &exp_sum,
    &sub,
};

#undef DDO_FAST_BY_DTYPE
#undef DDO_FAST_TOKEN_FWD
#undef DDO_FAST_TOKEN_BWD
#undef DDO_FAST_GAP_T
#undef DDO_FAST_GAP_Q
#undef DDO_FAST_ERR_T

}  // namespace DDO_FAST_ISA
}  // namespace ddo_fast
