// The conformance suite of LayerExecutor (engine/api/layer_executor.h). An
// executor is registered in the executor factory (engine/api/executor_factory.h)
// only once it passes, on every model of the reference grid
// (tests/engine/reference_model.h):
//  - MatchesNaiveReference: its routing is the independent routing
//    reference's (routing_reference.h) and every layer's output the double
//    reference layer's fed with that routing, to 1e-2 (bf16 compute) or 1e-5
//    (fp32) of the output's scale;
//  - MatchesTheCpuReferenceExecutor: the routing of the CPU executor on its
//    portable path (the reference executor), slot for slot, weights within
//    2e-5; outputs within the tolerances above; and exactly the same
//    per-layer counts of routed and dropped selections for the observer;
//  - RejectsWhatItCannotRun: INVALID_ARGUMENT, naming the problem, for a batch
//    larger than its workspace, an input it does not take, the wrong number
//    of outputs and a layer out of range;
// and, on the grid's models whose layer input is the tokens themselves,
//  - ExpertsAloneOnAShardMatchTheWholeLayer: RunExperts on a plan of the
//    layer's routing, combined, gives the layer's output (what a front end
//    that spreads experts over shards relies on).
// Every registered kind runs here: the CPU executor once per kernel path,
// any other kind on its device 0. A test skips a CPU path this CPU does not
// run, and a kind whose device this machine lacks (creation UNAVAILABLE or
// FAILED_PRECONDITION).
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/api/dispatch.h"
#include "engine/api/dtype.h"
#include "engine/api/executor_factory.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "engine/api/observer.h"
#include "engine/api/router.h"
#include "tests/engine/reference_model.h"
#include "tests/engine/routing_reference.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::Case;
using ::moe::testing::CompareRouting;
using ::moe::testing::Grid;
using ::moe::testing::NormalizedMaxError;
using ::moe::testing::PlanWorkspace;
using ::moe::testing::ReferenceRoute;
using ::moe::testing::ReferenceRouting;
using ::moe::testing::ReferenceTokenRouting;
using ::moe::testing::RefLayer;
using ::moe::testing::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

// An executor under test: a registered kind and the options that build it
// (compute is set per model).
struct ExecutorUnderTest {
  std::string name;
  ExecutorOptions options;
};

void PrintTo(const ExecutorUnderTest& executor, std::ostream* os) { *os << executor.name; }

// Every registered kind: "cpu" once per kernel path ("cpu_avx512", ...),
// any other kind on its device 0.
std::vector<ExecutorUnderTest> ExecutorsUnderTest() {
  std::vector<ExecutorUnderTest> executors;
  for (const std::string& kind : ExecutorKinds()) {
    if (kind != "cpu") {
      executors.push_back({kind, {.kind = kind, .device_index = 0, .held = std::nullopt}});
      continue;
    }
    for (CpuPath path : AllCpuPaths()) {
      executors.push_back(
          {absl::StrCat("cpu_", CpuPathName(path)), {.kind = kind, .cpu_path = path, .held = std::nullopt}});
    }
  }
  return executors;
}

// The reference every executor is compared with: the CPU executor's portable path.
ExecutorUnderTest ReferenceExecutor() {
  return {"cpu_portable", {.kind = "cpu", .cpu_path = CpuPath::kPortable, .held = std::nullopt}};
}

// Whether the executor takes host input only (a device executor may take its
// device's memory).
bool TakesHostInputOnly(const ExecutorUnderTest& executor) { return executor.options.kind == "cpu"; }

