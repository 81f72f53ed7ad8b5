#include <cuda_bf16.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <type_traits>

#include "engine/cuda/kernels.h"

namespace moe::cuda {
namespace {

namespace dm = ::moe::device_math;

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int64_t Blocks(int64_t work, int threads = kThreads) { return (work + threads - 1) / threads; }

__device__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ float Load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

__device__ void Store(float* p, int64_t i, float v) { p[i] = v; }
__device__ void Store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// The value `v` takes once stored as `storage`.
__device__ float RoundTo(Storage storage, float v) { return storage == Storage::kBF16 ? dm::RoundBf16(v) : v; }

// Calls f with a typed null pointer of `storage`'s element type (dispatch
// of a runtime storage to a template).
template <typename F>
void WithStorage(Storage storage, F&& f) {
  if (storage == Storage::kBF16) {
    f(static_cast<__nv_bfloat16*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

template <typename T>
__device__ T BlockSum(T value, T* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < (blockDim.x + kWarp - 1) / kWarp; ++w) total += shared[w];
    shared[0] = total;
  }
  __syncthreads();
  total = shared[0];
  __syncthreads();
  return total;
}

__global__ void RmsNormKernel(const float* x, int hidden, const float* weight, float eps, Storage round_to,
                              float* out) {
  __shared__ double partial[kThreads / kWarp];
  const float* row = x + static_cast<int64_t>(blockIdx.x) * hidden;
  float* y = out + static_cast<int64_t>(blockIdx.x) * hidden;
  double sum = 0;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) sum += static_cast<double>(row[i]) * row[i];
  sum = BlockSum(sum, partial);
  const float scale = 1.0f / sqrtf(static_cast<float>(sum / hidden) + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float normed = RoundTo(round_to, __fmul_rn(row[i], scale));
    y[i] = RoundTo(round_to, __fmul_rn(weight[i], normed));
  }
}

template <typename T>
__global__ void GatherConvertKernel(const float* in, const int32_t* index, const float* scale, int64_t rows, int hidden,
                                    T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * hidden) return;
  const int64_t r = i / hidden, c = i % hidden;
  const int64_t from = index ? index[r] : r;
  const float value = in[from * hidden + c];
  Store(out, i, scale ? __fmul_rn(value, scale[r]) : value);
}

__global__ void RowScalesKernel(int64_t n, const int32_t* slot_row, const float* weight, bool round_bf16,
                                float* row_scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && slot_row[i] >= 0) row_scale[slot_row[i]] = round_bf16 ? dm::RoundBf16(weight[i]) : weight[i];
}

// The activation of output column c from its gate (or only) product and
// its up product, with its expert's first biases (b1, then b3 at inner + c;
// or null).
__device__ float ActivateTwo(const Activation& a, float gate, float up, int inner, int c, const float* bias) {
  switch (a.form) {
    case FfnForm::kGlu:
      return __fmul_rn(dm::Activate(a.act, gate), up);
    case FfnForm::kMlp:
      return dm::Activate(a.act, bias ? __fadd_rn(gate, bias[c]) : gate);
    case FfnForm::kClampedSwiglu:
      return dm::ClampedSwiglu(__fadd_rn(gate, bias[c]), __fadd_rn(up, bias[inner + c]), a.alpha, a.limit);
  }
  return 0.0f;
}

__global__ void SelectKernel(dm::SelectionParams params, const float* logits, int tokens, int columns,
                             const float* logit_bias, const float* bias, int32_t* expert, float* weight) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  dm::SelectionScratch scratch;
  dm::SelectToken(params, logits + static_cast<int64_t>(t) * columns, logit_bias, bias, scratch,
                  expert + static_cast<int64_t>(t) * params.top_k, weight + static_cast<int64_t>(t) * params.top_k);
}

__global__ void CountKernel(const int32_t* key, dm::Order order, int T, int S, int E, int64_t chunks, int32_t* counts) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk < chunks) dm::CountChunk(chunk, key, order, T, S, E, counts);
}

