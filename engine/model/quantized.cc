#include "engine/api/quantized.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"

namespace moe {

std::string_view QuantFormatName(QuantFormat format) {
  switch (format) {
    case QuantFormat::kNone:
      return "none";
    case QuantFormat::kFp8Block:
      return "fp8";
    case QuantFormat::kMxfp4:
      return "mxfp4";
  }
  return "?";
}

float E4m3ToFloat(uint8_t byte) {
  const float sign = byte & 0x80 ? -1.0f : 1.0f;
  const int exponent = (byte >> 3) & 0xF, mantissa = byte & 0x7;
  if (exponent == 0xF && mantissa == 0x7) return std::numeric_limits<float>::quiet_NaN();
  // Bias 7; exponent 0 holds the subnormals, mantissa x 2^-9.
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
}

uint8_t FloatToE4m3(float value) {
  if (std::isnan(value)) return 0x7F;
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float magnitude = std::fabs(value);
  if (magnitude >= 448.0f) return sign | 0x7E;
  // nearbyint rounds ties to even in the default rounding mode, and every
  // scaling here is by a power of two: exact.
  if (magnitude < 0x1p-6f) {
    // Subnormals, steps of 2^-9; 8 steps is the smallest normal, code 0x08.
    return sign | static_cast<uint8_t>(std::nearbyint(magnitude * 512.0f));
  }
  int exponent = 0;
  std::frexp(magnitude, &exponent);  // magnitude = f 2^exponent, f in [0.5, 1)
  --exponent;                        // magnitude = 1.m 2^exponent
  int mantissa = static_cast<int>(std::nearbyint((std::ldexp(magnitude, -exponent) - 1.0f) * 8.0f));
  if (mantissa == 8) {
    mantissa = 0;
    ++exponent;
  }
  const int code = (exponent + 7) << 3 | mantissa;
  return sign | static_cast<uint8_t>(std::min(code, 0x7E));
}

float E2m1ToFloat(uint8_t nibble) {
  static constexpr float kValues[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float magnitude = kValues[nibble & 0x7];
  return nibble & 0x8 ? -magnitude : magnitude;
}

float E8m0ToFloat(uint8_t e) {
  if (e == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(e) - 127);
}

float QuantizedMatrix::Scale(int64_t r, int64_t c) const {
  const int64_t index = ScaleIndex(r, c);
  if (format == QuantFormat::kFp8Block) {
    // A checkpoint's F32 tensor need not be 4-byte aligned in its file.
    float scale;
    std::memcpy(&scale, static_cast<const char*>(scales) + index * sizeof(float), sizeof(float));
    return scale;
  }
  return E8m0ToFloat(static_cast<const uint8_t*>(scales)[index]);
}

float QuantizedMatrix::Code(int64_t r, int64_t c) const {
  const uint8_t* row = values + r * value_stride;
  if (format == QuantFormat::kFp8Block) return E4m3ToFloat(row[c]);
  return E2m1ToFloat(c % 2 == 0 ? row[c / 2] & 0xF : row[c / 2] >> 4);
}

QuantizedMatrix QuantizedMatrix::Rows(int64_t begin, int64_t count, int64_t step) const {
  QuantizedMatrix view = *this;
  view.rows = count;
  view.values = values + begin * value_stride;
  view.value_stride = value_stride * step;
  if (block_rows == 1) {
    const size_t scale_size = format == QuantFormat::kFp8Block ? sizeof(float) : 1;
    view.scales = static_cast<const char*>(scales) + (begin + first_row) * scale_stride * scale_size;
    view.scale_stride = scale_stride * step;
    view.first_row = 0;
  } else {
    view.first_row = first_row + begin;  // step is 1 (see the header)
  }
  return view;
}

HostTensor QuantizedMatrix::Dequantized(DType dtype) const {
  std::vector<float> out(static_cast<size_t>(rows * columns));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) out[static_cast<size_t>(r * columns + c)] = Value(r, c);
  }
  return HostTensor::FromFloats({rows, columns}, out, dtype);
}

size_t QuantizedMatrix::stored_bytes() const {
  const int64_t scale_count = ((rows + block_rows - 1) / block_rows) * ((columns + block_columns - 1) / block_columns);
  if (format == QuantFormat::kFp8Block) return static_cast<size_t>(rows * columns + scale_count * 4);
  return static_cast<size_t>(rows * columns / 2 + scale_count);
}

std::string QuantizedMatrix::Describe() const {
  return absl::StrCat(std::string(QuantFormatName(format)), " [", rows, ", ", columns, "] in ", block_rows, " x ",
                      block_columns, " blocks");
}

