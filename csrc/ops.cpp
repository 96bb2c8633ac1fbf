// Every ddo_fast operator schema, declared once. Implementations register per dispatch key:
// CPU in csrc/cpu/*.cpp (C++), CUDA from Python (Triton, kernels/*.py), Meta/autograd from
// ddo_fast/ops/*.py. `reduction` is a Reduction code (csrc/cpu/reduction.h, mirrored by
// ddo_fast._reduction.Reduction). `group_scale` [2] fp32 is the scale each group's per-sample
// losses get in the reduction: (1/n_real, 1/n_fake) for mean, (1, 1) otherwise. Every tensor is
// read in its own dtype; gradients come back in the dtype of the tensor they belong to.
#include <Python.h>
#include <torch/library.h>

// An importable `ddo_fast._C` whose only job is to load this library and run the registrations.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ddo_fast, m) {
  // Loss head on per-sample log-ratios r [B]: returns (out, group_scale) where out is the reduced
  // fp32 loss (scalar) or the per-sample loss [B]. The backward returns d logratio (its dtype).
  m.def(
      "ddo_loss_fwd(Tensor logratio, Tensor is_real, Tensor? sample_weight, float alpha, "
      "float beta, int reduction) -> (Tensor, Tensor)");
  m.def(
      "ddo_loss_bwd(Tensor grad_out, Tensor logratio, Tensor is_real, Tensor? sample_weight, "
      "Tensor group_scale, float alpha, float beta, int reduction) -> Tensor");

  // Diffusion: r_b = -weight_b * sum_d[(pred-target)^2 - (pred_ref-target)^2]. With is_real
  // absent only r is computed (out is empty). Returns (out, logratio [B] fp32, group_scale [2]).
  m.def(
      "diffusion_ddo_fwd(Tensor pred, Tensor pred_ref, Tensor target, Tensor weight, "
      "Tensor? is_real, Tensor? sample_weight, float alpha, float beta, int reduction) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "diffusion_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor pred, Tensor target, "
      "Tensor weight, Tensor logratio, Tensor? is_real, Tensor? sample_weight, "
      "Tensor group_scale, float alpha, float beta, int reduction) -> Tensor");

  // Token log-probs: returns (logp [B, L] fp32, stats [2, B, L] fp32) with stats[0] = m, the row
  // max, stats[1] = log sum_v exp(x_v - m), and logp = (x_t - m) - stats[1]; the backward
  // recomputes softmax = exp((x - m) - stats[1]).
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor stats, "
      "int ignore_index) -> Tensor");

  // Autoregressive: r_b = sum_l logp[b, l] - ref_logprob_b. With is_real absent only r is
  // computed. Returns (out, logratio [B] fp32, group_scale [2], stats [2, B, L] fp32).
  m.def(
      "ar_ddo_fwd(Tensor logits, Tensor targets, Tensor? ref_logprob, Tensor? is_real, "
      "Tensor? sample_weight, float alpha, float beta, int ignore_index, int reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ar_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor logits, Tensor targets, "
      "Tensor stats, Tensor logratio, Tensor? is_real, Tensor? sample_weight, "
      "Tensor group_scale, float alpha, float beta, int ignore_index, int reduction) -> Tensor");
}
