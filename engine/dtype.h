// Element types of weights and activations, and scalar conversions between them.
// All functions are pure and thread-safe.
#ifndef MOE_ENGINE_DTYPE_H_
#define MOE_ENGINE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace moe {

// Storage type of a tensor. Compute happens in fp32 or bf16 (fp32 accumulation).
enum class DType : uint8_t { kF32, kBF16, kF16 };

// Bytes per element.
constexpr size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

// "F32", "BF16", "F16" (safetensors spelling).
std::string_view DTypeName(DType dtype);

// Parses a safetensors dtype string; only the three floating types are accepted.
absl::StatusOr<DType> ParseDType(std::string_view name);

// bf16 is the upper half of an fp32; rounding is to nearest even, NaN stays NaN.
inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
inline float Bf16ToFloat(uint16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
// Rounds an fp32 to the nearest bf16 value, kept in an fp32.
inline float RoundToBf16(float value) { return Bf16ToFloat(FloatToBf16(value)); }

// IEEE half precision, via the compiler's _Float16 (F16C on x86).
inline uint16_t FloatToF16(float value) {
  _Float16 half = static_cast<_Float16>(value);
  uint16_t out;
  std::memcpy(&out, &half, 2);
  return out;
}
inline float F16ToFloat(uint16_t value) {
  _Float16 half;
  std::memcpy(&half, &value, 2);
  return static_cast<float>(half);
}

// Converts `count` elements of `dtype` at `src` to fp32 at `dst`.
void ConvertToFloat(DType dtype, const void* src, size_t count, float* dst);
// Converts `count` fp32 values to `dtype` at `dst`.
void ConvertFromFloat(DType dtype, const float* src, size_t count, void* dst);

}  // namespace moe

#endif  // MOE_ENGINE_DTYPE_H_
