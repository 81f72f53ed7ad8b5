// MoE layer throughput against this machine's limits, measured in the same run.
//
// For a Mixtral-like layer (hidden 1024, intermediate 3584, 8 experts, top-2,
// SwiGLU) and a fine-grained DeepSeek-like layer (64 experts, top-6,
// intermediate 512, 2 shared experts), with bf16 and fp32 weights, at
// T = 1, 8, 64, 512, 4096 tokens, and with FP8 (128 x 128 block scales) and
// MXFP4 experts computing in bf16 at T = 1, 8, 64, where memory bounds them,
// it reports tokens/s and the fraction of the
// roofline: time bound = max(bytes of the experts touched / read bandwidth,
// FLOPs / the rate of a dense oneDNN matmul of the same FLOPs, at least 512
// rows, in the same dtype; fp32 where oneDNN has no bf16 matmul, as on AVX2).
//
//   build/bench/engine_bench [--benchmark_filter=mixtral]
//   MOE_CPU_PATH=avx2 build/bench/engine_bench   # a narrower path on a wider CPU
//   MOE_BENCH_MIN_TIME=0.2 build/bench/engine_bench   # fewer runs per figure (default 2 s of engine time)
//
// With MOE_CPU_PATH=avx2 the dense reference is held to AVX2 too
// (ONEDNN_MAX_CPU_ISA), so that both sides use the same instructions.
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>

#include "engine/api/cpu_path.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "engine/api/quantized.h"
#include "engine/api/repository_model.h"
#include "engine/cpu/panel_ffn.h"
#include "engine/cpu/panel_kernels.h"
#include "engine/cpu/thread_team.h"
#include "engine/cpu/weight_arena.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace moe {
namespace {

struct Shape {
  const char* name;
  int hidden, intermediate, experts, top_k, shared_intermediate;
};
constexpr Shape kShapes[] = {{"mixtral_like", 1024, 3584, 8, 2, 0}, {"deepseek_like", 1024, 512, 64, 6, 1024}};

// The fewest rows of the dense reference matmul (see BM_MoeLayer).
constexpr int64_t kDenseMinRows = 512;

double SecondsOf(const std::function<void()>& fn) {
  const auto start = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0 : values[values.size() / 2];
}

// The last-level cache of CPU 0 as sysfs gives it ("32768K"); 32 MB if it
// does not. (sysconf's figure is the host's sum on this machine's VM.)
size_t LastLevelCacheBytes() {
  std::ifstream in("/sys/devices/system/cpu/cpu0/cache/index3/size");
  size_t kib = 0;
  return in >> kib && kib > 0 ? kib << 10 : size_t{32} << 20;
}

// Arena memory for a benchmark that cannot run without it: says why and exits.
std::shared_ptr<void> ArenaOrExit(size_t bytes) {
  absl::StatusOr<std::shared_ptr<void>> memory = WeightArena::Shared().TryAllocate(bytes);
  if (!memory.ok()) {
    std::fprintf(stderr, "engine_bench: %s\n", std::string(memory.status().message()).c_str());
    std::exit(1);
  }
  return *std::move(memory);
}

// Reads windows of a buffer as large as the model's weights with all cores,
// each window starting where the last ended, so that every read is cold.
// The buffer lies on huge pages, as the engine's weights do (WeightArena):
// the reference is the best plain read this machine does.
class MemoryReader {
 public:
  explicit MemoryReader(size_t bytes)
      : words_(bytes / 8), storage_(std::static_pointer_cast<uint64_t>(ArenaOrExit(words_ * 8))) {
    std::fill(storage_.get(), storage_.get() + words_, uint64_t{1});
  }
  // Seconds to read `bytes` with `members` threads (0: the whole team).
  double Read(size_t bytes, int members = 0) {
    const size_t words = std::min(bytes / 8, words_);
    if (next_ + words > words_) next_ = 0;
    const uint64_t* data = storage_.get() + next_;
    next_ += words;
    std::atomic<uint64_t> sum{0};
    const double s = SecondsOf([&] {
      ThreadTeam& team = ThreadTeam::Shared();
      team.Run(members > 0 ? members : team.size(), [&](int member, int members) {
        uint64_t part = 0;
        const Share share = ShareOf(static_cast<int64_t>(words), member, members);
        for (int64_t i = share.first; i < share.end; ++i) part += data[i];
        sum.fetch_add(part);
      });
    });
    benchmark::DoNotOptimize(sum.load());
    return s;
  }

