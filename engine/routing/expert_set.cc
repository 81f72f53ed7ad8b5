#include "engine/api/expert_set.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moe {

ExpertSet::ExpertSet(int num_layers, int num_experts, bool held)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      held_(static_cast<size_t>(num_layers) * num_experts, held ? 1 : 0) {}

ExpertSet ExpertSet::All(int num_layers, int num_experts) { return ExpertSet(num_layers, num_experts, true); }
ExpertSet ExpertSet::None(int num_layers, int num_experts) { return ExpertSet(num_layers, num_experts, false); }

int64_t ExpertSet::count() const { return std::count(held_.begin(), held_.end(), 1); }

int ExpertSet::count_in_layer(int layer) const {
  const auto begin = held_.begin() + static_cast<std::ptrdiff_t>(Index(layer, 0));
  return static_cast<int>(std::count(begin, begin + num_experts_, 1));
}

void ExpertSet::AddAll(const ExpertSet& other) {
  for (size_t i = 0; i < held_.size() && i < other.held_.size(); ++i) held_[i] |= other.held_[i];
}

ExpertSet ExpertSet::Complement() const {
  ExpertSet lacking = *this;
  for (uint8_t& held : lacking.held_) held = held ? 0 : 1;
  return lacking;
}

absl::StatusOr<ExpertSet> ExpertSet::FromBytes(std::string_view bytes, int num_layers, int num_experts) {
  if (bytes.size() != static_cast<size_t>(num_layers) * num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("held has ", bytes.size(), " entries; the model has ", num_layers,
                                                   " layers of ", num_experts, " experts"));
  }
  ExpertSet set = None(num_layers, num_experts);
  for (size_t i = 0; i < bytes.size(); ++i) set.held_[i] = bytes[i] ? 1 : 0;
  return set;
}

std::string ExpertSet::Summary() const {
  const int64_t total = static_cast<int64_t>(num_layers_) * num_experts_;
  if (count() == total) return absl::StrCat("all ", num_experts_, " experts of ", num_layers_, " layers");
  bool even = true;
  for (int layer = 1; layer < num_layers_; ++layer) even = even && count_in_layer(layer) == count_in_layer(0);
  if (even && num_layers_ > 0) {
    return absl::StrCat(count_in_layer(0), " of ", num_experts_, " experts in each of ", num_layers_, " layers");
  }
  return absl::StrCat(count(), " of ", total, " (layer, expert) pairs");
}

namespace {

// The indices "0-3,7" names within [0, limit); "" and "all" name them all.
absl::StatusOr<std::vector<int>> ParseIndexList(std::string_view text, int limit, const char* what) {
  std::vector<int> indices;
  if (text.empty() || text == "all") {
    for (int i = 0; i < limit; ++i) indices.push_back(i);
    return indices;
  }
  for (absl::string_view item : absl::StrSplit(absl::string_view(text.data(), text.size()), ',')) {
    item = absl::StripAsciiWhitespace(item);
    const size_t dash = item.find('-');
    int first = 0, last = 0;
    const bool parsed = dash == absl::string_view::npos ? absl::SimpleAtoi(item, &first) && (last = first, true)
                                                        : absl::SimpleAtoi(item.substr(0, dash), &first) &&
                                                              absl::SimpleAtoi(item.substr(dash + 1), &last);
    if (!parsed || first > last) {
      return absl::InvalidArgumentError(absl::StrCat("bad ", what, " '", item, "': expected N or N-M with N <= M"));
    }
    if (first < 0 || last >= limit) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " '", item, "' out of range: there are ", limit, " (0 to ", limit - 1, ")"));
    }
    for (int i = first; i <= last; ++i) indices.push_back(i);
  }
  return indices;
}

