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
  // Per expert: selections routed to it (kept + dropped), dropped by capacity,
  // and compute seconds (0 for experts without rows).
  std::span<const int64_t> tokens_routed;
  std::span<const int64_t> tokens_dropped;
  std::span<const double> compute_seconds;
};

class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // Called once per layer per batch, after the layer ran.
  virtual void OnLayer(const LayerReport& report) = 0;
};

}  // namespace moe

#endif  // MOE_ENGINE_API_OBSERVER_H_
