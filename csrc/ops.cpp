// Every ddo_fast operator schema, declared once. Implementations register per dispatch key:
// CPU in csrc/cpu/*.cpp (C++), CUDA from Python (Triton, kernels/*.py), Meta/autograd from
// ddo_fast/ops/*.py. `reduction` is 0 = none, 1 = mean (per group), 2 = sum.
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
  // Loss head on per-sample log-ratios r [B]: returns (out, norm) where out is the reduced loss
  // (scalar) or the per-sample loss [B], and norm [2] the per-group scale used by the reduction.
  m.def(
      "ddo_loss_fwd(Tensor logratio, Tensor is_real, Tensor? sample_weight, float alpha, "
      "float beta, int reduction) -> (Tensor, Tensor)");
  m.def(
      "ddo_loss_bwd(Tensor grad_out, Tensor logratio, Tensor is_real, Tensor? sample_weight, "
      "Tensor norm, float alpha, float beta, int reduction) -> Tensor");

  // Diffusion: r_b = -weight_b * sum_d[(pred-target)^2 - (pred_ref-target)^2]. With is_real
  // absent only r is computed (out is empty). Returns (out, logratio [B] fp32, norm [2]).
  m.def(
      "diffusion_ddo_fwd(Tensor pred, Tensor pred_ref, Tensor target, Tensor weight, "
      "Tensor? is_real, Tensor? sample_weight, float alpha, float beta, int reduction) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "diffusion_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor pred, Tensor target, "
      "Tensor weight, Tensor logratio, Tensor? is_real, Tensor? sample_weight, Tensor norm, "
      "float alpha, float beta, int reduction) -> Tensor");

  // Token log-probs: (log_softmax(logits)[targets] [B, L] fp32, logsumexp [B, L] fp32).
  m.def(
      "token_logprobs_fwd(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "token_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse, "
      "int ignore_index) -> Tensor");

  // Autoregressive: r_b = sum_l logp[b, l] - ref_logprob_b. With is_real absent only r is
  // computed. Returns (out, logratio [B] fp32, norm [2], logsumexp [B, L] fp32).
  m.def(
      "ar_ddo_fwd(Tensor logits, Tensor targets, Tensor? ref_logprob, Tensor? is_real, "
      "Tensor? sample_weight, float alpha, float beta, int ignore_index, int reduction) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ar_ddo_bwd(Tensor? grad_out, Tensor? grad_logratio, Tensor logits, Tensor targets, "
      "Tensor lse, Tensor logratio, Tensor? is_real, Tensor? sample_weight, Tensor norm, "
      "float alpha, float beta, int ignore_index, int reduction) -> Tensor");
}
