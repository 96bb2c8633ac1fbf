// Row kernels shared by the token log-prob and autoregressive DDO operators (CPU).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ddo_fast {

// Checks logits [B, L, V] (floating) and targets [B, L] (any integer dtype), and that every
// target is in [0, V) or equals ignore_index (IndexError naming the value otherwise). Returns
// the logits with unit stride over V and the targets as contiguous int64.
std::tuple<at::Tensor, at::Tensor> prepare_token_inputs(const at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        int64_t ignore_index);

// (logp [B, L] fp32, stats [2, B, L] fp32): logp = (x_t - m) - log s with m = stats[0] the row
// max and log s = stats[1] = log sum_v exp(x_v - m). Ignored tokens give 0 in all three.
std::tuple<at::Tensor, at::Tensor> token_rows_forward(const at::Tensor& logits,
                                                      const at::Tensor& targets,
                                                      int64_t ignore_index);

// d logits[b, l, :] = coef * (onehot(target) - softmax(logits[b, l, :])), recomputing
// softmax = exp((x - stats[0]) - stats[1]); coef is per token ([B, L]) or per sequence ([B]);
// ignored tokens get zero. Result is contiguous, in the dtype of logits.
at::Tensor token_rows_backward(const at::Tensor& coef, const at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& stats,
                               int64_t ignore_index);

}  // namespace ddo_fast
