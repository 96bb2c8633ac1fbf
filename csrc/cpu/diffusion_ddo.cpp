// CPU kernels of the fused diffusion DDO loss.
//   forward : one pass over pred, pred_ref, target:
//             r_b = -weight_b * sum_d [(pred - target)^2 - (pred_ref - target)^2], then the loss head.
//   backward: one pass over pred, target: d pred = -2 * weight_b * k_b * (pred - target), where
//             k_b = d(total)/d r_b comes from the loss head (loss_head_coef).
// Each tensor is read in its own dtype and upcast per element (a bf16 pred_ref next to an fp32
// target keeps every digit of both); the math is fp32, or double when any input is double.
// Work is split into (sample, chunk) items so both "few large samples" and "many small samples"
// keep every thread busy; chunk sums are vector lanes, combined across chunks in double.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "autograd.h"
#include "isa/dtype_index.h"
#include "isa/kernels.h"
#include "large_alloc.h"
#include "loss_head.h"

namespace ddo_fast {
namespace {

constexpr int64_t kChunk = 1 << 14;

// View as [B, D] with unit inner stride (copies only when the layout cannot be viewed so); the
// dtype is kept.
at::Tensor as_rows(const at::Tensor& t, int64_t batch) {
  at::Tensor x = t;
  int64_t dim = 1;
  for (int64_t d = 1; d < x.dim(); ++d) dim *= x.size(d);
  x = x.reshape({batch, dim});
  if (x.size(1) > 1 && x.stride(1) != 1) x = x.contiguous();
  return x;
}

void check_inputs(const at::Tensor& pred, const at::Tensor& pred_ref, const at::Tensor& target,
                  const at::Tensor& weight) {
  for (const auto& [t, name] : {std::pair{pred, "pred"}, {pred_ref, "pred_ref"}, {target, "target"}}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "ddo_fast: `", name,
                     "` must be a floating-point tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == pred.sizes(), "ddo_fast: `", name,
                      "` must have the shape of `pred` ", pred.sizes(), ", got ", t.sizes());
  }
  TORCH_CHECK_VALUE(pred.dim() >= 1, "ddo_fast: `pred` must have a batch dimension, got a scalar");
  check_batch_vector(weight, pred.size(0), "weight");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_ddo_fwd_cpu(
    const at::Tensor& pred, const at::Tensor& pred_ref, const at::Tensor& target,
    const at::Tensor& weight, const std::optional<at::Tensor>& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, int64_t reduction) {
  check_inputs(pred, pred_ref, target, weight);
  const Reduction red = to_reduction(reduction);
  const int64_t batch = pred.size(0);
  const at::Tensor p = as_rows(pred, batch);
  const at::Tensor q = as_rows(pred_ref, batch);
  const at::Tensor t = as_rows(target, batch);
  const int64_t dim = p.size(1);
  const int64_t chunks = std::max<int64_t>(1, (dim + kChunk - 1) / kChunk);

  std::vector<double> partial(batch * chunks, 0.0);
  const SquaredErrorGapFn gap =
      cpu_kernels().squared_error_gap[dtype_index(p.scalar_type(), "pred")]
                                     [dtype_index(q.scalar_type(), "pred_ref")]
                                     [dtype_index(t.scalar_type(), "target")];
  const auto* pp = static_cast<const char*>(p.const_data_ptr());
  const auto* qp = static_cast<const char*>(q.const_data_ptr());
  const auto* tp = static_cast<const char*>(t.const_data_ptr());
  // Byte strides: the kernel reads each tensor in its own dtype.
  const int64_t ps = p.stride(0) * p.element_size(), qs = q.stride(0) * q.element_size(),
                ts = t.stride(0) * t.element_size();
  const int64_t pe = p.element_size(), qe = q.element_size(), te = t.element_size();
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, start = (i % chunks) * kChunk;
      const int64_t n = std::min(kChunk, dim - start);
      if (n <= 0) continue;
      partial[i] = gap(pp + b * ps + start * pe, qp + b * qs + start * qe,
                       tp + b * ts + start * te, n);
    }
  });

  const at::Tensor w = weight.to(at::kDouble).contiguous();  // exact for every float dtype
  at::Tensor logratio = at::empty({batch}, pred.options().dtype(at::kFloat));
  const double* wp = w.const_data_ptr<double>();
  float* rp = logratio.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    rp[b] = static_cast<float>(-wp[b] * s);
  }
  if (!is_real.has_value()) {
    return {at::empty({0}, logratio.options()), logratio, at::ones({2}, logratio.options())};
  }
  auto [out, group_scale] = loss_head_forward(logratio, *is_real, sample_weight, alpha, beta, red);
  return {out, logratio, group_scale};
}

