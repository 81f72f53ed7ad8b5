// Expert FFNs on the CPU with our own kernels (engine/cpu/panel_kernels.h: AVX-512,
// AVX2 or portable, chosen at run time), built for the few rows per expert
// that MoE batches give each expert.
//
// Plan, then run: PanelFfn::Create packs an FFN's weights once into column
// panels in the compute dtype (16-bit weights stay 16-bit; the gate and up
// projections of a GLU are interleaved so that one weight stream yields
// act(gate) * up). PanelFfnRunner::Run computes many FFNs on their own rows
// on a ThreadTeam (engine/cpu/thread_team.h): rows are gathered into step-major blocks,
// then the threads claim work items in order (runs of panels, first of the
// gate/up or first linear of every FFN, then of the down projections, each
// waiting only for its own FFN's first half) from two queues, FFNs with few
// rows (bound by streaming their weights) and FFNs with many (bound by
// compute), some threads starting on each, so that memory and cores are busy
// at once at any batch size, balanced whatever slows one thread down. When
// streaming dominates, a thread that computes pairs each compute item with
// the next memory item, whose weights its kernels prefetch into L2 while they
// compute.
//
// Numerics: fp32 accumulation in a fixed order per row, bf16 rounding of the
// layer input and of the intermediate activation (bf16 compute), so a row's
// result is bit-identical whatever other rows share its batch.
//
// Thread-safety: a PanelFfn is immutable after Create and may be shared; a
// PanelFfnRunner holds scratch and serves one caller at a time.
#ifndef MOE_ENGINE_CPU_PANEL_FFN_H_
#define MOE_ENGINE_CPU_PANEL_FFN_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/cpu_path.h"
#include "engine/api/model_spec.h"
#include "engine/cpu/panel_kernels.h"

namespace moe {

// [PANEL_LAYOUT] A weight matrix [N, K] packed for the panel kernels:
// panels x steps x 32 four-byte lanes, 64-byte aligned; or, for a quantized
// matrix, [QUANT_PANEL_LAYOUT] per panel its pair steps of codes, then its
// scale table, each panel panel_bytes from the last.
struct PanelMatrix {
  int64_t steps = 0;  // steps of the compute dtype in a row of the input
  int64_t panels = 0;
  QuantFormat format = QuantFormat::kNone;
  int64_t pair_steps = 0;    // quantized: pair steps a panel (K / 2)
  int64_t group_steps = 0;   // quantized: pair steps that share a scale
  size_t scales_offset = 0;  // quantized: from a panel's start to its scales
  size_t panel_bytes = 0;
  // In the WeightArena (engine/cpu/weight_arena.h), on huge pages where the OS
  // gives them; shares ownership of its region.
  std::shared_ptr<uint32_t> data;
  bool quantized() const { return format != QuantFormat::kNone; }
  const uint32_t* panel(int64_t p) const { return data.get() + p * steps * 32; }  // not quantized
  const char* panel_start(int64_t p) const { return reinterpret_cast<const char*>(data.get()) + p * panel_bytes; }
  size_t bytes() const { return static_cast<size_t>(panels) * panel_bytes; }
};

// y[rows, N] = x[rows, K] W^T with fp32 accumulation on the panel kernels,
// for routers (N, the experts, is small): on the calling thread for a few
// rows, on the shared ThreadTeam for more. Immutable after Create; Run is
// thread-safe given distinct scratch.
class PanelLinear {
 public:
  // Packs `weight` [N, K] (copied) in `compute`: kF32, or kBF16, which
  // rounds the weights and inputs to bf16 (exact when they are bf16 values
  // already, as a bf16 checkpoint's router and normalised inputs are; then
  // only the order of the fp32 sums differs from kF32, at twice the speed
  // where the CPU has a bf16 product). `path` as ResolveCpuPath: fails when
  // this CPU does not run it. RESOURCE_EXHAUSTED when the packed weights do
  // not fit in memory.
  static absl::StatusOr<std::unique_ptr<PanelLinear>> Create(const HostTensor& weight, DType compute = DType::kF32,
                                                             CpuPath path = CpuPath::kAuto);
  int64_t out_features() const { return out_features_; }
  // x: fp32 [rows, K]; y: fp32 [rows, N]. `scratch` is grown as needed;
  // one of ScratchWords() words never grows.
  void Run(const float* x, int64_t rows, float* y, std::vector<uint32_t>* scratch) const;
  // The most scratch Run needs, whatever the rows.
  size_t ScratchWords() const;

 private:
  PanelLinear() = default;
  DType compute_ = DType::kF32;
  const PanelKernels* kernels_ = nullptr;
  int64_t in_features_ = 0, out_features_ = 0;
  PanelMatrix weight_;
};

class PanelFfn {
 public:
  struct Options {
    ExpertKind kind = ExpertKind::kGlu;
    Activation activation = Activation::kSilu;
    // kBF16 (default) or kF32.
    DType compute = DType::kBF16;
    // The kernels' path (kAuto: ResolveCpuPath's choice). Every FFN of one
    // PanelFfnRunner::Run call must share it.
    CpuPath path = CpuPath::kAuto;
    // kClampedSwiglu's constants (default: gpt-oss's).
    SwigluClamp swiglu = {};
  };
  // Packs `weights` (glu: w1, w3 [I, d], w2 [d, I]; mlp: w1, w2, b1 [I], b2
  // [d]; clamped swiglu: w1, w3, w2, b1, b3 [I], b2).
  // The weights are copied: they need not outlive the result. Quantized
  // matrices (q1, q3, q2) stay quantized, each value expanded by the kernels
  // as they run (engine/cpu/panel_kernels.h); INVALID_ARGUMENT names what
  // they cannot compute exactly (NaN codes, scales far outside the numbers
  // weights take, an odd K, scale blocks wider than 256). Fails when
  // this CPU does not run options.path; RESOURCE_EXHAUSTED, naming the
  // bytes asked for, when the packed weights do not fit in memory.
  static absl::StatusOr<std::unique_ptr<PanelFfn>> Create(const FfnWeights& weights, const Options& options);

