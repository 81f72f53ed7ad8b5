#include "engine/cpu/thread_team.h"

#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace moe {
namespace {

// The first line of `path`, or "" when it cannot be read.
std::string FirstLine(const char* path) {
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);
  return line;
}

// The CPU limit of this process's cgroup (a Kubernetes CPU limit, docker
// --cpus), 0 when none: cgroup v2's cpu.max, else v1's CFS quota files.
int CgroupCpuLimit() {
  const std::string v2 = FirstLine("/sys/fs/cgroup/cpu.max");
  if (!v2.empty()) return CpusFromCgroupCpuMax(v2);
  for (const char* dir : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
    const std::string quota = FirstLine((std::string(dir) + "/cpu.cfs_quota_us").c_str());
    const std::string period = FirstLine((std::string(dir) + "/cpu.cfs_period_us").c_str());
    // A quota of -1 (no limit) reads as 0, like cgroup v2's "max".
    if (!quota.empty() && !period.empty()) return CpusFromCgroupCpuMax(quota + " " + period);
  }
  return 0;
}

// OMP_NUM_THREADS when set (operators already use it to bound a process),
// else the CPUs this process may run on, at most its cgroup's CPU limit: a
// pod limited to 4 CPUs on a 64-CPU node would otherwise start 64 threads
// that the kernel throttles.
int DefaultSize() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  int cpus = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = std::max(1, CPU_COUNT(&set));
  const int limit = CgroupCpuLimit();
  return limit > 0 ? std::min(cpus, limit) : cpus;
}

}  // namespace

int CpusFromCgroupCpuMax(absl::string_view line) {
  int64_t quota = 0, period = 0;
  const std::vector<absl::string_view> fields = absl::StrSplit(line, ' ', absl::SkipEmpty());
  if (fields.size() != 2 || !absl::SimpleAtoi(fields[0], &quota) || !absl::SimpleAtoi(fields[1], &period) ||
      quota <= 0 || period <= 0) {
    return 0;  // "max": unlimited; anything else: unknown
  }
  return static_cast<int>(std::min<int64_t>((quota + period - 1) / period, 1 << 16));
}

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

void ThreadTeam::Run(int members, absl::FunctionRef<void(int, int)> fn) { RunJob(members, fn, /*skip_late=*/false); }

void ThreadTeam::RunSkippingLate(int members, absl::FunctionRef<void(int, int)> fn) {
  RunJob(members, fn, /*skip_late=*/true);
}

void ThreadTeam::RunJob(int members, absl::FunctionRef<void(int, int)>& fn, bool skip_late) {
  members = std::min(members, size_);
  if (members <= 1 || !run_mu_.TryLock()) {
    fn(0, 1);
    return;
  }
  job_ = &fn;
  job_members_.store(members);
  pending_.store(members - 1);
  gate_.store((generation_.load() + 1) << kGateShift | kGateOpen);
  generation_.fetch_add(1);  // publishes the job (sequentially consistent)
  if (sleepers_.load() > 0) {
    // Blocked workers re-check their condition when the mutex is released.
    absl::MutexLock lock(&mu_);
  }
  fn(0, members);
  int skipped = 0;
  if (skip_late) {
    // Close the job: the workers that joined are waited for, the others skip.
    const uint64_t gate = gate_.fetch_and(~kGateOpen);
    skipped = members - 1 - static_cast<int>(gate & (kGateOpen - 1));
  }
  while (pending_.load(std::memory_order_acquire) > skipped) CpuRelax();
  run_mu_.Unlock();
}

bool ThreadTeam::Join(uint64_t generation) {
  uint64_t gate = gate_.load();
  while ((gate >> kGateShift) == (generation & (~uint64_t{0} >> kGateShift)) && (gate & kGateOpen)) {
    if (gate_.compare_exchange_weak(gate, gate + 1)) return true;
  }
  return false;
}

void ThreadTeam::WorkerLoop(int member) {
  uint64_t seen = 0;
  while (true) {
    // Spin for new work, then block.
    const auto spin_until = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(spin_);
    for (int polls = 0; generation_.load() == seen; ++polls) {
      CpuRelax();
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
    if (member < members && Join(seen)) {
      (*job_)(member, members);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }
}

}  // namespace moe
