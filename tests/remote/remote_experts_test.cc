// Experts on worker processes, on loopback: a front end whose executor
// sends routed experts' rows to moe-workers answers bit for bit as one
// process does, in bf16 and fp32; replicas take over from a worker that
// stops or hangs; without one the batch fails UNAVAILABLE naming the layer
// and expert; a worker that comes back rejoins; a placement in config.pbtxt
// is served; a worker answers the standard health service. Every answer is compared with the single-process result.
#include "remote/remote_experts.h"

#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "client/moe_client.h"
#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "engine/api/repository_model.h"
#include "server/batching/batch_scheduler.h"
#include "server/models/model_registry.h"
#include "server/worker/expert_worker.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::PlanWorkspace;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

constexpr int kTokens = 23;

// DeepSeek-like: group-limited sigmoid routing over 8 experts, a shared
// expert, pre-norm and residual, two layers.
ModelDefinition TestModel(DType dtype) {
  ModelSpec spec;
  spec.name = "remote_test";
  spec.hidden_size = 48;
  spec.intermediate_size = 32;
  spec.shared_intermediate_size = 24;
  spec.router = {.kind = RouterKind::kSigmoidGroupTopK,
                 .num_experts = 8,
                 .top_k = 3,
                 .norm_topk_prob = true,
                 .routed_scaling_factor = 1.5f,
                 .n_group = 2,
                 .topk_group = 2};
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = dtype;
  return GenerateRandomModel(spec, 2, 17);
}

// One fp32 layer of softmax top-k routing, no norm.
ModelDefinition SoftmaxModel(const char* name, int hidden, int experts, int top_k, uint64_t seed) {
  ModelSpec spec;
  spec.name = name;
  spec.hidden_size = hidden;
  spec.intermediate_size = 16;
  spec.router = {.num_experts = experts, .top_k = top_k};
  spec.weight_dtype = DType::kF32;
  return GenerateRandomModel(spec, 1, seed);
}

std::vector<float> Input(int hidden) {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(kTokens) * hidden);
  for (float& v : values) v = normal(rng);
  return values;
}

// The outputs of `model` on the test input, or its error.
absl::StatusOr<std::vector<float>> Outputs(const MoeModel& model) {
  const std::vector<float> input = Input(model.spec().hidden_size);
  MoeModel::RunResult result;
  auto ws = PlanWorkspace(model, kTokens);
  absl::Status status = model.Run(input.data(), kTokens, {}, ws.get(), &result);
  if (!status.ok()) return status;
  return result.outputs[0];
}

// A worker on `address` holding `experts`, stopping at once when asked.
ExpertWorker::Options WorkerAt(const std::string& address, const std::string& experts = "") {
  ExpertWorker::Options options;
  options.address = address;
  options.experts = experts;
  options.grace_period = absl::ZeroDuration();
  return options;
}

// Worker processes in-process, each on a loopback port, and a front end
// whose executor holds what no worker does and offloads the rest.
class Cluster {
 public:
  Cluster(const ModelDefinition& model, const std::vector<std::string>& worker_experts,
          absl::Duration deadline = absl::Seconds(5))
      : model_(model), deadline_(deadline) {
    for (const std::string& experts : worker_experts) StartWorker(experts, "127.0.0.1:0");
  }

  void StartWorker(const std::string& experts, const std::string& address) {
    auto worker = ExpertWorker::Create(model_, WorkerAt(address, experts));
    ASSERT_OK(worker);
    experts_.push_back(experts);
    workers_.push_back(std::move(*worker));
  }

  // Builds the front end on the workers started so far, reporting to
  // `observer` (may be null).
  void BuildFrontEnd(WorkerObserver* observer = nullptr) {
    RemoteExperts::Options options{.workers = {},
                                   .num_layers = static_cast<int>(model_.layers.size()),
                                   .num_experts = model_.spec.router.num_experts,
                                   .compute = MoeModel::ComputeDType(model_.spec, {}),
                                   .call_deadline = deadline_,
                                   .min_backoff = absl::Milliseconds(20),
                                   .max_backoff = absl::Milliseconds(200),
                                   .observer = observer};
    for (size_t i = 0; i < workers_.size(); ++i) {
      ASSERT_OK_AND_ASSIGN(ExpertSet set, ParseExpertSet(experts_[i], "", options.num_layers, options.num_experts));
      options.workers.push_back({.address = absl::StrCat("127.0.0.1:", workers_[i]->port()), .experts = set});
    }
    ASSERT_OK_AND_ASSIGN(remote_, RemoteExperts::Create(options));
    const ExpertSet here = remote_->hosted().Complement();
    ASSERT_OK_AND_ASSIGN(
        auto executor,
        CreateExecutor(model_, {.kind = "cpu", .compute = options.compute, .held = here, .offload = remote_.get()}));
    ASSERT_OK_AND_ASSIGN(front_end_, MoeModel::Create(model_, std::move(executor), {}));
  }

