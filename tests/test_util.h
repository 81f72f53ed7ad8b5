// Test helpers shared by every test: Status matchers and macros (Debian's
// Abseil has none), the numeric comparison used against references and the
// reference activations.
#ifndef MOE_TESTS_TEST_UTIL_H_
#define MOE_TESTS_TEST_UTIL_H_

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <system_error>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/api/cpu_path.h"
#include "engine/api/model_spec.h"
#include "engine/api/moe_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace moe::testing {

inline const absl::Status& GetStatus(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

// EXPECT_THAT(DoIt(), IsOk());
MATCHER(IsOk, "is OK") {
  const absl::Status& status = GetStatus(arg);
  if (!status.ok()) *result_listener << "status: " << status;
  return status.ok();
}

// EXPECT_THAT(Load(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("dtype")));
MATCHER_P2(StatusIs, code, message_matcher, "has code " + absl::StatusCodeToString(code)) {
  const absl::Status& status = GetStatus(arg);
  *result_listener << "status: " << status;
  return status.code() == code && ::testing::Matches(message_matcher)(std::string(status.message()));
}

// max |a - b| / max(max |b|, 1e-30): error normalised by the reference's scale.
// Sizes that differ are a test failure naming both, and an infinite error; a
// NaN in either makes the error NaN: either way a comparison with a
// tolerance (EXPECT_LT) fails too.
inline double NormalizedMaxError(const std::vector<float>& actual, const std::vector<float>& expected) {
  if (actual.size() != expected.size()) {
    ADD_FAILURE() << "NormalizedMaxError: " << actual.size() << " values against " << expected.size() << " expected";
    return std::numeric_limits<double>::infinity();
  }
  double max_diff = 0, max_ref = 1e-30;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    if (std::isnan(diff)) return diff;  // std::max would skip it
    max_diff = std::max(max_diff, diff);
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(expected[i])));
  }
  return max_diff / max_ref;
}

// The activations in double precision, from their definitions.
inline double ReferenceActivation(Activation a, double x) {
  switch (a) {
    case Activation::kSilu:
      return x / (1 + std::exp(-x));
    case Activation::kGelu:
      return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case Activation::kRelu:
      return x > 0 ? x : 0;
  }
  return 0;
}

// A temporary directory for this test process, named after the first
// caller's `prefix` and the process id, made empty on first use and removed
// when the process exits: CTest runs every test in a process of its own, so
// every test would otherwise leave one behind.
inline const std::string& ProcessTempDir(const std::string& prefix) {
  struct Dir {
    std::string path;
    ~Dir() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static const Dir dir = [&prefix] {
    const std::string path =
        (std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()))).string();
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
    return Dir{path};
  }();
  return dir.path;
}

// Every concrete CPU kernel path (engine/api/cpu_path.h), for suites that run
// once per path: each test skips the paths this CPU does not run
// (SKIP_UNLESS_CPU_RUNS), so every path runs wherever it can.
// The repository's root, for fixtures: MOE_SOURCE_DIR from the environment
// (tests carried to another machine, scripts/gpu_check.sh) or the build's.
inline std::string SourceDir() {
  const char* from_environment = std::getenv("MOE_SOURCE_DIR");
  return from_environment && *from_environment ? from_environment : MOE_SOURCE_DIR;
}

// Sets (value non-null) or unsets an environment variable for its scope,
// then puts back what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) saved_ = old;
    Set(value);
  }
  ~ScopedEnv() { Set(saved_ ? saved_->c_str() : nullptr); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  void Set(const char* value) {
    if (value) {
      setenv(name_, value, 1);
    } else {
      unsetenv(name_);
    }
  }
  const char* name_;
  std::optional<std::string> saved_;
};

// Whether a missing device must fail the tests that need it rather than skip
// them (MOE_REQUIRE_CUDA=1: scripts/gpu_check.sh on a GPU machine).
inline bool DeviceRequired() {
  const char* required = std::getenv("MOE_REQUIRE_CUDA");
  return required && std::string(required) == "1";
}

inline std::vector<CpuPath> AllCpuPaths() { return {CpuPath::kAvx512, CpuPath::kAvx2, CpuPath::kPortable}; }

// A test name's suffix for a parameter that is a path.
struct CpuPathParamName {
  std::string operator()(const ::testing::TestParamInfo<CpuPath>& info) const { return CpuPathName(info.param); }
};

// A workspace of `model` planned for batches of up to `max_tokens`; a
// planning error fails the test and returns null.
inline std::unique_ptr<MoeModel::Workspace> PlanWorkspace(const MoeModel& model, int max_tokens = 512) {
  absl::StatusOr<std::unique_ptr<MoeModel::Workspace>> workspace = model.NewWorkspace(max_tokens);
  if (!workspace.ok()) {
    ADD_FAILURE() << "planning a workspace: " << workspace.status();
    return nullptr;
  }
  return std::move(*workspace);
}

}  // namespace moe::testing

// Skips the test when this CPU does not run `path` for `dtype`.
#define SKIP_UNLESS_CPU_RUNS(path, dtype)                                                               \
  if (!::moe::CpuPathSupported((path), (dtype))) {                                                      \
    GTEST_SKIP() << "this CPU does not run the " << ::moe::CpuPathName(path) << " path for this dtype"; \
  }

#define MOE_TEST_CONCAT_INNER(a, b) a##b
#define MOE_TEST_CONCAT(a, b) MOE_TEST_CONCAT_INNER(a, b)

#define ASSERT_OK(expr) ASSERT_THAT((expr), ::moe::testing::IsOk())
#define EXPECT_OK(expr) EXPECT_THAT((expr), ::moe::testing::IsOk())
// ASSERT_OK_AND_ASSIGN(auto model, LoadModel(...));
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  MOE_ASSERT_OK_AND_ASSIGN_IMPL(MOE_TEST_CONCAT(moe_test_statusor_, __LINE__), lhs, expr)
#define MOE_ASSERT_OK_AND_ASSIGN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                                  \
  ASSERT_THAT(statusor.status(), ::moe::testing::IsOk());  \
  lhs = std::move(statusor).value()

#endif  // MOE_TESTS_TEST_UTIL_H_
