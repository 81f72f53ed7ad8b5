// ServerMetrics: moe-serve's Prometheus metrics (names in docs/METRICS.md),
// served by prometheus-cpp's exposer at /metrics on the metrics port.
//
// Every series handle is created when a model loads and cached; the hot path
// increments cached references once per batch (per layer for expert series),
// with no label lookups and no string work. Thread-safe: batches and RPCs of
// any threads report concurrently. Must outlive the server it observes.
#ifndef MOE_SERVER_METRICS_METRICS_H_
#define MOE_SERVER_METRICS_METRICS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/api/model_spec.h"
#include "engine/api/observer.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "remote/remote_experts.h"
#include "server/batching/batch_scheduler.h"
#include "server/frontend/inference_service.h"
#include "server/metrics/expert_worker_metrics.h"
#include "server/metrics/worker_metrics.h"

namespace moe {

// How per-expert compute latency is exported. Counters are always exported;
// histograms cost (buckets + 2) series per expert and layer.
enum class ExpertLatencyMetrics {
  kFull,    // 10 buckets, 100 us to 1 s
  kCoarse,  // 3 buckets: 1 ms, 10 ms, 100 ms
  kOff,
};

absl::StatusOr<ExpertLatencyMetrics> ParseExpertLatencyMetrics(const std::string& text);

class ServerMetrics : public SchedulerObserver, public RequestObserver {
 public:
  struct Options {
    // Address of the /metrics endpoint ("0.0.0.0:8002"; port 0 picks one).
    // Empty: no exposer (the registry can still be read, e.g. in tests).
    std::string listen_address = "0.0.0.0:8002";
    ExpertLatencyMetrics expert_latency = ExpertLatencyMetrics::kFull;
    // Sliding window of the load-imbalance gauges.
    absl::Duration imbalance_window = absl::Seconds(60);
  };

  // Starts the exposer. Binding failures come back as UNAVAILABLE, naming
  // the address and the cause (the exposer throws; nothing escapes this
  // constructor function).
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(const Options& options);
  // Stops the exposer, in milliseconds (see metrics.cc).
  ~ServerMetrics() override;

  // Creates the series of a loaded model, which the other calls then name by
  // `model_index` (the registry's ServedModel::index, as ObserverFactory
  // passes it), and returns the engine observer that feeds its expert
  // series. Owned by this object; it stays valid while this object lives,
  // even if `model_index` is added again (the new series then take the
  // index). Reports for an index never added are dropped (a request's
  // outcome is counted as unattributed).
  EngineObserver* AddModel(int model_index, const std::string& name, int64_t version, const ModelDefinition& definition)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Returns the observer of a model's expert workers, which makes their
  // series as placements name them (server/metrics/worker_metrics.h); owned
  // by this object.
  WorkerObserver* AddWorkers(const std::string& name, int64_t version) ABSL_LOCKS_EXCLUDED(mu_);
  // Returns the observer of a moe-worker's own series
  // (server/metrics/expert_worker_metrics.h), owned by this object.
  ExpertWorkerObserver* AddExpertWorker(const std::string& model) ABSL_LOCKS_EXCLUDED(mu_);
  // Tokens routed to each (layer, expert) of model `model_index` over the
  // load window (the one of moe_layer_load_imbalance). NOT_FOUND for an
  // index never added.
  absl::StatusOr<std::vector<std::vector<double>>> ExpertLoad(int model_index) ABSL_LOCKS_EXCLUDED(mu_);

  // SchedulerObserver.
  void OnBatch(int model_index, int num_requests, int num_tokens, double compute_seconds,
               const std::vector<double>& queue_seconds) override;
  // RequestObserver.
  void OnRequestStart(int model_index) override;
  void OnRequestDone(int model_index, grpc::StatusCode code, double seconds) override;

  // The port /metrics listens on (0 without an exposer).
  int port() const;
  const std::shared_ptr<prometheus::Registry>& registry() const { return registry_; }

 private:
  struct ModelSeries;
  class ExpertObserver;
  explicit ServerMetrics(const Options& options);

  const Options options_;
  std::shared_ptr<prometheus::Registry> registry_;
  // Families (owned by the registry).
  prometheus::Family<prometheus::Counter>* tokens_routed_;
  prometheus::Family<prometheus::Counter>* tokens_dropped_;
  prometheus::Family<prometheus::Histogram>* expert_compute_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* request_duration_;
  prometheus::Family<prometheus::Histogram>* queue_duration_;
  prometheus::Family<prometheus::Histogram>* compute_duration_;
  prometheus::Family<prometheus::Histogram>* batch_tokens_;
  prometheus::Family<prometheus::Counter>* batches_;
  prometheus::Family<prometheus::Gauge>* pending_;
  prometheus::Family<prometheus::Gauge>* imbalance_;
  prometheus::Family<prometheus::Gauge>* load_cv_;
  std::unique_ptr<WorkerFamilies> worker_families_;
  prometheus::Gauge* models_loaded_;
  prometheus::Counter* unattributed_requests_;
  // The series of model index i (null where none was added).
  ModelSeries* SeriesOf(int model_index) ABSL_LOCKS_EXCLUDED(mu_);

  absl::Mutex mu_;
  std::vector<std::unique_ptr<ModelSeries>> series_ ABSL_GUARDED_BY(mu_);  // every one made
  std::vector<ModelSeries*> by_index_ ABSL_GUARDED_BY(mu_);                // by model index
  std::vector<std::unique_ptr<WorkerMetrics>> workers_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<ExpertWorkerMetrics>> expert_workers_ ABSL_GUARDED_BY(mu_);
  // The exposer holds collectables weakly: they are owned here.
  std::shared_ptr<prometheus::Collectable> process_collector_;
  std::unique_ptr<prometheus::Exposer> exposer_;  // last: stops serving first
};

}  // namespace moe

#endif  // MOE_SERVER_METRICS_METRICS_H_
