// CPU kernels of the fused diffusion DDO loss.
//   forward : one pass over pred, pred_ref, target:
//             r_b = -weight_b * sum_d [(pred - target)^2 - (pred_ref - target)^2], then the loss head.
//   backward: one pass over pred, target: d pred = -2 * weight_b * k_b * (pred - target), where
//             k_b = d(total)/d r_b comes from the loss head (loss_head_coef).
// Work is split into (sample, chunk) items so both "few large samples" and "many small samples"
// keep every thread busy; chunk sums are fp32 vector lanes, combined across chunks in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "loss_head.h"
#include "large_alloc.h"
#include "vec_math.h"

namespace ddo_fast {
namespace {

constexpr int64_t kChunk = 1 << 14;

// View as [B, D] with unit inner stride (copies only when the layout cannot be viewed so).
at::Tensor as_rows(const at::Tensor& t, int64_t batch, at::ScalarType dtype) {
  at::Tensor x = t.scalar_type() == dtype ? t : t.to(dtype);
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

template <typename T>
float chunk_sum(const T* p, const T* q, const T* t, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float tv = static_cast<float>(t[i]);
    const float dp = static_cast<float>(p[i]) - tv;
    const float dq = static_cast<float>(q[i]) - tv;
    acc += dp * dp - dq * dq;
  }
  return acc;
}

template <typename T>
void chunk_grad(const T* p, const T* t, T* g, float coef, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = static_cast<T>(coef * (static_cast<float>(p[i]) - static_cast<float>(t[i])));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> diffusion_ddo_fwd_cpu(
    const at::Tensor& pred, const at::Tensor& pred_ref, const at::Tensor& target,
    const at::Tensor& weight, const std::optional<at::Tensor>& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, int64_t reduction) {
  check_inputs(pred, pred_ref, target, weight);
  check_reduction(reduction);
  const int64_t batch = pred.size(0);
  const at::ScalarType dtype = pred.scalar_type();
  const at::Tensor p = as_rows(pred, batch, dtype);
  const at::Tensor q = as_rows(pred_ref, batch, dtype);
  const at::Tensor t = as_rows(target, batch, dtype);
  const int64_t dim = p.size(1);
  const int64_t chunks = std::max<int64_t>(1, (dim + kChunk - 1) / kChunk);

  std::vector<double> partial(batch * chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffusion_ddo_fwd", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
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

  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor logratio = at::empty({batch}, pred.options().dtype(at::kFloat));
  const float* wp = w.const_data_ptr<float>();
  float* rp = logratio.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];
    rp[b] = static_cast<float>(-static_cast<double>(wp[b]) * s);
  }
  if (!is_real.has_value()) {
    return {at::empty({0}, logratio.options()), logratio, at::ones({2}, logratio.options())};
  }
  auto [out, norm] = loss_head_forward(logratio, *is_real, sample_weight, alpha, beta, reduction);
  return {out, logratio, norm};
}

at::Tensor diffusion_ddo_bwd_cpu(const std::optional<at::Tensor>& grad_out,
                                 const std::optional<at::Tensor>& grad_logratio,
                                 const at::Tensor& pred, const at::Tensor& target,
                                 const at::Tensor& weight, const at::Tensor& logratio,
                                 const std::optional<at::Tensor>& is_real,
                                 const std::optional<at::Tensor>& sample_weight,
                                 const at::Tensor& norm, double alpha, double beta,
                                 int64_t reduction) {
  const int64_t batch = pred.size(0);
  const at::ScalarType dtype = pred.scalar_type();
  const at::Tensor k = loss_head_coef(grad_out, grad_logratio, logratio, is_real, sample_weight,
                                      norm, alpha, beta, reduction);
  const at::Tensor coef = (k * weight.to(at::kFloat) * -2.0).contiguous();
  const at::Tensor p = as_rows(pred, batch, dtype);
  const at::Tensor t = as_rows(target, batch, dtype);
  const int64_t dim = p.size(1);
  const int64_t chunks = std::max<int64_t>(1, (dim + kChunk - 1) / kChunk);
  at::Tensor grad = empty_large({batch, dim}, pred.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "diffusion_ddo_bwd", [&] {
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const float* cp = coef.const_data_ptr<float>();
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