 private:
  size_t words_;
  std::shared_ptr<uint64_t> storage_;
  size_t next_ = 0;
};

// A dense oneDNN matmul [rows, K] x [K, N] in `dtype`, weights prepacked in
// oneDNN's preferred layout: the best dense product of the same FLOPs this
// machine does. bf16 falls back to fp32 where oneDNN has no bf16 matmul
// (CPUs without AVX-512).
class DenseMatmul {
 public:
  DenseMatmul(int64_t rows, int64_t K, int64_t N, DType dtype) {
    using dnnl::memory;
    const memory::data_type type = dtype == DType::kBF16 ? memory::data_type::bf16 : memory::data_type::f32;
    auto plan = [&](memory::data_type t) {
      const memory::desc src({rows, K}, t, memory::format_tag::ab);
      const memory::desc weights({K, N}, t, memory::format_tag::any);
      const memory::desc dst({rows, N}, memory::data_type::f32, memory::format_tag::ab);
      return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, weights, dst), engine_);
    };
    dnnl::matmul::primitive_desc pd;
    try {
      pd = plan(type);
    } catch (const dnnl::error&) {
      pd = plan(memory::data_type::f32);
    }
    implementation_ = pd.impl_info_str();
    primitive_ = dnnl::matmul(pd);
    src_ = memory(pd.src_desc(), engine_);
    weights_ = memory(pd.weights_desc(), engine_);
    dst_ = memory(pd.dst_desc(), engine_);
    std::memset(src_.get_data_handle(), 0, pd.src_desc().get_size());
    std::memset(weights_.get_data_handle(), 0, pd.weights_desc().get_size());
    Run();  // warm: weights in cache, as a compute peak should be measured
  }
  // Seconds of one run.
  double Run() {
    return SecondsOf([&] {
      primitive_.execute(stream_, {{DNNL_ARG_SRC, src_}, {DNNL_ARG_WEIGHTS, weights_}, {DNNL_ARG_DST, dst_}});
      stream_.wait();
    });
  }
  const std::string& implementation() const { return implementation_; }

 private:
  dnnl::engine engine_{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream_{engine_};
  dnnl::matmul primitive_;
  dnnl::memory src_, weights_, dst_;
  std::string implementation_;
};

