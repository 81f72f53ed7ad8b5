// moe-client: talks to moe-serve (or any Open Inference Protocol server).
//
//   moe-client health   [--server=localhost:8001] [--service=readiness]
//   moe-client metadata --model=demo
//   moe-client infer    --model=demo --tokens=4 [--input=x.npy] [--output=y.npy] [--routing] [--layer=0]
//   moe-client bench    --model=demo --concurrency=16 --tokens=1 --duration_s=10 [--rate=500] [--json]
//   moe-client top      [--metrics=http://localhost:8002/metrics] [--model=NAME]
//   moe-client placement --model=demo [--move='10.0.0.5:8101=0-3;10.0.0.6:8101=4-7' | --propose [--apply]]
#include <fstream>
#include <iostream>
#include <random>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/load_generator.h"
#include "client/metrics_text.h"
#include "client/moe_client.h"
#include "client/npy.h"
#include "client/top_view.h"
#include "grpcpp/grpcpp.h"
#include "proto/placement_admin.grpc.pb.h"

ABSL_FLAG(std::string, server, "localhost:8001", "server address");
ABSL_FLAG(std::string, token, "",
          "bearer token for a server with --auth_token_file (sent as 'authorization: Bearer <token>'); visible to "
          "other users in the process list: prefer --token_file");
ABSL_FLAG(std::string, token_file, "", "file whose first line is the bearer token (instead of --token)");
ABSL_FLAG(bool, tls, false, "TLS, checking the server against the system's roots (implied by --tls_ca, --tls_cert)");
ABSL_FLAG(std::string, tls_ca, "", "TLS: PEM CA bundle the server's certificate must chain to");
ABSL_FLAG(std::string, tls_cert, "",
          "TLS: PEM client certificate chain, for a server that requires one (with --tls_key)");
ABSL_FLAG(std::string, tls_key, "", "TLS: PEM private key of --tls_cert");
ABSL_FLAG(std::string, model, "demo", "model name");
ABSL_FLAG(std::string, model_version, "", "model version (default: latest)");
ABSL_FLAG(int, tokens, 4, "tokens per request (random input)");
ABSL_FLAG(std::string, input, "", "infer: .npy float32 [T, hidden] input instead of random");
ABSL_FLAG(std::string, output, "", "infer: write the output to this .npy");
ABSL_FLAG(bool, routing, false, "infer: print the routing");
ABSL_FLAG(int, layer, -1, "infer: run only this MoE layer");
ABSL_FLAG(int, concurrency, 1, "bench: requests in flight (closed loop)");
ABSL_FLAG(double, rate, 0, "bench: requests per second (open loop; 0 = closed loop)");
ABSL_FLAG(double, duration_s, 10, "bench: seconds to run");
ABSL_FLAG(int64_t, requests, 0, "bench: stop after this many requests (0 = use duration)");
ABSL_FLAG(bool, json, false, "bench: print the report as JSON");
ABSL_FLAG(std::string, metrics, "http://localhost:8002/metrics", "top: the server's metrics URL");
ABSL_FLAG(double, interval_s, 1, "top: seconds between refreshes");
ABSL_FLAG(int, iterations, 0, "top: screens to draw before exiting (0 = until interrupted)");
ABSL_FLAG(bool, propose, false,
          "placement: propose replicas for hot experts from the load the server measured (--apply moves to it)");
ABSL_FLAG(bool, apply, false, "placement --propose: move to the proposed placement");
ABSL_FLAG(double, hot_factor, 0, "placement --propose: an expert is hot above this multiple of the mean (0: 1.5)");
ABSL_FLAG(std::string, service, "",
          "health: ask only the standard gRPC health service about this service (readiness, liveness; any server "
          "with that service, moe-worker included); exit 0 when SERVING");
ABSL_FLAG(std::string, move, "",
          "placement: move the model's experts to this placement while it serves (ADDRESS=EXPERTS[@LAYERS];...)");

namespace {

int Fail(const absl::Status& status) {
  std::cerr << "moe-client: " << status << "\n";
  return 1;
}

absl::StatusOr<int> HiddenSize(moe::MoeClient& client) {
  auto metadata = client.ModelMetadata(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_model_version));
  if (!metadata.ok()) return metadata.status();
  if (metadata->inputs_size() != 1 || metadata->inputs(0).shape_size() != 2) {
    return absl::FailedPreconditionError("model input is not [T, hidden]");
  }
  return static_cast<int>(metadata->inputs(0).shape(1));
}

int Health(moe::MoeClient& client) {
  if (const std::string service = absl::GetFlag(FLAGS_service); !service.empty()) {
    auto status = client.CheckHealthService(service);
    if (!status.ok()) return Fail(status.status());
    std::cout << absl::StrFormat("grpc.health.v1 %s: %s\n", service, *status);
    return *status == "SERVING" ? 0 : 2;
  }
  auto health = client.CheckHealth();
  if (!health.ok()) return Fail(health.status());
  std::cout << absl::StrFormat("live: %s\nready: %s\ngrpc.health.v1 readiness: %s\n", health->live ? "true" : "false",
                               health->ready ? "true" : "false", health->health_readiness);
  return health->ready ? 0 : 2;
}

