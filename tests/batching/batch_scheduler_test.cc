// BatchScheduler's timing behaviour (queue delay, deadlines, cancellation,
// drain, stop) on a fake clock. Nothing here sleeps or lets real time pass:
// time moves only by FakeClock::Advance. Real time appears only as a safety
// net on waits for a batch thread to reach a state, so that a broken
// scheduler fails the test instead of hanging it.
#include "server/batching/batch_scheduler.h"

#include <atomic>
#include <deque>
#include <fstream>
#include <functional>
#include <thread>

#include "absl/synchronization/notification.h"
#include "engine/api/model_builder.h"
#include "tests/batching/fake_clock.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::FakeClock;
using ::moe::testing::StatusIs;
using ::testing::DoubleEq;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr int kHidden = 16;
// How long a test waits in real time for a batch thread to do what it must
// before declaring it stuck. Never the way a test lets time pass.
constexpr absl::Duration kSafetyNet = absl::Seconds(30);

const MoeModel& Model() {
  static const MoeModel* const model = [] {
    ModelSpec spec;
    spec.name = "tiny";
    spec.hidden_size = kHidden;
    spec.intermediate_size = 16;
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    auto created = MoeModel::Create(GenerateRandomModel(spec, 1, 7), {});
    EXPECT_OK(created);
    return created->release();
  }();
  return *model;
}

// Records what the scheduler reports. Thread-safe.
class RecordingObserver : public SchedulerObserver {
 public:
  void OnBatch(int, int num_requests, int, double, const std::vector<double>& queue_seconds) override {
    absl::MutexLock lock(&mu_);
    batch_sizes_.push_back(num_requests);
    for (double s : queue_seconds) queue_seconds_.push_back(s);
  }
  void OnDropped(int, absl::StatusCode code) override {
    absl::MutexLock lock(&mu_);
    dropped_.push_back(code);
  }
  std::vector<int> batch_sizes() const {
    absl::MutexLock lock(&mu_);
    return batch_sizes_;
  }
  std::vector<double> queue_seconds() const {
    absl::MutexLock lock(&mu_);
    return queue_seconds_;
  }
  std::vector<absl::StatusCode> dropped() const {
    absl::MutexLock lock(&mu_);
    return dropped_;
  }

 private:
  mutable absl::Mutex mu_;
  std::vector<int> batch_sizes_ ABSL_GUARDED_BY(mu_);
  std::vector<double> queue_seconds_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::StatusCode> dropped_ ABSL_GUARDED_BY(mu_);
};

// How one request ended.
struct Outcome {
  absl::Notification answered;
  absl::Status status;
  // Runs on the batch thread inside `done`, before `answered` is notified.
  std::function<void()> on_done;

  bool Await() { return answered.WaitForNotificationWithTimeout(kSafetyNet); }
};

class BatchSchedulerTest : public ::testing::Test {
 protected:
  void Start(BatchQueue::Options queue, int num_threads = 1) {
    auto scheduler = BatchScheduler::Create({.num_threads = num_threads, .observer = &observer_, .clock = &clock_});
    ASSERT_OK(scheduler);
    scheduler_ = std::move(*scheduler);
    auto index = scheduler_->AddModel(&Model(), queue);
    ASSERT_OK(index);
    model_index_ = *index;
  }

  // A request of `tokens` rows whose end is recorded in a new Outcome;
  // `on_done` runs on the batch thread as it is answered.
  std::unique_ptr<PendingRequest> Request(int tokens, Outcome** outcome, std::function<void()> on_done = {}) {
    outcomes_.emplace_back();
    Outcome* out = &outcomes_.back();
    out->on_done = std::move(on_done);
    *outcome = out;
    auto request = std::make_unique<PendingRequest>();
    request->data = input_.data();
    request->dtype = DType::kF32;
    request->num_tokens = tokens;
    request->done = [out](const absl::Status& status, const ResultView*) {
      out->status = status;
      if (out->on_done) out->on_done();
      out->answered.Notify();
    };
    return request;
  }