  ExpertWorker& worker(int i) { return *workers_[i]; }
  RemoteExperts& remote() { return *remote_; }
  const MoeModel& front_end() { return *front_end_; }

 private:
  const ModelDefinition& model_;
  absl::Duration deadline_;
  std::vector<std::string> experts_;
  std::vector<std::unique_ptr<ExpertWorker>> workers_;
  std::unique_ptr<RemoteExperts> remote_;
  std::unique_ptr<MoeModel> front_end_;
};

std::vector<float> OneProcess(const ModelDefinition& model) {
  auto created = MoeModel::Create(model, {});
  EXPECT_OK(created);
  auto outputs = Outputs(**created);
  EXPECT_OK(outputs);
  return outputs.ok() ? *outputs : std::vector<float>();
}

// One layer's rows for a worker above gRPC's default 4 MB message limit
// (600 tokens x top-2 x hidden 1024 in fp32 is 4.9 MB each way).
TEST(RemoteExperts, RowsBeyondGrpcsDefaultMessageSizeCrossTheWire) {
  const ModelDefinition model = SoftmaxModel("wide", 1024, 2, 2, 3);
  Cluster cluster(model, {""});
  cluster.BuildFrontEnd();
  constexpr int kWideTokens = 600;
  std::vector<float> input(static_cast<size_t>(kWideTokens) * 1024);
  for (size_t i = 0; i < input.size(); ++i) input[i] = static_cast<float>(std::cos(0.01 * i));
  auto run = [&](const MoeModel& on) {
    MoeModel::RunResult result;
    EXPECT_OK(on.Run(input.data(), kWideTokens, {}, PlanWorkspace(on, kWideTokens).get(), &result));
    return result.outputs.empty() ? std::vector<float>() : result.outputs[0];
  };
  ASSERT_OK_AND_ASSIGN(auto alone, MoeModel::Create(model, {}));
  EXPECT_EQ(run(cluster.front_end()), run(*alone));
}

class RemoteExpertsDTypeTest : public ::testing::TestWithParam<DType> {};

// Experts 0-2 on one worker, 3-5 on another, 6-7 in the front end: the rows
// cross the wire as bf16 for a bf16 model, fp32 otherwise, and come back
// fp32, so nothing differs.
TEST_P(RemoteExpertsDTypeTest, FrontEndAndTwoWorkersAnswerAsOneProcessBitForBit) {
  const ModelDefinition model = TestModel(GetParam());
  Cluster cluster(model, {"0-2", "3-5"});
  cluster.BuildFrontEnd();
  EXPECT_THAT(cluster.front_end().executor().Describe(), HasSubstr("holds 2 of 8 experts in each of 2 layers"));
  ASSERT_OK_AND_ASSIGN(const std::vector<float> remote, Outputs(cluster.front_end()));
  EXPECT_EQ(remote, OneProcess(model));
  EXPECT_GT(cluster.worker(0).service().requests_served(), 0);
  EXPECT_GT(cluster.worker(1).service().requests_served(), 0);
}

// Three workers, one of them sharing two experts with another: the rows of
// each batch spread over all three, and the answer is one process's.
TEST(RemoteExperts, ThreeWorkersWithOverlappingExpertsAnswerAsOneProcess) {
  const ModelDefinition model = TestModel(DType::kBF16);
  Cluster cluster(model, {"0-2", "3-5", "4-7"});
  cluster.BuildFrontEnd();
  for (int run = 0; run < 3; ++run) {
    ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Outputs(cluster.front_end()));
    EXPECT_EQ(outputs, OneProcess(model)) << "run " << run;
  }
  for (int w = 0; w < 3; ++w) EXPECT_GT(cluster.worker(w).service().requests_served(), 0) << "worker " << w;
}