// The process's private resident memory (RssAnon): what loading holds, not
// the checkpoint file's pages, which stay in the page cache for the kernel
// to drop.
size_t ResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "RssAnon:") {
      size_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

// Counts experts with work per layer, to know the bytes batches touch on average.
class TouchedExperts : public EngineObserver {
 public:
  void OnLayer(const LayerReport& report) override {
    for (size_t e = 0; e < report.tokens_routed.size(); ++e) touched += report.tokens_routed[e] > 0;
    ++layers;
  }
  double mean() const { return layers ? static_cast<double>(touched) / layers : 0; }
  int64_t touched = 0, layers = 0;
};

// Expert weights: a dtype, or a quantized format computing in bf16.
struct Weights {
  DType dtype = DType::kBF16;
  QuantFormat format = QuantFormat::kNone;
  const char* name = "bf16";
  // Bytes of a weight as stored (scales included).
  double bytes() const {
    if (format == QuantFormat::kFp8Block) return 1.0 + 4.0 / (128 * 128);
    if (format == QuantFormat::kMxfp4) return 0.5 + 1.0 / 32;
    return static_cast<double>(DTypeSize(dtype));
  }
};

struct Loaded {
  std::unique_ptr<MoeModel> model;
  std::unique_ptr<TouchedExperts> observer;
  size_t weight_bytes = 0;
  size_t resident_after_load = 0;
};

Loaded& Get(const Shape& shape, const Weights& weights) {
  const DType dtype = weights.dtype;
  static std::map<std::pair<std::string, std::string>, Loaded> cache;
  auto key = std::make_pair(std::string(shape.name), std::string(weights.name));
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  cache.clear();   // one model resident at a time, so RSS figures are its own
  malloc_trim(0);  // and return the evicted model's pages before measuring
  ModelSpec spec;
  spec.name = shape.name;
  spec.hidden_size = shape.hidden;
  spec.intermediate_size = shape.intermediate;
  spec.shared_intermediate_size = shape.shared_intermediate;
  spec.router.num_experts = shape.experts;
  spec.router.top_k = shape.top_k;
  spec.router.norm_topk_prob = true;
  spec.pre_norm = true;  // as in every Hugging Face MoE block
  spec.weight_dtype = dtype;
  Loaded& loaded = cache[key];
  loaded.observer = std::make_unique<TouchedExperts>();
  // Load as a server does: from a file, memory-mapped, so the resident figure
  // is what production sees.
  const std::string repo = "/tmp/moe_engine_bench_" + std::to_string(::getpid());
  if (auto status = WriteRepositoryModel(GenerateRandomModel(spec, 1, 1), repo, 1, 4096); !status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    std::abort();
  }
  const std::string model_dir = repo + "/" + shape.name;
  std::ifstream in(model_dir + "/config.pbtxt");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  malloc_trim(0);  // the generated copy is freed: return it before the baseline
  const size_t before = ResidentBytes();
  {
    auto config = ParseModelConfig(text, "config.pbtxt");
    auto definition = config.ok() ? LoadRepositoryModel(model_dir, 1, *config) : config.status();
    // Quantized: from the bf16 file, quantized in memory (freed with the
    // definition, before the figure is taken).
    if (definition.ok() && weights.format != QuantFormat::kNone) {
      const absl::Status quantized = QuantizeExperts(weights.format, &*definition);
      if (!quantized.ok()) {
        std::fprintf(stderr, "%s\n", quantized.ToString().c_str());
        std::abort();
      }
    }
    auto model =
        definition.ok() ? MoeModel::Create(*definition, {.observer = loaded.observer.get()}) : definition.status();
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
      std::abort();
    }
    loaded.model = std::move(*model);
  }
  std::filesystem::remove_all(repo);
  malloc_trim(0);  // as before the baseline: freed memory returned
  loaded.resident_after_load = ResidentBytes() - std::min(before, ResidentBytes());
  loaded.weight_bytes = loaded.model->executor().WeightBytes();
  return loaded;
}

