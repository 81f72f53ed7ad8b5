#include "server/worker/expert_worker.h"

#include "absl/strings/str_cat.h"
#include "engine/api/executor_factory.h"
#include "engine/api/moe_model.h"
#include "engine/api/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

namespace moe {

absl::StatusOr<std::unique_ptr<ExpertWorker>> ExpertWorker::Create(const ModelDefinition& model,
                                                                   const Options& options) {
  auto worker = std::unique_ptr<ExpertWorker>(new ExpertWorker());
  worker->options_ = options;
  worker->model_ = model;
  const int num_layers = static_cast<int>(model.layers.size());
  ASSIGN_OR_RETURN(const ExpertSet held,
                   ParseExpertSet(options.experts, options.layers, num_layers, model.spec.router.num_experts));
  ASSIGN_OR_RETURN(std::shared_ptr<const LayerExecutor> executor, worker->Pack(held));
  worker->service_ = std::make_unique<ExpertWorkerService>(
      std::move(executor), model.spec, num_layers, [w = worker.get()](const ExpertSet& set) { return w->Pack(set); },
      options.observer);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(
      options.address, options.credentials ? options.credentials : grpc::InsecureServerCredentials(), &worker->port_);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // A layer's rows from a front end can be large (see remote/worker_link.cc).
  builder.SetMaxReceiveMessageSize(-1);
  builder.SetMaxSendMessageSize(-1);
  builder.RegisterService(worker->service_.get());
  worker->server_ = builder.BuildAndStart();
  if (!worker->server_ || worker->port_ == 0) {
    worker->stopped_ = true;
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.address));
  }
  worker->server_->GetHealthCheckService()->SetServingStatus("", true);
  worker->server_->GetHealthCheckService()->SetServingStatus("readiness", true);
  // As the front end's: SERVING for as long as the process serves, draining
  // included, so that a liveness probe never restarts a worker that drains.
  worker->server_->GetHealthCheckService()->SetServingStatus("liveness", true);
  return worker;
}

absl::StatusOr<std::shared_ptr<const LayerExecutor>> ExpertWorker::Pack(const ExpertSet& held) const {
  ASSIGN_OR_RETURN(
      std::unique_ptr<LayerExecutor> executor,
      CreateExecutor(model_, {.kind = options_.executor,
                              .compute = MoeModel::ComputeDType(model_.spec, {.force_fp32 = options_.force_fp32}),
                              .cpu_path = options_.cpu_path,
                              .device_index = options_.device_index,
                              .held = held,
                              .offload = nullptr}));
  return std::shared_ptr<const LayerExecutor>(std::move(executor));
}

ExpertWorker::~ExpertWorker() { Shutdown(); }

void ExpertWorker::Shutdown() {
  // A worker whose creation failed before it listened has nothing to stop.
  if (stopped_ || !server_) return;
  stopped_ = true;
  server_->GetHealthCheckService()->SetServingStatus("", false);
  server_->GetHealthCheckService()->SetServingStatus("readiness", false);
  service_->Drain();
  server_->Shutdown(absl::ToChronoTime(absl::Now() + options_.grace_period));
  server_->Wait();
}

}  // namespace moe
