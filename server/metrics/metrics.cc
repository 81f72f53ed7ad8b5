#include "server/metrics/metrics.h"

#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "prometheus/collectable.h"

namespace moe {
namespace {

using prometheus::Histogram;

const Histogram::BucketBoundaries& DurationBuckets() {
  static const Histogram::BucketBoundaries buckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                      0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,    10};
  return buckets;
}
const Histogram::BucketBoundaries& TokenBuckets() {
  static const Histogram::BucketBoundaries buckets = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
  return buckets;
}
Histogram::BucketBoundaries ExpertBuckets(ExpertLatencyMetrics mode) {
  if (mode == ExpertLatencyMetrics::kCoarse) return {0.001, 0.01, 0.1};
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1};
}

// Outcome labels of moe_requests_total.
enum Outcome { kSuccess, kRejected, kTimedOut, kCancelled, kError, kNumOutcomes };
constexpr const char* kOutcomeNames[kNumOutcomes] = {"success", "rejected", "timed_out", "cancelled", "error"};

Outcome OutcomeOf(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return kSuccess;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return kRejected;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kTimedOut;
    case grpc::StatusCode::CANCELLED:
      return kCancelled;
    default:
      return kError;
  }
}

// Process series, computed when scraped.
class ProcessCollector : public prometheus::Collectable {
 public:
  ProcessCollector() : start_(absl::Now()) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    auto add = [&out](const char* name, const char* help, prometheus::MetricType type, double value) {
      prometheus::MetricFamily family{name, help, type, {}};
      prometheus::ClientMetric metric;
      if (type == prometheus::MetricType::Counter) {
        metric.counter.value = value;
      } else {
        metric.gauge.value = value;
      }
      family.metric.push_back(metric);
      out.push_back(std::move(family));
    };
    add("moe_uptime_seconds", "Seconds since the server started.", prometheus::MetricType::Gauge,
        absl::ToDoubleSeconds(absl::Now() - start_));
    add("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds.",
        prometheus::MetricType::Gauge, absl::ToDoubleSeconds(start_ - absl::UnixEpoch()));
    std::ifstream stat("/proc/self/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    // Fields after the command name (which may hold spaces): utime is the
    // 12th of them, stime the 13th, rss the 22nd (in pages).
    const size_t close = text.rfind(')');
    if (close != std::string::npos) {
      std::istringstream fields(text.substr(close + 2));
      std::vector<std::string> f((std::istream_iterator<std::string>(fields)), std::istream_iterator<std::string>());
      if (f.size() > 21) {
        const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
        add("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
            prometheus::MetricType::Counter, (std::stod(f[11]) + std::stod(f[12])) / ticks);
        add("process_resident_memory_bytes", "Resident memory size in bytes.", prometheus::MetricType::Gauge,
            std::stod(f[21]) * static_cast<double>(sysconf(_SC_PAGESIZE)));
      }
    }
    return out;
  }

 private:
  const absl::Time start_;
};

// "host:port" (the host possibly in brackets) split in two; false if there
// is no port.
bool SplitHostPort(const std::string& address, std::string* host, std::string* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  return true;
}

// The first address `host`:`port` resolves to (passive: a wildcard for an
// empty host). Null if none; free with freeaddrinfo.
addrinfo* Resolve(const std::string& host, const std::string& port, bool passive) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* found = nullptr;
  if (getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found) != 0) return nullptr;
  return found;
}

// Why binding `address` fails, found by binding it the way civetweb does
// (whose exception only says "possible problem binding to port"); empty if
// it can be bound now.
std::string BindError(const std::string& address) {
  std::string host, port;
  if (!SplitHostPort(address, &host, &port)) return "no port in the address";
  addrinfo* found = Resolve(host, port, /*passive=*/true);
  if (found == nullptr) return absl::StrCat("cannot resolve '", host, "'");
  std::string error;
  const int fd = socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC, found->ai_protocol);
  const int on = 1;
  if (fd < 0) {
    error = std::strerror(errno);
  } else {
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on));
    if (bind(fd, found->ai_addr, found->ai_addrlen) != 0) error = std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(found);
  return error;
}

