// Listing a directory without exceptions. std::filesystem's iterators throw
// when a directory cannot be read (no permission, removed while listed, not
// a directory) and so does an entry's type when its status cannot be read
// (a symlink loop); model loading must turn both into a Status naming the
// path, since no exception may cross a module boundary. Every loader lists
// directories through ListDirectory. Stateless: safe from any thread.
#ifndef MOE_ENGINE_API_DIRECTORY_H_
#define MOE_ENGINE_API_DIRECTORY_H_

#include <filesystem>
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

struct DirectoryEntry {
  std::filesystem::path path;  // the directory's path / the entry's name
  // Whether it is a directory, following symlinks; false for anything
  // whose status cannot be read (a dangling link, a link loop).
  bool is_directory = false;
};

// The entries of `dir`, in no particular order. A directory that cannot be
// listed is an error naming `dir` and the OS's reason: NOT_FOUND when it
// does not exist or is not a directory, PERMISSION_DENIED when it may not
// be read, else the code Abseil gives the OS error (absl::ErrnoToStatusCode).
absl::StatusOr<std::vector<DirectoryEntry>> ListDirectory(const std::filesystem::path& dir);

}  // namespace moe

#endif  // MOE_ENGINE_API_DIRECTORY_H_