__global__ void ScanKernel(int64_t chunks, int E, int32_t* counts, int32_t* total) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e < E) dm::ScanChunks(e, chunks, E, counts, total);
}

__global__ void RankKernel(const int32_t* key, dm::Order order, int T, int S, int E, int64_t chunks, int32_t* counts,
                           int32_t* rank) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (chunk < chunks) dm::RankChunk(chunk, key, order, T, S, E, counts, rank);
}

__global__ void KeptKeyKernel(const int32_t* expert, int64_t n, int64_t capacity, const int32_t* priority_rank,
                              int32_t* kept_key) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) kept_key[i] = dm::KeptKey(expert[i], capacity, priority_rank ? priority_rank[i] : 0);
}

__global__ void FinishCountsKernel(int E, const int32_t* routed_total, const int32_t* kept_total, int64_t* out) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    dm::FinishCounts(E, routed_total, kept_total, out, out + E + 1, out + 2 * E + 1);
}

__global__ void PlaceKernel(int64_t n, int S, const int32_t* kept_key, const int32_t* kept_rank, const int64_t* offsets,
                            int32_t* slot_row, int32_t* row_token, int32_t* row_expert) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dm::PlaceSelection(i, S, kept_key, kept_rank, offsets, slot_row, row_token, row_expert);
}

// One counting pass (count, scan, rank) of `key` in `order`.
void CountingPass(const int32_t* key, dm::Order order, int T, int S, int E, int32_t* counts, int32_t* total,
                  int32_t* rank, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(T) * S;
  const int64_t chunks = (n + dm::kChunk - 1) / dm::kChunk;
  cudaMemsetAsync(counts, 0, static_cast<size_t>(chunks) * E * sizeof(int32_t), stream);
  CountKernel<<<Blocks(chunks), kThreads, 0, stream>>>(key, order, T, S, E, chunks, counts);
  ScanKernel<<<Blocks(E), kThreads, 0, stream>>>(chunks, E, counts, total);
  RankKernel<<<Blocks(chunks), kThreads, 0, stream>>>(key, order, T, S, E, chunks, counts, rank);
}

template <typename T>
__global__ void ActivateKernel(const float* h, int64_t rows, int inner, Activation activation, const float* bias,
                               const int32_t* row_slot, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * inner) return;
  const int64_t r = i / inner, c = i % inner;
  const int width = FirstWidth(activation.form, inner);
  const int bias_width = activation.form == FfnForm::kClampedSwiglu ? 2 * inner : inner;
  const float* row_bias = bias ? bias + static_cast<int64_t>(row_slot ? row_slot[r] : 0) * bias_width : nullptr;
  const float* products = h + r * width;
  const float up = activation.form == FfnForm::kMlp ? 0.0f : products[inner + c];
  Store(out, i, ActivateTwo(activation, products[c], up, inner, static_cast<int>(c), row_bias));
}

__global__ void AddRowBiasKernel(float* rows, int64_t count, int hidden, const float* bias, const int32_t* row_slot) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count * hidden) return;
  const int64_t r = i / hidden, c = i % hidden;
  rows[i] = __fadd_rn(rows[i], bias[static_cast<int64_t>(row_slot ? row_slot[r] : 0) * hidden + c]);
}

__global__ void RowSlotsKernel(const int32_t* row_expert, const int32_t* slot_of, int64_t rows, int32_t* row_slot) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) row_slot[r] = slot_of[row_expert[r]];
}

// ---- Decode path --------------------------------------------------------

// Output columns one decode block computes: one warp per column at a time.
constexpr int kDecodeColumns = 64;

