// [DEVICE_QUANT_LAYOUT] How the CUDA executor holds quantized routed experts
// (engine/api/quantized.h's formats) on the device, and how a thread reads
// one weight from it. Plain functions for the host and the device, so that
// the CPU test suite checks them against QuantizedMatrix::Value
// (tests/engine/cuda_quantized_layout_test.cc).
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

// One row of a quantized matrix, located: what a thread reading the row's
// weights one after another needs, without the matrix's index arithmetic.
struct QuantRow {
  QuantKind kind = QuantKind::kNone;
  int block_columns = 1;
  const uint8_t* codes = nullptr;   // the row's first code
  const uint8_t* scales = nullptr;  // the row's first block scale

  // The raw code of column c (an e4m3 or e2m1 number).
  MOE_HD float Code(int c) const {
    if (kind == QuantKind::kFp8) return DecodeE4m3(codes[c]);
    const uint8_t pair = codes[c / 2];
    return DecodeE2m1(c % 2 == 0 ? pair & 0xF : pair >> 4);
  }
  // The scale of the row's block `block` (columns block x block_columns ..).
  MOE_HD float Scale(int block) const {
    return kind == QuantKind::kFp8 ? LoadFloat(scales + 4 * block) : DecodeE8m0(scales[block]);
  }
  // The published rule: code x scale in fp32.
  MOE_HD float Value(int c) const { return Code(c) * Scale(c / block_columns); }
};

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
  // Row r of the matrix in `slot`.
  MOE_HD QuantRow Row(const uint8_t* slot, int64_t r) const {
    const int64_t scale_row = static_cast<int64_t>((r + row_offset) / block_rows) * ScaleColumns();
    QuantRow row;
    row.kind = kind;
    row.block_columns = block_columns;
    row.codes = slot + code_offset + r * RowBytes();
    row.scales = slot + scale_offset + scale_row * (kind == QuantKind::kFp8 ? 4 : 1);
    return row;
  }
  // The published rule for (r, c): code x scale in fp32.
  MOE_HD float Value(const uint8_t* slot, int64_t r, int c) const { return Row(slot, r).Value(c); }
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
  // Row c of the first product's matrix [FirstWidth, hidden].
  MOE_HD QuantRow FirstRow(const uint8_t* slot, int64_t c) const {
    return c < w1.rows ? w1.Row(slot, c) : w3.Row(slot, c - w1.rows);
  }
  // Row r of the down matrix [hidden, inner].
  MOE_HD QuantRow DownRow(const uint8_t* slot, int64_t r) const { return w2.Row(slot, r); }
  // The expert expanded is its first matrix [FirstWidth, hidden], then its
  // down matrix [hidden, inner]: ExpandedRows rows, row r of which starts
  // at ExpandedOffset(r) and is ExpandedRow(slot, r), ExpandedWidth(r) long.
  MOE_HD int64_t ExpandedValues() const {
    return static_cast<int64_t>(FirstWidth()) * hidden() + static_cast<int64_t>(hidden()) * inner();
  }
  MOE_HD int ExpandedRows() const { return FirstWidth() + hidden(); }
  MOE_HD int ExpandedWidth(int r) const { return r < FirstWidth() ? hidden() : inner(); }
  MOE_HD int64_t ExpandedOffset(int r) const {
    const int64_t first = static_cast<int64_t>(FirstWidth()) * hidden();
    return r < FirstWidth() ? static_cast<int64_t>(r) * hidden()
                            : first + static_cast<int64_t>(r - FirstWidth()) * inner();
  }
  MOE_HD QuantRow ExpandedRow(const uint8_t* slot, int r) const {
    return r < FirstWidth() ? FirstRow(slot, r) : DownRow(slot, r - FirstWidth());
  }
};

}  // namespace moe::device_math

#endif  // MOE_ENGINE_CUDA_QUANTIZED_LAYOUT_H_
