// ThreadTeam: a fixed set of worker threads that run one function together
// with the calling thread, for the engine's parallel loops.
//
// Why not OpenMP here: after a parallel region, libgomp's idle workers spin
// for milliseconds by default, which on a server takes a core away from the
// RPC threads between batches (measured: 16% fewer tokens/s at concurrency
// 64). A team worker spins only `spin` (long enough to stay awake between
// the layers of one batch), then blocks.
//
// Thread-safe. One Run at a time uses the workers; a Run that finds them busy
// (another batch thread) runs alone on its caller rather than oversubscribe
// the cores. Workers stop in the destructor.
#ifndef MOE_ENGINE_CPU_THREAD_TEAM_H_
#define MOE_ENGINE_CPU_THREAD_TEAM_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace moe {

// Tells the CPU that the calling thread is spinning on a flag (x86's pause;
// a compiler barrier elsewhere), so that a busy-wait yields the core's
// shared resources.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  asm volatile("" ::: "memory");
#endif
}

class ThreadTeam {
 public:
  struct Options {
    // Threads including the caller; 0: OMP_NUM_THREADS when set, else one
    // per CPU the process may use, at most its cgroup's CPU limit.
    int size = 0;
    // How long an idle worker spins before it blocks. 50 us.
    absl::Duration spin = absl::Microseconds(50);
  };

  explicit ThreadTeam(const Options& options);
  ~ThreadTeam();

  // The process-wide team, sized to the CPUs.
  static ThreadTeam& Shared();

  // Threads including the caller.
  int size() const { return size_; }

  // Calls fn(member, members) on `members` threads (at most size(); the caller
  // is member 0) and returns when every call has returned. `members` is 1 when
  // asked for 1 or when another Run holds the workers.
  void Run(int members, absl::FunctionRef<void(int member, int members)> fn) ABSL_LOCKS_EXCLUDED(run_mu_, mu_);

  // Like Run, for a job whose members claim its work as they go, so that
  // whichever of them take part complete it: a worker that has not started
  // by the time the caller's own call returns skips the job instead of being
  // waited for (a blocked worker takes tens of microseconds to wake; it
  // still wakes, for the next Run). Each member that runs, runs once.
  void RunSkippingLate(int members, absl::FunctionRef<void(int member, int members)> fn)
      ABSL_LOCKS_EXCLUDED(run_mu_, mu_);

 private:
  void RunJob(int members, absl::FunctionRef<void(int, int)>& fn, bool skip_late) ABSL_LOCKS_EXCLUDED(run_mu_, mu_);
  // Whether a worker that saw `generation` may run its job: true unless the
  // job has closed to late members or a later job has replaced it.
  bool Join(uint64_t generation);
  void WorkerLoop(int member) ABSL_LOCKS_EXCLUDED(mu_);

  const int size_;
  const absl::Duration spin_;
  absl::Mutex run_mu_;  // held by the Run that uses the workers
  absl::Mutex mu_;      // blocked workers wait on it
  // The current job: bumped generation, its function and member count.
  std::atomic<uint64_t> generation_{0};
  absl::FunctionRef<void(int, int)>* job_ = nullptr;  // valid while pending_ > 0
  std::atomic<int> job_members_{0};
  std::atomic<int> pending_{0};
  // The current job's generation << kGateShift | kGateOpen while members may
  // join | the number of workers that joined.
  static constexpr int kGateShift = 16;
  static constexpr uint64_t kGateOpen = uint64_t{1} << (kGateShift - 1);
  std::atomic<uint64_t> gate_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;  // last: stop first
};

// Member `member`'s share [first, end) of n items split evenly over
// `members`: the shares differ by at most one item and cover [0, n) in
// member order.
struct Share {
  int64_t first = 0, end = 0;
};
inline Share ShareOf(int64_t n, int member, int members) {
  return {.first = n * member / members, .end = n * (member + 1) / members};
}

// The CPUs a cgroup v2 cpu.max line ("<quota> <period>", or "max <period>"
// for no limit) allows, rounded up; 0 when unlimited or unreadable.
int CpusFromCgroupCpuMax(absl::string_view line);

}  // namespace moe

#endif  // MOE_ENGINE_CPU_THREAD_TEAM_H_
