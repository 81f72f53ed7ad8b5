// Clock: the seam through which the batch scheduler reads the time and waits
// for it (queue delays, request deadlines, the drain deadline), so that tests
// drive time by hand with a fake clock (tests/server/fake_clock.h) instead of
// sleeping.
//
// Implementations are thread-safe. Clock::Real() is a process-wide instance
// that is never destroyed. A component given a Clock borrows it: the clock
// must outlive the component.
#ifndef MOE_SERVER_BATCHING_CLOCK_H_
#define MOE_SERVER_BATCHING_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace moe {

class Clock {
 public:
  virtual ~Clock() = default;

  // The current time on this clock.
  virtual absl::Time Now() const = 0;

  // With `mu` held: releases `mu` until `condition` is true or this clock
  // reaches `deadline` (never, for absl::InfiniteFuture()), reacquires it and
  // returns whether `condition` is true, like absl::Mutex::AwaitWithDeadline.
  // `condition` is re-evaluated whenever `mu` is released, so whoever makes
  // it true must do so holding `mu`.
  virtual bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& condition, absl::Time deadline)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) = 0;

  // The wall clock: absl::Now() and absl::Mutex::AwaitWithDeadline.
  static Clock* Real();
};

namespace clock_internal {

class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::Now(); }
  bool AwaitWithDeadline(absl::Mutex* mu, const absl::Condition& condition, absl::Time deadline) override
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return mu->AwaitWithDeadline(condition, deadline);
  }
};

}  // namespace clock_internal

inline Clock* Clock::Real() {
  // Never destroyed, so that it outlives every static that borrows it.
  static Clock* const clock = new clock_internal::RealClock();
  return clock;
}

}  // namespace moe

#endif  // MOE_SERVER_BATCHING_CLOCK_H_
