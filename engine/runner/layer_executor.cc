#include "engine/api/layer_executor.h"

#include <algorithm>

namespace moe {

const char* DeviceName(Device device) {
  switch (device) {
    case Device::kHost:
      return "host";
    case Device::kCuda:
      return "cuda";
  }
  return "unknown";
}

ExecutorWorkspace::ExecutorWorkspace(int max_tokens, int num_layers, int num_experts)
    : max_tokens_(max_tokens), num_experts_(num_experts) {
  records_.resize(num_layers);
  for (LayerRecord& record : records_) Size(record);
}

void ExecutorWorkspace::Size(LayerRecord& record) const {
  record.tokens_routed.resize(num_experts_);
  record.tokens_dropped.resize(num_experts_);
  record.expert_seconds.resize(num_experts_);
}

LayerRecord& ExecutorWorkspace::NextRecord(int layer, int num_tokens) {
  // Planned for each layer once a batch; a caller enqueuing more grows it.
  if (records_used_ == static_cast<int>(records_.size())) Size(records_.emplace_back());
  LayerRecord& record = records_[records_used_++];
  record.layer = layer;
  record.num_tokens = num_tokens;
  std::fill(record.tokens_routed.begin(), record.tokens_routed.end(), 0);
  std::fill(record.tokens_dropped.begin(), record.tokens_dropped.end(), 0);
  std::fill(record.expert_seconds.begin(), record.expert_seconds.end(), 0.0);
  record.experts_seconds = 0;
  return record;
}

}  // namespace moe
