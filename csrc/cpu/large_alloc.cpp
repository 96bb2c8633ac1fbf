// The large-buffer allocator of the CPU kernels: policies plain / thp / pool (see large_alloc.h).
//
// Registered ops (Python wrappers in ddo_fast/_alloc.py):
//   ddo_fast::cpu_alloc(str policy) -> str   set the policy ("" = keep) and return it
//   ddo_fast::cpu_buffers(str action) -> int "release": free the cache, return bytes freed;
//                                            "cached": bytes in the cache; "hits"/"misses":
//                                            pool counters since the process started.
#include "large_alloc.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <vector>

namespace ddo_fast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;        // 2 MiB, the x86-64 huge page
constexpr size_t kSmallBytes = kHuge;            // below this, at::empty
constexpr size_t kPerSize = 2;                   // cached buffers per rounded size
constexpr size_t kMaxCachedBytes = size_t(4) << 30;  // the whole cache, 4 GiB

CpuAlloc policy_from_env() {
  const char* env = std::getenv("DDO_FAST_CPU_ALLOC");
  if (env == nullptr || *env == '\0') return CpuAlloc::Pool;
  if (std::strcmp(env, "plain") == 0) return CpuAlloc::Plain;
  if (std::strcmp(env, "thp") == 0) return CpuAlloc::HugePages;
  if (std::strcmp(env, "pool") == 0) return CpuAlloc::Pool;
  TORCH_CHECK(false, "ddo_fast: DDO_FAST_CPU_ALLOC must be plain, thp or pool, got '", env, "'");
}

std::atomic<int64_t>& policy() {
  static std::atomic<int64_t> value{static_cast<int64_t>(policy_from_env())};
  return value;
}

void* huge_buffer(size_t rounded) {
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHuge, rounded) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: ignored where THP is off
#endif
  return ptr;
}

// The bounded cache. Leaked on purpose: tensors may die after static destructors have run.
class Pool {
 public:
  void* take(size_t rounded) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(rounded);
      if (it != free_.end() && !it->second.empty()) {
        void* ptr = it->second.back();
        it->second.pop_back();
        cached_ -= rounded;
        ++hits_;
        return ptr;
      }
      ++misses_;
    }
    return huge_buffer(rounded);
  }

  // Keeps `ptr` if the cache has room for it (and the policy is still pool), else frees it.
  void give(void* ptr, size_t rounded) {
    if (policy().load() == static_cast<int64_t>(CpuAlloc::Pool)) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& list = free_[rounded];
      if (list.size() < kPerSize && cached_ + rounded <= kMaxCachedBytes) {
        list.push_back(ptr);
        cached_ += rounded;
        return;
      }
    }
    std::free(ptr);
  }

  int64_t release() {
    std::map<size_t, std::vector<void*>> taken;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      taken.swap(free_);
      bytes = static_cast<int64_t>(cached_);
      cached_ = 0;
    }
    for (auto& [size, list] : taken)
      for (void* p : list) std::free(p);
    return bytes;
  }

  int64_t stat(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (what == "cached") return static_cast<int64_t>(cached_);
    if (what == "hits") return hits_;
    return misses_;
  }

 private:
  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

std::string policy_name(int64_t p) {
  switch (static_cast<CpuAlloc>(p)) {
    case CpuAlloc::Plain: return "plain";
    case CpuAlloc::HugePages: return "thp";
    default: return "pool";
  }
}

std::string cpu_alloc(std::string requested) {
  if (!requested.empty()) {
    if (requested == "plain") policy().store(static_cast<int64_t>(CpuAlloc::Plain));
    else if (requested == "thp") policy().store(static_cast<int64_t>(CpuAlloc::HugePages));
    else if (requested == "pool") policy().store(static_cast<int64_t>(CpuAlloc::Pool));
    else TORCH_CHECK(false, "ddo_fast.cpu_alloc: policy must be plain, thp or pool, got '",
                     requested, "'");
    if (requested != "pool") pool().release();  // leaving the pool hands its cache back
  }
  return policy_name(policy().load());
}

int64_t cpu_buffers(std::string action) {
  if (action == "release") return pool().release();
  TORCH_CHECK(action == "cached" || action == "hits" || action == "misses",
              "ddo_fast.cpu_buffers: action must be release, cached, hits or misses, got '",
              action, "'");
  return pool().stat(action);
}

}  // namespace

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes =
      static_cast<size_t>(numel) * c10::elementSize(options.dtype().toScalarType());
  const auto current = static_cast<CpuAlloc>(policy().load());
  if (nbytes < kSmallBytes || current == CpuAlloc::Plain) return at::empty(sizes, options);
  const size_t rounded = (nbytes + kHuge - 1) / kHuge * kHuge;
  if (current == CpuAlloc::HugePages) {
    void* ptr = huge_buffer(rounded);
    if (ptr == nullptr) return at::empty(sizes, options);
    return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
  }
  void* ptr = pool().take(rounded);
  if (ptr == nullptr) return at::empty(sizes, options);
  return at::from_blob(ptr, sizes, [rounded](void* p) { pool().give(p, rounded); }, options);
}

TORCH_LIBRARY_FRAGMENT(ddo_fast, m) {
  m.def("cpu_alloc(str policy) -> str", &cpu_alloc);
  m.def("cpu_buffers(str action) -> int", &cpu_buffers);
}

}  // namespace ddo_fast
