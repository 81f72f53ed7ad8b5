// moe-serve on a loopback ephemeral port, exercised through gRPC: every RPC,
// batching (results equal to the engine run alone; batches really form),
// queue limits, deadlines, cancellation, streaming, graceful shutdown, and
// every kind of bad input, each answered with a clear status while other
// work completes.
#include "server/server.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "client/moe_client.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "grpcpp/create_channel.h"
#include "proto/health.grpc.pb.h"
#include "proto/placement_admin.grpc.pb.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::PlanWorkspace;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr int kHidden = 32;

// A repository with "toy" (fp32, 2 layers, 4 experts, top-2), written once
// per test process and removed when it exits: CTest runs every test in a
// process of its own, so every test would otherwise leave one behind.
const std::string& Repository() {
  static const std::string repository = [] {
    const std::string path = ::moe::testing::ProcessTempDir("moe_server_test");
    ModelSpec spec;
    spec.name = "toy";
    spec.hidden_size = kHidden;
    spec.intermediate_size = 48;
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    spec.router.norm_topk_prob = true;
    spec.pre_norm = spec.residual = true;
    EXPECT_OK(WriteRepositoryModel(GenerateRandomModel(spec, 2, 77), path, 1, /*max_batch_size=*/64));
    EXPECT_OK(WriteRepositoryModel(GenerateRandomModel(spec, 2, 78), path, 2, 64));  // version 2 (latest)
    std::ofstream config(path + "/toy/config.pbtxt", std::ios::app);
    config << "version_policy { all { } }\n";
    return path;
  }();
  return repository;
}

// The engine, in-process, on the same model: the reference for the server.
std::vector<float> EngineAlone(const std::vector<float>& input, int tokens, int64_t version,
                               std::optional<int> layer = {}) {
  std::ifstream in(Repository() + "/toy/config.pbtxt");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto config = ParseModelConfig(text, "config.pbtxt");
  auto definition = LoadRepositoryModel(Repository() + "/toy", version, *config);
  auto model = MoeModel::Create(*definition, {});
  EXPECT_OK(model);
  auto ws = PlanWorkspace(**model);
  MoeModel::RunResult result;
  EXPECT_OK((*model)->Run(input.data(), tokens, {.layer = layer}, ws.get(), &result));
  return result.outputs[0];
}

std::vector<float> RandomInput(int tokens, uint32_t seed) {
  std::vector<float> input(static_cast<size_t>(tokens) * kHidden);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (float& v : input) v = normal(rng);
  return input;
}

// The scheduler's reports as an observer (the metrics) receives them.
class BatchRecorder : public SchedulerObserver {
 public:
  struct Batch {
    int model_index = -1;
    int num_requests = 0;
    int num_tokens = 0;
  };
  void OnBatch(int model_index, int num_requests, int num_tokens, double /*compute_seconds*/,
               const std::vector<double>& /*queue_seconds*/) override {
    absl::MutexLock lock(&mu_);
    batches_.push_back({model_index, num_requests, num_tokens});
  }
  std::vector<Batch> batches() {
    absl::MutexLock lock(&mu_);
    return batches_;
  }

 private:
  absl::Mutex mu_;
  std::vector<Batch> batches_ ABSL_GUARDED_BY(mu_);
};

class ServerTest : public ::testing::Test {
 protected:
  void Start(MoeServer::Options options = {}) {
    options.grpc_address = "127.0.0.1:0";
    options.models.model_repository = Repository();
    auto server = MoeServer::Create(options);
    ASSERT_OK(server);
    server_ = std::move(*server);
    address_ = "127.0.0.1:" + std::to_string(server_->port());
    client_ = std::make_unique<MoeClient>(address_);
  }
  // The scheduler's index for toy at `version`.
  int ToyIndex(int64_t version = 2) {
    auto found = server_->registry().Find("toy", std::to_string(version));
    return server_->SchedulerIndexOf(**found);
  }
  inference::ModelInferRequest Request(const std::vector<float>& input, int tokens) {
    return MoeClient::BuildRequest({.model = "toy", .input = input.data(), .tokens = tokens, .hidden = kHidden});
  }
  absl::Status Send(const inference::ModelInferRequest& request, inference::ModelInferResponse* response = nullptr,
                    absl::Duration deadline = absl::Seconds(30)) {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
    inference::ModelInferResponse local;
    return FromGrpcStatus(client_->stub().ModelInfer(&context, request, response ? response : &local));
  }

  BatchRecorder recorder_;  // before server_: outlives it
  std::unique_ptr<MoeServer> server_;
  std::string address_;
  std::unique_ptr<MoeClient> client_;
};

