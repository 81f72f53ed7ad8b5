// TokenAuthenticator: bearer-token access to the gRPC services. Clients send
// "authorization: Bearer <token>" metadata; the token must be one of the
// lines of a file. The file is read again when it changes (its modification
// time, size or inode; a Kubernetes Secret update swaps it), looked at no
// more than once per reload interval, so tokens are added and revoked
// without a restart. A file that cannot be read again keeps the tokens read
// last. Tokens are compared in constant time, and neither a token nor the
// metadata that carried it is ever logged or put in a status.
//
// Thread-safe.
#ifndef MOE_SERVER_FRONTEND_TOKEN_AUTH_H_
#define MOE_SERVER_FRONTEND_TOKEN_AUTH_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/support/string_ref.h"

namespace moe {

class TokenAuthenticator {
 public:
  struct Options {
    // One token per line; blank lines and lines starting with '#' are
    // skipped, spaces around a token ignored. Required.
    std::string token_file{};
    // How often, at most, the file is looked at for a change. 1 s.
    absl::Duration reload_interval = absl::Seconds(1);
  };

  // Reads the file: NOT_FOUND or PERMISSION_DENIED when it cannot be read,
  // INVALID_ARGUMENT when it holds no token.
  static absl::StatusOr<std::unique_ptr<TokenAuthenticator>> Create(const Options& options);

  // Whether a call with `metadata` may proceed: OK; UNAUTHENTICATED when it
  // carries no bearer token; PERMISSION_DENIED when the token is not one of
  // the file's.
  absl::Status Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // Check for the value of the "authorization" entry (null: none).
  absl::Status CheckAuthorization(const absl::string_view* authorization) ABSL_LOCKS_EXCLUDED(mu_);
  // What identifies a version of the file.
  struct FileStamp {
    int64_t mtime_ns = 0;
    int64_t size = 0;
    uint64_t inode = 0;
    bool operator==(const FileStamp& other) const {
      return mtime_ns == other.mtime_ns && size == other.size && inode == other.inode;
    }
  };
  using Tokens = std::vector<std::string>;

  explicit TokenAuthenticator(const Options& options) : options_(options) {}
  // Reads the tokens when the file changed since they were read last.
  absl::Status Reload() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The current tokens, reloaded first when the interval has passed.
  std::shared_ptr<const Tokens> CurrentTokens() ABSL_LOCKS_EXCLUDED(mu_);

  const Options options_;
  absl::Mutex mu_;
  std::shared_ptr<const Tokens> tokens_ ABSL_GUARDED_BY(mu_);
  FileStamp stamp_ ABSL_GUARDED_BY(mu_);
  absl::Time next_check_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Whether the last reload failed (said once on stderr, until one works).
  bool reload_failing_ ABSL_GUARDED_BY(mu_) = false;
};

// Whether `a` and `b` are equal, in a time that depends only on a's length.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_TOKEN_AUTH_H_
