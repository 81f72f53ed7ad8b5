// The CUDA kernels' per-thread logic (engine/cuda/device_math.h), run on the
// host against the engine's own router, dispatch and combine, so that what
// the GPU computes is checked on every machine, GPU or not. The functions
// compile the same for both; only exp/erf/tanh differ on the device.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "engine/api/dispatch.h"
#include "engine/api/dtype.h"
#include "engine/api/router.h"
#include "engine/cpu/panel_kernels.h"
#include "engine/cuda/device_math.h"
#include "engine/cuda/selection_params.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace dm = ::moe::device_math;

std::vector<float> RandomLogits(int count, uint32_t seed, bool with_ties) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(count);
  for (float& value : logits) value = normal(rng);
  // Exact ties, which both sides must break towards the lower index.
  if (with_ties) {
    for (int i = 3; i < count; i += 7) logits[i] = logits[i - 3];
  }
  return logits;
}

dm::SelectionParams ParamsOf(const RouterSpec& spec) { return dm::SelectionParamsOf(spec, /*round_logits=*/false); }

struct SelectionCase {
  std::string label;
  RouterSpec spec;
};

void PrintTo(const SelectionCase& c, std::ostream* os) { *os << c.label; }

class SelectTokenTest : public ::testing::TestWithParam<SelectionCase> {};

TEST_P(SelectTokenTest, SelectsAsTheEngineRouter) {
  const RouterSpec& spec = GetParam().spec;
  const int T = 40, E = spec.num_experts, k = spec.top_k;
  for (bool ties : {false, true}) {
    const std::vector<float> logits = RandomLogits(T * E, 7 + E, ties);
    const std::vector<float> bias = RandomLogits(E, 99, false);
    const float* correction = spec.kind == RouterKind::kSigmoidGroupTopK ? bias.data() : nullptr;
    Routing expected;
    SelectExperts(spec, logits.data(), T, correction, &expected);
    dm::SelectionScratch scratch;
    for (int t = 0; t < T; ++t) {
      std::vector<int32_t> expert(k);
      std::vector<float> weight(k);
      dm::SelectToken(ParamsOf(spec), logits.data() + t * E, /*logit_bias=*/nullptr, correction, scratch, expert.data(),
                      weight.data());
      for (int j = 0; j < k; ++j) {
        ASSERT_EQ(expert[j], expected.expert[t * k + j]) << "token " << t << " slot " << j << " ties " << ties;
        // Same operations in the same order: the same bits.
        ASSERT_EQ(weight[j], expected.weight[t * k + j]) << "token " << t << " slot " << j;
      }
    }
  }
}

RouterSpec Spec(RouterKind kind, int experts, int top_k, int groups, int topk_group, bool norm, float scale) {
  return {.kind = kind,
          .num_experts = experts,
          .top_k = top_k,
          .norm_topk_prob = norm,
          .routed_scaling_factor = scale,
          .n_group = groups,
          .topk_group = topk_group};
}

INSTANTIATE_TEST_SUITE_P(
    Families, SelectTokenTest,
    ::testing::Values(SelectionCase{"mixtral", Spec(RouterKind::kSoftmaxTopK, 8, 2, 1, 1, true, 1.0f)},
                      SelectionCase{"granite_scaled", Spec(RouterKind::kSoftmaxTopK, 40, 8, 1, 1, false, 0.22f)},
                      SelectionCase{"qwen", Spec(RouterKind::kSoftmaxTopK, 60, 4, 1, 1, false, 1.0f)},
                      SelectionCase{"deepseek_v3", Spec(RouterKind::kSigmoidGroupTopK, 256, 8, 8, 4, true, 2.5f)},
                      SelectionCase{"v3_one_group", Spec(RouterKind::kSigmoidGroupTopK, 64, 6, 1, 1, false, 1.0f)},
                      SelectionCase{"deepseek_v2", Spec(RouterKind::kSoftmaxGroupTopK, 160, 6, 8, 3, false, 16.0f)},
                      SelectionCase{"v2_norm", Spec(RouterKind::kSoftmaxGroupTopK, 64, 6, 8, 3, true, 1.0f)}),
    [](const ::testing::TestParamInfo<SelectionCase>& info) { return info.param.label; });

