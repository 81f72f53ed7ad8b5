// MoeModel on the CPU executor: batch invariance on every CPU path; exact
// per-expert accounting; rejected requests; a load too large for memory;
// compute dtypes; multi-gate outputs against the double reference
// (reference_model.h); format round trips over the reference grid. How every
// executor's layers match the reference is executor_conformance_test.cc's.
#include "engine/api/moe_model.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <random>
#include <string>

#include "engine/api/dtype.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "engine/cpu/weight_arena.h"
#include "engine/loading/safetensors.h"
#include "tests/engine/reference_model.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::BaseSpec;
using ::moe::testing::Case;
using ::moe::testing::CompareRouting;
using ::moe::testing::CpuPathParamName;
using ::moe::testing::Grid;
using ::moe::testing::NormalizedMaxError;
using ::moe::testing::PlanWorkspace;
using ::moe::testing::ReferenceRoute;
using ::moe::testing::ReferenceRouting;
using ::moe::testing::RefLayer;
using ::moe::testing::StatusIs;
using ::moe::testing::Values;
using ::testing::HasSubstr;

class BatchInvarianceTest : public ::testing::TestWithParam<CpuPath> {};

TEST_P(BatchInvarianceTest, OutputOfATokenDoesNotDependOnItsBatch) {
  const CpuPath path = GetParam();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(path, dtype);
    ModelSpec spec = BaseSpec(128, 256, 8, 2);
    spec.weight_dtype = dtype;
    ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(GenerateRandomModel(spec, 2, 3), {.cpu_path = path}));
    auto ws = PlanWorkspace(*model);
    std::mt19937 rng(9);
    std::normal_distribution<float> normal;
    const int T = 300;
    std::vector<float> batch(static_cast<size_t>(T) * 128);
    for (float& v : batch) v = normal(rng);
    MoeModel::RunResult together;
    ASSERT_OK(model->Run(batch.data(), T, {}, ws.get(), &together));
    bool bit_exact = true;
    for (int t : {0, 1, 150, 299}) {
      MoeModel::RunResult alone;
      ASSERT_OK(model->Run(batch.data() + static_cast<size_t>(t) * 128, 1, {}, ws.get(), &alone));
      std::vector<float> slice(together.outputs[0].begin() + t * 128, together.outputs[0].begin() + (t + 1) * 128);
      EXPECT_LT(NormalizedMaxError(alone.outputs[0], slice), dtype == DType::kBF16 ? 1e-2 : 1e-5);
      bit_exact = bit_exact && alone.outputs[0] == slice;
    }
    // Documented in docs/ENGINE.md: every CPU path is bit-exact.
    EXPECT_TRUE(bit_exact) << CpuPathName(path) << (dtype == DType::kF32 ? " fp32" : " bf16")
                           << ": batch composition changed low-order bits";
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, BatchInvarianceTest, ::testing::ValuesIn(AllCpuPaths()), CpuPathParamName());

// Llama 4's layer: expert(w * x), summed unweighted, plus the shared expert,
// on every CPU path, against the double reference given the engine's routing
// (a sigmoid top-k; the router itself is the conformance grid's to check).
class ExpertInputScalingTest : public ::testing::TestWithParam<CpuPath> {};

