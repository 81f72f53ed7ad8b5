// The worker placement of a model's config (MoeConfig.workers) made into
// the RemoteExperts that runs those experts, and the experts left to this
// process. Pure functions of the config and the model.
#ifndef MOE_SERVER_MODELS_PLACEMENT_H_
#define MOE_SERVER_MODELS_PLACEMENT_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/dtype.h"
#include "engine/api/model_spec.h"
#include "proto/model_config.pb.h"
#include "remote/remote_experts.h"

namespace moe {

// The remote experts `config` places on workers, for `model` computing in
// `compute`, reporting to `observer` (may be null); null when it places
// none. INVALID_ARGUMENT naming the worker and the bad expert or layer list.
absl::StatusOr<std::unique_ptr<RemoteExperts>> RemoteExpertsFromConfig(const inference::MoeConfig& config,
                                                                       const ModelDefinition& model, DType compute,
                                                                       WorkerObserver* observer);

// Parses moe-serve's --workers: "ADDRESS=EXPERTS[@LAYERS]" items separated
// by ';', e.g. "10.0.0.5:8101=0-3,7;10.0.0.6:8101=4-7@0-1" (lists as
// ParseExpertSet reads them, checked against the model at load).
// INVALID_ARGUMENT naming the item without an '=' or an address.
absl::StatusOr<std::vector<inference::WorkerPlacement>> ParseWorkersFlag(std::string_view text);

// The workers `placements` name, each address once: the lists of an address
// named again are added to its set. INVALID_ARGUMENT naming the worker and
// the bad list.
absl::StatusOr<std::vector<RemoteExperts::Worker>> WorkersFromPlacements(
    const google::protobuf::RepeatedPtrField<inference::WorkerPlacement>& placements, int num_layers, int num_experts);

// `workers` in ParseWorkersFlag's syntax ("10.0.0.5:8101=0-3@0-1;...").
std::string PlacementText(const std::vector<RemoteExperts::Worker>& workers);

// Every routed expert that `remote` does not host: what this process holds.
ExpertSet ExpertsLeftHere(const RemoteExperts& remote);

}  // namespace moe

#endif  // MOE_SERVER_MODELS_PLACEMENT_H_
