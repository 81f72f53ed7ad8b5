// ExpertWorker: the moe-worker process's parts put together: a CPU executor
// holding the chosen routed experts of a model (the others are not packed),
// the ExpertWorkerService serving them, the standard gRPC health service
// ("" and "readiness" SERVING while it serves and not draining, "liveness"
// while the process serves, as moe-serve's) and reflection. It keeps the
// model's definition (mapped, not copied) to pack other experts when a
// front end moves some here (SetExperts).
//
// Create returns a serving worker or a Status naming what failed. Shutdown
// is graceful: readiness goes NOT_SERVING, streams end after the request at
// hand, and at the end of the grace period what is left is cut.
// Thread-safe.
#ifndef MOE_SERVER_WORKER_EXPERT_WORKER_H_
#define MOE_SERVER_WORKER_EXPERT_WORKER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/api/cpu_path.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "server/worker/expert_worker_service.h"

namespace moe {

class ExpertWorker {
 public:
  struct Options {
    // gRPC listening address; port 0 picks a free port.
    std::string address = "0.0.0.0:8101";
    // The routed experts to hold, as ParseExpertSet reads them ("0-3,7";
    // empty: all) in these layers ("" : all).
    std::string experts;
    std::string layers;
    // Compute in fp32 whatever the checkpoint dtype (as MoeModel::Options).
    bool force_fp32 = false;
    // The kernels' path (engine/api/cpu_path.h).
    CpuPath cpu_path = CpuPath::kAuto;
    // The executor kind and device that run the experts ("cpu", "cuda").
    std::string executor = "cpu";
    int device_index = 0;
    // How long Shutdown lets streams finish. 5 s.
    absl::Duration grace_period = absl::Seconds(5);
    // Hears of every request (metrics). Not owned; may be null.
    ExpertWorkerObserver* observer = nullptr;
    // The listening port's credentials (TLS, see moe-worker --tls_*). Null:
    // plaintext.
    std::shared_ptr<grpc::ServerCredentials> credentials{};
  };

  // Packs the held experts of `model` (kept: its tensors share the file
  // mapping) and starts serving them.
  static absl::StatusOr<std::unique_ptr<ExpertWorker>> Create(const ModelDefinition& model, const Options& options);
  ~ExpertWorker();

  int port() const { return port_; }
  // The executor serving now.
  std::shared_ptr<const LayerExecutor> executor() const { return service_->executor(); }
  const ExpertWorkerService& service() const { return *service_; }
  // Drains and stops; idempotent.
  void Shutdown();

 private:
  ExpertWorker() = default;

  // An executor holding `held` of the model.
  absl::StatusOr<std::shared_ptr<const LayerExecutor>> Pack(const ExpertSet& held) const;

  Options options_;
  ModelDefinition model_;
  std::unique_ptr<ExpertWorkerService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  bool stopped_ = false;
};

}  // namespace moe

#endif  // MOE_SERVER_WORKER_EXPERT_WORKER_H_