TEST_P(ExpertInputScalingTest, RoutedExpertsSeeTheirInputTimesTheRoutingWeight) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    ModelSpec spec = BaseSpec(64, 48, 8, 2);
    spec.router.kind = RouterKind::kSigmoidGroupTopK;
    spec.routing_weights_scale_input = true;
    spec.shared_intermediate_size = 48;
    spec.weight_dtype = dtype;
    SKIP_UNLESS_CPU_RUNS(GetParam(), dtype);
    const ModelDefinition definition = GenerateRandomModel(spec, 2, 31);
    ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {.cpu_path = GetParam()}));
    const int tokens = 11;
    std::vector<float> input(tokens * 64);
    for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.37 * i + 0.2);
    auto ws = PlanWorkspace(*model);
    for (int layer = 0; layer < 2; ++layer) {
      MoeModel::RunResult result;
      ASSERT_OK(model->Run(input.data(), tokens, {.layer = layer, .return_routing = true}, ws.get(), &result));
      std::vector<float> expected;
      for (int t = 0; t < tokens; ++t) {
        std::vector<int> ids(result.expert_ids.begin() + t * 2, result.expert_ids.begin() + (t + 1) * 2);
        std::vector<double> w(result.expert_weights.begin() + t * 2, result.expert_weights.begin() + (t + 1) * 2);
        auto y = RefLayer(definition, layer, input.data() + t * 64, ids, w, dtype != DType::kF32);
        expected.insert(expected.end(), y.begin(), y.end());
      }
      EXPECT_LT(NormalizedMaxError(result.outputs[0], expected), dtype == DType::kF32 ? 1e-5 : 1e-2)
          << "layer " << layer << (dtype == DType::kF32 ? " fp32" : " bf16");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, ExpertInputScalingTest, ::testing::ValuesIn(AllCpuPaths()), CpuPathParamName());

// gpt-oss's experts (clamped SwiGLU with biases on all three projections,
// a limit low enough to bind) and its router's logit bias, on every CPU
// path: the routing against the reference router's, the output against the
// double reference given the engine's routing.
class ClampedSwigluTest : public ::testing::TestWithParam<CpuPath> {};

TEST_P(ClampedSwigluTest, ExpertsAndBiasedRouterFollowGptOss) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    ModelSpec spec = BaseSpec(64, 40, 8, 2);
    spec.expert_kind = ExpertKind::kClampedSwiglu;
    spec.swiglu_limit = 1.0f;
    spec.router.norm_topk_prob = true;
    spec.weight_dtype = dtype;
    SKIP_UNLESS_CPU_RUNS(GetParam(), dtype);
    ModelDefinition definition = GenerateRandomModel(spec, 1, 41);
    // A bias large enough to change most tokens' choices.
    std::vector<float> bias(8, 0.0f);
    bias[5] = 3;
    bias[2] = -1;
    definition.layers[0].router_logit_bias = HostTensor::FromFloats({8}, bias);
    ASSERT_OK(ValidateModel(definition));
    ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {.cpu_path = GetParam()}));
    const int tokens = 9;
    std::vector<float> input(tokens * 64);
    for (size_t i = 0; i < input.size(); ++i) input[i] = 2 * std::sin(0.41 * i + 0.3);
    auto ws = PlanWorkspace(*model);
    MoeModel::RunResult result;
    ASSERT_OK(model->Run(input.data(), tokens, {.return_routing = true}, ws.get(), &result));
    const ReferenceRouting routing =
        ReferenceRoute(spec, definition.layers[0], input.data(), tokens, dtype != DType::kF32);
    std::vector<float> expected;
    for (int t = 0; t < tokens; ++t) {
      if (!routing.tokens[t].ambiguous) {
        EXPECT_EQ(CompareRouting(routing.tokens[t], &result.expert_ids[t * 2], &result.expert_weights[t * 2], 2), "")
            << "token " << t;
      }
      std::vector<int> ids(result.expert_ids.begin() + t * 2, result.expert_ids.begin() + (t + 1) * 2);
      std::vector<double> w(result.expert_weights.begin() + t * 2, result.expert_weights.begin() + (t + 1) * 2);
      auto y = RefLayer(definition, 0, input.data() + t * 64, ids, w, dtype != DType::kF32);
      expected.insert(expected.end(), y.begin(), y.end());
    }
    EXPECT_LT(NormalizedMaxError(result.outputs[0], expected), dtype == DType::kF32 ? 1e-5 : 1e-2)
        << (dtype == DType::kF32 ? "fp32" : "bf16");
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, ClampedSwigluTest, ::testing::ValuesIn(AllCpuPaths()), CpuPathParamName());

