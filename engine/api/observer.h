// EngineObserver: how the engine reports what each expert did, without
// depending on any metrics library. Implementations must be thread-safe:
// batches of different workers may report concurrently.
#ifndef MOE_ENGINE_API_OBSERVER_H_
#define MOE_ENGINE_API_OBSERVER_H_

#include <cstdint>
#include <span>

namespace moe {

// One layer of one executed batch. Spans are borrowed for the call only.
struct LayerReport {
  int layer = 0;
  int num_tokens = 0;
  // Per expert: selections routed to it (kept + dropped) and dropped by
  // capacity.
  std::span<const int64_t> tokens_routed;
  std::span<const int64_t> tokens_dropped;
  // Per expert compute seconds (0 for experts without rows), or empty when
  // the executor cannot time experts one by one (ExpertTiming::kLayerOnly,
  // engine/api/layer_executor.h).
  std::span<const double> compute_seconds;
  // Wall seconds of the layer's experts (routed and shared) as a whole.
  double experts_seconds = 0;
};

class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // Called once per layer per batch, after the layer ran.
  virtual void OnLayer(const LayerReport& report) = 0;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_OBSERVER_H_
