#include "remote/placement_planner.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"

namespace moe {
namespace {

absl::Status ValidateOptions(const PlannerOptions& options) {
  if (options.max_replicas < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_replicas must be at least 1, not ", options.max_replicas));
  }
  if (options.max_experts_per_worker < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_experts_per_worker must not be negative, not ", options.max_experts_per_worker));
  }
  if (options.extra_per_worker < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("extra_per_worker must not be negative, not ", options.extra_per_worker));
  }
  if (!(options.hot_factor >= 0) || std::isinf(options.hot_factor)) {  // also rejects NaN
    return absl::InvalidArgumentError(
        absl::StrCat("hot_factor must be a finite non-negative number, not ", options.hot_factor));
  }
  return absl::OkStatus();
}

// Every worker's set has the first one's shape, and `load` has it too, with finite non-negative loads.
absl::Status ValidateShapes(const std::vector<RemoteExperts::Worker>& workers, const ExpertLoad& load) {
  if (workers.empty()) return absl::InvalidArgumentError("a placement needs at least one worker");
  const ExpertSet& first = workers[0].experts;
  for (const RemoteExperts::Worker& worker : workers) {
    if (worker.experts.num_layers() != first.num_layers() || worker.experts.num_experts() != first.num_experts()) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker ", worker.address, ": its experts are given for ", worker.experts.num_layers(),
                       " layers of ", worker.experts.num_experts(), " experts; worker ", workers[0].address, "'s for ",
                       first.num_layers(), " of ", first.num_experts()));
    }
  }
  if (static_cast<int64_t>(load.size()) != first.num_layers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the load is given for ", load.size(), " layers; the workers' sets have ", first.num_layers()));
  }
  for (size_t layer = 0; layer < load.size(); ++layer) {
    if (static_cast<int64_t>(load[layer].size()) != first.num_experts()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, "'s load is given for ", load[layer].size(),
                                                     " experts; the workers' sets have ", first.num_experts()));
    }
    for (size_t e = 0; e < load[layer].size(); ++e) {
      if (!(load[layer][e] >= 0) || std::isinf(load[layer][e])) {
        return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " expert ", e, ": load ", load[layer][e],
                                                       " is not a finite non-negative number"));
      }
    }
  }
  return absl::OkStatus();
}

// The largest worker load and how many workers carry it (within the layer's tolerance).
struct Peak {
  double max = 0;
  int count = 0;
};

// One layer of the placement while it is planned.
struct LayerState {
  std::vector<double> load;               // per expert
  std::vector<std::vector<int>> holders;  // per expert: the workers that hold it, ascending
  std::vector<double> worker_load;        // per worker: projected
  std::vector<int> room;                  // per worker: experts it may still take in this layer
  double hot_threshold = 0;               // load per replica above which an expert is hot
  // Loads that differ by less than this are equal: the sums of a worker's shares round differently from those of a
  // candidate's, and a rounding difference must neither pass for an improvement nor hide a tie.
  double tolerance = 0;
};

// Projected loads from scratch (not by updates, which would accumulate rounding as replicas are added).
std::vector<double> WorkerLoads(const LayerState& state) {
  std::vector<double> loads(state.room.size(), 0.0);
  for (size_t e = 0; e < state.holders.size(); ++e) {
    for (int w : state.holders[e]) loads[w] += state.load[e] / static_cast<double>(state.holders[e].size());
  }
  return loads;
}

int Room(const ExpertSet& experts, int layer, const PlannerOptions& options) {
  const int held = experts.count_in_layer(layer);
  const int limit =
      options.max_experts_per_worker > 0 ? options.max_experts_per_worker : held + options.extra_per_worker;
  return std::max(0, limit - held);
}

LayerState StateOf(const std::vector<RemoteExperts::Worker>& workers, int layer, const std::vector<double>& load,
                   const PlannerOptions& options) {
  LayerState state{.load = load,
                   .holders = std::vector<std::vector<int>>(load.size()),
                   .worker_load = {},
                   .room = {},
                   .hot_threshold = 0,
                   .tolerance = 0};
  for (size_t w = 0; w < workers.size(); ++w) {
    state.room.push_back(Room(workers[w].experts, layer, options));
    for (size_t e = 0; e < load.size(); ++e) {
      if (workers[w].experts.Contains(layer, static_cast<int>(e))) state.holders[e].push_back(static_cast<int>(w));
    }
  }
  state.worker_load = WorkerLoads(state);
  double placed_load = 0;
  int placed = 0;
  for (size_t e = 0; e < load.size(); ++e) {
    if (state.holders[e].empty()) continue;  // runs in the front end: no worker carries its load
    placed_load += load[e];
    ++placed;
  }
  if (placed > 0) state.hot_threshold = options.hot_factor * placed_load / placed;
  state.tolerance = 1e-9 * placed_load / static_cast<double>(workers.size());
  return state;
}

