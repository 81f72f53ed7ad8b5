#include "remote/remote_experts.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"

namespace moe {

// A worker address, its link, and what the observer was last told of it.
struct RemoteExperts::Endpoint {
  int id = 0;
  std::unique_ptr<WorkerLink> link;
  std::atomic<bool> reported_up{true};
};

// One placement; immutable, shared by the batches that use it.
struct RemoteExperts::Placement {
  std::vector<PlacedWorker> workers;
  std::vector<Endpoint*> endpoints;  // [slot], as workers
  ExpertSet hosted;
};

struct RemoteExperts::Call {
  int worker = -1;           // a slot of the batch's placement
  std::vector<int> experts;  // ascending
  uint64_t id = 0;
  absl::Status sent;  // how the Send went
  absl::Time start;
  size_t bytes_sent = 0;
  std::vector<int> failed_workers;  // slots that had these rows and failed them
};

struct RemoteExperts::RemoteBatch : public ExpertOffload::Batch {
  Job job;
  std::shared_ptr<const Placement> placement;
  std::vector<Call> calls;
  absl::Status unplaced;              // an expert no worker could take at Start
  std::vector<int> unplaced_experts;  // all of them
};

RemoteExperts::RemoteExperts(const Options& options) : options_(options) {}

absl::StatusOr<std::unique_ptr<RemoteExperts>> RemoteExperts::Create(const Options& options) {
  auto remote = std::unique_ptr<RemoteExperts>(new RemoteExperts(options));
  if (absl::Status valid = remote->Validate(options.workers); !valid.ok()) return valid;
  {
    absl::MutexLock lock(&remote->placement_mu_);
    remote->placement_ = remote->MakePlacement(options.workers);
  }
  if (options.observer) options.observer->OnPlacement(remote->CurrentPlacement()->workers);
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

absl::Status RemoteExperts::Validate(const std::vector<Worker>& workers) const {
  if (workers.empty()) return absl::InvalidArgumentError("a placement needs at least one worker");
  std::set<std::string> addresses;
  for (const Worker& worker : workers) {
    if (worker.address.empty()) return absl::InvalidArgumentError("a worker has no address");
    if (!addresses.insert(worker.address).second) {
      return absl::InvalidArgumentError(absl::StrCat("worker ", worker.address, " is placed twice"));
    }
    if (worker.experts.num_layers() != options_.num_layers || worker.experts.num_experts() != options_.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker.address, ": its experts are given for ", worker.experts.num_layers(), " layers of ",
          worker.experts.num_experts(), " experts; the model has ", options_.num_layers, " of ", options_.num_experts));
    }
  }
  return absl::OkStatus();
}

std::shared_ptr<const RemoteExperts::Placement> RemoteExperts::MakePlacement(std::vector<Worker> workers) {
  auto placement = std::make_shared<Placement>();
  placement->hosted = ExpertSet::None(options_.num_layers, options_.num_experts);
  for (Worker& worker : workers) {
    auto known = std::find_if(endpoints_.begin(), endpoints_.end(),
                              [&](const auto& endpoint) { return endpoint->link->address() == worker.address; });
    if (known == endpoints_.end()) {
      auto endpoint = std::make_unique<Endpoint>();
      endpoint->id = static_cast<int>(endpoints_.size());
      endpoint->link = std::make_unique<WorkerLink>(WorkerLink::Options{.address = worker.address,
                                                                        .call_deadline = options_.call_deadline,
                                                                        .min_backoff = options_.min_backoff,
                                                                        .max_backoff = options_.max_backoff});
      endpoints_.push_back(std::move(endpoint));
      known = endpoints_.end() - 1;
    }
    placement->hosted.AddAll(worker.experts);
    placement->endpoints.push_back(known->get());
    placement->workers.push_back({.id = (*known)->id, .address = worker.address, .experts = std::move(worker.experts)});
  }
  return placement;
}