  // Submits a request of `tokens` rows and returns its Outcome.
  Outcome* Submit(int tokens, absl::Time deadline = absl::InfiniteFuture(), std::function<void()> on_done = {}) {
    Outcome* outcome;
    auto request = Request(tokens, &outcome, std::move(on_done));
    request->deadline = deadline;
    EXPECT_OK(scheduler_->Submit(model_index_, std::move(request)));
    return outcome;
  }

  // Waits (real time only as a safety net) until `predicate` holds.
  static bool EventuallyTrue(const std::function<bool()>& predicate) {
    const absl::Time give_up = absl::Now() + kSafetyNet;
    while (!predicate()) {
      if (absl::Now() > give_up) return false;
      std::this_thread::yield();
    }
    return true;
  }

  const absl::Time t0_ = FakeClock::DefaultStart();
  FakeClock clock_{t0_};
  RecordingObserver observer_;
  std::vector<float> input_ = std::vector<float>(64 * kHidden, 0.5f);
  std::deque<Outcome> outcomes_;  // stable addresses; outlive the scheduler
  std::unique_ptr<BatchScheduler> scheduler_;
  int model_index_ = -1;
};

TEST_F(BatchSchedulerTest, ClosesPartialBatchWhenQueueDelayElapses) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Milliseconds(10)});
  Outcome* first = Submit(4);
  Outcome* second = Submit(4);
  // The batch thread has seen both and sleeps until the delay elapses.
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Milliseconds(10)));
  clock_.Advance(absl::Milliseconds(10) - absl::Microseconds(1));
  EXPECT_FALSE(first->answered.HasBeenNotified());
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 0);
  EXPECT_EQ(scheduler_->QueueDepth(model_index_), 2u);

  clock_.Advance(absl::Microseconds(1));
  ASSERT_TRUE(first->Await());
  ASSERT_TRUE(second->Await());
  EXPECT_OK(first->status);
  EXPECT_OK(second->status);
  EXPECT_THAT(observer_.batch_sizes(), ElementsAre(2)) << "one batch with both requests";
  EXPECT_THAT(observer_.queue_seconds(), ElementsAre(DoubleEq(0.010), DoubleEq(0.010)))
      << "each waited exactly the delay";
}

TEST_F(BatchSchedulerTest, FullBatchRunsWithoutWaitingForTheDelay) {
  Start({.max_batch_tokens = 8, .max_queue_delay = absl::Hours(1)});
  Outcome* first = Submit(4);
  Outcome* second = Submit(4);  // 8 tokens: the batch is full
  ASSERT_TRUE(first->Await());
  ASSERT_TRUE(second->Await());
  EXPECT_OK(first->status);
  EXPECT_OK(second->status);
  EXPECT_EQ(clock_.Now(), t0_) << "no time passed";
  EXPECT_THAT(observer_.batch_sizes(), ElementsAre(2));
}

TEST_F(BatchSchedulerTest, WithNoQueueDelayALoneRequestRunsAtOnce) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::ZeroDuration()});
  Outcome* lone = Submit(3);
  ASSERT_TRUE(lone->Await());
  EXPECT_OK(lone->status);
  EXPECT_THAT(observer_.queue_seconds(), ElementsAre(0.0));
}

TEST_F(BatchSchedulerTest, RequestPastItsDeadlineGetsDeadlineExceededWithoutRunning) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)});
  Outcome* expiring = Submit(2, t0_ + absl::Milliseconds(5));
  Outcome* patient = Submit(2);
  // The batch thread sleeps until the earliest deadline, not the delay.
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Milliseconds(5)));
  EXPECT_FALSE(expiring->answered.HasBeenNotified());

  clock_.Advance(absl::Milliseconds(5));
  ASSERT_TRUE(expiring->Await());
  EXPECT_THAT(expiring->status, StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("timed out in the queue")));
  EXPECT_THAT(observer_.dropped(), ElementsAre(absl::StatusCode::kDeadlineExceeded));
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 0);
  EXPECT_EQ(scheduler_->QueueDepth(model_index_), 1u) << "the request without a deadline still waits";
  EXPECT_FALSE(patient->answered.HasBeenNotified());
}

