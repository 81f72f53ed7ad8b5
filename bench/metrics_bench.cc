// What the metrics cost per batch, against the batch's own compute time, on
// the demo model at T = 64: the engine's per-layer expert reports, the
// scheduler's per-batch series, and per-request outcome series for 64
// one-token requests, all through the real ServerMetrics with cached handles.
//
//   build/bench/metrics_bench
#include <chrono>
#include <cstdio>
#include <random>

#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "server/metrics/metrics.h"

namespace {

template <typename Fn>
double SecondsPerCall(Fn&& fn, double min_seconds = 1.0) {
  int calls = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  while (elapsed < min_seconds) {
    fn();
    ++calls;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return elapsed / calls;
}

}  // namespace

int main() {
  constexpr int kTokens = 64;
  const moe::ModelDefinition demo = moe::DemoModel();
  auto metrics = moe::ServerMetrics::Create({.listen_address = ""});
  if (!metrics.ok()) return 1;
  moe::EngineObserver* observer = (*metrics)->AddModel(0, "demo", 1, demo);
  auto plain = moe::MoeModel::Create(demo, {});
  auto observed = moe::MoeModel::Create(demo, {.observer = observer});
  if (!plain.ok() || !observed.ok()) return 1;
  std::vector<float> input(static_cast<size_t>(kTokens) * demo.spec.hidden_size);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& v : input) v = normal(rng);
  auto planned_plain = (*plain)->NewWorkspace(kTokens);
  auto planned_observed = (*observed)->NewWorkspace(kTokens);
  if (!planned_plain.ok() || !planned_observed.ok()) return 1;
  auto ws_plain = std::move(*planned_plain);
  auto ws_observed = std::move(*planned_observed);
  moe::MoeModel::RunResult result;
  const std::vector<double> queue(kTokens, 0.001);
  // The metrics work of one batch of 64 one-token requests, alone.
  std::vector<int64_t> routed(8, 16), dropped(8, 0);
  std::vector<double> seconds(8, 0.0001);
  const moe::LayerReport report{.layer = 0,
                                .num_tokens = kTokens,
                                .tokens_routed = routed,
                                .tokens_dropped = dropped,
                                .compute_seconds = seconds};
  const double metrics_seconds = SecondsPerCall([&] {
    for (int layer = 0; layer < 2; ++layer) {
      moe::LayerReport r = report;
      r.layer = layer;
      observer->OnLayer(r);
    }
    (*metrics)->OnBatch(0, kTokens, kTokens, 0.001, queue);
    for (int i = 0; i < kTokens; ++i) {
      (*metrics)->OnRequestStart(0);
      (*metrics)->OnRequestDone(0, grpc::StatusCode::OK, 0.002);
    }
  });
  const double batch_plain =
      SecondsPerCall([&] { (void)(*plain)->Run(input.data(), kTokens, {}, ws_plain.get(), &result); });
  const double batch_observed =
      SecondsPerCall([&] { (void)(*observed)->Run(input.data(), kTokens, {}, ws_observed.get(), &result); });
  std::printf("demo model, T = %d (one batch of %d one-token requests)\n", kTokens, kTokens);
  std::printf("batch compute, no observer:        %8.1f us\n", batch_plain * 1e6);
  std::printf("batch compute, metrics observer:   %8.1f us\n", batch_observed * 1e6);
  std::printf("metrics work of one batch alone:   %8.2f us = %.3f%% of the batch (target < 1%%)\n",
              metrics_seconds * 1e6, 100 * metrics_seconds / batch_plain);
  return 0;
}
