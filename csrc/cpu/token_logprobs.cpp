// CPU kernels of token log-probs: log p(y | x) = (x_y - m) - log sum_v exp(x_v - m), m = max_v x_v.
// Forward reads each vocabulary row once (max pass + exp-sum pass on the row while it sits in
// cache) and keeps only the row statistics stats [2, B, L] = (m, log s); backward recomputes
// softmax = exp((x - m) - log s) from them and writes coef * (onehot - softmax) in one pass, so
// no [B, L, V] temporary is ever saved. Subtracting m before log s (instead of forming
// logsumexp = m + log s) keeps logp exact to fp32 rounding even at logit offsets of 1e4, where
// m + log s alone would round away ~1e-3.
#include "token_logprobs.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "large_alloc.h"
#include "vec_math.h"

namespace ddo_fast {
namespace {

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

// Softmax statistics of one row: m = max_v x_v and log s, s = sum_v exp(x_v - m). A row of only
// -inf, or one holding +inf or NaN, gives NaN log s (and so NaN logp and gradient).
struct RowStats {
  float max;
  float log_sum;
};

RowStats row_stats(const float* x, int64_t vocab) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < vocab; ++v) m = x[v] > m ? x[v] : m;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t v = 0; v < vocab; ++v) s += fast_exp(x[v] - m);
  return {m, std::log(s)};
}

// out[v] = -coef * exp((x[v] - m) - log s), then out[target] += coef.
void row_grad(const float* x, int64_t vocab, RowStats st, int64_t target, float coef, float* out) {
  const float neg = -coef;
#pragma omp simd
  for (int64_t v = 0; v < vocab; ++v) out[v] = neg * fast_exp((x[v] - st.max) - st.log_sum);
  out[target] += coef;
}

// Gradient of one row, written in the row's own dtype (via a float buffer for fp16/bf16).
template <typename T>
void grad_row(const T* xr, int64_t vocab, RowStats st, int64_t target, float coef, T* out,
              float* in_buf, float* out_buf) {
  const float* xf = float_row(xr, vocab, in_buf);
  if constexpr (std::is_same_v<T, float>) {
    row_grad(xf, vocab, st, target, coef, out);
  } else {
    row_grad(xf, vocab, st, target, coef, out_buf);
    from_float(out_buf, out, vocab);
  }
}

// Grain of the row loops: enough rows per task to amortise scheduling, few enough to balance.
constexpr int64_t kRowGrain = 16;

}  // namespace

std::tuple<at::Tensor, at::Tensor> prepare_token_inputs(const at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        int64_t ignore_index) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "ddo_fast: `logits` must be a floating-point tensor, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 3, "ddo_fast: `logits` must have shape [B, L, V], got ",
                    logits.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(targets.scalar_type()) && targets.scalar_type() != at::kBool &&
                       !at::isComplexType(targets.scalar_type()),
                   "ddo_fast: `targets` must be an integer tensor, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == logits.size(0) &&
                        targets.size(1) == logits.size(1),
                    "ddo_fast: `targets` must have shape [B, L] = [", logits.size(0), ", ",
                    logits.size(1), "] to match `logits`, got ", targets.sizes());
  const int64_t vocab = logits.size(2);
  TORCH_CHECK_VALUE(vocab > 0 || targets.numel() == 0,
                    "ddo_fast: `logits` has an empty vocabulary dimension");
  at::Tensor x = logits;
  if (x.size(2) > 1 && x.stride(2) != 1) x = x.contiguous();
  at::Tensor y = targets.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(yp[i] == ignore_index || (yp[i] >= 0 && yp[i] < vocab),
                      "ddo_fast: `targets` holds ", yp[i], " at flat position ", i,
                      ", outside the vocabulary [0, ", vocab, ") and not ignore_index=",
                      ignore_index);
  }
  return {x, y};
}

std::tuple<at::Tensor, at::Tensor> token_rows_forward(const at::Tensor& logits,
                                                      const at::Tensor& targets,
                                                      int64_t ignore_index) {
  auto [x, y] = prepare_token_inputs(logits, targets, ignore_index);
  const int64_t batch = x.size(0), len = x.size(1), vocab = x.size(2);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({batch, len}, opts);
  at::Tensor stats = at::empty({2, batch, len}, opts);
  float* lp = logp.data_ptr<float>();
  float* mp = stats.data_ptr<float>();  // stats[0]: row max
  float* sp = mp + batch * len;         // stats[1]: log sum exp(x - max)
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_rows_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * len, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : vocab);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t target = yp[row];
        if (target == ignore_index) {
          lp[row] = 0.0f;
          mp[row] = 0.0f;
          sp[row] = 0.0f;
          continue;
        }
        const scalar_t* xr = xp + (row / len) * s0 + (row % len) * s1;
        const float* xf = float_row(xr, vocab, buf.data());
        const RowStats st = row_stats(xf, vocab);
        mp[row] = st.max;
        sp[row] = st.log_sum;
        lp[row] = (xf[target] - st.max) - st.log_sum;
      }
    });
  });
  return {logp, stats};
}

at::Tensor token_rows_backward(const at::Tensor& coef, const at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& stats,
                               int64_t ignore_index) {
  at::Tensor x = logits;
  if (x.size(2) > 1 && x.stride(2) != 1) x = x.contiguous();
  const at::Tensor y = targets.to(at::kLong).contiguous();
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == 2 && stats.size(1) == x.size(0) &&
                        stats.size(2) == x.size(1),
                    "ddo_fast: `stats` must have shape [2, B, L], got ", stats.sizes());
  const at::Tensor st = stats.to(at::kFloat).contiguous();
  const at::Tensor c = coef.to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), len = x.size(1), vocab = x.size(2);
  const bool per_sequence = c.dim() == 1;
  at::Tensor grad = empty_large({batch, len, vocab}, x.options());
  const int64_t* yp = y.const_data_ptr<int64_t>();
  const float* mp = st.const_data_ptr<float>();
  const float* sp = mp + batch * len;
  const float* cp = c.const_data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "token_rows_bwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    at::parallel_for(0, batch * len, kRowGrain, [&](int64_t begin, int64_t end) {
      constexpr bool is_float = std::is_same_v<scalar_t, float>;
      std::vector<float> in_buf(is_float ? 0 : vocab), out_buf(is_float ? 0 : vocab);
      for (int64_t row = begin; row < end; ++row) {
        scalar_t* gr = gp + row * vocab;
        const int64_t target = yp[row];
        const float k = cp[per_sequence ? row / len : row];
        if (target == ignore_index || k == 0.0f) {
          std::fill(gr, gr + vocab, scalar_t(0));
          continue;
        }
        const scalar_t* xr = xp + (row / len) * s0 + (row % len) * s1;
        grad_row(xr, vocab, RowStats{mp[row], sp[row]}, target, k, gr, in_buf.data(),
                 out_buf.data());
      }
    });
  });
  return grad;
}

namespace {

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_cpu(const at::Tensor& logits,
                                                          const at::Tensor& targets,
                                                          int64_t ignore_index) {
  return token_rows_forward(logits, targets, ignore_index);
}

at::Tensor token_logprobs_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                  const at::Tensor& targets, const at::Tensor& stats,
                                  int64_t ignore_index) {
  return token_rows_backward(grad, logits, targets, stats, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

}  // namespace ddo_fast
