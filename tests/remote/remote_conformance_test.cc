// Experts on workers over the whole reference grid (tests/engine/
// reference_model.h: every router family, expert kind, activation, shared
// experts, capacity drops, multi-gate, bf16, fp16 and fp32): a front end
// whose routed experts run on two in-process moe-workers (half each) must
// give the CPU executor's outputs and routing bit for bit, layer by layer
// and through the whole stack, and the same per-expert counts.
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "remote/remote_experts.h"
#include "server/worker/expert_worker.h"
#include "tests/engine/reference_model.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::Case;
using ::moe::testing::Grid;
using ::moe::testing::PlanWorkspace;

// The model on a front end whose experts run on two workers; owns them.
class OnWorkers {
 public:
  explicit OnWorkers(const ModelDefinition& model) {
    const int layers = static_cast<int>(model.layers.size()), experts = model.spec.router.num_experts;
    const DType compute = MoeModel::ComputeDType(model.spec, {});
    RemoteExperts::Options options{.workers = {}, .num_layers = layers, .num_experts = experts, .compute = compute};
    for (const std::string& half : {absl::StrCat("0-", experts / 2 - 1), absl::StrCat(experts / 2, "-", experts - 1)}) {
      ExpertWorker::Options worker_options;
      worker_options.address = "127.0.0.1:0";
      worker_options.experts = half;
      auto worker = ExpertWorker::Create(model, worker_options);
      EXPECT_OK(worker);
      if (!worker.ok()) return;
      options.workers.push_back(
          {.address = absl::StrCat("127.0.0.1:", (*worker)->port()), .experts = (*worker)->executor()->held()});
      workers_.push_back(std::move(*worker));
    }
    auto remote = RemoteExperts::Create(options);
    EXPECT_OK(remote);
    if (!remote.ok()) return;
    remote_ = std::move(*remote);
    auto executor = CreateExecutor(
        model, {.kind = "cpu", .compute = compute, .held = ExpertSet::None(layers, experts), .offload = remote_.get()});
    EXPECT_OK(executor);
    if (!executor.ok()) return;
    auto created = MoeModel::Create(model, std::move(*executor), {.observer = &counts_});
    EXPECT_OK(created);
    if (created.ok()) model_ = std::move(*created);
  }
  const MoeModel* model() const { return model_.get(); }

  // Tokens routed and dropped per layer and expert, as the observer heard them.
  class Counts : public EngineObserver {
   public:
    void OnLayer(const LayerReport& report) override {
      absl::MutexLock lock(&mu_);
      routed.insert(routed.end(), report.tokens_routed.begin(), report.tokens_routed.end());
      dropped.insert(dropped.end(), report.tokens_dropped.begin(), report.tokens_dropped.end());
    }
    absl::Mutex mu_;
    std::vector<int64_t> routed, dropped;
  };
  Counts counts_;

 private:
  std::vector<std::unique_ptr<ExpertWorker>> workers_;
  std::unique_ptr<RemoteExperts> remote_;
  std::unique_ptr<MoeModel> model_;  // last: goes first
};

class RemoteConformanceTest : public ::testing::TestWithParam<Case> {};

TEST_P(RemoteConformanceTest, WorkersGiveTheCpuExecutorsAnswersBitForBit) {
  const Case& c = GetParam();
  const ModelDefinition definition = GenerateRandomModel(c.spec, c.layers, 42);
  OnWorkers remote(definition);
  ASSERT_NE(remote.model(), nullptr);
  OnWorkers::Counts local_counts;
  ASSERT_OK_AND_ASSIGN(auto local, MoeModel::Create(definition, {.observer = &local_counts}));
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (int T : {1, 17, 130}) {
    std::vector<float> input(static_cast<size_t>(T) * c.spec.hidden_size);
    for (float& v : input) v = normal(rng);
    for (int layer = -1; layer < c.layers; ++layer) {
      SCOPED_TRACE(absl::StrCat(c.label, " T=", T, layer < 0 ? " whole stack" : absl::StrCat(" layer ", layer)));
      MoeModel::RunOptions options{.return_routing = true};
      if (layer >= 0) options.layer = layer;
      MoeModel::RunResult expected, actual;
      ASSERT_OK(local->Run(input.data(), T, options, PlanWorkspace(*local, T).get(), &expected));
      ASSERT_OK(remote.model()->Run(input.data(), T, options, PlanWorkspace(*remote.model(), T).get(), &actual));
      EXPECT_EQ(actual.outputs, expected.outputs);
      EXPECT_EQ(actual.expert_ids, expected.expert_ids);
      EXPECT_EQ(actual.expert_weights, expected.expert_weights);
    }
  }
  absl::MutexLock a(&remote.counts_.mu_), b(&local_counts.mu_);
  EXPECT_EQ(remote.counts_.routed, local_counts.routed);
  EXPECT_EQ(remote.counts_.dropped, local_counts.dropped);
}

INSTANTIATE_TEST_SUITE_P(Grid, RemoteConformanceTest, ::testing::ValuesIn(Grid()),
                         [](const auto& info) { return info.param.label; });

}  // namespace
}  // namespace moe
