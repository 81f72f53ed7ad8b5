// RemoteExperts: the ExpertOffload (engine/api/expert_offload.h) that runs
// routed experts on moe-worker processes. A placement names, per worker, the
// (layer, expert) pairs it holds; an expert on several workers has replicas.
// For each layer, every worker gets only its experts' rows, all workers in
// parallel (with the front end's own experts, which the executor runs
// meanwhile); each expert's rows go to its least-loaded replica that is up
// (fewest requests in flight, then the fastest recent answers).
//
// Failure: a worker that errs, breaks its stream or misses the call
// deadline is marked down (WorkerLink) and the rows it had are sent to
// another replica; with none left, Finish fails UNAVAILABLE naming the layer
// and the expert, so the batch's requests fail rather than get a wrong
// answer. A thread of its own probes down workers once their backoff has
// elapsed (WorkerLink::Probe); one that answers rejoins.
//
// Thread-safe; each caller passes its own Batch.
#ifndef MOE_REMOTE_REMOTE_EXPERTS_H_
#define MOE_REMOTE_REMOTE_EXPERTS_H_

#include <atomic>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/api/dtype.h"
#include "engine/api/expert_offload.h"
#include "engine/api/expert_set.h"
#include "remote/worker_link.h"

namespace moe {

// One request to a worker, as it ended.
struct WorkerCall {
  int worker = 0;  // an index into the placement
  int layer = 0;
  std::span<const int> experts;  // the experts whose rows it carried
  absl::Status status;
  double seconds = 0;
  size_t bytes_sent = 0, bytes_received = 0;
};

// Counts what the workers did, for metrics. Must be thread-safe.
class WorkerObserver {
 public:
  virtual ~WorkerObserver() = default;
  virtual void OnCall(const WorkerCall& call) = 0;
  // The rows of a call that failed on `from_worker` went to `to_worker`.
  virtual void OnRetry(int from_worker, int to_worker) = 0;
  // `worker` went down or came back (every worker starts up).
  virtual void OnWorkerUp(int worker, bool up) = 0;
};

class RemoteExperts : public ExpertOffload {
 public:
  struct Worker {
    // host:port of its moe-worker.
    std::string address;
    // What it holds.
    ExpertSet experts;
  };
  struct Options {
    std::vector<Worker> workers;
    // The model's shape, which every worker's set must match.
    int num_layers = 0;
    int num_experts = 0;
    // Rows go as bf16 when the model computes in bf16 (kBF16), else fp32.
    DType compute = DType::kBF16;
    // Per call; a worker that takes longer is marked down. 5 s.
    absl::Duration call_deadline = absl::Seconds(5);
    // Reconnection backoff (WorkerLink). 100 ms to 5 s.
    absl::Duration min_backoff = absl::Milliseconds(100);
    absl::Duration max_backoff = absl::Seconds(5);
    // Not owned; may be null.
    WorkerObserver* observer = nullptr;
  };

  // INVALID_ARGUMENT for no workers, an empty address, or a set whose shape
  // differs from the model's. Connects lazily.
  static absl::StatusOr<std::unique_ptr<RemoteExperts>> Create(const Options& options);
  ~RemoteExperts() override;

  std::unique_ptr<Batch> NewBatch() const override;
  bool Hosts(int layer, int expert) const override;
  absl::Status Start(const Job& job, Batch& batch) const override;
  absl::Status Finish(Batch& batch) const override;

  // The union of what the workers hold.
  const ExpertSet& hosted() const { return hosted_; }
  int num_workers() const { return static_cast<int>(links_.size()); }
  const WorkerLink& link(int worker) const { return *links_[worker]; }

 private:
  struct Call;
  struct RemoteBatch;
  explicit RemoteExperts(const Options& options) : options_(options) {}
  // The least-loaded worker that is up and holds (layer, expert), skipping
  // `excluded` (-1: none); -1 when there is none.
  int ChooseWorker(int layer, int expert, const std::vector<int>& excluded) const;
  // Sends `experts` of job's layer to `worker` as `call`.
  absl::Status SendCall(const Job& job, int worker, std::vector<int> experts, Call& call) const;
  // Awaits `call` and writes its rows back; on failure, the rows go to
  // other replicas until one answers.
  absl::Status CompleteCall(const Job& job, Call call) const;
  // Sends the experts of a failed call to their other replicas and
  // completes them; UNAVAILABLE naming an expert none is left for.
  absl::Status Reroute(const Job& job, Call failed, const absl::Status& why) const;

  void ProbeLoop() ABSL_LOCKS_EXCLUDED(stop_mu_);
  // Tells the observer when `worker`'s link has gone down or come back
  // since it was last told.
  void NoteLinkState(int worker) const;

  const Options options_;
  ExpertSet hosted_;
  std::vector<std::unique_ptr<WorkerLink>> links_;
  std::unique_ptr<std::atomic<bool>[]> reported_up_;  // [workers]: what the observer was last told
  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread prober_;  // last: stops first
};

}  // namespace moe

#endif  // MOE_REMOTE_REMOTE_EXPERTS_H_