TEST(SelectTokenTest, RoundsLogitsToBf16WhenAsked) {
  const RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, 16, 2, 1, 1, false, 1.0f);
  std::vector<float> logits = RandomLogits(16, 5, false);
  std::vector<float> rounded = logits;
  for (float& value : rounded) value = RoundToBf16(value);
  Routing expected;
  SelectExperts(spec, rounded.data(), 1, nullptr, &expected);
  dm::SelectionParams params = ParamsOf(spec);
  params.round_logits = true;
  dm::SelectionScratch scratch;
  int32_t expert[2];
  float weight[2];
  dm::SelectToken(params, logits.data(), nullptr, nullptr, scratch, expert, weight);
  EXPECT_EQ(expert[0], expected.expert[0]);
  EXPECT_EQ(weight[1], expected.weight[1]);
}

// gpt-oss: the router's bias joins the logits before anything else.
TEST(SelectTokenTest, AddsTheRouterLogitBiasFirst) {
  const RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, 32, 4, 1, 1, true, 1.0f);
  const std::vector<float> logits = RandomLogits(32, 21, false), logit_bias = RandomLogits(32, 22, false);
  std::vector<float> biased(32);
  for (int e = 0; e < 32; ++e) biased[e] = logits[e] + logit_bias[e];
  Routing expected;
  SelectExperts(spec, biased.data(), 1, nullptr, &expected);
  dm::SelectionScratch scratch;
  int32_t expert[4];
  float weight[4];
  dm::SelectToken(ParamsOf(spec), logits.data(), logit_bias.data(), nullptr, scratch, expert, weight);
  for (int j = 0; j < 4; ++j) {
    EXPECT_EQ(expert[j], expected.expert[j]);
    EXPECT_EQ(weight[j], expected.weight[j]);
  }
}

TEST(DeviceMathTest, ClampedSwigluIsTheCpuKernels) {
  const SwigluClamp clamp{.alpha = 1.702f, .limit = 7.0f};
  std::vector<float> row(kPanelColumns), bias(kPanelColumns);
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 6.0f);  // values past the limit both ways
  for (int c = 0; c < kPanelColumns; ++c) {
    row[c] = normal(rng);
    bias[c] = normal(rng) / 4;
  }
  std::vector<float> expected = row;
  ClampedSwigluTileRow(bias.data(), clamp, expected.data());
  const int half = kPanelColumns / 2;
  for (int c = 0; c < half; ++c) {
    EXPECT_EQ(dm::ClampedSwiglu(row[c] + bias[c], row[half + c] + bias[half + c], clamp.alpha, clamp.limit),
              expected[c])
        << "column " << c;
  }
}

// The chunked counting sort, run as the kernels run it (every chunk, then
// every expert, then every chunk), against PlanDispatch.
DispatchPlan DeviceDispatch(const Routing& routing, int E, int64_t capacity) {
  const int T = routing.num_tokens, S = routing.slots;
  const int64_t n = static_cast<int64_t>(T) * S;
  const int64_t chunks = (n + dm::kChunk - 1) / dm::kChunk;
  std::vector<int32_t> counts(chunks * E), priority_rank(n), kept_key(n), kept_rank(n), routed_total(E), kept_total(E);
  auto pass = [&](const int32_t* key, dm::Order order, int32_t* total, int32_t* rank) {
    std::fill(counts.begin(), counts.end(), 0);
    for (int64_t c = 0; c < chunks; ++c) dm::CountChunk(c, key, order, T, S, E, counts.data());
    for (int e = 0; e < E; ++e) dm::ScanChunks(e, chunks, E, counts.data(), total);
    for (int64_t c = 0; c < chunks; ++c) dm::RankChunk(c, key, order, T, S, E, counts.data(), rank);
  };
  if (capacity >= 0) pass(routing.expert.data(), dm::Order::kSlotMajor, routed_total.data(), priority_rank.data());
  for (int64_t i = 0; i < n; ++i) kept_key[i] = dm::KeptKey(routing.expert[i], capacity, priority_rank[i]);
  pass(kept_key.data(), dm::Order::kTokenMajor, kept_total.data(), kept_rank.data());
  DispatchPlan plan;
  plan.num_experts = E;
  plan.offsets.resize(E + 1);
  plan.tokens_routed.resize(E);
  plan.tokens_dropped.resize(E);
  dm::FinishCounts(E, capacity >= 0 ? routed_total.data() : kept_total.data(), kept_total.data(), plan.offsets.data(),
                   plan.tokens_routed.data(), plan.tokens_dropped.data());
  plan.slot_row.resize(n);
  plan.row_token.resize(plan.num_rows());
  std::vector<int32_t> row_expert(plan.num_rows());
  for (int64_t i = 0; i < n; ++i) {
    dm::PlaceSelection(i, S, kept_key.data(), kept_rank.data(), plan.offsets.data(), plan.slot_row.data(),
                       plan.row_token.data(), row_expert.data());
  }
  for (int e = 0; e < E; ++e) {
    for (int64_t row = plan.offsets[e]; row < plan.offsets[e + 1]; ++row) EXPECT_EQ(row_expert[row], e);
  }
  return plan;
}

