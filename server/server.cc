#include "server/server.h"

#include <exception>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "engine/api/status_macros.h"
#include "grpc/support/log.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"

namespace moe {
namespace {

// Health service names: "" and "readiness" follow readiness, "liveness" is
// SERVING while the process runs.
constexpr const char* kReadinessServices[] = {"", "readiness"};
constexpr char kLivenessService[] = "liveness";

// At the end of a drain, how long answers handed to gRPC at the last moment
// get to reach the wire when the grace period is already over.
constexpr absl::Duration kLastAnswersWait = absl::Milliseconds(100);
// Once every answer is sent, how long connections get to close by
// themselves before they are cut. gRPC's graceful stop waits for each client
// to acknowledge its GOAWAY, and an idle client can take seconds to do so
// (a C++ channel with no call in flight polls on a 5-second timer), a hung
// one forever: with nothing of ours left on them, they are not waited for.
constexpr absl::Duration kConnectionCloseWait = absl::Milliseconds(500);

// gRPC says why it cannot listen only in its log (one long line on stderr);
// BuildAndStart just returns null. While one of these lives, gRPC's log lines
// are kept instead of printed, so that the cause can travel in a Status. One
// at a time (the log function is process-wide).
class GrpcLogCapture {
 public:
  struct Line {
    const char* file;  // a literal in gRPC
    int line;
    gpr_log_severity severity;
    std::string message;
  };

  GrpcLogCapture() { gpr_set_log_function(&Keep); }
  ~GrpcLogCapture() { gpr_set_log_function(nullptr); }  // back to gRPC's own

  // The lines captured so far, forgotten here.
  std::vector<Line> Take() {
    absl::MutexLock lock(&mu_);
    return std::exchange(lines_, {});
  }

 private:
  static void Keep(gpr_log_func_args* args) {
    absl::MutexLock lock(&mu_);
    lines_.push_back({args->file, args->line, args->severity, args->message});
  }
  static absl::Mutex mu_;
  static std::vector<Line> lines_ ABSL_GUARDED_BY(mu_);
};
absl::Mutex GrpcLogCapture::mu_;
std::vector<GrpcLogCapture::Line> GrpcLogCapture::lines_;

// The OS error of the first line that has one ("Address already in use"),
// else the first line's headline; empty without lines.
std::string ListenFailureCause(const std::vector<GrpcLogCapture::Line>& lines) {
  const std::string os_error = "os_error:\"";
  for (const auto& line : lines) {
    const size_t at = line.message.find(os_error);
    if (at == std::string::npos) continue;
    const size_t start = at + os_error.size();
    return line.message.substr(start, line.message.find('"', start) - start);
  }
  if (lines.empty()) return "";
  return lines.front().message.substr(0, lines.front().message.find(" {"));
}

absl::Status ValidateOptions(const MoeServer::Options& options) {
  if (options.grpc_address.empty()) return absl::InvalidArgumentError("the gRPC address is empty");
  if (options.max_batch_tokens < 0 || options.max_batch_tokens > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_batch_tokens must be in [0, ", std::numeric_limits<int32_t>::max(), "], got ", options.max_batch_tokens));
  }
  // Each bounded below.
  for (const auto& [name, value, minimum] :
       {std::tuple<const char*, int64_t, int64_t>{"max_queue_delay_us", options.max_queue_delay_us, -1},
        {"max_queue_size", options.max_queue_size, 0},
        {"max_receive_message_bytes", options.max_receive_message_bytes, 1},
        {"max_send_message_bytes", options.max_send_message_bytes, 1},
        {"max_request_tokens", options.max_request_tokens, 0},
        {"max_concurrent_streams", options.max_concurrent_streams, 1},
        {"max_inflight_per_connection", options.max_inflight_per_connection, 0}}) {
    if (value < minimum) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be >= ", minimum, ", got ", value));
    }
  }
  if (options.grace_period < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("the grace period must not be negative, got ", absl::FormatDuration(options.grace_period)));
  }
  return absl::OkStatus();
}

// What is being loaded, for the message of a load failure.
std::string ModelSource(const ModelRegistry::Options& models) {
  if (!models.model_repository.empty() && !models.model_path.empty()) {
    return absl::StrCat("models from '", models.model_repository, "' and '", models.model_path, "'");
  }
  if (!models.model_repository.empty()) return absl::StrCat("model repository '", models.model_repository, "'");
  if (!models.model_path.empty()) return absl::StrCat("model '", models.model_path, "'");
  return "the demo model";
}

