// The worker placement of a model's config (MoeConfig.workers) made into
// the RemoteExperts that runs those experts, and the experts left to this
// process. Pure functions of the config and the model.
#ifndef MOE_SERVER_MODELS_PLACEMENT_H_
#define MOE_SERVER_MODELS_PLACEMENT_H_

#include <memory>

#include "absl/status/statusor.h"
#include "engine/api/dtype.h"
#include "engine/api/model_spec.h"
#include "proto/model_config.pb.h"
#include "remote/remote_experts.h"

namespace moe {

// The remote experts `config` places on workers, for `model` computing in
// `compute`; null when it places none. INVALID_ARGUMENT naming the worker
// and the bad expert or layer list.
absl::StatusOr<std::unique_ptr<RemoteExperts>> RemoteExpertsFromConfig(const inference::MoeConfig& config,
                                                                       const ModelDefinition& model, DType compute,
                                                                       WorkerObserver* observer);

// Every routed expert that `remote` does not host: what this process holds.
ExpertSet ExpertsLeftHere(const RemoteExperts& remote);

}  // namespace moe

#endif  // MOE_SERVER_MODELS_PLACEMENT_H_
