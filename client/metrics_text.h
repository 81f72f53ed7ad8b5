// Parsing the Prometheus text exposition format (what /metrics serves) into
// samples, and fetching it over plain HTTP. Pure functions, thread-safe.
#ifndef MOE_CLIENT_METRICS_TEXT_H_
#define MOE_CLIENT_METRICS_TEXT_H_

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

struct MetricSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

// Parses every sample line; comments and blank lines are skipped.
// INVALID_ARGUMENT names the first malformed line.
absl::StatusOr<std::vector<MetricSample>> ParseMetricsText(const std::string& text);

// GETs `url` ("http://host:port/path"; plain HTTP/1.0) and returns the body.
absl::StatusOr<std::string> HttpGet(const std::string& url);

}  // namespace moe

#endif  // MOE_CLIENT_METRICS_TEXT_H_
