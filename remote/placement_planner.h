// A placement planner: from the workers' placement (which routed experts each
// moe-worker holds, RemoteExperts::Worker) and the measured load of every
// expert, proposes replicas of hot experts so that each layer's load spreads
// more evenly over the workers. After DeepSeek's EPLB (replicate the heaviest
// experts, then put the replicas where they balance the load), but a plan
// only grows a placement: it adds replicas and never moves or removes one, so
// that it can be applied to running workers by loading experts alone.
//
// The load model is RemoteExperts' routing: over a window, an expert's rows
// spread evenly over its replicas, so a worker's projected load is the sum,
// over the experts it holds, of that expert's load / its replica count.
//
// Pure functions over plain data (no I/O, no shared state): thread-safe.
#ifndef MOE_REMOTE_PLACEMENT_PLANNER_H_
#define MOE_REMOTE_PLACEMENT_PLANNER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "remote/remote_experts.h"

namespace moe {

// The measured load of a model's routed experts: load[layer][expert] = tokens routed to it over a recent window.
using ExpertLoad = std::vector<std::vector<double>>;

struct PlannerOptions {
  // Most experts (per layer) any worker may hold after the plan, counted per layer; 0: each worker's current count in
  // that layer plus extra_per_worker. A worker already above the limit keeps what it holds and takes no more.
  int max_experts_per_worker = 0;
  int extra_per_worker = 1;
  // An expert is hot while its load per replica exceeds hot_factor times the layer's mean load per placed expert
  // (the load of the experts some worker holds, divided by their number); only hot experts get replicas. The mean is
  // taken once per layer, before the plan, so an expert stops being hot once enough replicas share its load.
  double hot_factor = 1.5;
  // Most replicas one expert may have: an expert gets no new replica once it has this many (one that already has more
  // keeps them all).
  int max_replicas = 4;
};

struct PlacementPlan {
  std::vector<RemoteExperts::Worker> workers;  // same addresses and order as the input, with their new ExpertSets
  // Per layer: the largest load any worker carries divided by the mean worker load, before and after
  // (a replicated expert's load is split evenly over its replicas). 1 for a layer whose workers carry no load.
  std::vector<double> imbalance_before, imbalance_after;
  // One line per replica added, in the order they were chosen: "layer 3 expert 7 -> 10.0.0.5:8101".
  std::vector<std::string> changes;
};

// Proposes replicas for hot experts, layer by layer, greedily. At each step the hot experts (that may take another
// replica) are tried by load per replica, highest first (then lowest index); each one's candidate is the worker with
// the least projected load (then lowest index) that does not hold it yet and has room. The first candidate that lowers
// the layer's largest worker load, or keeps it and lowers the number of workers that carry it (so that workers tied
// at the top are relieved one at a time), is taken; the layer is done when none does. Experts with zero load and
// experts that no worker holds (they run in the front end) never get replicas. Never removes an expert from a worker.
// INVALID_ARGUMENT naming the problem when `load`'s shape differs from the workers' sets (or theirs from each
// other's), a load is negative or not finite, an option is out of range, or there are no workers.
absl::StatusOr<PlacementPlan> PlanReplicas(const std::vector<RemoteExperts::Worker>& current, const ExpertLoad& load,
                                           const PlannerOptions& options);

}  // namespace moe

#endif  // MOE_REMOTE_PLACEMENT_PLANNER_H_
