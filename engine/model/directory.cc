#include "engine/api/directory.h"

#include <system_error>

#include "absl/strings/str_cat.h"

namespace moe {
namespace fs = std::filesystem;

namespace {

absl::Status ListError(const fs::path& dir, const std::error_code& error) {
  const std::string message = absl::StrCat(dir.string(), ": cannot list the directory: ", error.message());
  if (error == std::errc::no_such_file_or_directory || error == std::errc::not_a_directory) {
    return absl::NotFoundError(message);
  }
  if (error == std::errc::permission_denied || error == std::errc::operation_not_permitted) {
    return absl::PermissionDeniedError(message);
  }
  return absl::Status(absl::ErrnoToStatusCode(error.value()), message);
}

}  // namespace

absl::StatusOr<std::vector<DirectoryEntry>> ListDirectory(const fs::path& dir) {
  std::error_code error;
  fs::directory_iterator it(dir, error);
  if (error) return ListError(dir, error);
  std::vector<DirectoryEntry> entries;
  for (const fs::directory_iterator end; it != end; it.increment(error)) {
    if (error) return ListError(dir, error);
    std::error_code ignored;  // an entry whose status cannot be read is not a directory
    entries.push_back({.path = it->path(), .is_directory = it->is_directory(ignored)});
  }
  if (error) return ListError(dir, error);
  return entries;
}

}  // namespace moe