// A warp's dot product of a weight row w[n] with x[n] (shared memory),
// summed over lanes in a fixed order: the same for every run.
template <typename T>
__device__ float WarpDot(const T* w, const float* x, int n) {
  float sum = 0;
  for (int i = threadIdx.x % kWarp; i < n; i += kWarp) sum = fmaf(Load(w, i), x[i], sum);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

// WarpDot of a quantized row: each weight is the published rule's value,
// rounded to the storage as a stored weight is, and the sum is WarpDot's
// over the dequantized row, term for term. Where a scale block spans whole
// warp strides (block_columns a multiple of 32: FP8's 128, MXFP4's 32), a
// lane takes each block's scale once and still visits its columns in
// WarpDot's order.
__device__ float WarpDotQuantized(const dm::QuantRow& weights, Storage storage, const float* x, int n) {
  const int lane = threadIdx.x % kWarp;
  float sum = 0;
  if (weights.block_columns % kWarp == 0) {
    for (int b0 = 0, block = 0; b0 < n; b0 += weights.block_columns, ++block) {
      const float scale = weights.Scale(block);
      const int end = b0 + weights.block_columns < n ? b0 + weights.block_columns : n;
      for (int i = b0 + lane; i < end; i += kWarp) sum = fmaf(RoundTo(storage, weights.Code(i) * scale), x[i], sum);
    }
  } else {
    for (int i = lane; i < n; i += kWarp) sum = fmaf(RoundTo(storage, weights.Value(i)), x[i], sum);
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

// [DEVICE_QUANT_LAYOUT] The quantized slot `slot` of `ffn`, or null when its
// weights are stored values.
__device__ const uint8_t* QuantSlot(const DecodeFfn& ffn, int slot) {
  if (ffn.quant.kind == dm::QuantKind::kNone) return nullptr;
  return static_cast<const uint8_t*>(ffn.first) + static_cast<int64_t>(slot) * ffn.quant.slot_bytes;
}

// grid: (selections, column blocks of `inner`). Shared: the token's row.
template <typename T>
__global__ void DecodeFirstKernel(DecodeFfn ffn, const float* normed, const int32_t* expert, const int32_t* slot_row,
                                  int slots, T* act_out) {
  extern __shared__ float row[];
  const int selection = blockIdx.x;
  const int32_t out_row = slot_row[selection];
  if (out_row < 0) return;  // unused slot or dropped: no row
  const int hidden = ffn.hidden, inner = ffn.inner;
  const int token = selection / slots;
  float scale = 1.0f;
  if (ffn.input_scale) {
    scale = ffn.round_scale ? dm::RoundBf16(ffn.input_scale[selection]) : ffn.input_scale[selection];
  }
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float x = RoundTo(ffn.storage, normed[static_cast<int64_t>(token) * hidden + i]);
    row[i] = ffn.input_scale ? RoundTo(ffn.storage, __fmul_rn(x, scale)) : x;
  }
  __syncthreads();
  const int slot = ffn.slot_of[expert[selection]];
  const FfnForm form = ffn.activation.form;
  const int64_t width = FirstWidth(form, inner);
  const uint8_t* quantized = QuantSlot(ffn, slot);
  const T* first = quantized ? nullptr : static_cast<const T*>(ffn.first) + static_cast<int64_t>(slot) * width * hidden;
  const int bias_width = form == FfnForm::kClampedSwiglu ? 2 * inner : inner;
  const float* bias = ffn.first_bias ? ffn.first_bias + static_cast<int64_t>(slot) * bias_width : nullptr;
  // Row r of the first matrix against the token's row.
  const auto dot = [&](int64_t r) {
    if (!quantized) return WarpDot(first + r * hidden, row, hidden);
    return WarpDotQuantized(ffn.quant.FirstRow(quantized, r), ffn.storage, row, hidden);
  };
  const int warps = blockDim.x / kWarp;
  const int begin = blockIdx.y * kDecodeColumns;
  for (int c = begin + threadIdx.x / kWarp; c < begin + kDecodeColumns && c < inner; c += warps) {
    // The column's first products, laid out as LaunchActivate reads them.
    float h[2] = {dot(c), 0.0f};
    if (form != FfnForm::kMlp) h[1] = dot(static_cast<int64_t>(inner) + c);
    const float value = ActivateTwo(ffn.activation, h[0], h[1], inner, c, bias);
    if (threadIdx.x % kWarp == 0) Store(act_out, static_cast<int64_t>(out_row) * inner + c, value);
  }
}

// grid: (selections, column blocks of `hidden`). Shared: the row's activation.
template <typename T>
__global__ void DecodeDownKernel(DecodeFfn ffn, const T* act, const int32_t* expert, const int32_t* slot_row,
                                 float* expert_out) {
  extern __shared__ float row[];
  const int selection = blockIdx.x;
  const int32_t out_row = slot_row[selection];
  if (out_row < 0) return;
  const int hidden = ffn.hidden, inner = ffn.inner;
  for (int i = threadIdx.x; i < inner; i += blockDim.x) row[i] = Load(act, static_cast<int64_t>(out_row) * inner + i);
  __syncthreads();
  const int slot = ffn.slot_of[expert[selection]];
  const uint8_t* quantized = QuantSlot(ffn, slot);
  const T* down = quantized ? nullptr : static_cast<const T*>(ffn.down) + static_cast<int64_t>(slot) * hidden * inner;
  const int warps = blockDim.x / kWarp;
  const int begin = blockIdx.y * kDecodeColumns;
  for (int c = begin + threadIdx.x / kWarp; c < begin + kDecodeColumns && c < hidden; c += warps) {
    float value = quantized ? WarpDotQuantized(ffn.quant.DownRow(quantized, c), ffn.storage, row, inner)
                            : WarpDot(down + static_cast<int64_t>(c) * inner, row, inner);
    if (ffn.down_bias) value = __fadd_rn(value, ffn.down_bias[static_cast<int64_t>(slot) * hidden + c]);
    if (threadIdx.x % kWarp == 0) expert_out[static_cast<int64_t>(out_row) * hidden + c] = value;
  }
}

// grid: (rows, slots.count): a block per row of an expanded expert at a
// time, its threads along the row.
template <typename T>
__global__ void ExpandQuantizedKernel(dm::QuantFfnLayout layout, const uint8_t* slot_data, ExpandSlots slots, T* out) {
  const uint8_t* slot = slot_data + static_cast<int64_t>(slots.slot[blockIdx.y]) * layout.slot_bytes;
  T* expert = out + blockIdx.y * layout.ExpandedValues();
  for (int r = blockIdx.x; r < layout.ExpandedRows(); r += gridDim.x) {
    const dm::QuantRow row = layout.ExpandedRow(slot, r);
    T* to = expert + layout.ExpandedOffset(r);
    const int width = layout.ExpandedWidth(r);
    for (int c = threadIdx.x; c < width; c += blockDim.x) Store(to, c, row.Value(c));
  }
}

__global__ void GateSharedKernel(const float* normed, int hidden, const float* gate, float* shared) {
  __shared__ float partial[kThreads / kWarp];
  const int64_t at = static_cast<int64_t>(blockIdx.x) * hidden;
  float dot = 0;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) dot = fmaf(normed[at + i], gate[i], dot);
  dot = BlockSum(dot, partial);
  const float scale = 1.0f / (1.0f + dm::Exp(-dot));
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) shared[at + i] = __fmul_rn(shared[at + i], scale);
}

