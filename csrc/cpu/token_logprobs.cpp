// CPU kernels of token log-probs: log p(y | x) = (x_y - m) - log sum_v exp(x_v - m), m = max_v x_v.
// Forward reads each vocabulary row once (max pass + exp-sum pass on the row while it sits in
// cache) and keeps only the row statistics stats [2, B, L] = (m, log s); backward recomputes
// softmax = exp((x - m) - log s) from them and writes coef * (onehot - softmax) in one pass, so
// no [B, L, V] temporary is ever saved. Subtracting m before log s (instead of forming
// logsumexp = m + log s) keeps logp exact to fp32 rounding even at logit offsets of 1e4, where
// m + log s alone would round away ~1e-3.
#include "token_logprobs.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "autograd.h"
#include "isa/dtype_index.h"
#include "isa/kernels.h"
#include "large_alloc.h"

namespace ddo_fast {
namespace {

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
  const TokenRows rows{x.const_data_ptr(), x.stride(0), x.stride(1), len, vocab,
                       y.const_data_ptr<int64_t>(), ignore_index};
  const DtypeIndex dt = dtype_index(x.scalar_type(), "logits");
  const TokenForwardFn kernel = cpu_kernels().token_forward[dt];
  at::parallel_for(0, batch * len, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dt == kF32 ? 0 : vocab);
    kernel(rows, begin, end, lp, mp, sp, scratch.data());
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
  const float* mp = st.const_data_ptr<float>();
  const float* sp = mp + batch * len;
  const float* cp = c.const_data_ptr<float>();
  const TokenRows rows{x.const_data_ptr(), x.stride(0), x.stride(1), len, vocab,
                       y.const_data_ptr<int64_t>(), ignore_index};
  const DtypeIndex dt = dtype_index(x.scalar_type(), "logits");
  const TokenBackwardFn kernel = cpu_kernels().token_backward[dt];
  void* gp = grad.data_ptr();
  at::parallel_for(0, batch * len, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(dt == kF32 ? 0 : 2 * vocab);
    kernel(rows, begin, end, mp, sp, cp, per_sequence, gp, scratch.data());
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

// Autograd for CPU tensors (autograd.h): the Python setup_context/backward of
// ddo_fast/ops/token_logprobs.py in C++. Only `logits` gets a gradient; stats is returned
// detached (not differentiable, see autograd.h). The node's one differentiable output is logp, so
// its upstream gradient is defined whenever the backward runs (the Python one materialises it).
using FwdSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             int64_t);
using BwdSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, int64_t);

struct TokenLogprobsFunction : public torch::autograd::Function<TokenLogprobsFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& targets, int64_t ignore_index) {
    static const auto fwd = typed_op<FwdSignature>("ddo_fast::token_logprobs_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [logp, stats] = fwd.call(logits, targets, ignore_index);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({logits, targets, stats});
    ctx->saved_data["ignore_index"] = ignore_index;
    return {logp, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_op<BwdSignature>("ddo_fast::token_logprobs_bwd");
    at::Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad = bwd.call(grads[0], s[0], s[1], s[2], ctx->saved_data["ignore_index"].toInt());
    }
    return first_input_grad(grad, 3);
  }
};

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_autograd(const at::Tensor& logits,
                                                               const at::Tensor& targets,
                                                               int64_t ignore_index) {
  const variable_list out = TokenLogprobsFunction::apply(logits, targets, ignore_index);
  return {out[0], out[1].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_cpu);
  m.impl("token_logprobs_bwd", &token_logprobs_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddo_fast, AutogradCPU, m) {
  m.impl("token_logprobs_fwd", &token_logprobs_fwd_autograd);
}

}  // namespace ddo_fast