absl::Status RemoteExperts::SetPlacement(std::vector<Worker> workers, absl::Duration drain_timeout) {
  if (absl::Status valid = Validate(workers); !valid.ok()) return valid;
  std::shared_ptr<const Placement> placement;
  std::weak_ptr<const Placement> previous;
  {
    absl::MutexLock lock(&placement_mu_);
    const ExpertSet& before = placement_->hosted;
    placement = MakePlacement(std::move(workers));
    for (int layer = 0; layer < options_.num_layers; ++layer) {
      for (int e = 0; e < options_.num_experts; ++e) {
        if (before.Contains(layer, e) && !placement->hosted.Contains(layer, e)) {
          return absl::FailedPreconditionError(
              absl::StrCat("layer ", layer, " expert ", e, " would have no worker: the front end does not hold it"));
        }
      }
    }
    // The observer hears of the new placement before a batch can use it.
    if (options_.observer) options_.observer->OnPlacement(placement->workers);
    previous = placement_;
    placement_ = placement;
  }
  // The batches that hold the old placement end within a call deadline or
  // two; polling them out is cheap next to loading experts.
  const absl::Time give_up = absl::Now() + drain_timeout;
  while (!previous.expired() && absl::Now() < give_up) absl::SleepFor(absl::Milliseconds(1));
  return absl::OkStatus();
}

std::shared_ptr<const RemoteExperts::Placement> RemoteExperts::CurrentPlacement() const {
  absl::MutexLock lock(&placement_mu_);
  return placement_;
}

std::vector<PlacedWorker> RemoteExperts::placement() const { return CurrentPlacement()->workers; }

ExpertSet RemoteExperts::hosted() const { return CurrentPlacement()->hosted; }

const WorkerLink& RemoteExperts::link(int worker) const {
  absl::MutexLock lock(&placement_mu_);
  return *endpoints_[worker]->link;
}

void RemoteExperts::ProbeLoop() {
  const absl::Duration period = std::max(options_.min_backoff / 2, absl::Milliseconds(10));
  absl::MutexLock lock(&stop_mu_);
  while (!stop_mu_.AwaitWithTimeout(absl::Condition(&stopping_), period)) {
    stop_mu_.Unlock();
    std::vector<Endpoint*> endpoints;
    {
      absl::MutexLock placement_lock(&placement_mu_);
      for (auto& endpoint : endpoints_) endpoints.push_back(endpoint.get());
    }
    for (Endpoint* endpoint : endpoints) {
      endpoint->link->Probe();
      NoteLinkState(*endpoint);
    }
    stop_mu_.Lock();
  }
}

void RemoteExperts::NoteLinkState(Endpoint& endpoint) const {
  if (!options_.observer) return;
  const bool up = endpoint.link->up();
  if (endpoint.reported_up.exchange(up) != up) options_.observer->OnWorkerUp(endpoint.id, up);
}

std::unique_ptr<ExpertOffload::Batch> RemoteExperts::NewBatch() const { return std::make_unique<RemoteBatch>(); }

bool RemoteExperts::Hosts(int layer, int expert) const { return CurrentPlacement()->hosted.Contains(layer, expert); }

int RemoteExperts::ChooseWorker(const Placement& placement, int layer, int expert, const std::vector<int>& excluded) {
  int best = -1;
  std::pair<int, double> best_load;
  for (int w = 0; w < static_cast<int>(placement.workers.size()); ++w) {
    const WorkerLink& link = *placement.endpoints[w]->link;
    if (!placement.workers[w].experts.Contains(layer, expert) || !link.up()) continue;
    if (std::find(excluded.begin(), excluded.end(), w) != excluded.end()) continue;
    const std::pair<int, double> load{link.in_flight(), link.recent_seconds()};
    if (best < 0 || load < best_load) {
      best = w;
      best_load = load;
    }
  }
  return best;
}

absl::Status RemoteExperts::SendCall(const RemoteBatch& batch, int worker, std::vector<int> experts, Call& call) const {
  const Job& job = batch.job;
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
  absl::StatusOr<uint64_t> id = batch.placement->endpoints[worker]->link->Send(request);
  call.sent = id.status();
  if (id.ok()) call.id = *id;
  return call.sent;
}

