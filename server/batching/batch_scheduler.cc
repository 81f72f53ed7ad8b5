#include "server/batching/batch_scheduler.h"

#include <chrono>
#include <limits>
#include <new>

#include "absl/strings/str_cat.h"

namespace moe {

absl::StatusOr<std::unique_ptr<BatchScheduler>> BatchScheduler::Create(const Options& options) {
  if (options.num_threads < 1 || options.num_threads > 256) {
    return absl::InvalidArgumentError(absl::StrCat("batch threads must be in [1, 256], got ", options.num_threads));
  }
  if (options.clock == nullptr) return absl::InvalidArgumentError("the scheduler needs a clock");
  auto scheduler = std::unique_ptr<BatchScheduler>(new BatchScheduler(options));
  for (int i = 0; i < options.num_threads; ++i) {
    scheduler->threads_.emplace_back([s = scheduler.get(), i] { s->WorkerLoop(i); });
  }
  return scheduler;
}

BatchScheduler::~BatchScheduler() {
  std::vector<std::unique_ptr<PendingRequest>> left;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    ++wake_events_;
    for (ModelSlot& slot : models_) {
      while (!slot.queue->empty()) {
        auto batch = slot.queue->TakeBatch(absl::InfiniteFuture(), /*flush=*/true);
        for (auto& request : batch) left.push_back(std::move(request));
      }
    }
  }
  for (auto& thread : threads_) thread.join();
  for (auto& request : left) request->done(absl::UnavailableError("server shutting down"), nullptr);
}

absl::StatusOr<std::unique_ptr<BatchScheduler::Lane>> BatchScheduler::PlanLane(const MoeModel& model,
                                                                               int64_t max_batch_tokens) {
  auto lane = std::make_unique<Lane>();
  auto workspace = model.NewWorkspace(static_cast<int>(max_batch_tokens));
  if (!workspace.ok()) return workspace.status();
  lane->workspace = std::move(*workspace);
  const size_t input_size = static_cast<size_t>(max_batch_tokens) * model.spec().hidden_size;
  lane->input.reset(new (std::nothrow) float[input_size]);
  if (!lane->input) {
    return absl::ResourceExhaustedError(
        absl::StrCat("out of memory for the input of batches of ", max_batch_tokens, " tokens"));
  }
  return lane;
}

absl::StatusOr<int> BatchScheduler::AddModel(const MoeModel* model, const BatchQueue::Options& options) {
  auto queue = BatchQueue::Create(options);
  if (!queue.ok()) return queue.status();
  if (options.max_batch_tokens > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_batch_tokens must be at most 2^31 - 1, got ", options.max_batch_tokens));
  }
  ModelSlot slot{.model = model, .queue = std::move(*queue), .lanes = {}};
  for (int i = 0; i < options_.num_threads; ++i) {
    auto lane = PlanLane(*model, options.max_batch_tokens);
    if (!lane.ok()) return lane.status();
    slot.lanes.push_back(std::move(*lane));
  }
  absl::MutexLock lock(&mu_);
  models_.push_back(std::move(slot));
  return static_cast<int>(models_.size()) - 1;
}

absl::Status BatchScheduler::Submit(int model_index, std::unique_ptr<PendingRequest> request) {
  absl::MutexLock lock(&mu_);
  if (draining_ || stopping_) return absl::UnavailableError("server is shutting down");
  if (model_index < 0 || static_cast<size_t>(model_index) >= models_.size()) {
    return absl::InternalError("unknown model index");
  }
  request->enqueue_time = options_.clock->Now();
  absl::Status added = models_[model_index].queue->Add(request);
  if (added.ok()) ++wake_events_;
  return added;
}

void BatchScheduler::NotifyCancelled() {
  absl::MutexLock lock(&mu_);
  ++wake_events_;
}

size_t BatchScheduler::QueueDepth(int model_index) const {
  absl::MutexLock lock(&mu_);
  return models_[model_index].queue->size();
}

int64_t BatchScheduler::BatchesExecuted(int model_index) const {
  absl::MutexLock lock(&mu_);
  return models_[model_index].batches;
}

bool BatchScheduler::Drain(absl::Time deadline) {
  std::vector<std::pair<int, std::unique_ptr<PendingRequest>>> left;  // (model index, request)
  bool drained;
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
    ++wake_events_;  // batches no longer wait to fill
    auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      if (running_batches_ > 0) return false;
      for (const ModelSlot& slot : models_) {
        if (!slot.queue->empty()) return false;
      }
      return true;
    };
    // A deadline already past is not waited for at all (a zero grace period):
    // no worker gets the lock in between to start a batch.
    drained = deadline <= options_.clock->Now()
                  ? idle()
                  : options_.clock->AwaitWithDeadline(&mu_, absl::Condition(&idle), deadline);
    if (!drained) {
      // The grace period is over: nothing more starts. Emptied under the lock,
      // so no worker takes another batch; Submit already refuses.
      for (size_t m = 0; m < models_.size(); ++m) {
        while (!models_[m].queue->empty()) {
          for (auto& request : models_[m].queue->TakeBatch(absl::InfiniteFuture(), /*flush=*/true)) {
            left.emplace_back(static_cast<int>(m), std::move(request));
          }
        }
      }
      // Running batches cannot be interrupted; their requests are answered
      // when they finish.
      auto none_running = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_batches_ == 0; };
      mu_.Await(absl::Condition(&none_running));
    }
  }
  const absl::Status unavailable =
      absl::UnavailableError("server shutting down: the grace period ended before the request ran");
  for (auto& [model_index, request] : left) {
    // Reported before answering, as batches are (see Execute).
    if (options_.observer) options_.observer->OnDropped(model_index, unavailable.code());
    request->done(unavailable, nullptr);
  }
  return drained;
}

