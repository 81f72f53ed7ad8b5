// moe-worker: serves some routed experts of a model to moe-serve front ends
// (proto/expert_worker.proto). See server/worker/expert_worker.h.
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "engine/api/cpu_path.h"
#include "engine/api/executor_factory.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "engine/api/status_macros.h"
#include "server/frontend/tls_credentials.h"
#include "server/metrics/metrics.h"
#include "server/worker/expert_worker.h"

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (default: the built-in demo model)");
ABSL_FLAG(std::string, model_dir, "", "a model of a Triton-style repository (its directory); the latest version");
ABSL_FLAG(std::string, experts, "", "routed experts to hold, e.g. 0-3,7 (default: all)");
ABSL_FLAG(std::string, layers, "", "in these MoE layers, e.g. 0,2-5 (default: all)");
ABSL_FLAG(std::string, host, "0.0.0.0", "address to listen on");
ABSL_FLAG(int, port, 8101, "gRPC port (0: any free port)");
ABSL_FLAG(std::string, cpu_path, "auto", "CPU kernels: auto, avx512, avx2 or portable");
ABSL_FLAG(std::string, device, "cpu", "where the experts run: cpu, or cuda[:N] for GPU N (a build with CUDA)");
ABSL_FLAG(bool, force_fp32, false, "compute in fp32 whatever the checkpoint dtype");
ABSL_FLAG(double, grace_period_s, 5, "seconds SIGTERM lets streams finish");
ABSL_FLAG(int, metrics_port, 8103, "Prometheus /metrics port (0: any free port, -1: no metrics endpoint)");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain for TLS on the gRPC port (with --tls_key; read again when it changes)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle: with it, front ends must present a certificate this CA signed (mutual TLS)");

namespace {

int Fail(const std::string& message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::cerr << "moe-worker: " << line << std::endl;
  return 1;
}

// The model named by the flags: a checkpoint, a repository model, or the demo.
absl::StatusOr<moe::ModelDefinition> LoadModel() {
  const std::string checkpoint = absl::GetFlag(FLAGS_model);
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  if (!checkpoint.empty() && !model_dir.empty())
    return absl::InvalidArgumentError("give --model or --model_dir, not both");
  if (!checkpoint.empty()) return moe::LoadHuggingFaceModel(checkpoint);
  if (model_dir.empty()) return moe::DemoModel();
  const std::string config_path = (std::filesystem::path(model_dir) / "config.pbtxt").string();
  std::ifstream in(config_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", config_path));
  std::stringstream text;
  text << in.rdbuf();
  ASSIGN_OR_RETURN(const inference::ModelConfig config, moe::ParseModelConfig(text.str(), config_path));
  ASSIGN_OR_RETURN(const std::vector<int64_t> versions, moe::ListVersions(model_dir));
  if (versions.empty()) return absl::NotFoundError(absl::StrCat(model_dir, ": no version directory"));
  return moe::LoadRepositoryModel(model_dir, versions.back(), config);
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Serves some routed experts of an MoE model to moe-serve front ends.");
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) return Fail(absl::StrCat("unexpected argument '", positional[1], "'"));
  const int port = absl::GetFlag(FLAGS_port);
  if (port < 0 || port > 65535) return Fail(absl::StrCat("--port must be in [0, 65535], got ", port));
  const double grace_period_s = absl::GetFlag(FLAGS_grace_period_s);
  if (!(grace_period_s >= 0)) return Fail(absl::StrCat("--grace_period_s must be >= 0, got ", grace_period_s));
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto cpu_path = moe::ParseCpuPath(absl::GetFlag(FLAGS_cpu_path));
  if (!cpu_path.ok()) return Fail(absl::StrCat("--cpu_path: ", cpu_path.status().message()));
  auto device = moe::ParseExecutorDevice(absl::GetFlag(FLAGS_device));
  if (!device.ok()) return Fail(absl::StrCat("--device: ", device.status().message()));
  const int metrics_port = absl::GetFlag(FLAGS_metrics_port);
  if (metrics_port < -1 || metrics_port > 65535) {
    return Fail(absl::StrCat("--metrics_port must be in [-1, 65535], got ", metrics_port));
  }
  auto credentials = moe::ServerCredentialsFor({.cert_file = absl::GetFlag(FLAGS_tls_cert),
                                                .key_file = absl::GetFlag(FLAGS_tls_key),
                                                .ca_file = absl::GetFlag(FLAGS_tls_ca)});
  if (!credentials.ok()) return Fail(std::string(credentials.status().message()));
  absl::StatusOr<moe::ModelDefinition> model = LoadModel();
  if (!model.ok()) return Fail(std::string(model.status().message()));
  auto metrics = moe::ServerMetrics::Create(
      {.listen_address = metrics_port < 0 ? "" : absl::StrCat(absl::GetFlag(FLAGS_host), ":", metrics_port)});
  if (!metrics.ok()) return Fail(std::string(metrics.status().message()));
  moe::ExpertWorker::Options options{.address = absl::StrCat(absl::GetFlag(FLAGS_host), ":", port),
                                     .experts = absl::GetFlag(FLAGS_experts),
                                     .layers = absl::GetFlag(FLAGS_layers),
                                     .force_fp32 = absl::GetFlag(FLAGS_force_fp32),
                                     .cpu_path = *cpu_path,
                                     .executor = device->kind,
                                     .device_index = device->index,
                                     .grace_period = absl::Seconds(grace_period_s),
                                     .observer = (*metrics)->AddExpertWorker(model->spec.name),
                                     .credentials = *credentials};
  auto worker = moe::ExpertWorker::Create(*model, options);
  if (!worker.ok()) return Fail(std::string(worker.status().message()));
  std::cout << "moe-worker: model " << (*worker)->executor()->Describe() << std::endl;
  if (metrics_port >= 0)
    std::cout << "moe-worker: metrics on port " << (*metrics)->port() << " at /metrics" << std::endl;
  std::cout << "moe-worker: listening on gRPC port " << (*worker)->port() << std::endl;
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::cout << "moe-worker: signal " << signal_number << ", draining" << std::endl;
  (*worker)->Shutdown();
  worker->reset();  // before the metrics it reports to
  std::cout << "moe-worker: exiting" << std::endl;
  return 0;
}
