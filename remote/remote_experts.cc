#include "remote/remote_experts.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace moe {

struct RemoteExperts::Call {
  int worker = -1;
  std::vector<int> experts;  // ascending
  uint64_t id = 0;
  absl::Status sent;  // how the Send went
  absl::Time start;
  size_t bytes_sent = 0;
  std::vector<int> failed_workers;  // that had these rows and failed them
};

struct RemoteExperts::RemoteBatch : public ExpertOffload::Batch {
  Job job;
  std::vector<Call> calls;
  absl::Status unplaced;  // an expert no worker could take at Start
};

absl::StatusOr<std::unique_ptr<RemoteExperts>> RemoteExperts::Create(const Options& options) {
  if (options.workers.empty()) return absl::InvalidArgumentError("a placement needs at least one worker");
  auto remote = std::unique_ptr<RemoteExperts>(new RemoteExperts(options));
  remote->hosted_ = ExpertSet::None(options.num_layers, options.num_experts);
  for (const Worker& worker : options.workers) {
    if (worker.address.empty()) return absl::InvalidArgumentError("a worker has no address");
    if (worker.experts.num_layers() != options.num_layers || worker.experts.num_experts() != options.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat("worker ", worker.address, ": its experts are given for ",
                                                     worker.experts.num_layers(), " layers of ",
                                                     worker.experts.num_experts(), " experts; the model has ",
                                                     options.num_layers, " of ", options.num_experts));
    }
    for (int layer = 0; layer < options.num_layers; ++layer) {
      for (int e = 0; e < options.num_experts; ++e) {
        if (worker.experts.Contains(layer, e)) remote->hosted_.Add(layer, e);
      }
    }
    remote->links_.push_back(std::make_unique<WorkerLink>(WorkerLink::Options{.address = worker.address,
                                                                              .call_deadline = options.call_deadline,
                                                                              .min_backoff = options.min_backoff,
                                                                              .max_backoff = options.max_backoff}));
  }
  remote->reported_up_ = std::make_unique<std::atomic<bool>[]>(options.workers.size());
  for (size_t w = 0; w < options.workers.size(); ++w) remote->reported_up_[w].store(true);
  remote->prober_ = std::thread([r = remote.get()] { r->ProbeLoop(); });
  return remote;
}

RemoteExperts::~RemoteExperts() {
  {
    absl::MutexLock lock(&stop_mu_);
    stopping_ = true;
  }
  prober_.join();
}

void RemoteExperts::ProbeLoop() {
  const absl::Duration period = std::max(options_.min_backoff / 2, absl::Milliseconds(10));
  absl::MutexLock lock(&stop_mu_);
  while (!stop_mu_.AwaitWithTimeout(absl::Condition(&stopping_), period)) {
    stop_mu_.Unlock();
    for (int w = 0; w < num_workers(); ++w) {
      links_[w]->Probe();
      NoteLinkState(w);
    }
    stop_mu_.Lock();
  }
}

void RemoteExperts::NoteLinkState(int worker) const {
  if (!options_.observer) return;
  const bool up = links_[worker]->up();
  if (reported_up_[worker].exchange(up) != up) options_.observer->OnWorkerUp(worker, up);
}

std::unique_ptr<ExpertOffload::Batch> RemoteExperts::NewBatch() const { return std::make_unique<RemoteBatch>(); }

bool RemoteExperts::Hosts(int layer, int expert) const { return hosted_.Contains(layer, expert); }

int RemoteExperts::ChooseWorker(int layer, int expert, const std::vector<int>& excluded) const {
  int best = -1;
  std::pair<int, double> best_load;
  for (int w = 0; w < num_workers(); ++w) {
    if (!options_.workers[w].experts.Contains(layer, expert) || !links_[w]->up()) continue;
    if (std::find(excluded.begin(), excluded.end(), w) != excluded.end()) continue;
    const std::pair<int, double> load{links_[w]->in_flight(), links_[w]->recent_seconds()};
    if (best < 0 || load < best_load) {
      best = w;
      best_load = load;
    }
  }
  return best;
}

absl::Status RemoteExperts::SendCall(const Job& job, int worker, std::vector<int> experts, Call& call) const {
  const DispatchPlan& plan = *job.plan;
  const bool bf16 = options_.compute == DType::kBF16;
  worker::ExpertRowsRequest request;
  request.set_layer(job.layer);
  request.set_hidden(job.hidden);
  request.set_dtype(bf16 ? worker::ROW_BF16 : worker::ROW_FP32);
  int64_t total = 0;
  for (int e : experts) {
    request.add_experts(e);
    request.add_expert_rows(plan.rows_of(e));
    total += plan.rows_of(e);
  }
  // The rows, gathered from the tokens in plan order.
  std::string* rows = request.mutable_rows();
  rows->resize(static_cast<size_t>(total) * job.hidden * (bf16 ? 2 : 4));
  char* out = rows->data();
  for (int e : experts) {
    for (int64_t r = plan.offsets[e]; r < plan.offsets[e + 1]; ++r) {
      const float* token = job.tokens + static_cast<size_t>(plan.row_token[r]) * job.hidden;
      if (bf16) {
        for (int i = 0; i < job.hidden; ++i, out += 2) {
          const uint16_t value = FloatToBf16(token[i]);
          std::memcpy(out, &value, 2);
        }
      } else {
        std::memcpy(out, token, static_cast<size_t>(job.hidden) * sizeof(float));
        out += static_cast<size_t>(job.hidden) * sizeof(float);
      }
    }
  }
  call.worker = worker;
  call.experts = std::move(experts);
  call.start = absl::Now();
  call.bytes_sent = request.ByteSizeLong();
  absl::StatusOr<uint64_t> id = links_[worker]->Send(request);
  call.sent = id.status();
  if (id.ok()) call.id = *id;
  return call.sent;
}