Routing SkewedRouting(int T, int S, int E, uint32_t seed) {
  std::mt19937 rng(seed);
  Routing routing;
  routing.num_tokens = T;
  routing.slots = S;
  routing.expert.resize(static_cast<size_t>(T) * S);
  routing.weight.assign(routing.expert.size(), 0.5f);
  for (int t = 0; t < T; ++t) {
    std::vector<int> pool(E);
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng);
    // Expert 0 is every other token's first choice: its capacity binds.
    if (t % 2 == 0) std::swap(pool[0], *std::find(pool.begin(), pool.end(), 0));
    for (int s = 0; s < S; ++s) routing.expert[t * S + s] = (s == S - 1 && t % 5 == 0) ? -1 : pool[s];
  }
  return routing;
}

TEST(DeviceDispatchTest, PlansAsPlanDispatchWithAndWithoutCapacity) {
  for (int T : {1, 7, 64, 333}) {
    for (int64_t capacity : {int64_t{-1}, int64_t{0}, int64_t{3}, int64_t{40}}) {
      const int S = 3, E = 11;
      const Routing routing = SkewedRouting(T, S, E, 17 + T);
      DispatchPlan expected;
      PlanDispatch(routing, E, capacity, &expected);
      const DispatchPlan plan = DeviceDispatch(routing, E, capacity);
      const std::string where = "T=" + std::to_string(T) + " capacity=" + std::to_string(capacity);
      EXPECT_EQ(plan.offsets, expected.offsets) << where;
      EXPECT_EQ(plan.row_token, expected.row_token) << where;
      EXPECT_EQ(plan.slot_row, expected.slot_row) << where;
      EXPECT_EQ(plan.tokens_routed, expected.tokens_routed) << where;
      EXPECT_EQ(plan.tokens_dropped, expected.tokens_dropped) << where;
    }
  }
}

TEST(DeviceCombineTest, AddsAsCombineInTheSameOrder) {
  const int T = 9, S = 3, E = 5, d = 13;
  const Routing routing = SkewedRouting(T, S, E, 3);
  DispatchPlan plan;
  PlanDispatch(routing, E, /*capacity=*/2, &plan);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  auto random = [&](size_t count) {
    std::vector<float> values(count);
    for (float& value : values) value = normal(rng);
    return values;
  };
  Routing weighted = routing;
  weighted.weight = random(routing.weight.size());
  const std::vector<float> rows = random(plan.num_rows() * d), residual = random(T * d), shared = random(T * d);
  std::vector<float> expected(T * d);
  Combine(weighted, plan, rows.data(), residual.data(), shared.data(), d, /*task=*/0, expected.data());
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < d; ++i) {
      ASSERT_EQ(dm::CombineElement(t, i, S, d, plan.slot_row.data(), weighted.weight.data(), rows.data(),
                                   residual.data(), shared.data()),
                expected[t * d + i])
          << "token " << t << " element " << i;
    }
  }
}

TEST(DeviceMathTest, Bf16RoundingIsTheEngines) {
  for (float value : {0.0f, -0.0f, 1.0f, 1.00390625f, 1.01171875f, 3.14159f, -65504.5f, 1e-40f, 3.4e38f}) {
    EXPECT_EQ(dm::RoundBf16(value), RoundToBf16(value)) << value;
  }
  EXPECT_TRUE(std::isnan(dm::RoundBf16(std::nanf(""))));
}

TEST(DeviceMathTest, ActivationsAreTheReferenceOnes) {
  for (Activation activation : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh, Activation::kRelu}) {
    for (float x : {-3.0f, -0.5f, 0.0f, 0.7f, 2.5f}) {
      EXPECT_NEAR(dm::Activate(static_cast<dm::Act>(activation), x), testing::ReferenceActivation(activation, x), 1e-6)
          << static_cast<int>(activation) << " at " << x;
    }
  }
}

}  // namespace
}  // namespace moe
