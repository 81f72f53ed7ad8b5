// WorkerHealth: what the front end says of its expert workers outside
// metrics. Each worker's state goes to the standard gRPC health service
// under the service name "worker/ADDRESS" (SERVING while up, NOT_SERVING
// while down), so that `grpc_health_probe -service=worker/10.0.0.5:8101`
// and Kubernetes see it, and each change is one line on stderr. Everything
// is also handed on to an inner observer (metrics), if any.
//
// Thread-safe. The health service is attached once the gRPC server runs;
// states seen before are applied then. The inner observer is borrowed.
#ifndef MOE_SERVER_FRONTEND_WORKER_HEALTH_H_
#define MOE_SERVER_FRONTEND_WORKER_HEALTH_H_

#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/health_check_service_interface.h"
#include "remote/remote_experts.h"

namespace moe {

class WorkerHealth : public WorkerObserver {
 public:
  WorkerHealth(std::string model, WorkerObserver* inner) : model_(std::move(model)), inner_(inner) {}

  // From now on, states go to `health` (not owned; must outlive this).
  void Attach(grpc::HealthCheckServiceInterface* health) ABSL_LOCKS_EXCLUDED(mu_);

  void OnPlacement(std::span<const PlacedWorker> workers) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnCall(const WorkerCall& call) override;
  void OnRetry(int from_worker, int to_worker) override;
  void OnWorkerUp(int worker, bool up) override ABSL_LOCKS_EXCLUDED(mu_);

  // "worker/ADDRESS".
  static std::string ServiceName(const std::string& address) { return "worker/" + address; }

 private:
  void Publish(const std::string& address, bool up) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string model_;
  WorkerObserver* const inner_;
  absl::Mutex mu_;
  grpc::HealthCheckServiceInterface* health_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::map<int, std::string> addresses_ ABSL_GUARDED_BY(mu_);  // by worker id
  std::map<std::string, bool> up_ ABSL_GUARDED_BY(mu_);        // by address
};

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_WORKER_HEALTH_H_