absl::Status RemoteExperts::Start(const Job& job, Batch& batch) const {
  auto& b = static_cast<RemoteBatch&>(batch);
  b.job = job;
  b.placement = CurrentPlacement();
  b.calls.clear();
  b.unplaced = absl::OkStatus();
  b.unplaced_experts.clear();
  const Placement& placement = *b.placement;
  // A link can go down between calls (its stream ends): the observer hears
  // of it at the next batch at the latest.
  for (Endpoint* endpoint : placement.endpoints) NoteLinkState(*endpoint);
  std::vector<std::vector<int>> by_worker(placement.workers.size());
  for (int e = 0; e < job.plan->num_experts; ++e) {
    if (job.plan->rows_of(e) == 0 || job.local->Contains(job.layer, e)) continue;
    const int w = ChooseWorker(placement, job.layer, e, {});
    if (w >= 0) {
      by_worker[w].push_back(e);
      continue;
    }
    if (b.unplaced.ok()) {
      b.unplaced =
          absl::UnavailableError(absl::StrCat("layer ", job.layer, " expert ", e, ": no worker that holds it is up"));
    }
    b.unplaced_experts.push_back(e);
  }
  for (size_t w = 0; w < by_worker.size(); ++w) {
    if (by_worker[w].empty()) continue;
    // A failed send is retried on a replica in Finish.
    SendCall(b, static_cast<int>(w), std::move(by_worker[w]), b.calls.emplace_back()).IgnoreError();
  }
  return absl::OkStatus();
}

absl::Status RemoteExperts::CompleteCall(const RemoteBatch& batch, Call call, std::vector<int>* unserved) const {
  const Job& job = batch.job;
  Endpoint& endpoint = *batch.placement->endpoints[call.worker];
  worker::ExpertRowsResponse response;
  absl::Status status = call.sent;
  if (status.ok()) status = endpoint.link->Await(call.id, &response);
  int64_t rows = 0;
  for (int e : call.experts) rows += job.plan->rows_of(e);
  if (status.ok() && (response.outputs().size() != static_cast<size_t>(rows) * job.hidden * sizeof(float) ||
                      response.expert_seconds_size() != static_cast<int>(call.experts.size()))) {
    status = absl::DataLossError(absl::StrCat("worker ", endpoint.link->address(), " answered ",
                                              response.outputs().size(), " bytes for ", rows, " rows"));
  }
  if (options_.observer) {
    options_.observer->OnCall({.worker = endpoint.id,
                               .layer = job.layer,
                               .experts = call.experts,
                               .status = status,
                               .seconds = absl::ToDoubleSeconds(absl::Now() - call.start),
                               .bytes_sent = call.bytes_sent,
                               .bytes_received = response.ByteSizeLong()});
    NoteLinkState(endpoint);
  }
  if (!status.ok()) return Reroute(batch, std::move(call), status, unserved);
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

absl::Status RemoteExperts::Reroute(const RemoteBatch& batch, Call failed, const absl::Status& why,
                                    std::vector<int>* unserved) const {
  const Placement& placement = *batch.placement;
  std::vector<int> excluded = std::move(failed.failed_workers);
  excluded.push_back(failed.worker);
  std::vector<std::vector<int>> by_worker(placement.workers.size());
  absl::Status result;
  for (int e : failed.experts) {
    const int w = ChooseWorker(placement, batch.job.layer, e, excluded);
    if (w >= 0) {
      by_worker[w].push_back(e);
      continue;
    }
    if (result.ok()) {
      result = absl::UnavailableError(absl::StrCat("layer ", batch.job.layer, " expert ", e,
                                                   ": no other worker that holds it is up (", why.message(), ")"));
    }
    unserved->push_back(e);
  }
  for (size_t w = 0; w < by_worker.size(); ++w) {
    if (by_worker[w].empty()) continue;
    if (options_.observer) {
      options_.observer->OnRetry(placement.workers[failed.worker].id, placement.workers[w].id);
    }
    Call retry;
    retry.failed_workers = excluded;
    SendCall(batch, static_cast<int>(w), std::move(by_worker[w]), retry).IgnoreError();
    absl::Status done = CompleteCall(batch, std::move(retry), unserved);
    if (result.ok()) result = done;
  }
  return result;
}

absl::Status RemoteExperts::Finish(Batch& batch, std::vector<int>* unserved) const {
  auto& b = static_cast<RemoteBatch&>(batch);
  absl::Status result = b.unplaced;
  unserved->assign(b.unplaced_experts.begin(), b.unplaced_experts.end());
  // Every call is awaited, whatever failed before it: its rows are in flight.
  for (Call& call : b.calls) {
    absl::Status done = CompleteCall(b, std::move(call), unserved);
    if (result.ok()) result = done;
  }
  b.calls.clear();
  b.placement.reset();
  return result;
}

}  // namespace moe
