// Dispatch (counting sort by expert, capacity) and combine against plain loops.
#include "engine/api/dispatch.h"

#include <map>
#include <numeric>
#include <random>

#include "tests/test_util.h"

namespace moe {
namespace {

Routing RandomRouting(int T, int S, int E, std::mt19937& rng) {
  Routing r;
  r.num_tokens = T;
  r.slots = S;
  r.expert.resize(static_cast<size_t>(T) * S);
  r.weight.resize(r.expert.size());
  std::uniform_real_distribution<float> uniform(0, 1);
  for (int t = 0; t < T; ++t) {
    std::vector<int> experts(E);
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int s = 0; s < S; ++s) {
      r.expert[static_cast<size_t>(t) * S + s] = experts[s];
      r.weight[static_cast<size_t>(t) * S + s] = uniform(rng);
    }
  }
  return r;
}

TEST(PlanDispatch, GroupsEveryTokenSlotByExpertInTokenOrder) {
  std::mt19937 rng(1);
  for (auto [T, S, E] : std::vector<std::array<int, 3>>{{1, 1, 1}, {1, 2, 8}, {64, 2, 8}, {4096, 6, 64}, {9, 8, 8}}) {
    Routing routing = RandomRouting(T, S, E, rng);
    DispatchPlan plan;
    PlanDispatch(routing, E, -1, &plan);
    ASSERT_EQ(plan.num_rows(), static_cast<int64_t>(T) * S);
    std::map<int, std::vector<int>> expected;  // expert -> tokens, in token order
    for (int t = 0; t < T; ++t) {
      for (int s = 0; s < S; ++s) expected[routing.expert[t * S + s]].push_back(t);
    }
    for (int e = 0; e < E; ++e) {
      std::vector<int> got(plan.row_token.begin() + plan.offsets[e], plan.row_token.begin() + plan.offsets[e + 1]);
      EXPECT_EQ(got, expected[e]) << "expert " << e;
      EXPECT_EQ(plan.tokens_routed[e], static_cast<int64_t>(expected[e].size()));
      EXPECT_EQ(plan.tokens_dropped[e], 0);
    }
    for (int t = 0; t < T; ++t) {
      for (int s = 0; s < S; ++s) {
        const int row = plan.slot_row[t * S + s];
        EXPECT_EQ(plan.row_token[row], t);
        const int e = routing.expert[t * S + s];
        EXPECT_GE(row, plan.offsets[e]);
        EXPECT_LT(row, plan.offsets[e + 1]);
      }
    }
  }
}

TEST(PlanDispatch, CapacityKeepsFirstChoicesFirstAndCountsDrops) {
  // 4 tokens, 2 slots; every token picks expert 0 first, then expert 1.
  Routing r;
  r.num_tokens = 4;
  r.slots = 2;
  r.expert = {0, 1, 0, 1, 0, 1, 1, 0};  // token 3 picks 1 first, 0 second
  r.weight.assign(8, 0.5f);
  DispatchPlan plan;
  PlanDispatch(r, 2, /*capacity=*/3, &plan);
  // Expert 0: first choices of tokens 0, 1, 2 fill it; token 3's second choice is dropped.
  EXPECT_EQ(plan.tokens_routed[0], 4);
  EXPECT_EQ(plan.tokens_dropped[0], 1);
  EXPECT_EQ(plan.slot_row[3 * 2 + 1], -1);
  // Expert 1: token 3's first choice comes before the second choices of 0, 1, 2.
  EXPECT_EQ(plan.tokens_routed[1], 4);
  EXPECT_EQ(plan.tokens_dropped[1], 1);
  // Expert 1's rows (from 3, after expert 0's three) are in token order:
  // token 0's and token 1's second choices, then token 3's first.
  EXPECT_EQ(plan.offsets[1], 3);
  EXPECT_EQ(plan.slot_row[0 * 2 + 1], 3);
  EXPECT_EQ(plan.slot_row[1 * 2 + 1], 4);
  EXPECT_EQ(plan.slot_row[3 * 2 + 0], 5);
  EXPECT_EQ(plan.slot_row[2 * 2 + 1], -1);  // token 2's second choice was the 4th in priority
  EXPECT_EQ(plan.num_rows(), 6);
}

TEST(ExpertCapacity, FollowsTheCapacityFactorFormula) {
  RouterSpec spec;
  spec.num_experts = 8;
  spec.top_k = 2;
  EXPECT_EQ(ExpertCapacity(spec, 100), -1);  // dropless
  spec.capacity_factor = 1.25f;
  EXPECT_EQ(ExpertCapacity(spec, 100), 32);  // ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
  spec.kind = RouterKind::kExpertChoice;
  EXPECT_EQ(ExpertCapacity(spec, 100), -1);
}

// Sums in the documented order, so that the engine's rows must match bit for
// bit: residual, shared, then the slots in order.
std::vector<float> ReferenceCombine(const Routing& routing, const DispatchPlan& plan,
                                    const std::vector<float>& expert_out, const std::vector<float>* residual,
                                    const std::vector<float>* shared, int d) {
  const int T = routing.num_tokens, S = routing.slots;
  std::vector<float> out(static_cast<size_t>(T) * d);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < d; ++i) {
      const size_t at = static_cast<size_t>(t) * d + i;
      float sum = residual ? (*residual)[at] : 0.0f;
      if (shared) sum += (*shared)[at];
      for (int s = 0; s < S; ++s) {
        const int32_t row = plan.slot_row[t * S + s];
        if (row >= 0) sum += routing.weight[t * S + s] * expert_out[static_cast<size_t>(row) * d + i];
      }
      out[at] = sum;
    }
  }
  return out;
}

