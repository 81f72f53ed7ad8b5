// The moe-serve binary itself, started as a child process: every way start-up
// can fail is one line on stderr naming the cause and exit status 1 (never a
// signal); a port another process listens on is an error unless
// --reuse_grpc_port asks to share it; SIGTERM under load exits 0 within the
// grace period, and a connection that stays silent does not hold it.
//
// Every wait here is bounded: a child that outlives its bound is killed and
// the test fails. MOE_SERVE_BINARY in the environment replaces the binary
// built with the tests (to check another build).
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/moe_client.h"
#include "engine/api/cpu_path.h"
#include "engine/api/model_builder.h"
#include "tests/child_process.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

constexpr int kHidden = 16;

// A temporary directory for the test process, removed when it exits.
const std::string& TempDir() { return ::moe::testing::ProcessTempDir("moe_startup_test"); }

// A repository with one small model, "toy", that loads in milliseconds.
const std::string& ToyRepository() {
  static const std::string path = [] {
    const std::string repo = TempDir() + "/repo";
    ModelSpec spec;
    spec.name = "toy";
    spec.hidden_size = kHidden;
    spec.intermediate_size = 16;
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    EXPECT_OK(WriteRepositoryModel(GenerateRandomModel(spec, 1, 5), repo, 1, /*max_batch_size=*/64));
    return repo;
  }();
  return path;
}

// A socket listening on a free loopback port, without SO_REUSEPORT: another
// process holding the port.
class HeldPort {
 public:
  HeldPort() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0) << std::strerror(errno);
    EXPECT_EQ(listen(fd_, 16), 0) << std::strerror(errno);
    socklen_t length = sizeof(address);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&address), &length);
    port_ = ntohs(address.sin_port);
  }
  ~HeldPort() { close(fd_); }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

// A moe-serve child process (tests/child_process.h).
class Serve : public ::moe::testing::ChildProcess {
 public:
  explicit Serve(const std::vector<std::string>& flags) : ChildProcess(Binary(), flags, NextLogBase()) {}

  // The gRPC port once the server says it listens; 0 if it exits first or
  // takes longer than `timeout`.
  int AwaitListening(absl::Duration timeout = absl::Seconds(30)) {
    return AwaitNumberAfter("moe-serve: listening on gRPC port ", timeout);
  }

 private:
  static std::string Binary() {
    const char* binary = std::getenv("MOE_SERVE_BINARY");
    return binary != nullptr && *binary != '\0' ? binary : MOE_SERVE_BINARY;
  }
  static std::string NextLogBase() {
    static int count = 0;
    return TempDir() + "/serve" + std::to_string(++count);
  }
};

// Runs moe-serve with `flags`, expecting it to fail before serving: it exits
// by itself with status 1, not on a signal, within a few seconds, having
// printed one line on stderr. Returns that line.
std::string ExpectStartupFailure(const std::vector<std::string>& flags) {
  Serve serve(flags);
  const std::optional<int> status = serve.Wait(absl::Seconds(20));
  if (!status.has_value()) {
    ADD_FAILURE() << "still running after 20 s";
    return "";
  }
  EXPECT_FALSE(WIFSIGNALED(*status)) << "killed by signal " << WTERMSIG(*status) << "; stderr: " << serve.err();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << "wait status " << *status;
  const std::vector<std::string> lines = ::moe::testing::Lines(serve.err());
  EXPECT_EQ(lines.size(), 1u) << "stderr:\n" << serve.err();
  return lines.empty() ? "" : lines.front();
}

TEST(Startup, NonexistentModelIsOneLineNamingIt) {
  const std::string line = ExpectStartupFailure({"--model=/nonexistent", "--metrics_port=-1", "--grpc_port=0"});
  EXPECT_THAT(line, HasSubstr("moe-serve: cannot load model '/nonexistent'"));
  EXPECT_THAT(line, HasSubstr("not a directory"));
}

TEST(Startup, ModelThatDoesNotLoadIsOneLineNamingWhy) {
  const std::string dir = TempDir() + "/llama";
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << R"({"model_type": "llama", "hidden_size": 8})";
  const std::string line = ExpectStartupFailure({"--model=" + dir, "--metrics_port=-1", "--grpc_port=0"});
  EXPECT_THAT(line, HasSubstr("cannot load model '" + dir + "'"));
  EXPECT_THAT(line, HasSubstr("model_type 'llama'"));
}

