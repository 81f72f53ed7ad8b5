#include "engine/cpu/panel_ffn.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "engine/api/dtype.h"
#include "engine/api/status_macros.h"
#include "engine/cpu/panel_kernels.h"
#include "engine/cpu/thread_team.h"
#include "engine/cpu/weight_arena.h"

namespace moe {
namespace {

// Consecutive blocks whose rows stay in L2 while a thread's panels pass over
// them; past that, panels are read again for the next chunk.
constexpr int kChunkBlocks = 8;

// Work per item (some 70 us): small enough to balance two threads, large
// enough that a thread streams long runs of weights.
constexpr int64_t kItemWork = int64_t{1} << 18;

// When both queues have work and streaming has the larger share of it, a
// thread that computes pairs each compute item with the next memory item and
// prefetches that item's first weights while it computes, so that memory
// stays busy on its behalf. Compute items are then smaller (some 20 us), so
// that what they prefetch, up to kPairedPrefetchBytes, is still in L2 beside
// their own rows and panel when the memory item reads it.
constexpr int64_t kPairedItemWork = kItemWork / 4;
constexpr int64_t kPairedPrefetchBytes = 512 << 10;

// Below this much work (in the cost model's units, about a core cycle each:
// some 70 us), a call stays on the calling thread: waking the thread team
// costs more than it saves, and on a server the other core serves RPCs.
constexpr int64_t kParallelMinWork = int64_t{1} << 18;

// Router rows from which PanelLinear runs on the team.
constexpr int64_t kParallelRouterRows = 32;

// The two queues of work items: tasks with at most `memory_cost_rows` rows
// (the kernels' PanelKernels::memory_cost_rows) take longer to stream than to
// compute, the others the reverse.
constexpr int kMemoryQueue = 0, kComputeQueue = 1;
int QueueOf(const PanelFfnTask& task, int64_t memory_cost_rows) {
  return task.rows > memory_cost_rows ? kComputeQueue : kMemoryQueue;
}
int64_t MemoryCostRows(const PanelKernels& kernels, DType compute) {
  return kernels.memory_cost_rows[compute == DType::kBF16 ? 1 : 0];
}

int64_t StepsOf(int64_t columns, bool bf16) { return bf16 ? (columns + 1) / 2 : columns; }

// The zeroed memory of out->bytes().
absl::Status AllocatePanels(const std::string& shape, PanelMatrix* out) {
  absl::StatusOr<std::shared_ptr<void>> memory = WeightArena::Shared().TryAllocate(out->bytes());  // zeroed
  if (!memory.ok()) {
    return absl::Status(memory.status().code(),
                        absl::StrCat("packing a ", shape, " weight: ", memory.status().message()));
  }
  out->data = std::static_pointer_cast<uint32_t>(*std::move(memory));
  return absl::OkStatus();
}

// Scale blocks wider than this many columns are refused: a panel expands
// one scale group or more at a time into a buffer on the stack.
constexpr int64_t kMaxGroupColumns = 256;
// Pair steps a thread expands at a time (whole scale groups, at least one):
// 8 KB of bf16 steps, which stay in L1 while the blocks pass over them.
constexpr int64_t kExpandPairSteps = 64;
constexpr int64_t kMaxExpandPairSteps = kMaxGroupColumns / 2;

int64_t ExpandChunk(const PanelMatrix& m) {
  return m.group_steps * std::max<int64_t>(1, kExpandPairSteps / m.group_steps);
}

// [QUANT_PANEL_LAYOUT] Bytes of a pair step's codes and of one scale.
int64_t PairStepBytes(QuantFormat format) { return format == QuantFormat::kFp8Block ? 64 : 32; }
int64_t ScaleBytes(QuantFormat format) { return format == QuantFormat::kFp8Block ? 4 : 1; }

// Whether the kernels compute `scale` exactly as the published rule: a
// product with any e4m3 code stays a normal fp32 (the vector paths' bf16
// conversion flushes subnormals).
bool Fp8ScaleInRange(float scale) {
  const float magnitude = std::fabs(scale);
  return magnitude == 0.0f || (magnitude >= 0x1p-100f && magnitude <= 0x1p100f);
}

// [QUANT_PANEL_LAYOUT] One row of a quantized source into column `c` of
// `panel`: its codes and its scales, checked.
absl::Status PackQuantizedRow(const QuantizedMatrix& q, int64_t n, const PanelMatrix& out, int c, char* panel) {
  auto* codes = reinterpret_cast<uint8_t*>(panel);
  const uint8_t* row = q.values + n * q.value_stride;
  const int64_t groups = (out.pair_steps + out.group_steps - 1) / out.group_steps;
  if (q.format == QuantFormat::kFp8Block) {
    for (int64_t k = 0; k < q.columns; ++k) {
      if ((row[k] & 0x7F) == 0x7F) {
        return absl::InvalidArgumentError(absl::StrCat(q.Describe(), ": the value at [", n, ", ", k, "] is NaN"));
      }
      codes[(k / 2) * 64 + 2 * c + k % 2] = row[k];
    }
    auto* scales = reinterpret_cast<float*>(panel + out.scales_offset);
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = q.Scale(n, g * q.block_columns);
      if (!Fp8ScaleInRange(scale)) {
        return absl::InvalidArgumentError(
            absl::StrCat(q.Describe(), ": scale ", scale, " of row ", n, " is outside [2^-100, 2^100]"));
      }
      scales[g * kPanelColumns + c] = scale;
    }
    return absl::OkStatus();
  }
  for (int64_t s = 0; s < out.pair_steps; ++s) codes[s * 32 + c] = row[s];
  auto* scales = reinterpret_cast<uint8_t*>(panel + out.scales_offset);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t e = static_cast<const uint8_t*>(q.scales)[q.ScaleIndex(n, g * q.block_columns)];
    bool nonzero = false;
    for (int64_t b = g * 16; b < std::min(out.pair_steps, (g + 1) * 16); ++b) nonzero |= (row[b] & 0x77) != 0;
    // 2^(e - 127) times 0.5 .. 6 is a normal fp32 and bf16 for e in [2, 252].
    if (nonzero && (e < 2 || e > 252)) {
      return absl::InvalidArgumentError(absl::StrCat(q.Describe(), ": scale 2^", static_cast<int>(e) - 127, " of row ",
                                                     n, " is outside [2^-125, 2^125]"));
    }
    scales[g * kPanelColumns + c] = nonzero ? e : 127;
  }
  return absl::OkStatus();
}

