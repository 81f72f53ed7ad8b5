// ChildProcess: one of the project's binaries started by a test, its stdout
// and stderr in files. Every wait is bounded; a child still running when the
// object goes is killed and reaped.
//
// Not thread-safe: one test thread drives a child.
#ifndef MOE_TESTS_CHILD_PROCESS_H_
#define MOE_TESTS_CHILD_PROCESS_H_

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"

extern char** environ;

namespace moe::testing {

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

inline std::vector<std::string> Lines(const std::string& text) { return absl::StrSplit(text, '\n', absl::SkipEmpty()); }

class ChildProcess {
 public:
  // Starts `binary` with `args`; its output goes to `log_base`.out and .err.
  ChildProcess(const std::string& binary, const std::vector<std::string>& args, const std::string& log_base)
      : out_path_(log_base + ".out"), err_path_(log_base + ".err") {
    std::vector<std::string> all = {binary};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& arg : all) argv.push_back(arg.data());
    argv.push_back(nullptr);
    // gRPC's own logging follows the environment: keep it at its default so
    // that stderr holds only what the binary says.
    std::vector<char*> envp;
    for (char** e = environ; *e != nullptr; ++e) {
      if (!absl::StartsWith(*e, "GRPC_VERBOSITY=") && !absl::StartsWith(*e, "GRPC_TRACE=")) envp.push_back(*e);
    }
    envp.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int error = posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&actions);
    EXPECT_EQ(error, 0) << "cannot start " << argv[0] << ": " << std::strerror(error);
    if (error != 0) pid_ = -1;
  }
  ~ChildProcess() { Kill(); }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  // The wait status once the process has exited, or nullopt if it is still
  // running after `timeout` (it is then killed).
  std::optional<int> Wait(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      if (absl::Now() > deadline) {
        Kill();
        return std::nullopt;
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    return std::nullopt;
  }

  // The number right after `prefix` on a line of stdout ("... listening on
  // gRPC port N", "... metrics on port N at /metrics"), once printed; 0 if
  // the process exits first or takes longer than `timeout`.
  int AwaitNumberAfter(const std::string& prefix, absl::Duration timeout = absl::Seconds(30)) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline && pid_ > 0) {
      for (const std::string& line : Lines(out())) {
        if (!absl::StartsWith(line, prefix)) continue;
        const std::string rest = line.substr(prefix.size());
        int number = 0;
        if (absl::SimpleAtoi(rest.substr(0, rest.find(' ')), &number)) return number;
      }
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
      absl::SleepFor(absl::Milliseconds(10));
    }
    ADD_FAILURE() << "no line '" << prefix << "N'; stderr: " << err();
    return 0;
  }

  void Signal(int signal_number) {
    if (pid_ > 0) kill(pid_, signal_number);
  }
  // SIGKILL, and reap.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  std::string out() const { return ReadAll(out_path_); }
  std::string err() const { return ReadAll(err_path_); }

 private:
  std::string out_path_, err_path_;
  pid_t pid_ = -1;
};

}  // namespace moe::testing

#endif  // MOE_TESTS_CHILD_PROCESS_H_
