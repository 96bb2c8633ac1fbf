// The DDO loss head on per-sample log-ratios r [B], shared by every CPU operator
// (Zheng et al. 2025, Eq. 13). With c_b = w_b (real) or alpha * w_b (fake), w_b = sample_weight
// or 1:
//   real sample:  l_b = -c_b logsigmoid(beta r_b)     dl_b/dr_b = -c_b beta sigmoid(-beta r_b)
//   fake sample:  l_b = -c_b logsigmoid(-beta r_b)    dl_b/dr_b =  c_b beta sigmoid(beta r_b)
// A term with c_b == 0 contributes exactly 0 to the loss and the gradient, even where beta * r_b
// overflows, unless r_b is NaN (then NaN: NaN always propagates).
// Reductions (reduction.h): none (l [B]), mean (sum_real l / n_real + sum_fake l / n_fake), sum.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "reduction.h"

namespace ddo_fast {

// Returns (out, group_scale): out is l [B] fp32 (none) or a 0-d fp32 loss; group_scale [2] fp32
// holds the scale each group's losses get in the reduction (1/n_real, 1/n_fake for mean, counts
// clamped to >= 1; 1 otherwise). logratio and sample_weight may have any float dtype.
std::tuple<at::Tensor, at::Tensor> loss_head_forward(
    const at::Tensor& logratio, const at::Tensor& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, Reduction reduction);

// Per-sample upstream coefficient k_b = d(total)/d r_b: grad_logratio (if any) plus
// grad_out * group_scale[group] * dl_b/dr_b (if grad_out and is_real are given). Returns [B] fp32.
at::Tensor loss_head_coef(const std::optional<at::Tensor>& grad_out,
                          const std::optional<at::Tensor>& grad_logratio,
                          const at::Tensor& logratio, const std::optional<at::Tensor>& is_real,
                          const std::optional<at::Tensor>& sample_weight,
                          const at::Tensor& group_scale, double alpha, double beta,
                          Reduction reduction);

// Argument checks shared by the operators (clear messages naming the argument).
void check_batch_vector(const at::Tensor& t, int64_t batch, const char* name);
void check_is_real(const at::Tensor& is_real, int64_t batch);

}  // namespace ddo_fast