// Builds `executor` for `definition`, computing in the dtype MoeModel
// chooses, and a model on it that reports to `observer`. Skips the test when
// this machine cannot run the executor.
void CreateModelOn(const ExecutorUnderTest& executor, const ModelDefinition& definition, EngineObserver* observer,
                   std::unique_ptr<MoeModel>* model) {
  ExecutorOptions options = executor.options;
  options.compute = MoeModel::ComputeDType(definition.spec, {});
  if (options.kind == "cpu") {
    SKIP_UNLESS_CPU_RUNS(options.cpu_path, options.compute);
  }
  absl::StatusOr<std::unique_ptr<LayerExecutor>> created = CreateExecutor(definition, options);
  if (options.kind != "cpu" &&
      (absl::IsUnavailable(created.status()) || absl::IsFailedPrecondition(created.status()))) {
    if (testing::DeviceRequired()) FAIL() << "MOE_REQUIRE_CUDA=1, and " << executor.name << ": " << created.status();
    GTEST_SKIP() << "no " << executor.name << " device here: " << created.status();
  }
  ASSERT_OK(created);
  ASSERT_OK_AND_ASSIGN(*model, MoeModel::Create(definition, std::move(created).value(), {.observer = observer}));
}

// What the observer is told of each layer run since the last Take().
class LayerLog : public EngineObserver {
 public:
  struct Entry {
    int layer = 0;
    std::vector<int64_t> routed, dropped;
    bool operator==(const Entry&) const = default;
  };

  void OnLayer(const LayerReport& report) override {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_back({.layer = report.layer,
                        .routed = {report.tokens_routed.begin(), report.tokens_routed.end()},
                        .dropped = {report.tokens_dropped.begin(), report.tokens_dropped.end()}});
  }
  std::vector<Entry> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::exchange(entries_, {});
  }

 private:
  std::mutex mu_;
  std::vector<Entry> entries_;
};

void PrintTo(const LayerLog::Entry& entry, std::ostream* os) {
  *os << "layer " << entry.layer << " routed [" << absl::StrJoin(entry.routed, ",") << "] dropped ["
      << absl::StrJoin(entry.dropped, ",") << "]";
}

// The batches every grid test runs through each layer: 1, 5, 17 and 130
// tokens of N(0, 1) values, from a fixed seed.
std::vector<std::vector<float>> Batches(int hidden) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> batches;
  for (int tokens : {1, 5, 17, 130}) {
    std::vector<float>& input = batches.emplace_back(static_cast<size_t>(tokens) * hidden);
    for (float& v : input) v = normal(rng);
  }
  return batches;
}

int TokensOf(const std::vector<float>& input, const ModelSpec& spec) {
  return static_cast<int>(input.size() / spec.hidden_size);
}

// `layer` alone on `input`, with its routing.
absl::StatusOr<MoeModel::RunResult> RunLayer(const MoeModel& model, MoeModel::Workspace& workspace,
                                             const std::vector<float>& input, int layer) {
  MoeModel::RunResult result;
  const absl::Status status = model.Run(input.data(), TokensOf(input, model.spec()),
                                        {.layer = layer, .return_routing = true}, &workspace, &result);
  if (!status.ok()) return status;
  return result;
}

// The reference routing of one token that the engine's matches: the
// reference's own, or one of its alternatives (the other rounding of a logit
// near a bf16 midpoint). Null, with what differs in `mismatch`, when none does.
const ReferenceTokenRouting* MatchRouting(const ReferenceTokenRouting& token, const int32_t* ids, const float* weights,
                                          int slots, std::string* mismatch) {
  *mismatch = CompareRouting(token, ids, weights, slots);
  if (mismatch->empty()) return &token;
  for (const ReferenceTokenRouting& alternative : token.alternatives) {
    if (CompareRouting(alternative, ids, weights, slots).empty()) return &alternative;
  }
  return nullptr;
}

// The same routing as the reference executor's one token: as a reference
// routing with no near-tie, so that the slot order and every weight count.
ReferenceTokenRouting AsExactRouting(const int32_t* ids, const float* weights, int slots) {
  ReferenceTokenRouting token;
  token.expert.assign(ids, ids + slots);
  token.weight.assign(1, std::vector<double>(weights, weights + slots));
  return token;
}

