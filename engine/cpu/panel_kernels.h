// The inner kernels of the panel FFN (engine/cpu/panel_ffn.h): a block of up to
// kMaxBlockRows rows times one weight panel, and the epilogues and row
// conversions around it. One implementation per CPU path (engine/api/cpu_path.h),
// each in a translation unit of its own built for its instruction set:
// AVX-512 (panel_kernels_avx512.cc), AVX2 + FMA (panel_kernels_avx2.cc) and
// portable C++ (panel_kernels_portable.cc, the reference). A path's kernels
// must only be called when CpuPathSupported says the CPU runs it. Pure
// functions: thread-safe.
//
// Layouts, the same on every path ([PANEL_LAYOUT]; engine/cpu/panel_ffn.cc packs them):
// - A "step" is 4 bytes of a row: a pair of bf16 values (k, k+1) in bf16
//   compute (k in the low half), one fp32 value in fp32 compute.
// - A row block of `mr` rows is step-major: block[s * mr + i] is step s of
//   row i, so every step's broadcasts come from one cache line.
// - A weight panel covers kPanelColumns output columns: panel[s * 32 + c] is
//   step s of column c (for bf16, the pair W[c, 2s], W[c, 2s + 1]), 128
//   bytes per step, 64-byte aligned.
//
// Quantized weight panels ([QUANT_PANEL_LAYOUT], engine/api/quantized.h's
// formats): a "pair step" is two values of a row, k and k + 1 (k even):
// - kFp8Block: 64 bytes a pair step, byte 2c + j = column c's value k + j;
// - kMxfp4: 32 bytes a pair step, byte c = column c's pair, k in the low
//   nibble.
// Pair steps come in scale groups (group_steps of them, the same on a
// panel); each group's scales, one per column, follow each other in a table
// of their own: 32 fp32 multipliers (kFp8Block) or 32 e8m0 bytes (kMxfp4).
// The kernels expand them into the compute dtype's steps (ExpandQuantized)
// by the published rule, code x scale in fp32, rounded to bf16 in bf16
// compute, so that a quantized panel computes exactly as a bf16 or fp32
// panel of its dequantized weights.
//
// Numerics, on every path: tile entries are fp32 sums in step order (within a
// bf16 step, k before k + 1), so a row's result does not depend on the other
// rows of its block; the paths differ from each other only in rounding (a
// fused multiply-add or not, the AVX-512 BF16 pair product).
#ifndef MOE_ENGINE_CPU_PANEL_KERNELS_H_
#define MOE_ENGINE_CPU_PANEL_KERNELS_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/api/cpu_path.h"
#include "engine/api/model_spec.h"
#include "engine/api/quantized.h"

namespace moe {

inline constexpr int kMaxBlockRows = 12;
inline constexpr int kPanelColumns = 32;

// ExpertKind::kClampedSwiglu's constants (ModelSpec::swiglu_alpha, swiglu_limit).
struct SwigluClamp {
  float alpha = 1.702f;
  float limit = 7.0f;
};

// gpt-oss's clamped SwiGLU on one tile row, in place: with bias[c] on the
// gate column c and bias[16 + c] on the up column, row[c] = (u + 1) * g *
// sigmoid(alpha * g) for c < 16, g = min(gate, limit), u = clamp(up, -limit,
// limit). Every path runs this scalar form: next to the two projections it
// is a small share of an expert's work.
inline void ClampedSwigluTileRow(const float* bias, const SwigluClamp& clamp, float* row) {
  constexpr int kHalf = kPanelColumns / 2;
  for (int c = 0; c < kHalf; ++c) {
    const float gate = std::min(row[c] + bias[c], clamp.limit);
    const float up = std::clamp(row[kHalf + c] + bias[kHalf + c], -clamp.limit, clamp.limit);
    row[c] = (up + 1.0f) * (gate / (1.0f + std::exp(-clamp.alpha * gate)));
  }
}

struct PanelKernels {
  CpuPath path = CpuPath::kPortable;

  // In the runner's cost model: streaming a panel step from memory costs
  // about as much as computing this many rows of it, per compute dtype
  // ([0]: fp32, [1]: bf16). Tasks with more rows are compute-bound.
  int memory_cost_rows[2] = {12, 12};

  // tile[i * 32 + c] = sum over s < steps of row i of `block` times column c
  // of `panel`, for i < mr (1..kMaxBlockRows), added to what the tile holds
  // when `accumulate` (the sums go on in step order, as if the steps had
  // been one call's). `prefetch`, if not null, is
  // the start of steps * 128 bytes that the loop prefetches into L2 as it
  // goes (one panel's worth of another stream), so that a compute-bound
  // block also keeps memory busy; paths may ignore it.
  void (*multiply_block_panel)(DType compute, const uint32_t* block, int mr, const uint32_t* panel, int64_t steps,
                               float* tile, const void* prefetch, bool accumulate) = nullptr;

  // [QUANT_PANEL_LAYOUT] Expands `pair_steps` pair steps of a quantized
  // panel, from `values` (the first of a scale group, whose scales are at
  // `scales`, the next group's right after) into `out`: as many bf16 steps
  // (kBF16) or twice as many fp32 steps (kF32) of a plain panel.
  void (*expand_quantized)(QuantFormat format, DType compute, int64_t group_steps, const uint8_t* values,
                           const void* scales, int64_t pair_steps, uint32_t* out) = nullptr;

  // [QUANT_PANEL_LAYOUT] tile = `block` (mr rows, bf16 compute) times a
  // whole quantized panel of `pair_steps` pair steps (`values` and `scales`
  // as expand_quantized's), each step expanded in registers: the same sums,
  // in the same order, as expand_quantized then multiply_block_panel. Where
  // a block is alone against a panel it saves the round trip through
  // memory and hides the products' latency behind the decoding. Null on
  // paths without it.
  void (*multiply_block_quantized_panel)(QuantFormat format, int64_t group_steps, const uint8_t* values,
                                         const void* scales, const uint32_t* block, int mr, int64_t pair_steps,
                                         float* tile) = nullptr;

  // The first projection's epilogue on one tile row, in place: GLU:
  // row[c] = act(row[c]) * row[16 + c] for c < 16; MLP: row[c] = act(row[c] +
  // bias[c]) for c < 32; clamped SwiGLU: ClampedSwigluTileRow.
  void (*activate_tile_row)(ExpertKind kind, Activation act, const float* bias, const SwigluClamp& clamp,
                            float* row) = nullptr;

  // out[s * stride + i] = step s of rows[i] (`count` fp32 values each) in the
  // compute dtype, for s < steps and i < num_rows (1..16); bf16 rounds to
  // nearest even and pads an odd count with zero. A row block is written
  // with stride num_rows.
  void (*write_row_steps)(DType compute, const float* const* rows, int num_rows, int64_t count, int64_t steps,
                          uint32_t* out, int64_t stride) = nullptr;

  // out[c] = row[c] (+ bias[c] when bias is not null), c < width <= 32.
  void (*store_tile_row)(const float* row, const float* bias, int width, float* out) = nullptr;
};

// The kernels of a concrete, supported path (not kAuto).
const PanelKernels& PanelKernelsFor(CpuPath path);

// Each path's table, defined in its own translation unit.
const PanelKernels& PortablePanelKernels();
#if defined(__x86_64__)
const PanelKernels& Avx2PanelKernels();
const PanelKernels& Avx512PanelKernels();
#endif

}  // namespace moe

#endif  // MOE_ENGINE_CPU_PANEL_KERNELS_H_
