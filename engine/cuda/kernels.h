// The CUDA executor's kernels (engine/cuda/cuda_executor.h), each behind a
// launch function that enqueues it on a stream and returns at once. The
// per-thread logic they share with the host tests is in device_math.h; what
// is here is the arrangement of threads. Every launch is asynchronous and
// allocation-free; sizes come from the caller's planned buffers.
//
// Private to engine/cuda/: CUDA types are allowed here and nowhere above.
#ifndef MOE_ENGINE_CUDA_KERNELS_H_
#define MOE_ENGINE_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "engine/cuda/device_math.h"
#include "engine/cuda/quantized_layout.h"

namespace moe::cuda {

// How activations and weights are stored on the device: fp32 under fp32
// compute, bf16 under bf16 compute (an fp16 checkpoint too, as on the CPU).
enum class Storage { kF32, kBF16 };
size_t StorageBytes(Storage storage);

// out[t] = w * (x[t] / rms(x[t])), each product rounded to `round_to`
// storage (kF32: not rounded), as the CPU executor's RmsNorm. One block per
// token.
void LaunchRmsNorm(const float* x, int tokens, int hidden, const float* weight, float eps, Storage round_to, float* out,
                   cudaStream_t stream);

// out[r] = in[index[r]] (index null: in[r]), times scale[r] (null: 1),
// converted to `storage`, for `rows` rows of `hidden` values (may be 0).
void LaunchGatherConvert(const float* in, const int32_t* index, const float* scale, int64_t rows, int hidden,
                         Storage storage, void* out, cudaStream_t stream);

// Llama 4's expert input scale: row_scale[slot_row[i]] = weight[i] (rounded
// to bf16 when `round_bf16`) for every kept selection i.
void LaunchRowScales(int64_t selections, const int32_t* slot_row, const float* weight, bool round_bf16,
                     float* row_scale, cudaStream_t stream);

// Routing for `tokens` rows of logits [tokens, columns] by a device family:
// expert/weight [tokens, params.top_k]; logit_bias and bias [E] may be null
// (device_math::SelectToken). One thread per token.
void LaunchSelect(const device_math::SelectionParams& params, const float* logits, int tokens, int columns,
                  const float* logit_bias, const float* bias, int32_t* expert, float* weight, cudaStream_t stream);

// The dispatch's device memory for batches of up to max_selections (T * S)
// selections of E experts (sizes from DispatchWords).
struct DispatchBuffers {
  int32_t* counts = nullptr;         // [chunks * E]
  int32_t* priority_rank = nullptr;  // [T * S]
  int32_t* kept_key = nullptr;       // [T * S]
  int32_t* kept_rank = nullptr;      // [T * S]
  int32_t* routed_total = nullptr;   // [E]
  int32_t* kept_total = nullptr;     // [E]
  // Results.
  int64_t* counts_out = nullptr;  // [3E + 1]: offsets [E + 1], routed [E], dropped [E]
  int32_t* slot_row = nullptr;    // [T * S]
  int32_t* row_token = nullptr;   // [T * S]
  int32_t* row_expert = nullptr;  // [T * S]
};
// Words of DispatchBuffers::counts for `selections` selections of E experts.
size_t DispatchCountWords(int64_t selections, int num_experts);

// PlanDispatch on the device: from expert [T * S] (-1: unused slot) to
// buffers' results, with capacity < 0 for dropless.
void LaunchDispatch(const int32_t* expert, int tokens, int slots, int num_experts, int64_t capacity,
                    const DispatchBuffers& buffers, cudaStream_t stream);

// An expert FFN's first half, as engine/api/model_spec.h's ExpertKind.
enum class FfnForm { kGlu, kMlp, kClampedSwiglu };
struct Activation {
  FfnForm form = FfnForm::kGlu;
  device_math::Act act = device_math::Act::kSilu;  // kGlu, kMlp
  float alpha = 1.702f, limit = 7.0f;              // kClampedSwiglu
};
// Products per row of the first half: gate and up (kGlu, kClampedSwiglu), or one.
MOE_HD inline int FirstWidth(FfnForm form, int inner) { return form == FfnForm::kMlp ? inner : 2 * inner; }

// Activation of `rows` rows of products h [rows, FirstWidth] (gate columns
// then up columns): out [rows, inner] = act(gate) * up (kGlu), act(h + b1)
// (kMlp) or the clamped SwiGLU of gate + b1 and up + b3 (kClampedSwiglu),
// rounded to `storage`. bias: each held expert's [slots][inner] (b1), or
// [slots][2 * inner] (b1 then b3), null for none; row_slot: each row's held
// slot (null: bias row 0).
void LaunchActivate(const float* h, int64_t rows, int inner, const Activation& activation, const float* bias,
                    const int32_t* row_slot, Storage storage, void* out, cudaStream_t stream);

// rows[r] += b2[slot of row r] (row_slot null: row 0 of b2), [rows, hidden].
void LaunchAddRowBias(float* rows, int64_t count, int hidden, const float* bias, const int32_t* row_slot,
                      cudaStream_t stream);

// The held slot of each row from its expert: row_slot[r] = slot_of[row_expert[r]].
void LaunchRowSlots(const int32_t* row_expert, const int32_t* slot_of, int64_t rows, int32_t* row_slot,
                    cudaStream_t stream);

// Decode path, first half: for each kept selection i (slot_row[i] >= 0) of
// token i / slots, act_out[slot_row[i]] = the activation of the expert's
// first product(s) of that token's row of `normed` (rounded to `storage`;
// times input_scale[i] when given, Llama 4's expert(w * x)). Weights: first
// [held slots][FirstWidth][hidden] in `storage` and the first biases as
// LaunchActivate's. Sizes fixed by the selections.
struct DecodeFfn {
  const void* first = nullptr;
  const float* first_bias = nullptr;
  const void* down = nullptr;  // [held slots][hidden][inner]
  const float* down_bias = nullptr;
  const int32_t* slot_of = nullptr;  // [E]: held slot of each expert
  int hidden = 0, inner = 0;
  Activation activation;
  Storage storage = Storage::kBF16;
  const float* input_scale = nullptr;  // [selections] or null
  bool round_scale = false;            // round input_scale to bf16 first
  device_math::QuantFfnLayout quant;   // kind kNone: first and down hold `storage` values
};
void LaunchDecodeFirst(const DecodeFfn& ffn, const float* normed, const int32_t* expert, const int32_t* slot_row,
                       int selections, int slots, void* act_out, cudaStream_t stream);
// Decode path, second half: expert_out[row] = act[row] W2^T (+ b2).
void LaunchDecodeDown(const DecodeFfn& ffn, const void* act, const int32_t* expert, const int32_t* slot_row,
                      int selections, float* expert_out, cudaStream_t stream);
// Whether the decode kernels run rows of `hidden` and `inner` values on the
// current device (their row sits in shared memory); raises their shared
// memory limit to the device's most, once per device. Thread-safe.
bool PrepareDecodeKernels(int hidden, int inner);

// [DEVICE_QUANT_LAYOUT] The held quantized experts `slots[0 .. count)`
// (indices into `slot_data`, held slots of layout.slot_bytes each)
// expanded to `storage`: out[j] = expert slots[j]'s first matrix
// [FirstWidth, hidden] then its down matrix [hidden, inner], each weight
// code x scale rounded to the storage as a stored weight is.
struct ExpandSlots {
  static constexpr int kMax = 64;  // a kernel parameter: a fixed array
  int count = 0;
  int32_t slot[kMax] = {};
};
void LaunchExpandQuantized(const device_math::QuantFfnLayout& layout, const void* slot_data, const ExpandSlots& slots,
                           Storage storage, void* out, cudaStream_t stream);

// Qwen2-MoE: shared[t] *= sigmoid(normed[t] . gate). One block per token.
void LaunchGateShared(const float* normed, int tokens, int hidden, const float* gate, float* shared,
                      cudaStream_t stream);

// out[t] = residual[t] + shared[t] + sum over slots of weight * expert row
// (device_math::CombineElement; null residual/shared count as zero).
void LaunchCombine(int tokens, int slots, int hidden, const int32_t* slot_row, const float* weights,
                   const float* expert_out, const float* residual, const float* shared, float* out,
                   cudaStream_t stream);

// What a LayerStep's routing output wants: ids_out[i] = expert[i] where the
// selection was kept, else -1; weight_out[i] = its weight or 0.
void LaunchRoutingOut(int64_t selections, const int32_t* expert, const float* weight, const int32_t* slot_row,
                      int32_t* ids_out, float* weight_out, cudaStream_t stream);

}  // namespace moe::cuda

#endif  // MOE_ENGINE_CUDA_KERNELS_H_
