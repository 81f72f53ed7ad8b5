// Every router family against a plain reference written here with full sorts
// (the engine uses partial sorts), over grids of shapes and the edge cases:
// ties, k = E, k = 1, T = 1, large T.
#include "engine/api/router.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <random>

#include "tests/test_util.h"

namespace moe {
namespace {

std::vector<double> RefSoftmax(const std::vector<double>& x) {
  const double m = *std::max_element(x.begin(), x.end());
  std::vector<double> p(x.size());
  double sum = 0;
  for (size_t i = 0; i < x.size(); ++i) sum += (p[i] = std::exp(x[i] - m));
  for (double& v : p) v /= sum;
  return p;
}

// Indices sorted by score descending, ties by index (stable sort).
std::vector<int> RefOrder(const std::vector<double>& scores) {
  std::vector<int> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  return order;
}

struct Choice {
  std::vector<int> experts;
  std::vector<double> weights;
};

Choice RefRoute(const RouterSpec& spec, const std::vector<double>& logits, const std::vector<double>& bias) {
  const int E = spec.num_experts;
  Choice c;
  switch (spec.kind) {
    case RouterKind::kSoftmaxTopK: {
      auto p = RefSoftmax(logits);
      auto order = RefOrder(p);
      double sum = 0;
      for (int j = 0; j < spec.top_k; ++j) sum += p[order[j]];
      for (int j = 0; j < spec.top_k; ++j) {
        c.experts.push_back(order[j]);
        c.weights.push_back(spec.norm_topk_prob ? p[order[j]] / sum : p[order[j]]);
      }
      break;
    }
    case RouterKind::kSigmoidGroupTopK:
    case RouterKind::kSoftmaxGroupTopK: {
      const bool sigmoid = spec.kind == RouterKind::kSigmoidGroupTopK;
      std::vector<double> s(E), choice(E);
      if (sigmoid) {
        for (int e = 0; e < E; ++e) s[e] = 1 / (1 + std::exp(-logits[e]));
      } else {
        s = RefSoftmax(logits);
      }
      for (int e = 0; e < E; ++e) choice[e] = s[e] + (sigmoid && !bias.empty() ? bias[e] : 0);
      const int size = E / spec.n_group;
      std::vector<double> group(spec.n_group);
      for (int g = 0; g < spec.n_group; ++g) {
        std::vector<double> member(choice.begin() + g * size, choice.begin() + (g + 1) * size);
        std::sort(member.rbegin(), member.rend());
        group[g] = sigmoid ? (size > 1 ? member[0] + member[1] : member[0]) : member[0];
      }
      auto group_order = RefOrder(group);
      std::vector<double> masked(E, -INFINITY);
      for (int j = 0; j < spec.topk_group; ++j) {
        for (int i = 0; i < size; ++i) masked[group_order[j] * size + i] = choice[group_order[j] * size + i];
      }
      if (spec.n_group == 1) masked = choice;
      auto order = RefOrder(masked);
      double sum = 0;
      for (int j = 0; j < spec.top_k; ++j) sum += s[order[j]];
      for (int j = 0; j < spec.top_k; ++j) {
        c.experts.push_back(order[j]);
        double w = s[order[j]];
        if (sigmoid) {
          if (spec.norm_topk_prob) w /= sum + 1e-20;
          w *= spec.routed_scaling_factor;
        } else {
          w = (spec.norm_topk_prob && spec.top_k > 1) ? w / (sum + 1e-20) : w * spec.routed_scaling_factor;
        }
        c.weights.push_back(w);
      }
      break;
    }
    case RouterKind::kDenseSoftmax: {
      auto p = RefSoftmax(logits);
      for (int e = 0; e < E; ++e) {
        c.experts.push_back(e);
        c.weights.push_back(p[e]);
      }
      break;
    }
    case RouterKind::kHierarchical: {
      const int G = spec.n_group, size = E / G;
      auto pg = RefSoftmax(std::vector<double>(logits.begin(), logits.begin() + G));
      auto gorder = RefOrder(pg);
      for (int j = 0; j < spec.topk_group; ++j) {
        const int g = gorder[j];
        auto pe = RefSoftmax(std::vector<double>(logits.begin() + G + g * size, logits.begin() + G + (g + 1) * size));
        auto eorder = RefOrder(pe);
        for (int i = 0; i < spec.top_k_per_group; ++i) {
          c.experts.push_back(g * size + eorder[i]);
          c.weights.push_back(pg[g] * pe[eorder[i]]);
        }
      }
      break;
    }
    case RouterKind::kExpertChoice:
      break;  // tested separately: it is a function of the whole batch
  }
  return c;
}

void ExpectMatchesReference(const RouterSpec& spec, int T, std::mt19937& rng, bool integer_logits) {
  const int columns = RouterLogitColumns(spec);
  std::vector<float> logits(static_cast<size_t>(T) * columns), bias(spec.num_experts);
  // Integer logits make ties common; tie handling must match too.
  std::uniform_int_distribution<int> small(-2, 2);
  std::normal_distribution<float> normal(0, 2);
  for (float& v : logits) v = integer_logits ? static_cast<float>(small(rng)) : normal(rng);
  for (float& v : bias) v = integer_logits ? 0.0f : 0.1f * normal(rng);
  Routing routing;
  SelectExperts(spec, logits.data(), T, bias.data(), &routing);
  ASSERT_EQ(routing.slots, RoutingSlots(spec));
  for (int t = 0; t < T; ++t) {
    std::vector<double> row(logits.begin() + static_cast<size_t>(t) * columns,
                            logits.begin() + static_cast<size_t>(t + 1) * columns);
    std::vector<double> bias_d(bias.begin(), bias.end());
    Choice expected = RefRoute(spec, row, bias_d);
    for (int s = 0; s < routing.slots; ++s) {
      const size_t i = static_cast<size_t>(t) * routing.slots + s;
      ASSERT_EQ(routing.expert[i], expected.experts[s]) << "token " << t << " slot " << s;
      EXPECT_NEAR(routing.weight[i], expected.weights[s], 1e-5 * std::max(1.0, std::fabs(expected.weights[s])))
          << "token " << t << " slot " << s;
    }
  }
}

RouterSpec Spec(RouterKind kind, int E, int k) {
  RouterSpec spec;
  spec.kind = kind;
  spec.num_experts = E;
  spec.top_k = k;
  return spec;
}

TEST(SoftmaxTopK, MatchesReferenceOverGridIncludingTies) {
  std::mt19937 rng(1);
  for (int E : {1, 2, 8, 64}) {
    for (int k : {1, 2, 6, E}) {
      if (k > E) continue;
      for (bool norm : {false, true}) {
        for (int T : {1, 7, 300}) {
          for (bool ties : {false, true}) {
            RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, E, k);
            spec.norm_topk_prob = norm;
            SCOPED_TRACE(::testing::Message()
                         << "E=" << E << " k=" << k << " norm=" << norm << " T=" << T << " ties=" << ties);
            ExpectMatchesReference(spec, T, rng, ties);
          }
        }
      }
    }
  }
}

TEST(SoftmaxTopK, TiesGoToTheLowerExpertIndex) {
  RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, 4, 2);
  const float logits[] = {1, 3, 3, 3};
  Routing routing;
  SelectExperts(spec, logits, 1, nullptr, &routing);
  EXPECT_EQ(routing.expert, (std::vector<int32_t>{1, 2}));
}