int Metadata(moe::MoeClient& client) {
  auto server = client.ServerMetadata();
  if (!server.ok()) return Fail(server.status());
  std::cout << "server: " << server->ShortDebugString() << "\n";
  auto model = client.ModelMetadata(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_model_version));
  if (!model.ok()) return Fail(model.status());
  std::cout << "model: " << model->ShortDebugString() << "\n";
  auto config = client.ModelConfig(absl::GetFlag(FLAGS_model), absl::GetFlag(FLAGS_model_version));
  if (!config.ok()) return Fail(config.status());
  std::cout << "config: " << config->config().ShortDebugString() << "\n";
  return 0;
}

int Infer(moe::MoeClient& client) {
  auto hidden = HiddenSize(client);
  if (!hidden.ok()) return Fail(hidden.status());
  moe::NpyArray input;
  if (!absl::GetFlag(FLAGS_input).empty()) {
    auto read = moe::ReadNpy(absl::GetFlag(FLAGS_input));
    if (!read.ok()) return Fail(read.status());
    input = *std::move(read);
    if (input.shape.size() != 2) return Fail(absl::InvalidArgumentError("input must be 2-D [T, hidden]"));
  } else {
    input.shape = {absl::GetFlag(FLAGS_tokens), *hidden};
    input.values.resize(static_cast<size_t>(input.shape[0] * input.shape[1]));
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (float& v : input.values) v = normal(rng);
  }
  auto result = client.Infer({.model = absl::GetFlag(FLAGS_model),
                              .version = absl::GetFlag(FLAGS_model_version),
                              .input = input.values.data(),
                              .tokens = static_cast<int>(input.shape[0]),
                              .hidden = static_cast<int>(input.shape[1]),
                              .return_routing = absl::GetFlag(FLAGS_routing),
                              .layer = absl::GetFlag(FLAGS_layer)});
  if (!result.ok()) return Fail(result.status());
  const auto& out = result->outputs[0];
  std::cout << absl::StrFormat("output [%d, %d]: %.5f %.5f %.5f %.5f ...\n", input.shape[0], input.shape[1], out[0],
                               out[1], out[2], out[3]);
  if (!result->expert_ids.empty()) {
    const int64_t layers = result->routing_shape[1], slots = result->routing_shape[2];
    for (int64_t t = 0; t < input.shape[0]; ++t) {
      std::cout << "token " << t << ":";
      for (int64_t l = 0; l < layers; ++l) {
        std::cout << " layer " << l << " ->";
        for (int64_t s = 0; s < slots; ++s) {
          const size_t i = static_cast<size_t>((t * layers + l) * slots + s);
          if (result->expert_ids[i] >= 0)
            std::cout << absl::StrFormat(" e%d(%.3f)", result->expert_ids[i], result->expert_weights[i]);
        }
      }
      std::cout << "\n";
    }
  }
  if (!absl::GetFlag(FLAGS_output).empty()) {
    auto written = moe::WriteNpy(absl::GetFlag(FLAGS_output), {input.shape, out});
    if (!written.ok()) return Fail(written);
  }
  return 0;
}

int Bench(moe::MoeClient& client) {
  auto hidden = HiddenSize(client);
  if (!hidden.ok()) return Fail(hidden.status());
  moe::LoadOptions options{.model = absl::GetFlag(FLAGS_model),
                           .hidden = *hidden,
                           .tokens = absl::GetFlag(FLAGS_tokens),
                           .concurrency = absl::GetFlag(FLAGS_concurrency),
                           .rate = absl::GetFlag(FLAGS_rate),
                           .duration = absl::Seconds(absl::GetFlag(FLAGS_duration_s)),
                           .requests = absl::GetFlag(FLAGS_requests),
                           .progress = [](const std::string& line) { std::cerr << "\r" << line << std::flush; }};
  const moe::LoadReport report = moe::RunLoad(client, options);
  std::cerr << "\n";
  std::cout << (absl::GetFlag(FLAGS_json) ? report.ToJson() : report.ToText()) << "\n";
  return report.errors == 0 ? 0 : 3;
}

int Top() {
  const std::string url = absl::GetFlag(FLAGS_metrics);
  const absl::Duration interval = absl::Seconds(absl::GetFlag(FLAGS_interval_s));
  std::vector<moe::MetricSample> previous;
  absl::Time previous_time;
  for (int screen = 0; absl::GetFlag(FLAGS_iterations) == 0 || screen < absl::GetFlag(FLAGS_iterations); ++screen) {
    auto text = moe::HttpGet(url);
    if (!text.ok()) return Fail(text.status());
    auto samples = moe::ParseMetricsText(*text);
    if (!samples.ok()) return Fail(samples.status());
    const absl::Time now = absl::Now();
    const std::string view = moe::RenderTop(*samples, previous, absl::ToDoubleSeconds(now - previous_time),
                                            {.model = absl::GetFlag(FLAGS_model)});
    std::cout << "\033[H\033[2J" << view << std::flush;  // home + clear: fine over ssh in any terminal
    previous = *std::move(samples);
    previous_time = now;
    absl::SleepFor(interval);
  }
  return 0;
}

