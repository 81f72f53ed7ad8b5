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

// A worker as a placement has it, under the id it keeps for the life of the
// RemoteExperts (an address keeps its id from one placement to the next).
struct PlacedWorker {
  int id = 0;
  std::string address;
  ExpertSet experts;
};

// One request to a worker, as it ended.
struct WorkerCall {
  int worker = 0;  // its id
  int layer = 0;
  std::span<const int> experts;  // the experts whose rows it carried
  absl::Status status;
  double seconds = 0;
  size_t bytes_sent = 0, bytes_received = 0;
};

// Counts what the workers did, for metrics. Must be thread-safe. Workers
// are named by id.
class WorkerObserver {
 public:
  virtual ~WorkerObserver() = default;
  // The placement in force from now on: at creation, and at each change,
  // before a batch uses it.
  virtual void OnPlacement(std::span<const PlacedWorker> workers) = 0;
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

  // INVALID_ARGUMENT for no workers, an empty or repeated address, or a set
  // whose shape differs from the model's. Connects lazily.
  static absl::StatusOr<std::unique_ptr<RemoteExperts>> Create(const Options& options);
  ~RemoteExperts() override;

  std::unique_ptr<Batch> NewBatch() const override;
  bool Hosts(int layer, int expert) const override;
  absl::Status Start(const Job& job, Batch& batch) const override;
  absl::Status Finish(Batch& batch, std::vector<int>* unserved) const override;

  // Replaces the placement while serving: batches started before go on
  // with the old one, later ones use the new one; returns once no batch
  // uses the old one (or after `drain_timeout`). Links to addresses already
  // known are kept. The workers must already hold what they are given
  // (moe-worker's SetExperts). FAILED_PRECONDITION, naming the expert, when
  // an expert hosted now would no longer be (the executor sends it here);
  // INVALID_ARGUMENT as Create.
  absl::Status SetPlacement(std::vector<Worker> workers, absl::Duration drain_timeout = absl::Seconds(10))
      ABSL_LOCKS_EXCLUDED(placement_mu_);

  // The placement in force.
  std::vector<PlacedWorker> placement() const ABSL_LOCKS_EXCLUDED(placement_mu_);
  // The union of what the workers hold.
  ExpertSet hosted() const ABSL_LOCKS_EXCLUDED(placement_mu_);
  // The link of the worker with id `worker` (ids of the first placement are
  // 0, 1, ... in its order).
  const WorkerLink& link(int worker) const ABSL_LOCKS_EXCLUDED(placement_mu_);

 private:
  struct Endpoint;
  struct Placement;
  struct Call;
  struct RemoteBatch;
  explicit RemoteExperts(const Options& options);

  // Checks `workers` against the model's shape; INVALID_ARGUMENT naming the problem.
  absl::Status Validate(const std::vector<Worker>& workers) const;
  // A placement of `workers`, endpoints made for new addresses.
  std::shared_ptr<const Placement> MakePlacement(std::vector<Worker> workers)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(placement_mu_);
  std::shared_ptr<const Placement> CurrentPlacement() const ABSL_LOCKS_EXCLUDED(placement_mu_);
  // The least-loaded worker of `placement` (a slot in it) that is up and
  // holds (layer, expert), skipping the slots in `excluded`; -1 when none.
  static int ChooseWorker(const Placement& placement, int layer, int expert, const std::vector<int>& excluded);
  // Sends `experts` of job's layer to slot `worker` as `call`.
  absl::Status SendCall(const RemoteBatch& batch, int worker, std::vector<int> experts, Call& call) const;
  // Awaits `call` and writes its rows back; on failure, the rows go to
  // other replicas until one answers. Experts none could run go to
  // `unserved`, and the first such failure is returned.
  absl::Status CompleteCall(const RemoteBatch& batch, Call call, std::vector<int>* unserved) const;
  // Sends the experts of a failed call to their other replicas and
  // completes them; UNAVAILABLE naming an expert none is left for.
  absl::Status Reroute(const RemoteBatch& batch, Call failed, const absl::Status& why,
                       std::vector<int>* unserved) const;

  void ProbeLoop() ABSL_LOCKS_EXCLUDED(stop_mu_);
  // Tells the observer when an endpoint's link has gone down or come back
  // since it was last told.
  void NoteLinkState(Endpoint& endpoint) const;

  const Options options_;
  mutable absl::Mutex placement_mu_;
  // Every worker ever placed, by id; append-only.
  std::vector<std::unique_ptr<Endpoint>> endpoints_ ABSL_GUARDED_BY(placement_mu_);
  std::shared_ptr<const Placement> placement_ ABSL_GUARDED_BY(placement_mu_);
  absl::Mutex stop_mu_;
  bool stopping_ ABSL_GUARDED_BY(stop_mu_) = false;
  std::thread prober_;  // last: stops first
};

}  // namespace moe

#endif  // MOE_REMOTE_REMOTE_EXPERTS_H_