void BatchScheduler::FailExpired(absl::Time now) {
  for (size_t m = 0; m < models_.size(); ++m) {
    for (auto& request : models_[m].queue->TakeExpired(now)) {
      const bool cancelled = request->deadline > now;
      const absl::Status status = cancelled
                                      ? absl::CancelledError("request cancelled by the client")
                                      : absl::DeadlineExceededError("request timed out in the queue before it ran");
      // Reported before answering, as batches are (see Execute). Answering
      // does no engine work and only touches the request.
      if (options_.observer) options_.observer->OnDropped(static_cast<int>(m), status.code());
      request->done(status, nullptr);
    }
  }
}

void BatchScheduler::WorkerLoop(int worker) {
  absl::MutexLock lock(&mu_);
  while (!stopping_) {
    const absl::Time now = options_.clock->Now();
    FailExpired(now);
    int chosen = -1;
    std::vector<std::unique_ptr<PendingRequest>> batch;
    for (size_t i = 0; i < models_.size() && chosen < 0; ++i) {
      const size_t m = (next_model_ + i) % models_.size();
      batch = models_[m].queue->TakeBatch(now, draining_);
      if (!batch.empty()) chosen = static_cast<int>(m);
    }
    if (chosen < 0) {
      // Nothing is ready: sleep until something can be. Time makes a batch
      // ready (its delay) or a request expire (its deadline); everything else
      // (an arrival, a cancellation, a drain, stopping) counts a wake event.
      // Nothing is polled.
      absl::Time wake = absl::InfiniteFuture();
      for (const ModelSlot& slot : models_) wake = std::min(wake, slot.queue->NextWakeTime());
      const uint64_t seen = wake_events_;
      auto changed = [this, seen]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || wake_events_ != seen; };
      options_.clock->AwaitWithDeadline(&mu_, absl::Condition(&changed), wake);
      continue;
    }
    next_model_ = static_cast<size_t>(chosen) + 1;
    ++running_batches_;
    ++models_[chosen].batches;
    const MoeModel& model = *models_[chosen].model;
    Lane& lane = *models_[chosen].lanes[worker];
    mu_.Unlock();
    Execute(chosen, model, lane, batch);
    mu_.Lock();
    --running_batches_;
  }
}

void BatchScheduler::Execute(int model_index, const MoeModel& model, Lane& lane,
                             std::vector<std::unique_ptr<PendingRequest>>& batch) {
  const int d = model.spec().hidden_size;
  int total = 0;
  bool routing = false;
  for (const auto& request : batch) {
    total += request->num_tokens;
    routing = routing || request->return_routing;
  }
  // Assemble the batch, decoding each request's bytes straight into place.
  int offset = 0;
  for (const auto& request : batch) {
    ConvertToFloat(request->dtype, request->data, static_cast<size_t>(request->num_tokens) * d,
                   lane.input.get() + static_cast<size_t>(offset) * d);
    offset += request->num_tokens;
  }
  const absl::Time start = options_.clock->Now();
  MoeModel::RunResult& result = lane.result;
  const absl::Status status =
      model.Run(lane.input.get(), total, {.layer = batch.front()->layer, .return_routing = routing},
                lane.workspace.get(), &result);
  const double compute_seconds = absl::ToDoubleSeconds(options_.clock->Now() - start);
  // Report before answering, so that a client that has its answer also sees
  // its batch counted.
  std::vector<double>& queue_seconds = lane.queue_seconds;
  queue_seconds.clear();
  for (const auto& request : batch) queue_seconds.push_back(absl::ToDoubleSeconds(start - request->enqueue_time));
  if (options_.observer) {
    options_.observer->OnBatch(model_index, static_cast<int>(batch.size()), total, compute_seconds, queue_seconds);
  }
  // UNAVAILABLE: experts on a worker no replica of which is up. The batch's
  // requests that do not need them must not fail with it: each runs alone.
  if (absl::IsUnavailable(status) && batch.size() > 1) {
    AnswerEachAlone(model, lane, batch);
    return;
  }
  offset = 0;
  for (const auto& request : batch) {
    ResultView view{&result, offset, request->num_tokens, model.routing_slots()};
    request->done(status, status.ok() ? &view : nullptr);
    offset += request->num_tokens;
  }
}

void BatchScheduler::AnswerEachAlone(const MoeModel& model, Lane& lane,
                                     std::vector<std::unique_ptr<PendingRequest>>& batch) {
  const size_t d = static_cast<size_t>(model.spec().hidden_size);
  size_t offset = 0;
  for (const auto& request : batch) {
    const absl::Status status = model.Run(lane.input.get() + offset * d, request->num_tokens,
                                          {.layer = request->layer, .return_routing = request->return_routing},
                                          lane.workspace.get(), &lane.result);
    ResultView view{&lane.result, 0, request->num_tokens, model.routing_slots()};
    request->done(status, status.ok() ? &view : nullptr);
    offset += static_cast<size_t>(request->num_tokens);
  }
}

}  // namespace moe