TEST_F(BatchSchedulerTest, CancelledRequestIsDroppedPromptly) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)});
  std::atomic<bool> cancelled{false};
  Outcome* outcome;
  auto request = Request(2, &outcome);
  request->is_cancelled = [&cancelled] { return cancelled.load(); };
  ASSERT_OK(scheduler_->Submit(model_index_, std::move(request)));
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Hours(1)));

  cancelled.store(true);
  scheduler_->NotifyCancelled();
  // Answered without the clock moving: the notification woke the batch
  // thread, not a timer.
  ASSERT_TRUE(outcome->Await());
  EXPECT_THAT(outcome->status, StatusIs(absl::StatusCode::kCancelled, HasSubstr("cancelled")));
  EXPECT_EQ(clock_.Now(), t0_);
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 0);
  EXPECT_EQ(scheduler_->QueueDepth(model_index_), 0u);
  EXPECT_THAT(observer_.dropped(), ElementsAre(absl::StatusCode::kCancelled));
}

TEST_F(BatchSchedulerTest, DrainFinishesQueuedWorkThenStops) {
  // Batches would wait an hour to fill; draining runs them at once.
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)});
  std::vector<Outcome*> queued = {Submit(1), Submit(2), Submit(3)};
  EXPECT_TRUE(scheduler_->Drain(t0_ + absl::Seconds(1)));
  for (Outcome* outcome : queued) {
    ASSERT_TRUE(outcome->answered.HasBeenNotified()) << "answered before Drain returns";
    EXPECT_OK(outcome->status);
  }
  EXPECT_THAT(observer_.batch_sizes(), ElementsAre(3));
  EXPECT_EQ(clock_.Now(), t0_);

  Outcome* late;
  auto request = Request(1, &late);
  EXPECT_THAT(scheduler_->Submit(model_index_, std::move(request)),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("shutting down")));
  EXPECT_FALSE(late->answered.HasBeenNotified()) << "a refused request is the caller's to answer";
}

TEST_F(BatchSchedulerTest, DrainDeadlineFailsWhatIsLeftWithUnavailable) {
  // One token per batch: each request is a full batch of its own.
  Start({.max_batch_tokens = 1, .max_queue_delay = absl::Hours(1)});
  absl::Notification running, release;
  // The first batch holds the only batch thread until the test releases it.
  Outcome* busy = Submit(1, absl::InfiniteFuture(), [&] {
    running.Notify();
    release.WaitForNotificationWithTimeout(kSafetyNet);
  });
  ASSERT_TRUE(running.WaitForNotificationWithTimeout(kSafetyNet));
  Outcome* left = Submit(1);

  bool drained = true;
  std::thread drainer([&] { drained = scheduler_->Drain(t0_ + absl::Seconds(5)); });
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Seconds(5)));
  clock_.Advance(absl::Seconds(5));
  // At the deadline the queued request leaves the queue without starting...
  ASSERT_TRUE(EventuallyTrue([&] { return scheduler_->QueueDepth(model_index_) == 0; }));
  // ...and the running batch finishes, answered normally, before Drain returns.
  EXPECT_FALSE(left->answered.HasBeenNotified()) << "answered once the running batch is done";
  release.Notify();
  drainer.join();
  EXPECT_FALSE(drained);
  ASSERT_TRUE(busy->answered.HasBeenNotified());
  EXPECT_OK(busy->status);
  ASSERT_TRUE(left->answered.HasBeenNotified());
  EXPECT_THAT(left->status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("grace period ended")));
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 1);
  EXPECT_THAT(observer_.dropped(), ElementsAre(absl::StatusCode::kUnavailable));
}

TEST_F(BatchSchedulerTest, DrainWithADeadlineAlreadyPastStartsNothing) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)});
  std::vector<Outcome*> queued = {Submit(1), Submit(1)};
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Hours(1)));
  EXPECT_FALSE(scheduler_->Drain(t0_));
  for (Outcome* outcome : queued) {
    ASSERT_TRUE(outcome->answered.HasBeenNotified());
    EXPECT_THAT(outcome->status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("grace period ended")));
  }
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 0);
}

TEST_F(BatchSchedulerTest, DestroyingTheSchedulerFailsQueuedWorkWithUnavailable) {
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)});
  Outcome* queued = Submit(1);
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Hours(1)));
  scheduler_.reset();
  ASSERT_TRUE(queued->answered.HasBeenNotified());
  EXPECT_THAT(queued->status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("shutting down")));
}