// [QUANT_PANEL_LAYOUT] As PackPanels, for quantized sources of one format.
absl::Status PackQuantizedPanels(const std::vector<const QuantizedMatrix*>& sources, int width, DType compute,
                                 PanelMatrix* out) {
  const QuantizedMatrix& first = *sources[0];
  const int64_t rows = first.rows, columns = first.columns;
  const bool fp8 = first.format == QuantFormat::kFp8Block;
  const int64_t group_columns = fp8 ? first.block_columns : 32;
  if (columns % 2 != 0 || group_columns % 2 != 0 || group_columns > kMaxGroupColumns) {
    return absl::InvalidArgumentError(absl::StrCat(first.Describe(), ": quantized experts need an even number of",
                                                   " columns and scale blocks of an even width up to ",
                                                   kMaxGroupColumns));
  }
  out->format = first.format;
  out->pair_steps = columns / 2;
  out->group_steps = group_columns / 2;
  out->steps = compute == DType::kBF16 ? out->pair_steps : 2 * out->pair_steps;
  out->panels = (rows + width - 1) / width;
  const int64_t groups = (out->pair_steps + out->group_steps - 1) / out->group_steps;
  auto round_up = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
  out->scales_offset = round_up(static_cast<size_t>(out->pair_steps * PairStepBytes(first.format)));
  out->panel_bytes =
      round_up(out->scales_offset + static_cast<size_t>(groups * kPanelColumns * ScaleBytes(first.format)));
  RETURN_IF_ERROR(AllocatePanels(first.Describe(), out));
  char* base = reinterpret_cast<char*>(out->data.get());
  for (size_t j = 0; j < sources.size(); ++j) {
    for (int64_t n = 0; n < rows; ++n) {
      const int c = static_cast<int>(j * width + n % width);
      RETURN_IF_ERROR(PackQuantizedRow(*sources[j], n, *out, c, base + (n / width) * out->panel_bytes));
    }
  }
  return absl::OkStatus();
}

