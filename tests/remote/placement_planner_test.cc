// The placement planner: a hot expert gets replicas on the least-loaded
// workers while that relieves the most-loaded one, with the imbalance worked
// out by hand; balanced load proposes nothing; the limits hold; a placement
// only grows; zero-load and front-end experts get nothing; bad input is
// INVALID_ARGUMENT naming the problem. Random placements check the
// invariants against an independent computation of the worker loads.
#include "remote/placement_planner.h"

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

std::string Address(int w) { return absl::StrCat("10.0.0.", w, ":8101"); }

// One worker per entry of `held`, which lists, per layer, the experts it holds.
std::vector<RemoteExperts::Worker> Placement(int num_experts, const std::vector<std::vector<std::vector<int>>>& held) {
  std::vector<RemoteExperts::Worker> workers;
  for (size_t w = 0; w < held.size(); ++w) {
    const int num_layers = static_cast<int>(held[w].size());
    RemoteExperts::Worker worker{.address = Address(static_cast<int>(w)),
                                 .experts = ExpertSet::None(num_layers, num_experts)};
    for (int layer = 0; layer < num_layers; ++layer) {
      for (int e : held[w][layer]) worker.experts.Add(layer, e);
    }
    workers.push_back(std::move(worker));
  }
  return workers;
}

// Single-layer placements: held[w] = the experts worker w holds.
std::vector<RemoteExperts::Worker> OneLayer(int num_experts, const std::vector<std::vector<int>>& held) {
  std::vector<std::vector<std::vector<int>>> layers;
  for (const std::vector<int>& experts : held) layers.push_back({experts});
  return Placement(num_experts, layers);
}

std::vector<int> Held(const RemoteExperts::Worker& worker, int layer) {
  std::vector<int> experts;
  for (int e = 0; e < worker.experts.num_experts(); ++e) {
    if (worker.experts.Contains(layer, e)) experts.push_back(e);
  }
  return experts;
}

// max / mean of the projected worker loads, computed here independently of the planner.
double ImbalanceOf(const std::vector<RemoteExperts::Worker>& workers, int layer, const std::vector<double>& load) {
  std::vector<double> worker_load(workers.size(), 0.0);
  for (size_t e = 0; e < load.size(); ++e) {
    int replicas = 0;
    for (const RemoteExperts::Worker& worker : workers) replicas += worker.experts.Contains(layer, e) ? 1 : 0;
    for (size_t w = 0; w < workers.size(); ++w) {
      if (workers[w].experts.Contains(layer, e)) worker_load[w] += load[e] / replicas;
    }
  }
  double total = 0;
  for (double l : worker_load) total += l;
  if (total == 0) return 1;
  return *std::max_element(worker_load.begin(), worker_load.end()) / (total / workers.size());
}

TEST(PlacementPlannerTest, HotExpertGetsAReplicaAndTheImbalanceIsComputedExactly) {
  // Worker 0 holds experts 0 (10x load) and 1: 11; worker 1 holds 2 and 3: 2. Mean 6.5.
  // Expert 0's second replica on worker 1 splits its 10 as 5 + 5: worker 0 carries 6, worker 1 carries 7.
  const std::vector<RemoteExperts::Worker> current = OneLayer(4, {{0, 1}, {2, 3}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{10, 1, 1, 1}}, PlannerOptions()));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 0 -> 10.0.0.1:8101"));
  EXPECT_THAT(Held(plan.workers[0], 0), ElementsAre(0, 1));
  EXPECT_THAT(Held(plan.workers[1], 0), ElementsAre(0, 2, 3));
  ASSERT_EQ(plan.workers.size(), 2u);
  EXPECT_EQ(plan.workers[0].address, "10.0.0.0:8101");
  EXPECT_EQ(plan.workers[1].address, "10.0.0.1:8101");
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(11 / 6.5)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(7 / 6.5)));
}

TEST(PlacementPlannerTest, ReplicasGoToTheLeastLoadedWorkersFirst) {
  // Worker loads 42, 8, 2, 6 (mean 14.5); expert 0 (40) is hot (threshold 1.5 * 58 / 8 = 10.875).
  // Replica 2 on worker 2 (2):  22, 8, 22, 6.
  // Replica 3 on worker 3 (6):  15.33, 8, 15.33, 19.33.
  // Replica 4 on worker 1 (8):  12, 18, 12, 16; max_replicas (4) reached.
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{40, 2, 4, 4, 1, 1, 3, 3}}, PlannerOptions()));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 0 -> 10.0.0.2:8101", "layer 0 expert 0 -> 10.0.0.3:8101",
                                        "layer 0 expert 0 -> 10.0.0.1:8101"));
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(42 / 14.5)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(18 / 14.5)));
}