TEST_F(BatchSchedulerTest, EveryBatchThreadSleepsUntilTheDelayWithoutPolling) {
  // Two threads, nothing ready for an hour: both wait for exactly that time
  // (a poll would show up as a nearer deadline), and nothing runs early.
  Start({.max_batch_tokens = 64, .max_queue_delay = absl::Hours(1)}, /*num_threads=*/2);
  Outcome* outcome = Submit(1);
  ASSERT_TRUE(clock_.BlockUntilWaiting(t0_ + absl::Hours(1), /*count=*/2));
  EXPECT_THAT(clock_.WaiterDeadlines(), ElementsAre(t0_ + absl::Hours(1), t0_ + absl::Hours(1)));
  clock_.Advance(absl::Hours(1));
  ASSERT_TRUE(outcome->Await());
  EXPECT_OK(outcome->status);
  EXPECT_EQ(scheduler_->BatchesExecuted(model_index_), 1);
}

TEST(BatchSchedulerCreate, RejectsBadThreadCountsAndAMissingClock) {
  EXPECT_THAT(BatchScheduler::Create({.num_threads = 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("batch threads")));
  EXPECT_THAT(BatchScheduler::Create({.clock = nullptr}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("clock")));
}

// Lanes are planned when a model is added, for its max_batch_tokens: a size
// whose memory cannot be had fails the model's addition with a Status, and
// the scheduler goes on serving.
TEST(BatchSchedulerAddModel, LanesWhoseMemoryCannotBeHadAreResourceExhausted) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' allocators abort on allocations larger than any machine";
#endif
  std::string overcommit;
  std::ifstream("/proc/sys/vm/overcommit_memory") >> overcommit;
  if (overcommit == "1") GTEST_SKIP() << "vm.overcommit_memory = 1: every allocation succeeds here";
  ASSERT_OK_AND_ASSIGN(auto scheduler, BatchScheduler::Create({.num_threads = 2}));
  BatchQueue::Options queue;
  // [2^31 - 1 tokens x 2 slots, 16] floats for the expert rows alone: 256 GiB.
  queue.max_batch_tokens = (int64_t{1} << 31) - 1;
  EXPECT_THAT(scheduler->AddModel(&Model(), queue),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("planning a workspace for batches of")));
  queue.max_batch_tokens = int64_t{1} << 31;
  EXPECT_THAT(scheduler->AddModel(&Model(), queue),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("at most 2^31 - 1")));
  queue.max_batch_tokens = 64;
  ASSERT_OK_AND_ASSIGN(const int index, scheduler->AddModel(&Model(), queue));
  EXPECT_EQ(index, 0);
}

TEST(FakeClock, AdvanceWakesOnlyWaitersWhoseDeadlineIsReached) {
  FakeClock clock;
  const absl::Time start = clock.Now();
  absl::Mutex mu;
  std::atomic<int> woken{0};
  auto wait_until = [&](absl::Duration d) {
    absl::MutexLock lock(&mu);
    auto never = [] { return false; };
    EXPECT_FALSE(clock.AwaitWithDeadline(&mu, absl::Condition(&never), start + d));
    EXPECT_GE(clock.Now(), start + d);
    woken.fetch_add(1);
  };
  std::thread near([&] { wait_until(absl::Seconds(1)); });
  std::thread far([&] { wait_until(absl::Seconds(2)); });
  ASSERT_TRUE(clock.BlockUntilWaiting(start + absl::Seconds(1)));
  ASSERT_TRUE(clock.BlockUntilWaiting(start + absl::Seconds(2)));
  clock.Advance(absl::Seconds(1));
  near.join();
  EXPECT_EQ(woken.load(), 1);
  EXPECT_THAT(clock.WaiterDeadlines(), ElementsAre(start + absl::Seconds(2)));
  clock.Advance(absl::Seconds(1));
  far.join();
  EXPECT_EQ(woken.load(), 2);
  EXPECT_THAT(clock.WaiterDeadlines(), IsEmpty());
}

}  // namespace
}  // namespace moe
