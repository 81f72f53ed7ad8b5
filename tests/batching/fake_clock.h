// FakeClock: a Clock for tests whose time moves only when the test calls
// Advance. Waiting on it never uses real time: a waiter leaves
// AwaitWithDeadline when its condition becomes true or when Advance moves the
// clock to or past its deadline, however long that takes in real time.
//
// Thread-safe. A mutex passed to AwaitWithDeadline must outlive every Advance
// call made while its waiter may be registered (in practice: advance the
// clock only while the component that waits on it is alive).
#ifndef MOE_TESTS_BATCHING_FAKE_CLOCK_H_
#define MOE_TESTS_BATCHING_FAKE_CLOCK_H_

#include <algorithm>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/batching/clock.h"

namespace moe::testing {

class FakeClock final : public Clock {
 public:
  // The time a FakeClock starts at unless told otherwise.
  static absl::Time DefaultStart() { return absl::FromUnixSeconds(1'000'000'000); }

  explicit FakeClock(absl::Time start = DefaultStart()) : now_(start) {}

  absl::Time Now() const override ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    return now_;
  }

  // Moves the time forward by `d` (>= 0) and wakes every waiter whose
  // deadline is now reached; the others keep waiting.
  void Advance(absl::Duration d) ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<absl::Mutex*> to_wake;
    {
      absl::MutexLock lock(&mu_);
      now_ += std::max(d, absl::ZeroDuration());
      for (const Waiter* waiter : waiters_) {
        if (waiter->deadline <= now_ && std::find(to_wake.begin(), to_wake.end(), waiter->mu) == to_wake.end()) {
          to_wake.push_back(waiter->mu);
        }
      }
    }
    // A waiter's condition is re-evaluated when its mutex is released; taking
    // and releasing it makes the waiter see the new time. Not under mu_: a
    // waiter holds its mutex while it takes mu_.
    for (absl::Mutex* mu : to_wake) {
      mu->Lock();
      mu->Unlock();
    }
  }

  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& condition, absl::Time deadline) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) ABSL_LOCKS_EXCLUDED(mu_) {
    Waiter waiter{mu, deadline};
    {
      absl::MutexLock lock(&mu_);
      waiters_.push_back(&waiter);
    }
    auto done = [this, &condition, deadline] { return condition.Eval() || Now() >= deadline; };
    mu->Await(absl::Condition(&done));
    {
      absl::MutexLock lock(&mu_);
      waiters_.erase(std::find(waiters_.begin(), waiters_.end(), &waiter));
    }
    return condition.Eval();
  }

  // For tests: blocks until at least `count` threads wait on this clock
  // with exactly `deadline` (a component has reached the wait the test
  // expects), or until `real_timeout` of real time has passed: a safety net
  // against a component that never gets there, not a way to let time pass.
  // Returns whether the waiters were seen.
  bool BlockUntilWaiting(absl::Time deadline, int count = 1, absl::Duration real_timeout = absl::Seconds(30)) const
      ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    auto waiting = [this, deadline, count]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return std::count_if(waiters_.begin(), waiters_.end(),
                           [deadline](const Waiter* w) { return w->deadline == deadline; }) >= count;
    };
    return mu_.AwaitWithTimeout(absl::Condition(&waiting), real_timeout);
  }

  // The deadlines of the threads waiting on this clock now, earliest first.
  std::vector<absl::Time> WaiterDeadlines() const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    std::vector<absl::Time> deadlines;
    for (const Waiter* waiter : waiters_) deadlines.push_back(waiter->deadline);
    std::sort(deadlines.begin(), deadlines.end());
    return deadlines;
  }

 private:
  struct Waiter {
    absl::Mutex* mu;
    absl::Time deadline;
  };

  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
  std::vector<const Waiter*> waiters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe::testing

#endif  // MOE_TESTS_BATCHING_FAKE_CLOCK_H_
