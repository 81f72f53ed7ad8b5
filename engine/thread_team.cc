#include "engine/thread_team.h"

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>

namespace moe {
namespace {

// OMP_NUM_THREADS when set (operators already use it to bound a process),
// else the CPUs this process may run on.
int DefaultSize() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

ThreadTeam::ThreadTeam(const Options& options)
    : size_(options.size > 0 ? options.size : DefaultSize()), spin_(options.spin) {
  for (int member = 1; member < size_; ++member) workers_.emplace_back([this, member] { WorkerLoop(member); });
}

ThreadTeam::~ThreadTeam() {
  {
    absl::MutexLock lock(&mu_);
    stopping_.store(true);
    generation_.fetch_add(1);
  }
  for (auto& worker : workers_) worker.join();
}

ThreadTeam& ThreadTeam::Shared() {
  static ThreadTeam* team = new ThreadTeam(Options{});  // never destroyed: used until exit
  return *team;
}

void ThreadTeam::Run(int members, absl::FunctionRef<void(int, int)> fn) {
  members = std::min(members, size_);
  if (members <= 1 || !run_mu_.TryLock()) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  job_members_.store(members);
  pending_.store(members - 1);
  generation_.fetch_add(1);  // publishes the job (sequentially consistent)
  if (sleepers_.load() > 0) {
    // Blocked workers re-check their condition when the mutex is released.
    absl::MutexLock lock(&mu_);
  }
  fn(0, members);
  while (pending_.load(std::memory_order_acquire) > 0) _mm_pause();
  run_mu_.Unlock();
}

void ThreadTeam::WorkerLoop(int member) {
  uint64_t seen = 0;
  while (true) {
    // Spin for new work, then block.
    const auto spin_until = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(spin_);
    for (int polls = 0; generation_.load() == seen; ++polls) {
      _mm_pause();
      if (polls % 64 == 63 && std::chrono::steady_clock::now() > spin_until) {
        absl::MutexLock lock(&mu_);
        sleepers_.fetch_add(1);
        auto changed = [this, seen] { return generation_.load() != seen; };
        mu_.Await(absl::Condition(&changed));
        sleepers_.fetch_sub(1);
      }
    }
    if (stopping_.load()) return;
    seen = generation_.load();
    const int members = job_members_.load();
    if (member < members) {
      (*job_)(member, members);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }
}

}  // namespace moe
