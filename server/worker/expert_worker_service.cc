#include "server/worker/expert_worker_service.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "engine/api/dtype.h"
#include "engine/api/status_macros.h"

namespace moe {

struct ExpertWorkerService::StreamState {
  std::shared_ptr<const LayerExecutor> executor;  // what the workspace was planned by
  std::unique_ptr<ExecutorWorkspace> workspace;
  std::vector<float> rows;  // [total rows, hidden]
  DispatchPlan plan;
  std::vector<double> seconds;  // [num_experts]
};

ExpertWorkerService::ExpertWorkerService(std::shared_ptr<const LayerExecutor> executor, const ModelSpec& spec,
                                         int num_layers, Reloader reload, ExpertWorkerObserver* observer)
    : spec_(spec),
      num_layers_(num_layers),
      reload_(std::move(reload)),
      observer_(observer),
      executor_(std::move(executor)) {
  if (observer_) observer_->OnHeld(executor_->held());
}

std::shared_ptr<const LayerExecutor> ExpertWorkerService::executor() const {
  absl::MutexLock lock(&mu_);
  return executor_;
}

grpc::Status ExpertWorkerService::Describe(grpc::ServerContext*, const worker::DescribeRequest*,
                                           worker::DescribeResponse* response) {
  DescribeInto(*executor(), response);
  return grpc::Status::OK;
}

grpc::Status ExpertWorkerService::SetExperts(grpc::ServerContext*, const worker::SetExpertsRequest* request,
                                             worker::DescribeResponse* response) {
  absl::StatusOr<ExpertSet> parsed = ExpertSet::FromBytes(request->held(), num_layers_, spec_.router.num_experts);
  if (!parsed.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(parsed.status().message()));
  const ExpertSet& held = *parsed;
  absl::MutexLock reload_lock(&reload_mu_);
  absl::StatusOr<std::shared_ptr<const LayerExecutor>> loaded = reload_(held);
  if (!loaded.ok()) {
    return grpc::Status(static_cast<grpc::StatusCode>(loaded.status().code()), std::string(loaded.status().message()));
  }
  {
    absl::MutexLock lock(&mu_);
    executor_ = *std::move(loaded);
  }
  if (observer_) observer_->OnHeld(held);
  DescribeInto(*executor(), response);
  return grpc::Status::OK;
}

void ExpertWorkerService::DescribeInto(const LayerExecutor& executor, worker::DescribeResponse* response) const {
  response->set_model(spec_.name);
  response->set_num_layers(num_layers_);
  response->set_num_experts(spec_.router.num_experts);
  response->set_hidden(spec_.hidden_size);
  response->set_compute_dtype(executor.compute_dtype() == DType::kBF16 ? "bf16" : "fp32");
  response->set_held(executor.held().Bytes());
}

grpc::Status ExpertWorkerService::RunExperts(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<worker::ExpertRowsResponse, worker::ExpertRowsRequest>* stream) {
  StreamState state;
  worker::ExpertRowsRequest request;
  worker::ExpertRowsResponse response;
  while (!draining_.load() && !context->IsCancelled() && stream->Read(&request)) {
    const absl::Status status = AnswerOn(request, state, &response);
    if (observer_) {
      observer_->OnRequest(
          {.layer = request.layer(),
           .experts = {request.experts().data(), static_cast<size_t>(request.experts_size())},
           .expert_rows = {request.expert_rows().data(), static_cast<size_t>(request.expert_rows_size())},
           .expert_seconds = {response.expert_seconds().data(), static_cast<size_t>(response.expert_seconds_size())},
           .code = status.code()});
    }
    requests_served_.fetch_add(1);
    if (!stream->Write(response)) break;
  }
  return draining_.load() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker draining") : grpc::Status::OK;
}

absl::Status ExpertWorkerService::AnswerOn(const worker::ExpertRowsRequest& request, StreamState& state,
                                           worker::ExpertRowsResponse* response) const {
  response->Clear();
  response->set_id(request.id());
  const absl::Status status = Run(request, state, response);
  if (!status.ok()) {
    response->clear_outputs();
    response->clear_expert_seconds();
    response->set_code(static_cast<int>(status.code()));
    response->set_message(std::string(status.message()));
  }
  return status;
}

absl::Status ExpertWorkerService::Answer(const worker::ExpertRowsRequest& request,
                                         worker::ExpertRowsResponse* response) const {
  StreamState state;
  return AnswerOn(request, state, response);
}

absl::Status ExpertWorkerService::Validate(const worker::ExpertRowsRequest& request) const {
  if (request.layer() < 0 || request.layer() >= num_layers_) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", request.layer(), " out of range: the model has ", num_layers_, " MoE layers"));
  }
  if (request.hidden() != spec_.hidden_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows of ", request.hidden(), " values; the model's hidden size is ", spec_.hidden_size));
  }
  if (request.experts_size() != request.expert_rows_size()) {
    return absl::InvalidArgumentError("experts and expert_rows differ in length");
  }
  int previous = -1;
  int64_t total = 0;
  for (int i = 0; i < request.experts_size(); ++i) {
    if (request.experts(i) <= previous || request.experts(i) >= spec_.router.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("expert ", request.experts(i),
                                                     " out of order or range (experts ascending, below ",
                                                     spec_.router.num_experts, ")"));
    }
    if (request.expert_rows(i) < 0) return absl::InvalidArgumentError("negative expert_rows");
    previous = request.experts(i);
    total += request.expert_rows(i);
  }
  const size_t value_size = request.dtype() == worker::ROW_BF16 ? 2 : 4;
  if (request.rows().size() != static_cast<size_t>(total) * spec_.hidden_size * value_size) {
    return absl::InvalidArgumentError(absl::StrCat("rows hold ", request.rows().size(), " bytes; ", total, " rows of ",
                                                   spec_.hidden_size, " values need ",
                                                   static_cast<size_t>(total) * spec_.hidden_size * value_size));
  }
  return absl::OkStatus();
}