// Tokens compared with the naive reference, and skipped as near-ties.
struct TokenCounts {
  int compared = 0;
  int skipped = 0;
};

// Each executor of the list, on each model of the grid.
class ExecutorConformanceTest : public ::testing::TestWithParam<std::tuple<Case, ExecutorUnderTest>> {
 protected:
  void SetUp() override {
    definition_ = GenerateRandomModel(grid_case().spec, grid_case().layers, 42);
    CreateModelOn(std::get<1>(GetParam()), definition_, &log_, &model_);
  }

  const Case& grid_case() const { return std::get<0>(GetParam()); }
  const ModelSpec& spec() const { return definition_.spec; }
  // Documented: fp16 and bf16 checkpoints compute in bf16, fp32 ones in fp32.
  bool bf16() const { return spec().weight_dtype != DType::kF32; }
  double tolerance() const { return bf16() ? 1e-2 : 1e-5; }

  void ExpectMatchesNaiveReference(int layer, const std::vector<float>& input, const MoeModel::RunResult& result,
                                   TokenCounts* counts) const;
  void ExpectMatchesReferenceRun(const MoeModel::RunResult& actual, const MoeModel::RunResult& expected) const;
  void ExpectSameAccounting(std::vector<LayerLog::Entry> actual, std::vector<LayerLog::Entry> expected,
                            const std::vector<int32_t>& expert_ids) const;

  ModelDefinition definition_;
  LayerLog log_;
  std::unique_ptr<MoeModel> model_;
};

// One layer's run against the reference, which routes on its own: the
// routing the executor returns must be the reference's, and the layer's
// output that of the reference layer fed with the reference's routing, so
// that a router bug cannot hide behind its own routing. Tokens where a
// near-tie lets fp32 and double legitimately choose differently (see
// routing_reference.h) are skipped and counted; the same tokens are skipped
// on every executor.
void ExecutorConformanceTest::ExpectMatchesNaiveReference(int layer, const std::vector<float>& input,
                                                          const MoeModel::RunResult& result,
                                                          TokenCounts* counts) const {
  const int d = spec().hidden_size;
  const int tasks = spec().router.num_tasks;
  const int tokens = TokensOf(input, spec());
  const ReferenceRouting routing = ReferenceRoute(spec(), definition_.layers[layer], input.data(), tokens, bf16());
  const int slots = model_->routing_slots();
  ASSERT_EQ(slots, routing.slots);
  ASSERT_EQ(result.outputs.size(), static_cast<size_t>(tasks));
  std::vector<std::vector<float>> actual(tasks), expected(tasks);
  int routing_mismatches = 0;
  std::string first_mismatch;
  for (int t = 0; t < tokens; ++t) {
    const ReferenceTokenRouting& token = routing.tokens[t];
    if (token.ambiguous) {
      ++counts->skipped;
      continue;
    }
    ++counts->compared;
    const size_t at = static_cast<size_t>(t) * slots;
    std::string mismatch;
    const ReferenceTokenRouting* matched =
        MatchRouting(token, &result.expert_ids[at], &result.expert_weights[at], slots, &mismatch);
    if (matched == nullptr) {
      matched = &token;
      if (routing_mismatches++ == 0) first_mismatch = absl::StrCat("token ", t, ": ", mismatch);
    }
    const float* x = input.data() + static_cast<size_t>(t) * d;
    for (int task = 0; task < tasks; ++task) {
      const auto y = RefLayer(definition_, layer, x, matched->expert, matched->weight[task], bf16());
      expected[task].insert(expected[task].end(), y.begin(), y.end());
      const auto row = result.outputs[task].begin() + static_cast<size_t>(t) * d;
      actual[task].insert(actual[task].end(), row, row + d);
    }
  }
  EXPECT_EQ(routing_mismatches, 0) << "routing differs from the reference's; first: " << first_mismatch;
  for (int task = 0; task < tasks; ++task) {
    EXPECT_LT(NormalizedMaxError(actual[task], expected[task]), tolerance()) << "task " << task;
  }
}