TEST(Combine, IsTheWeightedSumOfExpertRowsPerToken) {
  std::mt19937 rng(2);
  const int T = 37, S = 3, E = 5, d = 19;
  Routing routing = RandomRouting(T, S, E, rng);
  DispatchPlan plan;
  PlanDispatch(routing, E, -1, &plan);
  std::normal_distribution<float> normal;
  std::vector<float> expert_out(static_cast<size_t>(plan.num_rows()) * d);
  for (float& v : expert_out) v = normal(rng);
  std::vector<float> out(static_cast<size_t>(T) * d, 7.0f);  // overwritten
  Combine(routing, plan, expert_out.data(), nullptr, nullptr, d, 0, out.data());
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < d; ++i) {
      double expected = 0.0;
      for (int s = 0; s < S; ++s) {
        expected += routing.weight[t * S + s] * expert_out[static_cast<size_t>(plan.slot_row[t * S + s]) * d + i];
      }
      EXPECT_NEAR(out[t * d + i], expected, 1e-5);
    }
  }
}

// Residual and shared expert rows, dropped slots, and batches large enough to
// be split over the thread team: every row as the serial sum, bit for bit.
TEST(Combine, AddsResidualAndSharedRowsAndSplitsLargeBatchesExactly) {
  std::mt19937 rng(5);
  const int S = 6, E = 16, d = 256;
  for (int T : {3, 1000}) {
    Routing routing = RandomRouting(T, S, E, rng);
    DispatchPlan plan;
    PlanDispatch(routing, E, /*capacity=*/T * S / E, &plan);  // drops some selections
    std::normal_distribution<float> normal;
    auto random = [&](size_t n) {
      std::vector<float> v(n);
      for (float& x : v) x = normal(rng);
      return v;
    };
    const std::vector<float> expert_out = random(static_cast<size_t>(plan.num_rows()) * d);
    const std::vector<float> residual = random(static_cast<size_t>(T) * d), shared = random(residual.size());
    std::vector<float> out(residual.size());
    Combine(routing, plan, expert_out.data(), residual.data(), shared.data(), d, 0, out.data());
    EXPECT_EQ(out, ReferenceCombine(routing, plan, expert_out, &residual, &shared, d)) << T << " tokens";
    Combine(routing, plan, expert_out.data(), nullptr, shared.data(), d, 0, out.data());
    EXPECT_EQ(out, ReferenceCombine(routing, plan, expert_out, nullptr, &shared, d)) << T << " tokens";
  }
}

}  // namespace
}  // namespace moe