// Where a client reaches a server listening on `address`: a wildcard host
// becomes loopback. Null if it does not resolve; free with freeaddrinfo.
addrinfo* ResolveListener(const std::string& address, int port) {
  std::string host, ignored;
  if (!SplitHostPort(address, &host, &ignored)) return nullptr;
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  if (host == "::") host = "::1";
  return Resolve(host, std::to_string(port), /*passive=*/false);
}

}  // namespace

absl::StatusOr<ExpertLatencyMetrics> ParseExpertLatencyMetrics(const std::string& text) {
  if (text == "full") return ExpertLatencyMetrics::kFull;
  if (text == "coarse") return ExpertLatencyMetrics::kCoarse;
  if (text == "off") return ExpertLatencyMetrics::kOff;
  return absl::InvalidArgumentError(
      absl::StrCat("expert latency metrics must be full, coarse or off, got '", text, "'"));
}

// Load of one layer's experts over a sliding window of time buckets, kept as
// running sums so an update costs O(experts).
class LoadWindow {
 public:
  LoadWindow(int experts, absl::Duration window)
      : bucket_length_(window / kBuckets), counts_(kBuckets, std::vector<int64_t>(experts, 0)), sums_(experts, 0) {}

  void Add(absl::Time now, std::span<const int64_t> routed) {
    const int64_t bucket = absl::ToInt64Nanoseconds(now - absl::UnixEpoch()) / absl::ToInt64Nanoseconds(bucket_length_);
    // Expire the buckets that left the window.
    for (int64_t b = std::max(current_ + 1, bucket - kBuckets + 1); b <= bucket && current_ >= 0; ++b) {
      auto& old = counts_[static_cast<size_t>(b % kBuckets)];
      for (size_t e = 0; e < old.size(); ++e) sums_[e] -= old[e];
      std::fill(old.begin(), old.end(), 0);
    }
    if (current_ < 0 || bucket - current_ >= kBuckets) {
      for (auto& c : counts_) std::fill(c.begin(), c.end(), 0);
      std::fill(sums_.begin(), sums_.end(), 0);
    }
    current_ = bucket;
    auto& now_counts = counts_[static_cast<size_t>(bucket % kBuckets)];
    for (size_t e = 0; e < routed.size(); ++e) {
      now_counts[e] += routed[e];
      sums_[e] += routed[e];
    }
  }
  // Tokens per expert over the window.
  const std::vector<int64_t>& sums() const { return sums_; }
  // max / mean and standard deviation / mean of the window's per-expert load.
  std::pair<double, double> ImbalanceAndCv() const {
    double total = 0, max = 0;
    for (int64_t s : sums_) {
      total += static_cast<double>(s);
      max = std::max(max, static_cast<double>(s));
    }
    if (total <= 0) return {0, 0};
    const double mean = total / static_cast<double>(sums_.size());
    double variance = 0;
    for (int64_t s : sums_) variance += (static_cast<double>(s) - mean) * (static_cast<double>(s) - mean);
    variance /= static_cast<double>(sums_.size());
    return {max / mean, std::sqrt(variance) / mean};
  }

 private:
  static constexpr int kBuckets = 12;
  const absl::Duration bucket_length_;
  int64_t current_ = -1;
  std::vector<std::vector<int64_t>> counts_;
  std::vector<int64_t> sums_;
};

