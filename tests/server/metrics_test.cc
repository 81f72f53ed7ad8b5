// Metrics through a real server: exact accounting of tokens per expert
// (every series equals what the routing returned to the clients), request
// outcomes, batch series, and the /metrics endpoint itself.
#include "server/metrics/metrics.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>

#include "client/moe_client.h"
#include "engine/api/model_builder.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

constexpr int kHidden = 32, kExperts = 6, kTopK = 2, kLayers = 3;

// Value of the series of `family` whose labels include all of `labels`.
double Value(const prometheus::Registry& registry, const std::string& family,
             const std::map<std::string, std::string>& labels) {
  for (const auto& f : registry.Collect()) {
    if (f.name != family) continue;
    for (const auto& metric : f.metric) {
      bool match = true;
      for (const auto& [key, value] : labels) {
        bool found = false;
        for (const auto& label : metric.label) found = found || (label.name == key && label.value == value);
        match = match && found;
      }
      if (!match) continue;
      switch (f.type) {
        case prometheus::MetricType::Counter:
          return metric.counter.value;
        case prometheus::MetricType::Gauge:
          return metric.gauge.value;
        case prometheus::MetricType::Histogram:
          return static_cast<double>(metric.histogram.sample_count);
        default:
          return -1;
      }
    }
  }
  return -1;
}

class MetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    repo_ = (fs::temp_directory_path() / ("moe_metrics_test_" + std::to_string(::getpid()))).string();
    ModelSpec spec;
    spec.name = "toy";
    spec.hidden_size = kHidden;
    spec.intermediate_size = 16;
    spec.router.num_experts = kExperts;
    spec.router.top_k = kTopK;
    spec.router.capacity_factor = 0.75f;  // drops some selections
    spec.pre_norm = spec.residual = true;
    ASSERT_OK(WriteRepositoryModel(GenerateRandomModel(spec, kLayers, 3), repo_, 1, 64));
    ASSERT_OK_AND_ASSIGN(metrics_, ServerMetrics::Create({.listen_address = "127.0.0.1:0"}));
    MoeServer::Options options;
    options.grpc_address = "127.0.0.1:0";
    options.models.model_repository = repo_;
    options.max_queue_delay_us = 0;
    options.engine_observers = [this](int model_index, const std::string& name, int64_t version,
                                      const ModelDefinition& definition) {
      return metrics_->AddModel(model_index, name, version, definition);
    };
    options.scheduler_observer = metrics_.get();
    options.request_observer = metrics_.get();
    ASSERT_OK_AND_ASSIGN(server_, MoeServer::Create(options));
    client_ = std::make_unique<MoeClient>("127.0.0.1:" + std::to_string(server_->port()));
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(repo_);
  }
  std::string repo_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<MoeServer> server_;
  std::unique_ptr<MoeClient> client_;
};