at::Tensor diffusion_ddo_bwd_cpu(const std::optional<at::Tensor>& grad_out,
                                 const std::optional<at::Tensor>& grad_logratio,
                                 const at::Tensor& pred, const at::Tensor& target,
                                 const at::Tensor& weight, const at::Tensor& logratio,
                                 const std::optional<at::Tensor>& is_real,
                                 const std::optional<at::Tensor>& sample_weight,
                                 const at::Tensor& group_scale, double alpha, double beta,
                                 int64_t reduction) {
  const int64_t batch = pred.size(0);
  const at::Tensor k = loss_head_coef(grad_out, grad_logratio, logratio, is_real, sample_weight,
                                      group_scale, alpha, beta, to_reduction(reduction));
  // d pred = coef_b * (pred - target), coef_b = -2 weight_b k_b (weight read exactly, in double).
  const at::Tensor coef = (k.to(at::kDouble) * weight.to(at::kDouble) * -2.0).contiguous();
  const at::Tensor p = as_rows(pred, batch);
  const at::Tensor t = as_rows(target, batch);
  const int64_t dim = p.size(1);
  const int64_t chunks = std::max<int64_t>(1, (dim + kChunk - 1) / kChunk);
  at::Tensor grad = empty_large({batch, dim}, pred.options());

  const ScaledErrorFn err = cpu_kernels().scaled_error[dtype_index(p.scalar_type(), "pred")]
                                                     [dtype_index(t.scalar_type(), "target")];
  const auto* pp = static_cast<const char*>(p.const_data_ptr());
  const auto* tp = static_cast<const char*>(t.const_data_ptr());
  auto* gp = static_cast<char*>(grad.data_ptr());
  const int64_t pe = p.element_size(), te = t.element_size();
  const int64_t ps = p.stride(0) * pe, ts = t.stride(0) * te;
  const double* cp = coef.const_data_ptr<double>();
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, start = (i % chunks) * kChunk;
      const int64_t n = std::min(kChunk, dim - start);
      if (n <= 0) continue;
      err(pp + b * ps + start * pe, tp + b * ts + start * te, gp + (b * dim + start) * pe, cp[b],
          n);
    }
  });
  return grad.view(pred.sizes());
}

// Autograd for CPU tensors (autograd.h): the Python setup_context/backward of
// ddo_fast/ops/diffusion_ddo.py in C++. Only `pred` gets a gradient; group_scale is returned
// detached (not differentiable, see autograd.h); grads are not materialised (an unused output
// costs nothing).
using FwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double, int64_t);
using BwdSignature = at::Tensor(const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&,
                                const std::optional<at::Tensor>&, const at::Tensor&, double,
                                double, int64_t);

struct DiffusionDdoFunction : public torch::autograd::Function<DiffusionDdoFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred,
                               const at::Tensor& pred_ref, const at::Tensor& target,
                               const at::Tensor& weight, const std::optional<at::Tensor>& is_real,
                               const std::optional<at::Tensor>& sample_weight, double alpha,
                               double beta, int64_t reduction) {
    static const auto fwd = typed_op<FwdSignature>("ddo_fast::diffusion_ddo_fwd");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, logratio, group_scale] =
        fwd.call(pred, pred_ref, target, weight, is_real, sample_weight, alpha, beta, reduction);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({pred, target, weight, logratio, saved_optional(is_real),
                            saved_optional(sample_weight), group_scale});
    save_fused_params(ctx, is_real.has_value(), alpha, beta, reduction);
    return {out, logratio, group_scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = typed_op<BwdSignature>("ddo_fast::diffusion_ddo_bwd");
    at::Tensor grad;
    if (const auto upstream = fused_upstream(ctx, grads)) {
      grad = call_fused_backward(bwd, ctx, *upstream);
    }
    return first_input_grad(grad, 9);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_ddo_fwd_autograd(
    const at::Tensor& pred, const at::Tensor& pred_ref, const at::Tensor& target,
    const at::Tensor& weight, const std::optional<at::Tensor>& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, int64_t reduction) {
  const variable_list out = DiffusionDdoFunction::apply(pred, pred_ref, target, weight, is_real,
                                                        sample_weight, alpha, beta, reduction);
  return {out[0], out[1], out[2].detach()};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("diffusion_ddo_fwd", &diffusion_ddo_fwd_cpu);
  m.impl("diffusion_ddo_bwd", &diffusion_ddo_bwd_cpu);
}

TORCH_LIBRARY_IMPL(ddo_fast, AutogradCPU, m) {
  m.impl("diffusion_ddo_fwd", &diffusion_ddo_fwd_autograd);
}

}  // namespace ddo_fast
