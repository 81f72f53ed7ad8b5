// ExpertBackend: the one interface through which expert FFNs are executed on
// rows grouped by expert (CPU here; CUDA and remote workers plug in behind it).
// The CPU backend is the reference the others are tested against.
//
// Thread-safety: a backend is immutable after creation; Run* may be called
// concurrently from several threads, each with its own Scratch.
#ifndef MOE_ENGINE_API_EXPERT_BACKEND_H_
#define MOE_ENGINE_API_EXPERT_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "engine/api/dispatch.h"

namespace moe {

class ExpertBackend {
 public:
  // Per-caller working memory; grows to the largest batch seen, then is reused.
  class Scratch {
   public:
    virtual ~Scratch() = default;
  };

  // One layer's routed work.
  struct Batch {
    int layer = 0;
    // The layer's (normalised) input, fp32 [num_tokens, hidden]. Borrowed.
    const float* tokens = nullptr;
    int num_tokens = 0;
    // Rows grouped by expert. Borrowed.
    const DispatchPlan* plan = nullptr;
    // Output, fp32 [plan->num_rows(), hidden]: row r holds the output of the
    // expert owning r for token plan->row_token[r].
    float* expert_out = nullptr;
    // If not null, [num_experts] seconds spent per expert (written, not added).
    double* expert_seconds = nullptr;
    // If not null, the layer's shared FFN applied to every token is written
    // here, fp32 [num_tokens, hidden]; the layer must have one.
    float* shared_out = nullptr;
  };

  virtual ~ExpertBackend() = default;
  virtual std::unique_ptr<Scratch> NewScratch() const = 0;
  // Runs every expert with rows in `batch.plan` (and the shared FFN when
  // batch.shared_out is set).
  virtual absl::Status RunExperts(const Batch& batch, Scratch* scratch) const = 0;
  // E.g. "cpu oneDNN (brg:avx512_core_bf16), bf16 compute".
  virtual std::string Describe() const = 0;
  // Bytes of expert weights as held by the backend.
  virtual size_t WeightBytes() const = 0;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_EXPERT_BACKEND_H_
