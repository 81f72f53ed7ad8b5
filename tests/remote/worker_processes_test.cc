// moe-serve and moe-worker as processes, started as the README shows: the
// demo model with its experts on two workers answers as one process does,
// and killing (SIGKILL) a worker whose experts have a replica, under load,
// fails no request. Every answer is compared with the model run in-process.
//
// MOE_SERVE_BINARY and MOE_WORKER_BINARY in the environment replace the
// binaries built with the tests.
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/moe_client.h"
#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::ChildProcess;

constexpr int kTokens = 5;

std::string Binary(const char* variable, const char* built) {
  const char* binary = std::getenv(variable);
  return binary != nullptr && *binary != '\0' ? binary : built;
}

std::string LogBase(const std::string& name) {
  static int count = 0;
  return ::moe::testing::ProcessTempDir("moe_worker_processes_test") + "/" + name + std::to_string(++count);
}

// A moe-worker holding `experts` of the demo model, on a free port.
struct Worker {
  explicit Worker(const std::string& experts)
      : process(Binary("MOE_WORKER_BINARY", MOE_WORKER_BINARY), {"--port=0", "--host=127.0.0.1", "--experts=" + experts},
                LogBase("worker")),
        port(process.AwaitNumberAfter("moe-worker: listening on gRPC port ")) {}
  ChildProcess process;
  int port;
};

// moe-serve on the demo model with `workers` as its --workers flag.
struct Front {
  explicit Front(const std::string& workers)
      : process(Binary("MOE_SERVE_BINARY", MOE_SERVE_BINARY),
                {"--grpc_port=0", "--host=127.0.0.1", "--metrics_port=-1", "--workers=" + workers}, LogBase("serve")),
        port(process.AwaitNumberAfter("moe-serve: listening on gRPC port ")),
        client(absl::StrCat("127.0.0.1:", port)) {}
  ChildProcess process;
  int port;
  MoeClient client;
};

const std::vector<float>& Input() {
  static const std::vector<float> input = [] {
    std::vector<float> values(static_cast<size_t>(kTokens) * 256);
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(std::sin(0.05 * i));
    return values;
  }();
  return input;
}

// The demo model's answer, in this process.
const std::vector<float>& Expected() {
  static const std::vector<float> expected = [] {
    auto model = MoeModel::Create(DemoModel(), {});
    EXPECT_OK(model);
    MoeModel::RunResult result;
    auto ws = ::moe::testing::PlanWorkspace(**model, kTokens);
    EXPECT_OK((*model)->Run(Input().data(), kTokens, {}, ws.get(), &result));
    return result.outputs[0];
  }();
  return expected;
}

absl::StatusOr<std::vector<float>> Ask(MoeClient& client) {
  auto result = client.Infer(
      {.model = "demo", .input = Input().data(), .tokens = kTokens, .hidden = 256, .deadline = absl::Seconds(20)});
  if (!result.ok()) return result.status();
  return result->outputs[0];
}

TEST(WorkerProcesses, TwoWorkersServeTheDemoModelWithTheAnswersOfOneProcess) {
  Worker low("0-3"), high("4-7");
  ASSERT_NE(low.port, 0);
  ASSERT_NE(high.port, 0);
  Front front(absl::StrCat("127.0.0.1:", low.port, "=0-3;127.0.0.1:", high.port, "=4-7"));
  ASSERT_NE(front.port, 0);
  EXPECT_THAT(front.process.out(), ::testing::HasSubstr("sends all 8 experts of 2 layers to workers"));
  ASSERT_OK_AND_ASSIGN(const std::vector<float> outputs, Ask(front.client));
  EXPECT_EQ(outputs, Expected());
}

TEST(WorkerProcesses, KillingAReplicatedWorkerUnderLoadFailsNoRequest) {
  Worker first(""), second("");  // each holds every expert
  ASSERT_NE(first.port, 0);
  ASSERT_NE(second.port, 0);
  Front front(absl::StrCat("127.0.0.1:", first.port, "=all;127.0.0.1:", second.port, "=all"));
  ASSERT_NE(front.port, 0);
  ASSERT_OK(Ask(front.client).status());  // connected, warm
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0}, failed{0}, wrong{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 3; ++c) {
    clients.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<std::vector<float>> outputs = Ask(front.client);
        if (!outputs.ok()) {
          ++failed;
          ADD_FAILURE() << outputs.status();
        } else if (*outputs != Expected()) {
          ++wrong;
        }
        ++answered;
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  first.process.Kill();
  const int at_kill = answered.load();
  absl::SleepFor(absl::Milliseconds(1200));
  stop = true;
  for (auto& client : clients) client.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(answered.load(), at_kill) << "no request ran after the kill";
}

}  // namespace
}  // namespace moe