INSTANTIATE_TEST_SUITE_P(DTypes, RemoteExpertsDTypeTest, ::testing::Values(DType::kBF16, DType::kF32),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

// What RemoteExperts reports, for metrics.
class RecordingWorkerObserver : public WorkerObserver {
 public:
  void OnPlacement(std::span<const PlacedWorker> workers) override {
    absl::MutexLock lock(&mu_);
    placements.emplace_back(workers.begin(), workers.end());
  }
  void OnCall(const WorkerCall& call) override {
    absl::MutexLock lock(&mu_);
    (call.status.ok() ? calls_ok : calls_failed)[call.worker] += 1;
  }
  void OnRetry(int from_worker, int to_worker) override {
    absl::MutexLock lock(&mu_);
    retries.emplace_back(from_worker, to_worker);
  }
  void OnWorkerUp(int worker, bool up) override {
    absl::MutexLock lock(&mu_);
    ups.emplace_back(worker, up);
  }
  absl::Mutex mu_;
  std::map<int, int> calls_ok, calls_failed;
  std::vector<std::pair<int, int>> retries;
  std::vector<std::pair<int, bool>> ups;
  std::vector<std::vector<PlacedWorker>> placements;
};

TEST(RemoteExperts, AReplicaTakesOverFromAWorkerThatStops) {
  const ModelDefinition model = TestModel(DType::kBF16);
  const std::vector<float> expected = OneProcess(model);
  Cluster cluster(model, {"", ""});  // both hold every expert
  RecordingWorkerObserver observer;
  cluster.BuildFrontEnd(&observer);
  ASSERT_OK_AND_ASSIGN(std::vector<float> before, Outputs(cluster.front_end()));
  EXPECT_EQ(before, expected);
  cluster.worker(0).Shutdown();
  for (int run = 0; run < 3; ++run) {
    ASSERT_OK_AND_ASSIGN(std::vector<float> after, Outputs(cluster.front_end()));
    EXPECT_EQ(after, expected) << "run " << run;
  }
  EXPECT_FALSE(cluster.remote().link(0).up());
  // The stream's end told the front end before any call failed.
  absl::MutexLock lock(&observer.mu_);
  EXPECT_GT(observer.calls_ok[1], 0);
  EXPECT_EQ(observer.ups, (std::vector<std::pair<int, bool>>{{0, false}}));
  ASSERT_EQ(observer.placements.size(), 1u);
  ASSERT_EQ(observer.placements[0].size(), 2u);
  EXPECT_EQ(observer.placements[0][1].id, 1);
}

// A front end that keeps every expert's weights runs those of a worker that
// is down itself, and answers as one process.
TEST(RemoteExperts, AFrontEndHoldingTheWeightsRunsAWorkersExpertsWhenItIsDown) {
  const ModelDefinition model = TestModel(DType::kBF16);
  const std::vector<float> expected = OneProcess(model);
  auto worker = ExpertWorker::Create(model, WorkerAt("127.0.0.1:0", "0-7"));
  ASSERT_OK(worker);
  RemoteExperts::Options options{.workers = {},
                                 .num_layers = 2,
                                 .num_experts = 8,
                                 .compute = DType::kBF16,
                                 .min_backoff = absl::Seconds(10)};  // no rejoining during the test
  options.workers.push_back(
      {.address = absl::StrCat("127.0.0.1:", (*worker)->port()), .experts = ExpertSet::All(2, 8)});
  ASSERT_OK_AND_ASSIGN(auto remote, RemoteExperts::Create(options));
  ASSERT_OK_AND_ASSIGN(auto executor, CreateExecutor(model, {.kind = "cpu",
                                                             .compute = DType::kBF16,
                                                             .held = ExpertSet::All(2, 8),
                                                             .offload = remote.get(),
                                                             .offloaded = ExpertSet::All(2, 8)}));
  ASSERT_OK_AND_ASSIGN(auto front_end, MoeModel::Create(model, std::move(executor), {}));
  ASSERT_OK_AND_ASSIGN(std::vector<float> remote_answer, Outputs(*front_end));
  EXPECT_EQ(remote_answer, expected);
  const int64_t served = (*worker)->service().requests_served();
  EXPECT_GT(served, 0);  // the experts went to the worker while it was up
  (*worker)->Shutdown();
  for (int run = 0; run < 2; ++run) {
    ASSERT_OK_AND_ASSIGN(std::vector<float> local_answer, Outputs(*front_end));
    EXPECT_EQ(local_answer, expected) << "run " << run;
  }
}

TEST(RemoteExperts, WithoutAReplicaTheBatchFailsUnavailableNamingTheLayerAndExpert) {
  const ModelDefinition model = TestModel(DType::kBF16);
  Cluster cluster(model, {"0-3", "4-7"});
  cluster.BuildFrontEnd();
  ASSERT_OK(Outputs(cluster.front_end()).status());
  cluster.worker(1).Shutdown();
  EXPECT_THAT(Outputs(cluster.front_end()).status(),
              StatusIs(absl::StatusCode::kUnavailable, ::testing::ContainsRegex("layer [01] expert [4-7]")));
}

// One answered request of the scheduler.
struct Answer {
  absl::Notification done;
  absl::Status status;
  std::vector<float> output;
};

std::unique_ptr<PendingRequest> RequestFor(const float* token, Answer* answer, int hidden) {
  auto request = std::make_unique<PendingRequest>();
  request->data = token;
  request->dtype = DType::kF32;
  request->num_tokens = 1;
  request->done = [answer, hidden](const absl::Status& status, const ResultView* view) {
    answer->status = status;
    if (view) {
      const float* row = view->batch->outputs[0].data() + static_cast<size_t>(view->first_token) * hidden;
      answer->output.assign(row, row + hidden);
    }
    answer->done.Notify();
  };
  return request;
}

// A batch of two requests, one routed to an expert whose only worker is
// down and one not: only the first fails, and the second gets its answer.
TEST(RemoteExperts, OnlyTheRequestsThatNeedAnUnreachableExpertFail) {
  const ModelDefinition model = SoftmaxModel("top1", 32, 8, 1, 5);
  ASSERT_OK_AND_ASSIGN(auto local, MoeModel::Create(model, {}));
  // Tokens routed to experts 0-3 and to 4-7, and their one-process answers.
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<float> tokens(64 * 32);
  for (float& v : tokens) v = normal(rng);
  MoeModel::RunResult routed;
  ASSERT_OK(local->Run(tokens.data(), 64, {.return_routing = true}, PlanWorkspace(*local, 64).get(), &routed));
  int low = -1, high = -1;
  for (int t = 0; t < 64; ++t) (routed.expert_ids[t] < 4 ? low : high) = t;
  ASSERT_GE(low, 0);
  ASSERT_GE(high, 0);
  const std::vector<float> expected(routed.outputs[0].begin() + low * 32, routed.outputs[0].begin() + (low + 1) * 32);

  Cluster cluster(model, {"0-3", "4-7"});
  cluster.BuildFrontEnd();
  cluster.worker(1).Shutdown();
  ASSERT_OK_AND_ASSIGN(auto scheduler, BatchScheduler::Create({}));
  BatchQueue::Options queue;
  queue.max_batch_tokens = 2;  // the two requests fill one batch
  queue.max_queue_delay = absl::Seconds(30);
  ASSERT_OK_AND_ASSIGN(const int index, scheduler->AddModel(&cluster.front_end(), queue));
  Answer fine, unreachable;
  ASSERT_OK(scheduler->Submit(index, RequestFor(tokens.data() + low * 32, &fine, 32)));
  ASSERT_OK(scheduler->Submit(index, RequestFor(tokens.data() + high * 32, &unreachable, 32)));
  ASSERT_TRUE(fine.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  ASSERT_TRUE(unreachable.done.WaitForNotificationWithTimeout(absl::Seconds(30)));
  EXPECT_EQ(scheduler->BatchesExecuted(index), 1);
  EXPECT_OK(fine.status);
  EXPECT_EQ(fine.output, expected);
  EXPECT_THAT(unreachable.status, StatusIs(absl::StatusCode::kUnavailable, ::testing::ContainsRegex("expert [4-7]")));
}

// A worker that takes requests and never answers.
class SilentWorker final : public worker::ExpertWorker::Service {
 public:
  grpc::Status RunExperts(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<worker::ExpertRowsResponse, worker::ExpertRowsRequest>* stream) override {
    worker::ExpertRowsRequest request;
    while (stream->Read(&request)) {
    }
    return context->IsCancelled() ? grpc::Status::CANCELLED : grpc::Status::OK;
  }
};

TEST(RemoteExperts, AHungWorkerMissesItsDeadlineAndTheReplicaAnswers) {
  const ModelDefinition model = TestModel(DType::kF32);
  SilentWorker silent;
  grpc::ServerBuilder builder;
  int silent_port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &silent_port);
  builder.RegisterService(&silent);
  std::unique_ptr<grpc::Server> silent_server = builder.BuildAndStart();
  ASSERT_NE(silent_port, 0);

  auto worker = ExpertWorker::Create(model, WorkerAt("127.0.0.1:0"));
  ASSERT_OK(worker);
  RecordingWorkerObserver observer;
  RemoteExperts::Options options{.workers = {},
                                 .num_layers = 2,
                                 .num_experts = 8,
                                 .compute = DType::kF32,
                                 .call_deadline = absl::Milliseconds(300),
                                 .observer = &observer};
  // The silent worker comes first: it takes the first batch, and misses.
  options.workers.push_back({.address = absl::StrCat("127.0.0.1:", silent_port), .experts = ExpertSet::All(2, 8)});
  options.workers.push_back(
      {.address = absl::StrCat("127.0.0.1:", (*worker)->port()), .experts = ExpertSet::All(2, 8)});
  ASSERT_OK_AND_ASSIGN(auto remote, RemoteExperts::Create(options));
  ASSERT_OK_AND_ASSIGN(
      auto executor,
      CreateExecutor(model,
                     {.kind = "cpu", .compute = DType::kF32, .held = ExpertSet::None(2, 8), .offload = remote.get()}));
  ASSERT_OK_AND_ASSIGN(auto front_end, MoeModel::Create(model, std::move(executor), {}));
  ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Outputs(*front_end));
  EXPECT_EQ(outputs, OneProcess(model));
  EXPECT_FALSE(remote->link(0).up());
  {
    absl::MutexLock lock(&observer.mu_);
    EXPECT_EQ(observer.calls_failed[0], 1);
    EXPECT_EQ(observer.retries, (std::vector<std::pair<int, int>>{{0, 1}}));
    EXPECT_EQ(observer.ups, (std::vector<std::pair<int, bool>>{{0, false}}));
  }
  silent_server->Shutdown(absl::ToChronoTime(absl::Now()));
}