TEST(PlacementPlannerTest, MaxReplicasStopsTheReplication) {
  // As above, but the second replica (worker loads 22, 8, 22, 6) is the last.
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  PlannerOptions options;
  options.max_replicas = 2;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{40, 2, 4, 4, 1, 1, 3, 3}}, options));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 0 -> 10.0.0.2:8101"));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(22 / 14.5)));
}

TEST(PlacementPlannerTest, AWorkerAtMaxExpertsPerWorkerTakesNoReplica) {
  // Worker loads 42, 8, 2, 3 (mean 13.75); worker 2, the least loaded, already holds 3 experts, the limit.
  // Replica 2 on worker 3 (3):  22, 8, 2, 23.
  // Replica 3 on worker 1 (8):  15.33, 21.33, 2, 16.33; then only worker 2 lacks expert 0, and it has no room.
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5, 6}, {7}});
  PlannerOptions options;
  options.max_experts_per_worker = 3;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{40, 2, 4, 4, 1, 1, 0, 3}}, options));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 0 -> 10.0.0.3:8101", "layer 0 expert 0 -> 10.0.0.1:8101"));
  EXPECT_THAT(Held(plan.workers[2], 0), ElementsAre(4, 5, 6));
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(42 / 13.75)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq((8 + 40.0 / 3) / 13.75)));
}

TEST(PlacementPlannerTest, ExtraPerWorkerBoundsWhatEachWorkerTakes) {
  // No fixed limit and no extra: nobody has room.
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  PlannerOptions options;
  options.extra_per_worker = 0;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{40, 2, 4, 4, 1, 1, 3, 3}}, options));

  EXPECT_THAT(plan.changes, IsEmpty());
  EXPECT_EQ(plan.imbalance_after, plan.imbalance_before);
}

TEST(PlacementPlannerTest, BalancedLoadProposesNothing) {
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{5, 5, 5, 5, 5, 5, 5, 5}}, PlannerOptions()));

  EXPECT_THAT(plan.changes, IsEmpty());
  EXPECT_THAT(plan.imbalance_before, ElementsAre(1.0));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(1.0));
  for (size_t w = 0; w < current.size(); ++w) EXPECT_EQ(Held(plan.workers[w], 0), Held(current[w], 0));
}

TEST(PlacementPlannerTest, MildlyUnevenLoadHasNoHotExpert) {
  // Threshold 1.5 * 5 = 7.5: 7 is not hot, though replicating it would lower worker 0's 12.
  const std::vector<RemoteExperts::Worker> current = OneLayer(8, {{0, 1}, {2, 3}, {4, 5}, {6, 7}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{7, 5, 4, 4, 5, 5, 5, 5}}, PlannerOptions()));
  EXPECT_THAT(plan.changes, IsEmpty());
}

TEST(PlacementPlannerTest, AReplicaThatWouldNotLowerTheLargestLoadIsNotProposed) {
  // With every expert hot, a second replica of either would leave a worker with more than 10.
  const std::vector<RemoteExperts::Worker> current = OneLayer(2, {{0}, {1}});
  PlannerOptions options;
  options.hot_factor = 0;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{10, 9}}, options));
  EXPECT_THAT(plan.changes, IsEmpty());
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(10 / 9.5)));
}

TEST(PlacementPlannerTest, WorkersTiedAtTheTopAreRelievedOneAtATime) {
  // Loads 10, 10, 1, 1 (mean 5.5). Expert 0 to worker 2 leaves the largest load at 10 (worker 1) but carried by
  // one worker instead of two; expert 1 to worker 3 then lowers it: 5, 5, 6, 6.
  const std::vector<RemoteExperts::Worker> current = OneLayer(4, {{0}, {1}, {2}, {3}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{10, 10, 1, 1}}, PlannerOptions()));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 0 -> 10.0.0.2:8101", "layer 0 expert 1 -> 10.0.0.3:8101"));
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(10 / 5.5)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(6 / 5.5)));
}