__global__ void CombineKernel(int tokens, int slots, int hidden, const int32_t* slot_row, const float* weights,
                              const float* expert_out, const float* residual, const float* shared, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(tokens) * hidden) return;
  const int t = static_cast<int>(i / hidden);
  out[i] = dm::CombineElement(t, i % hidden, slots, hidden, slot_row, weights, expert_out, residual, shared);
}

__global__ void RoutingOutKernel(int64_t n, const int32_t* expert, const float* weight, const int32_t* slot_row,
                                 int32_t* ids_out, float* weight_out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const bool kept = slot_row[i] >= 0;
  ids_out[i] = kept ? expert[i] : -1;
  weight_out[i] = kept ? weight[i] : 0.0f;
}

size_t DecodeSharedBytes(int values) { return static_cast<size_t>(values) * sizeof(float); }

}  // namespace

size_t StorageBytes(Storage storage) { return storage == Storage::kF32 ? 4 : 2; }

void LaunchRmsNorm(const float* x, int tokens, int hidden, const float* weight, float eps, Storage round_to, float* out,
                   cudaStream_t stream) {
  RmsNormKernel<<<tokens, kThreads, 0, stream>>>(x, hidden, weight, eps, round_to, out);
}

void LaunchGatherConvert(const float* in, const int32_t* index, const float* scale, int64_t rows, int hidden,
                         Storage storage, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  WithStorage(storage, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    GatherConvertKernel<<<Blocks(rows * hidden), kThreads, 0, stream>>>(in, index, scale, rows, hidden,
                                                                        static_cast<T*>(out));
  });
}

