// Serving overhead and batching gain, each beside its reference measured in
// the same run on the demo model:
//  - tokens/s through moe-serve (closed loop at concurrency 1, 16, 64 with
//    1- and 64-token requests) versus the engine run in-process on batches
//    of the same size (concurrency x tokens);
//  - at concurrency 1, the latency the server adds to the engine's run time;
//  - at concurrency 64 with 1-token requests, tokens/s with dynamic batching
//    versus max_batch_tokens = 1.
//  - the server's own CPU time per request and per token under load (a
//    moe-serve process's CPU counters, /proc/PID/stat), beside the engine's
//    CPU time per token in-process on batches of the same size: the serving
//    overhead as a ratio of CPU time, which holds even though the load
//    generator shares the cores.
// The load generator shares the machine with the server, as a co-located
// client would.
//
//   build/bench/serving_bench [--seconds=4]
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "client/load_generator.h"
#include "engine/api/model_builder.h"
#include "engine/api/repository_model.h"
#include "server/server.h"

ABSL_FLAG(double, seconds, 4, "seconds per load run");

extern char** environ;

namespace moe {
namespace {

struct EngineFigure {
  double tokens_per_second;
  double seconds_per_batch;
  double cpu_seconds_per_token;  // all threads of this process
};

double ProcessCpuSeconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The engine alone on batches of `tokens` tokens.
EngineFigure EngineInProcess(const MoeModel& model, int tokens) {
  std::vector<float> input(static_cast<size_t>(tokens) * model.spec().hidden_size);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& v : input) v = normal(rng);
  auto planned = model.NewWorkspace(tokens);
  if (!planned.ok()) std::abort();
  auto ws = std::move(*planned);
  MoeModel::RunResult result;
  int runs = 0;
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = ProcessCpuSeconds();
  double elapsed = 0;
  while (elapsed < 1.0 || runs < 5) {
    if (!model.Run(input.data(), tokens, {}, ws.get(), &result).ok()) std::abort();
    ++runs;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return {tokens * runs / elapsed, elapsed / runs, (ProcessCpuSeconds() - cpu_start) / (tokens * runs)};
}

// p50 of a bare RPC's round trip (ServerMetadata: no model work), at
// concurrency 1, in microseconds: the part of the added latency that is gRPC.
double BareRoundTripUs() {
  MoeServer::Options options;
  options.grpc_address = "127.0.0.1:0";
  auto server = MoeServer::Create(options);
  if (!server.ok()) std::abort();
  MoeClient client("127.0.0.1:" + std::to_string((*server)->port()));
  std::vector<double> us;
  for (int i = 0; i < 3000; ++i) {
    const auto start = std::chrono::steady_clock::now();
    if (!client.ServerMetadata().ok()) std::abort();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

LoadReport Serve(const MoeServer::Options& server_options, int concurrency, int tokens,
                 const std::string& model = "demo") {
  MoeServer::Options options = server_options;
  options.grpc_address = "127.0.0.1:0";
  auto server = MoeServer::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    std::abort();
  }
  MoeClient client("127.0.0.1:" + std::to_string((*server)->port()));
  const int hidden = (*server)->registry().models()[0]->model->spec().hidden_size;
  // Warm up connections and primitives.
  RunLoad(client, {.model = model,
                   .hidden = hidden,
                   .tokens = tokens,
                   .concurrency = concurrency,
                   .duration = absl::Milliseconds(300)});
  return RunLoad(client, {.model = model,
                          .hidden = hidden,
                          .tokens = tokens,
                          .concurrency = concurrency,
                          .duration = absl::Seconds(absl::GetFlag(FLAGS_seconds))});
}

// A moe-serve process on the demo model, for its CPU counters.
class ServerProcess {
 public:
  ServerProcess() : log_("/tmp/moe_serving_bench_server_" + std::to_string(::getpid()) + ".log") {
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    std::vector<std::string> args = {MOE_SERVE_BINARY, "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=-1"};
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ) != 0) std::abort();
    posix_spawn_file_actions_destroy(&actions);
    constexpr char kListening[] = "moe-serve: listening on gRPC port ";
    for (int i = 0; i < 3000 && port_ == 0; ++i) {
      std::ifstream in(log_);
      for (std::string line; std::getline(in, line);) {
        if (line.rfind(kListening, 0) == 0) port_ = std::stoi(line.substr(sizeof(kListening) - 1));
      }
      usleep(10000);
    }
    if (port_ == 0) std::abort();
  }
  ~ServerProcess() {
    kill(pid_, SIGTERM);
    waitpid(pid_, nullptr, 0);
    std::filesystem::remove(log_);
  }
  int port() const { return port_; }
  // User plus system CPU seconds of every thread of the server so far.
  double CpuSeconds() const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/stat");
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    // The fields after the command name (which may hold spaces) start at
    // field 3; utime and stime are fields 14 and 15, in clock ticks.
    std::istringstream fields(text.substr(text.rfind(')') + 2));
    std::string field;
    double ticks = 0;
    for (int i = 3; i <= 15 && fields >> field; ++i) {
      if (i >= 14) ticks += std::stod(field);
    }
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  const std::string log_;
};

// The server's CPU time per request and per token under closed-loop load,
// beside the engine's CPU time per token on batches of the same size.
void ReportServerCpu(const MoeModel& model) {
  std::printf("\n%-6s %-6s | %17s %17s | %17s | %6s\n", "conc", "tokens", "server CPU us/req", "server CPU us/tok",
              "engine CPU us/tok", "ratio");
  ServerProcess server;
  MoeClient client("127.0.0.1:" + std::to_string(server.port()));
  for (int tokens : {1, 64}) {
    for (int concurrency : {16, 64}) {
      LoadOptions load{.model = "demo",
                       .hidden = model.spec().hidden_size,
                       .tokens = tokens,
                       .concurrency = concurrency,
                       .duration = absl::Milliseconds(300)};
      RunLoad(client, load);  // warm up
      load.duration = absl::Seconds(absl::GetFlag(FLAGS_seconds));
      const double cpu_start = server.CpuSeconds();
      const LoadReport report = RunLoad(client, load);
      const double cpu = server.CpuSeconds() - cpu_start;
      const EngineFigure engine = EngineInProcess(model, std::min(concurrency * tokens, 4096));
      const double per_token = cpu / static_cast<double>(report.ok * tokens);
      std::printf("%-6d %-6d | %17.1f %17.2f | %17.2f | %6.2f%s\n", concurrency, tokens, cpu / report.ok * 1e6,
                  per_token * 1e6, engine.cpu_seconds_per_token * 1e6, per_token / engine.cpu_seconds_per_token,
                  report.errors ? "  (errors!)" : "");
    }
  }
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  auto model = moe::MoeModel::Create(moe::DemoModel(), {});
  if (!model.ok()) return 1;
  std::printf("demo model: %s\n\n", (*model)->executor().Describe().c_str());
  std::printf("%-6s %-6s | %12s %9s %9s | %14s | %6s\n", "conc", "tokens", "server tok/s", "p50 ms", "p99 ms",
              "engine tok/s", "ratio");
  double c1_added_us[2] = {0, 0};
  int row = 0;
  for (int tokens : {1, 64}) {
    for (int concurrency : {1, 16, 64}) {
      const moe::LoadReport report = moe::Serve({}, concurrency, tokens);
      const int batch = std::min(concurrency * tokens, 4096);
      const moe::EngineFigure engine = moe::EngineInProcess(**model, batch);
      std::printf("%-6d %-6d | %12.0f %9.3f %9.3f | %14.0f | %6.2f%s\n", concurrency, tokens, report.tokens_per_second,
                  report.p50_ms, report.p99_ms, engine.tokens_per_second,
                  report.tokens_per_second / engine.tokens_per_second, report.errors ? "  (errors!)" : "");
      if (concurrency == 1) c1_added_us[row++] = report.p50_ms * 1e3 - engine.seconds_per_batch * 1e6;
    }
  }
  std::printf("\nadded latency at concurrency 1 (server p50 - engine run): %.0f us (1 token), %.0f us (64 tokens)\n",
              c1_added_us[0], c1_added_us[1]);
  std::printf("reference: a bare RPC's round trip (ServerMetadata, p50, concurrency 1): %.0f us\n",
              moe::BareRoundTripUs());
  const moe::LoadReport batched = moe::Serve({}, 64, 1);
  const moe::LoadReport unbatched = moe::Serve({.max_batch_tokens = 1}, 64, 1);
  std::printf(
      "batching gain, demo model, concurrency 64, 1-token requests: %.0f tok/s batched vs %.0f tok/s with "
      "max_batch_tokens=1: %.1fx\n",
      batched.tokens_per_second, unbatched.tokens_per_second, batched.tokens_per_second / unbatched.tokens_per_second);
  // The same on a model whose experts dominate the cost: the Mixtral-like
  // layer of engine_bench (hidden 1024, 8 experts of 3584, top-2, bf16).
  const std::string repo = "/tmp/moe_serving_bench_" + std::to_string(::getpid());
  moe::ModelSpec spec;
  spec.name = "mixtral_like";
  spec.hidden_size = 1024;
  spec.intermediate_size = 3584;
  spec.router.num_experts = 8;
  spec.router.top_k = 2;
  spec.router.norm_topk_prob = true;
  spec.weight_dtype = moe::DType::kBF16;
  if (!moe::WriteRepositoryModel(moe::GenerateRandomModel(spec, 1, 1), repo, 1, 4096).ok()) return 1;
  moe::MoeServer::Options big;
  big.models.model_repository = repo;
  const moe::LoadReport big_batched = moe::Serve(big, 64, 1, "mixtral_like");
  big.max_batch_tokens = 1;
  const moe::LoadReport big_unbatched = moe::Serve(big, 64, 1, "mixtral_like");
  std::filesystem::remove_all(repo);
  std::printf(
      "batching gain, Mixtral-like layer, concurrency 64, 1-token requests: %.0f tok/s batched vs %.0f tok/s "
      "with max_batch_tokens=1: %.1fx\n",
      big_batched.tokens_per_second, big_unbatched.tokens_per_second,
      big_batched.tokens_per_second / big_unbatched.tokens_per_second);
  moe::ReportServerCpu(**model);
  return 0;
}