TEST_F(MetricsTest, ExpertCountersEqualTheRoutingReturnedAndSumToTokensTimesK) {
  // Sequential requests: each is its own batch, so the capacity applies per
  // request and the routing each client sees is all that ran.
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  int64_t tokens = 0;
  std::map<std::pair<int, int>, int64_t> kept;  // (layer, expert) -> selections kept
  for (int request = 0; request < 20; ++request) {
    const int T = 1 + request % 7;
    std::vector<float> input(static_cast<size_t>(T) * kHidden);
    for (float& v : input) v = normal(rng);
    ASSERT_OK_AND_ASSIGN(
        auto result,
        client_->Infer(
            {.model = "toy", .input = input.data(), .tokens = T, .hidden = kHidden, .return_routing = true}));
    tokens += T;
    for (int t = 0; t < T; ++t) {
      for (int l = 0; l < kLayers; ++l) {
        for (int s = 0; s < kTopK; ++s) {
          const int e = result.expert_ids[(static_cast<size_t>(t) * kLayers + l) * kTopK + s];
          if (e >= 0) ++kept[{l, e}];
        }
      }
    }
  }
  const auto& registry = *metrics_->registry();
  for (int l = 0; l < kLayers; ++l) {
    double routed = 0, dropped = 0, most = 0;
    std::vector<double> load;
    for (int e = 0; e < kExperts; ++e) {
      const std::map<std::string, std::string> labels{
          {"model", "toy"}, {"layer", std::to_string(l)}, {"expert", std::to_string(e)}};
      const double r = Value(registry, "moe_expert_tokens_routed_total", labels);
      const double d = Value(registry, "moe_expert_tokens_dropped_total", labels);
      EXPECT_EQ(r - d, static_cast<double>(kept[{l, e}])) << "layer " << l << " expert " << e;
      routed += r;
      dropped += d;
      most = std::max(most, r);
      load.push_back(r);
    }
    EXPECT_EQ(routed, static_cast<double>(tokens * kTopK)) << "layer " << l;
    EXPECT_GT(dropped, 0) << "capacity 0.75 should drop some selections in layer " << l;
    // The test takes far less than the 60-second window, so the load gauges
    // cover every token routed: max / mean and standard deviation / mean of
    // the per-expert counts.
    const double mean = routed / kExperts;
    double variance = 0;
    for (double r : load) variance += (r - mean) * (r - mean);
    variance /= kExperts;
    const std::map<std::string, std::string> layer{{"model", "toy"}, {"layer", std::to_string(l)}};
    EXPECT_NEAR(Value(registry, "moe_layer_load_imbalance", layer), most / mean, 1e-12) << "layer " << l;
    EXPECT_NEAR(Value(registry, "moe_layer_load_cv", layer), std::sqrt(variance) / mean, 1e-12) << "layer " << l;
  }
  EXPECT_EQ(Value(registry, "moe_requests_total", {{"model", "toy"}, {"outcome", "success"}}), 20);
  EXPECT_EQ(Value(registry, "moe_batch_executions_total", {{"model", "toy"}}), 20);
  EXPECT_EQ(Value(registry, "moe_batch_tokens", {{"model", "toy"}}), 20);  // sample count
  EXPECT_EQ(Value(registry, "moe_request_duration_seconds", {{"model", "toy"}}), 20);
  EXPECT_EQ(Value(registry, "moe_pending_requests", {{"model", "toy"}}), 0);
}

TEST_F(MetricsTest, OutcomesAreCountedByKind) {
  std::vector<float> input(kHidden, 0.5f);
  ASSERT_OK(client_->Infer({.model = "toy", .input = input.data(), .tokens = 1, .hidden = kHidden}).status());
  EXPECT_FALSE(
      client_->Infer({.model = "toy", .input = input.data(), .tokens = 1, .hidden = kHidden, .layer = 9}).ok());
  EXPECT_FALSE(client_->Infer({.model = "nope", .input = input.data(), .tokens = 1, .hidden = kHidden}).ok());
  const auto& registry = *metrics_->registry();
  EXPECT_EQ(Value(registry, "moe_requests_total", {{"model", "toy"}, {"outcome", "success"}}), 1);
  EXPECT_EQ(Value(registry, "moe_requests_total", {{"model", "toy"}, {"outcome", "error"}}), 1);
  EXPECT_EQ(Value(registry, "moe_requests_unattributed_total", {}), 1);
  EXPECT_EQ(Value(registry, "moe_pending_requests", {{"model", "toy"}}), 0);
}

TEST_F(MetricsTest, SwitchingExpertHistogramsOffKeepsTheCounters) {
  ASSERT_OK_AND_ASSIGN(auto off,
                       ServerMetrics::Create({.listen_address = "", .expert_latency = ExpertLatencyMetrics::kOff}));
  ModelSpec spec;
  spec.name = "m";
  spec.hidden_size = 8;
  spec.intermediate_size = 8;
  spec.router.num_experts = 4;
  spec.router.top_k = 1;
  off->AddModel(0, "m", 1, GenerateRandomModel(spec, 2, 1));
  size_t histograms = 0, counters = 0;
  for (const auto& family : off->registry()->Collect()) {
    if (family.name == "moe_expert_compute_seconds") histograms += family.metric.size();
    if (family.name == "moe_expert_tokens_routed_total") counters += family.metric.size();
  }
  EXPECT_EQ(histograms, 0u);
  EXPECT_EQ(counters, 8u);  // 2 layers x 4 experts
  EXPECT_THAT(
      ParseExpertLatencyMetrics("sometimes"),
      ::moe::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("full, coarse or off")));
}

