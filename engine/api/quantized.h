// Expert weights kept in the quantized formats that checkpoints are published
// in, and the published rules that turn them into numbers:
// - kFp8Block: FP8 e4m3 ("e4m3fn": no infinities, S.1111.111 is NaN) with one
//   fp32 scale per block of block_rows x block_columns values, multiplied
//   (DeepSeek-V3/R1, Kimi K2 and Qwen3 FP8 releases: `weight` and
//   `weight_scale_inv`, quantization_config.weight_block_size).
// - kMxfp4: OCP microscaling FP4: e2m1 values, two a byte (the even value in
//   the low nibble), one e8m0 scale (2^(e - 127)) per 32 values of a row
//   (gpt-oss: `*_blocks` and `*_scales`).
// Plain data and pure functions: thread-safe.
#ifndef MOE_ENGINE_API_QUANTIZED_H_
#define MOE_ENGINE_API_QUANTIZED_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "engine/api/tensor.h"

namespace moe {

enum class QuantFormat : uint8_t { kNone, kFp8Block, kMxfp4 };

// "none", "fp8", "mxfp4" (quantization_config.quant_method's spelling).
std::string_view QuantFormatName(QuantFormat format);

// The value of an e4m3fn byte, exactly (NaN for 0x7F and 0xFF).
float E4m3ToFloat(uint8_t byte);
// The e4m3fn byte nearest to `value` (ties to the even code), saturating at
// +-448; NaN gives 0x7F.
uint8_t FloatToE4m3(float value);
// The value of an e2m1 code (the low 4 bits of `nibble`): 0, 0.5, 1, 1.5, 2,
// 3, 4, 6 and their negatives.
float E2m1ToFloat(uint8_t nibble);
// 2^(e - 127) for an e8m0 scale byte (NaN for 255).
float E8m0ToFloat(uint8_t e);

// A [rows, columns] weight matrix (PyTorch linear layout, [out, in]) in a
// quantized format, viewed in the bytes of its checkpoint (`owner` keeps them
// alive). Immutable; a default one is empty.
struct QuantizedMatrix {
  QuantFormat format = QuantFormat::kNone;
  int64_t rows = 0, columns = 0;
  // Values of a block of block_rows x block_columns share a scale; kMxfp4:
  // 1 x 32.
  int64_t block_rows = 1, block_columns = 1;
  // Row r's values start at values + r * value_stride bytes: one byte a
  // value (kFp8Block), or two (kMxfp4: value 2j in the low nibble of byte j).
  const uint8_t* values = nullptr;
  int64_t value_stride = 0;
  // The scale of the block holding (r, c) is element
  // ((r + first_row) / block_rows) * scale_stride + c / block_columns of
  // `scales`: fp32 (kFp8Block) or e8m0 bytes (kMxfp4).
  const void* scales = nullptr;
  int64_t scale_stride = 0;
  int64_t first_row = 0;
  std::shared_ptr<const void> owner;

  bool empty() const { return format == QuantFormat::kNone; }
  // Where the scale of (r, c)'s block is in `scales`, in elements.
  int64_t ScaleIndex(int64_t r, int64_t c) const {
    return ((r + first_row) / block_rows) * scale_stride + c / block_columns;
  }
  // The block scale of (r, c), as a multiplier.
  float Scale(int64_t r, int64_t c) const;
  // The raw value of (r, c) before scaling (an e4m3 or e2m1 number).
  float Code(int64_t r, int64_t c) const;
  // The published rule: Code(r, c) * Scale(r, c) in fp32.
  float Value(int64_t r, int64_t c) const { return Code(r, c) * Scale(r, c); }
  // Rows begin, begin + step, ... (`count` of them): a view. A step above 1
  // needs block_rows 1.
  QuantizedMatrix Rows(int64_t begin, int64_t count, int64_t step = 1) const;
  // Every Value as a [rows, columns] tensor of `dtype` (rounded to it): an
  // owned copy, for references and for executors without quantized kernels.
  HostTensor Dequantized(DType dtype) const;
  // Bytes of values and scales that the matrix stands for in its checkpoint.
  size_t stored_bytes() const;
  // "fp8 [192, 320] in 128 x 128 blocks".
  std::string Describe() const;
};

// Builds a view of a checkpoint's tensors for a [rows, columns] matrix,
// checking dtypes and shapes: kFp8Block: `values` F8_E4M3 [rows, columns], `scales` F32
// [ceil(rows / block_rows), ceil(columns / block_columns)];
// kMxfp4: `values` U8 [rows, columns / 32, 16] or [rows, columns / 2],
// `scales` U8 [rows, columns / 32]. Errors name `name`.
absl::StatusOr<QuantizedMatrix> MakeQuantizedMatrix(QuantFormat format, const std::string& name,
                                                    const HostTensor& values, const HostTensor& scales, int64_t rows,
                                                    int64_t columns, int64_t block_rows, int64_t block_columns);

// Quantizes `matrix` [rows, columns] as the published quantizers do: kFp8Block
// with a scale of amax / 448 per block (block_rows x block_columns); kMxfp4
// with a shared exponent of floor(log2(amax)) - 2 per 32 values of a row
// (the block arguments ignored), each value to the nearest code. Owned
// bytes. For tests, benchmarks and tools.
absl::StatusOr<QuantizedMatrix> QuantizeMatrix(const HostTensor& matrix, QuantFormat format, int64_t block_rows = 128,
                                               int64_t block_columns = 128);

}  // namespace moe

#endif  // MOE_ENGINE_API_QUANTIZED_H_
