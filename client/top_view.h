// The `moe-client top` view: from two scrapes of /metrics, a plain-text
// screen of tokens/s, latency percentiles, and a bar per expert per layer
// showing its share of the layer's load, hottest and coldest marked. Works in
// any terminal (no colours, no cursor tricks besides the caller's clear).
// Pure function: thread-safe.
#ifndef MOE_CLIENT_TOP_VIEW_H_
#define MOE_CLIENT_TOP_VIEW_H_

#include <string>
#include <vector>

#include "client/metrics_text.h"

namespace moe {

struct TopOptions {
  // Model to show; empty: the first model found.
  std::string model{};
  // Width of the longest bar, in characters.
  int bar_width = 40;
};

// `previous` may be empty (first screen: totals since start instead of rates).
std::string RenderTop(const std::vector<MetricSample>& current, const std::vector<MetricSample>& previous,
                      double seconds_between, const TopOptions& options);

// The q-quantile (0..1) from cumulative histogram buckets (le -> count),
// interpolated linearly inside the bucket, as Prometheus does.
double HistogramQuantile(double q, const std::vector<std::pair<double, double>>& buckets);

}  // namespace moe

#endif  // MOE_CLIENT_TOP_VIEW_H_