// Series are found by the model index they were added with, whatever the
// order of the calls; reports for an index never added are dropped (a
// request's outcome counted as unattributed).
TEST(MetricsModelIndex, SeriesAreFoundByTheIndexTheyWereAddedWith) {
  ASSERT_OK_AND_ASSIGN(auto metrics, ServerMetrics::Create({.listen_address = ""}));
  ModelSpec spec;
  spec.hidden_size = 8;
  spec.intermediate_size = 8;
  spec.router.num_experts = 2;
  spec.router.top_k = 1;
  metrics->AddModel(1, "b", 1, GenerateRandomModel(spec, 1, 1));
  metrics->AddModel(0, "a", 1, GenerateRandomModel(spec, 1, 2));
  metrics->OnBatch(0, 1, 3, 0.001, {0.0});
  metrics->OnBatch(1, 1, 4, 0.001, {0.0});
  metrics->OnBatch(1, 1, 4, 0.001, {0.0});
  metrics->OnBatch(5, 1, 4, 0.001, {0.0});
  const auto& registry = *metrics->registry();
  EXPECT_EQ(Value(registry, "moe_batch_executions_total", {{"model", "a"}}), 1);
  EXPECT_EQ(Value(registry, "moe_batch_executions_total", {{"model", "b"}}), 2);
  metrics->OnRequestStart(1);
  metrics->OnRequestDone(1, grpc::StatusCode::OK, 0.01);
  metrics->OnRequestStart(5);
  metrics->OnRequestDone(5, grpc::StatusCode::OK, 0.01);
  EXPECT_EQ(Value(registry, "moe_requests_total", {{"model", "b"}, {"outcome", "success"}}), 1);
  EXPECT_EQ(Value(registry, "moe_requests_total", {{"model", "a"}, {"outcome", "success"}}), 0);
  EXPECT_EQ(Value(registry, "moe_requests_unattributed_total", {}), 1);
  EXPECT_EQ(Value(registry, "moe_pending_requests", {{"model", "b"}}), 0);
}

// A model's worker series follow what its RemoteExperts reports: calls with
// their bytes and latency, which worker served which expert, failures,
// rows moved to a replica, and up or down.
TEST(WorkerMetrics, SeriesFollowCallsFailuresRetriesAndUpDown) {
  ASSERT_OK_AND_ASSIGN(auto metrics, ServerMetrics::Create({.listen_address = ""}));
  ExpertSet low = ExpertSet::None(2, 4), all = ExpertSet::All(2, 4);
  low.Add(1, 0);
  low.Add(1, 1);
  WorkerObserver* observer = metrics->AddWorkers("m", 3);
  const PlacedWorker placed[] = {{.id = 0, .address = "w0:1", .experts = low},
                                 {.id = 1, .address = "w1:1", .experts = all}};
  observer->OnPlacement(placed);
  const int experts[] = {0, 1};
  observer->OnCall({.worker = 0,
                    .layer = 1,
                    .experts = experts,
                    .status = absl::OkStatus(),
                    .seconds = 0.002,
                    .bytes_sent = 100,
                    .bytes_received = 300});
  observer->OnCall({.worker = 0,
                    .layer = 1,
                    .experts = experts,
                    .status = absl::UnavailableError("gone"),
                    .seconds = 0.001,
                    .bytes_sent = 100});
  observer->OnRetry(0, 1);
  observer->OnCall({.worker = 1,
                    .layer = 1,
                    .experts = experts,
                    .status = absl::OkStatus(),
                    .seconds = 0.003,
                    .bytes_sent = 100,
                    .bytes_received = 300});
  observer->OnWorkerUp(0, false);
  const prometheus::Registry& registry = *metrics->registry();
  const std::map<std::string, std::string> w0{{"model", "m"}, {"version", "3"}, {"worker", "w0:1"}};
  const std::map<std::string, std::string> w1{{"model", "m"}, {"version", "3"}, {"worker", "w1:1"}};
  EXPECT_EQ(Value(registry, "moe_worker_up", w0), 0);
  EXPECT_EQ(Value(registry, "moe_worker_up", w1), 1);
  EXPECT_EQ(Value(registry, "moe_worker_call_seconds", w0), 2);  // sample count
  EXPECT_EQ(Value(registry, "moe_worker_sent_bytes_total", w0), 200);
  EXPECT_EQ(Value(registry, "moe_worker_received_bytes_total", w0), 300);
  EXPECT_EQ(Value(registry, "moe_worker_failures_total", w0), 1);
  EXPECT_EQ(Value(registry, "moe_worker_failures_total", w1), 0);
  EXPECT_EQ(Value(registry, "moe_worker_retries_total", w0), 1);
  auto served = [&](const std::string& worker, int expert) {
    return Value(registry, "moe_expert_worker_calls_total",
                 {{"model", "m"}, {"layer", "1"}, {"expert", std::to_string(expert)}, {"worker", worker}});
  };
  EXPECT_EQ(served("w0:1", 0), 1);  // the failed call is not counted
  EXPECT_EQ(served("w1:1", 1), 1);
  EXPECT_EQ(served("w1:1", 3), 0);
  auto replicas = [&](int layer, int expert) {
    return Value(registry, "moe_expert_healthy_replicas",
                 {{"model", "m"}, {"layer", std::to_string(layer)}, {"expert", std::to_string(expert)}});
  };
  EXPECT_EQ(replicas(1, 0), 1);  // w1 only, w0 is down
  EXPECT_EQ(replicas(0, 0), 1);
  observer->OnWorkerUp(1, false);
  EXPECT_EQ(replicas(1, 0), 0);
  observer->OnWorkerUp(0, true);
  EXPECT_EQ(replicas(1, 1), 1);
  EXPECT_EQ(replicas(0, 3), 0);
}

