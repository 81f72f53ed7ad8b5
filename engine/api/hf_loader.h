// Loads the MoE layers of a Hugging Face checkpoint directory (config.json +
// *.safetensors, sharded through model.safetensors.index.json) for the model
// types mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3,
// glm4_moe, granitemoe, llama4_text, llama4 (its text_config) and gpt_oss
// (bf16 experts; MXFP4 ones are refused). Reads the router, experts
// (per-expert 2-D tensors or fused 3-D [E, ...]), shared experts and their
// gate, and the norm before the MoE block; dense decoder layers are skipped and listed in spec.skipped_layers. Tensors are views into
// the memory-mapped files, but for Llama 4's and gpt-oss's transposed or
// interleaved experts, which are copied. Thread-safe (no shared state).
#ifndef MOE_ENGINE_API_HF_LOADER_H_
#define MOE_ENGINE_API_HF_LOADER_H_

#include <string>

#include "absl/status/statusor.h"
#include "engine/api/model_spec.h"

namespace moe {

// `name` is the served model name (default: the directory's base name).
absl::StatusOr<ModelDefinition> LoadHuggingFaceModel(const std::string& dir, const std::string& name = "");

// The model types LoadHuggingFaceModel reads.
const std::vector<std::string>& SupportedHuggingFaceTypes();

}  // namespace moe

#endif  // MOE_ENGINE_API_HF_LOADER_H_
