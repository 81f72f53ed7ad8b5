#include "server/frontend/placement_admin.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "proto/expert_worker.grpc.pb.h"
#include "remote/worker_link.h"
#include "server/frontend/grpc_status.h"
#include "server/models/placement.h"

namespace moe {
namespace {

double SecondsSince(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

}  // namespace

admin::PlacementResponse DescribePlacement(const RemoteExperts& remote) {
  admin::PlacementResponse response;
  const ExpertSet hosted = remote.hosted();
  response.set_num_layers(hosted.num_layers());
  response.set_num_experts(hosted.num_experts());
  for (const PlacedWorker& worker : remote.placement()) {
    admin::WorkerState* state = response.add_workers();
    state->set_address(worker.address);
    state->set_summary(worker.experts.Summary());
    state->set_held(worker.experts.Bytes());
    state->set_up(remote.link(worker.id).up());
  }
  return response;
}

absl::StatusOr<const ServedModel*> PlacementAdminService::PlacedModel(const std::string& model,
                                                                      const std::string& version) const {
  absl::StatusOr<const ServedModel*> served = registry_->Find(model, version);
  if (!served.ok()) return served.status();
  if (!(*served)->remote) {
    return absl::FailedPreconditionError(absl::StrCat("model '", model, "' has no experts on workers"));
  }
  return *served;
}

absl::Status PlacementAdminService::Authorize(const grpc::ServerContext& context) const {
  if (authenticator_ == nullptr) return absl::OkStatus();
  return authenticator_->Check(context.client_metadata());
}

grpc::Status PlacementAdminService::GetPlacement(grpc::ServerContext* context,
                                                 const admin::GetPlacementRequest* request,
                                                 admin::PlacementResponse* response) {
  if (absl::Status allowed = Authorize(*context); !allowed.ok()) return ToGrpcStatus(allowed);
  absl::StatusOr<const ServedModel*> served = PlacedModel(request->model(), request->version());
  if (!served.ok()) return ToGrpcStatus(served.status());
  *response = DescribePlacement(*(*served)->remote);
  return grpc::Status::OK;
}

grpc::Status PlacementAdminService::SetPlacement(grpc::ServerContext* context,
                                                 const admin::SetPlacementRequest* request,
                                                 admin::SetPlacementResponse* response) {
  if (absl::Status allowed = Authorize(*context); !allowed.ok()) return ToGrpcStatus(allowed);
  absl::StatusOr<const ServedModel*> served = PlacedModel(request->model(), request->version());
  if (!served.ok()) return ToGrpcStatus(served.status());
  RemoteExperts* remote = (*served)->remote.get();
  inference::MoeConfig config;
  *config.mutable_workers() = request->workers();
  if (!request->workers_text().empty()) {
    absl::StatusOr<std::vector<inference::WorkerPlacement>> parsed = ParseWorkersFlag(request->workers_text());
    if (!parsed.ok()) return ToGrpcStatus(parsed.status());
    for (const inference::WorkerPlacement& placed : *parsed) *config.add_workers() = placed;
  }
  const ExpertSet hosted = remote->hosted();
  absl::StatusOr<std::vector<RemoteExperts::Worker>> target =
      WorkersFromPlacements(config.workers(), hosted.num_layers(), hosted.num_experts());
  if (!target.ok()) return ToGrpcStatus(target.status());
  absl::MutexLock lock(&move_mu_);
  return ToGrpcStatus(Move(*remote, *std::move(target), response));
}

grpc::Status PlacementAdminService::ProposePlacement(grpc::ServerContext* context,
                                                     const admin::ProposePlacementRequest* request,
                                                     admin::ProposePlacementResponse* response) {
  if (absl::Status allowed = Authorize(*context); !allowed.ok()) return ToGrpcStatus(allowed);
  absl::StatusOr<const ServedModel*> served = PlacedModel(request->model(), request->version());
  if (!served.ok()) return ToGrpcStatus(served.status());
  if (!load_) return ToGrpcStatus(absl::FailedPreconditionError("no expert load is measured (metrics are off)"));
  absl::StatusOr<ExpertLoad> load = load_((*served)->index);
  if (!load.ok()) return ToGrpcStatus(load.status());
  PlannerOptions options;
  if (request->hot_factor() > 0) options.hot_factor = request->hot_factor();
  if (request->max_replicas() > 0) options.max_replicas = request->max_replicas();
  if (request->has_extra_per_worker()) options.extra_per_worker = request->extra_per_worker();
  RemoteExperts& remote = *(*served)->remote;
  absl::MutexLock lock(&move_mu_);
  std::vector<RemoteExperts::Worker> current;
  for (const PlacedWorker& worker : remote.placement()) current.push_back({worker.address, worker.experts});
  absl::StatusOr<PlacementPlan> plan = PlanReplicas(current, *load, options);
  if (!plan.ok()) return ToGrpcStatus(plan.status());
  response->set_workers_text(PlacementText(plan->workers));
  for (const std::string& change : plan->changes) response->add_changes(change);
  for (double value : plan->imbalance_before) response->add_imbalance_before(value);
  for (double value : plan->imbalance_after) response->add_imbalance_after(value);
  if (!request->apply() || plan->changes.empty()) return grpc::Status::OK;
  return ToGrpcStatus(Move(remote, std::move(plan->workers), response->mutable_applied()));
}

absl::Status PlacementAdminService::Hold(const std::string& address, const ExpertSet& held) const {
  auto stub = worker::ExpertWorker::NewStub(grpc::CreateChannel(address, WorkerChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + worker_deadline_));
  worker::SetExpertsRequest request;
  request.set_held(held.Bytes());
  worker::DescribeResponse response;
  const grpc::Status status = stub->SetExperts(&context, request, &response);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                        absl::StrCat("worker ", address, ": ", status.error_message()));
  }
  return absl::OkStatus();
}