// The same routing, slot for slot, weights within CompareRouting's 2e-5, and
// the same outputs within the tolerance.
void ExecutorConformanceTest::ExpectMatchesReferenceRun(const MoeModel::RunResult& actual,
                                                        const MoeModel::RunResult& expected) const {
  const int slots = model_->routing_slots();
  ASSERT_EQ(actual.expert_ids.size(), expected.expert_ids.size());
  int mismatches = 0;
  std::string first_mismatch;
  for (size_t at = 0; at < expected.expert_ids.size(); at += slots) {
    const std::string mismatch =
        CompareRouting(AsExactRouting(&expected.expert_ids[at], &expected.expert_weights[at], slots),
                       &actual.expert_ids[at], &actual.expert_weights[at], slots);
    if (!mismatch.empty() && mismatches++ == 0) first_mismatch = absl::StrCat("token ", at / slots, ": ", mismatch);
  }
  EXPECT_EQ(mismatches, 0) << "routing differs from the reference executor's; first: " << first_mismatch;
  ASSERT_EQ(actual.outputs.size(), expected.outputs.size());
  for (size_t task = 0; task < expected.outputs.size(); ++task) {
    EXPECT_LT(NormalizedMaxError(actual.outputs[task], expected.outputs[task]), tolerance()) << "task " << task;
  }
}

// One layer run's reports: the reference executor's exactly, and every
// selection routed and not dropped is a kept entry of the routing returned.
void ExecutorConformanceTest::ExpectSameAccounting(std::vector<LayerLog::Entry> actual,
                                                   std::vector<LayerLog::Entry> expected,
                                                   const std::vector<int32_t>& expert_ids) const {
  EXPECT_EQ(actual, expected);
  ASSERT_EQ(actual.size(), 1u) << "one report per layer run";
  const int64_t routed = std::accumulate(actual[0].routed.begin(), actual[0].routed.end(), int64_t{0});
  const int64_t dropped = std::accumulate(actual[0].dropped.begin(), actual[0].dropped.end(), int64_t{0});
  const int64_t kept = std::count_if(expert_ids.begin(), expert_ids.end(), [](int32_t e) { return e >= 0; });
  EXPECT_EQ(routed - dropped, kept);
}

TEST_P(ExecutorConformanceTest, MatchesNaiveReference) {
  ASSERT_EQ(model_->compute_dtype(), bf16() ? DType::kBF16 : DType::kF32);
  auto workspace = PlanWorkspace(*model_);
  TokenCounts counts;
  for (const std::vector<float>& input : Batches(spec().hidden_size)) {
    for (int layer = 0; layer < model_->num_layers(); ++layer) {
      SCOPED_TRACE(absl::StrCat(grid_case().label, " T=", TokensOf(input, spec()), " layer ", layer));
      ASSERT_OK_AND_ASSIGN(const MoeModel::RunResult result, RunLayer(*model_, *workspace, input, layer));
      ASSERT_NO_FATAL_FAILURE(ExpectMatchesNaiveReference(layer, input, result, &counts));
    }
  }
  // Near-ties are rare with random inputs (1 token of ~5000 over the grid);
  // many skips would mean the check checks little, or a reference that
  // mistakes its own decisions for ties.
  EXPECT_LE(counts.skipped, 0.02 * (counts.compared + counts.skipped))
      << counts.skipped << " of " << counts.compared + counts.skipped << " tokens skipped";
  RecordProperty("tokens_skipped_near_tie", counts.skipped);
}