TEST_F(ServerTest, EveryRpcAnswers) {
  Start();
  ASSERT_OK_AND_ASSIGN(auto health, client_->CheckHealth());
  EXPECT_TRUE(health.live);
  EXPECT_TRUE(health.ready);
  EXPECT_EQ(health.health_readiness, "SERVING");
  ASSERT_OK_AND_ASSIGN(auto server_metadata, client_->ServerMetadata());
  EXPECT_EQ(server_metadata.name(), "moe-serve");
  EXPECT_THAT(std::vector<std::string>(server_metadata.extensions().begin(), server_metadata.extensions().end()),
              ::testing::UnorderedElementsAre("model_configuration", "parameters"));
  ASSERT_OK_AND_ASSIGN(auto metadata, client_->ModelMetadata("toy"));
  EXPECT_EQ(metadata.versions_size(), 2);
  EXPECT_EQ(metadata.inputs(0).name(), "hidden_states");
  EXPECT_EQ(std::vector<int64_t>(metadata.inputs(0).shape().begin(), metadata.inputs(0).shape().end()),
            (std::vector<int64_t>{-1, kHidden}));
  ASSERT_OK_AND_ASSIGN(auto config, client_->ModelConfig("toy", "1"));
  EXPECT_EQ(config.config().max_batch_size(), 64);
  EXPECT_TRUE(config.config().has_dynamic_batching());
  EXPECT_EQ(config.config().input(0).data_type(), inference::TYPE_FP32);
  EXPECT_THAT(client_->ModelMetadata("nope"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("unknown model 'nope'")));
  EXPECT_THAT(client_->ModelConfig("toy", "9"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("no version '9'")));
  grpc::ClientContext context;
  inference::ModelReadyRequest ready_request;
  ready_request.set_name("toy");
  ready_request.set_version("1");
  inference::ModelReadyResponse ready;
  ASSERT_TRUE(client_->stub().ModelReady(&context, ready_request, &ready).ok());
  EXPECT_TRUE(ready.ready());
  // The standard health service: liveness and an unknown service.
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto health_stub = grpc::health::v1::Health::NewStub(channel);
  for (const std::string service : {"", "liveness", "readiness"}) {
    grpc::ClientContext c;
    grpc::health::v1::HealthCheckRequest r;
    r.set_service(service);
    grpc::health::v1::HealthCheckResponse out;
    ASSERT_TRUE(health_stub->Check(&c, r, &out).ok()) << service;
    EXPECT_EQ(out.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  grpc::ClientContext c;
  grpc::health::v1::HealthCheckRequest r;
  r.set_service("nonsense");
  grpc::health::v1::HealthCheckResponse out;
  EXPECT_EQ(health_stub->Check(&c, r, &out).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(ServerTest, ConcurrentClientsGetTheirOwnResultsAndBatchesForm) {
  Start({.max_queue_delay_us = 20000, .scheduler_observer = &recorder_});
  constexpr int kClients = 24;
  std::vector<std::vector<float>> inputs, outputs(kClients);
  std::vector<absl::Status> statuses(kClients);
  for (int i = 0; i < kClients; ++i) inputs.push_back(RandomInput(1 + i % 3, 100 + i));
  std::vector<std::thread> threads;
  for (int i = 0; i < kClients; ++i) {
    threads.emplace_back([&, i] {
      const int tokens = 1 + i % 3;
      auto result = client_->Infer({.model = "toy", .input = inputs[i].data(), .tokens = tokens, .hidden = kHidden});
      statuses[i] = result.status();
      if (result.ok()) outputs[i] = result->outputs[0];
    });
  }
  for (auto& thread : threads) thread.join();
  for (int i = 0; i < kClients; ++i) {
    ASSERT_OK(statuses[i]);
    // The CPU backend is bit-exact across batch compositions.
    EXPECT_EQ(outputs[i], EngineAlone(inputs[i], 1 + i % 3, 2)) << "client " << i;
  }
  // Every request ran in exactly one batch of at most max_batch_size (64)
  // tokens: the 48 tokens need at least one, and fewer batches than
  // requests means some were batched together.
  const int64_t batches = server_->scheduler().BatchesExecuted(ToyIndex());
  EXPECT_LT(batches, kClients) << "requests were not batched together";
  ASSERT_OK_AND_ASSIGN(const ServedModel* toy, server_->registry().Find("toy", "2"));
  const std::vector<BatchRecorder::Batch> reported = recorder_.batches();
  EXPECT_EQ(static_cast<int64_t>(reported.size()), batches);
  int requests = 0, tokens = 0;
  for (const BatchRecorder::Batch& batch : reported) {
    EXPECT_EQ(batch.model_index, toy->index);
    EXPECT_LE(batch.num_tokens, 64);
    requests += batch.num_requests;
    tokens += batch.num_tokens;
  }
  EXPECT_EQ(requests, kClients);
  EXPECT_EQ(tokens, kClients / 3 * (1 + 2 + 3));
}

// The batching flags are written into the served configs: the ModelConfig
// RPC reports what batches run with, and the token limit it reports is the
// one requests are held to.
TEST_F(ServerTest, BatchingOverridesAreTheConfigsReportedAndEnforced) {
  Start({.max_batch_tokens = 16, .max_queue_delay_us = 1500, .max_queue_size = 5});
  for (const std::string version : {"1", "2"}) {
    ASSERT_OK_AND_ASSIGN(auto config, client_->ModelConfig("toy", version));
    EXPECT_EQ(config.config().max_batch_size(), 16) << "version " << version;
    EXPECT_EQ(config.config().dynamic_batching().max_queue_delay_microseconds(), 1500u) << "version " << version;
    EXPECT_EQ(config.config().dynamic_batching().default_queue_policy().max_queue_size(), 5u) << "version " << version;
  }
  EXPECT_OK(Send(Request(RandomInput(16, 1), 16)));
  EXPECT_THAT(Send(Request(RandomInput(17, 2), 17)),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("above the model's max_batch_size 16")));
}

// Observers know a model by its ServedModel::index; the scheduler's own
// index for it (SchedulerIndexOf) is translated in between.
TEST_F(ServerTest, SchedulerReportsNameTheModelByItsRegistryIndex) {
  Start({.max_queue_delay_us = 0, .scheduler_observer = &recorder_});
  ASSERT_OK_AND_ASSIGN(const ServedModel* v1, server_->registry().Find("toy", "1"));
  ASSERT_OK_AND_ASSIGN(const ServedModel* v2, server_->registry().Find("toy", "2"));
  inference::ModelInferRequest request = Request(RandomInput(3, 1), 3);
  request.set_model_version("1");
  ASSERT_OK(Send(request));
  ASSERT_OK(Send(Request(RandomInput(2, 2), 2)));  // the latest: version 2
  const std::vector<BatchRecorder::Batch> batches = recorder_.batches();
  ASSERT_EQ(batches.size(), 2u);
  EXPECT_EQ(batches[0].model_index, v1->index);
  EXPECT_EQ(batches[0].num_tokens, 3);
  EXPECT_EQ(batches[1].model_index, v2->index);
  EXPECT_EQ(batches[1].num_tokens, 2);
  EXPECT_EQ(server_->scheduler().BatchesExecuted(server_->SchedulerIndexOf(*v1)), 1);
  EXPECT_EQ(server_->scheduler().BatchesExecuted(server_->SchedulerIndexOf(*v2)), 1);
}

TEST_F(ServerTest, VersionsLayersRoutingAndInputEncodings) {
  Start({.max_queue_delay_us = 0});
  const std::vector<float> input = RandomInput(3, 5);
  // Version 1 explicitly.
  inference::ModelInferRequest request = Request(input, 3);
  request.set_model_version("1");
  inference::ModelInferResponse response;
  ASSERT_OK(Send(request, &response));
  EXPECT_EQ(response.model_version(), "1");
  std::vector<float> out(3 * kHidden);
  std::memcpy(out.data(), response.raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(input, 3, 1));
  // One layer, with routing.
  request = Request(input, 3);
  (*request.mutable_parameters())["layer"].set_int64_param(1);
  (*request.mutable_parameters())["return_routing"].set_bool_param(true);
  ASSERT_OK(Send(request, &response));
  ASSERT_EQ(response.outputs_size(), 3);
  EXPECT_EQ(response.outputs(1).name(), "expert_ids");
  EXPECT_EQ(response.outputs(1).datatype(), "INT32");
  EXPECT_EQ(std::vector<int64_t>(response.outputs(1).shape().begin(), response.outputs(1).shape().end()),
            (std::vector<int64_t>{3, 1, 2}));
  std::memcpy(out.data(), response.raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(input, 3, 2, 1));
  // Typed FP32 contents give the same answer as raw.
  request = Request(input, 3);
  request.clear_raw_input_contents();
  for (float v : input) request.mutable_inputs(0)->mutable_contents()->add_fp32_contents(v);
  ASSERT_OK(Send(request, &response));
  std::memcpy(out.data(), response.raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(input, 3, 2));
  // BF16 raw input equals the fp32 run on the bf16-rounded values.
  request = Request(input, 3);
  request.mutable_inputs(0)->set_datatype("BF16");
  std::string raw(input.size() * 2, '\0');
  std::vector<float> rounded(input.size());
  for (size_t i = 0; i < input.size(); ++i) {
    const uint16_t b = FloatToBf16(input[i]);
    std::memcpy(&raw[2 * i], &b, 2);
    rounded[i] = Bf16ToFloat(b);
  }
  *request.mutable_raw_input_contents(0) = raw;
  ASSERT_OK(Send(request, &response));
  std::memcpy(out.data(), response.raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(rounded, 3, 2));
}

TEST_F(ServerTest, BadInputGetsAClearStatusAndOtherWorkCompletes) {
  Start({.max_queue_delay_us = 2000, .max_receive_message_bytes = 1 << 20});
  const std::vector<float> input = RandomInput(2, 9);
  // A good request in flight the whole time.
  std::atomic<bool> stop{false};
  std::atomic<int> good{0}, bad{0};
  std::thread background([&] {
    while (!stop.load()) {
      auto result = client_->Infer({.model = "toy", .input = input.data(), .tokens = 2, .hidden = kHidden});
      (result.ok() ? good : bad)++;
    }
  });
  using Edit = std::function<void(inference::ModelInferRequest&)>;
  const std::vector<std::tuple<std::string, Edit, absl::StatusCode, std::string>> cases = {
      {"unknown model", [](auto& r) { r.set_model_name("nope"); }, absl::StatusCode::kNotFound, "unknown model 'nope'"},
      {"unknown version", [](auto& r) { r.set_model_version("7"); }, absl::StatusCode::kNotFound, "no version '7'"},
      {"tensor name", [](auto& r) { r.mutable_inputs(0)->set_name("x"); }, absl::StatusCode::kInvalidArgument,
       "unknown input 'x'"},
      {"datatype", [](auto& r) { r.mutable_inputs(0)->set_datatype("INT8"); }, absl::StatusCode::kInvalidArgument,
       "datatype 'INT8'"},
      {"rank", [](auto& r) { r.mutable_inputs(0)->add_shape(1); }, absl::StatusCode::kInvalidArgument, "rank 2"},
      {"hidden size", [](auto& r) { r.mutable_inputs(0)->set_shape(1, 16); }, absl::StatusCode::kInvalidArgument,
       "hidden size 16"},
      {"T = 0",
       [](auto& r) {
         r.mutable_inputs(0)->set_shape(0, 0);
         r.mutable_raw_input_contents(0)->clear();
       },
       absl::StatusCode::kInvalidArgument, "T = 0"},
      {"T above the limit",
       [](auto& r) {
         r.mutable_inputs(0)->set_shape(0, 65);
         r.mutable_raw_input_contents(0)->resize(65 * kHidden * 4);
       },
       absl::StatusCode::kInvalidArgument, "above the model's max_batch_size 64"},
      {"raw length", [](auto& r) { r.mutable_raw_input_contents(0)->resize(10); }, absl::StatusCode::kInvalidArgument,
       "raw contents are 10 bytes"},
      {"raw and typed", [](auto& r) { r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1); },
       absl::StatusCode::kInvalidArgument, "both raw_input_contents and typed contents"},
      {"no inputs", [](auto& r) { r.clear_inputs(); }, absl::StatusCode::kInvalidArgument, "expected 1 input"},
      {"bad layer", [](auto& r) { (*r.mutable_parameters())["layer"].set_int64_param(2); },
       absl::StatusCode::kInvalidArgument, "has 2 MoE layers"},
      {"layer type", [](auto& r) { (*r.mutable_parameters())["layer"].set_string_param("1"); },
       absl::StatusCode::kInvalidArgument, "'layer' must be an int64"},
      {"unknown output", [](auto& r) { r.add_outputs()->set_name("logits"); }, absl::StatusCode::kInvalidArgument,
       "unknown output 'logits'"},
      {"fp16 typed",
       [](auto& r) {
         r.mutable_inputs(0)->set_datatype("FP16");
         r.clear_raw_input_contents();
       },
       absl::StatusCode::kInvalidArgument, "travels only in raw_input_contents"},
      {"negative T", [](auto& r) { r.mutable_inputs(0)->set_shape(0, -1); }, absl::StatusCode::kInvalidArgument,
       "T = -1"},
      {"duplicate input",
       [](auto& r) {
         *r.add_inputs() = r.inputs(0);
         *r.add_raw_input_contents() = r.raw_input_contents(0);
       },
       absl::StatusCode::kInvalidArgument, "inputs: 'hidden_states' appears twice"},
      {"second input",
       [](auto& r) {
         r.add_inputs()->set_name("mask");
         *r.add_raw_input_contents() = "x";
       },
       absl::StatusCode::kInvalidArgument, "expected 1 input 'hidden_states', got 2"},
      {"raw count", [](auto& r) { r.add_raw_input_contents(); }, absl::StatusCode::kInvalidArgument,
       "raw_input_contents has 2 entries for 1 input"},
      {"raw and empty typed", [](auto& r) { r.mutable_inputs(0)->mutable_contents(); },
       absl::StatusCode::kInvalidArgument, "both raw_input_contents and typed contents"},
      {"no data", [](auto& r) { r.clear_raw_input_contents(); }, absl::StatusCode::kInvalidArgument, "carries no data"},
      {"typed of another type",
       [](auto& r) {
         r.clear_raw_input_contents();
         r.mutable_inputs(0)->mutable_contents()->add_int_contents(1);
       },
       absl::StatusCode::kInvalidArgument, "is FP32 but its contents carry int_contents"},
      {"typed fp32 and fp64",
       [](auto& r) {
         r.clear_raw_input_contents();
         for (int i = 0; i < 2 * kHidden; ++i) r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(0);
         r.mutable_inputs(0)->mutable_contents()->add_fp64_contents(1);
       },
       absl::StatusCode::kInvalidArgument, "carry fp64_contents"},
      {"typed count",
       [](auto& r) {
         r.clear_raw_input_contents();
         r.mutable_inputs(0)->mutable_contents()->add_fp32_contents(1);
       },
       absl::StatusCode::kInvalidArgument, "fp32_contents holds 1 values; shape [2, 32] needs 64"},
      {"input parameter",
       [](auto& r) { (*r.mutable_inputs(0)->mutable_parameters())["shared_memory_region"].set_string_param("r"); },
       absl::StatusCode::kInvalidArgument, "input 'hidden_states': parameter 'shared_memory_region' is not supported"},
      {"unknown parameter", [](auto& r) { (*r.mutable_parameters())["temperature"].set_double_param(0.5); },
       absl::StatusCode::kInvalidArgument, "unknown parameter 'temperature'"},
      {"sequence id", [](auto& r) { (*r.mutable_parameters())["sequence_id"].set_int64_param(5); },
       absl::StatusCode::kInvalidArgument, "parameter 'sequence_id': model 'toy' is not stateful"},
      {"sequence string id", [](auto& r) { (*r.mutable_parameters())["sequence_id"].set_string_param("a"); },
       absl::StatusCode::kInvalidArgument, "parameter 'sequence_id': model 'toy' is not stateful"},
      {"sequence start", [](auto& r) { (*r.mutable_parameters())["sequence_start"].set_bool_param(true); },
       absl::StatusCode::kInvalidArgument, "parameter 'sequence_start': model 'toy' is not stateful"},
      {"sequence id type", [](auto& r) { (*r.mutable_parameters())["sequence_id"].set_bool_param(false); },
       absl::StatusCode::kInvalidArgument, "'sequence_id' must be an int64, a uint64 or a string"},
      {"sequence end type", [](auto& r) { (*r.mutable_parameters())["sequence_end"].set_int64_param(0); },
       absl::StatusCode::kInvalidArgument, "'sequence_end' must be a bool"},
      {"final response flag type",
       [](auto& r) { (*r.mutable_parameters())["triton_enable_empty_final_response"].set_int64_param(1); },
       absl::StatusCode::kInvalidArgument, "'triton_enable_empty_final_response' must be a bool"},
      {"priority type", [](auto& r) { (*r.mutable_parameters())["priority"].set_string_param("high"); },
       absl::StatusCode::kInvalidArgument, "'priority' must be a uint64"},
      {"negative timeout", [](auto& r) { (*r.mutable_parameters())["timeout"].set_int64_param(-1); },
       absl::StatusCode::kInvalidArgument, "'timeout' must be a non-negative int64"},
      {"routing type", [](auto& r) { (*r.mutable_parameters())["return_routing"].set_int64_param(1); },
       absl::StatusCode::kInvalidArgument, "'return_routing' must be a bool"},
      {"parameter without value", [](auto& r) { (*r.mutable_parameters())["sequence_start"]; },
       absl::StatusCode::kInvalidArgument, "'sequence_start' has no value"},
      {"duplicate output",
       [](auto& r) {
         r.add_outputs()->set_name("output");
         r.add_outputs()->set_name("output");
       },
       absl::StatusCode::kInvalidArgument, "outputs: 'output' appears twice"},
      {"output parameter",
       [](auto& r) {
         auto* output = r.add_outputs();
         output->set_name("output");
         (*output->mutable_parameters())["classification"].set_int64_param(3);
       },
       absl::StatusCode::kInvalidArgument, "output 'output': parameter 'classification' is not supported"},
      {"routing refused and requested",
       [](auto& r) {
         (*r.mutable_parameters())["return_routing"].set_bool_param(false);
         r.add_outputs()->set_name("expert_ids");
       },
       absl::StatusCode::kInvalidArgument, "output 'expert_ids' is requested but parameter 'return_routing' is false"},
      {"oversized", [](auto& r) { r.mutable_raw_input_contents(0)->resize(2 << 20); },
       absl::StatusCode::kResourceExhausted, ""},
  };
  for (const auto& [label, edit, code, message] : cases) {
    inference::ModelInferRequest request = Request(input, 2);
    edit(request);
    EXPECT_THAT(Send(request), StatusIs(code, HasSubstr(message))) << label;
  }
  stop.store(true);
  background.join();
  EXPECT_GT(good.load(), 0);
  EXPECT_EQ(bad.load(), 0);
}

TEST_F(ServerTest, ParametersThatChangeNothingAreAccepted) {
  Start();
  const std::vector<float> input = RandomInput(2, 11);
  inference::ModelInferRequest request = Request(input, 2);
  // What tritonclient sends for a request outside any sequence, at a priority.
  (*request.mutable_parameters())["priority"].set_uint64_param(3);
  (*request.mutable_parameters())["sequence_id"].set_int64_param(0);
  (*request.mutable_parameters())["sequence_start"].set_bool_param(false);
  (*request.mutable_parameters())["sequence_end"].set_bool_param(false);
  (*request.mutable_parameters())["timeout"].set_int64_param(0);
  (*request.mutable_parameters())["return_routing"].set_bool_param(true);
  // What perf_analyzer sends: the response says it is the last.
  (*request.mutable_parameters())["triton_enable_empty_final_response"].set_bool_param(true);
  request.add_outputs()->set_name("output");
  request.add_outputs()->set_name("expert_ids");
  inference::ModelInferResponse response;
  ASSERT_OK(Send(request, &response));
  ASSERT_TRUE(response.parameters().contains("triton_final_response"));
  EXPECT_TRUE(response.parameters().at("triton_final_response").bool_param());
  ASSERT_EQ(response.outputs_size(), 2);
  EXPECT_EQ(response.outputs(1).name(), "expert_ids");
  std::vector<float> out(2 * kHidden);
  std::memcpy(out.data(), response.raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(input, 2, 2));
}

TEST_F(ServerTest, FullQueueRejectsWithUnavailableAndLosesNothingElse) {
  // Batches close only after 2 s, so the queue fills.
  Start({.max_queue_delay_us = 2000000, .max_queue_size = 3});
  const std::vector<float> input = RandomInput(1, 3);
  constexpr int kRequests = 10;
  std::vector<absl::Status> statuses(kRequests);
  std::vector<std::thread> threads;
  for (int i = 0; i < kRequests; ++i) {
    threads.emplace_back([&, i] { statuses[i] = Send(Request(input, 1)); });
  }
  for (auto& thread : threads) thread.join();
  int ok = 0, unavailable = 0;
  for (const absl::Status& status : statuses) {
    if (status.ok()) ++ok;
    if (absl::IsUnavailable(status)) {
      ++unavailable;
      EXPECT_THAT(status.message(), HasSubstr("queue full"));
    }
  }
  EXPECT_EQ(ok, 3);
  EXPECT_EQ(unavailable, kRequests - 3);
}

TEST_F(ServerTest, ExpiredRequestsLeaveTheQueueWithoutBeingComputed) {
  Start({.max_queue_delay_us = 300000});
  const std::vector<float> input = RandomInput(1, 4);
  // The timeout parameter (microseconds), shorter than the queue delay.
  inference::ModelInferRequest request = Request(input, 1);
  (*request.mutable_parameters())["timeout"].set_int64_param(20000);
  EXPECT_THAT(Send(request), StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("timed out in the queue")));
  // A gRPC deadline shorter than the queue delay.
  EXPECT_THAT(Send(Request(input, 1), nullptr, absl::Milliseconds(50)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, ::testing::_));
  absl::SleepFor(absl::Milliseconds(400));  // past the queue delay: nothing left to run
  EXPECT_EQ(server_->scheduler().BatchesExecuted(ToyIndex()), 0);
  EXPECT_OK(Send(Request(input, 1)));
  EXPECT_EQ(server_->scheduler().BatchesExecuted(ToyIndex()), 1);
}

// A cancelled call's request leaves the queue at once: the batch would close
// only after a minute's queue delay, so without the cancellation waking the
// scheduler it would still be queued when the test gives up.
TEST_F(ServerTest, CancelledRequestsAreNotComputed) {
  Start({.max_queue_delay_us = 60'000'000});
  const std::vector<float> input = RandomInput(1, 6);
  const inference::ModelInferRequest request = Request(input, 1);
  grpc::ClientContext context;
  inference::ModelInferResponse response;
  std::atomic<bool> finished{false};
  grpc::Status status;
  client_->stub().async()->ModelInfer(&context, &request, &response, [&](grpc::Status s) {
    status = s;
    finished.store(true);
  });
  // Real time bounds these waits only as a safety net.
  const absl::Time give_up = absl::Now() + absl::Seconds(10);
  while (server_->scheduler().QueueDepth(ToyIndex()) == 0 && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_EQ(server_->scheduler().QueueDepth(ToyIndex()), 1u);
  context.TryCancel();
  while ((!finished.load() || server_->scheduler().QueueDepth(ToyIndex()) > 0) && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(1));
  }
  ASSERT_TRUE(finished.load());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(server_->scheduler().QueueDepth(ToyIndex()), 0u);
  EXPECT_EQ(server_->scheduler().BatchesExecuted(ToyIndex()), 0);
}

TEST_F(ServerTest, StreamAnswersEveryRequestAndReportsErrorsInline) {
  Start({.max_queue_delay_us = 1000});
  const std::vector<float> input = RandomInput(2, 8);
  grpc::ClientContext context;
  auto stream = client_->stub().ModelStreamInfer(&context);
  inference::ModelInferRequest good = Request(input, 2);
  inference::ModelInferRequest bad = Request(input, 2);
  bad.mutable_inputs(0)->set_name("wrong");
  good.set_id("a");
  ASSERT_TRUE(stream->Write(good));
  ASSERT_TRUE(stream->Write(bad));
  good.set_id("b");
  ASSERT_TRUE(stream->Write(good));
  stream->WritesDone();
  int ok = 0, errors = 0;
  inference::ModelStreamInferResponse reply;
  const std::vector<float> expected = EngineAlone(input, 2, 2);
  while (stream->Read(&reply)) {
    if (reply.error_message().empty()) {
      ++ok;
      std::vector<float> out(2 * kHidden);
      std::memcpy(out.data(), reply.infer_response().raw_output_contents(0).data(), out.size() * 4);
      EXPECT_EQ(out, expected);
    } else {
      ++errors;
      EXPECT_THAT(reply.error_message(), HasSubstr("unknown input 'wrong'"));
    }
  }
  EXPECT_TRUE(stream->Finish().ok());
  EXPECT_EQ(ok, 2);
  EXPECT_EQ(errors, 1);
}

// A stub on a connection of its own: channels with equal arguments would
// otherwise share one.
std::unique_ptr<inference::GRPCInferenceService::Stub> StubOnNewConnection(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return inference::GRPCInferenceService::NewStub(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

TEST_F(ServerTest, AnswersLargerThanTheMessageLimitAreRefusedAndTheStreamGoesOn) {
  // 40 tokens in fp32 fit in 6000 bytes; their output with the routing does not.
  Start({.max_queue_delay_us = 0, .max_receive_message_bytes = 6000, .max_send_message_bytes = 6000});
  const std::vector<float> input = RandomInput(40, 12);
  auto request = MoeClient::BuildRequest(
      {.model = "toy", .input = input.data(), .tokens = 40, .hidden = kHidden, .return_routing = true});
  ASSERT_LT(request.ByteSizeLong(), 6000u);
  EXPECT_THAT(Send(request), StatusIs(absl::StatusCode::kResourceExhausted,
                                      HasSubstr("above the largest message this server sends (6000 bytes")));
  // Without the routing the answer fits.
  request.clear_parameters();
  ASSERT_OK(Send(request));
  // On a stream the refusal is inline and the stream serves on.
  grpc::ClientContext context;
  auto stream = client_->stub().ModelStreamInfer(&context);
  (*request.mutable_parameters())["return_routing"].set_bool_param(true);
  ASSERT_TRUE(stream->Write(request));
  inference::ModelStreamInferResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_THAT(reply.error_message(), HasSubstr("above the largest message this server sends"));
  request.clear_parameters();
  ASSERT_TRUE(stream->Write(request));
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.error_message(), "");
  EXPECT_EQ(reply.infer_response().outputs_size(), 1);
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerTest, TokensPerRequestAreBounded) {
  Start({.max_request_tokens = 8});
  const std::vector<float> input = RandomInput(9, 13);
  EXPECT_THAT(Send(Request(input, 9)),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("T = 9 tokens, above this server's limit of 8 per request (max_request_tokens)")));
  ASSERT_OK(Send(Request(input, 8)));
}

TEST_F(ServerTest, StreamsPerConnectionAreBoundedAndOtherConnectionsServe) {
  Start({.max_concurrent_streams = 2});
  const std::vector<float> input = RandomInput(1, 14);
  ASSERT_OK(Send(Request(input, 1)));  // the connection is up, the server's limit known
  grpc::ClientContext first, second;
  auto stream1 = client_->stub().ModelStreamInfer(&first);
  auto stream2 = client_->stub().ModelStreamInfer(&second);
  // Both streams hold the connection's two: a third call waits for one.
  EXPECT_THAT(Send(Request(input, 1), nullptr, absl::Milliseconds(300)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, ::testing::_));
  // Another connection serves meanwhile, and so do the open streams.
  auto other = StubOnNewConnection(address_);
  grpc::ClientContext other_context;
  inference::ModelInferResponse response;
  ASSERT_TRUE(other->ModelInfer(&other_context, Request(input, 1), &response).ok());
  ASSERT_TRUE(stream1->Write(Request(input, 1)));
  inference::ModelStreamInferResponse reply;
  ASSERT_TRUE(stream1->Read(&reply));
  EXPECT_EQ(reply.error_message(), "");
  // A stream that ends frees its place.
  stream1->WritesDone();
  EXPECT_TRUE(stream1->Finish().ok());
  ASSERT_OK(Send(Request(input, 1), nullptr, absl::Seconds(10)));
  stream2->WritesDone();
  EXPECT_TRUE(stream2->Finish().ok());
}

TEST_F(ServerTest, RequestsInFlightPerConnectionAreBoundedAndOtherConnectionsServe) {
  // Batches close after 300 ms, so the first requests are still in flight
  // when the third arrives.
  Start({.max_queue_delay_us = 300000, .max_inflight_per_connection = 2});
  const std::vector<float> input = RandomInput(1, 15);
  grpc::ClientContext context;
  auto stream = client_->stub().ModelStreamInfer(&context);
  for (const char* id : {"a", "b", "c"}) {
    inference::ModelInferRequest request = Request(input, 1);
    request.set_id(id);
    ASSERT_TRUE(stream->Write(request));
  }
  // Another connection is not limited by this one.
  auto other = StubOnNewConnection(address_);
  grpc::ClientContext other_context;
  inference::ModelInferResponse response;
  ASSERT_TRUE(other->ModelInfer(&other_context, Request(input, 1), &response).ok());
  std::vector<std::string> answered, refused;
  inference::ModelStreamInferResponse reply;
  for (int i = 0; i < 3 && stream->Read(&reply); ++i) {
    if (reply.error_message().empty()) {
      answered.push_back(reply.infer_response().id());
    } else {
      refused.push_back(reply.error_message());
    }
  }
  EXPECT_THAT(answered, ::testing::UnorderedElementsAre("a", "b"));
  ASSERT_EQ(refused.size(), 1u);
  EXPECT_THAT(refused[0], HasSubstr("already has 2 inference requests in flight"));
  // Answered requests free their places.
  ASSERT_TRUE(stream->Write(Request(input, 1)));
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.error_message(), "");
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(ServerTest, BearerTokensGuardInferenceAndPlacementButNotHealth) {
  const std::string tokens = ::moe::testing::ProcessTempDir("moe_server_test_tokens") + "/tokens";
  std::ofstream(tokens) << "first-token\n";
  Start({.auth_token_file = tokens});
  const std::vector<float> input = RandomInput(2, 16);
  const MoeClient::InferRequest infer{.model = "toy", .input = input.data(), .tokens = 2, .hidden = kHidden};
  MoeClient allowed(address_, {.token = "first-token"}), wrong(address_, {.token = "second-token"});
  // No token (client_ sends none): UNAUTHENTICATED on every RPC but health.
  EXPECT_THAT(client_->Infer(infer), StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("Bearer <token>")));
  EXPECT_THAT(client_->ModelMetadata("toy"), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_));
  EXPECT_THAT(client_->ServerMetadata(), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_));
  ASSERT_OK_AND_ASSIGN(const std::string readiness, client_->CheckHealthService("readiness"));
  EXPECT_EQ(readiness, "SERVING");
  {
    grpc::ClientContext context;
    auto stream = client_->stub().ModelStreamInfer(&context);
    stream->Write(Request(input, 2));
    stream->WritesDone();
    inference::ModelStreamInferResponse reply;
    EXPECT_FALSE(stream->Read(&reply));
    EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  auto placement = [](MoeClient& client) {
    grpc::ClientContext context;
    admin::GetPlacementRequest request;
    request.set_model("toy");
    admin::PlacementResponse response;
    return FromGrpcStatus(admin::PlacementAdmin::NewStub(client.channel())->GetPlacement(&context, request, &response));
  };
  EXPECT_THAT(placement(*client_), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_));
  // A wrong token: PERMISSION_DENIED.
  EXPECT_THAT(wrong.Infer(infer), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
  EXPECT_THAT(placement(wrong), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
  // The right one: served (toy has no workers, so the placement is refused for that).
  ASSERT_OK_AND_ASSIGN(auto result, allowed.Infer(infer));
  EXPECT_EQ(result.outputs[0], EngineAlone(input, 2, 2));
  EXPECT_THAT(placement(allowed), Not(StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_)));
  {
    grpc::ClientContext context;
    auto stream = allowed.stub().ModelStreamInfer(&context);
    ASSERT_TRUE(stream->Write(Request(input, 2)));
    inference::ModelStreamInferResponse reply;
    ASSERT_TRUE(stream->Read(&reply));
    EXPECT_EQ(reply.error_message(), "");
    stream->WritesDone();
    EXPECT_TRUE(stream->Finish().ok());
  }
  // A new token file is read within a second or so, without a restart.
  std::ofstream(tokens + ".new") << "second-token\n";
  fs::rename(tokens + ".new", tokens);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!wrong.ServerMetadata().ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(50));
  EXPECT_OK(wrong.Infer(infer));
  EXPECT_THAT(allowed.Infer(infer), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
}