// [PANEL_LAYOUT] `sources` ([N, K] each) side by side in every panel, `width`
// columns each: row n of source j is column j * width + n % width of panel
// n / width. Columns past N are zero. RESOURCE_EXHAUSTED when the packed
// matrix does not fit in memory.
absl::Status PackPanels(const PanelKernels& kernels, const std::vector<const HostTensor*>& sources, int width,
                        DType compute, PanelMatrix* out) {
  const int64_t rows = sources[0]->dim(0), columns = sources[0]->dim(1);
  out->steps = StepsOf(columns, compute == DType::kBF16);
  out->panels = (rows + width - 1) / width;
  out->panel_bytes = static_cast<size_t>(out->steps) * 128;
  RETURN_IF_ERROR(AllocatePanels(sources[0]->ShapeString(), out));
  for (size_t j = 0; j < sources.size(); ++j) {
    const std::vector<float> values = sources[j]->ToFloats();
    // 16 rows at a time (width is 16 or 32, so they share a panel).
    const float* row_of[16];
    for (int64_t n0 = 0; n0 < rows; n0 += 16) {
      const int count = static_cast<int>(std::min<int64_t>(16, rows - n0));
      for (int i = 0; i < count; ++i) row_of[i] = values.data() + (n0 + i) * columns;
      uint32_t* column = out->data.get() + (n0 / width) * out->steps * 32 + j * width + n0 % width;
      kernels.write_row_steps(compute, row_of, count, columns, out->steps, column, 32);
    }
  }
  return absl::OkStatus();
}

}  // namespace

CpuPath PanelFfn::path() const { return options_.path; }

size_t PanelFfn::weight_bytes() const {
  return first_.bytes() + down_.bytes() + (first_bias_.size() + down_bias_.size()) * sizeof(float);
}

absl::Status PanelFfn::PackMatrices(const FfnWeights& weights) {
  const bool glu = options_.kind != ExpertKind::kMlp;
  const DType compute = options_.compute;
  if (weights.quantized()) {
    const QuantizedMatrix &q1 = weights.q1, &q3 = weights.q3, &q2 = weights.q2;
    inner_ = q1.rows;
    hidden_ = q1.columns;
    if (q2.format != q1.format || q2.rows != hidden_ || q2.columns != inner_ ||
        (glu && (q3.format != q1.format || q3.rows != inner_ || q3.columns != hidden_))) {
      return absl::InvalidArgumentError(
          absl::StrCat("FFN weights disagree: w1 ", q1.Describe(), ", w2 ", q2.Describe()));
    }
    if (glu) {
      RETURN_IF_ERROR(PackQuantizedPanels({&q1, &q3}, kPanelColumns / 2, compute, &first_));
    } else {
      RETURN_IF_ERROR(PackQuantizedPanels({&q1}, kPanelColumns, compute, &first_));
    }
    return PackQuantizedPanels({&q2}, kPanelColumns, compute, &down_);
  }
  if (weights.w1.rank() != 2 || weights.w2.rank() != 2 || (glu && weights.w3.rank() != 2)) {
    return absl::InvalidArgumentError("FFN weights must be 2-D");
  }
  inner_ = weights.w1.dim(0);
  hidden_ = weights.w1.dim(1);
  if (weights.w2.dim(0) != hidden_ || weights.w2.dim(1) != inner_ ||
      (glu && (weights.w3.dim(0) != inner_ || weights.w3.dim(1) != hidden_))) {
    return absl::InvalidArgumentError(
        absl::StrCat("FFN weight shapes disagree: w1 ", weights.w1.ShapeString(), ", w2 ", weights.w2.ShapeString()));
  }
  if (glu) {
    RETURN_IF_ERROR(PackPanels(*kernels_, {&weights.w1, &weights.w3}, kPanelColumns / 2, compute, &first_));
  } else {
    RETURN_IF_ERROR(PackPanels(*kernels_, {&weights.w1}, kPanelColumns, compute, &first_));
  }
  return PackPanels(*kernels_, {&weights.w2}, kPanelColumns, compute, &down_);
}

