#include "client/load_generator.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_format.h"

namespace moe {
namespace {

// Latencies and outcomes, shared by the request threads.
class Recorder {
 public:
  void Record(double ms, const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (status.ok()) {
      latencies_.push_back(ms);
    } else {
      ++errors_;
      if (first_error_.empty()) first_error_ = absl::StrFormat("%d: %s", status.error_code(), status.error_message());
    }
  }
  int64_t done() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(latencies_.size()) + errors_;
  }
  LoadReport Report(double seconds, int tokens) {
    std::lock_guard<std::mutex> lock(mu_);
    LoadReport report;
    report.ok = static_cast<int64_t>(latencies_.size());
    report.errors = errors_;
    report.first_error = first_error_;
    report.seconds = seconds;
    report.requests_per_second = report.ok / seconds;
    report.tokens_per_second = report.ok * static_cast<double>(tokens) / seconds;
    if (!latencies_.empty()) {
      std::sort(latencies_.begin(), latencies_.end());
      auto at = [&](double q) {
        return latencies_[std::min(latencies_.size() - 1, static_cast<size_t>(q * latencies_.size()))];
      };
      report.p50_ms = at(0.50);
      report.p90_ms = at(0.90);
      report.p99_ms = at(0.99);
      report.max_ms = latencies_.back();
      double sum = 0;
      for (double v : latencies_) sum += v;
      report.mean_ms = sum / latencies_.size();
    }
    return report;
  }

 private:
  std::mutex mu_;
  std::vector<double> latencies_;
  int64_t errors_ = 0;
  std::string first_error_;
};

}  // namespace

std::string LoadReport::ToText() const {
  return absl::StrFormat(
      "requests: %d ok, %d errors in %.2f s\nthroughput: %.1f requests/s, %.1f tokens/s\n"
      "latency ms: p50 %.3f  p90 %.3f  p99 %.3f  max %.3f  mean %.3f%s",
      ok, errors, seconds, requests_per_second, tokens_per_second, p50_ms, p90_ms, p99_ms, max_ms, mean_ms,
      first_error.empty() ? "" : "\nfirst error: " + first_error);
}

std::string LoadReport::ToJson() const {
  return absl::StrFormat(
      "{\"ok\": %d, \"errors\": %d, \"seconds\": %.4f, \"requests_per_second\": %.3f, \"tokens_per_second\": %.3f, "
      "\"latency_ms\": {\"p50\": %.4f, \"p90\": %.4f, \"p99\": %.4f, \"max\": %.4f, \"mean\": %.4f}}",
      ok, errors, seconds, requests_per_second, tokens_per_second, p50_ms, p90_ms, p99_ms, max_ms, mean_ms);
}

LoadReport RunLoad(MoeClient& client, const LoadOptions& options) {
  std::vector<float> input(static_cast<size_t>(options.tokens) * options.hidden);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& v : input) v = normal(rng);
  const inference::ModelInferRequest request = MoeClient::BuildRequest(
      {.model = options.model, .input = input.data(), .tokens = options.tokens, .hidden = options.hidden});
  Recorder recorder;
  std::atomic<int64_t> issued{0};
  const absl::Time start = absl::Now();
  const absl::Time end = start + options.duration;
  auto more = [&] {
    if (options.requests > 0) return issued.fetch_add(1) < options.requests;
    return absl::Now() < end;
  };
  std::atomic<bool> finished{false};
  std::thread progress([&] {
    absl::Time last = start;
    while (!finished.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      if (absl::Now() - last < absl::Seconds(1) || finished.load()) continue;
      last = absl::Now();
      const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
      if (options.progress) {
        options.progress(absl::StrFormat("%.0f s: %d requests, %.1f requests/s", elapsed, recorder.done(),
                                         recorder.done() / elapsed));
      }
    }
  });
  if (options.rate <= 0) {
    std::vector<std::thread> workers;
    for (int w = 0; w < options.concurrency; ++w) {
      workers.emplace_back([&] {
        while (more()) {
          grpc::ClientContext context;
          inference::ModelInferResponse response;
          const absl::Time sent = absl::Now();
          const grpc::Status status = client.stub().ModelInfer(&context, request, &response);
          recorder.Record(absl::ToDoubleMilliseconds(absl::Now() - sent), status);
        }
      });
    }
    for (auto& worker : workers) worker.join();
  } else {
    // Open loop: send on schedule with the async stub; completions record.
    std::mutex mu;
    std::condition_variable all_done;
    int64_t in_flight = 0;
    const absl::Duration interval = absl::Seconds(1.0 / options.rate);
    absl::Time next = start;
    while (more()) {
      const absl::Time now = absl::Now();
      if (next > now) std::this_thread::sleep_for(absl::ToChronoNanoseconds(next - now));
      next += interval;
      struct Call {
        grpc::ClientContext context;
        inference::ModelInferResponse response;
        absl::Time sent;
      };
      auto* call = new Call;
      call->sent = absl::Now();
      {
        std::lock_guard<std::mutex> lock(mu);
        ++in_flight;
      }
      client.stub().async()->ModelInfer(&call->context, &request, &call->response, [&, call](grpc::Status status) {
        recorder.Record(absl::ToDoubleMilliseconds(absl::Now() - call->sent), status);
        delete call;
        std::lock_guard<std::mutex> lock(mu);
        if (--in_flight == 0) all_done.notify_all();
      });
    }
    std::unique_lock<std::mutex> lock(mu);
    all_done.wait(lock, [&] { return in_flight == 0; });
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  finished.store(true);
  progress.join();
  return recorder.Report(seconds, options.tokens);
}

}  // namespace moe