TEST_F(ServerTest, GracefulShutdownRunsQueuedWorkAtOnceAndFinishesIt) {
  // No batch closes by itself: only the drain runs them.
  Start({.max_queue_delay_us = 60000000, .grace_period = absl::Seconds(20)});
  const std::vector<float> input = RandomInput(1, 10);
  constexpr int kInFlight = 6;
  std::vector<absl::Status> statuses(kInFlight);
  std::vector<std::thread> threads;
  for (int i = 0; i < kInFlight; ++i) threads.emplace_back([&, i] { statuses[i] = Send(Request(input, 1)); });
  while (server_->scheduler().QueueDepth(ToyIndex()) < kInFlight) absl::SleepFor(absl::Milliseconds(2));
  std::thread stopper([&] { EXPECT_TRUE(server_->Shutdown()); });
  while (!server_->draining()) absl::SleepFor(absl::Milliseconds(1));
  for (auto& thread : threads) thread.join();
  for (const absl::Status& status : statuses) EXPECT_OK(status);
  stopper.join();
  EXPECT_EQ(server_->scheduler().BatchesExecuted(ToyIndex()), 1) << "queued requests ran at once when draining";
}

TEST_F(ServerTest, ReadinessWatchersSeeNotServingOnShutdown) {
  Start({.max_queue_delay_us = 0});
  auto channel = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service("readiness");
  auto watch = health->Watch(&context, request);
  grpc::health::v1::HealthCheckResponse update;
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  std::thread stopper([&] { server_->Shutdown(); });
  ASSERT_TRUE(watch->Read(&update));
  EXPECT_EQ(update.status(), grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  context.TryCancel();  // an open watch would hold shutdown for its grace period
  stopper.join();
  // After shutdown nothing is served.
  const std::vector<float> input = RandomInput(1, 11);
  EXPECT_THAT(Send(Request(input, 1), nullptr, absl::Seconds(2)),
              StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
}

TEST_F(ServerTest, RequestsStillQueuedWhenTheGracePeriodEndsGetUnavailable) {
  // Batches would close after a minute; the grace period is over at once.
  Start({.max_queue_delay_us = 60000000, .grace_period = absl::ZeroDuration()});
  const std::vector<float> input = RandomInput(1, 12);
  constexpr int kQueued = 3;
  std::vector<absl::Status> statuses(kQueued);
  std::vector<std::thread> threads;
  for (int i = 0; i < kQueued; ++i) threads.emplace_back([&, i] { statuses[i] = Send(Request(input, 1)); });
  while (server_->scheduler().QueueDepth(ToyIndex()) < kQueued) absl::SleepFor(absl::Milliseconds(2));
  EXPECT_FALSE(server_->Shutdown()) << "requests were left when the grace period ended";
  for (auto& thread : threads) thread.join();
  for (const absl::Status& status : statuses) {
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("grace period ended")));
  }
  EXPECT_EQ(server_->scheduler().BatchesExecuted(ToyIndex()), 0) << "no batch starts after the grace period";
}

