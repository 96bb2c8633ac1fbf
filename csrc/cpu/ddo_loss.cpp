// CPU implementation of the `ddo_loss` operator: the loss head (loss_head.h) on a given r [B].
#include <torch/library.h>

#include "autograd.h"
#include "loss_head.h"

namespace ddo_fast {
namespace {

std::tuple<at::Tensor, at::Tensor> ddo_loss_fwd_cpu(const at::Tensor& logratio,
                                                    const at::Tensor& is_real,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    double alpha, double beta, int64_t reduction) {
  const Reduction red = to_reduction(reduction);
  TORCH_CHECK_VALUE(logratio.dim() == 1, "ddo_fast: `logratio` must have shape [B], got ",
                    logratio.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(logratio.scalar_type()),
                   "ddo_fast: `logratio` must be a floating-point tensor, got ",
                   logratio.scalar_type());
  return loss_head_forward(logratio, is_real, sample_weight, alpha, beta, red);
}

// d loss / d logratio, in the dtype of logratio.
at::Tensor ddo_loss_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& logratio,
                            const at::Tensor& is_real,
                            const std::optional<at::Tensor>& sample_weight,
                            const at::Tensor& group_scale, double alpha, double beta,
                            int64_t reduction) {
  const at::Tensor coef = loss_head_coef(grad_out, std::nullopt, logratio, is_real, sample_weight,
                                         group_scale, alpha, beta, to_reduction(reduction));
  return coef.to(logratio.scalar_type());
}

// Autograd for CPU tensors (autograd.h): the Python setup_context/backward of
// ddo_fast/ops/ddo_loss.py in C++. Only `logratio` gets a gradient; group_scale is returned
// detached (not differentiable, see autograd.h). The node's one differentiable output is the
// loss, so its upstream gradient is defined whenever the backward runs.
using FwdSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const std::optional<at::Tensor>&, double,
                                                        double, int64_t);
using BwdSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, const at::Tensor&, double,
                                    double, int64_t);

struct DdoLossFunction : public torch::autograd::Function<DdoLossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logratio,
                               const at::Tensor& is_real,
                               const std::optional<at::Tensor>& sample_weight, double alpha,
                               double beta, int64_t reduction) {
    static const auto fwd = typed_op<FwdSignature>("ddo_fast::ddo_loss_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, group_scale] = fwd.call(logratio, is_real, sample_weight, alpha, beta, reduction);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({logratio, is_real, saved_optional(sample_weight), group_scale});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["beta"] = beta;
    ctx->saved_data["reduction"] = reduction;
    return {out, group_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_op<BwdSignature>("ddo_fast::ddo_loss_bwd");
    at::Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      const variable_list s = ctx->get_saved_variables();
      grad = bwd.call(grads[0], s[0], s[1], restored_optional(s[2]), s[3],
                      ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(),
                      ctx->saved_data["reduction"].toInt());
    }
    return first_input_grad(grad, 6);
  }
};

std::tuple<at::Tensor, at::Tensor> ddo_loss_fwd_autograd(
    const at::Tensor& logratio, const at::Tensor& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, int64_t reduction) {
  const variable_list out =
      DdoLossFunction::apply(logratio, is_real, sample_weight, alpha, beta, reduction);
  return {out[0], out[1].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("ddo_loss_fwd", &ddo_loss_fwd_cpu);
  m.impl("ddo_loss_bwd", &ddo_loss_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddo_fast, AutogradCPU, m) {
  m.impl("ddo_loss_fwd", &ddo_loss_fwd_autograd);
}

}  // namespace ddo_fast
