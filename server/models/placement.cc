#include "server/models/placement.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moe {

absl::StatusOr<std::unique_ptr<RemoteExperts>> RemoteExpertsFromConfig(const inference::MoeConfig& config,
                                                                       const ModelDefinition& model, DType compute,
                                                                       WorkerObserver* observer) {
  if (config.workers_size() == 0) return std::unique_ptr<RemoteExperts>();
  const int num_layers = static_cast<int>(model.layers.size());
  const int num_experts = model.spec.router.num_experts;
  RemoteExperts::Options options{
      .workers = {}, .num_layers = num_layers, .num_experts = num_experts, .compute = compute};
  if (config.worker_deadline_ms() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("moe.worker_deadline_ms must be >= 0, got ", config.worker_deadline_ms()));
  }
  if (config.worker_deadline_ms() > 0) options.call_deadline = absl::Milliseconds(config.worker_deadline_ms());
  absl::StatusOr<std::vector<RemoteExperts::Worker>> workers =
      WorkersFromPlacements(config.workers(), num_layers, num_experts);
  if (!workers.ok()) return absl::InvalidArgumentError(absl::StrCat("moe.workers: ", workers.status().message()));
  options.workers = *std::move(workers);
  options.observer = observer;
  return RemoteExperts::Create(options);
}

absl::StatusOr<std::vector<RemoteExperts::Worker>> WorkersFromPlacements(
    const google::protobuf::RepeatedPtrField<inference::WorkerPlacement>& placements, int num_layers, int num_experts) {
  std::vector<RemoteExperts::Worker> workers;
  for (const inference::WorkerPlacement& placed : placements) {
    absl::StatusOr<ExpertSet> experts = ParseExpertSet(placed.experts(), placed.layers(), num_layers, num_experts);
    if (!experts.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("worker '", placed.address(), "': ", experts.status().message()));
    }
    auto same = std::find_if(workers.begin(), workers.end(),
                             [&](const RemoteExperts::Worker& w) { return w.address == placed.address(); });
    if (same == workers.end()) {
      workers.push_back({.address = placed.address(), .experts = *std::move(experts)});
      continue;
    }
    same->experts.AddAll(*experts);
  }
  return workers;
}

std::string PlacementText(const std::vector<RemoteExperts::Worker>& workers) {
  std::string text;
  for (const RemoteExperts::Worker& worker : workers) {
    for (const auto& [experts, layers] : ExpertSetLists(worker.experts)) {
      absl::StrAppend(&text, text.empty() ? "" : ";", worker.address, "=", experts, "@", layers);
    }
  }
  return text;
}

absl::StatusOr<std::vector<inference::WorkerPlacement>> ParseWorkersFlag(std::string_view text) {
  std::vector<inference::WorkerPlacement> workers;
  for (absl::string_view item :
       absl::StrSplit(absl::string_view(text.data(), text.size()), ';', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    const size_t equals = item.find('=');
    if (equals == absl::string_view::npos || equals == 0) {
      return absl::InvalidArgumentError(absl::StrCat("worker '", item, "': expected ADDRESS=EXPERTS[@LAYERS]"));
    }
    inference::WorkerPlacement& placed = workers.emplace_back();
    placed.set_address(std::string(item.substr(0, equals)));
    const absl::string_view lists = item.substr(equals + 1);
    const size_t at = lists.find('@');
    placed.set_experts(std::string(lists.substr(0, at)));
    if (at != absl::string_view::npos) placed.set_layers(std::string(lists.substr(at + 1)));
  }
  return workers;
}

ExpertSet ExpertsLeftHere(const RemoteExperts& remote) { return remote.hosted().Complement(); }

}  // namespace moe
