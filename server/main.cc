// moe-serve: serves MoE models over the Open Inference Protocol (gRPC).
//
//   moe-serve                                 # the built-in demo model
//   moe-serve --model_repository=models       # every model of a Triton-style repository
//   moe-serve --model=/ckpt/Mixtral-8x7B      # one Hugging Face checkpoint
//
// Whatever stops it before it serves (a model that does not load, a port in
// use, a bad flag value) is one line on stderr, "moe-serve: <cause>", and
// exit status 1. Flags that do not parse are reported by Abseil's parser
// ("ERROR: ..."), also with status 1.
#include <csignal>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "engine/api/cpu_path.h"
#include "engine/api/executor_factory.h"
#include "remote/worker_link.h"
#include "server/metrics/metrics.h"
#include "server/models/placement.h"
#include "server/server.h"

ABSL_FLAG(std::string, model_repository, "", "Triton-style model repository directory");
ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory to serve");
ABSL_FLAG(std::string, model_name, "", "served name for --model (default: its directory name)");
ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, grpc_port, 8001, "gRPC port (0: any free port)");
ABSL_FLAG(bool, reuse_grpc_port, false,
          "let other processes listen on the gRPC port too (SO_REUSEPORT); without it a port in use is an error");
ABSL_FLAG(int64_t, max_batch_tokens, 0, "tokens per executed batch (0: each model's max_batch_size)");
ABSL_FLAG(int64_t, max_queue_delay_us, -1, "how long a request may wait for a batch to fill (-1: each model's config)");
ABSL_FLAG(int, max_queue_size, 0, "queued requests per model before UNAVAILABLE (0: each model's config)");
ABSL_FLAG(int, batch_threads, 1, "batch threads shared by all models");
ABSL_FLAG(int, max_message_mb, 256,
          "largest gRPC message, MiB, both ways: a larger request, or an inference answer that would be larger, is "
          "RESOURCE_EXHAUSTED");
ABSL_FLAG(int64_t, max_request_tokens, 4096,
          "tokens one inference request may carry, besides each model's max_batch_size (0: only max_batch_size)");
ABSL_FLAG(int, max_concurrent_streams, 256,
          "gRPC calls open at once on one client connection (HTTP/2 streams); further calls wait for a free one");
ABSL_FLAG(int, max_inflight_per_connection, 512,
          "inference requests in flight at once from one client connection, unary and streamed together; one more "
          "is RESOURCE_EXHAUSTED (0: no limit)");
ABSL_FLAG(double, grace_period_s, 30, "seconds shutdown waits for in-flight requests");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain for TLS on the gRPC port (with --tls_key; read again when it changes; the metrics "
          "port stays plaintext)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle: with it, clients must present a certificate this CA signed (mutual TLS)");
ABSL_FLAG(std::string, worker_tls_ca, "",
          "with --workers or placed models: TLS to the moe-workers, whose certificates must chain to this PEM CA "
          "bundle");
ABSL_FLAG(std::string, worker_tls_cert, "",
          "PEM certificate chain the front end presents to moe-workers started with --tls_ca (with --worker_tls_key)");
ABSL_FLAG(std::string, worker_tls_key, "", "PEM private key of --worker_tls_cert");
ABSL_FLAG(std::string, auth_token_file, "",
          "bearer tokens, one per line, that the inference and placement RPCs require ('authorization: Bearer "
          "<token>' metadata); read again within a second of a change; the health service stays open (empty: no "
          "authentication)");
ABSL_FLAG(bool, fp32, false, "compute every model in fp32");
ABSL_FLAG(std::string, cpu_path, "auto",
          "CPU kernels for models whose config leaves them auto: auto (MOE_CPU_PATH if set, else the widest this CPU "
          "runs), avx512, avx2 or portable");
ABSL_FLAG(std::string, device, "cpu",
          "where models run unless their config says: cpu, or cuda[:N] for GPU N (a build with CUDA)");
ABSL_FLAG(std::string, workers, "",
          "routed experts on moe-worker processes, for models whose config places none: "
          "ADDRESS=EXPERTS[@LAYERS] items separated by ';', e.g. 10.0.0.5:8101=0-3;10.0.0.6:8101=4-7");
ABSL_FLAG(int, worker_deadline_ms, 0,
          "with --workers: how long a worker may take to answer a layer's rows before it counts as down (0: 5000)");
