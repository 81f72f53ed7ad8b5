// The device selection's parameters (engine/cuda/device_math.h) for a
// router spec: which family, and its numbers. Header-only, so that the host
// tests of device_math.h read a spec the way the CUDA executor does.
#ifndef MOE_ENGINE_CUDA_SELECTION_PARAMS_H_
#define MOE_ENGINE_CUDA_SELECTION_PARAMS_H_

#include "engine/api/model_spec.h"
#include "engine/cuda/device_math.h"

namespace moe::device_math {

// Whether `router` selects on the device: softmax top-k or a group-limited
// family, one task, within the device scratch's sizes.
inline bool SelectsOnDevice(const RouterSpec& router) {
  const bool family = router.kind == RouterKind::kSoftmaxTopK || router.kind == RouterKind::kSigmoidGroupTopK ||
                      router.kind == RouterKind::kSoftmaxGroupTopK;
  return family && router.num_tasks == 1 && router.num_experts <= kMaxExperts && router.n_group <= kMaxGroups;
}

// The parameters of a router that SelectsOnDevice; `round_logits`: round
// the logits to bf16 first.
inline SelectionParams SelectionParamsOf(const RouterSpec& router, bool round_logits) {
  return {.family = router.kind == RouterKind::kSoftmaxTopK        ? Family::kSoftmaxTopK
                    : router.kind == RouterKind::kSigmoidGroupTopK ? Family::kSigmoidGroupTopK
                                                                   : Family::kSoftmaxGroupTopK,
          .num_experts = router.num_experts,
          .top_k = router.top_k,
          .n_group = router.n_group,
          .topk_group = router.topk_group,
          .norm_topk_prob = router.norm_topk_prob,
          .routed_scaling_factor = router.routed_scaling_factor,
          .round_logits = round_logits};
}

}  // namespace moe::device_math

#endif  // MOE_ENGINE_CUDA_SELECTION_PARAMS_H_