TEST_P(ExecutorConformanceTest, MatchesTheCpuReferenceExecutor) {
  LayerLog reference_log;
  std::unique_ptr<MoeModel> reference;
  ASSERT_NO_FATAL_FAILURE(CreateModelOn(ReferenceExecutor(), definition_, &reference_log, &reference));
  ASSERT_NE(reference, nullptr) << "the reference executor runs everywhere";
  auto workspace = PlanWorkspace(*model_), reference_workspace = PlanWorkspace(*reference);
  for (const std::vector<float>& input : Batches(spec().hidden_size)) {
    for (int layer = 0; layer < model_->num_layers(); ++layer) {
      SCOPED_TRACE(absl::StrCat(grid_case().label, " T=", TokensOf(input, spec()), " layer ", layer));
      ASSERT_OK_AND_ASSIGN(const MoeModel::RunResult actual, RunLayer(*model_, *workspace, input, layer));
      ASSERT_OK_AND_ASSIGN(const MoeModel::RunResult expected,
                           RunLayer(*reference, *reference_workspace, input, layer));
      ExpectMatchesReferenceRun(actual, expected);
      ExpectSameAccounting(log_.Take(), reference_log.Take(), actual.expert_ids);
    }
  }
}

// An executor's batch driven by hand: `input` [tokens, hidden] through
// `layer` alone, task 0's output and its routing.
struct LayerRun {
  std::vector<float> output;
  std::vector<int32_t> expert_ids;
  std::vector<float> expert_weights;
};

absl::StatusOr<LayerRun> RunLayerOnExecutor(const LayerExecutor& executor, ExecutorWorkspace& workspace,
                                            const ModelSpec& spec, const std::vector<float>& input, int layer) {
  const int tokens = TokensOf(input, spec);
  const int slots = RoutingSlots(spec.router);
  LayerRun run;
  run.output.resize(input.size());
  run.expert_ids.resize(static_cast<size_t>(tokens) * slots);
  run.expert_weights.resize(run.expert_ids.size());
  absl::Status status =
      executor.Begin({.data = input.data(), .dtype = DType::kF32, .rows = tokens, .cols = spec.hidden_size}, workspace);
  if (status.ok()) {
    status = executor.Enqueue({.layer = layer,
                               .expert_ids = run.expert_ids.data(),
                               .expert_weights = run.expert_weights.data(),
                               .row_stride = slots},
                              workspace);
  }
  const MutableTensorRef output{
      .data = run.output.data(), .dtype = DType::kF32, .rows = tokens, .cols = spec.hidden_size};
  if (status.ok()) status = executor.Finish({&output, 1}, workspace);
  if (!status.ok()) return status;
  return run;
}

// The routing an executor returned, as a Routing; its task-0 weights only.
Routing AsRouting(const LayerRun& run, int tokens, int slots) {
  return Routing{.num_tokens = tokens, .slots = slots, .expert = run.expert_ids, .weight = run.expert_weights};
}

// Models of the grid whose layer input is the tokens (no pre-norm) and whose
// output is the routed experts' alone (no residual, no shared experts), one
// task, nothing dropped by capacity: the routing a layer returns is then all
// a front end needs to run its experts elsewhere.
std::vector<Case> ShardableCases() {
  std::vector<Case> cases;
  for (const Case& c : Grid()) {
    const ModelSpec& s = c.spec;
    if (!s.pre_norm && !s.residual && s.shared_intermediate_size == 0 && s.router.num_tasks == 1 &&
        ExpertCapacity(s.router, 1) < 0 && s.router.kind != RouterKind::kExpertChoice) {
      cases.push_back(c);
    }
  }
  return cases;
}

class ExpertShardTest : public ExecutorConformanceTest {};