ABSL_FLAG(bool, worker_fallback_local, false,
          "with --workers: keep their experts here too, and run them here when no worker holding them is up");
ABSL_FLAG(int, metrics_port, 8002, "Prometheus /metrics port (0: any free port, -1: no metrics endpoint)");
ABSL_FLAG(std::string, expert_latency_metrics, "full",
          "per-expert compute latency histograms: full, coarse (3 buckets) or off (token counters stay)");

namespace {

// Reports why the server cannot start: one line, then exit status 1.
int Fail(absl::string_view message) {
  std::string line(message);
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::cerr << "moe-serve: " << line << std::endl;
  return 1;
}

// The flags that must hold before anything starts; empty when they do.
std::string CheckFlags(const std::vector<char*>& positional) {
  if (positional.size() > 1) {
    return absl::StrCat("unexpected argument '", positional[1], "' (flags are --name=value; --help lists them)");
  }
  const int grpc_port = absl::GetFlag(FLAGS_grpc_port);
  if (grpc_port < 0 || grpc_port > 65535) return absl::StrCat("--grpc_port must be in [0, 65535], got ", grpc_port);
  const int metrics_port = absl::GetFlag(FLAGS_metrics_port);
  if (metrics_port < -1 || metrics_port > 65535) {
    return absl::StrCat("--metrics_port must be in [-1, 65535], got ", metrics_port);
  }
  const int max_message_mb = absl::GetFlag(FLAGS_max_message_mb);
  if (max_message_mb < 1 || max_message_mb > 2047) {
    return absl::StrCat("--max_message_mb must be in [1, 2047], got ", max_message_mb);
  }
  const double grace_period_s = absl::GetFlag(FLAGS_grace_period_s);
  if (!(grace_period_s >= 0)) return absl::StrCat("--grace_period_s must be >= 0, got ", grace_period_s);
  if (absl::GetFlag(FLAGS_host).empty()) return "--host is empty";
  return "";
}

// "avx512, avx2, portable": the kernel paths this CPU runs for bf16 compute.
std::string SupportedPathNames() {
  std::string names;
  for (moe::CpuPath path : moe::SupportedCpuPaths(moe::DType::kBF16)) {
    absl::StrAppend(&names, names.empty() ? "" : ", ", moe::CpuPathName(path));
  }
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Serves MoE models over the Open Inference Protocol (gRPC).");
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (const std::string error = CheckFlags(positional); !error.empty()) return Fail(error);
  // Signals are taken by sigwait below, not by whichever thread they hit.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  moe::MoeServer::Options options;
  options.grpc_address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_grpc_port));
  options.reuse_grpc_port = absl::GetFlag(FLAGS_reuse_grpc_port);
  options.models.model_repository = absl::GetFlag(FLAGS_model_repository);
  options.models.model_path = absl::GetFlag(FLAGS_model);
  options.models.model_name = absl::GetFlag(FLAGS_model_name);
  options.models.force_fp32 = absl::GetFlag(FLAGS_fp32);
  auto cpu_path = moe::ParseCpuPath(absl::GetFlag(FLAGS_cpu_path));
  if (!cpu_path.ok()) return Fail(absl::StrCat("--cpu_path: ", cpu_path.status().message()));
  options.models.cpu_path = *cpu_path;
  auto device = moe::ParseExecutorDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return Fail(absl::StrCat("--device: ", device.status().message()));
  options.models.executor = device->kind;
  options.models.device_index = device->index;
  const moe::TlsFiles worker_tls{.cert_file = absl::GetFlag(FLAGS_worker_tls_cert),
                                 .key_file = absl::GetFlag(FLAGS_worker_tls_key),
                                 .ca_file = absl::GetFlag(FLAGS_worker_tls_ca)};
  if (!worker_tls.ca_file.empty() || !worker_tls.cert_file.empty() || !worker_tls.key_file.empty()) {
    auto credentials = moe::ChannelCredentialsFor(worker_tls);
    if (!credentials.ok()) return Fail(absl::StrCat("--worker_tls_*: ", credentials.status().message()));
    moe::SetWorkerChannelCredentials(*std::move(credentials));
  }
  auto workers = moe::ParseWorkersFlag(absl::GetFlag(FLAGS_workers));
  if (!workers.ok()) return Fail(absl::StrCat("--workers: ", workers.status().message()));
  options.models.workers = *std::move(workers);
  options.models.worker_fallback_local = absl::GetFlag(FLAGS_worker_fallback_local);
  options.models.worker_deadline_ms = absl::GetFlag(FLAGS_worker_deadline_ms);
  options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  options.max_queue_delay_us = absl::GetFlag(FLAGS_max_queue_delay_us);
  options.max_queue_size = absl::GetFlag(FLAGS_max_queue_size);
  options.batch_threads = absl::GetFlag(FLAGS_batch_threads);
  options.max_receive_message_bytes = absl::GetFlag(FLAGS_max_message_mb) << 20;
  options.max_send_message_bytes = options.max_receive_message_bytes;
  options.max_request_tokens = absl::GetFlag(FLAGS_max_request_tokens);
  options.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.max_inflight_per_connection = absl::GetFlag(FLAGS_max_inflight_per_connection);
  options.grace_period = absl::Seconds(absl::GetFlag(FLAGS_grace_period_s));
  options.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);
  options.tls = {.cert_file = absl::GetFlag(FLAGS_tls_cert),
                 .key_file = absl::GetFlag(FLAGS_tls_key),
                 .ca_file = absl::GetFlag(FLAGS_tls_ca)};
  auto expert_latency = moe::ParseExpertLatencyMetrics(absl::GetFlag(FLAGS_expert_latency_metrics));
  if (!expert_latency.ok()) {
    return Fail(absl::StrCat("--expert_latency_metrics: ", expert_latency.status().message()));
  }
  const int metrics_port = absl::GetFlag(FLAGS_metrics_port);
  auto metrics = moe::ServerMetrics::Create(
      {.listen_address = metrics_port < 0 ? "" : absl::StrCat(absl::GetFlag(FLAGS_host), ":", metrics_port),
       .expert_latency = *expert_latency});
  if (!metrics.ok()) return Fail(metrics.status().message());
  options.engine_observers = [&metrics](int model_index, const std::string& name, int64_t version,
                                        const moe::ModelDefinition& definition) {
    return (*metrics)->AddModel(model_index, name, version, definition);
  };
  options.worker_observers = [&metrics](const std::string& name, int64_t version) {
    return (*metrics)->AddWorkers(name, version);
  };
  options.expert_load = [&metrics](int model_index) { return (*metrics)->ExpertLoad(model_index); };
  options.scheduler_observer = metrics->get();
  options.request_observer = metrics->get();
  auto server = moe::MoeServer::Create(options);
  if (!server.ok()) return Fail(server.status().message());
  std::cout << "moe-serve: kernel paths this CPU runs for bf16: " << SupportedPathNames() << std::endl;
  for (const auto& model : (*server)->registry().models()) {
    const moe::ModelSpec& spec = model->model->spec();
    std::cout << "moe-serve: model '" << model->name << "' version " << model->version << " (" << spec.source_type
              << ", " << model->model->num_layers() << " MoE layers, " << spec.router.num_experts << " experts, "
              << model->model->executor().Describe() << ")" << std::endl;
    if (model->remote) {
      std::string addresses;
      for (const moe::PlacedWorker& worker : model->remote->placement()) {
        absl::StrAppend(&addresses, addresses.empty() ? "" : ", ", worker.address);
      }
      std::cout << "moe-serve: model '" << model->name << "' sends " << model->remote->hosted().Summary()
                << " to workers " << addresses << std::endl;
    }
  }
  std::cout << "moe-serve: " << moe::CpuExecutorThreads() << " engine threads" << std::endl;
  if (metrics_port < 0) {
    std::cout << "moe-serve: no metrics endpoint (--metrics_port=-1)" << std::endl;
  } else {
    std::cout << "moe-serve: metrics on port " << (*metrics)->port() << " at /metrics" << std::endl;
  }
  std::cout << "moe-serve: listening on gRPC port " << (*server)->port() << std::endl;
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::cout << "moe-serve: signal " << signal_number << ", draining" << std::endl;
  const bool drained = (*server)->Shutdown();
  server->reset();  // before the metrics it reports to
  std::cout << "moe-serve: " << (drained ? "drained, exiting" : "grace period over, exiting") << std::endl;
  return 0;
}
