// The executor seam: the factory builds and injects executors by kind;
// ownership splits a plan so that executors holding parts of a layer give
// the whole layer's rows bit for bit; a planned workspace allocates nothing
// per batch; records account for every token.
#include "engine/api/layer_executor.h"

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>
#include <vector>

#include "engine/api/dispatch.h"
#include "engine/api/executor_factory.h"
#include "engine/api/expert_set.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"
#include "tests/test_util.h"

// Heap allocations are counted while g_counting is set (every thread).
namespace {
std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocations{0};

void* CountedAllocate(std::size_t size, std::size_t alignment) {
  if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1, std::memory_order_relaxed);
  void* p = alignment > alignof(std::max_align_t)
                ? std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment)
                : std::malloc(size == 0 ? 1 : size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t size) { return CountedAllocate(size, alignof(std::max_align_t)); }
void* operator new(std::size_t size, std::align_val_t alignment) {
  return CountedAllocate(size, static_cast<std::size_t>(alignment));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

// A DeepSeek-like layer stack: group-limited sigmoid routing, a shared
// expert, pre-norm and residual; bf16 weights.
ModelSpec DeepSeekLikeSpec() {
  ModelSpec spec;
  spec.name = "deepseek_like";
  spec.hidden_size = 64;
  spec.intermediate_size = 32;
  spec.shared_intermediate_size = 48;
  spec.router = {.kind = RouterKind::kSigmoidGroupTopK,
                 .num_experts = 16,
                 .top_k = 4,
                 .norm_topk_prob = true,
                 .routed_scaling_factor = 2.5f,
                 .n_group = 4,
                 .topk_group = 2};
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = DType::kBF16;
  return spec;
}

// Top-2 softmax routing over 8 experts, no norm: the layer input is the
// experts' input.
ModelSpec PlainTop2Spec() {
  ModelSpec spec;
  spec.name = "plain_top2";
  spec.hidden_size = 48;
  spec.intermediate_size = 40;
  spec.router = {.num_experts = 8, .top_k = 2, .norm_topk_prob = true};
  spec.weight_dtype = DType::kF32;
  return spec;
}

std::vector<float> RandomRows(int rows, int width, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(rows) * width);
  for (float& v : values) v = normal(rng);
  return values;
}

absl::StatusOr<std::unique_ptr<LayerExecutor>> CpuExecutorFor(const ModelDefinition& model,
                                                              std::optional<ExpertSet> held = std::nullopt) {
  return CreateExecutor(model, {.kind = "cpu",
                                .compute = MoeModel::ComputeDType(model.spec, {}),
                                .cpu_path = CpuPath::kAuto,
                                .device_index = 0,
                                .held = std::move(held)});
}

TEST(ExecutorFactory, TheEngineRegistersTheCpuExecutor) {
  const std::vector<std::string> kinds = ExecutorKinds();
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "cpu"), kinds.end());
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(DemoModel(), {}));
  EXPECT_THAT(model->executor().Describe(), HasSubstr("cpu"));
}