struct ServerMetrics::ModelSeries {
  struct Layer {
    std::vector<prometheus::Counter*> routed, dropped;
    std::vector<prometheus::Histogram*> compute;  // empty when off
    prometheus::Gauge* imbalance = nullptr;
    prometheus::Gauge* cv = nullptr;
    std::unique_ptr<LoadWindow> window;
  };
  prometheus::Counter* requests[kNumOutcomes] = {};
  prometheus::Histogram* request_duration = nullptr;
  prometheus::Histogram* queue_duration = nullptr;
  prometheus::Histogram* compute_duration = nullptr;
  prometheus::Histogram* batch_tokens = nullptr;
  prometheus::Counter* batches = nullptr;
  prometheus::Gauge* pending = nullptr;
  absl::Mutex window_mu;
  std::vector<Layer> layers;  // windows guarded by window_mu
  std::unique_ptr<EngineObserver> observer;
};

class ServerMetrics::ExpertObserver : public EngineObserver {
 public:
  explicit ExpertObserver(ModelSeries* series) : series_(*series) {}
  void OnLayer(const LayerReport& report) override {
    ModelSeries::Layer& layer = series_.layers[report.layer];
    for (size_t e = 0; e < report.tokens_routed.size(); ++e) {
      if (report.tokens_routed[e] == 0) continue;
      layer.routed[e]->Increment(static_cast<double>(report.tokens_routed[e]));
      if (report.tokens_dropped[e] > 0) layer.dropped[e]->Increment(static_cast<double>(report.tokens_dropped[e]));
      if (!layer.compute.empty() && !report.compute_seconds.empty()) {
        layer.compute[e]->Observe(report.compute_seconds[e]);
      }
    }
    absl::MutexLock lock(&series_.window_mu);
    layer.window->Add(absl::Now(), report.tokens_routed);
    const auto [imbalance, cv] = layer.window->ImbalanceAndCv();
    layer.imbalance->Set(imbalance);
    layer.cv->Set(cv);
  }

 private:
  ModelSeries& series_;
};

ServerMetrics::ServerMetrics(const Options& options)
    : options_(options), registry_(std::make_shared<prometheus::Registry>()) {
  using prometheus::BuildCounter;
  using prometheus::BuildGauge;
  using prometheus::BuildHistogram;
  prometheus::Registry& r = *registry_;
  tokens_routed_ = &BuildCounter()
                        .Name("moe_expert_tokens_routed_total")
                        .Help("Token selections routed to an expert (kept and dropped).")
                        .Register(r);
  tokens_dropped_ = &BuildCounter()
                         .Name("moe_expert_tokens_dropped_total")
                         .Help("Token selections an expert dropped because of its capacity.")
                         .Register(r);
  expert_compute_ =
      &BuildHistogram()
           .Name("moe_expert_compute_seconds")
           .Help(
               "Compute time of one expert on its rows of one batch (on a GPU: the layer's expert time, measured "
               "by CUDA events, split over the experts by their rows).")
           .Register(r);
  requests_ = &BuildCounter().Name("moe_requests_total").Help("Inference requests by outcome.").Register(r);
  request_duration_ = &BuildHistogram()
                           .Name("moe_request_duration_seconds")
                           .Help("Time from a request's arrival to its answer.")
                           .Register(r);
  queue_duration_ = &BuildHistogram()
                         .Name("moe_queue_duration_seconds")
                         .Help("Time a request waited in the queue before its batch ran.")
                         .Register(r);
  compute_duration_ =
      &BuildHistogram().Name("moe_batch_compute_seconds").Help("Compute time of one executed batch.").Register(r);
  batch_tokens_ = &BuildHistogram().Name("moe_batch_tokens").Help("Tokens per executed batch.").Register(r);
  batches_ = &BuildCounter().Name("moe_batch_executions_total").Help("Batches executed.").Register(r);
  pending_ = &BuildGauge().Name("moe_pending_requests").Help("Requests accepted and not yet answered.").Register(r);
  imbalance_ = &BuildGauge()
                    .Name("moe_layer_load_imbalance")
                    .Help("Max over mean of expert load in the layer over the sliding window (1 = balanced).")
                    .Register(r);
  load_cv_ = &BuildGauge()
                  .Name("moe_layer_load_cv")
                  .Help("Coefficient of variation of expert load in the layer over the sliding window.")
                  .Register(r);
  worker_families_ = std::make_unique<WorkerFamilies>(r);
  models_loaded_ = &BuildGauge().Name("moe_models_loaded").Help("Model versions loaded.").Register(r).Add({});
  unattributed_requests_ =
      &BuildCounter()
           .Name("moe_requests_unattributed_total")
           .Help("Inference requests answered before a model was found (unknown model, shutting down).")
           .Register(r)
           .Add({});
  BuildGauge()
      .Name("moe_build_info")
      .Help("Build information; the value is 1.")
      .Register(r)
      .Add({{"version", kServerVersion}})
      .Set(1);
}

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(const Options& options) {
  auto metrics = std::unique_ptr<ServerMetrics>(new ServerMetrics(options));
  if (!options.listen_address.empty()) {
    try {
      metrics->exposer_ = std::make_unique<prometheus::Exposer>(options.listen_address);
    } catch (const std::exception& e) {
      const std::string cause = BindError(options.listen_address);
      return absl::UnavailableError(
          absl::StrCat("cannot serve metrics on ", options.listen_address, ": ", cause.empty() ? e.what() : cause));
    }
    metrics->exposer_->RegisterCollectable(metrics->registry_);
    metrics->process_collector_ = std::make_shared<ProcessCollector>();
    metrics->exposer_->RegisterCollectable(metrics->process_collector_);
  }
  return metrics;
}

