// Output buffers for the CPU kernels' large results (gradients the size of the inputs).
//
// A fresh multi-megabyte allocation is mmap'ed memory: every 4 KiB page faults on first write,
// which on the development machine cost more than the kernel itself (89 MB: ~26 ms of faults
// against ~10 ms of work). Three policies (ddo_fast.cpu_alloc in Python, or the environment
// variable DDO_FAST_CPU_ALLOC read on first use):
//
//   plain  at::empty: the page faults are paid on every call.
//   thp    2 MiB-aligned memory advised MADV_HUGEPAGE: 512x fewer faults, but where the kernel's
//          THP defrag setting is "madvise" a fault may compact memory synchronously (a tail).
//   pool   the thp buffers, recycled: when a gradient dies its buffer goes back to a small
//          bounded cache (at most kPerSize buffers of one size, kMaxCachedBytes in all) and the
//          next request of that size reuses it with no fault at all, like the CUDA caching
//          allocator. cpu_buffers_release() hands the cache back to the OS.
//
// Policy, pool and counters live in large_alloc.cpp, compiled once (not per instruction set).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ddo_fast {

enum class CpuAlloc : int64_t { Plain = 0, HugePages = 1, Pool = 2 };

// A tensor of `sizes` for a large kernel output, allocated by the current policy. Buffers under
// kSmallBytes (2 MiB, one huge page) always come from at::empty. From 2 MiB up the policy
// applies, so a 4 MiB diffusion gradient is recycled too: from glibc's heap it can be trimmed
// and faulted in again between calls (the diffusion backward alone measured 0.38 and 1.38 ms
// p50 in two ad-hoc runs of the same loop on the shared development machine).
at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace ddo_fast
