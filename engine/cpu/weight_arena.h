// WeightArena: memory for packed weights, in large regions advised for
// transparent huge pages.
//
// Why: the experts' weights stream from memory on every batch. Through 4 KB
// pages, the panel kernels read a DeepSeek-like layer's experts at 0.86-0.89
// of the machine's read rate (0.63-0.75 when memory is fast); through 2 MB
// pages, at 0.93-0.98 (0.90): each 4 KB page costs a TLB walk and stops the
// hardware prefetchers at its boundary (docs/BENCHMARKS.md). Linux gives huge
// pages to a mapping advised for them (MADV_HUGEPAGE, which its "madvise"
// mode of THP requires), and only in whole aligned 2 MB pages, so matrices lie
// one after another in regions of kRegionBytes (a larger matrix gets a
// region of its own) rather than each being rounded up to 2 MB. Without THP,
// the regions are ordinary memory.
//
// Thread-safe. A region is unmapped when the last allocation in it is
// released; what is resident beyond the allocations is at most the rest of
// the last huge page each region touched.
//
// Memory that cannot be mapped is a RESOURCE_EXHAUSTED Status naming the
// bytes asked for (TryAllocate), so that a model too large for the machine
// fails its load instead of the process. With the kernel's overcommit, a
// mapping can succeed and the pages fail later, when touched: that the
// arena cannot see.
#ifndef MOE_ENGINE_CPU_WEIGHT_ARENA_H_
#define MOE_ENGINE_CPU_WEIGHT_ARENA_H_

#include <cstddef>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace moe {

class WeightArena {
 public:
  static constexpr size_t kRegionBytes = size_t{64} << 20;

  // The process-wide arena.
  static WeightArena& Shared();

  // `bytes` of zeroed memory, 64-byte aligned; the result keeps its region
  // mapped. RESOURCE_EXHAUSTED, naming `bytes` and the OS's reason, when the
  // memory cannot be mapped. What model loading calls.
  absl::StatusOr<std::shared_ptr<void>> TryAllocate(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Region;
  absl::Mutex mu_;
  // The region being filled; it lives while allocations in it do.
  std::weak_ptr<Region> current_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_ENGINE_CPU_WEIGHT_ARENA_H_
