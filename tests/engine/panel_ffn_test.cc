// PanelFfn and PanelFfnRunner against a naive double-precision FFN written
// here, over shapes that fall across every boundary of the kernels: odd
// hidden and inner sizes (bf16 pairs padded), widths that are not whole
// panels, row counts across block (12) and chunk (96) boundaries, several
// FFNs in one call, both dtypes, every activation, GLU and MLP with biases;
// on every CPU path this machine runs (AVX-512, AVX2, portable).
#include "engine/cpu/panel_ffn.h"

#include <chrono>
#include <cmath>
#include <random>

#include "engine/api/dtype.h"
#include "engine/api/tensor.h"
#include "engine/cpu/thread_team.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::CpuPathParamName;
using ::moe::testing::NormalizedMaxError;
using ::moe::testing::ReferenceActivation;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

struct Shape {
  int hidden, inner;
  ExpertKind kind;
  Activation activation;
};

HostTensor Random(std::mt19937& rng, std::vector<int64_t> shape, float scale) {
  std::normal_distribution<float> normal(0, scale);
  int64_t count = 1;
  for (int64_t s : shape) count *= s;
  std::vector<float> values(count);
  for (float& v : values) v = normal(rng);
  return HostTensor::FromFloats(shape, values);
}

FfnWeights RandomFfn(const Shape& s, std::mt19937& rng) {
  FfnWeights w;
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.hidden));
  w.w1 = Random(rng, {s.inner, s.hidden}, scale);
  w.w2 = Random(rng, {s.hidden, s.inner}, 1.0f / std::sqrt(static_cast<float>(s.inner)));
  if (s.kind == ExpertKind::kGlu) {
    w.w3 = Random(rng, {s.inner, s.hidden}, scale);
  } else {
    w.b1 = Random(rng, {s.inner}, 0.5f);
    w.b2 = Random(rng, {s.hidden}, 0.5f);
  }
  return w;
}

// The values a computation in `dtype` sees.
double Seen(float v, bool bf16) { return bf16 ? RoundToBf16(v) : v; }

std::vector<double> Reference(const Shape& s, const FfnWeights& w, const float* x, bool bf16) {
  const auto w1 = w.w1.ToFloats(), w2 = w.w2.ToFloats();
  const auto w3 = w.w3.empty() ? std::vector<float>() : w.w3.ToFloats();
  const auto b1 = w.b1.empty() ? std::vector<float>() : w.b1.ToFloats();
  const auto b2 = w.b2.empty() ? std::vector<float>() : w.b2.ToFloats();
  std::vector<double> h(s.inner), y(s.hidden, 0);
  for (int i = 0; i < s.inner; ++i) {
    double a = 0, u = 0;
    for (int j = 0; j < s.hidden; ++j) {
      const double xj = Seen(x[j], bf16);
      a += Seen(w1[static_cast<size_t>(i) * s.hidden + j], bf16) * xj;
      if (!w3.empty()) u += Seen(w3[static_cast<size_t>(i) * s.hidden + j], bf16) * xj;
    }
    h[i] = s.kind == ExpertKind::kGlu ? ReferenceActivation(s.activation, a) * u
                                      : ReferenceActivation(s.activation, a + b1[i]);
    h[i] = Seen(static_cast<float>(h[i]), bf16);
  }
  for (int j = 0; j < s.hidden; ++j) {
    for (int i = 0; i < s.inner; ++i) y[j] += Seen(w2[static_cast<size_t>(j) * s.inner + i], bf16) * h[i];
    if (!b2.empty()) y[j] += b2[j];
  }
  return y;
}

class PanelFfnTest : public ::testing::TestWithParam<std::tuple<Shape, DType, CpuPath>> {
 protected:
  void SetUp() override { SKIP_UNLESS_CPU_RUNS(std::get<2>(GetParam()), std::get<1>(GetParam())); }
};