TEST_F(ServerTest, ShutdownAnswersWhatAStreamHasQueuedThenEndsTheStream) {
  // The stream stays open with nothing more to do: shutdown sends its
  // answer, then ends it rather than wait the grace period for the client.
  Start({.max_queue_delay_us = 60000000, .grace_period = absl::Seconds(20)});
  const std::vector<float> input = RandomInput(2, 13);
  grpc::ClientContext context;
  auto stream = client_->stub().ModelStreamInfer(&context);
  ASSERT_TRUE(stream->Write(Request(input, 2)));
  while (server_->scheduler().QueueDepth(ToyIndex()) < 1) absl::SleepFor(absl::Milliseconds(2));
  const absl::Time start = absl::Now();
  std::thread stopper([&] { EXPECT_TRUE(server_->Shutdown()); });
  inference::ModelStreamInferResponse reply;
  ASSERT_TRUE(stream->Read(&reply));
  EXPECT_EQ(reply.error_message(), "");
  std::vector<float> out(2 * kHidden);
  std::memcpy(out.data(), reply.infer_response().raw_output_contents(0).data(), out.size() * 4);
  EXPECT_EQ(out, EngineAlone(input, 2, 2));
  EXPECT_FALSE(stream->Read(&reply)) << "the server ends the stream";
  stream->Finish();
  stopper.join();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << "shutdown waited for an idle stream";
}

