// moe-serve and moe-worker as processes, started as the README shows: the
// demo model with its experts on two workers answers as one process does;
// killing (SIGKILL) a worker whose experts have a replica, under load, fails
// no request; moving experts between workers while serving (moe-client
// placement --move, the admin RPC) fails no request. Every answer is
// compared with the model run in-process.
//
// MOE_SERVE_BINARY and MOE_WORKER_BINARY in the environment replace the
// binaries built with the tests.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "client/metrics_text.h"
#include "client/moe_client.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "grpcpp/grpcpp.h"
#include "proto/health.grpc.pb.h"
#include "proto/placement_admin.grpc.pb.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::ChildProcess;

constexpr int kTokens = 5;

std::string Binary(const char* variable, const char* built) {
  const char* binary = std::getenv(variable);
  return binary != nullptr && *binary != '\0' ? binary : built;
}

std::vector<std::string> Flags(std::vector<std::string> flags, const std::vector<std::string>& more) {
  flags.insert(flags.end(), more.begin(), more.end());
  return flags;
}

std::string LogBase(const std::string& name) {
  static int count = 0;
  return ::moe::testing::ProcessTempDir("moe_worker_processes_test") + "/" + name + std::to_string(++count);
}

// A moe-worker holding `experts` of the demo model (or of the model the
// extra flags name), on a free port.
struct Worker {
  explicit Worker(const std::string& experts, const std::vector<std::string>& model_flags = {})
      : process(Binary("MOE_WORKER_BINARY", MOE_WORKER_BINARY),
                Flags({"--port=0", "--host=127.0.0.1", "--metrics_port=0", "--experts=" + experts}, model_flags),
                LogBase("worker")),
        port(process.AwaitNumberAfter("moe-worker: listening on gRPC port ")),
        metrics_port(process.AwaitNumberAfter("moe-worker: metrics on port ")) {}
  // The value of the sample `name` with `labels` on the worker's /metrics; -1 if absent.
  double Metric(const std::string& name, const std::map<std::string, std::string>& labels) {
    auto text = HttpGet(absl::StrCat("http://127.0.0.1:", metrics_port, "/metrics"));
    EXPECT_OK(text);
    if (!text.ok()) return -1;
    auto samples = ParseMetricsText(*text);
    EXPECT_OK(samples);
    if (!samples.ok()) return -1;
    for (const MetricSample& sample : *samples) {
      if (sample.name == name && sample.labels == labels) return sample.value;
    }
    return -1;
  }
  ChildProcess process;
  int port;
  int metrics_port;
};

// moe-serve on the demo model (or the one the extra flags name) with
// `workers` as its --workers flag.
struct Front {
  explicit Front(const std::string& workers, const std::string& metrics_port = "-1",
                 const std::vector<std::string>& model_flags = {})
      : process(Binary("MOE_SERVE_BINARY", MOE_SERVE_BINARY),
                Flags({"--grpc_port=0", "--host=127.0.0.1", "--metrics_port=" + metrics_port, "--workers=" + workers},
                      model_flags),
                LogBase("serve")),
        port(process.AwaitNumberAfter("moe-serve: listening on gRPC port ")),
        client(absl::StrCat("127.0.0.1:", port)) {}
  ChildProcess process;
  int port;
  MoeClient client;
};

const std::vector<float>& Input() {
  static const std::vector<float> input = [] {
    std::vector<float> values(static_cast<size_t>(kTokens) * 256);
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(std::sin(0.05 * i));
    return values;
  }();
  return input;
}

// The demo model's answer, in this process.
const std::vector<float>& Expected() {
  static const std::vector<float> expected = [] {
    auto model = MoeModel::Create(DemoModel(), {});
    EXPECT_OK(model);
    MoeModel::RunResult result;
    auto ws = ::moe::testing::PlanWorkspace(**model, kTokens);
    EXPECT_OK((*model)->Run(Input().data(), kTokens, {}, ws.get(), &result));
    return result.outputs[0];
  }();
  return expected;
}

absl::StatusOr<std::vector<float>> Ask(MoeClient& client) {
  auto result = client.Infer(
      {.model = "demo", .input = Input().data(), .tokens = kTokens, .hidden = 256, .deadline = absl::Seconds(20)});
  if (!result.ok()) return result.status();
  return result->outputs[0];
}

