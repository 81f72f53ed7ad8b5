// ThreadTeam: every member runs once per Run, the caller is member 0, idle
// workers that blocked wake for the next Run, RunSkippingLate completes its
// work with the members that join, and concurrent callers never share the
// workers (one of them runs alone); ShareOf splits work evenly.
#include "engine/cpu/thread_team.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "tests/test_util.h"

namespace moe {
namespace {

TEST(ThreadTeam, RunsEveryMemberOnceWithTheCallerAsMemberZero) {
  ThreadTeam team({.size = 3});
  ASSERT_EQ(team.size(), 3);
  for (int members : {1, 2, 3, 5}) {
    std::vector<std::atomic<int>> calls(3);
    std::atomic<int> seen_members{0};
    std::thread::id member_zero;
    team.Run(members, [&](int member, int count) {
      calls[member].fetch_add(1);
      seen_members.store(count);
      if (member == 0) member_zero = std::this_thread::get_id();
    });
    const int expected = std::min(members, 3);
    EXPECT_EQ(seen_members.load(), expected);
    for (int m = 0; m < 3; ++m) EXPECT_EQ(calls[m].load(), m < expected ? 1 : 0) << "member " << m;
    EXPECT_EQ(member_zero, std::this_thread::get_id());
  }
}

TEST(ThreadTeam, BlockedWorkersWakeForTheNextRun) {
  ThreadTeam team({.size = 2, .spin = absl::ZeroDuration()});
  for (int round = 0; round < 200; ++round) {
    if (round % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // let the worker block
    std::atomic<int> sum{0};
    team.Run(2, [&](int member, int) { sum.fetch_add(member + 1); });
    ASSERT_EQ(sum.load(), 3) << "round " << round;
  }
}

TEST(ThreadTeam, RunSkippingLateCompletesTheWorkWithWhoeverJoins) {
  // Workers block at once, so most jobs start with them asleep; jobs of
  // every length, and plain Runs in between, which must still get every
  // member whatever the late workers of the job before them did.
  ThreadTeam team({.size = 3, .spin = absl::ZeroDuration()});
  int runs_with_workers = 0;
  for (int round = 0; round < 300; ++round) {
    if (round % 30 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    const int items = round % 7 == 0 ? 1 : 40 * (round % 5);
    std::vector<std::atomic<int>> done(items);
    std::vector<std::atomic<int>> calls(3);
    std::atomic<int> next{0};
    team.RunSkippingLate(3, [&](int member, int) {
      calls[member].fetch_add(1);
      for (int i = next.fetch_add(1); i < items; i = next.fetch_add(1)) {
        std::this_thread::sleep_for(std::chrono::microseconds(5));
        done[i].fetch_add(1);
      }
    });
    for (int i = 0; i < items; ++i) ASSERT_EQ(done[i].load(), 1) << "round " << round << " item " << i;
    ASSERT_EQ(calls[0].load(), 1) << "round " << round;
    for (int m = 1; m < 3; ++m) ASSERT_LE(calls[m].load(), 1) << "round " << round << " member " << m;
    runs_with_workers += calls[1].load() + calls[2].load() > 0;

    std::atomic<int> sum{0};
    team.Run(3, [&](int member, int) { sum.fetch_add(member + 1); });
    ASSERT_EQ(sum.load(), 6) << "round " << round;
  }
  EXPECT_GT(runs_with_workers, 0);  // the long jobs were shared
}

TEST(ThreadTeam, ConcurrentCallersEachCompleteTheirWork) {
  ThreadTeam team({.size = 2});
  std::atomic<int64_t> total{0};
  auto caller = [&] {
    for (int i = 0; i < 2000; ++i) {
      std::atomic<int> done{0}, members_seen{0};
      team.Run(2, [&](int, int members) {
        done.fetch_add(1);
        members_seen.store(members);
      });
      // Whether it got the workers or ran alone, each member ran once.
      EXPECT_EQ(done.load(), members_seen.load());
      total.fetch_add(1);
    }
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 4000);
}

TEST(ShareOf, SharesCoverTheItemsInOrderAndDifferByAtMostOne) {
  for (int64_t n : {0, 1, 2, 5, 7, 64, 1000}) {
    for (int members : {1, 2, 3, 8}) {
      int64_t next = 0, smallest = n, largest = 0;
      for (int member = 0; member < members; ++member) {
        const Share share = ShareOf(n, member, members);
        EXPECT_EQ(share.first, next) << n << " items, member " << member << " of " << members;
        // n / members items, or one more.
        EXPECT_THAT(share.end - share.first, ::testing::AnyOf(n / members, n / members + 1))
            << n << " items, member " << member << " of " << members;
        smallest = std::min(smallest, share.end - share.first);
        largest = std::max(largest, share.end - share.first);
        next = share.end;
      }
      EXPECT_EQ(next, n) << n << " items over " << members;
      EXPECT_LE(largest - smallest, 1) << n << " items over " << members;
    }
  }
}

TEST(CpusFromCgroupCpuMax, RoundsTheQuotaUpToWholeCpus) {
  EXPECT_EQ(CpusFromCgroupCpuMax("max 100000"), 0);
  EXPECT_EQ(CpusFromCgroupCpuMax("400000 100000"), 4);
  EXPECT_EQ(CpusFromCgroupCpuMax("150000 100000"), 2);  // 1.5 CPUs
  EXPECT_EQ(CpusFromCgroupCpuMax("50000 100000"), 1);
  EXPECT_EQ(CpusFromCgroupCpuMax("  200000   100000"), 2);
  for (const char* bad : {"", "max", "abc 100000", "100000 0", "-1 100000", "1 2 3"}) {
    EXPECT_EQ(CpusFromCgroupCpuMax(bad), 0) << "'" << bad << "'";
  }
}

}  // namespace
}  // namespace moe