absl::StatusOr<std::unique_ptr<PanelFfn>> PanelFfn::Create(const FfnWeights& weights, const Options& options) {
  if (options.compute != DType::kF32 && options.compute != DType::kBF16) {
    return absl::InvalidArgumentError("panel FFN computes in fp32 or bf16");
  }
  auto path = ResolveCpuPath(options.path, options.compute);
  if (!path.ok()) return path.status();
  auto ffn = std::unique_ptr<PanelFfn>(new PanelFfn());
  ffn->options_ = options;
  ffn->options_.path = *path;
  ffn->kernels_ = &PanelKernelsFor(*path);
  // Two first projections, 16 columns of each per panel.
  const bool glu = options.kind != ExpertKind::kMlp;
  RETURN_IF_ERROR(ffn->PackMatrices(weights));
  const int64_t d = ffn->hidden_, inner = ffn->inner_;
  if (options.kind != ExpertKind::kGlu) {
    ffn->first_bias_.assign(ffn->first_.panels * kPanelColumns, 0.0f);
    ffn->down_bias_.assign(ffn->down_.panels * kPanelColumns, 0.0f);
    if (glu) {
      // [PANEL_LAYOUT] as the panels: per panel 16 gate biases, then 16 up biases.
      for (int half = 0; half < 2; ++half) {
        const HostTensor& bias = half == 0 ? weights.b1 : weights.b3;
        if (bias.empty()) continue;
        const std::vector<float> values = bias.ToFloats();
        for (int64_t i = 0; i < std::min<int64_t>(values.size(), inner); ++i) {
          ffn->first_bias_[(i / 16) * kPanelColumns + half * 16 + i % 16] = values[i];
        }
      }
    } else if (!weights.b1.empty()) {
      const std::vector<float> b1 = weights.b1.ToFloats();
      std::copy(b1.begin(), b1.begin() + std::min<int64_t>(b1.size(), inner), ffn->first_bias_.begin());
    }
    if (!weights.b2.empty()) {
      const std::vector<float> b2 = weights.b2.ToFloats();
      std::copy(b2.begin(), b2.begin() + std::min<int64_t>(b2.size(), d), ffn->down_bias_.begin());
    }
  }
  return ffn;
}

absl::StatusOr<std::unique_ptr<PanelLinear>> PanelLinear::Create(const HostTensor& weight, DType compute,
                                                                 CpuPath path) {
  auto resolved = ResolveCpuPath(path, compute);
  if (!resolved.ok()) return resolved.status();
  if (weight.rank() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("linear weight must be 2-D, got ", weight.ShapeString()));
  }
  auto linear = std::unique_ptr<PanelLinear>(new PanelLinear());
  linear->out_features_ = weight.dim(0);
  linear->in_features_ = weight.dim(1);
  linear->compute_ = compute;
  linear->kernels_ = &PanelKernelsFor(*resolved);
  RETURN_IF_ERROR(PackPanels(*linear->kernels_, {&weight}, kPanelColumns, compute, &linear->weight_));
  return linear;
}

void PanelLinear::Run(const float* x, int64_t rows, float* y, std::vector<uint32_t>* scratch) const {
  const int64_t steps = weight_.steps;
  const int64_t num_blocks = (rows + kMaxBlockRows - 1) / kMaxBlockRows;
  ThreadTeam& team = ThreadTeam::Shared();
  // From kParallelRouterRows rows on, the blocks are shared by the team: the
  // router comes first in a layer, so this also wakes the team's workers
  // before the experts need them.
  const int members = rows >= kParallelRouterRows ? team.size() : 1;
  if (scratch->size() < static_cast<size_t>(members * kMaxBlockRows * steps)) {
    scratch->resize(members * kMaxBlockRows * steps);
  }
  // Blocks are claimed one at a time, and a worker still waking (tens of us)
  // when the caller is done is not waited for: at 64 rows it used to hold the
  // caller up for half the router's time.
  std::atomic<int64_t> next_block{0};
  team.RunSkippingLate(members, [&](int member, int) {
    uint32_t* block = scratch->data() + member * kMaxBlockRows * steps;
    alignas(64) float tile[kMaxBlockRows * kPanelColumns];
    for (int64_t b = next_block.fetch_add(1); b < num_blocks; b = next_block.fetch_add(1)) {
      const int64_t row0 = b * kMaxBlockRows;
      const int mr = static_cast<int>(std::min<int64_t>(kMaxBlockRows, rows - row0));
      const float* row_of[kMaxBlockRows];
      for (int i = 0; i < mr; ++i) row_of[i] = x + (row0 + i) * in_features_;
      kernels_->write_row_steps(compute_, row_of, mr, in_features_, steps, block, mr);
      for (int64_t p = 0; p < weight_.panels; ++p) {
        kernels_->multiply_block_panel(compute_, block, mr, weight_.panel(p), steps, tile, nullptr,
                                       /*accumulate=*/false);
        const int64_t col0 = p * kPanelColumns;
        const int width = static_cast<int>(std::min<int64_t>(kPanelColumns, out_features_ - col0));
        for (int i = 0; i < mr; ++i) {
          kernels_->store_tile_row(tile + i * kPanelColumns, nullptr, width, y + (row0 + i) * out_features_ + col0);
        }
      }
    }
  });
}