// A model's batching, as its served config states it (overrides applied).
BatchQueue::Options QueueOptionsOf(const inference::ModelConfig& config) {
  const auto& batching = config.dynamic_batching();
  return {.max_batch_tokens = config.max_batch_size(),
          .max_queue_delay = absl::Microseconds(static_cast<int64_t>(batching.max_queue_delay_microseconds())),
          .max_queue_size = static_cast<int>(batching.default_queue_policy().max_queue_size())};
}

}  // namespace

// The scheduler numbers models in the order they are added to it; observers
// know them by ServedModel::index. This passes the scheduler's reports on
// with the one in place of the other, by an explicit map (nothing assumes
// the two numberings agree). Thread-safe.
class MoeServer::SchedulerIndexMap : public SchedulerObserver {
 public:
  // `observer` (not owned) must outlive this.
  explicit SchedulerIndexMap(SchedulerObserver* observer) : observer_(*observer) {}

  // The scheduler's `scheduler_index` is the model of ServedModel::index
  // `model_index`.
  void Add(int scheduler_index, int model_index) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (model_index_.size() <= static_cast<size_t>(scheduler_index)) model_index_.resize(scheduler_index + 1, -1);
    model_index_[scheduler_index] = model_index;
  }

  void OnBatch(int scheduler_index, int num_requests, int num_tokens, double compute_seconds,
               const std::vector<double>& queue_seconds) override {
    observer_.OnBatch(ModelIndex(scheduler_index), num_requests, num_tokens, compute_seconds, queue_seconds);
  }
  void OnDropped(int scheduler_index, absl::StatusCode code) override {
    observer_.OnDropped(ModelIndex(scheduler_index), code);
  }

 private:
  // -1 for an index never added.
  int ModelIndex(int scheduler_index) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::ReaderMutexLock lock(&mu_);
    if (scheduler_index < 0 || static_cast<size_t>(scheduler_index) >= model_index_.size()) return -1;
    return model_index_[scheduler_index];
  }

  SchedulerObserver& observer_;
  mutable absl::Mutex mu_;
  std::vector<int> model_index_ ABSL_GUARDED_BY(mu_);
};