TEST(WorkerProcesses, TwoWorkersServeTheDemoModelWithTheAnswersOfOneProcess) {
  Worker low("0-3"), high("4-7");
  ASSERT_NE(low.port, 0);
  ASSERT_NE(high.port, 0);
  Front front(absl::StrCat("127.0.0.1:", low.port, "=0-3;127.0.0.1:", high.port, "=4-7"));
  ASSERT_NE(front.port, 0);
  EXPECT_THAT(front.process.out(), ::testing::HasSubstr("sends all 8 experts of 2 layers to workers"));
  ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Ask(front.client));
  EXPECT_EQ(outputs, Expected());
  // Each worker's own metrics: what it holds, and the requests it answered.
  for (Worker* worker : {&low, &high}) {
    EXPECT_EQ(worker->Metric("moe_worker_experts_held", {{"model", "demo"}}), 8);
    EXPECT_GT(worker->Metric("moe_worker_requests_total", {{"model", "demo"}, {"outcome", "success"}}), 0);
  }
  EXPECT_EQ(low.Metric("moe_worker_expert_rows_total", {{"model", "demo"}, {"layer", "0"}, {"expert", "5"}}), -1);
}

// The front end's health status of service "worker/ADDRESS".
grpc::health::v1::HealthCheckResponse::ServingStatus WorkerHealthStatus(int front_port, const std::string& address) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", front_port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("worker/" + address);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return response.status();
}

// Hugging Face checkpoints served by a front end and two workers that load
// them themselves: DeepSeek-V3's layout (group-limited sigmoid routing, a
// shared expert) in bf16 and with FP8 experts, and gpt-oss's MXFP4 experts.
TEST(WorkerProcesses, HuggingFaceCheckpointsOnTwoWorkersAnswerAsOneProcess) {
  for (const std::string name : {"deepseek_v3_bf16", "deepseek_v3_fp8", "gpt_oss_mxfp4"}) {
    SCOPED_TRACE(name);
    const std::string checkpoint = std::string(MOE_SOURCE_DIR) + "/tests/golden/" + name;
    ASSERT_OK_AND_ASSIGN(const ModelDefinition definition, LoadHuggingFaceModel(checkpoint));
    ASSERT_OK_AND_ASSIGN(auto model, MoeModel::Create(definition, {}));
    const int hidden = definition.spec.hidden_size, experts = definition.spec.router.num_experts;
    const std::string low_half = absl::StrCat("0-", experts / 2 - 1),
                      high_half = absl::StrCat(experts / 2, "-", experts - 1);
    Worker low(low_half, {"--model=" + checkpoint}), high(high_half, {"--model=" + checkpoint});
    ASSERT_NE(low.port, 0);
    ASSERT_NE(high.port, 0);
    Front front(absl::StrCat("127.0.0.1:", low.port, "=", low_half, ";127.0.0.1:", high.port, "=", high_half), "-1",
                {"--model=" + checkpoint});
    ASSERT_NE(front.port, 0);
    constexpr int kCheckpointTokens = 9;
    std::vector<float> input(static_cast<size_t>(kCheckpointTokens) * hidden);
    for (size_t i = 0; i < input.size(); ++i) input[i] = static_cast<float>(std::cos(0.3 * i));
    MoeModel::RunResult expected;
    ASSERT_OK(
        model->Run(input.data(), kCheckpointTokens, {}, ::moe::testing::PlanWorkspace(*model, 16).get(), &expected));
    ASSERT_OK_AND_ASSIGN(auto served, front.client.Infer({.model = name,
                                                          .input = input.data(),
                                                          .tokens = kCheckpointTokens,
                                                          .hidden = hidden,
                                                          .deadline = absl::Seconds(20)}));
    EXPECT_EQ(served.outputs[0], expected.outputs[0]);
  }
}

