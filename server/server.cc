#include "server/server.h"

#include "absl/strings/str_cat.h"
#include "engine/status_macros.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"

namespace moe {
namespace {

// Health service names: "" and "readiness" follow readiness, "liveness" is
// SERVING while the process runs.
constexpr const char* kReadinessServices[] = {"", "readiness"};
constexpr char kLivenessService[] = "liveness";

}  // namespace

absl::StatusOr<std::unique_ptr<MoeServer>> MoeServer::Create(const Options& options) {
  auto server = std::unique_ptr<MoeServer>(new MoeServer());
  server->options_ = options;
  ASSIGN_OR_RETURN(server->registry_, ModelRegistry::Create(options.models, options.engine_observers));
  ASSIGN_OR_RETURN(server->scheduler_, BatchScheduler::Create({.num_threads = options.batch_threads,
                                                               .observer = options.scheduler_observer}));
  for (const auto& model : server->registry_->models()) {
    const auto& batching = model->config.dynamic_batching();
    BatchQueue::Options queue{
        .max_batch_tokens = options.max_batch_tokens > 0 ? options.max_batch_tokens : model->config.max_batch_size(),
        .max_queue_delay = absl::Microseconds(options.max_queue_delay_us >= 0
                                                  ? options.max_queue_delay_us
                                                  : static_cast<int64_t>(batching.max_queue_delay_microseconds())),
        .max_queue_size = options.max_queue_size > 0
                              ? options.max_queue_size
                              : static_cast<int>(batching.default_queue_policy().max_queue_size())};
    if (options.max_batch_tokens > 0) model->config.set_max_batch_size(static_cast<int>(options.max_batch_tokens));
    ASSIGN_OR_RETURN(int index, server->scheduler_->AddModel(model->model.get(), queue));
    (void)index;
  }
  server->service_ = std::make_unique<InferenceService>(server->registry_.get(), server->scheduler_.get(),
                                                        &server->draining_, options.request_observer);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.grpc_address, grpc::InsecureServerCredentials(), &server->port_);
  builder.RegisterService(server->service_.get());
  builder.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  builder.SetMaxSendMessageSize(-1);
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || server->port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.grpc_address));
  }
  auto* health = server->server_->GetHealthCheckService();
  for (const char* service : kReadinessServices) health->SetServingStatus(service, true);
  health->SetServingStatus(kLivenessService, true);
  return server;
}

bool MoeServer::Shutdown() {
  if (stopped_.exchange(true)) return true;
  draining_.store(true);
  auto* health = server_->GetHealthCheckService();
  for (const char* service : kReadinessServices) health->SetServingStatus(service, false);
  const absl::Time deadline = absl::Now() + options_.grace_period;
  const bool drained = scheduler_->Drain(deadline);
  // Lets RPCs that are answering finish, then cancels what remains.
  server_->Shutdown(absl::ToChronoTime(std::max(deadline, absl::Now() + absl::Milliseconds(100))));
  return drained;
}

MoeServer::~MoeServer() {
  Shutdown();
  server_->Wait();
}

}  // namespace moe