TEST(RemoteExperts, AWorkerThatComesBackRejoins) {
  const ModelDefinition model = TestModel(DType::kBF16);
  Cluster cluster(model, {"0-3", "0-7"});  // 0-3 have a replica
  cluster.BuildFrontEnd();
  const int port = cluster.worker(0).port();
  cluster.worker(0).Shutdown();
  ASSERT_OK(Outputs(cluster.front_end()).status());  // the replica answers
  ASSERT_FALSE(cluster.remote().link(0).up());
  cluster.StartWorker("0-3", absl::StrCat("127.0.0.1:", port));
  // The prober brings the link up within its backoff (at most 200 ms here).
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!cluster.remote().link(0).up() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE(cluster.remote().link(0).up());
  // Both up and idle: the first (the returned worker) wins the ties.
  ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Outputs(cluster.front_end()));
  EXPECT_EQ(outputs, OneProcess(model));
  EXPECT_GT(cluster.worker(2).service().requests_served(), 0);
}

TEST(ExpertWorkerService, BadRequestsAreAnsweredWithTheirErrorOnAStreamThatStaysOpen) {
  const ModelDefinition model = TestModel(DType::kF32);
  ASSERT_OK_AND_ASSIGN(auto worker, ExpertWorker::Create(model, WorkerAt("127.0.0.1:0", "0-3")));
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", worker->port()), grpc::InsecureChannelCredentials());
  auto stub = worker::ExpertWorker::NewStub(channel);
  grpc::ClientContext context;
  auto stream = stub->RunExperts(&context);
  auto ask = [&](const worker::ExpertRowsRequest& request) {
    worker::ExpertRowsResponse response;
    EXPECT_TRUE(stream->Write(request));
    EXPECT_TRUE(stream->Read(&response));
    return response;
  };
  worker::ExpertRowsRequest request;
  request.set_layer(5);
  request.set_hidden(48);
  EXPECT_THAT(ask(request).message(), HasSubstr("layer 5 out of range"));
  request.set_layer(0);
  request.add_experts(6);
  request.add_expert_rows(1);
  request.set_rows(std::string(48 * 4, '\0'));
  const worker::ExpertRowsResponse not_held = ask(request);
  EXPECT_EQ(not_held.code(), static_cast<int>(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(not_held.message(), HasSubstr("expert 6 is not held"));
  request.set_experts(0, 2);
  request.set_rows(std::string(47 * 4, '\0'));
  EXPECT_THAT(ask(request).message(), HasSubstr("rows hold 188 bytes"));
  request.set_rows(std::string(48 * 4, '\0'));
  const worker::ExpertRowsResponse good = ask(request);
  EXPECT_EQ(good.code(), 0) << good.message();
  EXPECT_EQ(good.outputs().size(), 48u * 4);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// Found by fuzz_worker_request: experts listed with no rows (nothing to
// convert, and the empty buffers' null data) are answered, empty.
TEST(ExpertWorkerService, ARequestWithoutRowsIsAnsweredEmpty) {
  const ModelDefinition model = TestModel(DType::kF32);
  ASSERT_OK_AND_ASSIGN(auto worker, ExpertWorker::Create(model, WorkerAt("127.0.0.1:0", "0-3")));
  for (worker::RowDType dtype : {worker::ROW_FP32, worker::ROW_BF16}) {
    worker::ExpertRowsRequest request;
    request.set_layer(0);
    request.set_hidden(48);
    request.set_dtype(dtype);
    request.add_experts(1);
    request.add_expert_rows(0);
    worker::ExpertRowsResponse response;
    EXPECT_OK(worker->service().Answer(request, &response));
    EXPECT_EQ(response.code(), 0) << response.message();
    EXPECT_TRUE(response.outputs().empty());
  }
}

// Kubernetes probes and container health checks ask these services.
TEST(ExpertWorker, AnswersTheStandardHealthServiceForReadinessAndLiveness) {
  const ModelDefinition model = TestModel(DType::kF32);
  ASSERT_OK_AND_ASSIGN(auto worker, ExpertWorker::Create(model, WorkerAt("127.0.0.1:0", "0-3")));
  MoeClient client(absl::StrCat("127.0.0.1:", worker->port()));
  for (const std::string service : {"", "readiness", "liveness"}) {
    ASSERT_OK_AND_ASSIGN(const std::string status, client.CheckHealthService(service));
    EXPECT_EQ(status, "SERVING") << "service '" << service << "'";
  }
  EXPECT_THAT(client.CheckHealthService("no-such-service"), StatusIs(absl::StatusCode::kNotFound, ::testing::_));
}

// A worker whose experts cannot be packed (an executor kind this build or
// machine lacks, a bad expert list) fails its creation with the reason,
// without having listened, and without crashing on the way out.
TEST(ExpertWorker, ACreationThatFailsSaysWhy) {
  const ModelDefinition model = TestModel(DType::kF32);
  ExpertWorker::Options options = WorkerAt("127.0.0.1:0", "0-3");
  options.executor = "no-such-kind";
  EXPECT_THAT(ExpertWorker::Create(model, options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown executor 'no-such-kind'")));
  EXPECT_THAT(ExpertWorker::Create(model, WorkerAt("127.0.0.1:0", "0-99")),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::_));
}

// A placement in config.pbtxt: the registry builds the workers' offload and
// the model answers as one process.
TEST(ModelRegistryPlacement, AConfigPlacementIsServedThroughItsWorkers) {
  const ModelDefinition model = TestModel(DType::kF32);
  Cluster cluster(model, {"0-5", "4-7"});
  const std::string repository = ::moe::testing::ProcessTempDir("moe_remote_test") + "/placement";
  ASSERT_OK(WriteRepositoryModel(model, repository, 1, /*max_batch_size=*/64));
  const std::string config_path = repository + "/remote_test/config.pbtxt";
  std::string config((std::istreambuf_iterator<char>(std::ifstream(config_path).rdbuf())), {});
  const size_t moe_block = config.find("moe {");
  ASSERT_NE(moe_block, std::string::npos);
  config.insert(moe_block + 5, absl::StrCat(" workers { address: \"127.0.0.1:", cluster.worker(0).port(),
                                            "\" experts: \"0-5\" } workers { address: \"127.0.0.1:",
                                            cluster.worker(1).port(), "\" experts: \"4-7\" layers: \"0-1\" }"));
  std::ofstream(config_path) << config;
  ASSERT_OK_AND_ASSIGN(auto registry, ModelRegistry::Create({.model_repository = repository}));
  const ServedModel& served = *registry->models()[0];
  ASSERT_NE(served.remote, nullptr);
  EXPECT_EQ(served.remote->placement().size(), 2u);
  ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Outputs(*served.model));
  EXPECT_EQ(outputs, OneProcess(model));

  config.insert(moe_block + 5, " workers { address: \"127.0.0.1:1\" experts: \"3-9\" }");
  std::ofstream(config_path) << config;
  EXPECT_THAT(ModelRegistry::Create({.model_repository = repository}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("expert '3-9' out of range: there are 8")));
}

}  // namespace
}  // namespace moe
