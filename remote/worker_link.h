// WorkerLink: a front end's connection to one moe-worker
// (proto/expert_worker.proto): one long-lived bidirectional stream that
// carries every request, a reader thread that hands each response to the
// caller awaiting its id. A link that fails (the stream breaks, a response
// misses its deadline) is down: what was awaited fails with UNAVAILABLE or
// DEADLINE_EXCEEDED, and Send refuses at once. Probe, called by the owner
// from its own thread, asks a down worker whether it is back (Describe)
// once its backoff has elapsed (doubling from min_backoff to max_backoff):
// a worker that answers is up again, and the next Send opens a new stream.
// Requests never wait on a dead worker's probing.
//
// Thread-safe: any number of callers may Send and Await at once.
#ifndef MOE_REMOTE_WORKER_LINK_H_
#define MOE_REMOTE_WORKER_LINK_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/expert_worker.grpc.pb.h"

namespace moe {

// The credentials of every channel this process opens to a worker (the
// links, and the placement admin's calls): plaintext unless set, e.g. to
// TLS by moe-serve's --worker_tls_* flags. Set it before the first link is
// made; links made earlier keep theirs. Thread-safe.
void SetWorkerChannelCredentials(std::shared_ptr<grpc::ChannelCredentials> credentials);
std::shared_ptr<grpc::ChannelCredentials> WorkerChannelCredentials();

class WorkerLink {
 public:
  struct Options {
    // host:port of the worker.
    std::string address;
    // How long a response may take before the link is declared down. 5 s.
    absl::Duration call_deadline = absl::Seconds(5);
    // Wait before the first reconnection attempt, doubled after each failed
    // one up to max_backoff. 100 ms and 5 s.
    absl::Duration min_backoff = absl::Milliseconds(100);
    absl::Duration max_backoff = absl::Seconds(5);
  };

  explicit WorkerLink(const Options& options);
  ~WorkerLink();

  // Sends `request` under a fresh id (set in it) and returns the id to
  // Await. UNAVAILABLE, with the last failure, while the link is down, or
  // when the stream will not take it (the link is then down).
  absl::StatusOr<uint64_t> Send(worker::ExpertRowsRequest& request) ABSL_LOCKS_EXCLUDED(mu_);
  // Waits for the response to `id` (at most call_deadline). The worker's own
  // error, if it answered one; UNAVAILABLE or DEADLINE_EXCEEDED, naming the
  // worker, when the link failed (it is then down).
  absl::Status Await(uint64_t id, worker::ExpertRowsResponse* response) ABSL_LOCKS_EXCLUDED(mu_);

  // When the link is down and its backoff has elapsed, asks the worker
  // (Describe, within min(call_deadline, 1 s)) and brings the link up if it
  // answers; otherwise the backoff doubles.
  void Probe() ABSL_LOCKS_EXCLUDED(mu_);

  const std::string& address() const { return options_.address; }
  // Up: the last stream works (or none was tried yet).
  bool up() const ABSL_LOCKS_EXCLUDED(mu_);
  // Requests sent and not yet awaited to the end.
  int in_flight() const ABSL_LOCKS_EXCLUDED(mu_);
  // Seconds of the last answered request, smoothed (0 before the first).
  double recent_seconds() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Pending {
    bool done = false;
    absl::Status status;
    worker::ExpertRowsResponse response;
    absl::Time sent;
  };
  // One stream and the thread reading it.
  struct Stream {
    grpc::ClientContext context;
    std::unique_ptr<grpc::ClientReaderWriter<worker::ExpertRowsRequest, worker::ExpertRowsResponse>> stream;
    std::thread reader;
    std::atomic<bool> finished{false};  // the reader needs nothing held any more
  };

  absl::Status EnsureStream() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Schedules the next probe one backoff from now, and doubles the backoff.
  void Backoff() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void ReadLoop(Stream* stream) ABSL_LOCKS_EXCLUDED(mu_);
  // Marks the link down for `why`, fails what is awaited, cancels the stream.
  void MarkDown(const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<worker::ExpertWorker::Stub> stub_;
  mutable absl::Mutex mu_;
  absl::Mutex write_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool up_ ABSL_GUARDED_BY(mu_) = true;
  absl::Status last_failure_ ABSL_GUARDED_BY(mu_);
  absl::Time next_attempt_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  absl::Duration backoff_ ABSL_GUARDED_BY(mu_);
  double recent_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  // The current stream, and those ended but whose reader has not been joined.
  std::unique_ptr<Stream> stream_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<Stream>> retired_ ABSL_GUARDED_BY(mu_);
};

}  // namespace moe

#endif  // MOE_REMOTE_WORKER_LINK_H_
