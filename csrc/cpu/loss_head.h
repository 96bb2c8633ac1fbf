// The DDO loss head on per-sample log-ratios, shared by every CPU operator.
//   real sample:  l_b = -w_b * logsigmoid(beta * r_b)
//   fake sample:  l_b = -alpha * w_b * logsigmoid(-beta * r_b)
//   dl_b/dr_b  =  -w_b * beta * sigmoid(-beta r_b)   (real)
//                  alpha * w_b * beta * sigmoid(beta r_b)   (fake)
// reduction: 0 none (l [B]), 1 mean (sum_real l / n_real + sum_fake l / n_fake), 2 sum.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ddo_fast {

// Returns (out, norm): out is l [B] (none) or a 0-d fp32 loss; norm [2] holds the scale each
// group's losses get in the reduction (1/n_group for mean, 1 otherwise).
std::tuple<at::Tensor, at::Tensor> loss_head_forward(const at::Tensor& logratio,
                                                     const at::Tensor& is_real,
                                                     const std::optional<at::Tensor>& sample_weight,
                                                     double alpha, double beta, int64_t reduction);

// Per-sample upstream coefficient k_b = d(total)/d r_b, from the gradient of `out` (if any) and
// the gradient of `logratio` itself (if any). Returns [B] fp32.
at::Tensor loss_head_coef(const std::optional<at::Tensor>& grad_out,
                          const std::optional<at::Tensor>& grad_logratio,
                          const at::Tensor& logratio, const std::optional<at::Tensor>& is_real,
                          const std::optional<at::Tensor>& sample_weight, const at::Tensor& norm,
                          double alpha, double beta, int64_t reduction);

// Argument checks shared by the operators (clear messages naming the argument).
void check_batch_vector(const at::Tensor& t, int64_t batch, const char* name);
void check_is_real(const at::Tensor& is_real, int64_t batch);
void check_reduction(int64_t reduction);

}  // namespace ddo_fast