absl::StatusOr<QuantizedMatrix> QuantizeMatrix(const HostTensor& matrix, QuantFormat format, int64_t block_rows,
                                               int64_t block_columns) {
  if (matrix.rank() != 2) return absl::InvalidArgumentError("QuantizeMatrix: not a matrix");
  const int64_t rows = matrix.dim(0), columns = matrix.dim(1);
  if (format == QuantFormat::kMxfp4) block_rows = 1, block_columns = 32;
  const std::vector<float> values = matrix.ToFloats();
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  const int64_t scale_columns = (columns + block_columns - 1) / block_columns;
  // Each block's largest magnitude.
  std::vector<float> amax(static_cast<size_t>(scale_rows * scale_columns), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      float& m = amax[static_cast<size_t>((r / block_rows) * scale_columns + c / block_columns)];
      m = std::max(m, std::fabs(values[static_cast<size_t>(r * columns + c)]));
    }
  }
  std::vector<float> scales(amax.size());
  std::vector<uint8_t> scale_bytes(amax.size());
  for (size_t b = 0; b < amax.size(); ++b) {
    if (format == QuantFormat::kFp8Block) {
      scales[b] = amax[b] > 0 ? amax[b] / 448.0f : 1.0f;  // the largest value maps to e4m3's largest
    } else {
      // OCP MX: the shared exponent is floor(log2(amax)) minus e2m1's largest exponent (2).
      const int e = amax[b] > 0 ? std::ilogb(amax[b]) - 2 : 0;
      scale_bytes[b] = static_cast<uint8_t>(std::clamp(e + 127, 2, 252));
      scales[b] = E8m0ToFloat(scale_bytes[b]);
    }
  }
  const bool fp8 = format == QuantFormat::kFp8Block;
  std::vector<uint8_t> codes(static_cast<size_t>(fp8 ? rows * columns : rows * columns / 2), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < columns; ++c) {
      const float scaled = values[static_cast<size_t>(r * columns + c)] /
                           scales[static_cast<size_t>((r / block_rows) * scale_columns + c / block_columns)];
      if (fp8) {
        codes[static_cast<size_t>(r * columns + c)] = FloatToE4m3(scaled);
        continue;
      }
      uint8_t best = 0;  // the nearest e2m1 code
      for (uint8_t code = 1; code < 16; ++code) {
        if (std::fabs(E2m1ToFloat(code) - scaled) < std::fabs(E2m1ToFloat(best) - scaled)) best = code;
      }
      codes[static_cast<size_t>(r * columns / 2 + c / 2)] |= c % 2 == 0 ? best : best << 4;
    }
  }
  auto owned_codes = std::make_shared<std::vector<uint8_t>>(std::move(codes));
  const HostTensor code_tensor =
      HostTensor::Borrow(fp8 ? DType::kF8E4M3 : DType::kU8,
                         fp8 ? std::vector<int64_t>{rows, columns} : std::vector<int64_t>{rows, columns / 2},
                         owned_codes->data(), owned_codes);
  HostTensor scale_tensor;
  if (fp8) {
    scale_tensor = HostTensor::FromFloats({scale_rows, scale_columns}, scales);
  } else {
    auto owned_scales = std::make_shared<std::vector<uint8_t>>(std::move(scale_bytes));
    scale_tensor = HostTensor::Borrow(DType::kU8, {scale_rows, scale_columns}, owned_scales->data(), owned_scales);
  }
  return MakeQuantizedMatrix(format, "quantized matrix", code_tensor, scale_tensor, rows, columns, block_rows,
                             block_columns);
}

absl::StatusOr<QuantizedMatrix> MakeQuantizedMatrix(QuantFormat format, const std::string& name,
                                                    const HostTensor& values, const HostTensor& scales, int64_t rows,
                                                    int64_t columns, int64_t block_rows, int64_t block_columns) {
  auto wrong = [&](const HostTensor& tensor, const std::string& what, const std::string& expected) {
    return absl::InvalidArgumentError(absl::StrCat(name, " ", what, " is ", std::string(DTypeName(tensor.dtype())), " ",
                                                   tensor.ShapeString(), ", expected ", expected));
  };
  if (block_rows < 1 || block_columns < 1) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": block ", block_rows, " x ", block_columns));
  }
  QuantizedMatrix m;
  m.format = format;
  m.rows = rows;
  m.columns = columns;
  m.block_rows = block_rows;
  m.block_columns = block_columns;
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  const int64_t scale_columns = (columns + block_columns - 1) / block_columns;
  if (format == QuantFormat::kFp8Block) {
    if (values.dtype() != DType::kF8E4M3 || values.shape() != std::vector<int64_t>{rows, columns}) {
      return wrong(values, "values", absl::StrCat("F8_E4M3 [", rows, ", ", columns, "]"));
    }
    if (scales.dtype() != DType::kF32 || scales.shape() != std::vector<int64_t>{scale_rows, scale_columns}) {
      return wrong(scales, "scales", absl::StrCat("F32 [", scale_rows, ", ", scale_columns, "]"));
    }
    m.value_stride = columns;
  } else if (format == QuantFormat::kMxfp4) {
    const bool blocked = values.shape() == std::vector<int64_t>{rows, columns / 32, 16};
    const bool flat = values.shape() == std::vector<int64_t>{rows, columns / 2};
    if (columns % 32 != 0 || values.dtype() != DType::kU8 || !(blocked || flat)) {
      return wrong(values, "blocks",
                   absl::StrCat("U8 [", rows, ", ", columns / 32, ", 16] with ", columns, " a multiple of 32"));
    }
    if (scales.dtype() != DType::kU8 || scales.shape() != std::vector<int64_t>{rows, scale_columns}) {
      return wrong(scales, "scales", absl::StrCat("U8 [", rows, ", ", scale_columns, "]"));
    }
    m.value_stride = columns / 2;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(name, ": not a quantized format"));
  }
  m.values = static_cast<const uint8_t*>(values.data());
  m.scales = scales.data();
  m.scale_stride = scale_columns;
  // Both tensors borrow from the checkpoint's mapping, or own their bytes:
  // keep both alive.
  m.owner = std::make_shared<std::pair<HostTensor, HostTensor>>(values, scales);
  return m;
}

}  // namespace moe