// A repository whose only model's config.pbtxt does not parse.
std::string BrokenRepository() {
  const std::string path = Repository() + "_broken";
  fs::create_directories(path + "/broken/1");
  std::ofstream(path + "/broken/config.pbtxt") << "max_batch_size: [\n";
  return path;
}

TEST(MoeServerCreate, FailsWithAStatusNamingTheCauseAndTakesDownWhatItBuilt) {
  // Each failure comes after different parts were built (none; the models;
  // the models and the scheduler's threads); destroying them must not crash.
  MoeServer::Options options;
  options.grpc_address = "127.0.0.1:0";
  options.models.model_path = "/nonexistent";
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("cannot load model '/nonexistent'")));
  options.models.model_path = "";
  const std::string broken = BrokenRepository();
  options.models.model_repository = broken;
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("cannot load model repository '" + broken + "': " + broken + "/broken/config.pbtxt")));
  fs::remove_all(broken);
  options.models.model_repository = Repository();
  options.batch_threads = 0;
  EXPECT_THAT(MoeServer::Create(options), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("batch threads")));
  options.batch_threads = 1;
  options.grpc_address = "192.0.2.1:0";  // TEST-NET-1: no interface has it
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kUnavailable,
                       HasSubstr("cannot listen for gRPC on 192.0.2.1:0: Cannot assign requested address")));
  options.grpc_address = "127.0.0.1:0";
  options.max_queue_size = -1;
  EXPECT_THAT(MoeServer::Create(options), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_queue_size")));
  options.max_queue_size = 0;
  options.max_batch_tokens = int64_t{1} << 31;  // above a config's 32-bit max_batch_size
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_batch_tokens must be in [0, 2147483647]")));
  options.max_batch_tokens = 0;
  options.grace_period = absl::Seconds(-1);
  EXPECT_THAT(MoeServer::Create(options), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("grace period")));
  options.grace_period = absl::Seconds(1);
  options.max_concurrent_streams = 0;
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_concurrent_streams must be >= 1")));
  options.max_concurrent_streams = 1;
  options.max_request_tokens = -1;
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_request_tokens must be >= 0")));
}

TEST(MoeServerCreate, APortInUseFailsUnlessEveryServerOnItAsksToShare) {
  MoeServer::Options options;
  options.grpc_address = "127.0.0.1:0";
  options.models.model_repository = Repository();
  ASSERT_OK_AND_ASSIGN(auto first, MoeServer::Create(options));
  options.grpc_address = "127.0.0.1:" + std::to_string(first->port());
  EXPECT_THAT(MoeServer::Create(options),
              StatusIs(absl::StatusCode::kUnavailable,
                       HasSubstr("cannot listen for gRPC on " + options.grpc_address + ": Address already in use")));
  options.reuse_grpc_port = true;
  EXPECT_THAT(MoeServer::Create(options), StatusIs(absl::StatusCode::kUnavailable, HasSubstr("in use")))
      << "the first server did not ask to share";

  options.grpc_address = "127.0.0.1:0";
  ASSERT_OK_AND_ASSIGN(auto shared, MoeServer::Create(options));
  options.grpc_address = "127.0.0.1:" + std::to_string(shared->port());
  ASSERT_OK_AND_ASSIGN(auto sharing, MoeServer::Create(options));
  EXPECT_EQ(sharing->port(), shared->port());
}

}  // namespace
}  // namespace moe
