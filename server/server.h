// MoeServer: the moe-serve process's parts put together: models, the batch
// scheduler, the inference service, the placement admin service (experts on
// workers), the standard gRPC health service (services "", "readiness" and
// "liveness") and server reflection.
//
// Create either returns a serving server or a Status naming what failed
// (a model that does not load, an address that cannot be bound, a bad
// option); whatever it had built by then is taken down again.
//
// Shutdown is graceful and bounded by the grace period: readiness goes
// NOT_SERVING first, new inference requests get UNAVAILABLE, queued and
// running requests finish and their answers are sent; at the end of the
// grace period requests that have not started get UNAVAILABLE instead. Only
// a batch already running when the period ends can hold it longer. Then the
// gRPC server stops, closing idle connections and open streams.
// Thread-safe.
#ifndef MOE_SERVER_SERVER_H_
#define MOE_SERVER_SERVER_H_

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/server.h"
#include "server/batching/batch_scheduler.h"
#include "server/frontend/inference_service.h"
#include "server/frontend/placement_admin.h"
#include "server/frontend/tls_credentials.h"
#include "server/frontend/token_auth.h"
#include "server/frontend/worker_health.h"
#include "server/models/model_registry.h"

namespace moe {

class MoeServer {
 public:
  struct Options {
    // gRPC listening address; port 0 picks a free port. Triton's default port.
    std::string grpc_address = "0.0.0.0:8001";
    ModelRegistry::Options models{};
    // Batching overrides for every model; 0 keeps each model's config. They
    // go into models.batching_override (replacing what it sets), so that the
    // configs the ModelConfig RPC reports are the ones batches run with.
    int64_t max_batch_tokens = 0;     // at most 2^31 - 1 (a config's max_batch_size)
    int64_t max_queue_delay_us = -1;  // -1 keeps the config's
    int max_queue_size = 0;
    // Batch threads (see BatchScheduler::Options). 1.
    int batch_threads = 1;
    // Largest request message accepted; larger ones get RESOURCE_EXHAUSTED. 256 MiB.
    int max_receive_message_bytes = 256 << 20;
    // Largest response message sent; an inference answer that would be
    // larger is RESOURCE_EXHAUSTED instead. 256 MiB.
    int max_send_message_bytes = 256 << 20;
    // Tokens one inference request may carry (besides each model's
    // max_batch_size); above, INVALID_ARGUMENT. 0: only max_batch_size. 4096.
    int64_t max_request_tokens = 4096;
    // HTTP/2 streams (calls) open at once on one client connection; a client
    // waits for a free one before starting another call. 256.
    int max_concurrent_streams = 256;
    // Inference requests in flight at once from one client connection (unary
    // calls and streamed requests together); one more is RESOURCE_EXHAUSTED.
    // 0: no limit. 512.
    int max_inflight_per_connection = 512;
    // Bearer tokens, one per line, that every RPC of the inference and
    // placement admin services requires (see TokenAuthenticator); the
    // health service stays open. Empty: no authentication.
    std::string auth_token_file{};
    // TLS on the gRPC port (mutual with a CA), files watched for rotation:
    // see TlsFiles. Empty: plaintext. The metrics port is unaffected.
    TlsFiles tls{};
    // How long shutdown waits for queued and running requests. 30 s.
    absl::Duration grace_period = absl::Seconds(30);
    // Let other processes listen on the same gRPC port (SO_REUSEPORT), the
    // kernel spreading connections between them. False: a port that another
    // process already listens on fails Create.
    bool reuse_grpc_port = false;
    // Optional observers (not owned).
    ObserverFactory engine_observers{};
    WorkerObserverFactory worker_observers{};
    // The measured expert load, for the placement planner; may be empty.
    PlacementAdminService::LoadSource expert_load{};
    SchedulerObserver* scheduler_observer = nullptr;
    RequestObserver* request_observer = nullptr;
  };

  // Validates `options`, loads the models and starts serving. Errors:
  // INVALID_ARGUMENT for a bad option, the loader's code (NOT_FOUND,
  // INVALID_ARGUMENT, ...) for a model that does not load, UNAVAILABLE when
  // the address cannot be bound; each message names its cause.
  static absl::StatusOr<std::unique_ptr<MoeServer>> Create(const Options& options);
  // Shuts down (see Shutdown) and waits for the gRPC server to stop.
  ~MoeServer();

  // The bound gRPC port.
  int port() const { return port_; }
  // Drains and stops (idempotent; a second call returns true at once).
  // Returns whether every request ran within the grace period.
  bool Shutdown();
  bool draining() const { return draining_.load(); }

  const ModelRegistry& registry() const { return *registry_; }
  const BatchScheduler& scheduler() const { return *scheduler_; }
  // The index by which scheduler() knows `model` (one of registry().models()),
  // for BatchesExecuted and QueueDepth. Observers know models by
  // ServedModel::index instead: the server translates.
  int SchedulerIndexOf(const ServedModel& model) const { return scheduler_index_[model.index]; }

 private:
  class SchedulerIndexMap;
  explicit MoeServer(const Options& options);
  // Create's steps, in order; any member may still be null when one fails,
  // and the destructor copes with that.
  absl::Status Start();

  const Options options_;
  std::atomic<bool> draining_{false};
  std::atomic<bool> stopped_{false};
  int port_ = 0;
  // One per model with workers; they report to the health service while it
  // runs. Declared before the registry, whose RemoteExperts report to them
  // until it goes.
  std::vector<std::unique_ptr<WorkerHealth>> worker_health_;
  std::unique_ptr<ModelRegistry> registry_;
  // Hands the scheduler's reports to options_.scheduler_observer by
  // ServedModel::index; null without that observer. Outlives the scheduler.
  std::unique_ptr<SchedulerIndexMap> scheduler_reports_;
  std::unique_ptr<BatchScheduler> scheduler_;
  // Per ServedModel::index, the scheduler's index for the model.
  std::vector<int> scheduler_index_;
  // Null without auth_token_file; outlives the services that borrow it.
  std::unique_ptr<TokenAuthenticator> authenticator_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<PlacementAdminService> admin_;

  std::unique_ptr<grpc::Server> server_;
};

}  // namespace moe

#endif  // MOE_SERVER_SERVER_H_