absl::Status PlacementAdminService::Move(RemoteExperts& remote, std::vector<RemoteExperts::Worker> target,
                                         admin::SetPlacementResponse* response) const {
  // What each worker holds, as it goes: before, then after the load.
  std::map<std::string, ExpertSet> holds;
  for (const PlacedWorker& worker : remote.placement()) holds.emplace(worker.address, worker.experts);
  // 1. Load: every worker holds what it has and what it gets.
  absl::Time start = absl::Now();
  for (const RemoteExperts::Worker& worker : target) {
    auto held = holds.find(worker.address);
    ExpertSet load = worker.experts;
    if (held != holds.end()) load.AddAll(held->second);
    if (held != holds.end() && load == held->second) continue;
    if (absl::Status loaded = Hold(worker.address, load); !loaded.ok()) return loaded;
    holds.insert_or_assign(worker.address, load);
  }
  response->set_load_seconds(SecondsSince(start));
  // 2. Switch the traffic.
  start = absl::Now();
  std::map<std::string, ExpertSet> after;
  for (const RemoteExperts::Worker& worker : target) after.emplace(worker.address, worker.experts);
  if (absl::Status switched = remote.SetPlacement(std::move(target)); !switched.ok()) return switched;
  response->set_switch_seconds(SecondsSince(start));
  // 3. Release: each worker keeps only its part (a worker left out, nothing).
  start = absl::Now();
  for (const auto& [address, held] : holds) {
    auto kept = after.find(address);
    const ExpertSet keep = kept == after.end() ? ExpertSet::None(held.num_layers(), held.num_experts()) : kept->second;
    if (keep == held) continue;
    if (absl::Status released = Hold(address, keep); !released.ok()) return released;
  }
  response->set_release_seconds(SecondsSince(start));
  *response->mutable_placement() = DescribePlacement(remote);
  return absl::OkStatus();
}

}  // namespace moe
