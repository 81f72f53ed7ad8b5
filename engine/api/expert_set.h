// Ownership of routed experts: which (layer, expert) pairs an executor holds
// (ExpertSet), and a layer's dispatch plan split by owner (SplitPlanByOwner),
// so that a front end sends each owner only its experts' rows and puts the
// results back in plan order (ScatterShardRows).
//
// Plain data and pure functions: an ExpertSet is not synchronised; share it
// read-only. A PlanShard is reused batch after batch by one caller.
#ifndef MOE_ENGINE_API_EXPERT_SET_H_
#define MOE_ENGINE_API_EXPERT_SET_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/dispatch.h"

namespace moe {

class ExpertSet {
 public:
  ExpertSet() = default;
  // Every routed expert of every layer, or none.
  static ExpertSet All(int num_layers, int num_experts);
  static ExpertSet None(int num_layers, int num_experts);

  // Adds or removes (layer, expert); both must be in range.
  void Add(int layer, int expert) { held_[Index(layer, expert)] = 1; }
  void Remove(int layer, int expert) { held_[Index(layer, expert)] = 0; }
  bool Contains(int layer, int expert) const { return held_[Index(layer, expert)] != 0; }

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  // Pairs held, in all layers or in one.
  int64_t count() const;
  int count_in_layer(int layer) const;
  // For messages: "4 of 8 experts in each of 2 layers", "all 16 experts of 2 layers", ...
  std::string Summary() const;

  // Adds every pair of `other`, a set of the same shape.
  void AddAll(const ExpertSet& other);
  // Every pair of the shape that this set lacks.
  ExpertSet Complement() const;
  bool operator==(const ExpertSet& other) const = default;

  // One byte per pair, 1 where held, [layer * num_experts + expert]: the
  // wire form of proto/expert_worker.proto and proto/placement_admin.proto.
  std::string Bytes() const { return std::string(held_.begin(), held_.end()); }
  // The set of those bytes; INVALID_ARGUMENT when their count is not
  // num_layers * num_experts.
  static absl::StatusOr<ExpertSet> FromBytes(std::string_view bytes, int num_layers, int num_experts);

 private:
  ExpertSet(int num_layers, int num_experts, bool held);
  size_t Index(int layer, int expert) const { return static_cast<size_t>(layer) * num_experts_ + expert; }

  int num_layers_ = 0;
  int num_experts_ = 0;
  std::vector<uint8_t> held_;  // [layer * num_experts + expert]
};

// Parses "0-3,7" (experts; "" or "all": every one) and "0,2-5" (layers; ""
// or "all": every one) into the set of those experts in those layers.
// INVALID_ARGUMENT naming the bad item: not a number, a range backwards, or
// out of [0, num_experts) / [0, num_layers).
absl::StatusOr<ExpertSet> ParseExpertSet(std::string_view experts, std::string_view layers, int num_layers,
                                         int num_experts);

// What ParseExpertSet reads back: (experts, layers) lists such as ("0-3,7",
// "0-1"), one pair per group of layers holding the same experts, layers in
// order; layers holding none are left out (an empty set gives no pair).
std::vector<std::pair<std::string, std::string>> ExpertSetLists(const ExpertSet& set);

// One owner's part of a layer's plan.
struct PlanShard {
  // A plan over all the layer's experts in which only this owner's experts
  // have rows, compact and in the full plan's order (slot_row is empty).
  DispatchPlan plan;
  // Per expert: the full plan's first row of that expert's rows. [E]
  std::vector<int64_t> source_offset;
  // Experts of this owner that have rows, ascending.
  std::vector<int> experts;
};

// Gives each expert with rows in `plan` (layer `layer`) to the first of
// `owners` that holds it: a caller balancing replicas orders the owners.
// Fills shards[i] for owners[i] (resized to owners.size(); storage reused).
// FAILED_PRECONDITION naming the layer and expert when an expert with rows
// has no owner.
absl::Status SplitPlanByOwner(const DispatchPlan& plan, int layer, std::span<const ExpertSet* const> owners,
                              std::vector<PlanShard>* shards);

// Copies a shard's output rows (fp32 [shard.plan.num_rows(), hidden]) to
// their rows of the full plan's output (fp32 [full rows, hidden]).
void ScatterShardRows(const PlanShard& shard, const float* shard_out, int hidden, float* full_out);

}  // namespace moe

#endif  // MOE_ENGINE_API_EXPERT_SET_H_