TEST(SoftmaxTopK, RenormalisedWeightsSumToOne) {
  RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, 8, 3);
  spec.norm_topk_prob = true;
  std::vector<float> logits = {0.1f, -1, 2, 0.5f, 3, -2, 0, 1};
  Routing routing;
  SelectExperts(spec, logits.data(), 1, nullptr, &routing);
  EXPECT_NEAR(routing.weight[0] + routing.weight[1] + routing.weight[2], 1.0f, 1e-6);
  EXPECT_EQ(routing.expert, (std::vector<int32_t>{4, 2, 7}));
}

TEST(SigmoidGroupTopK, MatchesReferenceOverGrid) {
  std::mt19937 rng(2);
  for (auto [E, groups, topk_group, k] :
       std::vector<std::array<int, 4>>{{16, 4, 2, 4}, {8, 1, 1, 2}, {64, 8, 4, 6}, {32, 4, 4, 8}, {16, 8, 1, 2}}) {
    for (bool norm : {false, true}) {
      for (int T : {1, 33, 100}) {  // 100 x 64 experts: split over the thread team
        RouterSpec spec = Spec(RouterKind::kSigmoidGroupTopK, E, k);
        spec.n_group = groups;
        spec.topk_group = topk_group;
        spec.norm_topk_prob = norm;
        spec.routed_scaling_factor = 2.5f;
        SCOPED_TRACE(::testing::Message() << "E=" << E << " groups=" << groups << " k=" << k << " norm=" << norm);
        ExpectMatchesReference(spec, T, rng, false);
        ExpectMatchesReference(spec, T, rng, true);
      }
    }
  }
}