// Counts what the observer is told.
class RecordingObserver : public EngineObserver {
 public:
  void OnLayer(const LayerReport& report) override {
    std::lock_guard<std::mutex> lock(mu);
    routed.resize(std::max<size_t>(routed.size(), report.layer + 1));
    dropped.resize(routed.size());
    routed[report.layer].resize(report.tokens_routed.size());
    dropped[report.layer].resize(report.tokens_routed.size());
    for (size_t e = 0; e < report.tokens_routed.size(); ++e) {
      routed[report.layer][e] += report.tokens_routed[e];
      dropped[report.layer][e] += report.tokens_dropped[e];
    }
  }
  std::mutex mu;
  std::vector<std::vector<int64_t>> routed, dropped;
};

TEST(MoeModel, ReportsExactlyTokensTimesKPerLayerAndDropsUnderCapacity) {
  ModelSpec spec = BaseSpec(32, 32, 4, 2);
  spec.router.capacity_factor = 0.5f;  // capacity = ceil(0.5 * 40 * 2 / 4) = 10 per expert
  RecordingObserver observer;
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(GenerateRandomModel(spec, 3, 5), {.observer = &observer}));
  auto ws = PlanWorkspace(*model);
  std::vector<float> input(40 * 32, 0.5f);
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.37 * i);
  MoeModel::RunResult result;
  ASSERT_OK(model->Run(input.data(), 40, {.return_routing = true}, ws.get(), &result));
  ASSERT_EQ(observer.routed.size(), 3u);
  for (int l = 0; l < 3; ++l) {
    int64_t routed = 0, dropped = 0, kept_in_routing = 0;
    for (int e = 0; e < 4; ++e) {
      routed += observer.routed[l][e];
      dropped += observer.dropped[l][e];
      EXPECT_LE(observer.routed[l][e] - observer.dropped[l][e], 10);
    }
    for (int t = 0; t < 40; ++t) {
      for (int s = 0; s < 2; ++s) kept_in_routing += result.expert_ids[(t * 3 + l) * 2 + s] >= 0;
    }
    EXPECT_EQ(routed, 40 * 2) << "layer " << l;
    EXPECT_EQ(routed - dropped, kept_in_routing) << "layer " << l;
    EXPECT_EQ(routed - dropped, 40) << "4 experts x capacity 10";
  }
}

TEST(MoeModel, RejectsBadRequests) {
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(DemoModel(), {}));
  auto ws = PlanWorkspace(*model);
  std::vector<float> input(256, 1.0f);
  MoeModel::RunResult result;
  EXPECT_THAT(model->Run(input.data(), 0, {}, ws.get(), &result),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at least one token")));
  EXPECT_THAT(model->Run(input.data(), 1, {.layer = 2}, ws.get(), &result),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 2 out of range")));
  EXPECT_THAT(model->Run(input.data(), 1, {.layer = -1}, ws.get(), &result),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("out of range")));
}

// While it lives, this process may map only what it maps now plus
// `headroom_bytes` more (RLIMIT_AS); the old limit comes back after.
class AddressSpaceLimit {
 public:
  explicit AddressSpaceLimit(size_t headroom_bytes) {
    getrlimit(RLIMIT_AS, &old_);
    size_t pages = 0;
    std::ifstream("/proc/self/statm") >> pages;
    rlimit lowered = old_;
    lowered.rlim_cur = pages * static_cast<size_t>(sysconf(_SC_PAGESIZE)) + headroom_bytes;
    set_ = pages > 0 && setrlimit(RLIMIT_AS, &lowered) == 0;
  }
  ~AddressSpaceLimit() {
    if (set_) setrlimit(RLIMIT_AS, &old_);
  }
  bool set() const { return set_; }

 private:
  rlimit old_{};
  bool set_ = false;
};