absl::Status RemoteExperts::Start(const Job& job, Batch& batch) const {
  auto& b = static_cast<RemoteBatch&>(batch);
  b.job = job;
  b.calls.clear();
  b.unplaced = absl::OkStatus();
  // A link can go down between calls (its stream ends): the observer hears
  // of it at the next batch at the latest.
  for (int w = 0; w < num_workers(); ++w) NoteLinkState(w);
  std::vector<std::vector<int>> by_worker(links_.size());
  for (int e = 0; e < job.plan->num_experts; ++e) {
    if (job.plan->rows_of(e) == 0 || job.local->Contains(job.layer, e)) continue;
    const int w = ChooseWorker(job.layer, e, {});
    if (w < 0 && b.unplaced.ok()) {
      b.unplaced = absl::UnavailableError(
          absl::StrCat("layer ", job.layer, " expert ", e, ": no worker that holds it is up"));
    }
    if (w >= 0) by_worker[w].push_back(e);
  }
  for (size_t w = 0; w < by_worker.size(); ++w) {
    if (by_worker[w].empty()) continue;
    // A failed send is retried on a replica in Finish.
    SendCall(job, static_cast<int>(w), std::move(by_worker[w]), b.calls.emplace_back()).IgnoreError();
  }
  return absl::OkStatus();
}

absl::Status RemoteExperts::CompleteCall(const Job& job, Call call) const {
  worker::ExpertRowsResponse response;
  absl::Status status = call.sent;
  if (status.ok()) status = links_[call.worker]->Await(call.id, &response);
  int64_t rows = 0;
  for (int e : call.experts) rows += job.plan->rows_of(e);
  if (status.ok() && (response.outputs().size() != static_cast<size_t>(rows) * job.hidden * sizeof(float) ||
                      response.expert_seconds_size() != static_cast<int>(call.experts.size()))) {
    status = absl::DataLossError(absl::StrCat("worker ", links_[call.worker]->address(), " answered ",
                                              response.outputs().size(), " bytes for ", rows, " rows"));
  }
  if (options_.observer) {
    options_.observer->OnCall({.worker = call.worker,
                               .layer = job.layer,
                               .experts = call.experts,
                               .status = status,
                               .seconds = absl::ToDoubleSeconds(absl::Now() - call.start),
                               .bytes_sent = call.bytes_sent,
                               .bytes_received = response.ByteSizeLong()});
    NoteLinkState(call.worker);
  }
  if (status.ok()) {
    const char* from = response.outputs().data();
    for (size_t i = 0; i < call.experts.size(); ++i) {
      const int e = call.experts[i];
      const size_t bytes = static_cast<size_t>(job.plan->rows_of(e)) * job.hidden * sizeof(float);
      std::memcpy(job.expert_out + job.plan->offsets[e] * job.hidden, from, bytes);
      from += bytes;
      if (job.expert_seconds) job.expert_seconds[e] = response.expert_seconds(static_cast<int>(i));
    }
    return absl::OkStatus();
  }
  return Reroute(job, std::move(call), status);
}

absl::Status RemoteExperts::Reroute(const Job& job, Call failed, const absl::Status& why) const {
  std::vector<int> excluded = std::move(failed.failed_workers);
  excluded.push_back(failed.worker);
  std::vector<std::vector<int>> by_worker(links_.size());
  for (int e : failed.experts) {
    const int w = ChooseWorker(job.layer, e, excluded);
    if (w < 0) {
      return absl::UnavailableError(absl::StrCat("layer ", job.layer, " expert ", e,
                                                 ": no other worker that holds it is up (", why.message(), ")"));
    }
    by_worker[w].push_back(e);
  }
  for (size_t w = 0; w < by_worker.size(); ++w) {
    if (by_worker[w].empty()) continue;
    if (options_.observer) options_.observer->OnRetry(failed.worker, static_cast<int>(w));
    Call retry;
    retry.failed_workers = excluded;
    SendCall(job, static_cast<int>(w), std::move(by_worker[w]), retry).IgnoreError();
    if (absl::Status done = CompleteCall(job, std::move(retry)); !done.ok()) return done;
  }
  return absl::OkStatus();
}

absl::Status RemoteExperts::Finish(Batch& batch) const {
  auto& b = static_cast<RemoteBatch&>(batch);
  absl::Status result = b.unplaced;
  // Every call is awaited, whatever failed before it: its rows are in flight.
  for (Call& call : b.calls) {
    absl::Status done = CompleteCall(b.job, std::move(call));
    if (result.ok()) result = done;
  }
  b.calls.clear();
  return result;
}

}  // namespace moe
