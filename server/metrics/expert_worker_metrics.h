// Prometheus series of a moe-worker process (ExpertWorkerObserver): requests
// answered by outcome, and per (layer, expert) held the rows it ran and the
// compute time of each request's rows; the experts held. Label sets of an
// expert are made when it is first held, then cached.
//
// Thread-safe. The families borrow the registry, which must outlive them.
#ifndef MOE_SERVER_METRICS_EXPERT_WORKER_METRICS_H_
#define MOE_SERVER_METRICS_EXPERT_WORKER_METRICS_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/worker/expert_worker_service.h"

namespace moe {

class ExpertWorkerMetrics : public ExpertWorkerObserver {
 public:
  ExpertWorkerMetrics(prometheus::Registry& registry, const std::string& model);

  void OnRequest(const WorkerRequestReport& report) override ABSL_LOCKS_EXCLUDED(mu_);
  void OnHeld(const ExpertSet& held) override ABSL_LOCKS_EXCLUDED(mu_);

 private:
  const std::string model_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Counter>* rows_;
  prometheus::Family<prometheus::Histogram>* compute_;
  prometheus::Gauge* held_;
  prometheus::Counter* ok_;
  prometheus::Counter* failed_;
  absl::Mutex mu_;
  int num_experts_ ABSL_GUARDED_BY(mu_) = 0;
  // [layer * experts + expert]; null until the expert is first held.
  std::vector<prometheus::Counter*> expert_rows_ ABSL_GUARDED_BY(mu_);
  std::vector<prometheus::Histogram*> expert_compute_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_SERVER_METRICS_EXPERT_WORKER_METRICS_H_
