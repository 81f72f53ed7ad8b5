#include "engine/api/dtype.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/api/quantized.h"

namespace moe {

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "BF16") return DType::kBF16;
  if (name == "F16") return DType::kF16;
  if (name == "F8_E4M3") return DType::kF8E4M3;
  if (name == "U8") return DType::kU8;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype '", std::string(name), "' (expected F32, BF16, F16, F8_E4M3 or U8)"));
}

void ConvertToFloat(DType dtype, const void* src, size_t count, float* dst) {
  if (count == 0) return;  // empty buffers may be null, which memcpy may not see
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, count * 4);
      return;
    case DType::kBF16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(in[i]);
      return;
    }
    case DType::kF16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = F16ToFloat(in[i]);
      return;
    }
    case DType::kF8E4M3: {
      const auto* in = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = E4m3ToFloat(in[i]);
      return;
    }
    case DType::kU8: {
      const auto* in = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < count; ++i) dst[i] = in[i];
      return;
    }
  }
}

void ConvertFromFloat(DType dtype, const float* src, size_t count, void* dst) {
  if (count == 0) return;
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, count * 4);
      return;
    case DType::kBF16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = FloatToBf16(src[i]);
      return;
    }
    case DType::kF16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = FloatToF16(src[i]);
      return;
    }
    case DType::kF8E4M3: {
      auto* out = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < count; ++i) out[i] = FloatToE4m3(src[i]);
      return;
    }
    case DType::kU8: {
      auto* out = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < count; ++i)
        out[i] = static_cast<uint8_t>(std::clamp(std::nearbyint(src[i]), 0.0f, 255.0f));
      return;
    }
  }
}

}  // namespace moe
