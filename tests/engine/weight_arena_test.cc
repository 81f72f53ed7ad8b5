// WeightArena: zeroed, aligned, writable memory; small allocations packed one
// after another in one region (not each rounded up to a huge page); a
// matrix larger than a region gets its own; regions advised for huge pages;
// memory that cannot be mapped is a Status, not an exception.
#include "engine/cpu/weight_arena.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

bool AllZero(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < bytes; ++i) {
    if (c[i] != 0) return false;
  }
  return true;
}

TEST(WeightArena, AllocationsAreZeroedAlignedAndDisjoint) {
  WeightArena& arena = WeightArena::Shared();
  const std::vector<size_t> sizes = {1, 100, 4096, 128 * 1000, 3 << 20};
  std::vector<std::shared_ptr<void>> held;
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(auto memory, arena.TryAllocate(sizes[i]));
    held.push_back(std::move(memory));
    void* p = held.back().get();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << sizes[i];
    EXPECT_TRUE(AllZero(p, sizes[i])) << sizes[i];
    std::memset(p, static_cast<int>(i + 1), sizes[i]);
  }
  // No allocation wrote into another.
  for (size_t i = 0; i < sizes.size(); ++i) {
    const auto* c = static_cast<const unsigned char*>(held[i].get());
    for (size_t j = 0; j < sizes[i]; ++j) {
      ASSERT_EQ(c[j], i + 1) << "allocation " << i << " byte " << j;
    }
  }
}

TEST(WeightArena, SmallMatricesArePackedOneAfterAnother) {
  WeightArena& arena = WeightArena::Shared();
  ASSERT_OK_AND_ASSIGN(const auto first, arena.TryAllocate(1 << 20));  // 1 MB, as a DeepSeek-like down projection
  ASSERT_OK_AND_ASSIGN(const auto second, arena.TryAllocate(1000));    // rounded to 64 bytes
  ASSERT_OK_AND_ASSIGN(const auto third, arena.TryAllocate(64));
  const char* a = static_cast<const char*>(first.get());
  const char* b = static_cast<const char*>(second.get());
  const char* c = static_cast<const char*>(third.get());
  EXPECT_EQ(b - a, 1 << 20);
  EXPECT_EQ(c - b, 1024);
}

TEST(WeightArena, LargerThanARegionGetsItsOwnAndSmallOnesGoOnFillingTheCurrent) {
  WeightArena& arena = WeightArena::Shared();
  ASSERT_OK_AND_ASSIGN(const auto before, arena.TryAllocate(64));
  const size_t large_bytes = WeightArena::kRegionBytes + 4096;
  ASSERT_OK_AND_ASSIGN(const auto large, arena.TryAllocate(large_bytes));
  ASSERT_OK_AND_ASSIGN(const auto after, arena.TryAllocate(64));
  const char* b = static_cast<const char*>(before.get());
  const char* a = static_cast<const char*>(after.get());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(large.get()) % (2 << 20), 0u) << "a region starts on a huge page";
  EXPECT_TRUE(AllZero(large.get(), large_bytes));
  EXPECT_EQ(a - b, 64) << "the large allocation did not take over the current region";
}

// The region's mapping carries the huge-page advice (VmFlags "hg" in
// /proc/self/smaps), where the kernel has transparent huge pages at all.
TEST(WeightArena, RegionsAreAdvisedForHugePages) {
  if (!std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled")) {
    GTEST_SKIP() << "this kernel has no transparent huge pages";
  }
  ASSERT_OK_AND_ASSIGN(const auto held, WeightArena::Shared().TryAllocate(4096));
  const uintptr_t address = reinterpret_cast<uintptr_t>(held.get());
  std::ifstream smaps("/proc/self/smaps");
  ASSERT_TRUE(smaps) << "no /proc/self/smaps";
  std::string line;
  bool inside = false, found = false;
  while (std::getline(smaps, line)) {
    uintptr_t start = 0, end = 0;
    char dash = 0;
    std::istringstream head(line);
    if (head >> std::hex >> start >> dash >> end && dash == '-') {
      inside = start <= address && address < end;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0) {
      found = true;
      EXPECT_NE(line.find(" hg"), std::string::npos) << line;
    }
  }
  EXPECT_TRUE(found) << "the allocation's mapping is not in /proc/self/smaps";
}

// More than any address space holds: a Status naming the bytes, not
// std::bad_alloc, and the arena goes on packing small allocations into the
// region it was filling.
TEST(WeightArena, MemoryThatCannotBeMappedIsResourceExhaustedNamingTheBytes) {
  WeightArena& arena = WeightArena::Shared();
  ASSERT_OK_AND_ASSIGN(const auto before, arena.TryAllocate(64));
  EXPECT_THAT(arena.TryAllocate(size_t{1} << 60),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("1152921504606846976 bytes")));
  const size_t most = std::numeric_limits<size_t>::max();
  EXPECT_THAT(arena.TryAllocate(most),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr(std::to_string(most) + " bytes")));
  ASSERT_OK_AND_ASSIGN(const auto after, arena.TryAllocate(64));
  EXPECT_EQ(static_cast<const char*>(after.get()) - static_cast<const char*>(before.get()), 64);
}

}  // namespace
}  // namespace moe