TEST(ExecutorFactory, AnUnknownKindFailsListingTheKindsThereAre) {
  EXPECT_THAT(MoeModel::Create(DemoModel(), {.executor = "tpu"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown executor 'tpu'; this build has: cpu")));
}

// An executor that delegates to the CPU one and counts the layers it runs:
// what a new kind looks like to the factory.
class CountingExecutor : public LayerExecutor {
 public:
  CountingExecutor(std::unique_ptr<LayerExecutor> inner, std::atomic<int>* layers)
      : inner_(std::move(inner)), layers_(layers) {}
  std::string Describe() const override { return "counting " + inner_->Describe(); }
  DType compute_dtype() const override { return inner_->compute_dtype(); }
  size_t WeightBytes() const override { return inner_->WeightBytes(); }
  const ExpertSet& held() const override { return inner_->held(); }
  bool RunsEveryExpert() const override { return inner_->RunsEveryExpert(); }
  ExpertTiming timing() const override { return ExpertTiming::kLayerOnly; }
  absl::StatusOr<std::unique_ptr<ExecutorWorkspace>> NewWorkspace(int max_tokens) const override {
    return inner_->NewWorkspace(max_tokens);
  }
  absl::Status Begin(const TensorRef& input, ExecutorWorkspace& ws) const override { return inner_->Begin(input, ws); }
  absl::Status Enqueue(const LayerStep& step, ExecutorWorkspace& ws) const override {
    ++*layers_;
    return inner_->Enqueue(step, ws);
  }
  absl::Status Finish(std::span<const MutableTensorRef> outputs, ExecutorWorkspace& ws) const override {
    return inner_->Finish(outputs, ws);
  }
  absl::Status RunExperts(const ExpertRows& rows, ExecutorWorkspace& ws) const override {
    return inner_->RunExperts(rows, ws);
  }

 private:
  std::unique_ptr<LayerExecutor> inner_;
  std::atomic<int>* layers_;
};

// Records what the model reports.
class RecordingObserver : public EngineObserver {
 public:
  void OnLayer(const LayerReport& report) override {
    per_expert_seconds_reported += report.compute_seconds.empty() ? 0 : 1;
    layers += 1;
    experts_seconds += report.experts_seconds;
  }
  int layers = 0;
  int per_expert_seconds_reported = 0;
  double experts_seconds = 0;
};

TEST(ExecutorFactory, ARegisteredKindIsBuiltByNameAndRunsTheModel) {
  static std::atomic<int> layers_run{0};
  ASSERT_OK(RegisterExecutorKind("counting",
                                 [](const ModelDefinition& model,
                                    const ExecutorOptions& options) -> absl::StatusOr<std::unique_ptr<LayerExecutor>> {
                                   ExecutorOptions cpu = options;
                                   cpu.kind = "cpu";
                                   ASSIGN_OR_RETURN(auto inner, CreateExecutor(model, cpu));
                                   return std::make_unique<CountingExecutor>(std::move(inner), &layers_run);
                                 }));
  EXPECT_THAT(RegisterExecutorKind("counting", nullptr),
              StatusIs(absl::StatusCode::kAlreadyExists, HasSubstr("'counting' is registered already")));

  const ModelDefinition definition = GenerateRandomModel(DeepSeekLikeSpec(), 3, 5);
  RecordingObserver observer;
  ASSERT_OK_AND_ASSIGN(auto counted, MoeModel::Create(definition, {.observer = &observer, .executor = "counting"}));
  ASSERT_OK_AND_ASSIGN(auto plain, MoeModel::Create(definition, {}));
  EXPECT_THAT(counted->executor().Describe(), HasSubstr("counting cpu"));
  const std::vector<float> input = RandomRows(9, 64, 1);
  MoeModel::RunResult a, b;
  ASSERT_OK(counted->Run(input.data(), 9, {}, testing::PlanWorkspace(*counted, 16).get(), &a));
  ASSERT_OK(plain->Run(input.data(), 9, {}, testing::PlanWorkspace(*plain, 16).get(), &b));
  EXPECT_EQ(layers_run.load(), 3);
  EXPECT_EQ(a.outputs, b.outputs);
  // kLayerOnly: the layer's expert time, and no per-expert seconds.
  EXPECT_EQ(observer.layers, 3);
  EXPECT_EQ(observer.per_expert_seconds_reported, 0);
  EXPECT_GT(observer.experts_seconds, 0);
}

TEST(ExpertSet, CountsAndSummarisesWhatItHolds) {
  ExpertSet set = ExpertSet::None(2, 8);
  EXPECT_EQ(set.count(), 0);
  for (int e = 0; e < 8; e += 2) {
    set.Add(0, e);
    set.Add(1, e);
  }
  EXPECT_EQ(set.count(), 8);
  EXPECT_EQ(set.count_in_layer(1), 4);
  EXPECT_TRUE(set.Contains(1, 6));
  EXPECT_FALSE(set.Contains(1, 7));
  EXPECT_EQ(set.Summary(), "4 of 8 experts in each of 2 layers");
  set.Remove(1, 6);
  EXPECT_EQ(set.Summary(), "7 of 16 (layer, expert) pairs");
  EXPECT_EQ(ExpertSet::All(3, 4).Summary(), "all 4 experts of 3 layers");
}

TEST(ExpertSet, UnitesComplementsAndTravelsAsBytes) {
  ExpertSet a = ExpertSet::None(2, 3), b = ExpertSet::None(2, 3);
  a.Add(0, 1);
  b.Add(1, 2);
  a.AddAll(b);
  EXPECT_TRUE(a.Contains(0, 1) && a.Contains(1, 2));
  EXPECT_EQ(a.count(), 2);
  const ExpertSet rest = a.Complement();
  EXPECT_EQ(rest.count(), 4);
  EXPECT_FALSE(rest.Contains(0, 1));
  EXPECT_EQ(a.Bytes(), std::string("\0\1\0\0\0\1", 6));
  ASSERT_OK_AND_ASSIGN(const ExpertSet back, ExpertSet::FromBytes(a.Bytes(), 2, 3));
  EXPECT_EQ(back, a);
  EXPECT_THAT(ExpertSet::FromBytes("\1", 2, 3), StatusIs(absl::StatusCode::kInvalidArgument,
                                                         HasSubstr("held has 1 entries; the model has 2 layers of 3")));
}

TEST(ExpertSet, ParsesListsOfExpertsAndLayers) {
  ASSERT_OK_AND_ASSIGN(const ExpertSet set, ParseExpertSet("0-2, 7", "1", 3, 8));
  EXPECT_EQ(set.count(), 4);
  EXPECT_TRUE(set.Contains(1, 7));
  EXPECT_FALSE(set.Contains(0, 0));
  ASSERT_OK_AND_ASSIGN(const ExpertSet all, ParseExpertSet("", "all", 3, 8));
  EXPECT_EQ(all.count(), 24);
  EXPECT_THAT(ParseExpertSet("3-1", "", 3, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bad expert '3-1': expected N or N-M")));
  EXPECT_THAT(ParseExpertSet("x", "", 3, 8), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("bad expert 'x'")));
  EXPECT_THAT(ParseExpertSet("0", "2-3", 3, 8),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer '2-3' out of range: there are 3")));
}

TEST(ExpertSet, ListsReadBackAsTheSameSet) {
  ExpertSet set = ExpertSet::None(4, 8);
  for (int layer : {0, 2}) {
    for (int e : {0, 1, 2, 3, 7}) set.Add(layer, e);
  }
  set.Add(3, 5);
  const auto lists = ExpertSetLists(set);
  ASSERT_EQ(lists.size(), 2u);
  EXPECT_EQ(lists[0], std::make_pair(std::string("0-3,7"), std::string("0,2")));
  EXPECT_EQ(lists[1], std::make_pair(std::string("5"), std::string("3")));
  ExpertSet read = ExpertSet::None(4, 8);
  for (const auto& [experts, layers] : lists) {
    ASSERT_OK_AND_ASSIGN(const ExpertSet part, ParseExpertSet(experts, layers, 4, 8));
    for (int layer = 0; layer < 4; ++layer) {
      for (int e = 0; e < 8; ++e) {
        if (part.Contains(layer, e)) read.Add(layer, e);
      }
    }
  }
  for (int layer = 0; layer < 4; ++layer) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(read.Contains(layer, e), set.Contains(layer, e)) << layer << " " << e;
  }
  EXPECT_TRUE(ExpertSetLists(ExpertSet::None(2, 4)).empty());
}

// The plan a front end makes for top-2 selections `ids` (no capacity).
DispatchPlan PlanFor(const std::vector<int32_t>& ids, int tokens, int experts) {
  Routing routing;
  routing.num_tokens = tokens;
  routing.slots = 2;
  routing.expert = ids;
  routing.weight.assign(ids.size(), 0.5f);
  DispatchPlan plan;
  PlanDispatch(routing, experts, -1, &plan);
  return plan;
}

// 5 tokens over 6 experts.
DispatchPlan SamplePlan() { return PlanFor({0, 3, 3, 5, 1, 0, 5, 4, 3, 0}, 5, 6); }

TEST(SplitPlanByOwner, EachRowGoesToTheFirstOwnerHoldingItsExpert) {
  const DispatchPlan plan = SamplePlan();
  ExpertSet low = ExpertSet::None(1, 6), high = ExpertSet::None(1, 6);
  for (int e : {0, 1, 2, 3}) low.Add(0, e);
  for (int e : {3, 4, 5}) high.Add(0, e);  // 3 is a replica: low comes first
  const ExpertSet* owners[] = {&low, &high};
  std::vector<PlanShard> shards;
  ASSERT_OK(SplitPlanByOwner(plan, 0, owners, &shards));
  ASSERT_EQ(shards.size(), 2u);
  EXPECT_EQ(shards[0].experts, (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(shards[1].experts, (std::vector<int>{4, 5}));
  // Every row once, with its token, and the counts of its expert.
  EXPECT_EQ(shards[0].plan.num_rows() + shards[1].plan.num_rows(), plan.num_rows());
  for (const PlanShard& shard : shards) {
    for (int e : shard.experts) {
      ASSERT_EQ(shard.plan.rows_of(e), plan.rows_of(e));
      EXPECT_EQ(shard.plan.tokens_routed[e], plan.tokens_routed[e]);
      for (int64_t r = 0; r < plan.rows_of(e); ++r) {
        EXPECT_EQ(shard.plan.row_token[shard.plan.offsets[e] + r], plan.row_token[shard.source_offset[e] + r]);
      }
    }
  }
  // Reordering the owners moves the replica.
  const ExpertSet* reversed[] = {&high, &low};
  ASSERT_OK(SplitPlanByOwner(plan, 0, reversed, &shards));
  EXPECT_EQ(shards[0].experts, (std::vector<int>{3, 4, 5}));
}

TEST(SplitPlanByOwner, AnExpertWithRowsAndNoOwnerFailsNamingIt) {
  ExpertSet some = ExpertSet::All(1, 6);
  some.Remove(0, 5);
  some.Remove(0, 2);  // expert 2 has no rows: needs no owner
  const ExpertSet* owners[] = {&some};
  std::vector<PlanShard> shards;
  EXPECT_THAT(SplitPlanByOwner(SamplePlan(), 0, owners, &shards),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("layer 0 expert 5 has 2 rows and no owner")));
}

TEST(CpuExecutor, OwnersOfHalfTheExpertsTogetherGiveTheWholeLayerBitForBit) {
  const ModelSpec spec = PlainTop2Spec();
  const ModelDefinition definition = GenerateRandomModel(spec, 2, 11);
  const int T = 37, d = spec.hidden_size, E = spec.router.num_experts;
  ExpertSet even = ExpertSet::None(2, E), odd = ExpertSet::None(2, E);
  for (int layer = 0; layer < 2; ++layer) {
    for (int e = 0; e < E; ++e) (e % 2 ? odd : even).Add(layer, e);
  }
  ASSERT_OK_AND_ASSIGN(auto whole, CpuExecutorFor(definition));
  ASSERT_OK_AND_ASSIGN(auto holds_even, CpuExecutorFor(definition, even));
  ASSERT_OK_AND_ASSIGN(auto holds_odd, CpuExecutorFor(definition, odd));
  EXPECT_THAT(holds_even->Describe(), HasSubstr("holds 4 of 8 experts in each of 2 layers"));
  EXPECT_LT(holds_even->WeightBytes(), whole->WeightBytes() * 0.6);

  // The front end's routing: the whole model's, for layer 1.
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {}));
  const std::vector<float> tokens = RandomRows(T, d, 3);
  MoeModel::RunResult routed;
  ASSERT_OK(model->Run(tokens.data(), T, {.layer = 1, .return_routing = true}, testing::PlanWorkspace(*model, T).get(),
                       &routed));
  const DispatchPlan plan = PlanFor(routed.expert_ids, T, E);

  std::vector<float> expected(static_cast<size_t>(plan.num_rows()) * d), combined(expected.size(), -1.0f);
  ASSERT_OK_AND_ASSIGN(auto ws, whole->NewWorkspace(T));
  ASSERT_OK(whole->RunExperts(
      {.layer = 1, .tokens = tokens.data(), .num_tokens = T, .plan = &plan, .expert_out = expected.data()}, *ws));
  const ExpertSet* owners[] = {&holds_even->held(), &holds_odd->held()};
  std::vector<PlanShard> shards;
  ASSERT_OK(SplitPlanByOwner(plan, 1, owners, &shards));
  const LayerExecutor* executors[] = {holds_even.get(), holds_odd.get()};
  for (int i = 0; i < 2; ++i) {
    std::vector<float> out(static_cast<size_t>(shards[i].plan.num_rows()) * d);
    ASSERT_OK_AND_ASSIGN(auto shard_ws, executors[i]->NewWorkspace(T));
    ASSERT_OK(executors[i]->RunExperts(
        {.layer = 1, .tokens = tokens.data(), .num_tokens = T, .plan = &shards[i].plan, .expert_out = out.data()},
        *shard_ws));
    ScatterShardRows(shards[i], out.data(), d, combined.data());
  }
  EXPECT_EQ(combined, expected);
}

TEST(CpuExecutor, ALayerNeedingAnExpertItDoesNotHoldFailsNamingIt) {
  const ModelDefinition definition = GenerateRandomModel(PlainTop2Spec(), 1, 2);
  ExpertSet first_half = ExpertSet::None(1, 8);
  for (int e = 0; e < 4; ++e) first_half.Add(0, e);
  ASSERT_OK_AND_ASSIGN(auto executor, CpuExecutorFor(definition, first_half));
  ASSERT_OK_AND_ASSIGN(auto ws, executor->NewWorkspace(64));
  const std::vector<float> input = RandomRows(64, 48, 4);
  ASSERT_OK(executor->Begin({.data = input.data(), .rows = 64, .cols = 48}, *ws));
  EXPECT_THAT(executor->Enqueue({.layer = 0}, *ws),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("is not held by this executor (it holds 4 of 8 experts in each of 1 layers)")));
  // A model runs only on an executor that holds every expert.
  EXPECT_THAT(MoeModel::Create(definition, std::move(executor), {}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("holds 4 of 8 experts")));
  ExpertSet wrong_shape = ExpertSet::All(2, 8);
  EXPECT_THAT(CpuExecutorFor(definition, wrong_shape),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("given for 2 layers of 8 experts")));
}

TEST(CpuExecutor, RecordsAccountForEveryTokenOfEveryLayer) {
  const ModelDefinition definition = GenerateRandomModel(DeepSeekLikeSpec(), 3, 6);
  ASSERT_OK_AND_ASSIGN(auto executor, CpuExecutorFor(definition));
  ASSERT_OK_AND_ASSIGN(auto ws, executor->NewWorkspace(50));
  const std::vector<float> input = RandomRows(50, 64, 5);
  std::vector<float> output(input.size());
  ASSERT_OK(executor->Begin({.data = input.data(), .rows = 50, .cols = 64}, *ws));
  for (int layer : {2, 0}) ASSERT_OK(executor->Enqueue({.layer = layer}, *ws));
  const MutableTensorRef outputs[] = {{.data = output.data(), .rows = 50, .cols = 64}};
  ASSERT_OK(executor->Finish(outputs, *ws));
  ASSERT_EQ(ws->records().size(), 2u);
  EXPECT_EQ(ws->records()[0].layer, 2);
  EXPECT_EQ(ws->records()[1].layer, 0);
  for (const LayerRecord& record : ws->records()) {
    int64_t routed = 0, dropped = 0;
    for (int64_t n : record.tokens_routed) routed += n;
    for (int64_t n : record.tokens_dropped) dropped += n;
    EXPECT_EQ(routed, 50 * 4);
    EXPECT_EQ(dropped, 0);
    EXPECT_GT(record.experts_seconds, 0);
  }
}

TEST(CpuExecutor, APlannedWorkspaceAllocatesNothingPerBatch) {
  // Batches of 1, the planned maximum and between, through every layer;
  // 300 tokens are enough for the router's selection and the combine to
  // use the thread team.
  for (const ModelSpec& spec : {DeepSeekLikeSpec(), PlainTop2Spec()}) {
    SCOPED_TRACE(spec.name);
    const ModelDefinition definition = GenerateRandomModel(spec, 2, 7);
    ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {}));
    auto ws = testing::PlanWorkspace(*model, 300);
    const std::vector<float> input = RandomRows(300, spec.hidden_size, 6);
    MoeModel::RunResult result;
    result.outputs.resize(1);
    result.outputs[0].reserve(input.size());
    result.expert_ids.reserve(300 * 2 * 8);
    result.expert_weights.reserve(300 * 2 * 8);
    bool all_ok = true;  // the matchers allocate: checked after counting
    g_allocations = 0;
    g_counting = true;
    for (int T : {1, 300, 77}) {
      all_ok = all_ok && model->Run(input.data(), T, {.return_routing = true}, ws.get(), &result).ok();
    }
    g_counting = false;
    EXPECT_TRUE(all_ok);
    EXPECT_EQ(g_allocations.load(), 0);
  }
}

TEST(CpuExecutor, RejectsBatchesItWasNotPlannedFor) {
  ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(DemoModel(), {}));
  auto ws = testing::PlanWorkspace(*model, 8);
  ASSERT_NE(ws, nullptr);
  EXPECT_EQ(ws->max_tokens(), 8);
  const std::vector<float> input = RandomRows(9, model->spec().hidden_size, 7);
  MoeModel::RunResult result;
  EXPECT_THAT(model->Run(input.data(), 9, {}, ws.get(), &result),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("a batch of 9 tokens; the workspace is planned for 1 to 8")));
  EXPECT_OK(model->Run(input.data(), 8, {}, ws.get(), &result));
  EXPECT_THAT(model->NewWorkspace(0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_tokens must be >= 1")));
}

}  // namespace
}  // namespace moe
