// The cost of experts on worker processes, beside its reference measured in
// the same run: a front end whose routed experts run on two moe-workers
// (half each, over loopback gRPC: one stream per worker, bf16 rows out,
// fp32 rows back) against the same model in one process, at T = 1, 64 and
// 512 tokens per batch. Workers run in this process on their own gRPC
// servers, so the front end and the workers share the cores as processes on
// one machine would.
//
// Each row prints both times, their ratio, and the bytes a token moves per
// layer (2 x k x hidden x 2 out + 4 back), with the time those bytes take on
// 25, 100 and 400 Gb/s links (the model for workers on other hosts: the
// per-layer transfer adds to the layer unless the front end's own experts
// cover it).
//
//   build/bench/remote_bench [--seconds=2]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "remote/remote_experts.h"
#include "server/worker/expert_worker.h"

ABSL_FLAG(double, seconds, 2, "seconds per measurement");

namespace moe {
namespace {

struct Shape {
  const char* name;
  int hidden, intermediate, experts, top_k, layers;
};

ModelDefinition Model(const Shape& shape) {
  ModelSpec spec;
  spec.name = shape.name;
  spec.hidden_size = shape.hidden;
  spec.intermediate_size = shape.intermediate;
  spec.router.num_experts = shape.experts;
  spec.router.top_k = shape.top_k;
  spec.router.norm_topk_prob = true;
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = DType::kBF16;
  return GenerateRandomModel(spec, shape.layers, 7);
}

// Median seconds per batch of `tokens` over about `seconds`.
double SecondsPerBatch(const MoeModel& model, int tokens, double seconds) {
  std::vector<float> input(static_cast<size_t>(tokens) * model.spec().hidden_size);
  std::mt19937 rng(tokens);
  std::normal_distribution<float> normal;
  for (float& v : input) v = normal(rng);
  auto planned = model.NewWorkspace(tokens);
  if (!planned.ok()) std::abort();
  MoeModel::RunResult result;
  std::vector<double> times;
  const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (times.size() < 5 || std::chrono::steady_clock::now() < end) {
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status status = model.Run(input.data(), tokens, {}, planned->get(), &result); !status.ok()) {
      std::fprintf(stderr, "remote_bench: %s\n", status.ToString().c_str());
      std::exit(1);
    }
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

ExpertWorker::Options Half(int experts, bool upper) {
  ExpertWorker::Options options;
  options.address = "127.0.0.1:0";
  options.experts = upper ? absl::StrCat(experts / 2, "-", experts - 1) : absl::StrCat("0-", experts / 2 - 1);
  return options;
}

void Measure(const Shape& shape, double seconds) {
  const ModelDefinition definition = Model(shape);
  auto local = MoeModel::Create(definition, {});
  auto low = ExpertWorker::Create(definition, Half(shape.experts, false));
  auto high = ExpertWorker::Create(definition, Half(shape.experts, true));
  if (!local.ok() || !low.ok() || !high.ok()) std::abort();
  RemoteExperts::Options options{
      .workers = {}, .num_layers = shape.layers, .num_experts = shape.experts, .compute = DType::kBF16};
  for (const auto* worker : {&*low, &*high}) {
    const auto held = (*worker)->executor()->held();
    options.workers.push_back({.address = absl::StrCat("127.0.0.1:", (*worker)->port()), .experts = held});
  }
  auto remote = RemoteExperts::Create(options);
  if (!remote.ok()) std::abort();
  auto executor = CreateExecutor(definition, {.kind = "cpu",
                                              .compute = DType::kBF16,
                                              .held = ExpertSet::None(shape.layers, shape.experts),
                                              .offload = remote->get()});
  if (!executor.ok()) std::abort();
  auto front = MoeModel::Create(definition, std::move(*executor), {});
  if (!front.ok()) std::abort();
  for (int tokens : {1, 64, 512}) {
    const double one = SecondsPerBatch(**local, tokens, seconds);
    const double split = SecondsPerBatch(**front, tokens, seconds);
    const double bytes = 2.0 * shape.top_k * shape.hidden * 3;  // per token and layer: bf16 out, fp32 back
    const double batch_bytes = bytes * tokens * shape.layers;
    std::printf(
        "%-14s T=%-4d one process %9.3f ms   front+2 workers %9.3f ms   ratio %5.2f   %6.0f B/token/layer"
        "   wire at 25/100/400 Gb/s: %.3f / %.3f / %.3f ms\n",
        shape.name, tokens, one * 1e3, split * 1e3, split / one, bytes, batch_bytes * 8 / 25e9 * 1e3,
        batch_bytes * 8 / 100e9 * 1e3, batch_bytes * 8 / 400e9 * 1e3);
  }
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const double seconds = absl::GetFlag(FLAGS_seconds);
  std::printf("experts on two moe-workers over loopback vs one process (bf16; times are medians per batch)\n");
  moe::Measure({"small_16x2", 1024, 1024, 16, 2, 2}, seconds);
  moe::Measure({"wide_64x6", 2048, 512, 64, 6, 2}, seconds);
  return 0;
}