absl::Status ExpertWorkerService::Run(const worker::ExpertRowsRequest& request, StreamState& state,
                                      worker::ExpertRowsResponse* response) const {
  RETURN_IF_ERROR(Validate(request));
  int64_t total = 0;
  for (int i = 0; i < request.experts_size(); ++i) total += request.expert_rows(i);
  // The executor current now serves the whole request; the stream's
  // workspace follows it, and grows (to a power of two) for a request with
  // more rows than it was planned for: each row is a token here, and a
  // device executor plans its memory by tokens.
  std::shared_ptr<const LayerExecutor> current = executor();
  if (current != state.executor || state.workspace->max_tokens() < total) {
    state.workspace.reset();
    ASSIGN_OR_RETURN(
        state.workspace,
        current->NewWorkspace(static_cast<int>(std::bit_ceil(static_cast<uint64_t>(std::max<int64_t>(total, 1))))));
    state.executor = std::move(current);
  }
  const int E = spec_.router.num_experts;
  const int d = spec_.hidden_size;
  // The rows become the tokens: row r is token r, grouped by expert.
  DispatchPlan& plan = state.plan;
  plan.num_experts = E;
  plan.offsets.assign(E + 1, 0);
  for (int i = 0; i < request.experts_size(); ++i) plan.offsets[request.experts(i) + 1] = request.expert_rows(i);
  std::partial_sum(plan.offsets.begin(), plan.offsets.end(), plan.offsets.begin());
  plan.row_token.resize(total);
  std::iota(plan.row_token.begin(), plan.row_token.end(), 0);
  state.rows.resize(static_cast<size_t>(total) * d);
  ConvertToFloat(request.dtype() == worker::ROW_BF16 ? DType::kBF16 : DType::kF32, request.rows().data(),
                 state.rows.size(), state.rows.data());
  std::string* outputs = response->mutable_outputs();
  outputs->resize(static_cast<size_t>(total) * d * sizeof(float));
  state.seconds.assign(E, 0.0);
  RETURN_IF_ERROR(state.executor->RunExperts({.layer = request.layer(),
                                              .tokens = state.rows.data(),
                                              .num_tokens = static_cast<int>(total),
                                              .plan = &plan,
                                              .expert_out = reinterpret_cast<float*>(outputs->data()),
                                              .expert_seconds = state.seconds.data()},
                                             *state.workspace));
  for (int e : request.experts()) response->add_expert_seconds(state.seconds[e]);
  return absl::OkStatus();
}

}  // namespace moe
