// C++ autograd of the CPU kernels (dispatch key AutogradCPU), shared pieces.
//
// Why C++: the autograd torch.library.register_autograd builds from ddo_fast/ops/*.py runs one
// Python autograd.Function per call; on CPU that hop cost 27-60 us per fused forward+backward
// here (AMD EPYC, torch 2.13; diffusion 168-171 -> 111-124 us at a tiny size, A/B in one
// session), 4-8 % of a [64, 4, 64, 64] diffusion call. A
// kernel registered for AutogradCPU takes precedence over that alias-key (Autograd) registration
// for CPU tensors only: CUDA tensors keep the Python autograd (their Triton kernels are launched
// from Python anyway). Each op's Function saves the same tensors and calls its `_bwd` operator
// with the same arguments as its Python setup_context/backward (ddo_fast/ops/<stem>.py), and
// the tests check both against the float64 oracle.
//
// Outputs without a gradient (group_scale, stats) are returned detached by each op's autograd
// kernel rather than marked with ctx->mark_non_differentiable: torch's compiled autograd
// (torch._dynamo compiled_autograd) asserts that a C++ Function marked none (torch 2.13,
// custom_function.h), and a detached output is equally not differentiable.
//
// Forward-mode AD (jvp) is not defined: C++ Functions refuse it with an error (the Python
// autograd on CUDA has no jvp either).
//
// Each Function's forward redispatches below autograd (AutoDispatchBelowADInplaceOrView; without
// it the call would land in this kernel again) through the dispatcher, so profilers, fake tensors
// and torch.compile see the ddo_fast::<stem>_fwd/_bwd operators as before.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <optional>
#include <utility>

namespace ddo_fast {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of operator `name` (the schemas are defined from Python before this
// library loads; callers keep the handle in a function-local static).
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Optional tensors are saved as undefined tensors and restored as nullopt.
inline at::Tensor saved_optional(const std::optional<at::Tensor>& t) {
  return t.value_or(at::Tensor());
}
inline std::optional<at::Tensor> restored_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The scalars of a fused log-ratio + loss-head op (diffusion_ddo, ar_ddo) that its backward
// passes on, and whether the forward computed a loss (is_real given).
inline void save_fused_params(AutogradContext* ctx, bool with_loss, double alpha, double beta,
                              int64_t reduction) {
  ctx->saved_data["with_loss"] = with_loss;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["beta"] = beta;
  ctx->saved_data["reduction"] = reduction;
}

// The upstream gradients (d out, d logratio) a fused op's backward passes to its `_bwd`
// operator, or nullopt when there is nothing to compute (the first input needs no gradient, or
// neither output got one). Without a loss `out` is empty: only logratio carries a gradient.
using FusedUpstream = std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>>;
inline std::optional<FusedUpstream> fused_upstream(AutogradContext* ctx,
                                                   const variable_list& grads) {
  if (!ctx->needs_input_grad(0) || (!grads[0].defined() && !grads[1].defined())) {
    return std::nullopt;
  }
  auto grad_out = ctx->saved_data["with_loss"].toBool() ? restored_optional(grads[0])
                                                        : std::nullopt;
  return FusedUpstream{std::move(grad_out), restored_optional(grads[1])};
}

// Calls a fused op's backward operator: the upstream gradients, the tensors in the order both
// fused Functions save them (the `_bwd` schema's: four op-specific tensors, is_real,
// sample_weight, group_scale), then alpha, beta, the op's own scalars `extra` and reduction.
template <class Signature, class... Extra>
at::Tensor call_fused_backward(const c10::TypedOperatorHandle<Signature>& bwd,
                               AutogradContext* ctx, const FusedUpstream& upstream,
                               Extra... extra) {
  const variable_list s = ctx->get_saved_variables();
  return bwd.call(upstream.first, upstream.second, s[0], s[1], s[2], s[3],
                  restored_optional(s[4]), restored_optional(s[5]), s[6],
                  ctx->saved_data["alpha"].toDouble(), ctx->saved_data["beta"].toDouble(),
                  extra..., ctx->saved_data["reduction"].toInt());
}

// The backward's result: `grad` for the first forward argument, none for the other n - 1
// (C++ Functions return one entry per forward argument, tensors or not).
inline variable_list first_input_grad(at::Tensor grad, size_t n) {
  variable_list out(n);
  out[0] = std::move(grad);
  return out;
}

}  // namespace ddo_fast
