// BatchScheduler: executes the batches of every model's BatchQueue on one
// pool of batch threads, visiting the models with ready batches in turn so
// that the cores are shared fairly. Each thread has a lane per model: the
// model's Workspace and the batch's input and result, planned when the model
// is added for its max_batch_tokens, so that a batch allocates nothing.
//
// Time comes from Options::clock: every time read (queue delays, request
// deadlines, the drain deadline, the timings reported to the observer) and
// every timed wait goes through it, so that tests drive it with a fake clock.
// A batch that fails UNAVAILABLE (experts whose workers are all down) is run
// again request by request, so that only the requests needing those experts
// fail. A batch thread with nothing ready sleeps until the next time something
// becomes ready (a queue delay or a deadline), a request arrives, a request is
// reported cancelled (NotifyCancelled), or draining or stopping begins; it
// does not poll.
//
// Thread-safe. Models and the clock are borrowed and must outlive the
// scheduler. Threads stop in the destructor after failing what is still
// queued with UNAVAILABLE.
#ifndef MOE_SERVER_BATCHING_BATCH_SCHEDULER_H_
#define MOE_SERVER_BATCHING_BATCH_SCHEDULER_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/moe_model.h"
#include "server/batching/batch_queue.h"
#include "server/batching/clock.h"

namespace moe {

// Receives what the scheduler did, for metrics, before the requests concerned
// are answered. Must be thread-safe.
class SchedulerObserver {
 public:
  virtual ~SchedulerObserver() = default;
  // A batch of `num_requests` requests and `num_tokens` tokens ran in
  // `compute_seconds`; each request waited `queue_seconds[i]`.
  virtual void OnBatch(int /*model_index*/, int /*num_requests*/, int /*num_tokens*/, double /*compute_seconds*/,
                       const std::vector<double>& /*queue_seconds*/) {}
  // A request ended without running: DEADLINE_EXCEEDED, CANCELLED or UNAVAILABLE.
  virtual void OnDropped(int /*model_index*/, absl::StatusCode /*code*/) {}
};

class BatchScheduler {
 public:
  struct Options {
    // Batch threads. The engine already uses every core inside a batch, so
    // one thread is the default; more overlap batches of different models.
    int num_threads = 1;
    // Not owned; may be null.
    SchedulerObserver* observer = nullptr;
    // Where time is read and waited for. Borrowed: must outlive the
    // scheduler; must not be null. Default: the real clock.
    Clock* clock = Clock::Real();
  };

  // Validates `options` (num_threads in [1, 256], a clock) and starts the
  // batch threads.
  static absl::StatusOr<std::unique_ptr<BatchScheduler>> Create(const Options& options);
  ~BatchScheduler();

  // Adds a model with its queue options and plans its lanes; returns its
  // index for Submit. RESOURCE_EXHAUSTED when the lanes' memory cannot be had.
  absl::StatusOr<int> AddModel(const MoeModel* model, const BatchQueue::Options& options) ABSL_LOCKS_EXCLUDED(mu_);

  // Queues `request` for model `model_index`. On error the request is not
  // queued and `done` is not called: the caller answers it. The request's
  // enqueue time is the clock's Now(); it is answered DEADLINE_EXCEEDED if
  // the clock reaches its `deadline` before it runs.
  absl::Status Submit(int model_index, std::unique_ptr<PendingRequest> request) ABSL_LOCKS_EXCLUDED(mu_);

  // Tells the scheduler that a queued request's `is_cancelled` now returns
  // true (call it from the front end's cancellation callback, e.g. gRPC's
  // OnCancel): a batch thread wakes at once, answers every cancelled request
  // CANCELLED and drops it. Cancellation is not polled: without this call a
  // cancelled request is still never computed (it is checked before every
  // batch), but it is answered only when a batch thread next wakes for
  // another reason. Cheap; callable from any thread, any number of times.
  void NotifyCancelled() ABSL_LOCKS_EXCLUDED(mu_);

  // Stops accepting requests (Submit returns UNAVAILABLE), runs everything
  // queued without waiting for batches to fill, and returns when nothing is
  // queued or running, or at `deadline`. At `deadline` no new batch starts:
  // requests still queued are answered UNAVAILABLE at once, and batches
  // already running finish (their requests are answered normally) before it
  // returns. Returns whether every request ran. `deadline` is on the
  // scheduler's clock.
  bool Drain(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // Requests queued for `model_index`.
  size_t QueueDepth(int model_index) const ABSL_LOCKS_EXCLUDED(mu_);
  // Batches executed and tokens run so far for `model_index`.
  int64_t BatchesExecuted(int model_index) const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // One batch thread's memory for one model, planned in AddModel.
  struct Lane {
    std::unique_ptr<MoeModel::Workspace> workspace;
    std::unique_ptr<float[]> input;  // [max_batch_tokens, hidden], uninitialised
    MoeModel::RunResult result;
    std::vector<double> queue_seconds;
  };
  struct ModelSlot {
    const MoeModel* model;
    std::unique_ptr<BatchQueue> queue;
    std::vector<std::unique_ptr<Lane>> lanes;  // [num_threads]; set in AddModel, then read-only
    int64_t batches = 0;
  };
  explicit BatchScheduler(const Options& options) : options_(options) {}
  void WorkerLoop(int worker) ABSL_LOCKS_EXCLUDED(mu_);
  void FailExpired(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static absl::StatusOr<std::unique_ptr<Lane>> PlanLane(const MoeModel& model, int64_t max_batch_tokens);
  // Runs and answers each request of `batch` (its input in the lane) alone.
  static void AnswerEachAlone(const MoeModel& model, Lane& lane, std::vector<std::unique_ptr<PendingRequest>>& batch);
  void Execute(int model_index, const MoeModel& model, Lane& lane, std::vector<std::unique_ptr<PendingRequest>>& batch)
      ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::vector<ModelSlot> models_ ABSL_GUARDED_BY(mu_);
  size_t next_model_ ABSL_GUARDED_BY(mu_) = 0;  // round-robin cursor
  int running_batches_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // Counts what may give an idle batch thread work without time passing:
  // arrivals, cancellations, the start of a drain, stopping. An idle thread
  // waits for it to change (or for the clock to reach the next ready time).
  uint64_t wake_events_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::thread> threads_;  // last: stop first
};

}  // namespace moe

#endif  // MOE_SERVER_BATCHING_BATCH_SCHEDULER_H_