TEST(WorkerProcesses, KillingAReplicatedWorkerUnderLoadFailsNoRequest) {
  Worker first(""), second("");  // each holds every expert
  ASSERT_NE(first.port, 0);
  ASSERT_NE(second.port, 0);
  Front front(absl::StrCat("127.0.0.1:", first.port, "=all;127.0.0.1:", second.port, "=all"));
  ASSERT_NE(front.port, 0);
  ASSERT_OK(Ask(front.client).status());  // connected, warm
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0}, failed{0}, wrong{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<std::vector<float>> outputs = Ask(front.client);
        if (!outputs.ok()) {
          ++failed;
          ADD_FAILURE() << outputs.status();
        } else if (*outputs != Expected()) {
          ++wrong;
        }
        ++answered;
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  first.process.Kill();
  const int at_kill = answered.load();
  absl::SleepFor(absl::Milliseconds(1200));
  stop = true;
  for (auto& client : clients) client.join();
  // The front end says so in its health service and its log.
  EXPECT_EQ(WorkerHealthStatus(front.port, absl::StrCat("127.0.0.1:", first.port)),
            grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(WorkerHealthStatus(front.port, absl::StrCat("127.0.0.1:", second.port)),
            grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_THAT(front.process.err(), ::testing::HasSubstr(absl::StrCat("worker 127.0.0.1:", first.port, " is down")));
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(answered.load(), at_kill) << "no request ran after the kill";
}

// Clients asking in a loop until stopped; counts failures and wrong answers
// and keeps each request's latency.
class Load {
 public:
  explicit Load(MoeClient& client, int clients = 3) {
    for (int c = 0; c < clients; ++c) {
      threads_.emplace_back([this, &client] {
        while (!stop_.load()) {
          const absl::Time start = absl::Now();
          absl::StatusOr<std::vector<float>> outputs = Ask(client);
          const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
          absl::MutexLock lock(&mu_);
          if (!outputs.ok()) {
            failures_.push_back(outputs.status().ToString());
          } else if (*outputs != Expected()) {
            ++wrong_;
          }
          latencies_.push_back({absl::Now(), seconds});
        }
      });
    }
  }
  ~Load() { Stop(); }
  void Stop() {
    stop_ = true;
    for (auto& thread : threads_) {
      if (thread.joinable()) thread.join();
    }
  }
  // The p99 latency of requests that ended in [from, to).
  double P99(absl::Time from, absl::Time to) {
    absl::MutexLock lock(&mu_);
    std::vector<double> window;
    for (const auto& [end, seconds] : latencies_) {
      if (end >= from && end < to) window.push_back(seconds);
    }
    if (window.empty()) return 0;
    std::sort(window.begin(), window.end());
    return window[std::min(window.size() - 1, window.size() * 99 / 100)];
  }
  std::vector<std::string> failures() {
    absl::MutexLock lock(&mu_);
    return failures_;
  }
  int wrong() {
    absl::MutexLock lock(&mu_);
    return wrong_;
  }
  size_t answered() {
    absl::MutexLock lock(&mu_);
    return latencies_.size();
  }

 private:
  std::atomic<bool> stop_{false};
  absl::Mutex mu_;
  std::vector<std::string> failures_ ABSL_GUARDED_BY(mu_);
  int wrong_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::pair<absl::Time, double>> latencies_ ABSL_GUARDED_BY(mu_);
  std::vector<std::thread> threads_;  // last: stop first
};

// Moves the demo model's experts through `move` (as moe-client placement --move).
absl::StatusOr<admin::SetPlacementResponse> Move(int port, const std::string& move) {
  auto stub = admin::PlacementAdmin::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  admin::SetPlacementRequest request;
  request.set_model("demo");
  request.set_workers_text(move);
  admin::SetPlacementResponse response;
  const grpc::Status status = stub->SetPlacement(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

TEST(WorkerProcesses, MovingExpertsWhileServingFailsNoRequest) {
  Worker a("0-3"), b("4-7");
  ASSERT_NE(a.port, 0);
  ASSERT_NE(b.port, 0);
  const std::string at_a = absl::StrCat("127.0.0.1:", a.port), at_b = absl::StrCat("127.0.0.1:", b.port);
  Front front(absl::StrCat(at_a, "=0-3;", at_b, "=4-7"));
  ASSERT_NE(front.port, 0);
  ASSERT_OK(Ask(front.client).status());
  Load load(front.client);
  absl::SleepFor(absl::Milliseconds(300));
  const absl::Time moving = absl::Now();
  // Replicate 4-5 onto a, release the replicas, then swap the halves.
  for (const std::string& move : {absl::StrCat(at_a, "=0-5;", at_b, "=4-7"), absl::StrCat(at_a, "=0-3;", at_b, "=4-7"),
                                  absl::StrCat(at_a, "=4-7;", at_b, "=0-3")}) {
    ASSERT_OK_AND_ASSIGN(const admin::SetPlacementResponse moved, Move(front.port, move));
    EXPECT_EQ(moved.placement().workers_size(), 2);
  }
  const absl::Time moved = absl::Now();
  absl::SleepFor(absl::Milliseconds(300));
  load.Stop();
  EXPECT_THAT(load.failures(), ::testing::IsEmpty());
  EXPECT_EQ(load.wrong(), 0);
  std::cout << "p99 before the moves " << load.P99(moving - absl::Seconds(10), moving) * 1e3 << " ms, during "
            << load.P99(moving, moved) * 1e3 << " ms (" << absl::ToDoubleMilliseconds(moved - moving)
            << " ms of moves), " << load.answered() << " requests\n";
  // Where the experts are now.
  ASSERT_OK_AND_ASSIGN(const admin::SetPlacementResponse same,
                       Move(front.port, absl::StrCat(at_a, "=4-7;", at_b, "=0-3")));
  EXPECT_EQ(same.placement().workers(0).summary(), "4 of 8 experts in each of 2 layers");
  EXPECT_EQ(same.load_seconds() + same.release_seconds() < 1.0, true);
  // An expert left without a worker is refused, and nothing moves.
  EXPECT_THAT(
      Move(front.port, absl::StrCat(at_a, "=4-7")).status(),
      ::moe::testing::StatusIs(absl::StatusCode::kFailedPrecondition, ::testing::HasSubstr("would have no worker")));
  ASSERT_OK_AND_ASSIGN(const std::vector<float> after, Ask(front.client));
  EXPECT_EQ(after, Expected());
}

// The planner's replicas for the experts the load makes hot (every request
// routes the same tokens, so a few experts take everything), applied while
// serving: the imbalance falls and no request fails.
TEST(WorkerProcesses, ReplicasProposedForHotExpertsAreAppliedWhileServing) {
  Worker a("0-3"), b("4-7");
  ASSERT_NE(a.port, 0);
  ASSERT_NE(b.port, 0);
  Front front(absl::StrCat("127.0.0.1:", a.port, "=0-3;127.0.0.1:", b.port, "=4-7"), "0");
  ASSERT_NE(front.port, 0);
  Load load(front.client);
  absl::SleepFor(absl::Milliseconds(300));
  auto stub = admin::PlacementAdmin::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", front.port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  admin::ProposePlacementRequest request;
  request.set_model("demo");
  request.set_hot_factor(1.0);
  request.set_apply(true);
  admin::ProposePlacementResponse response;
  const grpc::Status status = stub->ProposePlacement(&context, request, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  absl::SleepFor(absl::Milliseconds(200));
  load.Stop();
  EXPECT_THAT(load.failures(), ::testing::IsEmpty());
  EXPECT_EQ(load.wrong(), 0);
  ASSERT_FALSE(response.changes().empty()) << "nothing proposed for a load this uneven";
  ASSERT_EQ(response.imbalance_before_size(), 2);
  for (int layer = 0; layer < 2; ++layer) {
    EXPECT_LE(response.imbalance_after(layer), response.imbalance_before(layer)) << "layer " << layer;
  }
  EXPECT_LT(response.imbalance_after(0) + response.imbalance_after(1),
            response.imbalance_before(0) + response.imbalance_before(1));
  ASSERT_TRUE(response.has_applied());
  int placed = 0;  // (layer, expert) pairs held, over the workers
  for (const admin::WorkerState& worker : response.applied().placement().workers()) {
    for (char held : worker.held()) placed += held;
  }
  EXPECT_EQ(placed, 16 + response.changes_size());
}

// The only worker, stopped (SIGSTOP) under load: the call it has misses the
// 300 ms deadline, the front end (which keeps the weights) runs its experts
// meanwhile, and when it continues (SIGCONT) it rejoins. (With a replica
// the stopped worker may simply never be chosen again until it is back; the
// deadline with a replica is in remote_experts_test.)
TEST(WorkerProcesses, AStoppedWorkerMissesItsDeadlineAndRejoinsWhenItContinues) {
  Worker first("");
  ASSERT_NE(first.port, 0);
  const std::string at_first = absl::StrCat("127.0.0.1:", first.port);
  Front front(absl::StrCat(at_first, "=all"), "-1", {"--worker_deadline_ms=300", "--worker_fallback_local"});
  ASSERT_NE(front.port, 0);
  ASSERT_OK(Ask(front.client).status());
  Load load(front.client);
  absl::SleepFor(absl::Milliseconds(200));
  first.process.Signal(SIGSTOP);
  absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (WorkerHealthStatus(front.port, at_first) != grpc::health::v1::HealthCheckResponse::NOT_SERVING &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(WorkerHealthStatus(front.port, at_first), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  const size_t answered_while_stopped = load.answered();
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_GT(load.answered(), answered_while_stopped) << "nothing answered while the worker was stopped";
  first.process.Signal(SIGCONT);
  give_up = absl::Now() + absl::Seconds(20);
  while (WorkerHealthStatus(front.port, at_first) != grpc::health::v1::HealthCheckResponse::SERVING &&
         absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(WorkerHealthStatus(front.port, at_first), grpc::health::v1::HealthCheckResponse::SERVING);
  load.Stop();
  EXPECT_THAT(load.failures(), ::testing::IsEmpty());
  EXPECT_EQ(load.wrong(), 0);
  EXPECT_THAT(front.process.err(), ::testing::HasSubstr(absl::StrCat("worker ", at_first, " is back")));
}

}  // namespace
}  // namespace moe
