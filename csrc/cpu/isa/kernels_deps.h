// Every header kernels_impl.h needs, included by csrc/cpu/isa/<isa>.cpp *before* its target
// pragma, so that library code (the standard library, c10's fp16/bf16 conversions) is compiled
// for the baseline ISA in every translation unit and only ddo_fast's own loops are compiled per
// ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "kernels.h"
