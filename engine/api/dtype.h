// Element types of weights and activations, and scalar conversions between them.
// All functions are pure and thread-safe.
#ifndef MOE_ENGINE_API_DTYPE_H_
#define MOE_ENGINE_API_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "absl/status/statusor.h"

namespace moe {

// Storage type of a tensor. Compute happens in fp32 or bf16 (fp32 accumulation).
// kF8E4M3 and kU8 hold quantized expert weights and their scales
// (engine/api/quantized.h); they are read, never computed in.
enum class DType : uint8_t { kF32, kBF16, kF16, kF8E4M3, kU8 };

// Bytes per element.
constexpr size_t DTypeSize(DType dtype) {
  return dtype == DType::kF32 ? 4 : (dtype == DType::kBF16 || dtype == DType::kF16) ? 2 : 1;
}

// Whether weights of this dtype are numbers the engine computes with (F32,
// BF16, F16) rather than the codes of a quantized format.
constexpr bool IsFloatDType(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

// "F32", "BF16", "F16", "F8_E4M3", "U8" (safetensors spelling).
std::string_view DTypeName(DType dtype);

// Parses a safetensors dtype string: the five types above.
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

// IEEE half precision, converted bit by bit (round to nearest even,
// subnormals, infinities and NaN kept) so that it builds with any compiler.
inline uint16_t FloatToF16(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mantissa = x & 0x7fffffu;
  const int exponent = static_cast<int>((x >> 23) & 0xffu);
  if (exponent == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mantissa ? 0x200u | (mantissa >> 13) : 0u));
  const int e = exponent - 127 + 15;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow: infinity
  if (e <= 0) {                                                 // subnormal half, or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    mantissa |= 0x800000u;
    const int shift = 14 - e;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // a carry rounds up into the exponent
  return static_cast<uint16_t>(half);
}
inline float F16ToFloat(uint16_t value) {
  const uint32_t sign = static_cast<uint32_t>(value & 0x8000u) << 16;
  const uint32_t exponent = (value >> 10) & 0x1fu;
  const uint32_t mantissa = value & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    // Subnormal: mantissa x 2^-24, exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 0x1.0p-24f;
    std::memcpy(&bits, &magnitude, 4);
    bits |= sign;
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// Converts `count` elements of `dtype` at `src` to fp32 at `dst` (an e4m3
// byte to its value, a U8 to its integer value).
void ConvertToFloat(DType dtype, const void* src, size_t count, float* dst);
// Converts `count` fp32 values to `dtype` at `dst` (e4m3: to nearest, ties to
// even, saturating at +-448; U8: rounded, clamped to [0, 255]).
void ConvertFromFloat(DType dtype, const float* src, size_t count, void* dst);

}  // namespace moe

#endif  // MOE_ENGINE_API_DTYPE_H_