TEST(Startup, RepositoryConfigThatDoesNotParseIsOneLineNamingTheFile) {
  const std::string repo = TempDir() + "/bad_repo";
  fs::create_directories(repo + "/broken/1");
  std::ofstream(repo + "/broken/config.pbtxt") << "name: \"broken\"\nmax_batch_size: [\n";
  const std::string line = ExpectStartupFailure({"--model_repository=" + repo, "--metrics_port=-1", "--grpc_port=0"});
  EXPECT_THAT(line, HasSubstr("cannot load model repository '" + repo + "'"));
  EXPECT_THAT(line, HasSubstr("broken/config.pbtxt"));
}

TEST(Startup, GrpcPortInUseIsOneLineNamingTheAddress) {
  HeldPort held;
  const std::string port = std::to_string(held.port());
  const std::string line = ExpectStartupFailure(
      {"--model_repository=" + ToyRepository(), "--host=127.0.0.1", "--grpc_port=" + port, "--metrics_port=-1"});
  EXPECT_THAT(line, HasSubstr("cannot listen for gRPC on 127.0.0.1:" + port + ": Address already in use"));
}

TEST(Startup, MetricsPortInUseIsOneLineNamingTheAddress) {
  HeldPort held;
  const std::string port = std::to_string(held.port());
  const std::string line = ExpectStartupFailure(
      {"--model_repository=" + ToyRepository(), "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=" + port});
  EXPECT_THAT(line, HasSubstr("cannot serve metrics on 127.0.0.1:" + port + ": Address already in use"));
}

TEST(Startup, UnknownFlagIsOneLineNamingIt) {
  const std::string line = ExpectStartupFailure({"--no_such_flag=1"});
  EXPECT_THAT(line, HasSubstr("no_such_flag"));
}

TEST(Startup, InvalidFlagValuesAreOneLineNamingTheFlag) {
  EXPECT_THAT(ExpectStartupFailure({"--expert_latency_metrics=bogus", "--metrics_port=-1"}),
              HasSubstr("moe-serve: --expert_latency_metrics: expert latency metrics must be full, coarse or off, "
                        "got 'bogus'"));
  EXPECT_THAT(ExpectStartupFailure({"--grpc_port=70000"}),
              HasSubstr("moe-serve: --grpc_port must be in [0, 65535], got 70000"));
  EXPECT_THAT(ExpectStartupFailure({"--grpc_port=eighty"}), HasSubstr("'grpc_port'"));
  EXPECT_THAT(ExpectStartupFailure(
                  {"--batch_threads=0", "--metrics_port=-1", "--grpc_port=0", "--model_repository=" + ToyRepository()}),
              HasSubstr("batch threads must be in [1, 256], got 0"));
  EXPECT_THAT(ExpectStartupFailure({"stray_argument"}), HasSubstr("unexpected argument 'stray_argument'"));
  EXPECT_THAT(ExpectStartupFailure({"--cpu_path=sse4", "--metrics_port=-1"}),
              HasSubstr("moe-serve: --cpu_path: unknown CPU path 'sse4'"));
}

// --cpu_path picks the kernels and the start-up log says which run; a path
// this CPU lacks stops the start with one line naming it.
TEST(Startup, CpuPathFlagChoosesTheKernelsAndTheLogNamesThem) {
  for (moe::CpuPath path : moe::SupportedCpuPaths(moe::DType::kBF16)) {
    Serve serve({"--cpu_path=" + std::string(moe::CpuPathName(path)), "--host=127.0.0.1", "--grpc_port=0",
                 "--metrics_port=-1"});
    ASSERT_GT(serve.AwaitListening(), 0);
    EXPECT_THAT(serve.out(), HasSubstr(absl::StrCat("cpu ", moe::CpuPathName(path), " kernels, bf16 compute")));
    serve.Signal(SIGTERM);
    ASSERT_TRUE(serve.Wait(absl::Seconds(10)).has_value());
  }
  for (moe::CpuPath path : {moe::CpuPath::kAvx512, moe::CpuPath::kAvx2}) {
    if (moe::CpuPathSupported(path, moe::DType::kBF16)) continue;
    EXPECT_THAT(ExpectStartupFailure(
                    {"--cpu_path=" + std::string(moe::CpuPathName(path)), "--metrics_port=-1", "--grpc_port=0"}),
                HasSubstr(absl::StrCat("does not run the ", moe::CpuPathName(path), " path")));
  }
}