// A model too large for the memory left fails its load with a Status, and no
// std::bad_alloc leaves Create. Memory is made scarce by an address-space
// limit, with the weight arena's current region full, so that packing the
// first weight must map a new region (64 MB) and cannot.
TEST(MoeModel, ModelTooLargeForMemoryFailsItsLoadWithResourceExhausted) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers reserve more address space than the limit leaves";
#endif
  const ModelDefinition demo = DemoModel();
  ASSERT_OK_AND_ASSIGN(const auto full_region, WeightArena::Shared().TryAllocate(WeightArena::kRegionBytes));
  absl::StatusOr<std::unique_ptr<MoeModel>> model;
  {
    AddressSpaceLimit limit(16 << 20);
    ASSERT_TRUE(limit.set()) << "cannot lower RLIMIT_AS";
    model = MoeModel::Create(demo, {});
  }
  EXPECT_THAT(model, StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("bytes of weight memory")));
}

TEST(MoeModel, ForceFp32ComputesBf16WeightsInFp32) {
  ModelDefinition demo = DemoModel();
  ASSERT_OK_AND_ASSIGN(auto bf16, MoeModel::Create(demo, {}));
  ASSERT_OK_AND_ASSIGN(auto fp32, MoeModel::Create(demo, {.force_fp32 = true}));
  EXPECT_EQ(bf16->compute_dtype(), DType::kBF16);
  EXPECT_EQ(fp32->compute_dtype(), DType::kF32);
  std::vector<float> input(4 * 256);
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::cos(0.1 * i);
  MoeModel::RunResult a, b;
  auto wa = PlanWorkspace(*bf16), wb = PlanWorkspace(*fp32);
  ASSERT_OK(bf16->Run(input.data(), 4, {}, wa.get(), &a));
  ASSERT_OK(fp32->Run(input.data(), 4, {}, wb.get(), &b));
  EXPECT_LT(NormalizedMaxError(a.outputs[0], b.outputs[0]), 2e-2);
  EXPECT_NE(a.outputs[0], b.outputs[0]);
}

TEST(MoeModel, MultiGateGivesOneOutputPerTask) {
  ModelSpec spec = BaseSpec(32, 32, 6, 1);
  spec.router.kind = RouterKind::kDenseSoftmax;
  spec.router.num_tasks = 3;
  ModelDefinition definition = GenerateRandomModel(spec, 1, 8);
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {}));
  EXPECT_EQ(model->num_outputs(), 3);
  std::vector<float> input(2 * 32);
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(1.0 + i);
  auto ws = PlanWorkspace(*model);
  MoeModel::RunResult result;
  ASSERT_OK(model->Run(input.data(), 2, {}, ws.get(), &result));
  ASSERT_EQ(result.outputs.size(), 3u);
  // Each task against the reference with its own gate's softmax weights.
  for (int task = 0; task < 3; ++task) {
    std::vector<float> expected;
    for (int t = 0; t < 2; ++t) {
      std::vector<double> x(input.begin() + t * 32, input.begin() + (t + 1) * 32), n = x;
      double ss = 0;
      for (double v : x) ss += v * v;
      auto norm = Values(definition.layers[0].norm, false);
      for (int i = 0; i < 32; ++i) n[i] = norm[i] * x[i] / std::sqrt(ss / 32 + spec.norm_eps);
      auto gate = Values(definition.layers[0].router[task], false);
      std::vector<double> logits(6);
      for (int e = 0; e < 6; ++e)
        for (int i = 0; i < 32; ++i) logits[e] += gate[e * 32 + i] * n[i];
      double m = *std::max_element(logits.begin(), logits.end()), sum = 0;
      for (double& v : logits) sum += (v = std::exp(v - m));
      std::vector<int> ids = {0, 1, 2, 3, 4, 5};
      std::vector<double> w;
      for (double v : logits) w.push_back(v / sum);
      auto y = RefLayer(definition, 0, input.data() + t * 32, ids, w, false);
      expected.insert(expected.end(), y.begin(), y.end());
    }
    EXPECT_LT(NormalizedMaxError(result.outputs[task], expected), 1e-5) << "task " << task;
  }
}

class RoundTripTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("moe_roundtrip_" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::vector<float> RunAll(const ModelDefinition& definition) {
    auto model = MoeModel::Create(definition, {});
    EXPECT_OK(model);
    if (!model.ok()) return {};
    std::vector<float> input(7 * definition.spec.hidden_size);
    for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.3 * i);
    auto ws = PlanWorkspace(**model);
    MoeModel::RunResult result;
    EXPECT_OK((*model)->Run(input.data(), 7, {}, ws.get(), &result));
    return result.outputs.empty() ? std::vector<float>() : result.outputs[0];
  }
  std::filesystem::path dir_;
};

