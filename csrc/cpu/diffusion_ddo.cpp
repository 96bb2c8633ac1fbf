// CPU kernels of the fused diffusion DDO loss.
//   forward : one pass over pred, pred_ref, target:
//             r_b = -weight_b * sum_d [(pred - target)^2 - (pred_ref - target)^2], then the loss head.
//   backward: one pass over pred, target: d pred = -2 * weight_b * k_b * (pred - target), where
//             k_b = d(total)/d r_b comes from the loss head (loss_head_coef).
// Each tensor is read in its own dtype and upcast per element (a bf16 pred_ref next to an fp32
// target keeps every digit of both); the math is fp32, or double when any input is double.
// Work is split into (sample, chunk) items so both "few large samples" and "many small samples"
// keep every thread busy; chunk sums are vector lanes, combined across chunks in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "loss_head.h"
#include "large_alloc.h"
#include "vec_math.h"

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

// The arithmetic type for a set of input element types: float, or double if any input is double.
template <typename... Ts>
using math_t = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

// Calls f(A{}, B{}) with the element types of two tensors (float, double, half, bf16).
template <typename F>
void dispatch2(at::ScalarType a, at::ScalarType b, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a, "diffusion_ddo", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b, "diffusion_ddo",
                                    [&] { f(A{}, scalar_t{}); });
  });
}

// Calls f(A{}, B{}, C{}) with the element types of three tensors.
template <typename F>
void dispatch3(at::ScalarType a, at::ScalarType b, at::ScalarType c, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a, "diffusion_ddo", [&] {
    using A = scalar_t;
    dispatch2(b, c, [&](auto b_tag, auto c_tag) { f(A{}, b_tag, c_tag); });
  });
}

template <typename P, typename Q, typename T>
double chunk_sum(const P* p, const Q* q, const T* t, int64_t n) {
  using M = math_t<P, Q, T>;
  M acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const M tv = static_cast<M>(t[i]);
    const M dp = static_cast<M>(p[i]) - tv;
    const M dq = static_cast<M>(q[i]) - tv;
    // (dp - dq)(dp + dq), not dp^2 - dq^2: exactly 0 where pred == pred_ref (theta = ref gives
    // r = 0 to the bit, whatever FMA contraction the compiler picks), and no cancellation.
    acc += (dp - dq) * (dp + dq);
  }
  return static_cast<double>(acc);
}

template <typename P, typename T>
void chunk_grad(const P* p, const T* t, P* g, double coef, int64_t n) {
  using M = math_t<P, T>;
  const M k = static_cast<M>(coef);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<P>(k * (static_cast<M>(p[i]) - static_cast<M>(t[i])));
  }
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
  dispatch3(p.scalar_type(), q.scalar_type(), t.scalar_type(),
            [&](auto p_tag, auto q_tag, auto t_tag) {
    const auto* pp = p.const_data_ptr<decltype(p_tag)>();
    const auto* qp = q.const_data_ptr<decltype(q_tag)>();
    const auto* tp = t.const_data_ptr<decltype(t_tag)>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / chunks, start = (i % chunks) * kChunk;
        const int64_t n = std::min(kChunk, dim - start);
        if (n <= 0) continue;
        partial[i] = chunk_sum(pp + b * p.stride(0) + start, qp + b * q.stride(0) + start,
                               tp + b * t.stride(0) + start, n);
      }
    });
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

  dispatch2(p.scalar_type(), t.scalar_type(), [&](auto p_tag, auto t_tag) {
    using P = decltype(p_tag);
    const P* pp = p.const_data_ptr<P>();
    const auto* tp = t.const_data_ptr<decltype(t_tag)>();
    P* gp = grad.data_ptr<P>();
    const double* cp = coef.const_data_ptr<double>();
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / chunks, start = (i % chunks) * kChunk;
        const int64_t n = std::min(kChunk, dim - start);
        if (n <= 0) continue;
        chunk_grad(pp + b * p.stride(0) + start, tp + b * t.stride(0) + start,
                   gp + b * dim + start, cp[b], n);
      }
    });
  });
  return grad.view(pred.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("diffusion_ddo_fwd", &diffusion_ddo_fwd_cpu);
  m.impl("diffusion_ddo_bwd", &diffusion_ddo_bwd_cpu);
}

}  // namespace ddo_fast