TEST(Startup, SecondServerOnTheSamePortFails) {
  Serve first({"--model_repository=" + ToyRepository(), "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=-1"});
  const int port = first.AwaitListening();
  ASSERT_GT(port, 0);
  const std::string line = ExpectStartupFailure({"--model_repository=" + ToyRepository(), "--host=127.0.0.1",
                                                 "--grpc_port=" + std::to_string(port), "--metrics_port=-1"});
  EXPECT_THAT(line, HasSubstr("Address already in use"));
  first.Signal(SIGTERM);
  const std::optional<int> status = first.Wait(absl::Seconds(10));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
}

TEST(Startup, ReuseGrpcPortLetsTwoServersShareAPort) {
  const std::vector<std::string> flags = {"--model_repository=" + ToyRepository(), "--host=127.0.0.1",
                                          "--metrics_port=-1", "--reuse_grpc_port"};
  std::vector<std::string> first_flags = flags;
  first_flags.push_back("--grpc_port=0");
  Serve first(first_flags);
  const int port = first.AwaitListening();
  ASSERT_GT(port, 0);
  std::vector<std::string> second_flags = flags;
  second_flags.push_back("--grpc_port=" + std::to_string(port));
  Serve second(second_flags);
  EXPECT_EQ(second.AwaitListening(), port) << second.err();
  for (Serve* serve : {&first, &second}) {
    serve->Signal(SIGTERM);
    const std::optional<int> status = serve->Wait(absl::Seconds(10));
    ASSERT_TRUE(status.has_value());
    EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  }
}

TEST(Shutdown, SigtermUnderLoadExitsZeroWithinTheGracePeriod) {
  constexpr int kGracePeriodSeconds = 5;
  Serve serve({"--model_repository=" + ToyRepository(), "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=0",
               "--grace_period_s=" + std::to_string(kGracePeriodSeconds)});
  const int port = serve.AwaitListening();
  ASSERT_GT(port, 0);
  // Clients in a closed loop, through the signal until the process is gone.
  constexpr int kClients = 8;
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < kClients; ++c) {
    clients.emplace_back([&, c] {
      MoeClient client("127.0.0.1:" + std::to_string(port));
      std::vector<float> input(static_cast<size_t>(1 + c % 3) * kHidden, 0.25f * static_cast<float>(c));
      while (!stop.load()) {
        auto result = client.Infer({.model = "toy", .input = input.data(), .tokens = 1 + c % 3, .hidden = kHidden});
        if (result.ok()) {
          ++answered;
        } else {
          absl::SleepFor(absl::Milliseconds(1));  // refused: do not spin
        }
      }
    });
  }
  absl::SleepFor(absl::Seconds(2));
  EXPECT_GT(answered.load(), 0);
  const absl::Time signalled = absl::Now();
  serve.Signal(SIGTERM);
  const std::optional<int> status = serve.Wait(absl::Seconds(kGracePeriodSeconds + 1));
  const absl::Duration took = absl::Now() - signalled;
  stop.store(true);
  for (auto& client : clients) client.join();
  ASSERT_TRUE(status.has_value()) << "still running " << kGracePeriodSeconds + 1 << " s after SIGTERM";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_THAT(serve.out(), HasSubstr("drained, exiting"));
  EXPECT_LT(took, absl::Seconds(kGracePeriodSeconds)) << "nothing was slow: the grace period should not run out";
}

TEST(Shutdown, ASilentConnectionDoesNotHoldTheExit) {
  // A client that connected and never speaks (or answers the server's
  // GOAWAY): with nothing in flight on it, it is cut, not waited for.
  Serve serve({"--model_repository=" + ToyRepository(), "--host=127.0.0.1", "--grpc_port=0", "--metrics_port=0",
               "--grace_period_s=20"});
  const int port = serve.AwaitListening();
  ASSERT_GT(port, 0);
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<uint16_t>(port));
  ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0) << std::strerror(errno);
  const absl::Time signalled = absl::Now();
  serve.Signal(SIGTERM);
  const std::optional<int> status = serve.Wait(absl::Seconds(10));
  const absl::Duration took = absl::Now() - signalled;
  close(fd);
  ASSERT_TRUE(status.has_value()) << "still running 10 s after SIGTERM";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_LT(took, absl::Seconds(3));
}

}  // namespace
}  // namespace moe