TEST_F(RoundTripTest, RepositoryFormatLoadsBackIdentically) {
  for (const Case& c : Grid()) {
    ModelSpec spec = c.spec;
    spec.name = "m" + c.label;
    const ModelDefinition original = GenerateRandomModel(spec, c.layers, 11);
    ASSERT_OK(WriteRepositoryModel(original, dir_.string(), 3, 64));
    const std::string model_dir = (dir_ / spec.name).string();
    ASSERT_OK_AND_ASSIGN(const std::vector<int64_t> versions, ListVersions(model_dir));
    EXPECT_EQ(versions, std::vector<int64_t>{3});
    std::ifstream in(model_dir + "/config.pbtxt");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_OK_AND_ASSIGN(auto config, ParseModelConfig(text, "config.pbtxt"));
    ASSERT_OK_AND_ASSIGN(ModelDefinition loaded, LoadRepositoryModel(model_dir, 3, config));
    EXPECT_EQ(RunAll(loaded), RunAll(original)) << c.label;
  }
}

TEST_F(RoundTripTest, HuggingFaceFormatsLoadBackIdentically) {
  for (const std::string type : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                                 "granitemoe", "llama4_text", "gpt_oss"}) {
    for (bool fused : {false, true}) {
      ModelSpec spec = BaseSpec(32, 48, 8, 2);
      spec.source_type = type;
      spec.weight_dtype = DType::kBF16;
      if (type == "mixtral" || type == "granitemoe" || type == "gpt_oss") spec.router.norm_topk_prob = true;
      if (type == "gpt_oss") {
        spec.expert_kind = ExpertKind::kClampedSwiglu;
        spec.swiglu_limit = 1.5f;
      }
      if (type == "granitemoe") spec.router.routed_scaling_factor = 0.25f;  // its residual_multiplier
      if (type == "qwen2_moe") {
        spec.shared_intermediate_size = 40;
        spec.shared_expert_gated = true;
      }
      if (type.rfind("deepseek", 0) == 0 || type == "glm4_moe") {
        spec.router.kind = type == "deepseek_v2" ? RouterKind::kSoftmaxGroupTopK : RouterKind::kSigmoidGroupTopK;
        spec.router.n_group = 4;
        spec.router.topk_group = 2;
        spec.router.routed_scaling_factor = 2;
        spec.shared_intermediate_size = 96;
      } else {
        spec.router.logits_in_compute_dtype = true;
      }
      if (type == "llama4_text") {
        spec.router.kind = RouterKind::kSigmoidGroupTopK;
        spec.router.top_k = 1;
        spec.routing_weights_scale_input = true;
        spec.shared_intermediate_size = spec.intermediate_size;
      }
      ModelDefinition original = GenerateRandomModel(spec, 2, 12);
      if (type == "llama4_text") {
        for (LayerWeights& layer : original.layers) layer.router_bias = {};  // Llama 4's router has none
      }
      if (type == "gpt_oss") {  // a router with a bias
        for (LayerWeights& layer : original.layers) {
          layer.router_logit_bias =
              HostTensor::FromFloats({8}, {0.5f, -0.2f, 0, 0.1f, 0.3f, -0.4f, 0.2f, 0}, DType::kBF16);
        }
      }
      const std::string dir = (dir_ / (type + (fused ? "_fused" : ""))).string();
      ASSERT_OK(WriteHuggingFaceCheckpoint(original, dir, fused));
      ASSERT_OK_AND_ASSIGN(ModelDefinition loaded, LoadHuggingFaceModel(dir));
      EXPECT_EQ(loaded.spec.source_type, type);
      EXPECT_EQ(RunAll(loaded), RunAll(original)) << type << (fused ? " fused" : "");
    }
  }
}

