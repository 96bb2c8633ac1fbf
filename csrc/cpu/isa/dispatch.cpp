// Run-time choice of the ISA whose kernels run (kernels.h). Compiled for the baseline target.
//
// Detection uses the compiler's cpuid helpers (__builtin_cpu_supports), which also check that the
// OS saves the AVX / AVX-512 register state. $DDO_FAST_CPU_ISA forces a choice (tests, and
// comparing ISAs on one machine); it is read once, at the first operator call.
#include "kernels.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace ddo_fast {
namespace {

struct IsaEntry {
  const CpuKernels* kernels;
  bool (*supported)();
};

bool always() { return true; }

#ifdef DDO_FAST_X86
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Every ISA of this build, best last.
const IsaEntry kIsas[] = {
    {&baseline::kKernels, &always},
#ifdef DDO_FAST_X86
    {&avx2::kKernels, &has_avx2},
    {&avx512::kKernels, &has_avx512},
#endif
};

const CpuKernels* find_supported(const char* isa) {
  for (const IsaEntry& e : kIsas) {
    if (std::strcmp(e.kernels->isa, isa) == 0) return e.supported() ? e.kernels : nullptr;
  }
  return nullptr;
}

const CpuKernels* select_from_env() {
  const char* env = std::getenv("DDO_FAST_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    const CpuKernels* best = &baseline::kKernels;
    for (const IsaEntry& e : kIsas) {
      if (e.supported()) best = e.kernels;
    }
    return best;
  }
  bool known = false;
  for (const IsaEntry& e : kIsas) known = known || std::strcmp(e.kernels->isa, env) == 0;
  TORCH_CHECK_VALUE(known || std::strcmp(env, "avx2") == 0 || std::strcmp(env, "avx512") == 0,
                    "ddo_fast: DDO_FAST_CPU_ISA must be auto, baseline, avx2 or avx512, got '",
                    env, "'");
  const CpuKernels* k = find_supported(env);
  TORCH_CHECK(k != nullptr, "ddo_fast: DDO_FAST_CPU_ISA=", env,
              " is not available: this CPU and build support ", supported_isas());
  return k;
}

std::atomic<const CpuKernels*> g_selected{nullptr};
std::mutex g_select_mutex;

}  // namespace

const CpuKernels& cpu_kernels() {
  const CpuKernels* k = g_selected.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  std::lock_guard<std::mutex> lock(g_select_mutex);
  k = g_selected.load(std::memory_order_relaxed);
  if (k == nullptr) {
    k = select_from_env();  // raises (and selects nothing) on a bad DDO_FAST_CPU_ISA
    g_selected.store(k, std::memory_order_release);
  }
  return *k;
}

const char* supported_isas() {
  static const std::string names = [] {
    std::string s;
    for (const IsaEntry& e : kIsas) {
      if (!e.supported()) continue;
      if (!s.empty()) s += ",";
      s += e.kernels->isa;
    }
    return s;
  }();
  return names.c_str();
}

bool set_cpu_isa(const char* isa) {
  const CpuKernels* k = find_supported(isa);
  if (k == nullptr) return false;
  std::lock_guard<std::mutex> lock(g_select_mutex);
  g_selected.store(k, std::memory_order_release);
  return true;
}

}  // namespace ddo_fast
