// Test-only operators, in their own namespace (`ddo_fast_testing`) so the operator set of
// `ddo_fast` stays exactly the eight public ops: they expose internal helpers to the tests.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "isa/kernels.h"

namespace ddo_fast {
namespace {

// fast_exp applied elementwise to fp32 x, in the same vectorised loop shape the kernels use, by
// the selected ISA's kernels (DDO_FAST_CPU_ISA).
at::Tensor fast_exp_cpu(const at::Tensor& x) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "ddo_fast: `x` must be fp32, got ",
                   x.scalar_type());
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  cpu_kernels().fast_exp(in.const_data_ptr<float>(), out.data_ptr<float>(), in.numel());
  return out;
}

}  // namespace

TORCH_LIBRARY(ddo_fast_testing, m) { m.def("fast_exp(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(ddo_fast_testing, CPU, m) { m.impl("fast_exp", &fast_exp_cpu); }

}  // namespace ddo_fast
