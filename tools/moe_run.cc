// moe-run: runs the engine in-process on a model (the built-in demo model by
// default) with random input and prints what it computed: a quick check that a
// model loads and runs, without a server.
//
//   moe-run                          # demo model, 16 tokens
//   moe-run --model=path/to/hf_dir --tokens=64 --routing
#include <chrono>
#include <cmath>
#include <iostream>
#include <random>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "engine/api/hf_loader.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"

ABSL_FLAG(std::string, model, "", "Hugging Face checkpoint directory (default: the built-in demo model)");
ABSL_FLAG(int, tokens, 16, "tokens to run");
ABSL_FLAG(bool, routing, false, "print the experts chosen for the first tokens");
ABSL_FLAG(bool, fp32, false, "force fp32 compute");
ABSL_FLAG(std::string, cpu_path, "auto", "CPU kernels: auto (MOE_CPU_PATH, else the widest), avx512, avx2, portable");

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string path = absl::GetFlag(FLAGS_model);
  absl::StatusOr<moe::ModelDefinition> definition =
      path.empty() ? absl::StatusOr<moe::ModelDefinition>(moe::DemoModel()) : moe::LoadHuggingFaceModel(path);
  if (!definition.ok()) {
    std::cerr << "moe-run: " << definition.status() << "\n";
    return 1;
  }
  auto cpu_path = moe::ParseCpuPath(absl::GetFlag(FLAGS_cpu_path));
  if (!cpu_path.ok()) {
    std::cerr << "moe-run: --cpu_path: " << cpu_path.status().message() << "\n";
    return 1;
  }
  auto model = moe::MoeModel::Create(*definition, {.force_fp32 = absl::GetFlag(FLAGS_fp32), .cpu_path = *cpu_path});
  if (!model.ok()) {
    std::cerr << "moe-run: " << model.status() << "\n";
    return 1;
  }
  const moe::ModelSpec& spec = (*model)->spec();
  std::cout << absl::StrFormat("model %s (%s): %d MoE layers, hidden %d, %d experts, top-%d; %s\n", spec.name,
                               spec.source_type, (*model)->num_layers(), spec.hidden_size, spec.router.num_experts,
                               spec.router.top_k, (*model)->executor().Describe());
  for (const auto& skipped : spec.skipped_layers) std::cout << "skipped dense layer " << skipped << "\n";
  const int tokens = absl::GetFlag(FLAGS_tokens);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> input(static_cast<size_t>(tokens) * spec.hidden_size);
  for (float& v : input) v = normal(rng);
  auto ws = (*model)->NewWorkspace(tokens);
  if (!ws.ok()) {
    std::cerr << "moe-run: " << ws.status() << "\n";
    return 1;
  }
  moe::MoeModel::RunResult result;
  const auto start = std::chrono::steady_clock::now();
  absl::Status status =
      (*model)->Run(input.data(), tokens, {.return_routing = absl::GetFlag(FLAGS_routing)}, ws->get(), &result);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!status.ok()) {
    std::cerr << "moe-run: " << status << "\n";
    return 1;
  }
  double norm = 0;
  for (float v : result.outputs[0]) norm += static_cast<double>(v) * v;
  std::cout << absl::StrFormat("ran %d tokens in %.3f ms; output[0][0..3] = %.5f %.5f %.5f %.5f; |output| = %.4f\n",
                               tokens, seconds * 1e3, result.outputs[0][0], result.outputs[0][1], result.outputs[0][2],
                               result.outputs[0][3], std::sqrt(norm));
  if (absl::GetFlag(FLAGS_routing)) {
    const int slots = (*model)->routing_slots();
    for (int t = 0; t < std::min(tokens, 4); ++t) {
      std::cout << "token " << t << ":";
      for (int l = 0; l < result.layers_run; ++l) {
        std::cout << " layer " << l << " ->";
        for (int s = 0; s < slots; ++s) {
          const size_t i = (static_cast<size_t>(t) * result.layers_run + l) * slots + s;
          std::cout << absl::StrFormat(" e%d(%.3f)", result.expert_ids[i], result.expert_weights[i]);
        }
      }
      std::cout << "\n";
    }
  }
  return 0;
}
