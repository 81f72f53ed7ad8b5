// The inner kernels of the panel FFN (engine/panel_ffn.h): a block of up to
// kMaxBlockRows rows times one weight panel, and vectorised activations.
// They are built for AVX-512 (with AVX512_BF16 for bf16) in a translation
// unit of their own, and must only be called when PanelKernelsSupported says
// the CPU has those instructions. Pure functions: thread-safe.
//
// Layouts ([PANEL_LAYOUT]; engine/panel_ffn.cc packs them):
// - A "step" is 4 bytes of a row: a pair of bf16 values (k, k+1) in bf16
//   compute, one fp32 value in fp32 compute.
// - A row block of `mr` rows is step-major: block[s * mr + i] is step s of
//   row i, so every step's broadcasts come from one cache line.
// - A weight panel covers kPanelColumns output columns: panel[s * 32 + c] is
//   step s of column c (for bf16, the pair W[c, 2s], W[c, 2s + 1]), 128
//   bytes per step, 64-byte aligned.
#ifndef MOE_ENGINE_PANEL_KERNELS_H_
#define MOE_ENGINE_PANEL_KERNELS_H_

#include <cstdint>

#include "engine/model_spec.h"

namespace moe {

inline constexpr int kMaxBlockRows = 12;
inline constexpr int kPanelColumns = 32;

// True when this CPU runs the kernels for `compute` (kF32 needs AVX-512F,
// kBF16 also AVX512_BF16).
bool PanelKernelsSupported(DType compute);

// tile[i * 32 + c] = sum over s < steps of row i of `block` times column c of
// `panel`, for i < mr (1..kMaxBlockRows), accumulated in fp32 in step order:
// a row's result does not depend on the other rows of its block.
// `prefetch`, if not null, is the start of steps * 128 bytes that the loop
// prefetches into L2 as it goes (one panel's worth of another stream), so
// that a compute-bound block also keeps memory busy.
void MultiplyBlockPanel(DType compute, const uint32_t* block, int mr, const uint32_t* panel, int64_t steps, float* tile,
                        const void* prefetch = nullptr);

// The first projection's epilogue on one tile row, in place: GLU:
// row[c] = act(row[c]) * row[16 + c] for c < 16; MLP: row[c] = act(row[c] +
// bias[c]) for c < 32.
void ActivateTileRow(ExpertKind kind, Activation act, const float* bias, float* row);

// out[s * stride + i] = step s of rows[i] (`count` fp32 values each) in the
// compute dtype, for s < steps and i < num_rows (1..16); bf16 rounds to
// nearest even and pads an odd count with zero. A row block is written with
// stride num_rows.
void WriteRowSteps(DType compute, const float* const* rows, int num_rows, int64_t count, int64_t steps, uint32_t* out,
                   int64_t stride);

// out[c] = row[c] (+ bias[c] when bias is not null), c < width <= 32.
void StoreTileRow(const float* row, const float* bias, int width, float* out);

}  // namespace moe

#endif  // MOE_ENGINE_PANEL_KERNELS_H_
