#include "engine/cpu/weight_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>

#include "absl/strings/str_cat.h"

namespace moe {
namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kAlignment = 64;
// Larger requests fail at once: rounding them up to regions would overflow,
// and no address space is that large.
constexpr size_t kMaxAllocationBytes = std::numeric_limits<size_t>::max() / 4;

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

// `bytes` (a multiple of kHugePageBytes) mapped at a kHugePageBytes boundary,
// so that all of it can be huge pages: a larger mapping, trimmed at both ends.
// Null, with errno set, when it cannot be mapped.
char* MapAligned(size_t bytes) {
  const size_t padded = bytes + kHugePageBytes;
  void* raw = mmap(nullptr, padded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = RoundUp(start, kHugePageBytes);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = aligned + bytes;
  if (start + padded > end) munmap(reinterpret_cast<void*>(end), start + padded - end);
  // Best effort: without THP support this fails and the pages stay 4 KB.
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);
  return reinterpret_cast<char*>(aligned);
}

}  // namespace

struct WeightArena::Region {
  // Takes over `bytes` mapped by MapAligned at `base`.
  Region(char* base, size_t bytes) : base(base), size(bytes) {}
  ~Region() { munmap(base, size); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;

  char* const base;
  const size_t size;
  size_t used = 0;
};

WeightArena& WeightArena::Shared() {
  static WeightArena* arena = new WeightArena();  // never destroyed: regions outlive their users
  return *arena;
}

absl::StatusOr<std::shared_ptr<void>> WeightArena::TryAllocate(size_t requested) {
  auto exhausted = [requested](const char* reason) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate ", requested, " bytes of weight memory: ", reason));
  };
  if (requested > kMaxAllocationBytes) return exhausted("larger than any address space");
  const size_t bytes = RoundUp(requested == 0 ? 1 : requested, kAlignment);
  absl::MutexLock lock(&mu_);
  std::shared_ptr<Region> region = current_.lock();
  if (!region || region->size - region->used < bytes) {
    const size_t size = std::max(kRegionBytes, RoundUp(bytes, kHugePageBytes));
    char* base = MapAligned(size);
    if (base == nullptr) return exhausted(std::strerror(errno));
    auto fresh = std::make_shared<Region>(base, size);
    // A matrix larger than a region fills its own; smaller ones go on
    // filling the current region.
    if (size == kRegionBytes || !region) current_ = fresh;
    region = std::move(fresh);
  }
  char* start = region->base + region->used;
  region->used += bytes;
  return std::shared_ptr<void>(region, start);
}

}  // namespace moe
