// ExpertWorkerService: serves the routed experts an executor holds over
// proto/expert_worker.proto, for front ends that routed the tokens and send
// each worker only its experts' rows. A stream's requests run in order, on
// a workspace of the stream's own; streams run side by side. A request that
// cannot run is answered with its code and message on the same stream, which
// stays open. Once Drain is called, streams finish the request at hand and
// end. SetExperts swaps in an executor holding another set (made by the
// Reloader): each request runs on the executor current when it starts, and
// an old one goes when its last request does.
//
// Thread-safe.
#ifndef MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_
#define MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_

#include <atomic>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"
#include "proto/expert_worker.grpc.pb.h"

namespace moe {

// One request a worker answered.
struct WorkerRequestReport {
  int layer = 0;
  std::span<const int> experts;            // with rows, ascending
  std::span<const int64_t> expert_rows;    // rows of each
  std::span<const double> expert_seconds;  // compute seconds of each (empty when it failed)
  absl::StatusCode code = absl::StatusCode::kOk;
};

// What a worker did, for metrics. Must be thread-safe.
class ExpertWorkerObserver {
 public:
  virtual ~ExpertWorkerObserver() = default;
  virtual void OnRequest(const WorkerRequestReport& report) = 0;
  // The experts it holds from now on (at start and after each SetExperts).
  virtual void OnHeld(const ExpertSet& held) = 0;
};

class ExpertWorkerService final : public worker::ExpertWorker::Service {
 public:
  // Builds an executor holding `held`.
  using Reloader = std::function<absl::StatusOr<std::shared_ptr<const LayerExecutor>>(const ExpertSet& held)>;

  // `observer` (not owned, may be null) hears of every request.
  ExpertWorkerService(std::shared_ptr<const LayerExecutor> executor, const ModelSpec& spec, int num_layers,
                      Reloader reload, ExpertWorkerObserver* observer = nullptr);

  grpc::Status RunExperts(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<worker::ExpertRowsResponse, worker::ExpertRowsRequest>* stream) override;
  grpc::Status Describe(grpc::ServerContext* context, const worker::DescribeRequest* request,
                        worker::DescribeResponse* response) override;
  grpc::Status SetExperts(grpc::ServerContext* context, const worker::SetExpertsRequest* request,
                          worker::DescribeResponse* response) override ABSL_LOCKS_EXCLUDED(reload_mu_);

  // Answers one request as a stream does, on a workspace of its own (what
  // the stream loop calls per request; fuzzing and tests call it alone).
  // The status is also in the response's code and message.
  absl::Status Answer(const worker::ExpertRowsRequest& request, worker::ExpertRowsResponse* response) const;

  // The executor new requests run on.
  std::shared_ptr<const LayerExecutor> executor() const ABSL_LOCKS_EXCLUDED(mu_);

  // Streams end after the request at hand; new streams end at once.
  void Drain() { draining_.store(true); }
  // Requests answered so far (OK or not), over every stream.
  int64_t requests_served() const { return requests_served_.load(); }

 private:
  // Per stream: the executor's workspace and the rows as fp32.
  struct StreamState;
  absl::Status Run(const worker::ExpertRowsRequest& request, StreamState& state,
                   worker::ExpertRowsResponse* response) const;
  absl::Status Validate(const worker::ExpertRowsRequest& request) const;
  // Run, with a failure written into the response.
  absl::Status AnswerOn(const worker::ExpertRowsRequest& request, StreamState& state,
                        worker::ExpertRowsResponse* response) const;

  void DescribeInto(const LayerExecutor& executor, worker::DescribeResponse* response) const;

  const ModelSpec spec_;
  const int num_layers_;
  const Reloader reload_;
  ExpertWorkerObserver* const observer_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const LayerExecutor> executor_ ABSL_GUARDED_BY(mu_);
  absl::Mutex reload_mu_ ABSL_ACQUIRED_BEFORE(mu_);  // one SetExperts at a time
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> requests_served_{0};
};

}  // namespace moe

#endif  // MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_
