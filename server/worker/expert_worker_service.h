// ExpertWorkerService: serves the routed experts an executor holds over
// proto/expert_worker.proto, for front ends that routed the tokens and send
// each worker only its experts' rows. A stream's requests run in order, on
// a workspace of the stream's own; streams run side by side. A request that
// cannot run is answered with its code and message on the same stream, which
// stays open. Once Drain is called, streams finish the request at hand and
// end.
//
// Thread-safe. The executor is borrowed and must outlive the service.
#ifndef MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_
#define MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_

#include <atomic>
#include <string>
#include <vector>

#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"
#include "proto/expert_worker.grpc.pb.h"

namespace moe {

class ExpertWorkerService final : public worker::ExpertWorker::Service {
 public:
  ExpertWorkerService(const LayerExecutor* executor, const ModelSpec& spec, int num_layers);

  grpc::Status RunExperts(grpc::ServerContext* context,
                          grpc::ServerReaderWriter<worker::ExpertRowsResponse, worker::ExpertRowsRequest>* stream)
      override;
  grpc::Status Describe(grpc::ServerContext* context, const worker::DescribeRequest* request,
                        worker::DescribeResponse* response) override;

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

  const LayerExecutor* executor_;
  const ModelSpec spec_;
  const int num_layers_;
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> requests_served_{0};
};

}  // namespace moe

#endif  // MOE_SERVER_WORKER_EXPERT_WORKER_SERVICE_H_