// "0-3,7" for {0, 1, 2, 3, 7} (ascending, no repeats).
std::string FormatIndexList(const std::vector<int>& indices) {
  std::string text;
  for (size_t i = 0; i < indices.size();) {
    size_t j = i;
    while (j + 1 < indices.size() && indices[j + 1] == indices[j] + 1) ++j;
    absl::StrAppend(&text, text.empty() ? "" : ",", indices[i]);
    if (j > i) absl::StrAppend(&text, "-", indices[j]);
    i = j + 1;
  }
  return text;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> ExpertSetLists(const ExpertSet& set) {
  // Layers grouped by the experts they hold, groups in order of first layer.
  std::vector<std::pair<std::vector<int>, std::vector<int>>> groups;  // (experts, layers)
  for (int layer = 0; layer < set.num_layers(); ++layer) {
    std::vector<int> experts;
    for (int e = 0; e < set.num_experts(); ++e) {
      if (set.Contains(layer, e)) experts.push_back(e);
    }
    if (experts.empty()) continue;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == experts; });
    if (group == groups.end()) {
      groups.push_back({std::move(experts), {layer}});
    } else {
      group->second.push_back(layer);
    }
  }
  std::vector<std::pair<std::string, std::string>> lists;
  for (const auto& [experts, layers] : groups) lists.emplace_back(FormatIndexList(experts), FormatIndexList(layers));
  return lists;
}

absl::StatusOr<ExpertSet> ParseExpertSet(std::string_view experts, std::string_view layers, int num_layers,
                                         int num_experts) {
  absl::StatusOr<std::vector<int>> expert_list = ParseIndexList(experts, num_experts, "expert");
  if (!expert_list.ok()) return expert_list.status();
  absl::StatusOr<std::vector<int>> layer_list = ParseIndexList(layers, num_layers, "layer");
  if (!layer_list.ok()) return layer_list.status();
  ExpertSet set = ExpertSet::None(num_layers, num_experts);
  for (int layer : *layer_list) {
    for (int e : *expert_list) set.Add(layer, e);
  }
  return set;
}

absl::Status SplitPlanByOwner(const DispatchPlan& plan, int layer, std::span<const ExpertSet* const> owners,
                              std::vector<PlanShard>* shards) {
  const int E = plan.num_experts;
  shards->resize(owners.size());
  for (PlanShard& shard : *shards) {
    shard.plan.num_experts = E;
    shard.plan.offsets.assign(E + 1, 0);
    shard.plan.row_token.clear();
    shard.plan.slot_row.clear();
    shard.plan.tokens_routed.assign(E, 0);
    shard.plan.tokens_dropped.assign(E, 0);
    shard.source_offset.assign(E, 0);
    shard.experts.clear();
  }
  for (int e = 0; e < E; ++e) {
    const int64_t rows = plan.rows_of(e);
    int owner = -1;
    if (rows > 0) {
      for (size_t i = 0; i < owners.size() && owner < 0; ++i) {
        if (owners[i]->Contains(layer, e)) owner = static_cast<int>(i);
      }
      if (owner < 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("layer ", layer, " expert ", e, " has ", rows, " rows and no owner holds it"));
      }
    }
    for (size_t i = 0; i < owners.size(); ++i) {
      PlanShard& shard = (*shards)[i];
      const int64_t begin = shard.plan.offsets[e];
      shard.source_offset[e] = plan.offsets[e];
      if (static_cast<int>(i) != owner) {
        shard.plan.offsets[e + 1] = begin;
        continue;
      }
      shard.plan.offsets[e + 1] = begin + rows;
      shard.plan.tokens_routed[e] = plan.tokens_routed[e];
      shard.plan.tokens_dropped[e] = plan.tokens_dropped[e];
      shard.plan.row_token.insert(shard.plan.row_token.end(), plan.row_token.begin() + plan.offsets[e],
                                  plan.row_token.begin() + plan.offsets[e + 1]);
      shard.experts.push_back(e);
    }
  }
  return absl::OkStatus();
}

void ScatterShardRows(const PlanShard& shard, const float* shard_out, int hidden, float* full_out) {
  for (int e : shard.experts) {
    const int64_t rows = shard.plan.rows_of(e);
    std::memcpy(full_out + shard.source_offset[e] * hidden, shard_out + shard.plan.offsets[e] * hidden,
                static_cast<size_t>(rows) * hidden * sizeof(float));
  }
}

}  // namespace moe