void LaunchRowScales(int64_t selections, const int32_t* slot_row, const float* weight, bool round_bf16,
                     float* row_scale, cudaStream_t stream) {
  RowScalesKernel<<<Blocks(selections), kThreads, 0, stream>>>(selections, slot_row, weight, round_bf16, row_scale);
}

void LaunchSelect(const dm::SelectionParams& params, const float* logits, int tokens, int columns,
                  const float* logit_bias, const float* bias, int32_t* expert, float* weight, cudaStream_t stream) {
  // Few threads a block: each holds a token's scratch in local memory.
  constexpr int kSelectThreads = 64;
  SelectKernel<<<Blocks(tokens, kSelectThreads), kSelectThreads, 0, stream>>>(params, logits, tokens, columns,
                                                                              logit_bias, bias, expert, weight);
}

size_t DispatchCountWords(int64_t selections, int num_experts) {
  return static_cast<size_t>((selections + dm::kChunk - 1) / dm::kChunk) * num_experts;
}

void LaunchDispatch(const int32_t* expert, int tokens, int slots, int num_experts, int64_t capacity,
                    const DispatchBuffers& b, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(tokens) * slots;
  const int E = num_experts;
  const int32_t* priority_rank = nullptr;
  if (capacity >= 0) {
    CountingPass(expert, dm::Order::kSlotMajor, tokens, slots, E, b.counts, b.routed_total, b.priority_rank, stream);
    priority_rank = b.priority_rank;
  }
  KeptKeyKernel<<<Blocks(n), kThreads, 0, stream>>>(expert, n, capacity, priority_rank, b.kept_key);
  CountingPass(b.kept_key, dm::Order::kTokenMajor, tokens, slots, E, b.counts, b.kept_total, b.kept_rank, stream);
  FinishCountsKernel<<<1, 1, 0, stream>>>(E, capacity >= 0 ? b.routed_total : b.kept_total, b.kept_total, b.counts_out);
  PlaceKernel<<<Blocks(n), kThreads, 0, stream>>>(n, slots, b.kept_key, b.kept_rank, b.counts_out, b.slot_row,
                                                  b.row_token, b.row_expert);
}

void LaunchActivate(const float* h, int64_t rows, int inner, const Activation& activation, const float* bias,
                    const int32_t* row_slot, Storage storage, void* out, cudaStream_t stream) {
  if (rows == 0) return;
  WithStorage(storage, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    ActivateKernel<<<Blocks(rows * inner), kThreads, 0, stream>>>(h, rows, inner, activation, bias, row_slot,
                                                                  static_cast<T*>(out));
  });
}

void LaunchAddRowBias(float* rows, int64_t count, int hidden, const float* bias, const int32_t* row_slot,
                      cudaStream_t stream) {
  if (count == 0) return;
  AddRowBiasKernel<<<Blocks(count * hidden), kThreads, 0, stream>>>(rows, count, hidden, bias, row_slot);
}

void LaunchRowSlots(const int32_t* row_expert, const int32_t* slot_of, int64_t rows, int32_t* row_slot,
                    cudaStream_t stream) {
  if (rows == 0) return;
  RowSlotsKernel<<<Blocks(rows), kThreads, 0, stream>>>(row_expert, slot_of, rows, row_slot);
}

