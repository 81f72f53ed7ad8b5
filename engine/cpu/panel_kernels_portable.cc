// The portable path's panel kernels (engine/cpu/panel_kernels.h): plain C++ that
// any CPU runs (x86 without AVX2, aarch64, ...), and the reference the vector
// paths are tested against. Built with -ffp-contract=off (engine/CMakeLists.txt),
// so that every product is rounded before it is added, on every target: no
// compiler fuses them on one CPU and not on another.
#include <cmath>
#include <cstring>

#include "engine/api/dtype.h"
#include "engine/cpu/panel_kernels.h"

namespace moe {
namespace {

float LowBf16(uint32_t pair) { return Bf16ToFloat(static_cast<uint16_t>(pair & 0xFFFFu)); }
float HighBf16(uint32_t pair) { return Bf16ToFloat(static_cast<uint16_t>(pair >> 16)); }
float BitsToFloat(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

// [PANEL_LAYOUT]
void MultiplyBlockPanel(DType compute, const uint32_t* block, int mr, const uint32_t* panel, int64_t steps, float* tile,
                        const void* /*prefetch*/, bool accumulate) {
  float acc[kMaxBlockRows][kPanelColumns] = {};
  if (accumulate) std::memcpy(acc, tile, sizeof(float) * kPanelColumns * mr);
  const bool bf16 = compute == DType::kBF16;
  for (int64_t s = 0; s < steps; ++s) {
    const uint32_t* w = panel + s * kPanelColumns;
    for (int i = 0; i < mr; ++i) {
      const uint32_t a = block[s * mr + i];
      if (bf16) {
        const float low = LowBf16(a), high = HighBf16(a);
        for (int c = 0; c < kPanelColumns; ++c) {
          acc[i][c] += low * LowBf16(w[c]);
          acc[i][c] += high * HighBf16(w[c]);
        }
      } else {
        const float x = BitsToFloat(a);
        for (int c = 0; c < kPanelColumns; ++c) acc[i][c] += x * BitsToFloat(w[c]);
      }
    }
  }
  std::memcpy(tile, acc, sizeof(float) * kPanelColumns * mr);
}

// [QUANT_PANEL_LAYOUT] The published rules, value by value.
void ExpandQuantized(QuantFormat format, DType compute, int64_t group_steps, const uint8_t* values, const void* scales,
                     int64_t pair_steps, uint32_t* out) {
  static const auto* e4m3 = [] {
    auto* table = new float[256];
    for (int code = 0; code < 256; ++code) table[code] = E4m3ToFloat(static_cast<uint8_t>(code));
    return table;
  }();
  for (int64_t s = 0; s < pair_steps; ++s) {
    const int64_t group = s / group_steps;
    for (int c = 0; c < kPanelColumns; ++c) {
      float pair[2];
      if (format == QuantFormat::kFp8Block) {
        const float scale = static_cast<const float*>(scales)[group * kPanelColumns + c];
        for (int j = 0; j < 2; ++j) pair[j] = e4m3[values[s * 64 + 2 * c + j]] * scale;
      } else {
        const float scale = E8m0ToFloat(static_cast<const uint8_t*>(scales)[group * kPanelColumns + c]);
        const uint8_t byte = values[s * 32 + c];
        pair[0] = E2m1ToFloat(byte & 0xF) * scale;
        pair[1] = E2m1ToFloat(byte >> 4) * scale;
      }
      if (compute == DType::kBF16) {
        out[s * kPanelColumns + c] = FloatToBf16(pair[0]) | static_cast<uint32_t>(FloatToBf16(pair[1])) << 16;
      } else {
        std::memcpy(&out[2 * s * kPanelColumns + c], &pair[0], 4);
        std::memcpy(&out[(2 * s + 1) * kPanelColumns + c], &pair[1], 4);
      }
    }
  }
}

float Activate(Activation act, float x) {
  switch (act) {
    case Activation::kSilu:
      return x / (1.0f + std::exp(-x));
    case Activation::kGelu:
      return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f));
    case Activation::kGeluTanh:
      return 0.5f * x * (1.0f + std::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::kRelu:
      return x > 0.0f ? x : 0.0f;
  }
  return x;
}

void ActivateTileRow(ExpertKind kind, Activation act, const float* bias, const SwigluClamp& clamp, float* row) {
  if (kind == ExpertKind::kClampedSwiglu) return ClampedSwigluTileRow(bias, clamp, row);
  if (kind == ExpertKind::kGlu) {
    for (int c = 0; c < kPanelColumns / 2; ++c) row[c] = Activate(act, row[c]) * row[kPanelColumns / 2 + c];
    return;
  }
  for (int c = 0; c < kPanelColumns; ++c) row[c] = Activate(act, row[c] + bias[c]);
}

void WriteRowSteps(DType compute, const float* const* rows, int num_rows, int64_t count, int64_t steps, uint32_t* out,
                   int64_t stride) {
  const bool bf16 = compute == DType::kBF16;
  for (int i = 0; i < num_rows; ++i) {
    const float* row = rows[i];
    for (int64_t s = 0; s < steps; ++s) {
      uint32_t step;
      if (bf16) {
        const float low = 2 * s < count ? row[2 * s] : 0.0f;
        const float high = 2 * s + 1 < count ? row[2 * s + 1] : 0.0f;
        step = static_cast<uint32_t>(FloatToBf16(low)) | static_cast<uint32_t>(FloatToBf16(high)) << 16;
      } else {
        const float value = s < count ? row[s] : 0.0f;
        std::memcpy(&step, &value, 4);
      }
      out[s * stride + i] = step;
    }
  }
}

void StoreTileRow(const float* row, const float* bias, int width, float* out) {
  for (int c = 0; c < width; ++c) out[c] = bias ? row[c] + bias[c] : row[c];
}

}  // namespace

const PanelKernels& PortablePanelKernels() {
  static const PanelKernels kernels{.path = CpuPath::kPortable,
                                    .memory_cost_rows = {2, 1},
                                    .multiply_block_panel = MultiplyBlockPanel,
                                    .expand_quantized = ExpandQuantized,
                                    .activate_tile_row = ActivateTileRow,
                                    .write_row_steps = WriteRowSteps,
                                    .store_tile_row = StoreTileRow};
  return kernels;
}

}  // namespace moe
