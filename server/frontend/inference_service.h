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
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "proto/inference.grpc.pb.h"
#include "server/batching/batch_scheduler.h"
#include "server/frontend/token_auth.h"
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
  // What one client may ask of the inference RPCs. Past a limit the request
  // gets a status naming it; nothing else is disturbed.
  struct Limits {
    // Tokens one request may carry, beside the model's max_batch_size;
    // above, INVALID_ARGUMENT. 0: only max_batch_size.
    int64_t max_request_tokens = 0;
    // Largest response message; a larger answer is RESOURCE_EXHAUSTED
    // instead. 0: no limit.
    size_t max_response_bytes = 0;
    // Inference requests in flight at once from one client connection
    // (unary calls and the requests of its streams together); one more is
    // RESOURCE_EXHAUSTED. 0: no limit.
    int max_inflight_per_connection = 0;
  };

  // `scheduler_index[i]` is the index under which the model of
  // ServedModel::index i was added to `scheduler`. The observer is told the
  // ServedModel::index. `draining` is shared with the server; `observer`
  // may be null. With an `authenticator` (borrowed; null: none), every RPC
  // of the service first checks the call's bearer token.
  InferenceService(const ModelRegistry* registry, BatchScheduler* scheduler, std::vector<int> scheduler_index,
                   const std::atomic<bool>* draining, RequestObserver* observer, const Limits& limits,
                   TokenAuthenticator* authenticator = nullptr)
      : registry_(*registry),
        scheduler_(*scheduler),
        scheduler_index_(std::move(scheduler_index)),
        draining_(*draining),
        observer_(observer),
        limits_(limits),
        authenticator_(authenticator) {}

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
  // A request from connection `peer` (grpc::ServerContext::peer, one per
  // TCP connection) starts; false when the connection is at its limit. Each
  // true is followed by one EndRequest.
  bool StartRequest(const std::string& peer) ABSL_LOCKS_EXCLUDED(inflight_mu_);
  void EndRequest(const std::string& peer) ABSL_LOCKS_EXCLUDED(inflight_mu_);

  // Null when the call may go on; else a reactor that answered it with the
  // authenticator's refusal.
  grpc::ServerUnaryReactor* Refuse(grpc::CallbackServerContext* context);

  RequestObserver* observer_;
  const Limits limits_;
  TokenAuthenticator* const authenticator_;
  absl::Mutex mu_;
  int64_t answers_owed_ ABSL_GUARDED_BY(mu_) = 0;
  // Requests in flight per connection, with a limit only; no entry at zero.
  absl::Mutex inflight_mu_;
  absl::flat_hash_map<std::string, int> inflight_ ABSL_GUARDED_BY(inflight_mu_);
};

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_INFERENCE_SERVICE_H_