TEST(PlacementPlannerTest, ExistingReplicasBeyondTheLimitsAreKept) {
  // Expert 0 already has 2 replicas and worker 0 holds 4 experts, both above the limits: nothing is removed, and
  // expert 1 (hot, on worker 0 alone) may not get a second replica.
  const std::vector<RemoteExperts::Worker> current = OneLayer(4, {{0, 1, 2, 3}, {0}, {}});
  PlannerOptions options;
  options.max_replicas = 1;
  options.max_experts_per_worker = 1;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{10, 10, 1, 1}}, options));

  EXPECT_THAT(plan.changes, IsEmpty());
  EXPECT_THAT(Held(plan.workers[0], 0), ElementsAre(0, 1, 2, 3));
  EXPECT_THAT(Held(plan.workers[1], 0), ElementsAre(0));
  EXPECT_THAT(Held(plan.workers[2], 0), IsEmpty());
  // Worker loads 5 + 10 + 1 + 1 = 17, 5, 0: mean 22 / 3.
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(17 / (22.0 / 3))));
}

TEST(PlacementPlannerTest, ZeroLoadAndFrontEndExpertsGetNoReplica) {
  // Expert 3 runs in the front end (no worker holds it) and carries 100: it stays there and counts in no worker's
  // load. Expert 0 carries nothing. Expert 1 (8) is hot and goes to worker 1: 4, 5 (mean 4.5).
  const std::vector<RemoteExperts::Worker> current = OneLayer(4, {{0, 1}, {2}});
  PlannerOptions options;
  options.extra_per_worker = 3;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{0, 8, 1, 100}}, options));

  EXPECT_THAT(plan.changes, ElementsAre("layer 0 expert 1 -> 10.0.0.1:8101"));
  EXPECT_THAT(Held(plan.workers[0], 0), ElementsAre(0, 1));
  EXPECT_THAT(Held(plan.workers[1], 0), ElementsAre(1, 2));
  EXPECT_THAT(plan.imbalance_before, ElementsAre(::testing::DoubleEq(8 / 4.5)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(::testing::DoubleEq(5 / 4.5)));
}

TEST(PlacementPlannerTest, EveryExpertZeroLoadIsBalanced) {
  const std::vector<RemoteExperts::Worker> current = OneLayer(2, {{0}, {1}});
  PlannerOptions options;
  options.hot_factor = 0;
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{0, 0}}, options));
  EXPECT_THAT(plan.changes, IsEmpty());
  EXPECT_THAT(plan.imbalance_before, ElementsAre(1.0));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(1.0));
}

TEST(PlacementPlannerTest, EachLayerIsPlannedOnItsOwn) {
  // Layer 0 is balanced; layer 1 is the first test's case.
  const std::vector<RemoteExperts::Worker> current = Placement(4, {{{0, 1}, {0, 1}}, {{2, 3}, {2, 3}}});
  ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, {{1, 1, 1, 1}, {10, 1, 1, 1}}, {}));

  EXPECT_THAT(plan.changes, ElementsAre("layer 1 expert 0 -> 10.0.0.1:8101"));
  EXPECT_THAT(Held(plan.workers[1], 0), ElementsAre(2, 3));
  EXPECT_THAT(Held(plan.workers[1], 1), ElementsAre(0, 2, 3));
  EXPECT_THAT(plan.imbalance_before, ElementsAre(1.0, ::testing::DoubleEq(11 / 6.5)));
  EXPECT_THAT(plan.imbalance_after, ElementsAre(1.0, ::testing::DoubleEq(7 / 6.5)));
}