TEST(SigmoidGroupTopK, CorrectionBiasSteersSelectionButNotWeights) {
  RouterSpec spec = Spec(RouterKind::kSigmoidGroupTopK, 4, 1);
  const float logits[] = {2, 0, 0, 0};
  const float bias[] = {0, 0, 0, 1};  // expert 3 wins the choice...
  Routing routing;
  SelectExperts(spec, logits, 1, bias, &routing);
  EXPECT_EQ(routing.expert[0], 3);
  EXPECT_FLOAT_EQ(routing.weight[0], 0.5f);  // ...with its unbiased sigmoid(0)
}

TEST(SoftmaxGroupTopK, MatchesReferenceOverGrid) {
  std::mt19937 rng(3);
  for (auto [E, groups, topk_group, k] : std::vector<std::array<int, 4>>{{8, 4, 2, 3}, {16, 1, 1, 6}, {64, 8, 3, 6}}) {
    for (bool norm : {false, true}) {
      RouterSpec spec = Spec(RouterKind::kSoftmaxGroupTopK, E, k);
      spec.n_group = groups;
      spec.topk_group = topk_group;
      spec.norm_topk_prob = norm;
      spec.routed_scaling_factor = 16;
      for (int T : {17, 100}) {
        ExpectMatchesReference(spec, T, rng, false);
        ExpectMatchesReference(spec, T, rng, true);
      }
    }
  }
}

TEST(DenseSoftmax, EveryExpertWithSoftmaxWeights) {
  std::mt19937 rng(4);
  for (int E : {1, 3, 16}) {
    for (int T : {9, 300}) ExpectMatchesReference(Spec(RouterKind::kDenseSoftmax, E, 1), T, rng, false);
  }
}

TEST(Hierarchical, MatchesReferenceAndWeightIsTheProduct) {
  std::mt19937 rng(5);
  for (auto [E, G, tg, kpg] : std::vector<std::array<int, 4>>{{16, 4, 2, 2}, {8, 2, 1, 1}, {12, 3, 3, 4}}) {
    RouterSpec spec = Spec(RouterKind::kHierarchical, E, tg * kpg);
    spec.n_group = G;
    spec.topk_group = tg;
    spec.top_k_per_group = kpg;
    for (int T : {21, 300}) {
      ExpectMatchesReference(spec, T, rng, false);
      ExpectMatchesReference(spec, T, rng, true);
    }
  }
}

TEST(ExpertChoice, EachExpertTakesItsBestTokensUpToCapacity) {
  RouterSpec spec = Spec(RouterKind::kExpertChoice, 4, 1);
  spec.capacity_factor = 2;  // capacity = ceil(2 * 10 / 4) = 5 tokens per expert
  const int T = 10;
  std::mt19937 rng(6);
  std::normal_distribution<float> normal;
  std::vector<float> logits(T * 4);
  for (float& v : logits) v = normal(rng);
  Routing routing;
  SelectExperts(spec, logits.data(), T, nullptr, &routing);
  for (int e = 0; e < 4; ++e) {
    std::vector<double> column(T);
    for (int t = 0; t < T; ++t) {
      column[t] = RefSoftmax(std::vector<double>(logits.begin() + t * 4, logits.begin() + t * 4 + 4))[e];
    }
    auto order = RefOrder(column);
    std::vector<bool> chosen(T, false);
    for (int j = 0; j < 5; ++j) chosen[order[j]] = true;
    for (int t = 0; t < T; ++t) {
      const size_t slot = static_cast<size_t>(t) * 4 + e;
      EXPECT_EQ(routing.expert[slot] == e, chosen[t]) << "expert " << e << " token " << t;
      if (chosen[t]) {
        EXPECT_NEAR(routing.weight[slot], column[t], 1e-6);
      }
    }
  }
}

TEST(MultiGate, EachTaskWeighsOnlyWhatItsGateSelected) {
  RouterSpec spec = Spec(RouterKind::kSoftmaxTopK, 4, 1);
  spec.num_tasks = 2;
  // Task 0 prefers expert 1, task 1 prefers expert 3.
  const float logits[] = {0, 5, 0, 0, /*task 1*/ 0, 0, 0, 5};
  Routing routing;
  SelectExperts(spec, logits, 1, nullptr, &routing);
  ASSERT_EQ(routing.slots, 2);
  EXPECT_EQ(routing.expert, (std::vector<int32_t>{1, 3}));
  EXPECT_GT(routing.task_weights(0)[0], 0.9f);
  EXPECT_EQ(routing.task_weights(0)[1], 0.0f);
  EXPECT_EQ(routing.task_weights(1)[0], 0.0f);
  EXPECT_GT(routing.task_weights(1)[1], 0.9f);
}

}  // namespace
}  // namespace moe
