#include "server/metrics/worker_metrics.h"

#include "absl/strings/str_cat.h"

namespace moe {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

WorkerFamilies::WorkerFamilies(prometheus::Registry& r)
    : up(&BuildGauge().Name("moe_worker_up").Help("1 while an expert worker answers, 0 while it is down.").Register(r)),
      call_seconds(&BuildHistogram()
                        .Name("moe_worker_call_seconds")
                        .Help("Time of one layer's rows sent to an expert worker, until its answer.")
                        .Register(r)),
      sent_bytes(&BuildCounter().Name("moe_worker_sent_bytes_total").Help("Bytes sent to an expert worker.").Register(r)),
      received_bytes(&BuildCounter()
                          .Name("moe_worker_received_bytes_total")
                          .Help("Bytes received from an expert worker.")
                          .Register(r)),
      failures(&BuildCounter()
                    .Name("moe_worker_failures_total")
                    .Help("Calls to an expert worker that failed (error, broken stream, missed deadline).")
                    .Register(r)),
      retries(&BuildCounter()
                   .Name("moe_worker_retries_total")
                   .Help("Calls whose rows went to another replica after this worker failed them.")
                   .Register(r)),
      expert_calls(&BuildCounter()
                        .Name("moe_expert_worker_calls_total")
                        .Help("Calls that ran an expert's rows on a worker (which replica served it).")
                        .Register(r)),
      healthy_replicas(&BuildGauge()
                            .Name("moe_expert_healthy_replicas")
                            .Help("Workers up that hold an expert placed on workers; 0: its batches fail.")
                            .Register(r)) {}

namespace {

const prometheus::Histogram::BucketBoundaries& CallBuckets() {
  static const prometheus::Histogram::BucketBoundaries buckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                                  0.01,   0.025,   0.05,   0.1,   0.25,   0.5,
                                                                  1,      2.5,     5};
  return buckets;
}

}  // namespace

WorkerMetrics::WorkerMetrics(const WorkerFamilies& families, const std::string& model, const std::string& version,
                             const std::vector<RemoteExperts::Worker>& workers) {
  for (const RemoteExperts::Worker& worker : workers) {
    const prometheus::Labels labels{{"model", model}, {"version", version}, {"worker", worker.address}};
    Series series{.up = &families.up->Add(labels),
                  .call_seconds = &families.call_seconds->Add(labels, CallBuckets()),
                  .sent_bytes = &families.sent_bytes->Add(labels),
                  .received_bytes = &families.received_bytes->Add(labels),
                  .failures = &families.failures->Add(labels),
                  .retries = &families.retries->Add(labels),
                  .expert_calls = {}};
    series.up->Set(1);
    const ExpertSet& held = worker.experts;
    num_experts_ = held.num_experts();
    for (int layer = 0; layer < held.num_layers(); ++layer) {
      for (int e = 0; e < held.num_experts(); ++e) {
        series.expert_calls.push_back(
            held.Contains(layer, e)
                ? &families.expert_calls->Add({{"model", model},
                                               {"version", version},
                                               {"layer", absl::StrCat(layer)},
                                               {"expert", absl::StrCat(e)},
                                               {"worker", worker.address}})
                : nullptr);
      }
    }
    workers_.push_back(std::move(series));
    held_.push_back(held);
  }
  const int num_layers = held_.empty() ? 0 : held_[0].num_layers();
  for (int layer = 0; layer < num_layers; ++layer) {
    for (int e = 0; e < num_experts_; ++e) {
      bool placed = false;
      for (const ExpertSet& held : held_) placed = placed || held.Contains(layer, e);
      healthy_replicas_.push_back(placed ? &families.healthy_replicas->Add({{"model", model},
                                                                            {"version", version},
                                                                            {"layer", absl::StrCat(layer)},
                                                                            {"expert", absl::StrCat(e)}})
                                         : nullptr);
    }
  }
  absl::MutexLock lock(&mu_);
  up_.assign(workers.size(), true);
  CountHealthyReplicas();
}

void WorkerMetrics::CountHealthyReplicas() {
  for (size_t i = 0; i < healthy_replicas_.size(); ++i) {
    if (!healthy_replicas_[i]) continue;
    const int layer = static_cast<int>(i) / num_experts_, e = static_cast<int>(i) % num_experts_;
    int up = 0;
    for (size_t w = 0; w < held_.size(); ++w) up += up_[w] && held_[w].Contains(layer, e) ? 1 : 0;
    healthy_replicas_[i]->Set(up);
  }
}

void WorkerMetrics::OnCall(const WorkerCall& call) {
  Series& series = workers_[call.worker];
  series.call_seconds->Observe(call.seconds);
  series.sent_bytes->Increment(static_cast<double>(call.bytes_sent));
  series.received_bytes->Increment(static_cast<double>(call.bytes_received));
  if (!call.status.ok()) {
    series.failures->Increment();
    return;
  }
  for (int e : call.experts) {
    prometheus::Counter* counter = series.expert_calls[static_cast<size_t>(call.layer) * num_experts_ + e];
    if (counter) counter->Increment();
  }
}

void WorkerMetrics::OnRetry(int from_worker, int /*to_worker*/) { workers_[from_worker].retries->Increment(); }

void WorkerMetrics::OnWorkerUp(int worker, bool up) {
  workers_[worker].up->Set(up ? 1 : 0);
  absl::MutexLock lock(&mu_);
  up_[worker] = up;
  CountHealthyReplicas();
}

}  // namespace moe
