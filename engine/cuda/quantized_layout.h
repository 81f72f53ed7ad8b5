// [DEVICE_QUANT_LAYOUT] How the CUDA executor holds quantized routed experts
// (engine/api/quantized.h's formats) on the device, and how a thread reads
// one weight from it. Plain functions for the host and the device, so that
// the CPU test suite checks them against QuantizedMatrix::Value
// (tests/engine/cuda_device_math_test.cc).
//
// Each held expert is one slot of `slot_bytes` bytes, in this order, each
// section starting on a 16-byte boundary: the codes of w1, w3 (two-product
// forms only) and w2, then their block scales in the same order. Codes are
// row-major at their checkpoint size: one e4m3 byte a weight (kFp8), or an
// e2m1 nibble a weight, value 2j in the low nibble of byte j (kMxfp4).
// Scales are row-major over the matrix's blocks: fp32 multipliers (kFp8) or
// e8m0 bytes (kMxfp4). A matrix whose rows begin `row_offset` rows into a
// block of the checkpoint (a view of a fused tensor) keeps that offset.
//
// A weight is the published rule, code x scale in fp32; kernels round it
// to their storage as they would a stored weight, so a quantized expert
// computes exactly as one holding its dequantized weights.
//
// Thread-safety: plain values and pure functions.
#ifndef MOE_ENGINE_CUDA_QUANTIZED_LAYOUT_H_
#define MOE_ENGINE_CUDA_QUANTIZED_LAYOUT_H_

#include <cstdint>
#include <cstring>

#include "engine/cuda/device_math.h"

namespace moe::device_math {

enum class QuantKind : int { kNone = 0, kFp8 = 1, kMxfp4 = 2 };

// e4m3 (bias 7, no infinities; S.1111.111 is NaN) as fp32.
MOE_HD inline float DecodeE4m3(uint8_t code) {
  const uint32_t exponent = (code >> 3) & 0xF, mantissa = code & 0x7;
  float magnitude;
  if (exponent == 0xF && mantissa == 0x7) {
    magnitude = BitsFloat(0x7fc00000u);
  } else if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 0x1p-9f;  // subnormal: exact
  } else {
    magnitude = BitsFloat((exponent + 120) << 23 | mantissa << 20);  // 1.m x 2^(e - 7)
  }
  return code & 0x80 ? -magnitude : magnitude;
}

// e2m1 (bias 1): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
MOE_HD inline float DecodeE2m1(uint8_t nibble) {
  const uint32_t exponent = (nibble >> 1) & 0x3, mantissa = nibble & 0x1;
  const float magnitude =
      exponent == 0 ? static_cast<float>(mantissa) * 0.5f : BitsFloat((exponent + 126) << 23 | mantissa << 22);
  return nibble & 0x8 ? -magnitude : magnitude;
}

// e8m0: 2^(e - 127); 0xFF is NaN.
MOE_HD inline float DecodeE8m0(uint8_t e) {
  if (e == 0xFF) return BitsFloat(0x7fc00000u);
  return e == 0 ? BitsFloat(0x00400000u) : BitsFloat(static_cast<uint32_t>(e) << 23);
}

MOE_HD inline float LoadFloat(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const float*>(p);  // 4-byte aligned by the layout
#else
  float value;
  std::memcpy(&value, p, sizeof(value));
  return value;
#endif
}

// One quantized matrix [rows, columns] of a slot.
struct QuantMatrix {
  QuantKind kind = QuantKind::kNone;
  int rows = 0, columns = 0;
  int block_rows = 1, block_columns = 1;
  int row_offset = 0;        // rows into the first block row (0 .. block_rows - 1)
  int64_t code_offset = 0;   // bytes from the slot's start
  int64_t scale_offset = 0;  // bytes from the slot's start

  MOE_HD int64_t RowBytes() const { return kind == QuantKind::kMxfp4 ? columns / 2 : columns; }
  MOE_HD int64_t CodeBytes() const { return static_cast<int64_t>(rows) * RowBytes(); }
  MOE_HD int ScaleColumns() const { return (columns + block_columns - 1) / block_columns; }
  MOE_HD int ScaleRows() const { return rows == 0 ? 0 : (row_offset + rows - 1) / block_rows + 1; }
  MOE_HD int64_t ScaleBytes() const {
    return static_cast<int64_t>(ScaleRows()) * ScaleColumns() * (kind == QuantKind::kFp8 ? 4 : 1);
  }
  // The raw code of (r, c) (an e4m3 or e2m1 number).
  MOE_HD float Code(const uint8_t* slot, int64_t r, int64_t c) const {
    const uint8_t* row = slot + code_offset + r * RowBytes();
    if (kind == QuantKind::kFp8) return DecodeE4m3(row[c]);
    const uint8_t pair = row[c / 2];
    return DecodeE2m1(c % 2 == 0 ? pair & 0xF : pair >> 4);
  }
  MOE_HD float Scale(const uint8_t* slot, int64_t r, int64_t c) const {
    const int64_t index = ((r + row_offset) / block_rows) * ScaleColumns() + c / block_columns;
    if (kind == QuantKind::kFp8) return LoadFloat(slot + scale_offset + 4 * index);
    return DecodeE8m0(slot[scale_offset + index]);
  }
  // The published rule: code x scale in fp32.
  MOE_HD float Value(const uint8_t* slot, int64_t r, int64_t c) const { return Code(slot, r, c) * Scale(slot, r, c); }
};

// A routed expert's three matrices in a slot (see the top of the file).
struct QuantFfnLayout {
  QuantKind kind = QuantKind::kNone;
  bool two_products = true;  // w3 present (GLU and clamped SwiGLU)
  QuantMatrix w1, w3, w2;    // w1, w3: [inner, hidden]; w2: [hidden, inner]
  int64_t slot_bytes = 0;

  MOE_HD int inner() const { return w1.rows; }
  MOE_HD int hidden() const { return w1.columns; }
  // Rows of the first product: w1's, then w3's below them.
  MOE_HD int FirstWidth() const { return two_products ? 2 * w1.rows : w1.rows; }
  // Weight (c, k) of the first product's matrix [FirstWidth, hidden].
  MOE_HD float First(const uint8_t* slot, int64_t c, int64_t k) const {
    return c < w1.rows ? w1.Value(slot, c, k) : w3.Value(slot, c - w1.rows, k);
  }
  // Weight (r, k) of the down matrix [hidden, inner].
  MOE_HD float Down(const uint8_t* slot, int64_t r, int64_t k) const { return w2.Value(slot, r, k); }
  // Weights of the expert expanded: first [FirstWidth, hidden], then down.
  MOE_HD int64_t ExpandedValues() const {
    return static_cast<int64_t>(FirstWidth()) * hidden() + static_cast<int64_t>(hidden()) * inner();
  }
  // Expanded value `index` (0 .. ExpandedValues - 1), in that order.
  MOE_HD float Expanded(const uint8_t* slot, int64_t index) const {
    const int64_t first = static_cast<int64_t>(FirstWidth()) * hidden();
    if (index < first) return First(slot, index / hidden(), index % hidden());
    index -= first;
    return Down(slot, index / inner(), index % inner());
  }
};

}  // namespace moe::device_math

#endif  // MOE_ENGINE_CUDA_QUANTIZED_LAYOUT_H_
