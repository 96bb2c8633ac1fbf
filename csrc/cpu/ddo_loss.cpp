// CPU implementation of the loss head (see loss_head.h) and of the `ddo_loss` operator.
#include <torch/library.h>

#include <cmath>

#include "loss_head.h"

namespace ddo_fast {

namespace {

// log(sigmoid(z)) without overflow: min(z, 0) - log1p(exp(-|z|)).
inline double log_sigmoid(double z) { return std::min(z, 0.0) - std::log1p(std::exp(-std::abs(z))); }

inline double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

at::Tensor as_float_vector(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

}  // namespace

void check_batch_vector(const at::Tensor& t, int64_t batch, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, "ddo_fast: `", name, "` must have shape [",
                    batch, "] (one value per sample), got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "ddo_fast: `", name,
                   "` must be a floating-point tensor, got ", t.scalar_type());
}

void check_is_real(const at::Tensor& is_real, int64_t batch) {
  TORCH_CHECK_TYPE(is_real.scalar_type() == at::kBool,
                   "ddo_fast: `is_real` must be a bool tensor, got ", is_real.scalar_type());
  TORCH_CHECK_VALUE(is_real.dim() == 1 && is_real.size(0) == batch,
                    "ddo_fast: `is_real` must have shape [", batch, "], got ", is_real.sizes());
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2,
                    "ddo_fast: reduction code must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

std::tuple<at::Tensor, at::Tensor> loss_head_forward(const at::Tensor& logratio,
                                                     const at::Tensor& is_real,
                                                     const std::optional<at::Tensor>& sample_weight,
                                                     double alpha, double beta, int64_t reduction) {
  check_reduction(reduction);
  const int64_t batch = logratio.size(0);
  check_is_real(is_real, batch);
  if (sample_weight.has_value()) check_batch_vector(*sample_weight, batch, "sample_weight");

  const at::Tensor r = logratio.to(at::kFloat).contiguous();
  const at::Tensor real = is_real.contiguous();
  const at::Tensor sw = as_float_vector(sample_weight);
  const float* r_ptr = r.data_ptr<float>();
  const bool* real_ptr = real.data_ptr<bool>();
  const float* sw_ptr = sw.defined() ? sw.data_ptr<float>() : nullptr;

  at::Tensor per_sample = at::empty({batch}, r.options());
  float* l_ptr = per_sample.data_ptr<float>();
  double sum_real = 0.0, sum_fake = 0.0;
  int64_t n_real = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const double w = sw_ptr ? sw_ptr[b] : 1.0;
    const double z = beta * r_ptr[b];
    if (real_ptr[b]) {
      l_ptr[b] = static_cast<float>(-w * log_sigmoid(z));
      sum_real += l_ptr[b];
      ++n_real;
    } else {
      l_ptr[b] = static_cast<float>(-alpha * w * log_sigmoid(-z));
      sum_fake += l_ptr[b];
    }
  }
  const int64_t n_fake = batch - n_real;
  at::Tensor norm = at::ones({2}, r.options());
  if (reduction == 1) {
    norm[0] = 1.0 / static_cast<double>(std::max<int64_t>(n_real, 1));
    norm[1] = 1.0 / static_cast<double>(std::max<int64_t>(n_fake, 1));
  }
  if (reduction == 0) return {per_sample, norm};
  const float* nrm = norm.data_ptr<float>();
  const double total = sum_real * nrm[0] + sum_fake * nrm[1];
  return {at::scalar_tensor(total, r.options()), norm};
}

at::Tensor loss_head_coef(const std::optional<at::Tensor>& grad_out,
                          const std::optional<at::Tensor>& grad_logratio,
                          const at::Tensor& logratio, const std::optional<at::Tensor>& is_real,
                          const std::optional<at::Tensor>& sample_weight, const at::Tensor& norm,
                          double alpha, double beta, int64_t reduction) {
  const int64_t batch = logratio.size(0);
  at::Tensor coef = grad_logratio.has_value() ? grad_logratio->to(at::kFloat).contiguous().clone()
                                              : at::zeros({batch}, logratio.options().dtype(at::kFloat));
  if (!grad_out.has_value() || !is_real.has_value()) return coef;

  const at::Tensor r = logratio.to(at::kFloat).contiguous();
  const at::Tensor real = is_real->contiguous();
  const at::Tensor sw = as_float_vector(sample_weight);
  const at::Tensor g = grad_out->to(at::kFloat).contiguous();
  const at::Tensor nrm = norm.to(at::kFloat).contiguous();
  const float* r_ptr = r.data_ptr<float>();
  const bool* real_ptr = real.data_ptr<bool>();
  const float* sw_ptr = sw.defined() ? sw.data_ptr<float>() : nullptr;
  const float* g_ptr = g.data_ptr<float>();
  const float* n_ptr = nrm.data_ptr<float>();
  float* c_ptr = coef.data_ptr<float>();
  const bool per_sample_grad = reduction == 0;
  for (int64_t b = 0; b < batch; ++b) {
    const double w = sw_ptr ? sw_ptr[b] : 1.0;
    const double z = beta * r_ptr[b];
    const double upstream = per_sample_grad ? g_ptr[b] : g_ptr[0];
    const double dl_dr = real_ptr[b] ? -w * beta * sigmoid(-z) : alpha * w * beta * sigmoid(z);
    c_ptr[b] += static_cast<float>(upstream * n_ptr[real_ptr[b] ? 0 : 1] * dl_dr);
  }
  return coef;
}

namespace {

std::tuple<at::Tensor, at::Tensor> ddo_loss_fwd_cpu(const at::Tensor& logratio,
                                                    const at::Tensor& is_real,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    double alpha, double beta, int64_t reduction) {
  TORCH_CHECK_VALUE(logratio.dim() == 1, "ddo_fast: `logratio` must have shape [B], got ",
                    logratio.sizes());
  return loss_head_forward(logratio, is_real, sample_weight, alpha, beta, reduction);
}

at::Tensor ddo_loss_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& logratio,
                            const at::Tensor& is_real,
                            const std::optional<at::Tensor>& sample_weight, const at::Tensor& norm,
                            double alpha, double beta, int64_t reduction) {
  return loss_head_coef(grad_out, std::nullopt, logratio, is_real, sample_weight, norm, alpha, beta,
                        reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddo_fast, CPU, m) {
  m.impl("ddo_loss_fwd", &ddo_loss_fwd_cpu);
  m.impl("ddo_loss_bwd", &ddo_loss_bwd_cpu);
}

}  // namespace ddo_fast