// A published Llama 4 checkpoint is multimodal: the language model's config
// is text_config, its tensors are under language_model.
TEST_F(RoundTripTest, Llama4CheckpointReadsItsLanguageModel) {
  ModelSpec spec = BaseSpec(32, 48, 8, 1);
  spec.source_type = "llama4_text";
  spec.weight_dtype = DType::kBF16;
  spec.router.kind = RouterKind::kSigmoidGroupTopK;
  spec.router.logits_in_compute_dtype = true;
  spec.routing_weights_scale_input = true;
  spec.shared_intermediate_size = 48;
  ModelDefinition original = GenerateRandomModel(spec, 2, 5);
  for (LayerWeights& layer : original.layers) layer.router_bias = {};
  const std::string dir = (dir_ / "llama4").string();
  ASSERT_OK(WriteHuggingFaceCheckpoint(original, dir, false));
  std::ifstream in(dir + "/config.json");
  const std::string text_config((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(dir + "/config.json", std::ios::trunc)
      << "{\"model_type\": \"llama4\", \"text_config\": " << text_config << "}";
  ASSERT_OK_AND_ASSIGN(auto file, SafetensorsFile::Open(dir + "/model.safetensors"));
  std::vector<NamedTensor> renamed;
  for (const std::string& name : file->Names()) {
    ASSERT_OK_AND_ASSIGN(HostTensor tensor, file->Get(name));
    renamed.push_back(
        {"language_model." + name, HostTensor::FromFloats(tensor.shape(), tensor.ToFloats(), tensor.dtype())});
  }
  file.reset();
  ASSERT_OK(WriteSafetensors(dir + "/model.safetensors", renamed));
  ASSERT_OK_AND_ASSIGN(ModelDefinition loaded, LoadHuggingFaceModel(dir));
  EXPECT_EQ(loaded.spec.source_type, "llama4");
  EXPECT_TRUE(loaded.spec.routing_weights_scale_input);
  EXPECT_EQ(RunAll(loaded), RunAll(original));
}

TEST_F(RoundTripTest, Fp16CheckpointsComputeInBf16NearTheirFp32Result) {
  ModelSpec spec = BaseSpec(64, 96, 8, 2);
  spec.source_type = "mixtral";
  spec.router.norm_topk_prob = true;
  spec.router.logits_in_compute_dtype = true;
  spec.weight_dtype = DType::kF16;
  ASSERT_OK(WriteHuggingFaceCheckpoint(GenerateRandomModel(spec, 2, 21), (dir_ / "fp16").string(), false));
  ASSERT_OK_AND_ASSIGN(ModelDefinition loaded, LoadHuggingFaceModel((dir_ / "fp16").string()));
  EXPECT_EQ(loaded.spec.weight_dtype, DType::kF16);
  ASSERT_OK_AND_ASSIGN(auto bf16, MoeModel::Create(loaded, {}));
  ASSERT_OK_AND_ASSIGN(auto fp32, MoeModel::Create(loaded, {.force_fp32 = true}));
  EXPECT_EQ(bf16->compute_dtype(), DType::kBF16);
  std::vector<float> input(5 * 64);
  for (size_t i = 0; i < input.size(); ++i) input[i] = std::sin(0.7 * i);
  MoeModel::RunResult a, b;
  auto wa = PlanWorkspace(*bf16), wb = PlanWorkspace(*fp32);
  ASSERT_OK(bf16->Run(input.data(), 5, {}, wa.get(), &a));
  ASSERT_OK(fp32->Run(input.data(), 5, {}, wb.get(), &b));
  EXPECT_LT(NormalizedMaxError(a.outputs[0], b.outputs[0]), 2e-2);
}

TEST(DemoModel, IsDeterministic) {
  const ModelDefinition a = DemoModel(), b = DemoModel();
  EXPECT_EQ(a.layers[1].experts[7].w2.ToFloats(), b.layers[1].experts[7].w2.ToFloats());
  EXPECT_OK(ValidateModel(a));
}

}  // namespace
}  // namespace moe
