#include "server/frontend/inference_service.h"

#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "server/frontend/grpc_status.h"
#include "server/frontend/infer_codec.h"

namespace moe {
namespace {

grpc::ServerUnaryReactor* Finish(grpc::CallbackServerContext* context, const grpc::Status& status) {
  auto* reactor = context->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// A ModelInfer call; tells the service when its answer is sent, if it owes
// one. Deletes itself when gRPC is done with the call.
class InferReactor : public grpc::ServerUnaryReactor {
 public:
  explicit InferReactor(InferenceService* service) : service_(service), owes_answer_(service->OweAnswer()) {}
  // The batch threads learn of it at once, not at their next wake-up.
  void OnCancel() override { service_->NotifyCancelled(); }
  void OnDone() override {
    if (owes_answer_) service_->AnswerSent();
    delete this;
  }

 private:
  InferenceService* const service_;
  const bool owes_answer_;
};

}  // namespace

grpc::ServerUnaryReactor* InferenceService::Refuse(grpc::CallbackServerContext* context) {
  if (authenticator_ == nullptr) return nullptr;
  const absl::Status allowed = authenticator_->Check(context->client_metadata());
  return allowed.ok() ? nullptr : Finish(context, ToGrpcStatus(allowed));
}

bool InferenceService::OweAnswer() {
  absl::MutexLock lock(&mu_);
  if (draining_.load()) return false;
  ++answers_owed_;
  return true;
}

void InferenceService::AnswerSent(int count) {
  absl::MutexLock lock(&mu_);
  answers_owed_ -= count;
}

bool InferenceService::AwaitAnswersSent(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  auto none = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return answers_owed_ == 0; };
  return mu_.AwaitWithDeadline(absl::Condition(&none), deadline);
}

grpc::ServerUnaryReactor* InferenceService::ServerLive(grpc::CallbackServerContext* context,
                                                       const inference::ServerLiveRequest*,
                                                       inference::ServerLiveResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  response->set_live(true);
  return Finish(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::ServerReady(grpc::CallbackServerContext* context,
                                                        const inference::ServerReadyRequest*,
                                                        inference::ServerReadyResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  response->set_ready(!draining_.load());
  return Finish(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::ModelReady(grpc::CallbackServerContext* context,
                                                       const inference::ModelReadyRequest* request,
                                                       inference::ModelReadyResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  auto model = registry_.Find(request->name(), request->version());
  if (!model.ok()) return Finish(context, ToGrpcStatus(model.status()));
  response->set_ready(!draining_.load());
  return Finish(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::ServerMetadata(grpc::CallbackServerContext* context,
                                                           const inference::ServerMetadataRequest*,
                                                           inference::ServerMetadataResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  response->set_name(kServerName);
  response->set_version(kServerVersion);
  // Only what is implemented: the ModelConfig RPC and request parameters.
  response->add_extensions("model_configuration");
  response->add_extensions("parameters");
  return Finish(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::ModelMetadata(grpc::CallbackServerContext* context,
                                                          const inference::ModelMetadataRequest* request,
                                                          inference::ModelMetadataResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  auto model = registry_.Find(request->name(), request->version());
  if (!model.ok()) return Finish(context, ToGrpcStatus(model.status()));
  *response = moe::ModelMetadata(**model, registry_.Versions(request->name()));
  return Finish(context, grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::ModelConfig(grpc::CallbackServerContext* context,
                                                        const inference::ModelConfigRequest* request,
                                                        inference::ModelConfigResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  auto model = registry_.Find(request->name(), request->version());
  if (!model.ok()) return Finish(context, ToGrpcStatus(model.status()));
  *response->mutable_config() = (*model)->config;
  return Finish(context, grpc::Status::OK);
}

bool InferenceService::StartRequest(const std::string& peer) {
  if (limits_.max_inflight_per_connection <= 0) return true;
  absl::MutexLock lock(&inflight_mu_);
  int& count = inflight_[peer];
  if (count >= limits_.max_inflight_per_connection) return false;
  ++count;
  return true;
}

void InferenceService::EndRequest(const std::string& peer) {
  if (limits_.max_inflight_per_connection <= 0) return;
  absl::MutexLock lock(&inflight_mu_);
  auto it = inflight_.find(peer);
  if (it != inflight_.end() && --it->second <= 0) inflight_.erase(it);
}

void InferenceService::StartInfer(grpc::CallbackServerContext* context, const inference::ModelInferRequest* request,
                                  inference::ModelInferResponse* response,
                                  std::function<void(const grpc::Status&)> finish) {
  const absl::Time arrival = absl::Now();
  // The connection, when its requests are counted.
  std::string peer = limits_.max_inflight_per_connection > 0 ? context->peer() : std::string();
  const bool draining = draining_.load();
  const bool admitted = !draining && StartRequest(peer);
  auto answer = [this, arrival, admitted, peer = std::move(peer), finish = std::move(finish)](
                    int model_index, const absl::Status& status) {
    const grpc::Status grpc_status = ToGrpcStatus(status);
    if (observer_)
      observer_->OnRequestDone(model_index, grpc_status.error_code(), absl::ToDoubleSeconds(absl::Now() - arrival));
    if (admitted) EndRequest(peer);
    finish(grpc_status);
  };
  if (draining) return answer(-1, absl::UnavailableError("server is shutting down"));
  if (!admitted) {
    return answer(-1, absl::ResourceExhaustedError(
                          absl::StrCat("this connection already has ", limits_.max_inflight_per_connection,
                                       " inference requests in flight, the most one connection may have "
                                       "(max_inflight_per_connection); wait for answers or open another connection")));
  }
  auto found = registry_.Find(request->model_name(), request->model_version());
  if (!found.ok()) return answer(-1, found.status());
  const ServedModel& model = **found;
  const int index = model.index;
  if (observer_) observer_->OnRequestStart(index);
  auto pending = DecodeInferRequest(*request, model, limits_.max_request_tokens);
  if (!pending.ok()) return answer(index, pending.status());
  PendingRequest& work = **pending;
  const auto client_deadline = context->deadline();
  if (client_deadline != std::chrono::system_clock::time_point::max()) {
    work.deadline = std::min(work.deadline, absl::FromChrono(client_deadline));
  }
  work.is_cancelled = [context] { return context->IsCancelled(); };
  auto shared_answer = std::make_shared<decltype(answer)>(std::move(answer));
  work.done = [request, response, &model, index, shared_answer, max_bytes = limits_.max_response_bytes](
                  const absl::Status& status, const ResultView* view) {
    if (!status.ok()) return (*shared_answer)(index, status);
    EncodeInferResponse(*request, model, *view, response);
    const size_t bytes = response->ByteSizeLong();
    if (max_bytes > 0 && bytes > max_bytes) {
      response->Clear();
      return (*shared_answer)(index,
                              absl::ResourceExhaustedError(absl::StrCat("the response is ", bytes,
                                                                        " bytes, above the largest message this server "
                                                                        "sends (",
                                                                        max_bytes, " bytes, max_message_mb)")));
    }
    (*shared_answer)(index, absl::OkStatus());
  };
  absl::Status queued = scheduler_.Submit(scheduler_index_[index], std::move(*pending));
  if (!queued.ok()) (*shared_answer)(index, queued);
}

grpc::ServerUnaryReactor* InferenceService::ModelInfer(grpc::CallbackServerContext* context,
                                                       const inference::ModelInferRequest* request,
                                                       inference::ModelInferResponse* response) {
  if (auto* refused = Refuse(context)) return refused;
  auto* reactor = new InferReactor(this);
  StartInfer(context, request, response, [reactor](const grpc::Status& status) { reactor->Finish(status); });
  return reactor;
}

namespace {

// A stream of requests answered in completion order. Errors travel in
// error_message (Triton's convention) and the stream stays open.
class StreamReactor
    : public grpc::ServerBidiReactor<inference::ModelInferRequest, inference::ModelStreamInferResponse> {
 public:
  StreamReactor(InferenceService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context) {
    StartRead(&incoming_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      std::lock_guard<std::mutex> lock(mu_);
      reads_done_ = true;
      MaybeFinishLocked();
      return;
    }
    auto request = std::make_shared<inference::ModelInferRequest>(std::move(incoming_));
    auto reply = std::make_shared<Reply>();
    reply->owes_answer = service_->OweAnswer();
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++in_flight_;
    }
    service_->StartInfer(context_, request.get(), reply->message.mutable_infer_response(),
                         [this, request, reply](const grpc::Status& status) {
                           if (!status.ok()) reply->message.set_error_message(status.error_message());
                           std::lock_guard<std::mutex> lock(mu_);
                           --in_flight_;
                           if (broken_) {
                             // Nothing more can be written: the answer is dropped,
                             // and the stream may now be finished.
                             if (reply->owes_answer) service_->AnswerSent();
                             MaybeFinishLocked();
                             return;
                           }
                           outgoing_.push_back(reply);
                           if (!writing_) WriteNextLocked();
                         });
    incoming_.Clear();
    StartRead(&incoming_);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    int sent = outgoing_.front()->owes_answer ? 1 : 0;
    outgoing_.pop_front();
    writing_ = false;
    if (!ok) {
      broken_ = true;
      for (const auto& reply : outgoing_) sent += reply->owes_answer ? 1 : 0;
      outgoing_.clear();
    }
    if (sent > 0) service_->AnswerSent(sent);
    if (!outgoing_.empty()) WriteNextLocked();
    MaybeFinishLocked();
  }

  void OnCancel() override { service_->NotifyCancelled(); }
  void OnDone() override { delete this; }

 private:
  struct Reply {
    inference::ModelStreamInferResponse message;
    bool owes_answer = false;  // see InferenceService::OweAnswer
  };

  void WriteNextLocked() {
    if (broken_ || outgoing_.empty()) return;
    writing_ = true;
    StartWrite(&outgoing_.front()->message);
  }
  void MaybeFinishLocked() {
    if (reads_done_ && in_flight_ == 0 && !writing_ && outgoing_.empty() && !finished_) {
      finished_ = true;
      Finish(grpc::Status::OK);
    }
  }

  InferenceService* service_;
  grpc::CallbackServerContext* context_;
  inference::ModelInferRequest incoming_;
  std::mutex mu_;
  std::deque<std::shared_ptr<Reply>> outgoing_;  // front is being written
  int in_flight_ = 0;
  bool writing_ = false;
  bool reads_done_ = false;
  bool broken_ = false;
  bool finished_ = false;
};

// A stream refused before its first read: ends at once with `status`.
class RefusedStream
    : public grpc::ServerBidiReactor<inference::ModelInferRequest, inference::ModelStreamInferResponse> {
 public:
  explicit RefusedStream(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

}  // namespace

grpc::ServerBidiReactor<inference::ModelInferRequest, inference::ModelStreamInferResponse>*
InferenceService::ModelStreamInfer(grpc::CallbackServerContext* context) {
  if (authenticator_ != nullptr) {
    const absl::Status allowed = authenticator_->Check(context->client_metadata());
    if (!allowed.ok()) return new RefusedStream(ToGrpcStatus(allowed));
  }
  return new StreamReactor(this, context);
}

}  // namespace moe