ServerMetrics::~ServerMetrics() {
  if (exposer_ == nullptr) return;
  // The exposer's destructor waits for civetweb's accept loop to notice the
  // stop, and that loop polls its socket in 2-second quanta: shutting down
  // took up to 2 s more than it had to. A connection wakes the loop at once.
  // Connections keep coming until the exposer is gone, since one that
  // arrives before the stop is taken as a request (and just closed).
  addrinfo* listener = ResolveListener(options_.listen_address, port());
  std::atomic<bool> stopped{false};
  std::thread waker([listener, &stopped] {
    while (listener != nullptr && !stopped.load()) {
      const int fd = socket(listener->ai_family, listener->ai_socktype | SOCK_CLOEXEC, listener->ai_protocol);
      if (fd >= 0) {
        connect(fd, listener->ai_addr, listener->ai_addrlen);
        close(fd);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  exposer_.reset();
  stopped.store(true);
  waker.join();
  if (listener != nullptr) freeaddrinfo(listener);
}

int ServerMetrics::port() const {
  if (!exposer_) return 0;
  const auto ports = exposer_->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

WorkerObserver* ServerMetrics::AddWorkers(const std::string& name, int64_t version) {
  auto series = std::make_unique<WorkerMetrics>(*worker_families_, name, absl::StrCat(version));
  WorkerObserver* observer = series.get();
  absl::MutexLock lock(&mu_);
  workers_.push_back(std::move(series));
  return observer;
}

EngineObserver* ServerMetrics::AddModel(int model_index, const std::string& name, int64_t version,
                                        const ModelDefinition& definition) {
  auto series = std::make_unique<ModelSeries>();
  const std::string v = absl::StrCat(version);
  const prometheus::Labels model{{"model", name}, {"version", v}};
  for (int o = 0; o < kNumOutcomes; ++o) {
    series->requests[o] = &requests_->Add({{"model", name}, {"version", v}, {"outcome", kOutcomeNames[o]}});
  }
  series->request_duration = &request_duration_->Add(model, DurationBuckets());
  series->queue_duration = &queue_duration_->Add(model, DurationBuckets());
  series->compute_duration = &compute_duration_->Add(model, DurationBuckets());
  series->batch_tokens = &batch_tokens_->Add(model, TokenBuckets());
  series->batches = &batches_->Add(model);
  series->pending = &pending_->Add(model);
  const int experts = definition.spec.router.num_experts;
  const auto expert_buckets = ExpertBuckets(options_.expert_latency);
  for (size_t l = 0; l < definition.layers.size(); ++l) {
    ModelSeries::Layer layer;
    const std::string layer_label = absl::StrCat(l);
    for (int e = 0; e < experts; ++e) {
      const prometheus::Labels labels{
          {"model", name}, {"version", v}, {"layer", layer_label}, {"expert", absl::StrCat(e)}};
      layer.routed.push_back(&tokens_routed_->Add(labels));
      layer.dropped.push_back(&tokens_dropped_->Add(labels));
      if (options_.expert_latency != ExpertLatencyMetrics::kOff) {
        layer.compute.push_back(&expert_compute_->Add(labels, expert_buckets));
      }
    }
    const prometheus::Labels layer_labels{{"model", name}, {"version", v}, {"layer", layer_label}};
    layer.imbalance = &imbalance_->Add(layer_labels);
    layer.cv = &load_cv_->Add(layer_labels);
    layer.window = std::make_unique<LoadWindow>(experts, options_.imbalance_window);
    series->layers.push_back(std::move(layer));
  }
  series->observer = std::make_unique<ExpertObserver>(series.get());
  EngineObserver* observer = series->observer.get();
  models_loaded_->Increment();
  absl::MutexLock lock(&mu_);
  if (model_index >= 0) {
    if (by_index_.size() <= static_cast<size_t>(model_index)) by_index_.resize(model_index + 1, nullptr);
    by_index_[model_index] = series.get();
  }
  series_.push_back(std::move(series));
  return observer;
}

ExpertWorkerObserver* ServerMetrics::AddExpertWorker(const std::string& model) {
  auto series = std::make_unique<ExpertWorkerMetrics>(*registry_, model);
  ExpertWorkerObserver* observer = series.get();
  absl::MutexLock lock(&mu_);
  expert_workers_.push_back(std::move(series));
  return observer;
}

absl::StatusOr<std::vector<std::vector<double>>> ServerMetrics::ExpertLoad(int model_index) {
  ModelSeries* series = SeriesOf(model_index);
  if (series == nullptr) return absl::NotFoundError(absl::StrCat("no metrics for model index ", model_index));
  std::vector<std::vector<double>> load;
  absl::MutexLock lock(&series->window_mu);
  for (const ModelSeries::Layer& layer : series->layers) {
    load.emplace_back(layer.window->sums().begin(), layer.window->sums().end());
  }
  return load;
}

ServerMetrics::ModelSeries* ServerMetrics::SeriesOf(int model_index) {
  absl::MutexLock lock(&mu_);
  if (model_index < 0 || static_cast<size_t>(model_index) >= by_index_.size()) return nullptr;
  return by_index_[model_index];
}

void ServerMetrics::OnBatch(int model_index, int /*num_requests*/, int num_tokens, double compute_seconds,
                            const std::vector<double>& queue_seconds) {
  ModelSeries* series = SeriesOf(model_index);
  if (series == nullptr) return;
  series->batches->Increment();
  series->batch_tokens->Observe(num_tokens);
  series->compute_duration->Observe(compute_seconds);
  for (double seconds : queue_seconds) series->queue_duration->Observe(seconds);
}

void ServerMetrics::OnRequestStart(int model_index) {
  if (ModelSeries* series = SeriesOf(model_index)) series->pending->Increment();
}

void ServerMetrics::OnRequestDone(int model_index, grpc::StatusCode code, double seconds) {
  ModelSeries* series = SeriesOf(model_index);
  if (series == nullptr) {
    unattributed_requests_->Increment();
    return;
  }
  series->requests[OutcomeOf(code)]->Increment();
  series->request_duration->Observe(seconds);
  series->pending->Decrement();
}

}  // namespace moe