bool PrepareDecodeKernels(int hidden, int inner) {
  int device = 0, most = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return false;
  }
  if (DecodeSharedBytes(hidden > inner ? hidden : inner) > static_cast<size_t>(most)) return false;
  // The limit is the kernel's on the device, shared by every executor on it:
  // raised once to the device's most, never lowered by a smaller model.
  static std::mutex mu;
  static std::set<int> prepared;
  std::lock_guard<std::mutex> lock(mu);
  if (prepared.count(device)) return true;
  bool ok = true;
  for (Storage storage : {Storage::kF32, Storage::kBF16}) {
    WithStorage(storage, [&](auto* typed) {
      using T = std::remove_pointer_t<decltype(typed)>;
      for (const void* kernel : {reinterpret_cast<const void*>(&DecodeFirstKernel<T>),
                                 reinterpret_cast<const void*>(&DecodeDownKernel<T>)}) {
        ok = ok && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most) == cudaSuccess;
      }
    });
  }
  if (ok) prepared.insert(device);
  return ok;
}

void LaunchDecodeFirst(const DecodeFfn& ffn, const float* normed, const int32_t* expert, const int32_t* slot_row,
                       int selections, int slots, void* act_out, cudaStream_t stream) {
  const dim3 grid(selections, (ffn.inner + kDecodeColumns - 1) / kDecodeColumns);
  WithStorage(ffn.storage, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    DecodeFirstKernel<<<grid, kThreads, DecodeSharedBytes(ffn.hidden), stream>>>(ffn, normed, expert, slot_row, slots,
                                                                                 static_cast<T*>(act_out));
  });
}

void LaunchDecodeDown(const DecodeFfn& ffn, const void* act, const int32_t* expert, const int32_t* slot_row,
                      int selections, float* expert_out, cudaStream_t stream) {
  const dim3 grid(selections, (ffn.hidden + kDecodeColumns - 1) / kDecodeColumns);
  WithStorage(ffn.storage, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    DecodeDownKernel<<<grid, kThreads, DecodeSharedBytes(ffn.inner), stream>>>(ffn, static_cast<const T*>(act), expert,
                                                                               slot_row, expert_out);
  });
}

void LaunchExpandQuantized(const dm::QuantFfnLayout& layout, const void* slot_data, const ExpandSlots& slots,
                           Storage storage, void* out, cudaStream_t stream) {
  if (slots.count == 0) return;
  constexpr int kMostBlocks = 1024;  // per expert: each block then walks the rest of the rows
  const dim3 grid(static_cast<unsigned>(std::min(layout.ExpandedRows(), kMostBlocks)), slots.count);
  WithStorage(storage, [&](auto* typed) {
    using T = std::remove_pointer_t<decltype(typed)>;
    ExpandQuantizedKernel<<<grid, kThreads, 0, stream>>>(layout, static_cast<const uint8_t*>(slot_data), slots,
                                                         static_cast<T*>(out));
  });
}

void LaunchGateShared(const float* normed, int tokens, int hidden, const float* gate, float* shared,
                      cudaStream_t stream) {
  GateSharedKernel<<<tokens, kThreads, 0, stream>>>(normed, hidden, gate, shared);
}

void LaunchCombine(int tokens, int slots, int hidden, const int32_t* slot_row, const float* weights,
                   const float* expert_out, const float* residual, const float* shared, float* out,
                   cudaStream_t stream) {
  CombineKernel<<<Blocks(static_cast<int64_t>(tokens) * hidden), kThreads, 0, stream>>>(
      tokens, slots, hidden, slot_row, weights, expert_out, residual, shared, out);
}

void LaunchRoutingOut(int64_t selections, const int32_t* expert, const float* weight, const int32_t* slot_row,
                      int32_t* ids_out, float* weight_out, cudaStream_t stream) {
  RoutingOutKernel<<<Blocks(selections), kThreads, 0, stream>>>(selections, expert, weight, slot_row, ids_out,
                                                                weight_out);
}

}  // namespace moe::cuda