// A moe-worker's own series: what it holds, requests by outcome, rows and
// compute time per expert held.
TEST(ExpertWorkerMetrics, SeriesFollowTheRequestsAndTheExpertsHeld) {
  ASSERT_OK_AND_ASSIGN(auto metrics, ServerMetrics::Create({.listen_address = ""}));
  ExpertWorkerObserver* observer = metrics->AddExpertWorker("m");
  ExpertSet held = ExpertSet::None(2, 4);
  held.Add(1, 2);
  held.Add(1, 3);
  observer->OnHeld(held);
  const int experts[] = {2, 3};
  const int64_t rows[] = {5, 7};
  const double seconds[] = {0.001, 0.002};
  observer->OnRequest(
      {.layer = 1, .experts = experts, .expert_rows = rows, .expert_seconds = seconds, .code = absl::StatusCode::kOk});
  observer->OnRequest(
      {.layer = 9, .experts = {}, .expert_rows = {}, .expert_seconds = {}, .code = absl::StatusCode::kInvalidArgument});
  const prometheus::Registry& registry = *metrics->registry();
  EXPECT_EQ(Value(registry, "moe_worker_experts_held", {{"model", "m"}}), 2);
  EXPECT_EQ(Value(registry, "moe_worker_requests_total", {{"model", "m"}, {"outcome", "success"}}), 1);
  EXPECT_EQ(Value(registry, "moe_worker_requests_total", {{"model", "m"}, {"outcome", "error"}}), 1);
  EXPECT_EQ(Value(registry, "moe_worker_expert_rows_total", {{"layer", "1"}, {"expert", "3"}}), 7);
  EXPECT_EQ(Value(registry, "moe_worker_expert_compute_seconds", {{"layer", "1"}, {"expert", "2"}}), 1);
  held.Add(0, 0);
  observer->OnHeld(held);
  EXPECT_EQ(Value(registry, "moe_worker_experts_held", {{"model", "m"}}), 3);
  EXPECT_EQ(Value(registry, "moe_worker_expert_rows_total", {{"layer", "0"}, {"expert", "0"}}), 0);
}

TEST(MetricsEndpoint, PortInUseNamesTheAddressAndTheCause) {
  ASSERT_OK_AND_ASSIGN(auto first, ServerMetrics::Create({.listen_address = "127.0.0.1:0"}));
  const std::string address = "127.0.0.1:" + std::to_string(first->port());
  EXPECT_THAT(ServerMetrics::Create({.listen_address = address}),
              ::moe::testing::StatusIs(
                  absl::StatusCode::kUnavailable,
                  ::testing::HasSubstr("cannot serve metrics on " + address + ": Address already in use")));
}

TEST(MetricsEndpoint, StopsAtOnce) {
  // The endpoint's accept loop polls in 2-second quanta; stopping must not
  // wait for the next one (it would delay every shutdown).
  for (int i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(auto metrics, ServerMetrics::Create({.listen_address = "127.0.0.1:0"}));
    ASSERT_GT(metrics->port(), 0);
    absl::SleepFor(absl::Milliseconds(50));  // the loop is in its poll
    const absl::Time start = absl::Now();
    metrics.reset();
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(500));
  }
}

}  // namespace
}  // namespace moe
