// Models from a Triton-style repository entry: <repo>/<name>/config.pbtxt (a
// text ModelConfig, schema in proto/model_config.proto, with its `moe`
// section) and <repo>/<name>/<version>/model.safetensors. Tensor names are
// listed in docs/MODEL_REPOSITORY.md. Thread-safe (no shared state).
#ifndef MOE_ENGINE_API_REPOSITORY_MODEL_H_
#define MOE_ENGINE_API_REPOSITORY_MODEL_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/model_spec.h"
#include "proto/model_config.pb.h"

namespace moe {

// Parses config.pbtxt text; `origin` names the file in messages.
absl::StatusOr<inference::ModelConfig> ParseModelConfig(const std::string& text, const std::string& origin);

// The architecture described by a config's `moe` section.
absl::StatusOr<ModelSpec> SpecFromConfig(const inference::ModelConfig& config);

// Version directories (numeric names) of a repository entry, ascending. A
// directory that cannot be listed is an error naming it (ListDirectory).
absl::StatusOr<std::vector<int64_t>> ListVersions(const std::string& model_dir);

// Loads version `version` of the model in `model_dir` (the config is read
// from model_dir/config.pbtxt). Tensors borrow the mapped file.
absl::StatusOr<ModelDefinition> LoadRepositoryModel(const std::string& model_dir, int64_t version,
                                                    const inference::ModelConfig& config);

// Tensor names in a repository model.safetensors, shared with the writer.
namespace repository_names {
std::string Router(int layer, int task, int num_tasks);
std::string GroupRouter(int layer);
std::string InnerRouter(int layer, int group);
std::string RouterBias(int layer);
std::string Expert(int layer, int expert, const std::string& matrix);  // matrix: "w1.weight", ...
std::string Shared(int layer, const std::string& matrix);
std::string SharedGate(int layer);
std::string Norm(int layer);
}  // namespace repository_names

}  // namespace moe

#endif  // MOE_ENGINE_API_REPOSITORY_MODEL_H_