size_t PanelLinear::ScratchWords() const {
  return static_cast<size_t>(ThreadTeam::Shared().size()) * kMaxBlockRows * weight_.steps;
}

PanelFfnRunner::PanelFfnRunner(ThreadTeam* team) : team_(team ? team : &ThreadTeam::Shared()) {}

void PanelFfnRunner::Reserve(const PanelRunLimits& limits) {
  // A task of r rows makes at most r / kMaxBlockRows + 1 blocks, and a
  // matrix at most one item per panel.
  blocks_.reserve(static_cast<size_t>(limits.rows / kMaxBlockRows) + limits.tasks);
  items_.reserve(static_cast<size_t>(limits.panels));
  task_first_block_.reserve(limits.tasks + 1);
  input_.reserve(static_cast<size_t>(limits.rows * limits.first_steps));
  middle_.reserve(static_cast<size_t>(limits.rows * limits.down_steps));
  thread_seconds_.reserve(static_cast<size_t>(team_->size()) * limits.tasks);
  if (first_done_capacity_ < limits.tasks) {
    first_done_ = std::make_unique<std::atomic<int64_t>[]>(limits.tasks);
    first_done_capacity_ = limits.tasks;
  }
}

void PanelFfnRunner::Run(const float* tokens, const PanelFfnTask* tasks, size_t num_tasks, double* seconds) {
  if (num_tasks == 0) return;
  const DType compute = tasks[0].ffn->options_.compute;
  const PanelKernels& kernels = *tasks[0].ffn->kernels_;
  const int64_t memory_cost_rows = MemoryCostRows(kernels, compute);
  const int64_t d = tasks[0].ffn->hidden_;

  // Row blocks: each task's rows split evenly into blocks of at most
  // kMaxBlockRows, laid out one after another in the input and middle scratch.
  blocks_.clear();
  task_first_block_.assign(num_tasks + 1, 0);
  int64_t input_size = 0, middle_size = 0;
  for (size_t t = 0; t < num_tasks; ++t) {
    const PanelFfnTask& task = tasks[t];
    task_first_block_[t] = static_cast<int64_t>(blocks_.size());
    const int64_t count = (task.rows + kMaxBlockRows - 1) / kMaxBlockRows;
    int64_t row = 0;
    for (int64_t b = 0; b < count; ++b) {
      const int mr = static_cast<int>(task.rows / count + (b < task.rows % count ? 1 : 0));
      blocks_.push_back({.task = static_cast<int>(t),
                         .mr = mr,
                         .first_row = row,
                         .input_offset = input_size,
                         .middle_offset = middle_size});
      row += mr;
      input_size += mr * task.ffn->first_.steps;
      middle_size += mr * task.ffn->down_.steps;
    }
  }
  task_first_block_[num_tasks] = static_cast<int64_t>(blocks_.size());
  if (input_.size() < static_cast<size_t>(input_size)) input_.resize(input_size);
  if (middle_.size() < static_cast<size_t>(middle_size)) middle_.resize(middle_size);

  // Work items: runs of consecutive panels of one task and matrix, of about
  // kItemWork each, in two queues (QueueOf), one after the other in items_.
  // In each queue every first-projection item comes before any down item.
  items_.clear();
  auto work_of = [&](size_t t, bool down) {
    const auto& m = down ? tasks[t].ffn->down_ : tasks[t].ffn->first_;
    return m.steps * (tasks[t].rows + memory_cost_rows);  // per panel
  };
  int64_t queue_work[2] = {0, 0};
  for (size_t t = 0; t < num_tasks; ++t) {
    queue_work[QueueOf(tasks[t], memory_cost_rows)] +=
        tasks[t].ffn->first_.panels * work_of(t, false) + tasks[t].ffn->down_.panels * work_of(t, true);
  }
  const int64_t work = queue_work[kMemoryQueue] + queue_work[kComputeQueue];
  // Pairing pays where streaming dominates; where computing does, the
  // prefetches slow the computing threads more than they save (measured:
  // the Mixtral-like layer at 64 tokens lost 3 to 6%).
  const bool paired = queue_work[kComputeQueue] > 0 && queue_work[kMemoryQueue] > queue_work[kComputeQueue];
  size_t queue_end[2] = {0, 0};
  for (int queue : {kMemoryQueue, kComputeQueue}) {
    for (bool down : {false, true}) {
      for (size_t t = 0; t < num_tasks; ++t) {
        if (QueueOf(tasks[t], memory_cost_rows) != queue) continue;
        const auto& m = down ? tasks[t].ffn->down_ : tasks[t].ffn->first_;
        const int64_t item_work = queue == kComputeQueue && paired ? kPairedItemWork : kItemWork;
        const int64_t per_item = std::max<int64_t>(1, item_work / work_of(t, down));
        for (int64_t p = 0; p < m.panels; p += per_item) {
          items_.push_back({.task = static_cast<int>(t),
                            .down = down,
                            .first_panel = p,
                            .end_panel = std::min(m.panels, p + per_item)});
        }
      }
    }
    queue_end[queue] = items_.size();
  }
  if (first_done_capacity_ < num_tasks) {
    first_done_ = std::make_unique<std::atomic<int64_t>[]>(num_tasks);
    first_done_capacity_ = num_tasks;
  }
  for (size_t t = 0; t < num_tasks; ++t) first_done_[t].store(0, std::memory_order_relaxed);
  std::atomic<size_t> next_item[2];
  next_item[kMemoryQueue].store(0);
  next_item[kComputeQueue].store(queue_end[kMemoryQueue]);

  thread_seconds_.assign(static_cast<size_t>(team_->size()) * num_tasks, 0.0);
  const int64_t num_blocks = static_cast<int64_t>(blocks_.size());
  std::atomic<int64_t> next_block{0}, gathered{0};
  std::atomic<int> members_used{1};

  team_->Run(work < kParallelMinWork ? 1 : team_->size(), [&](int member, int members) {
    if (member == 0) members_used.store(members);
    double* my_seconds = thread_seconds_.data() + static_cast<size_t>(member) * num_tasks;

    // Gather: each token row into its block, step-major, in the compute
    // dtype. Blocks are claimed one at a time, so that a worker still waking
    // (tens of us) finds its share done, then all wait until every block is.
    for (int64_t b = next_block.fetch_add(1); b < num_blocks; b = next_block.fetch_add(1)) {
      const Block& block = blocks_[b];
      const PanelFfnTask& task = tasks[block.task];
      const int64_t steps = task.ffn->first_.steps;
      const float* row_of[kMaxBlockRows];
      for (int i = 0; i < block.mr; ++i) {
        const int64_t row = block.first_row + i;
        row_of[i] = tokens + (task.row_token ? task.row_token[row] : row) * d;
      }
      kernels.write_row_steps(compute, row_of, block.mr, d, steps, input_.data() + block.input_offset, block.mr);
      gathered.fetch_add(1, std::memory_order_release);
    }
    while (gathered.load(std::memory_order_acquire) < num_blocks) CpuRelax();

    // Items are claimed in order, so a thread streams long runs of weights
    // and the threads stay balanced whatever else slows one of them down.
    // Members start on the queues in proportion to their work (at least one
    // on each), then help with the other: while some compute the tasks with
    // many rows, the others keep memory busy (measured: 4% faster on the
    // DeepSeek-like layer at 64 tokens, where the shared expert computes
    // while routed experts stream). A down item waits only for its own
    // task's first projection, all of whose items come before it in the
    // same queue and were claimed before it. A waiting thread holds no
    // unfinished item of its own queue: a computing thread holds the memory
    // item paired with its compute item, but no compute item waits for a
    // memory item. So every wait ends.
    const int computing =
        std::clamp(static_cast<int>((members * queue_work[kComputeQueue] + work / 2) / std::max<int64_t>(work, 1)), 1,
                   std::max(1, members - 1));
    const int preferred = member < computing ? kComputeQueue : kMemoryQueue;
    auto claim = [&]() -> const Item* {
      for (int queue : {preferred, 1 - preferred}) {
        const size_t i = next_item[queue].fetch_add(1);
        if (i < queue_end[queue]) return &items_[i];
      }
      return nullptr;
    };
    auto run = [&](const Item& item, Prefetch prefetch = {}) {
      const PanelFfnTask& task = tasks[item.task];
      if (item.down) {
        while (first_done_[item.task].load(std::memory_order_acquire) < task.ffn->first_.panels) CpuRelax();
      }
      const auto start = std::chrono::steady_clock::now();
      const Prefetch left = RunItem(kernels, item, task, prefetch);
      my_seconds[item.task] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!item.down) first_done_[item.task].fetch_add(item.end_panel - item.first_panel, std::memory_order_release);
      return left;
    };
    // Paired (see kPairedItemWork): 64 routed experts of 6 rows and a 64-row
    // shared expert took 2% less time in the usual memory state and 3.5% less
    // in the fast one (measured alternating in one process). The memory item
    // then prefetches as far ahead of its reads as its compute item got, so
    // that its core keeps asking memory for data while it computes the part
    // already in L2.
    while (paired && preferred == kComputeQueue) {
      const size_t c = next_item[kComputeQueue].fetch_add(1);
      if (c >= queue_end[kComputeQueue]) break;
      const size_t m = next_item[kMemoryQueue].fetch_add(1);
      if (m >= queue_end[kMemoryQueue]) {
        run(items_[c]);
        continue;
      }
      Prefetch ahead = WeightBytes(items_[m], tasks[items_[m].task]);
      ahead.next =
          run(items_[c], {.next = ahead.next, .end = std::min(ahead.end, ahead.next + kPairedPrefetchBytes)}).next;
      run(items_[m], ahead);
    }
    for (const Item* claimed = claim(); claimed; claimed = claim()) run(*claimed);
  });

  if (seconds) {
    const int threads = members_used.load();
    for (size_t t = 0; t < num_tasks; ++t) {
      double sum = 0;
      for (int k = 0; k < threads; ++k) sum += thread_seconds_[static_cast<size_t>(k) * num_tasks + t];
      seconds[t] = sum / threads;
    }
  }
}

