// CPU implementation of the `ddo_loss` operator: the loss head (loss_head.h) on a given r [B].
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("ddo_loss_fwd", &ddo_loss_fwd_cpu);
  m.impl("ddo_loss_bwd", &ddo_loss_bwd_cpu);
}

}  // namespace ddo_fast
