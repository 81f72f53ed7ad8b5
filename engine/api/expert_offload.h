// ExpertOffload: where an executor sends the rows of routed experts it does
// not hold, so that they run elsewhere (worker processes) while it runs its
// own. The engine defines the contract; an implementation that needs a wire
// lives outside the engine (server/remote/).
//
// A layer's offloaded part is Start (rows sent, returns at once) and Finish
// (waits, writes the rows back into the layer's expert output). Between the
// two the executor runs its own experts.
//
// Thread-safety: an offload is shared by every caller of an executor and
// must be thread-safe; each caller passes its own Batch.
#ifndef MOE_ENGINE_API_EXPERT_OFFLOAD_H_
#define MOE_ENGINE_API_EXPERT_OFFLOAD_H_

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "engine/api/dispatch.h"
#include "engine/api/expert_set.h"

namespace moe {

class ExpertOffload {
 public:
  // One layer's rows for the experts the caller does not hold. Everything is
  // borrowed until Finish returns.
  struct Job {
    int layer = 0;
    // The layer's normalised input, host fp32 [num_tokens, hidden].
    const float* tokens = nullptr;
    int num_tokens = 0;
    int hidden = 0;
    // The layer's whole plan; the experts in `local` are the caller's.
    const DispatchPlan* plan = nullptr;
    const ExpertSet* local = nullptr;
    // The layer's expert output, fp32 [plan->num_rows(), hidden]: Finish
    // writes the offloaded experts' rows, and no other.
    float* expert_out = nullptr;
    // If not null, [num_experts]: Finish writes the offloaded experts'
    // compute seconds as their hosts measured them.
    double* expert_seconds = nullptr;
  };

  // One caller's state between Start and Finish, reused batch after batch.
  class Batch {
   public:
    virtual ~Batch() = default;
  };

  virtual ~ExpertOffload() = default;
  virtual std::unique_ptr<Batch> NewBatch() const = 0;
  // Whether some host can run `expert` of `layer` (for validation at load).
  virtual bool Hosts(int layer, int expert) const = 0;
  // Sends the rows of every expert with rows that `local` lacks.
  virtual absl::Status Start(const Job& job, Batch& batch) const = 0;
  // Waits for them and writes them back. UNAVAILABLE naming the layer and
  // expert when no host could run one: `unserved` (cleared first) then lists
  // every such expert, whose rows are unspecified; the others' are written.
  virtual absl::Status Finish(Batch& batch, std::vector<int>* unserved) const = 0;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_EXPERT_OFFLOAD_H_
