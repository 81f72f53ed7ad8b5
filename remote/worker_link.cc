#include "remote/worker_link.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace moe {

namespace {

absl::Mutex credentials_mu(absl::kConstInit);
std::shared_ptr<grpc::ChannelCredentials>* worker_credentials ABSL_GUARDED_BY(credentials_mu) = nullptr;

// A layer's rows for one worker can be large (512 tokens x top-8 x hidden
// 7168 in fp32 is 117 MB): no message limit on the link.
std::shared_ptr<grpc::Channel> UnlimitedChannel(const std::string& address) {
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(-1);
  arguments.SetMaxSendMessageSize(-1);
  return grpc::CreateCustomChannel(address, WorkerChannelCredentials(), arguments);
}

}  // namespace

void SetWorkerChannelCredentials(std::shared_ptr<grpc::ChannelCredentials> credentials) {
  absl::MutexLock lock(&credentials_mu);
  // Never freed: links may read it until the process ends.
  if (worker_credentials == nullptr) worker_credentials = new std::shared_ptr<grpc::ChannelCredentials>();
  *worker_credentials = std::move(credentials);
}

std::shared_ptr<grpc::ChannelCredentials> WorkerChannelCredentials() {
  absl::MutexLock lock(&credentials_mu);
  if (worker_credentials == nullptr || *worker_credentials == nullptr) return grpc::InsecureChannelCredentials();
  return *worker_credentials;
}

WorkerLink::WorkerLink(const Options& options)
    : options_(options),
      channel_(UnlimitedChannel(options.address)),
      stub_(worker::ExpertWorker::NewStub(channel_)),
      backoff_(options.min_backoff) {}

WorkerLink::~WorkerLink() {
  std::vector<std::unique_ptr<Stream>> streams;
  {
    absl::MutexLock lock(&mu_);
    MarkDown(absl::CancelledError("link closed"));
    streams = std::move(retired_);
  }
  // Readers exit once their stream is cancelled; none needs anything held here.
  for (auto& stream : streams) stream->reader.join();
}

bool WorkerLink::up() const {
  absl::MutexLock lock(&mu_);
  return up_;
}

int WorkerLink::in_flight() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(pending_.size());
}

double WorkerLink::recent_seconds() const {
  absl::MutexLock lock(&mu_);
  return recent_seconds_;
}

void WorkerLink::Backoff() {
  next_attempt_ = absl::Now() + backoff_;
  backoff_ = std::min(backoff_ * 2, options_.max_backoff);
}

void WorkerLink::MarkDown(const absl::Status& why) {
  if (up_) Backoff();
  up_ = false;
  last_failure_ = why;
  for (auto& [id, pending] : pending_) {
    if (pending.done) continue;
    pending.done = true;
    pending.status = why;
  }
  if (stream_) {
    stream_->context.TryCancel();
    retired_.push_back(std::move(stream_));
  }
}

absl::Status WorkerLink::EnsureStream() {
  if (stream_) return absl::OkStatus();
  if (!up_) {
    return absl::UnavailableError(
        absl::StrCat("worker ", options_.address, " is down (", last_failure_.message(), ")"));
  }
  // Streams whose reader has finished can go; the writer lock keeps a
  // writer from holding one of them meanwhile.
  absl::MutexLock write_lock(&write_mu_);
  auto finished = std::stable_partition(retired_.begin(), retired_.end(),
                                        [](const auto& stream) { return !stream->finished.load(); });
  for (auto it = finished; it != retired_.end(); ++it) (*it)->reader.join();
  retired_.erase(finished, retired_.end());
  auto stream = std::make_unique<Stream>();
  stream->stream = stub_->RunExperts(&stream->context);
  stream->reader = std::thread([this, s = stream.get()] { ReadLoop(s); });
  stream_ = std::move(stream);
  return absl::OkStatus();
}

void WorkerLink::Probe() {
  {
    absl::MutexLock lock(&mu_);
    if (up_ || absl::Now() < next_attempt_) return;
  }
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + std::min(options_.call_deadline, absl::Seconds(1))));
  worker::DescribeRequest request;
  worker::DescribeResponse response;
  const grpc::Status answer = stub_->Describe(&context, request, &response);
  absl::MutexLock lock(&mu_);
  if (up_) return;
  if (answer.ok()) {
    up_ = true;
    backoff_ = options_.min_backoff;
  } else {
    Backoff();
  }
}

absl::StatusOr<uint64_t> WorkerLink::Send(worker::ExpertRowsRequest& request) {
  Stream* stream = nullptr;
  uint64_t id = 0;
  {
    absl::MutexLock lock(&mu_);
    if (absl::Status ready = EnsureStream(); !ready.ok()) return ready;
    id = next_id_++;
    pending_[id].sent = absl::Now();
    stream = stream_.get();
  }
  request.set_id(id);
  bool written;
  {
    absl::MutexLock write_lock(&write_mu_);
    written = stream->stream->Write(request);
  }
  if (!written) {
    absl::MutexLock lock(&mu_);
    pending_.erase(id);
    const absl::Status failed = absl::UnavailableError(absl::StrCat("worker ", options_.address, " is unreachable"));
    if (stream_.get() == stream) MarkDown(failed);
    return failed;
  }
  return id;
}

absl::Status WorkerLink::Await(uint64_t id, worker::ExpertRowsResponse* response) {
  absl::MutexLock lock(&mu_);
  auto it = pending_.find(id);
  if (it == pending_.end()) return absl::InternalError(absl::StrCat("no request ", id, " awaits an answer"));
  Pending& pending = it->second;
  const absl::Time deadline = pending.sent + options_.call_deadline;
  if (!mu_.AwaitWithDeadline(absl::Condition(&pending.done), deadline) && !pending.done) {
    MarkDown(absl::DeadlineExceededError(absl::StrCat("worker ", options_.address, " did not answer within ",
                                                      absl::FormatDuration(options_.call_deadline))));
  }
  const absl::Status status = pending.status;
  *response = std::move(pending.response);
  pending_.erase(it);
  return status;
}

void WorkerLink::ReadLoop(Stream* stream) {
  worker::ExpertRowsResponse response;
  while (stream->stream->Read(&response)) {
    absl::MutexLock lock(&mu_);
    auto it = pending_.find(response.id());
    if (it == pending_.end() || it->second.done) continue;  // abandoned after a failure
    Pending& pending = it->second;
    pending.done = true;
    pending.status = response.code() == 0
                         ? absl::OkStatus()
                         : absl::Status(static_cast<absl::StatusCode>(response.code()),
                                        absl::StrCat("worker ", options_.address, ": ", response.message()));
    const double seconds = absl::ToDoubleSeconds(absl::Now() - pending.sent);
    recent_seconds_ = recent_seconds_ == 0 ? seconds : 0.8 * recent_seconds_ + 0.2 * seconds;
    backoff_ = options_.min_backoff;
    pending.response = std::move(response);
  }
  {
    absl::MutexLock lock(&mu_);
    if (stream_.get() == stream) {
      MarkDown(absl::UnavailableError(absl::StrCat("worker ", options_.address, ": the stream ended")));
    }
  }
  {
    // Cancelled by now: a writer still in Write returns at once.
    absl::MutexLock write_lock(&write_mu_);
    (void)stream->stream->Finish();
  }
  stream->finished.store(true);
}

}  // namespace moe
