// Builds models without a checkpoint: deterministic random weights for any
// spec (the demo model, tests, benchmarks), and writers that store a model in
// either on-disk format. Pure functions of their arguments: thread-safe.
#ifndef MOE_ENGINE_API_MODEL_BUILDER_H_
#define MOE_ENGINE_API_MODEL_BUILDER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "engine/api/model_spec.h"

namespace moe {

// A model with `num_layers` layers shaped by `spec`, weights drawn from
// N(0, 1/fan_in) (norm weights near 1) with a fixed generator seeded by
// `seed`, stored in spec.weight_dtype. The same arguments give the same bytes.
ModelDefinition GenerateRandomModel(const ModelSpec& spec, int num_layers, uint64_t seed);

// Quantizes every expert matrix of `model` (routed and shared) in `format`
// with the published quantizers (QuantizeMatrix: FP8 in `block_rows` x
// `block_columns` blocks, MXFP4 in its 1 x 32), dropping the plain tensors,
// and sets spec.expert_format. For tests and benchmarks of quantized models.
absl::Status QuantizeExperts(QuantFormat format, ModelDefinition* model, int64_t block_rows = 128,
                             int64_t block_columns = 128);

// The built-in demo model: 2 layers, hidden 256, 8 GLU experts of 512, top-2,
// softmax routing, pre-norm and residual, bf16 weights. Deterministic.
ModelDefinition DemoModel();

// Writes `model` as a repository entry: <repo_dir>/<spec.name>/config.pbtxt
// and <repo_dir>/<spec.name>/<version>/model.safetensors.
absl::Status WriteRepositoryModel(const ModelDefinition& model, const std::string& repo_dir, int64_t version,
                                  int max_batch_size);

// Writes `model` as a Hugging Face checkpoint of type spec.source_type (one of
// SupportedHuggingFaceTypes(); the spec must be expressible in it) into `dir`:
// config.json and model.safetensors, experts per-expert 2-D, or fused 3-D
// [E, 2I, d] / [E, d, I] when `fused_experts`. granitemoe, llama4_text and
// gpt_oss are written fused as published (Llama 4 transposed: [E, d, 2I] /
// [E, I, d]; gpt-oss also with gate and up interleaved, and biases).
absl::Status WriteHuggingFaceCheckpoint(const ModelDefinition& model, const std::string& dir, bool fused_experts);

}  // namespace moe

#endif  // MOE_ENGINE_API_MODEL_BUILDER_H_
