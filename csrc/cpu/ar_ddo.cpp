// CPU kernels of the fused autoregressive DDO loss.
//   forward : r_b = sum_l log_softmax(logits[b, l])[targets[b, l]] - ref_logprob_b, then the loss
//             head; saves only the softmax statistics stats [2, B, L] (row max, log sum exp).
//   backward: d logits[b, l, :] = k_b * (onehot - softmax), k_b = d(total)/d r_b from the loss head,
//             softmax recomputed from the saved statistics in the same pass that writes the grad.
#include <torch/library.h>

#include "autograd.h"
#include "loss_head.h"
#include "token_logprobs.h"

namespace ddo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ar_ddo_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& targets,
    const std::optional<at::Tensor>& ref_logprob, const std::optional<at::Tensor>& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta,
    int64_t ignore_index, int64_t reduction) {
  const Reduction red = to_reduction(reduction);
  auto [logp, stats] = token_rows_forward(logits, targets, ignore_index);
  const int64_t batch = logp.size(0);
  // Sum over tokens in double (sequences of hundreds of tokens lose digits in fp32), then round
  // to fp32: the very value sequence_logprob returns. r = that value - ref_logprob (in double,
  // exact for every float dtype) is then exactly 0 where theta = ref and ref_logprob came from
  // sequence_logprob of the same logits, as DDO needs at the start of every round.
  at::Tensor logratio = logp.sum(1, /*keepdim=*/false, at::kDouble).to(at::kFloat);
  if (ref_logprob.has_value()) {
    check_batch_vector(*ref_logprob, batch, "ref_logprob");
    logratio = (logratio.to(at::kDouble) - ref_logprob->to(at::kDouble)).to(at::kFloat);
  }
  if (!is_real.has_value()) {
    return {at::empty({0}, logp.options()), logratio, at::ones({2}, logp.options()), stats};
  }
  auto [out, group_scale] = loss_head_forward(logratio, *is_real, sample_weight, alpha, beta, red);
  return {out, logratio, group_scale, stats};
}

at::Tensor ar_ddo_bwd_cpu(const std::optional<at::Tensor>& grad_out,
                          const std::optional<at::Tensor>& grad_logratio, const at::Tensor& logits,
                          const at::Tensor& targets, const at::Tensor& stats,
                          const at::Tensor& logratio, const std::optional<at::Tensor>& is_real,
                          const std::optional<at::Tensor>& sample_weight,
                          const at::Tensor& group_scale, double alpha, double beta,
                          int64_t ignore_index, int64_t reduction) {
  const at::Tensor k = loss_head_coef(grad_out, grad_logratio, logratio, is_real, sample_weight,
                                      group_scale, alpha, beta, to_reduction(reduction));
  return token_rows_backward(k, logits, targets, stats, ignore_index);
}

// Autograd for CPU tensors (autograd.h): the Python setup_context/backward of
// ddo_fast/ops/ar_ddo.py in C++. Only `logits` gets a gradient; group_scale and stats are returned
// detached (not differentiable, see autograd.h); grads are not materialised.
using FwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, int64_t,
    int64_t);
using BwdSignature = at::Tensor(const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const at::Tensor&, double,
                                double, int64_t, int64_t);

struct ArDdoFunction : public torch::autograd::Function<ArDdoFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits,
                               const at::Tensor& targets,
                               const std::optional<at::Tensor>& ref_logprob,
                               const std::optional<at::Tensor>& is_real,
                               const std::optional<at::Tensor>& sample_weight, double alpha,
                               double beta, int64_t ignore_index, int64_t reduction) {
    static const auto fwd = typed_op<FwdSignature>("ddo_fast::ar_ddo_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, logratio, group_scale, stats] = fwd.call(
        logits, targets, ref_logprob, is_real, sample_weight, alpha, beta, ignore_index, reduction);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({logits, targets, stats, logratio, saved_optional(is_real),
                            saved_optional(sample_weight), group_scale});
    save_fused_params(ctx, is_real.has_value(), alpha, beta, reduction);
    ctx->saved_data["ignore_index"] = ignore_index;
    return {out, logratio, group_scale, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_op<BwdSignature>("ddo_fast::ar_ddo_bwd");
    at::Tensor grad;
    if (const auto upstream = fused_upstream(ctx, grads)) {
      grad = call_fused_backward(bwd, ctx, *upstream, ctx->saved_data["ignore_index"].toInt());
    }
    return first_input_grad(grad, 9);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ar_ddo_fwd_autograd(
    const at::Tensor& logits, const at::Tensor& targets,
    const std::optional<at::Tensor>& ref_logprob, const std::optional<at::Tensor>& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta,
    int64_t ignore_index, int64_t reduction) {
  const variable_list out = ArDdoFunction::apply(logits, targets, ref_logprob, is_real,
                                                 sample_weight, alpha, beta, ignore_index,
                                                 reduction);
  return {out[0], out[1], out[2].detach(), out[3].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("ar_ddo_fwd", &ar_ddo_fwd_cpu);
  m.impl("ar_ddo_bwd", &ar_ddo_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddo_fast, AutogradCPU, m) {
  m.impl("ar_ddo_fwd", &ar_ddo_fwd_autograd);
}

}  // namespace ddo_fast