MoeServer::MoeServer(const Options& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<MoeServer>> MoeServer::Create(const Options& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  auto server = std::unique_ptr<MoeServer>(new MoeServer(options));
  // On failure `server` is destroyed half-built: see ~MoeServer.
  RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status MoeServer::Start() {
  // Before the models load: a bad file fails at once.
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, ServerCredentialsFor(options_.tls));
  // The overrides go into the served configs, which the batching then follows.
  ModelRegistry::Options models = options_.models;
  if (options_.max_batch_tokens > 0) models.batching_override.max_batch_size = options_.max_batch_tokens;
  if (options_.max_queue_delay_us >= 0) models.batching_override.max_queue_delay_us = options_.max_queue_delay_us;
  if (options_.max_queue_size > 0) models.batching_override.max_queue_size = options_.max_queue_size;
  absl::StatusOr<std::unique_ptr<ModelRegistry>> registry;
  try {
    // Each model's workers report to their health entry, which hands on
    // to the metrics.
    models.worker_observers = [this](const std::string& name, int64_t version) -> WorkerObserver* {
      WorkerObserver* metrics = options_.worker_observers ? options_.worker_observers(name, version) : nullptr;
      worker_health_.push_back(std::make_unique<WorkerHealth>(name, metrics));
      return worker_health_.back().get();
    };
    registry = ModelRegistry::Create(models, options_.engine_observers);
  } catch (const std::exception& e) {
    // The loaders report what they know can fail as a Status (files and
    // directories, memory for the weights); this is the last net for
    // anything a library still throws, so that no exception leaves the
    // server.
    registry = absl::InternalError(e.what());
  }
  if (!registry.ok()) {
    return absl::Status(registry.status().code(),
                        absl::StrCat("cannot load ", ModelSource(options_.models), ": ", registry.status().message()));
  }
  registry_ = std::move(*registry);
  if (options_.scheduler_observer != nullptr) {
    scheduler_reports_ = std::make_unique<SchedulerIndexMap>(options_.scheduler_observer);
  }
  ASSIGN_OR_RETURN(scheduler_, BatchScheduler::Create(
                                   {.num_threads = options_.batch_threads, .observer = scheduler_reports_.get()}));
  scheduler_index_.assign(registry_->models().size(), -1);
  for (const auto& model : registry_->models()) {
    auto index = scheduler_->AddModel(model->model.get(), QueueOptionsOf(model->config));
    if (!index.ok()) {
      return absl::Status(index.status().code(), absl::StrCat("model '", model->name, "' version ", model->version,
                                                              ": ", index.status().message()));
    }
    scheduler_index_[model->index] = *index;
    if (scheduler_reports_) scheduler_reports_->Add(*index, model->index);
  }
  if (!options_.auth_token_file.empty()) {
    ASSIGN_OR_RETURN(authenticator_, TokenAuthenticator::Create({.token_file = options_.auth_token_file}));
  }
  service_ = std::make_unique<InferenceService>(
      registry_.get(), scheduler_.get(), scheduler_index_, &draining_, options_.request_observer,
      InferenceService::Limits{.max_request_tokens = options_.max_request_tokens,
                               .max_response_bytes = static_cast<size_t>(options_.max_send_message_bytes),
                               .max_inflight_per_connection = options_.max_inflight_per_connection},
      authenticator_.get());
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.grpc_address, credentials, &port_);
  // gRPC sets SO_REUSEPORT by default, which lets a second server bind a port
  // that another one listens on and silently share its connections.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, options_.reuse_grpc_port ? 1 : 0);
  builder.RegisterService(service_.get());
  admin_ = std::make_unique<PlacementAdminService>(registry_.get(), options_.expert_load, absl::Seconds(120),
                                                   authenticator_.get());
  builder.RegisterService(admin_.get());
  builder.SetMaxReceiveMessageSize(options_.max_receive_message_bytes);
  // The inference service bounds its answers itself with a clear status;
  // gRPC's own check would end a whole stream for one answer.
  builder.SetMaxSendMessageSize(-1);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, options_.max_concurrent_streams);
  std::vector<GrpcLogCapture::Line> log;
  {
    GrpcLogCapture capture;
    server_ = builder.BuildAndStart();
    log = capture.Take();
  }
  if (!server_ || port_ == 0) {
    const std::string cause = ListenFailureCause(log);
    return absl::UnavailableError(
        absl::StrCat("cannot listen for gRPC on ", options_.grpc_address, cause.empty() ? "" : ": ", cause));
  }
  for (const auto& line : log) gpr_log_message(line.file, line.line, line.severity, line.message.c_str());
  auto* health = server_->GetHealthCheckService();
  for (const char* service : kReadinessServices) health->SetServingStatus(service, true);
  health->SetServingStatus(kLivenessService, true);
  for (auto& workers : worker_health_) workers->Attach(health);
  return absl::OkStatus();
}

bool MoeServer::Shutdown() {
  if (stopped_.exchange(true)) return true;
  draining_.store(true);
  // Not serving yet (Create failed before the port opened): no request was
  // accepted, and the scheduler's destructor stops its threads.
  if (server_ == nullptr) return true;
  auto* health = server_->GetHealthCheckService();
  for (const char* service : kReadinessServices) health->SetServingStatus(service, false);
  const absl::Time deadline = absl::Now() + options_.grace_period;
  // Every accepted request ends here: run, or UNAVAILABLE at the deadline.
  const bool drained = scheduler_->Drain(deadline);
  service_->AwaitAnswersSent(std::max(deadline, absl::Now() + kLastAnswersWait));
  // What is left is connections and streams with no work of ours on them.
  server_->Shutdown(absl::ToChronoTime(std::min(deadline, absl::Now() + kConnectionCloseWait)));
  return drained;
}

MoeServer::~MoeServer() {
  Shutdown();
  if (server_ != nullptr) server_->Wait();
  // The health service goes with the gRPC server; the workers' links live
  // until the registry goes.
  for (auto& workers : worker_health_) workers->Attach(nullptr);
  // Members go in reverse order: the gRPC server, the service, the scheduler
  // (joining its threads), then the models; any of them may be null.
}

}  // namespace moe
