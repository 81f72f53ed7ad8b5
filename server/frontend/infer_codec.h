// Decoding ModelInferRequest into a PendingRequest and encoding its result
// into a ModelInferResponse, per the Open Inference Protocol:
//
// - input `hidden_states`, FP32, FP16 or BF16, shape [T, hidden], in
//   raw_input_contents (any of the three) or fp32_contents (FP32);
// - outputs `output` [T, hidden] FP32 (multi-gate: `output_0` ...), and with
//   parameter `return_routing` (or when requested by name) `expert_ids` INT32
//   and `expert_weights` FP32 [T, layers, slots], all raw;
// - parameters: `layer` (int64: one MoE layer, 0-based), `return_routing`
//   (bool), `timeout` (int64 microseconds); `priority` (one level) and the
//   sequence parameters are accepted when they ask for nothing (no sequence);
//   `triton_enable_empty_final_response` (bool, sent by Triton's clients) is
//   accepted, and when true the response carries `triton_final_response`
//   true, as every response here is its request's last.
//
// Strict: whatever is ambiguous or contradictory is INVALID_ARGUMENT naming
// the field (raw and typed contents together, a raw entry count other than
// the input count, typed contents of another type, a shape the data does not
// fill, names given twice, unknown parameters, tensor parameters, outputs
// the model lacks or that return_routing=false refuses).
//
// Pure functions: thread-safe. Decoding borrows the request's bytes.
#ifndef MOE_SERVER_FRONTEND_INFER_CODEC_H_
#define MOE_SERVER_FRONTEND_INFER_CODEC_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/inference.pb.h"
#include "server/batching/pending_request.h"
#include "server/models/model_registry.h"

namespace moe {

// Fills every field of a PendingRequest except the callbacks and enqueue
// time. INVALID_ARGUMENT names the problem. A request may carry at most the
// model's max_batch_size tokens and, when `max_request_tokens` > 0, at most
// that many.
absl::StatusOr<std::unique_ptr<PendingRequest>> DecodeInferRequest(const inference::ModelInferRequest& request,
                                                                   const ServedModel& model,
                                                                   int64_t max_request_tokens = 0);

// Writes the outputs the request asked for (all when it named none).
void EncodeInferResponse(const inference::ModelInferRequest& request, const ServedModel& model, const ResultView& view,
                         inference::ModelInferResponse* response);

// The ModelMetadata answer for `model` with `versions`.
inference::ModelMetadataResponse ModelMetadata(const ServedModel& model, const std::vector<int64_t>& versions);

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_INFER_CODEC_H_