void PrintPlacement(const moe::admin::PlacementResponse& placement) {
  for (const moe::admin::WorkerState& worker : placement.workers()) {
    std::cout << absl::StrFormat("%-24s %-5s %s\n", worker.address(), worker.up() ? "up" : "DOWN", worker.summary());
  }
}

// Proposes replicas for hot experts, and moves to them with --apply.
int Propose(moe::admin::PlacementAdmin::Stub& stub) {
  grpc::ClientContext context;
  moe::admin::ProposePlacementRequest request;
  request.set_model(absl::GetFlag(FLAGS_model));
  request.set_version(absl::GetFlag(FLAGS_model_version));
  request.set_hot_factor(absl::GetFlag(FLAGS_hot_factor));
  request.set_apply(absl::GetFlag(FLAGS_apply));
  moe::admin::ProposePlacementResponse response;
  const grpc::Status status = stub.ProposePlacement(&context, request, &response);
  if (!status.ok()) return Fail(moe::FromGrpcStatus(status));
  for (int layer = 0; layer < response.imbalance_before_size(); ++layer) {
    std::cout << absl::StrFormat("layer %d: worker load max/mean %.3f -> %.3f\n", layer,
                                 response.imbalance_before(layer), response.imbalance_after(layer));
  }
  for (const std::string& change : response.changes()) std::cout << change << "\n";
  std::cout << "--move='" << response.workers_text() << "'\n";
  if (response.has_applied()) PrintPlacement(response.applied().placement());
  return 0;
}

// Shows where the model's experts run, moves them (--move), or proposes
// replicas (--propose).
int Placement(moe::MoeClient& client) {
  auto stub = moe::admin::PlacementAdmin::NewStub(client.channel());
  if (absl::GetFlag(FLAGS_propose)) return Propose(*stub);
  grpc::ClientContext context;
  const std::string move = absl::GetFlag(FLAGS_move);
  if (move.empty()) {
    moe::admin::GetPlacementRequest request;
    request.set_model(absl::GetFlag(FLAGS_model));
    request.set_version(absl::GetFlag(FLAGS_model_version));
    moe::admin::PlacementResponse response;
    const grpc::Status status = stub->GetPlacement(&context, request, &response);
    if (!status.ok()) return Fail(moe::FromGrpcStatus(status));
    PrintPlacement(response);
    return 0;
  }
  moe::admin::SetPlacementRequest request;
  request.set_model(absl::GetFlag(FLAGS_model));
  request.set_version(absl::GetFlag(FLAGS_model_version));
  request.set_workers_text(move);
  moe::admin::SetPlacementResponse response;
  const grpc::Status status = stub->SetPlacement(&context, request, &response);
  if (!status.ok()) return Fail(moe::FromGrpcStatus(status));
  std::cout << absl::StrFormat("moved: load %.3f s, switch %.3f s, release %.3f s\n", response.load_seconds(),
                               response.switch_seconds(), response.release_seconds());
  PrintPlacement(response.placement());
  return 0;
}

// The client's options from --token or --token_file and the TLS flags.
absl::StatusOr<moe::MoeClient::Options> ClientOptions() {
  moe::MoeClient::Options options;
  options.tls = absl::GetFlag(FLAGS_tls);
  auto with_tls = moe::MoeClient::WithTlsFiles(options, absl::GetFlag(FLAGS_tls_ca), absl::GetFlag(FLAGS_tls_cert),
                                               absl::GetFlag(FLAGS_tls_key));
  if (!with_tls.ok()) return with_tls.status();
  options = *std::move(with_tls);
  options.token = absl::GetFlag(FLAGS_token);
  const std::string token_file = absl::GetFlag(FLAGS_token_file);
  if (token_file.empty()) return options;
  if (!options.token.empty()) return absl::InvalidArgumentError("give --token or --token_file, not both");
  std::ifstream in(token_file);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --token_file '", token_file, "'"));
  std::getline(in, options.token);
  options.token = std::string(absl::StripAsciiWhitespace(options.token));
  if (options.token.empty())
    return absl::InvalidArgumentError(absl::StrCat("--token_file '", token_file, "' is empty"));
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("moe-client health|metadata|infer|bench|top|placement [flags]");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::cerr
        << "usage: moe-client health|metadata|infer|bench|top|placement [--server=host:port] [--model=NAME] ...\n";
    return 64;
  }
  auto options = ClientOptions();
  if (!options.ok()) return Fail(options.status());
  moe::MoeClient client(absl::GetFlag(FLAGS_server), *options);
  const std::string command = args[1];
  if (command == "health") return Health(client);
  if (command == "metadata") return Metadata(client);
  if (command == "infer") return Infer(client);
  if (command == "bench") return Bench(client);
  if (command == "top") return Top();
  if (command == "placement") return Placement(client);
  std::cerr << "moe-client: unknown command '" << command << "'\n";
  return 64;
}
