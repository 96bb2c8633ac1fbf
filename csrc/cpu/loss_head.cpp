// CPU implementation of the loss head (see loss_head.h). Per-sample vectors are read in double
// (exact for every float dtype) and the math runs in double; only l and k are stored in fp32.
#include "loss_head.h"

#include <algorithm>
#include <cmath>

namespace ddo_fast {

namespace {

// log(sigmoid(z)) without overflow: min(z, 0) - log1p(exp(-|z|)).
inline double log_sigmoid(double z) { return std::min(z, 0.0) - std::log1p(std::exp(-std::abs(z))); }

inline double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

// The weight c_b of a term: w_b for a real sample, alpha * w_b for a fake one.
inline double term_weight(bool real, double w, double alpha) { return real ? w : alpha * w; }

// A zero-weight term is exactly 0 (its logsigmoid may be -inf: 0 * inf would be NaN), unless r
// itself is NaN.
inline double zero_term(double r) { return std::isnan(r) ? r : 0.0; }

inline double term_loss(double r, bool real, double w, double alpha, double beta) {
  const double c = term_weight(real, w, alpha);
  if (c == 0.0) return zero_term(r);
  const double z = beta * r;
  return -c * log_sigmoid(real ? z : -z);
}

inline double term_dloss_dr(double r, bool real, double w, double alpha, double beta) {
  const double c = term_weight(real, w, alpha);
  if (c == 0.0) return zero_term(r);
  const double z = beta * r;
  return real ? -c * beta * sigmoid(-z) : c * beta * sigmoid(z);
}

// A [B] vector in double, contiguous (exact for every floating dtype); undefined if absent.
at::Tensor as_double_vector(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kDouble).contiguous() : at::Tensor();
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

std::tuple<at::Tensor, at::Tensor> loss_head_forward(
    const at::Tensor& logratio, const at::Tensor& is_real,
    const std::optional<at::Tensor>& sample_weight, double alpha, double beta, Reduction reduction) {
  const int64_t batch = logratio.size(0);
  check_is_real(is_real, batch);
  if (sample_weight.has_value()) check_batch_vector(*sample_weight, batch, "sample_weight");

  const at::Tensor r = as_double_vector(logratio);
  const at::Tensor real = is_real.contiguous();
  const at::Tensor sw = as_double_vector(sample_weight);
  const double* r_ptr = r.const_data_ptr<double>();
  const bool* real_ptr = real.const_data_ptr<bool>();
  const double* sw_ptr = sw.defined() ? sw.const_data_ptr<double>() : nullptr;

  const auto f32 = logratio.options().dtype(at::kFloat);
  at::Tensor per_sample = at::empty({batch}, f32);
  float* l_ptr = per_sample.data_ptr<float>();
  double sum_real = 0.0, sum_fake = 0.0;
  int64_t n_real = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const double l = term_loss(r_ptr[b], real_ptr[b], sw_ptr ? sw_ptr[b] : 1.0, alpha, beta);
    l_ptr[b] = static_cast<float>(l);
    if (real_ptr[b]) {
      sum_real += l;
      ++n_real;
    } else {
      sum_fake += l;
    }
  }
  const int64_t n_fake = batch - n_real;
  at::Tensor group_scale = at::ones({2}, f32);
  float* scale = group_scale.data_ptr<float>();
  if (reduction == Reduction::kMean) {
    scale[0] = static_cast<float>(1.0 / static_cast<double>(std::max<int64_t>(n_real, 1)));
    scale[1] = static_cast<float>(1.0 / static_cast<double>(std::max<int64_t>(n_fake, 1)));
  }
  if (reduction == Reduction::kNone) return {per_sample, group_scale};
  const double total = sum_real * scale[0] + sum_fake * scale[1];
  return {at::scalar_tensor(total, f32), group_scale};
}

at::Tensor loss_head_coef(const std::optional<at::Tensor>& grad_out,
                          const std::optional<at::Tensor>& grad_logratio,
                          const at::Tensor& logratio, const std::optional<at::Tensor>& is_real,
                          const std::optional<at::Tensor>& sample_weight,
                          const at::Tensor& group_scale, double alpha, double beta,
                          Reduction reduction) {
  const int64_t batch = logratio.size(0);
  const auto f32 = logratio.options().dtype(at::kFloat);
  at::Tensor coef = at::empty({batch}, f32);
  float* c_ptr = coef.data_ptr<float>();
  const at::Tensor gr = as_double_vector(grad_logratio);
  const double* gr_ptr = gr.defined() ? gr.const_data_ptr<double>() : nullptr;
  const bool with_loss = grad_out.has_value() && is_real.has_value();
  if (!with_loss) {
    for (int64_t b = 0; b < batch; ++b) c_ptr[b] = gr_ptr ? static_cast<float>(gr_ptr[b]) : 0.0f;
    return coef;
  }
  const at::Tensor r = as_double_vector(logratio);
  const at::Tensor real = is_real->contiguous();
  const at::Tensor sw = as_double_vector(sample_weight);
  const at::Tensor g = grad_out->to(at::kDouble).contiguous();
  const at::Tensor gs = group_scale.to(at::kDouble).contiguous();
  const double* r_ptr = r.const_data_ptr<double>();
  const bool* real_ptr = real.const_data_ptr<bool>();
  const double* sw_ptr = sw.defined() ? sw.const_data_ptr<double>() : nullptr;
  const double* g_ptr = g.const_data_ptr<double>();
  const double* gs_ptr = gs.const_data_ptr<double>();
  const bool per_sample_grad = reduction == Reduction::kNone;
  for (int64_t b = 0; b < batch; ++b) {
    const double upstream = per_sample_grad ? g_ptr[b] : g_ptr[0];
    const double dl_dr =
        term_dloss_dr(r_ptr[b], real_ptr[b], sw_ptr ? sw_ptr[b] : 1.0, alpha, beta);
    const double k = upstream * gs_ptr[real_ptr[b] ? 0 : 1] * dl_dr;
    c_ptr[b] = static_cast<float>((gr_ptr ? gr_ptr[b] : 0.0) + k);
  }
  return coef;
}

}  // namespace ddo_fast
