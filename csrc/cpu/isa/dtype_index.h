// The kernels' dtype axis (kernels.h) of an ATen scalar type. Baseline code only.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace ddo_fast {

inline DtypeIndex dtype_index(c10::ScalarType t, const char* name) {
  switch (t) {
    case c10::ScalarType::Float:
      return kF32;
    case c10::ScalarType::Double:
      return kF64;
    case c10::ScalarType::Half:
      return kF16;
    case c10::ScalarType::BFloat16:
      return kBF16;
    default:
      TORCH_CHECK_TYPE(false, "ddo_fast: `", name,
                       "` must be float32, float64, float16 or bfloat16, got ", t);
  }
}

}  // namespace ddo_fast
