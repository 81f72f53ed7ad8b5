#include "engine/cuda/quantized_pack.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"

namespace moe::cuda {
namespace {

namespace dm = ::moe::device_math;

int64_t Align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

absl::StatusOr<dm::QuantMatrix> PlanMatrix(const QuantizedMatrix& q, const char* name) {
  if (q.format != QuantFormat::kFp8Block && q.format != QuantFormat::kMxfp4) {
    return absl::InvalidArgumentError(absl::StrCat(name, " is not quantized: the experts of a layer are held",
                                                   " quantized on the device only when all of them are"));
  }
  if (q.format == QuantFormat::kMxfp4 && q.columns % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, " ", q.Describe(), ": an odd number of e2m1 columns"));
  }
  dm::QuantMatrix m;
  m.kind = q.format == QuantFormat::kFp8Block ? dm::QuantKind::kFp8 : dm::QuantKind::kMxfp4;
  m.rows = static_cast<int>(q.rows);
  m.columns = static_cast<int>(q.columns);
  m.block_rows = static_cast<int>(q.block_rows);
  m.block_columns = static_cast<int>(q.block_columns);
  m.row_offset = static_cast<int>(q.first_row % q.block_rows);
  return m;
}

bool SameShape(const dm::QuantMatrix& a, const dm::QuantMatrix& b) {
  return a.kind == b.kind && a.rows == b.rows && a.columns == b.columns && a.block_rows == b.block_rows &&
         a.block_columns == b.block_columns && a.row_offset == b.row_offset;
}

// One matrix's codes and scales into the slot, where `m` says.
absl::Status PackMatrix(const QuantizedMatrix& q, const dm::QuantMatrix& m, const char* name, uint8_t* slot) {
  ASSIGN_OR_RETURN(const dm::QuantMatrix planned, PlanMatrix(q, name));
  if (!SameShape(planned, m)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " ", q.Describe(), " is laid out unlike the same matrix of the layer's other experts"));
  }
  const int64_t row_bytes = m.RowBytes();
  for (int64_t r = 0; r < m.rows; ++r) {
    const uint8_t* row = q.values + r * q.value_stride;
    if (m.kind == dm::QuantKind::kFp8) {
      const uint8_t* nan = std::find_if(row, row + row_bytes, [](uint8_t code) { return (code & 0x7F) == 0x7F; });
      if (nan != row + row_bytes) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " ", q.Describe(), ": the value at [", r, ", ", nan - row, "] is NaN"));
      }
    }
    std::memcpy(slot + m.code_offset + r * row_bytes, row, static_cast<size_t>(row_bytes));
  }
  const size_t scale_size = m.kind == dm::QuantKind::kFp8 ? 4 : 1;
  for (int64_t b = 0; b < m.ScaleRows(); ++b) {
    for (int64_t j = 0; j < m.ScaleColumns(); ++j) {
      // A row of block row b, as the view counts its rows (may be before row 0).
      const int64_t index = q.ScaleIndex(b * m.block_rows - m.row_offset, j * m.block_columns);
      const uint8_t* scale = static_cast<const uint8_t*>(q.scales) + index * scale_size;
      if (m.kind == dm::QuantKind::kMxfp4 && *scale == 0xFF) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " ", q.Describe(), ": the scale of block [", b, ", ", j, "] is NaN (e8m0 0xFF)"));
      }
      std::memcpy(slot + m.scale_offset + (b * m.ScaleColumns() + j) * scale_size, scale, scale_size);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<dm::QuantFfnLayout> PlanQuantizedFfn(const FfnWeights& ffn, bool two_products) {
  dm::QuantFfnLayout layout;
  layout.two_products = two_products;
  ASSIGN_OR_RETURN(layout.w1, PlanMatrix(ffn.q1, "w1"));
  if (two_products) {
    ASSIGN_OR_RETURN(layout.w3, PlanMatrix(ffn.q3, "w3"));
  }
  ASSIGN_OR_RETURN(layout.w2, PlanMatrix(ffn.q2, "w2"));
  layout.kind = layout.w1.kind;
  if ((two_products && layout.w3.kind != layout.kind) || layout.w2.kind != layout.kind) {
    return absl::InvalidArgumentError("an expert's matrices are quantized in different formats");
  }
  int64_t at = 0;
  dm::QuantMatrix* matrices[3] = {&layout.w1, two_products ? &layout.w3 : nullptr, &layout.w2};
  for (dm::QuantMatrix* m : matrices) {
    if (!m) continue;
    m->code_offset = at;
    at += Align16(m->CodeBytes());
  }
  for (dm::QuantMatrix* m : matrices) {
    if (!m) continue;
    m->scale_offset = at;
    at += Align16(m->ScaleBytes());
  }
  layout.slot_bytes = at;
  return layout;
}

absl::Status PackQuantizedFfn(const FfnWeights& ffn, const dm::QuantFfnLayout& layout, uint8_t* slot) {
  std::memset(slot, 0, static_cast<size_t>(layout.slot_bytes));
  RETURN_IF_ERROR(PackMatrix(ffn.q1, layout.w1, "w1", slot));
  if (layout.two_products) RETURN_IF_ERROR(PackMatrix(ffn.q3, layout.w3, "w3", slot));
  return PackMatrix(ffn.q2, layout.w2, "w2", slot);
}

}  // namespace moe::cuda