TEST_P(PanelFfnTest, MatchesNaiveReferenceAcrossBlockAndPanelBoundaries) {
  const auto& [shape, dtype, path] = GetParam();
  const bool bf16 = dtype == DType::kBF16;
  std::mt19937 rng(shape.hidden * 131 + shape.inner);
  // Three FFNs run together in one call, one on every token (as a shared
  // expert does: row_token null), two on scattered tokens.
  std::vector<FfnWeights> weights;
  std::vector<std::unique_ptr<PanelFfn>> ffns;
  for (int f = 0; f < 3; ++f) {
    weights.push_back(RandomFfn(shape, rng));
    ASSERT_OK_AND_ASSIGN(
        auto ffn,
        PanelFfn::Create(weights.back(),
                         {.kind = shape.kind, .activation = shape.activation, .compute = dtype, .path = path}));
    ASSERT_EQ(ffns.empty() ? path : ffns.back()->path(), path);
    ffns.push_back(std::move(ffn));
  }
  const int T = 110;
  std::vector<float> tokens = Random(rng, {T, shape.hidden}, 1.0f).ToFloats();
  for (int64_t rows : {1, 11, 12, 13, 97, 110}) {
    std::vector<int32_t> picks(rows);
    for (int64_t r = 0; r < rows; ++r) picks[r] = static_cast<int32_t>((r * 37 + 5) % T);
    std::vector<std::vector<float>> out(3, std::vector<float>(static_cast<size_t>(T) * shape.hidden, -1.0f));
    std::vector<PanelFfnTask> tasks = {
        {.ffn = ffns[0].get(), .rows = T, .row_token = nullptr, .out = out[0].data()},
        {.ffn = ffns[1].get(), .rows = rows, .row_token = picks.data(), .out = out[1].data()},
        {.ffn = ffns[2].get(), .rows = rows, .row_token = picks.data(), .out = out[2].data()},
    };
    PanelFfnRunner runner;
    double seconds[3] = {-1, -1, -1};
    const auto start = std::chrono::steady_clock::now();
    runner.Run(tokens.data(), tasks.data(), tasks.size(), seconds);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // Every task has rows, so each took time; each entry is core-seconds
    // over the threads that ran, so together they are at most the call's
    // wall time (SecondsAddUpToTheWallTimeOfTheCall bounds them below).
    EXPECT_GT(seconds[0], 0.0) << rows << " rows";
    EXPECT_GT(seconds[1], 0.0) << rows << " rows";
    EXPECT_GT(seconds[2], 0.0) << rows << " rows";
    EXPECT_LE(seconds[0] + seconds[1] + seconds[2], wall) << rows << " rows";
    for (int f = 0; f < 3; ++f) {
      const int64_t task_rows = f == 0 ? T : rows;
      std::vector<float> expected;
      for (int64_t r = 0; r < task_rows; ++r) {
        const int token = f == 0 ? static_cast<int>(r) : picks[r];
        auto y = Reference(shape, weights[f], tokens.data() + static_cast<size_t>(token) * shape.hidden, bf16);
        expected.insert(expected.end(), y.begin(), y.end());
      }
      std::vector<float> actual(out[f].begin(), out[f].begin() + task_rows * shape.hidden);
      EXPECT_LT(NormalizedMaxError(actual, expected), bf16 ? 1e-2 : 2e-6) << "ffn " << f << " rows " << rows;
      if (task_rows < T) {
        EXPECT_EQ(out[f][task_rows * shape.hidden], -1.0f) << "written past the task's rows";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, PanelFfnTest,
                         ::testing::Combine(::testing::Values(Shape{64, 96, ExpertKind::kGlu, Activation::kSilu},
                                                              Shape{33, 45, ExpertKind::kGlu, Activation::kGelu},
                                                              Shape{48, 40, ExpertKind::kMlp, Activation::kGeluTanh},
                                                              Shape{17, 70, ExpertKind::kMlp, Activation::kRelu},
                                                              Shape{130, 31, ExpertKind::kGlu, Activation::kGeluTanh}),
                                            ::testing::Values(DType::kF32, DType::kBF16),
                                            ::testing::ValuesIn(AllCpuPaths())),
                         [](const auto& info) {
                           const Shape& s = std::get<0>(info.param);
                           return std::to_string(s.hidden) + "x" + std::to_string(s.inner) +
                                  (s.kind == ExpertKind::kGlu ? "_glu" : "_mlp") +
                                  (std::get<1>(info.param) == DType::kF32 ? "_fp32_" : "_bf16_") +
                                  CpuPathName(std::get<2>(info.param));
                         });

// The runner and the router's product, once per CPU path.
class PanelRunnerTest : public ::testing::TestWithParam<CpuPath> {};

// A row's result is the same bits whatever shares its call: alone, among
// many rows, split over one thread or several.
TEST_P(PanelRunnerTest, RowResultsAreBitIdenticalAcrossBatchesAndThreadCounts) {
  const CpuPath path = GetParam();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(path, dtype);
    const Shape shape{256, 512, ExpertKind::kGlu, Activation::kSilu};
    std::mt19937 rng(3);
    const FfnWeights w = RandomFfn(shape, rng);
    ASSERT_OK_AND_ASSIGN(auto ffn, PanelFfn::Create(w, {.compute = dtype, .path = path}));
    const int T = 200;  // enough work to run on every thread
    const std::vector<float> tokens = Random(rng, {T, shape.hidden}, 1.0f).ToFloats();
    PanelFfnRunner runner;
    std::vector<float> together(static_cast<size_t>(T) * shape.hidden);
    const PanelFfnTask all{.ffn = ffn.get(), .rows = T, .out = together.data()};
    runner.Run(tokens.data(), &all, 1, nullptr);
    for (int token : {0, 13, 199}) {
      std::vector<float> alone(shape.hidden);
      const int32_t pick = token;
      const PanelFfnTask one{.ffn = ffn.get(), .rows = 1, .row_token = &pick, .out = alone.data()};
      runner.Run(tokens.data(), &one, 1, nullptr);
      EXPECT_TRUE(std::equal(alone.begin(), alone.end(), together.begin() + token * shape.hidden)) << token;
    }
    // Alongside tasks of a few rows, which go to the other work queue.
    const std::vector<int32_t> few = {199, 7, 13, 0, 150};
    for (int threads : {1, 2, 3}) {
      ThreadTeam team({.size = threads});
      PanelFfnRunner on_team(&team);
      std::vector<float> other(together.size()), few_out(few.size() * shape.hidden);
      const PanelFfnTask mixed[] = {{.ffn = ffn.get(), .rows = T, .out = other.data()},
                                    {.ffn = ffn.get(), .rows = 5, .row_token = few.data(), .out = few_out.data()}};
      on_team.Run(tokens.data(), mixed, 2, nullptr);
      EXPECT_EQ(other, together) << threads << " threads";
      for (size_t r = 0; r < few.size(); ++r) {
        EXPECT_TRUE(std::equal(few_out.begin() + r * shape.hidden, few_out.begin() + (r + 1) * shape.hidden,
                               together.begin() + few[r] * shape.hidden))
            << threads << " threads, token " << few[r];
      }
    }
  }
}

// Many experts of a few rows beside one of many (as routed experts beside a
// shared expert at a few dozen tokens): streaming dominates, so computing
// threads pair their items with memory items and prefetch for them. Every
// task's output is the same bits as the task run alone on one thread.
TEST_P(PanelRunnerTest, PairedScheduleKeepsEveryTaskExact) {
  const CpuPath path = GetParam();
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(path, dtype);
    const Shape shape{256, 512, ExpertKind::kGlu, Activation::kSilu};
    std::mt19937 rng(5);
    constexpr int kExperts = 24, T = 48;
    std::vector<std::unique_ptr<PanelFfn>> ffns;
    for (int e = 0; e <= kExperts; ++e) {
      ASSERT_OK_AND_ASSIGN(auto ffn, PanelFfn::Create(RandomFfn(shape, rng), {.compute = dtype, .path = path}));
      ffns.push_back(std::move(ffn));
    }
    const std::vector<float> tokens = Random(rng, {T, shape.hidden}, 1.0f).ToFloats();
    // Expert e takes 1 + e % 12 rows of scattered tokens; the last takes all T.
    std::vector<std::vector<int32_t>> picks(kExperts);
    std::vector<PanelFfnTask> tasks;
    std::vector<std::vector<float>> expected(kExperts + 1);
    ThreadTeam alone_team({.size = 1});
    PanelFfnRunner alone(&alone_team);
    for (int e = 0; e <= kExperts; ++e) {
      const int rows = e < kExperts ? 1 + e % 12 : T;
      if (e < kExperts) {
        for (int r = 0; r < rows; ++r) picks[e].push_back((e * 7 + r * 5) % T);
      }
      tasks.push_back({.ffn = ffns[e].get(), .rows = rows, .row_token = e < kExperts ? picks[e].data() : nullptr});
      expected[e].resize(static_cast<size_t>(rows) * shape.hidden);
      PanelFfnTask task = tasks.back();
      task.out = expected[e].data();
      alone.Run(tokens.data(), &task, 1, nullptr);
    }
    for (int threads : {1, 2, 3}) {
      ThreadTeam team({.size = threads});
      PanelFfnRunner runner(&team);
      std::vector<std::vector<float>> out(kExperts + 1);
      for (int e = 0; e <= kExperts; ++e) {
        out[e].assign(expected[e].size(), -1.0f);
        tasks[e].out = out[e].data();
      }
      runner.Run(tokens.data(), tasks.data(), tasks.size(), nullptr);
      for (int e = 0; e <= kExperts; ++e)
        EXPECT_EQ(out[e], expected[e]) << "expert " << e << ", " << threads << " threads";
    }
  }
}

// The router's product, in fp32 and in bf16 on bf16 values: a naive
// double-precision reference, rows that are the same bits alone and in a
// batch split over the team (from 32 rows), and output columns that are not
// a whole panel.
TEST_P(PanelRunnerTest, LinearMatchesNaiveProductAndRowsAreBatchIndependent) {
  const CpuPath path = GetParam();
  for (DType compute : {DType::kF32, DType::kBF16}) {
    if (!CpuPathSupported(path, compute)) continue;
    SCOPED_TRACE(compute == DType::kBF16 ? "bf16" : "fp32");
    std::mt19937 rng(8);
    const int64_t K = 200, N = 45;
    // bf16 compute is exact on bf16 values (what a bf16 checkpoint's router
    // sees): the reference takes the same values.
    const auto values = [&](std::vector<int64_t> shape) {
      std::vector<float> v = Random(rng, shape, 1.0f).ToFloats();
      if (compute == DType::kBF16) {
        for (float& x : v) x = RoundToBf16(x);
      }
      return v;
    };
    const std::vector<float> w = values({N, K});
    ASSERT_OK_AND_ASSIGN(auto linear, PanelLinear::Create(HostTensor::FromFloats({N, K}, w), compute, path));
    std::vector<uint32_t> scratch;
    for (int64_t rows : {1, 31, 100}) {
      const std::vector<float> x = values({rows, K});
      std::vector<float> y(rows * N), expected(rows * N);
      linear->Run(x.data(), rows, y.data(), &scratch);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t n = 0; n < N; ++n) {
          double sum = 0;
          for (int64_t k = 0; k < K; ++k) sum += double{x[r * K + k]} * w[n * K + k];
          expected[r * N + n] = static_cast<float>(sum);
        }
      }
      EXPECT_LT(NormalizedMaxError(y, expected), 2e-6) << rows << " rows";
      for (int64_t r : {int64_t{0}, rows - 1}) {
        std::vector<float> alone(N);
        linear->Run(x.data() + r * K, 1, alone.data(), &scratch);
        EXPECT_TRUE(std::equal(alone.begin(), alone.end(), y.begin() + r * N)) << "row " << r << " of " << rows;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, PanelRunnerTest, ::testing::ValuesIn(AllCpuPaths()), CpuPathParamName());

// The per-task seconds are the core-seconds each task took, over the
// threads that ran: together never more than the call's wall time, and,
// with the work large enough that gathering rows is a small part of it, at
// least half of the wall time spread over the threads (on one thread nearly
// all of it; a second thread may wake too late to take any work). The best
// of a few calls counts, since a call that lost its CPU outside the timed
// work sums to less. A timer that read 0 or counted in the wrong unit fails.
TEST_P(PanelRunnerTest, SecondsAddUpToTheWallTimeOfTheCall) {
  const CpuPath path = GetParam();
  SKIP_UNLESS_CPU_RUNS(path, DType::kF32);
  const Shape shape{256, 512, ExpertKind::kGlu, Activation::kSilu};
  std::mt19937 rng(9);
  ASSERT_OK_AND_ASSIGN(auto big, PanelFfn::Create(RandomFfn(shape, rng), {.compute = DType::kF32, .path = path}));
  ASSERT_OK_AND_ASSIGN(auto small, PanelFfn::Create(RandomFfn(shape, rng), {.compute = DType::kF32, .path = path}));
  constexpr int T = 64;
  const std::vector<float> tokens = Random(rng, {T, shape.hidden}, 1.0f).ToFloats();
  const std::vector<int32_t> few = {3, 60, 17, 41};
  std::vector<float> big_out(static_cast<size_t>(T) * shape.hidden), small_out(few.size() * shape.hidden);
  const PanelFfnTask tasks[] = {
      {.ffn = big.get(), .rows = T, .out = big_out.data()},
      {.ffn = small.get(), .rows = static_cast<int64_t>(few.size()), .row_token = few.data(), .out = small_out.data()}};
  for (int threads : {1, 2}) {
    ThreadTeam team({.size = threads});
    PanelFfnRunner runner(&team);
    double best = 0;
    for (int call = 0; call < 5; ++call) {
      double seconds[2] = {-1, -1};
      const auto start = std::chrono::steady_clock::now();
      runner.Run(tokens.data(), tasks, 2, seconds);
      const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_GT(seconds[0], 0.0) << threads << " threads";
      EXPECT_GT(seconds[1], 0.0) << threads << " threads";
      EXPECT_LE(seconds[0] + seconds[1], wall) << threads << " threads";
      best = std::max(best, (seconds[0] + seconds[1]) / wall);
    }
    EXPECT_GT(best, 0.5 / threads) << threads << " threads: the tasks' seconds are at most " << best
                                   << " of the wall time";
  }
}

TEST(PanelFfn, RejectsMismatchedShapes) {
  std::mt19937 rng(1);
  FfnWeights w = RandomFfn({32, 48, ExpertKind::kGlu, Activation::kSilu}, rng);
  w.w2 = Random(rng, {32, 47}, 1.0f);
  EXPECT_FALSE(PanelFfn::Create(w, {.compute = DType::kF32}).ok());
  EXPECT_FALSE(
      PanelFfn::Create(RandomFfn({32, 48, ExpertKind::kGlu, Activation::kSilu}, rng), {.compute = DType::kF16}).ok());
}

// Weights whose packed panels need 2^51 bytes (2^50 for the linear), more
// than any address space: Create fails with a Status naming the weight and
// the bytes. Packing asks for its memory before it reads a value, so the
// tensors only claim their shape over a few bytes.
TEST(PanelFfn, WeightsTooLargeForMemoryAreResourceExhausted) {
  constexpr int64_t kHuge = int64_t{1} << 24;
  const float few[16] = {};
  const HostTensor huge = HostTensor::Borrow(DType::kF32, {kHuge, kHuge}, few, nullptr);
  FfnWeights w;
  w.w1 = w.w3 = w.w2 = huge;
  EXPECT_THAT(PanelFfn::Create(w, {.compute = DType::kF32}),
              StatusIs(absl::StatusCode::kResourceExhausted,
                       ::testing::AllOf(HasSubstr("[16777216, 16777216]"), HasSubstr("2251799813685248 bytes"))));
  EXPECT_THAT(PanelLinear::Create(huge, DType::kF32),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("1125899906842624 bytes")));
}

}  // namespace
}  // namespace moe