PanelFfnRunner::Prefetch PanelFfnRunner::WeightBytes(const Item& item, const PanelFfnTask& task) {
  const PanelMatrix& m = item.down ? task.ffn->down_ : task.ffn->first_;
  return {.next = m.panel_start(item.first_panel), .end = m.panel_start(item.end_panel)};
}

void PanelFfnRunner::MultiplyQuantizedPanel(const PanelKernels& kernels, DType compute, const PanelMatrix& m, int64_t p,
                                            bool down, int64_t first_block, int64_t end_block,
                                            float (*tiles)[kMaxBlockRows * kPanelColumns], Prefetch* prefetch) {
  const char* panel = m.panel_start(p);
  if (kernels.multiply_block_quantized_panel && compute == DType::kBF16 && end_block - first_block == 1) {
    // One block: decoded in registers as it multiplies.
    const Block& block = blocks_[first_block];
    kernels.multiply_block_quantized_panel(
        m.format, m.group_steps, reinterpret_cast<const uint8_t*>(panel), panel + m.scales_offset,
        (down ? middle_.data() + block.middle_offset : input_.data() + block.input_offset), block.mr, m.pair_steps,
        tiles[0]);
    return;
  }
  alignas(64) uint32_t expanded[kMaxExpandPairSteps * 2 * kPanelColumns];
  const int64_t steps_per_pair = compute == DType::kBF16 ? 1 : 2;
  const int64_t chunk = ExpandChunk(m);
  for (int64_t s0 = 0; s0 < m.pair_steps; s0 += chunk) {
    const int64_t n = std::min(chunk, m.pair_steps - s0);
    kernels.expand_quantized(
        m.format, compute, m.group_steps, reinterpret_cast<const uint8_t*>(panel) + s0 * PairStepBytes(m.format),
        panel + m.scales_offset + (s0 / m.group_steps) * kPanelColumns * ScaleBytes(m.format), n, expanded);
    for (int64_t b = first_block; b < end_block; ++b) {
      const Block& block = blocks_[b];
      const uint32_t* rows = down ? middle_.data() + block.middle_offset : input_.data() + block.input_offset;
      const bool prefetching = prefetch->next < prefetch->end;
      kernels.multiply_block_panel(compute, rows + s0 * steps_per_pair * block.mr, block.mr, expanded,
                                   n * steps_per_pair, tiles[b - first_block], prefetching ? prefetch->next : nullptr,
                                   /*accumulate=*/s0 > 0);
      if (prefetching) prefetch->next += n * steps_per_pair * 128;
    }
  }
}

