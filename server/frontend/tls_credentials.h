// TLS for a gRPC listening port: the server's certificate and key, and with
// a CA, client certificates required and checked against it (mutual TLS).
// The files are watched by gRPC (FileWatcherCertificateProvider) and read
// again when they change, so certificates are rotated without a restart:
// new connections get the new ones, open connections keep theirs. To
// replace a certificate and its key together, swap a directory (or a
// symlink to one) holding both, as a Kubernetes Secret volume does;
// replaced one by one, the pair in between is skipped until both match.
//
// Pure functions: thread-safe.
#ifndef MOE_SERVER_FRONTEND_TLS_CREDENTIALS_H_
#define MOE_SERVER_FRONTEND_TLS_CREDENTIALS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace moe {

struct TlsFiles {
  // PEM certificate chain and private key of the server; both or neither.
  // Neither: plaintext.
  std::string cert_file{};
  std::string key_file{};
  // PEM CA bundle; when given, clients must present a certificate it signed.
  std::string ca_file{};
};

// Plaintext credentials without files; TLS (mutual with a CA) with them.
// INVALID_ARGUMENT when only one of cert and key is given, or a CA without
// them; NOT_FOUND (or the OS's reason) when a file cannot be read;
// INVALID_ARGUMENT when one holds no PEM block.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(const TlsFiles& files);

// TLS channel credentials for calls to a TLS server: `ca_file` the roots
// its certificate must chain to (empty: the system's), `cert_file` and
// `key_file` this side's certificate for mutual TLS (both or neither). Read
// once. NOT_FOUND naming a file that cannot be read, INVALID_ARGUMENT for
// a certificate without key or a file without a PEM block.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(const TlsFiles& files);

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_TLS_CREDENTIALS_H_
