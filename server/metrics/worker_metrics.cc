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
      sent_bytes(
          &BuildCounter().Name("moe_worker_sent_bytes_total").Help("Bytes sent to an expert worker.").Register(r)),
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
  static const prometheus::Histogram::BucketBoundaries buckets = {
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};
  return buckets;
}

}  // namespace

WorkerMetrics::WorkerMetrics(const WorkerFamilies& families, const std::string& model, const std::string& version)
    : families_(families), model_(model), version_(version) {}

WorkerMetrics::Series& WorkerMetrics::SeriesOf(const PlacedWorker& worker) {
  if (workers_.size() <= static_cast<size_t>(worker.id)) workers_.resize(worker.id + 1);
  Series& series = workers_[worker.id];
  if (series.up == nullptr) {
    const prometheus::Labels labels{{"model", model_}, {"version", version_}, {"worker", worker.address}};
    series.up = &families_.up->Add(labels);
    series.call_seconds = &families_.call_seconds->Add(labels, CallBuckets());
    series.sent_bytes = &families_.sent_bytes->Add(labels);
    series.received_bytes = &families_.received_bytes->Add(labels);
    series.failures = &families_.failures->Add(labels);
    series.retries = &families_.retries->Add(labels);
    series.up->Set(1);
  }
  return series;
}

void WorkerMetrics::OnPlacement(std::span<const PlacedWorker> workers) {
  absl::MutexLock lock(&mu_);
  for (Series& series : workers_) series.held = ExpertSet();
  for (const PlacedWorker& worker : workers) {
    num_layers_ = worker.experts.num_layers();
    num_experts_ = worker.experts.num_experts();
    Series& series = SeriesOf(worker);
    series.held = worker.experts;
    series.expert_calls.resize(static_cast<size_t>(num_layers_) * num_experts_, nullptr);
    healthy_replicas_.resize(series.expert_calls.size(), nullptr);
    for (int layer = 0; layer < num_layers_; ++layer) {
      for (int e = 0; e < num_experts_; ++e) {
        if (!worker.experts.Contains(layer, e)) continue;
        const size_t at = static_cast<size_t>(layer) * num_experts_ + e;
        const prometheus::Labels expert{
            {"model", model_}, {"version", version_}, {"layer", absl::StrCat(layer)}, {"expert", absl::StrCat(e)}};
        if (!series.expert_calls[at]) {
          prometheus::Labels labels = expert;
          labels.emplace("worker", worker.address);
          series.expert_calls[at] = &families_.expert_calls->Add(labels);
        }
        if (!healthy_replicas_[at]) healthy_replicas_[at] = &families_.healthy_replicas->Add(expert);
      }
    }
  }
  CountHealthyReplicas();
}

void WorkerMetrics::CountHealthyReplicas() {
  for (size_t i = 0; i < healthy_replicas_.size(); ++i) {
    if (!healthy_replicas_[i]) continue;
    const int layer = static_cast<int>(i) / num_experts_, e = static_cast<int>(i) % num_experts_;
    int up = 0;
    for (const Series& series : workers_) {
      const bool holds = series.held.num_layers() > 0 && series.held.Contains(layer, e);
      up += series.is_up && holds ? 1 : 0;
    }
    healthy_replicas_[i]->Set(up);
  }
}

void WorkerMetrics::OnCall(const WorkerCall& call) {
  absl::MutexLock lock(&mu_);
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

void WorkerMetrics::OnRetry(int from_worker, int /*to_worker*/) {
  absl::MutexLock lock(&mu_);
  workers_[from_worker].retries->Increment();
}

void WorkerMetrics::OnWorkerUp(int worker, bool up) {
  absl::MutexLock lock(&mu_);
  workers_[worker].up->Set(up ? 1 : 0);
  workers_[worker].is_up = up;
  CountHealthyReplicas();
}

}  // namespace moe
