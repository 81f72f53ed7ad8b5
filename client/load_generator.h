// LoadGenerator: drives a server with ModelInfer requests, closed loop (N
// requests always in flight) or open loop (a fixed arrival rate, whatever the
// server does), for a duration or a request count, and reports throughput
// and latency percentiles. One Run at a time; Run blocks.
#ifndef MOE_CLIENT_LOAD_GENERATOR_H_
#define MOE_CLIENT_LOAD_GENERATOR_H_

#include <functional>
#include <string>

#include "absl/time/time.h"
#include "client/moe_client.h"

namespace moe {

struct LoadOptions {
  std::string model{};
  int hidden = 0;
  // Tokens per request.
  int tokens = 1;
  // Closed loop: requests kept in flight. Used when rate == 0.
  int concurrency = 1;
  // Open loop: requests per second (0 = closed loop).
  double rate = 0;
  // Stop after this long, or after `requests` requests if > 0.
  absl::Duration duration = absl::Seconds(10);
  int64_t requests = 0;
  // Called about once a second with a progress line.
  std::function<void(const std::string&)> progress{};
};

struct LoadReport {
  int64_t ok = 0;
  int64_t errors = 0;
  std::string first_error;
  double seconds = 0;
  double requests_per_second = 0;
  double tokens_per_second = 0;
  double p50_ms = 0, p90_ms = 0, p99_ms = 0, max_ms = 0, mean_ms = 0;

  std::string ToText() const;
  std::string ToJson() const;
};

LoadReport RunLoad(MoeClient& client, const LoadOptions& options);

}  // namespace moe

#endif  // MOE_CLIENT_LOAD_GENERATOR_H_