TEST_P(ExpertShardTest, ExpertsAloneOnAShardMatchTheWholeLayer) {
  const LayerExecutor& executor = model_->executor();
  const std::vector<float> input = Batches(spec().hidden_size)[2];
  const int tokens = TokensOf(input, spec()), slots = model_->routing_slots();
  ASSERT_OK_AND_ASSIGN(const auto workspace, executor.NewWorkspace(tokens));
  for (int layer = 0; layer < model_->num_layers(); ++layer) {
    ASSERT_OK_AND_ASSIGN(const LayerRun whole, RunLayerOnExecutor(executor, *workspace, spec(), input, layer));
    const Routing routing = AsRouting(whole, tokens, slots);
    DispatchPlan plan;
    PlanDispatch(routing, spec().router.num_experts, /*capacity=*/-1, &plan);
    std::vector<float> expert_out(static_cast<size_t>(plan.num_rows()) * spec().hidden_size);
    ASSERT_OK(executor.RunExperts(
        {.layer = layer, .tokens = input.data(), .num_tokens = tokens, .plan = &plan, .expert_out = expert_out.data()},
        *workspace));
    std::vector<float> combined(input.size());
    Combine(routing, plan, expert_out.data(), /*residual=*/nullptr, /*shared=*/nullptr, spec().hidden_size,
            /*task=*/0, combined.data());
    EXPECT_LT(NormalizedMaxError(combined, whole.output), tolerance()) << "layer " << layer;
  }
}

// Starts a batch of `tokens` rows of `input` (host fp32 unless `dtype` and
// `device` say otherwise).
absl::Status BeginBatch(const LayerExecutor& executor, ExecutorWorkspace& workspace, const std::vector<float>& input,
                        int hidden, int tokens, DType dtype = DType::kF32, Device device = Device::kHost) {
  return executor.Begin({.data = input.data(), .dtype = dtype, .device = device, .rows = tokens, .cols = hidden},
                        workspace);
}

TEST_P(ExecutorConformanceTest, RejectsWhatItCannotRun) {
  const LayerExecutor& executor = model_->executor();
  const int d = spec().hidden_size;
  const std::vector<float> input = Batches(d)[2];  // 17 tokens
  ASSERT_OK_AND_ASSIGN(const auto workspace, executor.NewWorkspace(4));
  EXPECT_THAT(BeginBatch(executor, *workspace, input, d, 5),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("5 tokens")));
  if (TakesHostInputOnly(std::get<1>(GetParam()))) {
    EXPECT_THAT(BeginBatch(executor, *workspace, input, d, 2, DType::kBF16, Device::kCuda),
                StatusIs(absl::StatusCode::kInvalidArgument,
                         AllOf(HasSubstr(DeviceName(Device::kCuda)), HasSubstr(std::string(DTypeName(DType::kBF16))))));
  }
  ASSERT_OK(BeginBatch(executor, *workspace, input, d, 2));
  const int layers = model_->num_layers();
  EXPECT_THAT(executor.Enqueue({.layer = layers}, *workspace),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(absl::StrCat("layer ", layers, " out of range"))));
  ASSERT_OK(executor.Enqueue({.layer = 0}, *workspace));
  std::vector<float> out(2 * static_cast<size_t>(d));
  const MutableTensorRef output{.data = out.data(), .dtype = DType::kF32, .rows = 2, .cols = d};
  const MutableTensorRef two_outputs[] = {output, output};  // the batch has one: task 0's
  EXPECT_THAT(executor.Finish(two_outputs, *workspace),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("outputs")));
}

// "<case>_<executor>", with what a test name cannot hold as '_'.
std::string ParamName(const ::testing::TestParamInfo<std::tuple<Case, ExecutorUnderTest>>& info) {
  std::string name = absl::StrCat(std::get<0>(info.param).label, "_", std::get<1>(info.param).name);
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  }
  return name;
}

INSTANTIATE_TEST_SUITE_P(Grid, ExecutorConformanceTest,
                         ::testing::Combine(::testing::ValuesIn(Grid()), ::testing::ValuesIn(ExecutorsUnderTest())),
                         ParamName);
INSTANTIATE_TEST_SUITE_P(Grid, ExpertShardTest,
                         ::testing::Combine(::testing::ValuesIn(ShardableCases()),
                                            ::testing::ValuesIn(ExecutorsUnderTest())),
                         ParamName);

}  // namespace
}  // namespace moe
