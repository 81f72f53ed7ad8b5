#include "server/frontend/tls_credentials.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/api/status_macros.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"

namespace moe {
namespace {

// gRPC's watcher looks at the files this often (its minimum).
constexpr unsigned kRefreshIntervalSeconds = 1;

// The file's text, which holds a PEM block; its contents are never part of
// a message.
absl::StatusOr<std::string> ReadPemFile(const std::string& path, const char* what) {
  std::ifstream in(path);
  if (!in) {
    const std::string message = absl::StrCat("cannot read the TLS ", what, " '", path, "': ", std::strerror(errno));
    return errno == ENOENT ? absl::NotFoundError(message) : absl::PermissionDeniedError(message);
  }
  std::stringstream text;
  text << in.rdbuf();
  if (text.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("the TLS ", what, " '", path, "' holds no PEM block"));
  }
  return text.str();
}

absl::Status CheckPemFile(const std::string& path, const char* what) { return ReadPemFile(path, what).status(); }

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFor(const TlsFiles& files) {
  if (files.cert_file.empty() && files.key_file.empty()) {
    if (!files.ca_file.empty()) {
      return absl::InvalidArgumentError("a TLS CA needs the server's certificate and key too");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert_file.empty() || files.key_file.empty()) {
    return absl::InvalidArgumentError("TLS needs both the certificate and the key");
  }
  RETURN_IF_ERROR(CheckPemFile(files.cert_file, "certificate"));
  RETURN_IF_ERROR(CheckPemFile(files.key_file, "key"));
  if (!files.ca_file.empty()) RETURN_IF_ERROR(CheckPemFile(files.ca_file, "CA"));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key_file, files.cert_file, files.ca_file, kRefreshIntervalSeconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (files.ca_file.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(const TlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError("a TLS certificate needs its key, and a key its certificate");
  }
  grpc::SslCredentialsOptions options;
  if (!files.ca_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadPemFile(files.ca_file, "CA"));
  }
  if (!files.cert_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPemFile(files.cert_file, "certificate"));
    ASSIGN_OR_RETURN(options.pem_private_key, ReadPemFile(files.key_file, "key"));
  }
  return grpc::SslCredentials(options);
}

}  // namespace moe
