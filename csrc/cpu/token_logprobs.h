// Row kernels shared by the token log-prob and autoregressive DDO operators (CPU).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ddo_fast {

// Checks logits [B, L, V] (floating) and targets [B, L] (integer), and that every target is in
// [0, V) or equals ignore_index (IndexError naming the value otherwise). Returns the logits with
// unit stride over V and the targets as contiguous int64.
std::tuple<at::Tensor, at::Tensor> prepare_token_inputs(const at::Tensor& logits,
                                                        const at::Tensor& targets,
                                                        int64_t ignore_index);

// (log_softmax(logits)[targets] [B, L] fp32, logsumexp [B, L] fp32); ignored tokens give 0.
std::tuple<at::Tensor, at::Tensor> token_rows_forward(const at::Tensor& logits,
                                                      const at::Tensor& targets,
                                                      int64_t ignore_index);

// d logits[b, l, :] = coef * (onehot(target) - softmax(logits[b, l, :])), recomputing softmax
// from the saved logsumexp; coef is per token ([B, L]) or per sequence ([B]); ignored tokens get
// zero. Result is contiguous, in the dtype of logits.
at::Tensor token_rows_backward(const at::Tensor& coef, const at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& lse,
                               int64_t ignore_index);

}  // namespace ddo_fast
