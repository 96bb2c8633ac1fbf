// How a DDO loss reduces its per-sample terms: the `int reduction` argument of every operator
// schema (csrc/ops.cpp). Mirrors ddo_fast._reduction.Reduction (Python) and the tl.constexpr
// constants of kernels/loss_head.py (Triton); the integer values are part of the schema.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace ddo_fast {

enum class Reduction : int64_t {
  kNone = 0,  // per-sample losses [B]
  kMean = 1,  // sum_real l / n_real + sum_fake l / n_fake (an empty group adds 0)
  kSum = 2,   // sum_b l_b
};

// The schema's integer as a Reduction; a ValueError naming the valid codes otherwise.
inline Reduction to_reduction(int64_t code) {
  TORCH_CHECK_VALUE(code == static_cast<int64_t>(Reduction::kNone) ||
                        code == static_cast<int64_t>(Reduction::kMean) ||
                        code == static_cast<int64_t>(Reduction::kSum),
                    "ddo_fast: reduction code must be ", static_cast<int64_t>(Reduction::kNone),
                    " (none), ", static_cast<int64_t>(Reduction::kMean), " (mean) or ",
                    static_cast<int64_t>(Reduction::kSum), " (sum), got ", code);
  return static_cast<Reduction>(code);
}

}  // namespace ddo_fast
