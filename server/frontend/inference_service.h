// The Open Inference Protocol service (callback API). Handlers validate,
// decode, enqueue and return; a batch thread finishes each call. While the
// server drains, readiness is false and new inference requests get
// UNAVAILABLE; the service counts the answers still owed to requests that
// came before, so that shutdown can wait for them to reach the wire.
// Thread-safe; the registry and scheduler must outlive it.
#ifndef MOE_SERVER_FRONTEND_INFERENCE_SERVICE_H_
#define MOE_SERVER_FRONTEND_INFERENCE_SERVICE_H_

#include <atomic>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/inference.grpc.pb.h"
#include "server/batching/batch_scheduler.h"
#include "server/models/model_registry.h"

namespace moe {

// What the service reports as the server's name and version.
inline constexpr char kServerName[] = "moe-serve";
inline constexpr char kServerVersion[] = "0.1.0";

// Counts requests by outcome; must be thread-safe. Optional.
class RequestObserver {
 public:
  virtual ~RequestObserver() = default;
  // Models are known by ServedModel::index (`model_index`).
  // A ModelInfer request for `model_index` was accepted for validation.
  virtual void OnRequestStart(int /*model_index*/) {}
  // A ModelInfer request of `model_index` (-1 if the model is unknown) ended
  // with `code` after `seconds` from arrival to answer.
  virtual void OnRequestDone(int model_index, grpc::StatusCode code, double seconds) = 0;
};

class InferenceService final : public inference::GRPCInferenceService::CallbackService {
 public:
  // `scheduler_index[i]` is the index under which the model of
  // ServedModel::index i was added to `scheduler`. The observer is told the
  // ServedModel::index. `draining` is shared with the server; `observer`
  // may be null.
  InferenceService(const ModelRegistry* registry, BatchScheduler* scheduler, std::vector<int> scheduler_index,
                   const std::atomic<bool>* draining, RequestObserver* observer)
      : registry_(*registry),
        scheduler_(*scheduler),
        scheduler_index_(std::move(scheduler_index)),
        draining_(*draining),
        observer_(observer) {}

  grpc::ServerUnaryReactor* ServerLive(grpc::CallbackServerContext* context,
                                       const inference::ServerLiveRequest* request,
                                       inference::ServerLiveResponse* response) override;
  grpc::ServerUnaryReactor* ServerReady(grpc::CallbackServerContext* context,
                                        const inference::ServerReadyRequest* request,
                                        inference::ServerReadyResponse* response) override;
  grpc::ServerUnaryReactor* ModelReady(grpc::CallbackServerContext* context,
                                       const inference::ModelReadyRequest* request,
                                       inference::ModelReadyResponse* response) override;
  grpc::ServerUnaryReactor* ServerMetadata(grpc::CallbackServerContext* context,
                                           const inference::ServerMetadataRequest* request,
                                           inference::ServerMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelMetadata(grpc::CallbackServerContext* context,
                                          const inference::ModelMetadataRequest* request,
                                          inference::ModelMetadataResponse* response) override;
  grpc::ServerUnaryReactor* ModelConfig(grpc::CallbackServerContext* context,
                                        const inference::ModelConfigRequest* request,
                                        inference::ModelConfigResponse* response) override;
  grpc::ServerUnaryReactor* ModelInfer(grpc::CallbackServerContext* context,
                                       const inference::ModelInferRequest* request,
                                       inference::ModelInferResponse* response) override;
  grpc::ServerBidiReactor<inference::ModelInferRequest, inference::ModelStreamInferResponse>* ModelStreamInfer(
      grpc::CallbackServerContext* context) override;

  // Validates and enqueues `request`; `finish` is called exactly once with
  // the outcome, after `response` is filled on success. Both must stay alive
  // until then. Used by the unary and the streaming RPC.
  void StartInfer(grpc::CallbackServerContext* context, const inference::ModelInferRequest* request,
                  inference::ModelInferResponse* response, std::function<void(const grpc::Status&)> finish);

  // Waits until every inference request that arrived before the drain began
  // has had its answer written (or its call ended), or until `deadline`.
  // Returns whether none is left. Requests arriving while draining are
  // refused at once and not waited for, so a busy client cannot hold it.
  bool AwaitAnswersSent(absl::Time deadline) ABSL_LOCKS_EXCLUDED(mu_);

  // For the RPC reactors: an inference request arrived; returns whether it
  // owes an answer to AwaitAnswersSent (it arrived before the drain), in
  // which case AnswerSent must follow once its answer is written or its call
  // has ended.
  bool OweAnswer() ABSL_LOCKS_EXCLUDED(mu_);
  void AnswerSent(int count = 1) ABSL_LOCKS_EXCLUDED(mu_);

  // For the RPC reactors: a call was cancelled; its queued requests are
  // dropped with CANCELLED now rather than when a batch thread next wakes.
  void NotifyCancelled() { scheduler_.NotifyCancelled(); }

 private:
  const ModelRegistry& registry_;
  BatchScheduler& scheduler_;
  const std::vector<int> scheduler_index_;  // by ServedModel::index
  const std::atomic<bool>& draining_;
  RequestObserver* observer_;
  absl::Mutex mu_;
  int64_t answers_owed_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_INFERENCE_SERVICE_H_