PanelFfnRunner::Prefetch PanelFfnRunner::RunItem(const PanelKernels& kernels, const Item& item,
                                                 const PanelFfnTask& task, Prefetch prefetch) {
  const PanelFfn& ffn = *task.ffn;
  const DType compute = ffn.options_.compute;
  const bool bf16 = compute == DType::kBF16;
  const bool glu = ffn.options_.kind != ExpertKind::kMlp;
  const int64_t d = ffn.hidden_;
  const auto& m = item.down ? ffn.down_ : ffn.first_;
  alignas(64) float tiles[kChunkBlocks][kMaxBlockRows * kPanelColumns];
  const int64_t blocks_begin = task_first_block_[item.task], blocks_end = task_first_block_[item.task + 1];
  // Chunks of blocks stay in L2 while the item's panels pass over them.
  for (int64_t c = blocks_begin; c < blocks_end; c += kChunkBlocks) {
    const int64_t c_end = std::min(c + kChunkBlocks, blocks_end);
    for (int64_t p = item.first_panel; p < item.end_panel; ++p) {
      if (m.quantized()) {
        MultiplyQuantizedPanel(kernels, compute, m, p, item.down, c, c_end, tiles, &prefetch);
      }
      for (int64_t b = c; b < c_end; ++b) {
        const Block& block = blocks_[b];
        float* tile = tiles[b - c];
        if (!m.quantized()) {
          const uint32_t* a = item.down ? middle_.data() + block.middle_offset : input_.data() + block.input_offset;
          const bool prefetching = prefetch.next < prefetch.end;
          kernels.multiply_block_panel(compute, a, block.mr, m.panel(p), m.steps, tile,
                                       prefetching ? prefetch.next : nullptr, /*accumulate=*/false);
          if (prefetching) prefetch.next += m.steps * 128;
        }
        if (item.down) {
          // [rows, d] fp32 output, the last panel cut at d.
          const int64_t col0 = p * kPanelColumns;
          for (int i = 0; i < block.mr; ++i) {
            kernels.store_tile_row(tile + i * kPanelColumns,
                                   ffn.down_bias_.empty() ? nullptr : ffn.down_bias_.data() + col0,
                                   static_cast<int>(std::min<int64_t>(kPanelColumns, d - col0)),
                                   task.out + (block.first_row + i) * d + col0);
          }
          continue;
        }
        // The intermediate activation, written as steps of the down
        // projection's input block.
        const int64_t width = glu ? kPanelColumns / 2 : kPanelColumns;
        const float* row_of[kMaxBlockRows];
        for (int i = 0; i < block.mr; ++i) {
          float* row = tile + i * kPanelColumns;
          kernels.activate_tile_row(ffn.options_.kind, ffn.options_.activation,
                                    ffn.first_bias_.empty() ? nullptr : ffn.first_bias_.data() + p * kPanelColumns,
                                    ffn.options_.swiglu, row);
          row_of[i] = row;
        }
        const int64_t step0 = bf16 ? p * width / 2 : p * width;
        const int64_t steps = std::min(ffn.down_.steps - step0, bf16 ? width / 2 : width);
        kernels.write_row_steps(compute, row_of, block.mr, width, steps,
                                middle_.data() + block.middle_offset + step0 * block.mr, block.mr);
      }
    }
  }
  return prefetch;
}

}  // namespace moe
