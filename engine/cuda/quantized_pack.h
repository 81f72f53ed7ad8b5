// The host side of [DEVICE_QUANT_LAYOUT] (engine/cuda/quantized_layout.h):
// plans a quantized expert's slot and writes its codes and scales into one,
// from the checkpoint's QuantizedMatrix views. No CUDA types: the CPU test
// suite checks it without a device.
//
// Thread-safety: pure functions; `slot` belongs to the caller.
#ifndef MOE_ENGINE_CUDA_QUANTIZED_PACK_H_
#define MOE_ENGINE_CUDA_QUANTIZED_PACK_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/model_spec.h"
#include "engine/cuda/quantized_layout.h"

namespace moe::cuda {

// The slot layout of `ffn`'s quantized matrices (q1, q3 when
// `two_products`, q2). INVALID_ARGUMENT, naming the matrix, when it is not
// quantized or is a format the device layout does not hold.
absl::StatusOr<device_math::QuantFfnLayout> PlanQuantizedFfn(const FfnWeights& ffn, bool two_products);

// Writes `ffn`'s codes and scales into `slot` (layout.slot_bytes bytes, its
// padding zeroed). INVALID_ARGUMENT when ffn's matrices are laid out
// otherwise than `layout` (another expert's plan) or a code or an MXFP4
// scale is NaN.
absl::Status PackQuantizedFfn(const FfnWeights& ffn, const device_math::QuantFfnLayout& layout, uint8_t* slot);

}  // namespace moe::cuda

#endif  // MOE_ENGINE_CUDA_QUANTIZED_PACK_H_