// max / mean of the worker loads; 1 (balanced) when they carry nothing.
double Imbalance(const std::vector<double>& loads) {
  double total = 0, max = 0;
  for (double load : loads) {
    total += load;
    max = std::max(max, load);
  }
  return total > 0 ? max / (total / static_cast<double>(loads.size())) : 1.0;
}

Peak PeakOf(const std::vector<double>& loads, double tolerance) {
  Peak peak{.max = *std::max_element(loads.begin(), loads.end()), .count = 0};
  for (double load : loads) peak.count += load >= peak.max - tolerance ? 1 : 0;
  return peak;
}

// Whether `after` relieves the top: a lower largest load, or the same with fewer workers carrying it.
bool Relieves(const Peak& after, const Peak& before, double tolerance) {
  if (after.max < before.max - tolerance) return true;
  return after.max <= before.max + tolerance && after.count < before.count;
}

// Experts that may take another replica, by load per replica, highest first (then lowest index).
std::vector<int> HotExperts(const LayerState& state, const PlannerOptions& options) {
  std::vector<int> hot;
  for (size_t e = 0; e < state.load.size(); ++e) {
    const size_t replicas = state.holders[e].size();
    // Zero load is never hot, even with hot_factor 0; an expert with no replica stays in the front end.
    if (replicas == 0 || state.load[e] <= 0 || replicas >= static_cast<size_t>(options.max_replicas)) continue;
    if (state.load[e] / static_cast<double>(replicas) > state.hot_threshold) hot.push_back(static_cast<int>(e));
  }
  auto per_replica = [&state](int e) { return state.load[e] / static_cast<double>(state.holders[e].size()); };
  std::stable_sort(hot.begin(), hot.end(), [&](int a, int b) { return per_replica(a) > per_replica(b); });
  return hot;
}

// The least-loaded worker (then lowest index) that has room and does not hold `expert`; -1 when none.
int LeastLoadedTaker(const LayerState& state, int expert) {
  int best = -1;
  for (int w = 0; w < static_cast<int>(state.room.size()); ++w) {
    if (state.room[w] == 0 || std::binary_search(state.holders[expert].begin(), state.holders[expert].end(), w)) {
      continue;
    }
    if (best < 0 || state.worker_load[w] < state.worker_load[best]) best = w;
  }
  return best;
}

// The projected worker loads were `worker` to take a replica of `expert`.
std::vector<double> LoadsWith(const LayerState& state, int expert, int worker) {
  std::vector<double> loads = state.worker_load;
  const double replicas = static_cast<double>(state.holders[expert].size());
  const double share_before = state.load[expert] / replicas, share_after = state.load[expert] / (replicas + 1);
  for (int w : state.holders[expert]) loads[w] += share_after - share_before;
  loads[worker] += share_after;
  return loads;
}

struct Move {
  int expert = -1;
  int worker = -1;
};

std::optional<Move> NextMove(const LayerState& state, const PlannerOptions& options) {
  const Peak before = PeakOf(state.worker_load, state.tolerance);
  for (int expert : HotExperts(state, options)) {
    const int worker = LeastLoadedTaker(state, expert);
    if (worker < 0) continue;
    if (Relieves(PeakOf(LoadsWith(state, expert, worker), state.tolerance), before, state.tolerance)) {
      return Move{.expert = expert, .worker = worker};
    }
  }
  return std::nullopt;
}

void Apply(const Move& move, LayerState& state) {
  std::vector<int>& holders = state.holders[move.expert];
  holders.insert(std::upper_bound(holders.begin(), holders.end(), move.worker), move.worker);
  --state.room[move.worker];
  state.worker_load = WorkerLoads(state);
}

void PlanLayer(int layer, const std::vector<double>& load, const PlannerOptions& options, PlacementPlan& plan) {
  LayerState state = StateOf(plan.workers, layer, load, options);
  plan.imbalance_before.push_back(Imbalance(state.worker_load));
  while (std::optional<Move> move = NextMove(state, options)) {
    Apply(*move, state);
    RemoteExperts::Worker& worker = plan.workers[move->worker];
    worker.experts.Add(layer, move->expert);
    plan.changes.push_back(absl::StrCat("layer ", layer, " expert ", move->expert, " -> ", worker.address));
  }
  plan.imbalance_after.push_back(Imbalance(state.worker_load));
}

}  // namespace

absl::StatusOr<PlacementPlan> PlanReplicas(const std::vector<RemoteExperts::Worker>& current, const ExpertLoad& load,
                                           const PlannerOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  RETURN_IF_ERROR(ValidateShapes(current, load));
  PlacementPlan plan{.workers = current, .imbalance_before = {}, .imbalance_after = {}, .changes = {}};
  for (int layer = 0; layer < current[0].experts.num_layers(); ++layer) PlanLayer(layer, load[layer], options, plan);
  return plan;
}

}  // namespace moe