TEST(PlacementPlannerTest, NoWorkersIsInvalidArgument) {
  EXPECT_THAT(PlanReplicas({}, {}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at least one worker")));
}

TEST(PlacementPlannerTest, ShapeMismatchIsInvalidArgumentNamingIt) {
  const std::vector<RemoteExperts::Worker> current = Placement(4, {{{0, 1}, {0, 1}}, {{2, 3}, {2, 3}}});
  EXPECT_THAT(PlanReplicas(current, {{1, 1, 1, 1}}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("given for 1 layers; the workers' sets have 2")));
  EXPECT_THAT(PlanReplicas(current, {{1, 1, 1, 1}, {1, 1, 1}}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("layer 1's load is given for 3 experts; the workers' sets have 4")));

  std::vector<RemoteExperts::Worker> mixed = current;
  mixed[1].experts = ExpertSet::None(2, 5);
  EXPECT_THAT(PlanReplicas(mixed, {{1, 1, 1, 1}, {1, 1, 1, 1}}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("worker 10.0.0.1:8101")));
}

TEST(PlacementPlannerTest, BadLoadOrOptionsAreInvalidArgument) {
  const std::vector<RemoteExperts::Worker> current = OneLayer(2, {{0}, {1}});
  EXPECT_THAT(PlanReplicas(current, {{1, -1}}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 0 expert 1: load -1")));
  EXPECT_THAT(PlanReplicas(current, {{std::nan(""), 1}}, PlannerOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("layer 0 expert 0")));
  PlannerOptions options;
  options.max_replicas = 0;
  EXPECT_THAT(PlanReplicas(current, {{1, 1}}, options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_replicas")));
  options = PlannerOptions();
  options.hot_factor = -1;
  EXPECT_THAT(PlanReplicas(current, {{1, 1}}, options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hot_factor")));
}

// Random placements, loads and limits: the plan only adds, within the limits, only placed experts with load; its
// changes name exactly what it added; the imbalance it reports is the one computed here and never grows.
TEST(PlacementPlannerTest, RandomPlacementsKeepTheInvariants) {
  std::mt19937 rng(11);
  int total_changes = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int num_workers = 1 + static_cast<int>(rng() % 6), num_layers = 1 + static_cast<int>(rng() % 3);
    const int num_experts = 1 + static_cast<int>(rng() % 12);
    std::vector<RemoteExperts::Worker> current;
    for (int w = 0; w < num_workers; ++w) {
      current.push_back({.address = Address(w), .experts = ExpertSet::None(num_layers, num_experts)});
    }
    ExpertLoad load(num_layers, std::vector<double>(num_experts));
    for (int layer = 0; layer < num_layers; ++layer) {
      for (int e = 0; e < num_experts; ++e) {
        const int kind = static_cast<int>(rng() % 10);  // 0: zero load, 1: heavy, else light
        load[layer][e] = kind == 0 ? 0 : kind == 1 ? 20 + rng() % 100 : 1 + rng() % 10;
        for (int w = 0; w < num_workers; ++w) {
          if (rng() % 3 == 0) current[w].experts.Add(layer, e);  // some experts stay in the front end
        }
      }
    }
    PlannerOptions options;
    options.max_experts_per_worker = static_cast<int>(rng() % 4);  // 0: current count + extra
    options.extra_per_worker = static_cast<int>(rng() % 3);
    options.hot_factor = (rng() % 4) * 0.5;
    options.max_replicas = 1 + static_cast<int>(rng() % 4);
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    ASSERT_OK_AND_ASSIGN(const PlacementPlan plan, PlanReplicas(current, load, options));

    ASSERT_EQ(plan.workers.size(), current.size());
    int added = 0;
    for (int layer = 0; layer < num_layers; ++layer) {
      for (int w = 0; w < num_workers; ++w) {
        EXPECT_EQ(plan.workers[w].address, current[w].address);
        const int before = current[w].experts.count_in_layer(layer),
                  after = plan.workers[w].experts.count_in_layer(layer);
        const int limit =
            options.max_experts_per_worker > 0 ? options.max_experts_per_worker : before + options.extra_per_worker;
        EXPECT_LE(after, std::max(before, limit));
      }
      for (int e = 0; e < num_experts; ++e) {
        int replicas_before = 0, replicas_after = 0;
        for (int w = 0; w < num_workers; ++w) {
          const bool had = current[w].experts.Contains(layer, e), has = plan.workers[w].experts.Contains(layer, e);
          EXPECT_TRUE(has || !had) << "layer " << layer << " expert " << e << " removed from worker " << w;
          replicas_before += had ? 1 : 0;
          replicas_after += has ? 1 : 0;
        }
        added += replicas_after - replicas_before;
        if (replicas_before == 0 || load[layer][e] == 0) {
          EXPECT_EQ(replicas_after, replicas_before) << "layer " << layer << " expert " << e;
        }
        EXPECT_LE(replicas_after, std::max(replicas_before, options.max_replicas));
      }
      EXPECT_NEAR(plan.imbalance_before[layer], ImbalanceOf(current, layer, load[layer]), 1e-12);
      EXPECT_NEAR(plan.imbalance_after[layer], ImbalanceOf(plan.workers, layer, load[layer]), 1e-12);
      EXPECT_LE(plan.imbalance_after[layer], plan.imbalance_before[layer] + 1e-9);
    }
    EXPECT_EQ(static_cast<int>(plan.changes.size()), added);
    total_changes += added;
  }
  EXPECT_GT(total_changes, 50);  // the trials do exercise the planner
}

}  // namespace
}  // namespace moe