void BM_MoeLayer(benchmark::State& state, Shape shape, Weights weights) {
  const int T = static_cast<int>(state.range(0));
  const DType dtype = weights.dtype;
  Loaded& loaded = Get(shape, weights);
  MoeModel& model = *loaded.model;
  // Different inputs in turn, so that small batches touch different experts
  // from one run to the next, as consecutive decode steps do, instead of
  // finding the same few experts warm in the cache.
  constexpr int kInputs = 8;
  std::vector<std::vector<float>> inputs(kInputs, std::vector<float>(static_cast<size_t>(T) * shape.hidden));
  std::mt19937 rng(T);
  std::normal_distribution<float> normal;
  for (auto& input : inputs) {
    for (float& v : input) v = normal(rng);
  }
  auto planned = model.NewWorkspace(T);
  if (!planned.ok()) {
    state.SkipWithError("no workspace");
    return;
  }
  auto ws = std::move(*planned);
  MoeModel::RunResult result;
  const int64_t d = shape.hidden, I = shape.intermediate, Is = shape.shared_intermediate;
  const double flops = 2.0 * 3 * d * (static_cast<double>(T) * shape.top_k * I + static_cast<double>(T) * Is);
  const double bytes_per_expert = 3.0 * d * I * weights.bytes();
  // Dense matmul at the same FLOPs: [T * k + shared share] rows over one
  // expert-sized [d, 3I] weight, at least kDenseMinRows of them: below that a
  // dense product is bound by reading its own weights, not a compute peak
  // (a small layer's compute bound is then its FLOPs at the peak rate).
  const int64_t rows = std::max<int64_t>(
      kDenseMinRows, static_cast<int64_t>(T) * shape.top_k + (Is > 0 ? static_cast<int64_t>(T) * Is / I : 0));
  const double dense_flops = 2.0 * rows * d * 3 * I;
  DenseMatmul dense(rows, d, 3 * I, dtype);
  MemoryReader reader(loaded.weight_bytes);
  // Before each run, a read of twice the last-level cache evicts what the
  // previous run left there, as a served model's other layers do between two
  // runs of one layer: without it a token's experts were partly still in
  // the cache from the inputs before (DeepSeek-like bf16 at one token read
  // 1.05 to 1.14 of the cold read reference). One thread reads, so that the
  // eviction changes the cache and not the threads: the team's worker is
  // asleep when the run starts, as for the first layer of a batch after a
  // pause (waking it costs 40 to 60 us of a 0.7 ms one-token run).
  const size_t evict_bytes = 2 * LastLevelCacheBytes();
  MemoryReader evictor(evict_bytes);
  // This machine's memory bandwidth and cores are shared with neighbours whose
  // load varies from second to second, so every run is paired with its two
  // references measured right after it: reading the bytes of the experts it
  // touched, and the dense matmul. The fraction is the median over the pairs.
  // A first run outside the timing: it sizes the workspace (page faults).
  if (!model.Run(inputs[0].data(), T, {}, ws.get(), &result).ok()) state.SkipWithError("run failed");
  std::vector<double> fractions, bandwidths, dense_rates, run_seconds;
  double touched_sum = 0;
  int next = 0;
  for (auto _ : state) {
    evictor.Read(evict_bytes, /*members=*/1);
    loaded.observer->touched = loaded.observer->layers = 0;
    const double run_s = SecondsOf([&] {
      if (!model.Run(inputs[next].data(), T, {}, ws.get(), &result).ok()) state.SkipWithError("run failed");
    });
    state.SetIterationTime(run_s);
    run_seconds.push_back(run_s);
    touched_sum += loaded.observer->mean();
    next = (next + 1) % kInputs;
    const double bytes = loaded.observer->mean() * bytes_per_expert + 3.0 * d * Is * weights.bytes();
    const double read_s = reader.Read(static_cast<size_t>(bytes));
    const double dense_s = dense.Run() * flops / dense_flops;
    fractions.push_back(std::max(read_s, dense_s) / run_s);
    bandwidths.push_back(bytes / read_s);
    dense_rates.push_back(flops / dense_s);
  }
  state.counters["tokens_per_s"] = T / Median(run_seconds);
  state.counters["roofline_fraction"] = Median(fractions);
  state.counters["dense_TFLOPs"] = Median(dense_rates) / 1e12;
  state.counters["read_GBps"] = Median(bandwidths) / 1e9;
  state.counters["experts_touched"] = touched_sum / std::max<size_t>(run_seconds.size(), 1);
  state.counters["weights_MB"] = loaded.weight_bytes / 1e6;
  state.counters["rss_over_weights"] = static_cast<double>(loaded.resident_after_load) / loaded.weight_bytes;
  state.SetLabel(model.executor().Describe() + "; dense reference " + dense.implementation());
}

