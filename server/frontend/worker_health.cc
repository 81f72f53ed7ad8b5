#include "server/frontend/worker_health.h"

#include <iostream>

namespace moe {

void WorkerHealth::Attach(grpc::HealthCheckServiceInterface* health) {
  absl::MutexLock lock(&mu_);
  health_ = health;
  for (const auto& [address, up] : up_) Publish(address, up);
}

void WorkerHealth::Publish(const std::string& address, bool up) {
  if (health_) health_->SetServingStatus(ServiceName(address), up);
}

void WorkerHealth::OnPlacement(std::span<const PlacedWorker> workers) {
  {
    absl::MutexLock lock(&mu_);
    for (const PlacedWorker& worker : workers) {
      addresses_[worker.id] = worker.address;
      if (up_.emplace(worker.address, true).second) Publish(worker.address, true);
    }
  }
  if (inner_) inner_->OnPlacement(workers);
}

void WorkerHealth::OnCall(const WorkerCall& call) {
  if (inner_) inner_->OnCall(call);
}

void WorkerHealth::OnRetry(int from_worker, int to_worker) {
  if (inner_) inner_->OnRetry(from_worker, to_worker);
}

void WorkerHealth::OnWorkerUp(int worker, bool up) {
  {
    absl::MutexLock lock(&mu_);
    const std::string& address = addresses_[worker];
    up_[address] = up;
    Publish(address, up);
    std::cerr << "moe-serve: model '" << model_ << "': worker " << address
              << (up ? " is back" : " is down; its experts go to replicas") << std::endl;
  }
  if (inner_) inner_->OnWorkerUp(worker, up);
}

}  // namespace moe
