// Prometheus series of a model's expert workers (remote/remote_experts.h):
// per worker, whether it is up, the latency of its calls, bytes sent and
// received, failed calls and rows moved to a replica; per (layer, expert,
// worker) held, the calls that worker ran for that expert (which replica
// served it), and per (layer, expert) placed on workers how many of its
// replicas are up. Label sets are made once, at creation.
//
// Thread-safe (prometheus-cpp's series are). WorkerFamilies borrow the
// registry they were registered in, which must outlive them.
#ifndef MOE_SERVER_METRICS_WORKER_METRICS_H_
#define MOE_SERVER_METRICS_WORKER_METRICS_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "remote/remote_experts.h"

namespace moe {

// The metric families, registered once per registry.
struct WorkerFamilies {
  explicit WorkerFamilies(prometheus::Registry& registry);
  prometheus::Family<prometheus::Gauge>* up;
  prometheus::Family<prometheus::Histogram>* call_seconds;
  prometheus::Family<prometheus::Counter>* sent_bytes;
  prometheus::Family<prometheus::Counter>* received_bytes;
  prometheus::Family<prometheus::Counter>* failures;
  prometheus::Family<prometheus::Counter>* retries;
  prometheus::Family<prometheus::Counter>* expert_calls;
  prometheus::Family<prometheus::Gauge>* healthy_replicas;
};

class WorkerMetrics : public WorkerObserver {
 public:
  WorkerMetrics(const WorkerFamilies& families, const std::string& model, const std::string& version);

  // Adds the series of workers and (layer, expert) pairs new to it.
  void OnPlacement(std::span<const PlacedWorker> workers) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnCall(const WorkerCall& call) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnRetry(int from_worker, int to_worker) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnWorkerUp(int worker, bool up) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Series {
    prometheus::Gauge* up;
    prometheus::Histogram* call_seconds;
    prometheus::Counter* sent_bytes;
    prometheus::Counter* received_bytes;
    prometheus::Counter* failures;
    prometheus::Counter* retries;
    std::vector<prometheus::Counter*> expert_calls;  // [layer * experts + expert]; null where never held
    ExpertSet held;                                  // in the placement in force (empty when not in it)
    bool is_up = true;
  };
  // The series of worker `id`, made on first sight.
  Series& SeriesOf(const PlacedWorker& worker) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sets the replicas up of every placed expert.
  void CountHealthyReplicas() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const WorkerFamilies& families_;
  const std::string model_, version_;
  absl::Mutex mu_;
  std::vector<Series> workers_ ABSL_GUARDED_BY(mu_);  // by worker id
  int num_layers_ ABSL_GUARDED_BY(mu_) = 0;
  int num_experts_ ABSL_GUARDED_BY(mu_) = 0;
  // [layer * experts + expert]; null where never placed.
  std::vector<prometheus::Gauge*> healthy_replicas_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_SERVER_METRICS_WORKER_METRICS_H_
