// Test-only operators, in their own namespace (`ddo_fast_testing`) so the operator set of
// `ddo_fast` stays exactly the eight public ops: they expose internal helpers to the tests and
// the benchmarks.
//
//   fast_exp(x)                   fast_exp elementwise (vec_math.h), for the accuracy tests.
//   floor_pass(reads, out, exp)   one memory pass of a benchmark floor (ddo_fast/bench/cases.py),
//                                 run by the selected ISA's kernels with the kernels' threading:
//     out = None, exp = False:  read 1..3 fp32 arrays, return sum_i sum_k reads[k]_i (0-d);
//     out = None, exp = True:   read 1 array, return sum_i fast_exp(x_i) (0-d);
//     out given,  exp = False:  out = reads[0] - reads[1] (read 2, write 1), return 0;
//     out given,  exp = True:   out = fast_exp(reads[0]) (read 1, write 1), return 0.
//   The sums are returned so that no pass can be optimised away; `out` is written in place, so
//   the caller chooses touched memory (a reused buffer) or a fresh allocation (page faults).
//   empty_large(sizes)            an fp32 CPU tensor from the kernels' own large-output
//                                 allocator (large_alloc.h, the policy in force), so that a
//                                 benchmark floor writes into the same kind of memory (2 MiB
//                                 aligned, huge-page advised, pooled) as the op's gradient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "isa/kernels.h"
#include "large_alloc.h"

namespace ddo_fast {
namespace {

// Elements per work item: 64 KiB of fp32, the diffusion kernels' chunk.
constexpr int64_t kChunk = 1 << 14;

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

void check_floor_array(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "ddo_fast: `", name, "` must be fp32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous() && t.device().is_cpu(), "ddo_fast: `", name,
                    "` must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(t.numel() == numel, "ddo_fast: `", name, "` must have ", numel,
                    " elements, got ", t.numel());
}

at::Tensor floor_pass_cpu(at::TensorList reads, const std::optional<at::Tensor>& out, bool exp) {
  const int64_t k = static_cast<int64_t>(reads.size());
  const int64_t need_min = exp ? 1 : (out.has_value() ? 2 : 1);
  const int64_t need_max = exp ? 1 : (out.has_value() ? 2 : 3);
  TORCH_CHECK_VALUE(k >= need_min && k <= need_max, "ddo_fast: `reads` must hold ", need_min,
                    "..", need_max, " tensors for this pass, got ", k);
  const int64_t n = reads[0].numel();
  std::vector<const float*> ptrs;
  for (const auto& t : reads) {
    check_floor_array(t, n, "reads");
    ptrs.push_back(t.const_data_ptr<float>());
  }
  const CpuKernels& kern = cpu_kernels();
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  if (out.has_value()) {
    check_floor_array(*out, n, "out");
    float* op = out->data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t s = c * kChunk, len = std::min(kChunk, n - s);
        if (exp) {
          kern.fast_exp(ptrs[0] + s, op + s, len);
        } else {
          kern.sub(ptrs[0] + s, ptrs[1] + s, op + s, len);
        }
      }
    });
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble));
  }
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t s = c * kChunk, len = std::min(kChunk, n - s);
      if (exp) {
        partial[c] = kern.exp_sum(ptrs[0] + s, len);
      } else {
        const float* at[3] = {ptrs[0] + s, k > 1 ? ptrs[1] + s : nullptr,
                              k > 2 ? ptrs[2] + s : nullptr};
        partial[c] = kern.read_sum[k - 1](at, len);
      }
    }
  });
  double total = 0.0;
  for (double v : partial) total += v;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

at::Tensor empty_large_cpu(at::IntArrayRef sizes) {
  for (const int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, "ddo_fast: `sizes` must be non-negative, got ", sizes);
  }
  return empty_large(sizes, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
}

}  // namespace

TORCH_LIBRARY(ddo_fast_testing, m) {
  m.def("fast_exp(Tensor x) -> Tensor");
  m.def("floor_pass(Tensor[] reads, Tensor(a!)? out, bool exp) -> Tensor");
  // No tensor argument to dispatch on: one kernel for every key (it always allocates on CPU).
  m.def("empty_large(int[] sizes) -> Tensor", &empty_large_cpu);
}

TORCH_LIBRARY_IMPL(ddo_fast_testing, CPU, m) {
  m.impl("fast_exp", &fast_exp_cpu);
  m.impl("floor_pass", &floor_pass_cpu);
}

}  // namespace ddo_fast