// How fast the panel kernel streams weights from memory while it computes:
// `rows` bf16 rows times every 64 KB panel of a matrix far larger than the
// caches, on `threads` threads, each run paired with a plain read of as many
// bytes on as many threads. One core streams at most what one core reads,
// well below two: while one core computes (a shared expert), memory is
// served by the other alone (docs/BENCHMARKS.md).
void BM_PanelStream(benchmark::State& state) {
  const int rows = static_cast<int>(state.range(0));
  const int threads = std::min(static_cast<int>(state.range(1)), ThreadTeam::Shared().size());
  auto path = ResolveCpuPath(CpuPath::kAuto, DType::kBF16);
  if (!path.ok()) {
    state.SkipWithError(path.status().ToString().c_str());
    return;
  }
  const PanelKernels& kernels = PanelKernelsFor(*path);
  constexpr uint32_t kOnes = 0x3f803f80u;  // a bf16 pair of 1.0
  PanelMatrix weights;
  weights.steps = 512;    // 1024 bf16 values per row
  weights.panels = 2048;  // 128 MB
  const size_t bytes = weights.bytes();
  weights.data = std::static_pointer_cast<uint32_t>(ArenaOrExit(bytes));
  std::fill(weights.data.get(), weights.data.get() + bytes / sizeof(uint32_t), kOnes);
  const std::vector<uint32_t> block(static_cast<size_t>(rows) * weights.steps, kOnes);
  MemoryReader reader(2 * bytes);
  ThreadTeam& team = ThreadTeam::Shared();
  std::vector<double> ratios, kernel_rates, read_rates;
  for (auto _ : state) {
    const double kernel_s = SecondsOf([&] {
      team.Run(threads, [&](int member, int members) {
        alignas(64) float tile[kMaxBlockRows * kPanelColumns];
        const Share share = ShareOf(weights.panels, member, members);
        for (int64_t p = share.first; p < share.end; ++p) {
          kernels.multiply_block_panel(DType::kBF16, block.data(), rows, weights.panel(p), weights.steps, tile, nullptr,
                                       /*accumulate=*/false);
        }
        benchmark::DoNotOptimize(tile[0]);
      });
    });
    state.SetIterationTime(kernel_s);
    const double read_s = reader.Read(bytes, threads);
    ratios.push_back(read_s / kernel_s);
    kernel_rates.push_back(bytes / kernel_s);
    read_rates.push_back(bytes / read_s);
  }
  state.counters["kernel_GBps"] = Median(kernel_rates) / 1e9;
  state.counters["read_GBps"] = Median(read_rates) / 1e9;
  state.counters["kernel_over_read"] = Median(ratios);
  state.SetLabel(CpuPathName(*path));
}

// [QUANT_PANEL_LAYOUT] What decoding a quantized panel costs on one core,
// in L1 (one 64-step panel, decoded over and over), beside what one bf16
// row's products over the same steps cost (the plain kernel on the decoded
// panel): "decode_over_row" is how many rows' worth of products a decoded
// step costs, "fused_over_row" the same for the kernel that decodes in
// registers as it multiplies one row.
void BM_QuantizedDecode(benchmark::State& state, QuantFormat format) {
  auto path = ResolveCpuPath(CpuPath::kAuto, DType::kBF16);
  if (!path.ok()) {
    state.SkipWithError(path.status().ToString().c_str());
    return;
  }
  const PanelKernels& kernels = PanelKernelsFor(*path);
  constexpr int64_t kPairSteps = 64;
  const bool fp8 = format == QuantFormat::kFp8Block;
  // Codes of ordinary magnitudes (e4m3 0x3A = 1.25; e2m1 pairs 0x53 = 1.5, 3)
  // and one scale group per panel.
  const std::vector<uint8_t> codes(static_cast<size_t>(kPairSteps) * (fp8 ? 64 : 32), fp8 ? 0x3A : 0x53);
  const std::vector<float> fp8_scales(kPanelColumns, 0.01f);
  const std::vector<uint8_t> e8m0_scales(kPanelColumns, 120);
  const void* scales = fp8 ? static_cast<const void*>(fp8_scales.data()) : e8m0_scales.data();
  const int64_t group_steps = kPairSteps;
  alignas(64) static uint32_t expanded[kPairSteps * kPanelColumns];
  alignas(64) float tile[kMaxBlockRows * kPanelColumns];
  const std::vector<uint32_t> row(kPairSteps, 0x3f803f80u);  // bf16 pairs of 1.0
  constexpr int kReps = 20000;
  auto per_step = [&](const std::function<void()>& work) {
    return SecondsOf([&] {
             for (int r = 0; r < kReps; ++r) work();
           }) /
           (kReps * kPairSteps);
  };
  std::vector<double> decode, products, fused;
  for (auto _ : state) {
    const double decode_s = per_step([&] {
      kernels.expand_quantized(format, DType::kBF16, group_steps, codes.data(), scales, kPairSteps, expanded);
      benchmark::DoNotOptimize(expanded[0]);
    });
    state.SetIterationTime(decode_s * kReps * kPairSteps);
    decode.push_back(decode_s);
    products.push_back(per_step([&] {
      kernels.multiply_block_panel(DType::kBF16, row.data(), 1, expanded, kPairSteps, tile, nullptr, false);
      benchmark::DoNotOptimize(tile[0]);
    }));
    if (kernels.multiply_block_quantized_panel) {
      fused.push_back(per_step([&] {
        kernels.multiply_block_quantized_panel(format, group_steps, codes.data(), scales, row.data(), 1, kPairSteps,
                                               tile);
        benchmark::DoNotOptimize(tile[0]);
      }));
    }
  }
  state.counters["decode_ns_per_step"] = Median(decode) * 1e9;
  state.counters["decode_over_row"] = Median(decode) / Median(products);
  if (!fused.empty()) state.counters["fused_over_row"] = Median(fused) / Median(products);
  state.SetLabel(CpuPathName(*path));
}

