// The kernels for the compiler's default target (x86-64: SSE2; other architectures: their
// baseline): the fallback on any CPU, and what DDO_FAST_CPU_ISA=baseline forces.
#include "kernels_deps.h"

#define DDO_FAST_ISA baseline
#define DDO_FAST_ISA_NAME "baseline"
#include "kernels_impl.h"