  int64_t hidden() const { return hidden_; }
  int64_t inner() const { return inner_; }
  // The resolved path (never kAuto).
  CpuPath path() const;
  // Bytes of packed weights and biases.
  size_t weight_bytes() const;
  // Panels of its two matrices: the most work items a run splits it into.
  int64_t panels() const { return first_.panels + down_.panels; }
  // 4-byte steps of a row of its first and down inputs.
  int64_t first_steps() const { return first_.steps; }
  int64_t down_steps() const { return down_.steps; }

 private:
  friend class PanelFfnRunner;
  PanelFfn() = default;
  // Packs the three matrices into first_ and down_, setting hidden_ and inner_.
  absl::Status PackMatrices(const FfnWeights& weights);

  Options options_;  // options_.path resolved
  const PanelKernels* kernels_ = nullptr;
  int64_t hidden_ = 0, inner_ = 0;
  PanelMatrix first_;                          // glu: gate and up, 16 columns of each per panel; mlp: W1
  PanelMatrix down_;                           // W2
  std::vector<float> first_bias_, down_bias_;  // mlp only, padded to whole panels
};

// One FFN applied to some rows of a batch.
struct PanelFfnTask {
  const PanelFfn* ffn = nullptr;  // borrowed
  int64_t rows = 0;
  // Token of each row (borrowed, [rows]); null: row r is token r.
  const int32_t* row_token = nullptr;
  // Output, fp32 [rows, hidden], written. Borrowed.
  float* out = nullptr;
};

class ThreadTeam;

// The most one PanelFfnRunner::Run call will be given, for Reserve.
struct PanelRunLimits {
  int64_t rows = 0;         // rows of all tasks together
  size_t tasks = 0;         // tasks
  int64_t panels = 0;       // PanelFfn::panels() of all tasks together
  int64_t first_steps = 0;  // the widest PanelFfn::first_steps() of a task
  int64_t down_steps = 0;   // the widest PanelFfn::down_steps() of a task
};

class PanelFfnRunner {
 public:
  // `team` (not owned, must outlive the runner) runs the parallel part;
  // null: ThreadTeam::Shared().
  explicit PanelFfnRunner(ThreadTeam* team = nullptr);

  // Sizes the scratch for calls within `limits`, which then allocate
  // nothing (larger calls still run, growing it). Capacity only: pages are
  // touched as batches use them. std::bad_alloc when memory is short.
  void Reserve(const PanelRunLimits& limits);

  // Every task's out[r] = FFN(tokens[token of r]). `tokens`: fp32 [*, hidden]
  // (the tasks share one hidden size, compute dtype and path). `seconds`, if not
  // null, receives per task the core-seconds spent on it divided by the
  // threads that ran, so that the entries add up to at most the wall time
  // (nearly all of it when every thread stays busy; gathering the rows and
  // threads that find no work left are not counted).
  void Run(const float* tokens, const PanelFfnTask* tasks, size_t num_tasks, double* seconds);

 private:
  // Panels [first_panel, end_panel) of one task's first or down matrix.
  struct Item {
    int task = 0;
    bool down = false;
    int64_t first_panel = 0, end_panel = 0;
  };
  // Weight bytes [next, end) that a thread will read after its current
  // item, prefetched by that item's kernel calls a panel's worth at a time;
  // RunItem returns what it did not reach.
  struct Prefetch {
    const char* next = nullptr;
    const char* end = nullptr;
  };
  struct Block {
    int task = 0;
    int mr = 0;
    int64_t first_row = 0;                        // within the task
    int64_t input_offset = 0, middle_offset = 0;  // in 4-byte steps
  };
  static Prefetch WeightBytes(const Item& item, const PanelFfnTask& task);
  // [QUANT_PANEL_LAYOUT] Panel p of a quantized matrix times the blocks
  // [first_block, end_block) (at most kChunkBlocks) into their tiles: the
  // panel is expanded a chunk of steps at a time into a buffer that stays
  // in L1, and each block's sums go on over the chunks.
  void MultiplyQuantizedPanel(const PanelKernels& kernels, DType compute, const PanelMatrix& m, int64_t p, bool down,
                              int64_t first_block, int64_t end_block, float (*tiles)[kMaxBlockRows * kPanelColumns],
                              Prefetch* prefetch);
  Prefetch RunItem(const PanelKernels& kernels, const Item& item, const PanelFfnTask& task, Prefetch prefetch);

  std::vector<Block> blocks_;
  std::vector<Item> items_;
  // Per task: first-projection panels finished (a down item waits for all).
  std::unique_ptr<std::atomic<int64_t>[]> first_done_;
  size_t first_done_capacity_ = 0;
  std::vector<int64_t> task_first_block_;  // [num_tasks + 1]
  std::vector<uint32_t> input_, middle_;
  std::vector<double> thread_seconds_;
  ThreadTeam* team_;
};

}  // namespace moe

#endif  // MOE_ENGINE_CPU_PANEL_FFN_H_