// Seconds of engine time per layer benchmark: MOE_BENCH_MIN_TIME, else 2.
// Each run is followed by its references and an eviction read of twice the
// last-level cache, so a benchmark takes tens of times its engine time.
double LayerMinTime() {
  const char* text = std::getenv("MOE_BENCH_MIN_TIME");
  const double seconds = text ? std::atof(text) : 0.0;
  return seconds > 0 ? seconds : 2.0;
}

void Register() {
  for (const Shape& shape : kShapes) {
    for (const Weights& weights :
         {Weights{DType::kBF16, QuantFormat::kNone, "bf16"}, Weights{DType::kF32, QuantFormat::kNone, "fp32"},
          Weights{DType::kBF16, QuantFormat::kFp8Block, "fp8"}, Weights{DType::kBF16, QuantFormat::kMxfp4, "mxfp4"}}) {
      const std::string name = std::string(shape.name) + "/" + weights.name;
      auto* benchmark = benchmark::RegisterBenchmark(name.c_str(), BM_MoeLayer, shape, weights)
                            ->ArgName("T")
                            ->Arg(1)
                            ->Arg(8)
                            ->Arg(64)
                            ->Unit(benchmark::kMillisecond)
                            ->UseManualTime()
                            ->MinTime(LayerMinTime());
      if (weights.format == QuantFormat::kNone) benchmark->Arg(512)->Arg(4096);
    }
  }
  benchmark::RegisterBenchmark("panel_stream/bf16", BM_PanelStream)
      ->ArgNames({"rows", "threads"})
      ->ArgsProduct({{1, 6, 12}, {1, ThreadTeam::Shared().size()}})
      ->Unit(benchmark::kMillisecond)
      ->UseManualTime()
      ->MinTime(1.0);
  for (QuantFormat format : {QuantFormat::kFp8Block, QuantFormat::kMxfp4}) {
    benchmark::RegisterBenchmark(("quantized_decode/" + std::string(QuantFormatName(format))).c_str(),
                                 BM_QuantizedDecode, format)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime()
        ->Iterations(5);
  }
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  // The dense reference is oneDNN on OpenMP, whose idle workers would
  // otherwise spin for milliseconds after each reference run, on the cores
  // the next engine run needs. libgomp reads this before main: start again.
  // A forced AVX2 path holds the dense reference to AVX2 as well (oneDNN
  // reads its variable once, at its first use).
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    const char* path = std::getenv(moe::kCpuPathEnvironmentVariable);
    if (path && std::string(path) == "avx2" && std::getenv("ONEDNN_MAX_CPU_ISA") == nullptr) {
      setenv("ONEDNN_MAX_CPU_ISA", "AVX2", 1);
    }
    execv("/proc/self/exe", argv);
  }
  benchmark::Initialize(&argc, argv);
  moe::Register();
  std::printf("threads: %d (engine team)\n", moe::ThreadTeam::Shared().size());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
