// Output buffers for the CPU kernels' large results (gradients the size of the inputs).
//
// A fresh multi-megabyte allocation is mmap'ed memory: every 4 KiB page faults on first write,
// which on the development machine cost more than the kernel itself (89 MB: ~26 ms of faults
// against ~10 ms of work). Backing such buffers with transparent huge pages (2 MiB, via
// madvise) cuts the faults 512-fold; the memory is still freed when the tensor dies.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <sys/mman.h>

namespace ddo_fast {

inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
  if (nbytes < 4 * kHuge) return at::empty(sizes, options);
  const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, rounded) != 0) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
  madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
  return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
}

}  // namespace ddo_fast
