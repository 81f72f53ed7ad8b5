// PlacementAdminService: proto/placement_admin.proto. Reports where a
// model's routed experts run and moves them while it serves:
//   1. load: each worker of the new placement is asked to hold the union of
//      what it holds and what it is given (moe-worker SetExperts), and
//      serves on meanwhile;
//   2. switch: the front end's RemoteExperts takes the new placement; batches
//      already started finish on the old one;
//   3. release: each worker keeps only what the new placement gives it.
// No request fails or waits on a move: every expert has a worker holding
// it at each step. A failed load leaves the placement as it was.
//
// Thread-safe; moves are one at a time. The registry is borrowed.
#ifndef MOE_SERVER_FRONTEND_PLACEMENT_ADMIN_H_
#define MOE_SERVER_FRONTEND_PLACEMENT_ADMIN_H_

#include <functional>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/placement_admin.grpc.pb.h"
#include "remote/placement_planner.h"
#include "server/frontend/token_auth.h"
#include "server/models/model_registry.h"

namespace moe {

class PlacementAdminService final : public admin::PlacementAdmin::Service {
 public:
  // The measured load of a model's experts (tokens per (layer, expert) over
  // a recent window), by the model's registry index.
  using LoadSource = std::function<absl::StatusOr<ExpertLoad>(int model_index)>;

  // `load` may be empty (ProposePlacement then fails FAILED_PRECONDITION);
  // `worker_deadline`: how long a worker may take to load experts.
  // With an `authenticator` (borrowed; null: none), every RPC first checks
  // the call's bearer token.
  PlacementAdminService(const ModelRegistry* registry, LoadSource load,
                        absl::Duration worker_deadline = absl::Seconds(120),
                        TokenAuthenticator* authenticator = nullptr)
      : registry_(registry), load_(std::move(load)), worker_deadline_(worker_deadline), authenticator_(authenticator) {}

  grpc::Status GetPlacement(grpc::ServerContext* context, const admin::GetPlacementRequest* request,
                            admin::PlacementResponse* response) override;
  grpc::Status SetPlacement(grpc::ServerContext* context, const admin::SetPlacementRequest* request,
                            admin::SetPlacementResponse* response) override ABSL_LOCKS_EXCLUDED(move_mu_);
  grpc::Status ProposePlacement(grpc::ServerContext* context, const admin::ProposePlacementRequest* request,
                                admin::ProposePlacementResponse* response) override ABSL_LOCKS_EXCLUDED(move_mu_);

 private:
  // OK when there is no authenticator or it accepts the call.
  absl::Status Authorize(const grpc::ServerContext& context) const;
  absl::StatusOr<const ServedModel*> PlacedModel(const std::string& model, const std::string& version) const;
  absl::Status Move(RemoteExperts& remote, std::vector<RemoteExperts::Worker> target,
                    admin::SetPlacementResponse* response) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(move_mu_);
  // Asks the worker at `address` to hold `held`.
  absl::Status Hold(const std::string& address, const ExpertSet& held) const;

  const ModelRegistry* registry_;
  const LoadSource load_;
  const absl::Duration worker_deadline_;
  TokenAuthenticator* const authenticator_;
  absl::Mutex move_mu_;
};

// The placement of `remote`, as GetPlacement answers it.
admin::PlacementResponse DescribePlacement(const RemoteExperts& remote);

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_PLACEMENT_ADMIN_H_
