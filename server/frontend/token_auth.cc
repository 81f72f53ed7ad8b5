#include "server/frontend/token_auth.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iostream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/api/status_macros.h"

namespace moe {
namespace {

constexpr absl::string_view kBearer = "bearer ";

absl::Status ErrnoStatus(int error, const std::string& what) {
  const std::string message = absl::StrCat(what, ": ", std::strerror(error));
  if (error == ENOENT) return absl::NotFoundError(message);
  if (error == EACCES) return absl::PermissionDeniedError(message);
  return absl::UnavailableError(message);
}

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Every byte of `a` is compared (against b's bytes, repeated), so the time
  // tells nothing of b: not where it differs, not its length.
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  if (b.empty()) return a.empty();
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i % b.size()]);
  }
  return diff == 0;
}

absl::StatusOr<std::unique_ptr<TokenAuthenticator>> TokenAuthenticator::Create(const Options& options) {
  if (options.token_file.empty()) return absl::InvalidArgumentError("the token file is empty");
  auto authenticator = std::unique_ptr<TokenAuthenticator>(new TokenAuthenticator(options));
  absl::MutexLock lock(&authenticator->mu_);
  RETURN_IF_ERROR(authenticator->Reload());
  if (authenticator->tokens_->empty()) {
    return absl::InvalidArgumentError(absl::StrCat("token file '", options.token_file, "' holds no token"));
  }
  authenticator->next_check_ = absl::Now() + options.reload_interval;
  return authenticator;
}

absl::Status TokenAuthenticator::Reload() {
  const std::string& path = options_.token_file;
  struct stat info;
  if (stat(path.c_str(), &info) != 0) return ErrnoStatus(errno, absl::StrCat("token file '", path, "'"));
  const FileStamp stamp{.mtime_ns = static_cast<int64_t>(info.st_mtim.tv_sec) * 1000000000 + info.st_mtim.tv_nsec,
                        .size = static_cast<int64_t>(info.st_size),
                        .inode = static_cast<uint64_t>(info.st_ino)};
  if (tokens_ != nullptr && stamp == stamp_) return absl::OkStatus();
  std::ifstream in(path);
  if (!in) return ErrnoStatus(errno, absl::StrCat("token file '", path, "'"));
  auto tokens = std::make_shared<Tokens>();
  std::string line;
  while (std::getline(in, line)) {
    const absl::string_view token = absl::StripAsciiWhitespace(line);
    if (token.empty() || token[0] == '#') continue;
    tokens->emplace_back(token);
  }
  if (in.bad()) return absl::UnavailableError(absl::StrCat("token file '", path, "': read error"));
  tokens_ = std::move(tokens);
  stamp_ = stamp;
  return absl::OkStatus();
}

std::shared_ptr<const TokenAuthenticator::Tokens> TokenAuthenticator::CurrentTokens() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  if (now >= next_check_) {
    next_check_ = now + options_.reload_interval;
    const absl::Status reloaded = Reload();
    if (!reloaded.ok() && !reload_failing_) {
      // The path and the OS error only: never a token.
      std::cerr << "moe-serve: cannot reload the token file, keeping the tokens read last: " << reloaded.message()
                << std::endl;
    }
    reload_failing_ = !reloaded.ok();
  }
  return tokens_;
}

absl::Status TokenAuthenticator::CheckAuthorization(const absl::string_view* authorization) {
  if (authorization == nullptr) {
    return absl::UnauthenticatedError("this server needs a bearer token: metadata 'authorization: Bearer <token>'");
  }
  if (authorization->size() <= kBearer.size() ||
      !absl::EqualsIgnoreCase(authorization->substr(0, kBearer.size()), kBearer)) {
    return absl::UnauthenticatedError("the 'authorization' metadata is not 'Bearer <token>'");
  }
  const absl::string_view presented = absl::StripAsciiWhitespace(authorization->substr(kBearer.size()));
  const std::shared_ptr<const Tokens> tokens = CurrentTokens();
  // Every token is compared, so the time does not tell which one matched.
  bool accepted = false;
  for (const std::string& token : *tokens) accepted |= ConstantTimeEquals(presented, token);
  if (!accepted) return absl::PermissionDeniedError("the bearer token is not accepted");
  return absl::OkStatus();
}

absl::Status TokenAuthenticator::Check(const std::multimap<grpc::string_ref, grpc::string_ref>& metadata) {
  const auto found = metadata.find("authorization");
  if (found == metadata.end()) return CheckAuthorization(nullptr);
  const absl::string_view value(found->second.data(), found->second.size());
  return CheckAuthorization(&value);
}

}  // namespace moe
