#include "server/metrics/expert_worker_metrics.h"

#include "absl/strings/str_cat.h"

namespace moe {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

ExpertWorkerMetrics::ExpertWorkerMetrics(prometheus::Registry& r, const std::string& model)
    : model_(model),
      requests_(&BuildCounter()
                     .Name("moe_worker_requests_total")
                     .Help("Requests (one layer's rows from a front end) answered, by outcome.")
                     .Register(r)),
      rows_(&BuildCounter()
                 .Name("moe_worker_expert_rows_total")
                 .Help("Rows an expert held by this worker ran.")
                 .Register(r)),
      compute_(&BuildHistogram()
                    .Name("moe_worker_expert_compute_seconds")
                    .Help("Compute time of an expert's rows of one request.")
                    .Register(r)),
      held_(&BuildGauge()
                 .Name("moe_worker_experts_held")
                 .Help("(layer, expert) pairs this worker holds.")
                 .Register(r)
                 .Add({{"model", model}})),
      ok_(&requests_->Add({{"model", model}, {"outcome", "success"}})),
      failed_(&requests_->Add({{"model", model}, {"outcome", "error"}})) {}

void ExpertWorkerMetrics::OnHeld(const ExpertSet& held) {
  static const prometheus::Histogram::BucketBoundaries buckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                                                                  0.01,   0.025,   0.05,   0.1,   0.25,   1};
  held_->Set(static_cast<double>(held.count()));
  absl::MutexLock lock(&mu_);
  num_experts_ = held.num_experts();
  expert_rows_.resize(static_cast<size_t>(held.num_layers()) * num_experts_, nullptr);
  expert_compute_.resize(expert_rows_.size(), nullptr);
  for (int layer = 0; layer < held.num_layers(); ++layer) {
    for (int e = 0; e < num_experts_; ++e) {
      const size_t at = static_cast<size_t>(layer) * num_experts_ + e;
      if (!held.Contains(layer, e) || expert_rows_[at]) continue;
      const prometheus::Labels labels{{"model", model_}, {"layer", absl::StrCat(layer)}, {"expert", absl::StrCat(e)}};
      expert_rows_[at] = &rows_->Add(labels);
      expert_compute_[at] = &compute_->Add(labels, buckets);
    }
  }
}

void ExpertWorkerMetrics::OnRequest(const WorkerRequestReport& report) {
  if (report.code != absl::StatusCode::kOk) {
    failed_->Increment();
    return;
  }
  ok_->Increment();
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < report.experts.size(); ++i) {
    const size_t at = static_cast<size_t>(report.layer) * num_experts_ + report.experts[i];
    if (at >= expert_rows_.size() || !expert_rows_[at]) continue;
    expert_rows_[at]->Increment(static_cast<double>(report.expert_rows[i]));
    if (i < report.expert_seconds.size()) expert_compute_[at]->Observe(report.expert_seconds[i]);
  }
}

}  // namespace moe
