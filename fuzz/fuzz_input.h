// Helpers of the fuzz targets: the input as a file (memfd, no disk) for the
// APIs that read paths, and the path of that file. One per process (the
// fuzzers run one input at a time).
#ifndef MOE_FUZZ_FUZZ_INPUT_H_
#define MOE_FUZZ_FUZZ_INPUT_H_

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace moe::fuzz {

// Writes `data` to a memory file and returns its path (/proc/self/fd/N),
// the same file each call, truncated to the input.
inline std::string AsFile(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("moe-fuzz-input", 0);
  if (fd < 0) abort();
  if (ftruncate(fd, 0) != 0 || (size > 0 && pwrite(fd, data, size, 0) != static_cast<ssize_t>(size))) abort();
  return "/proc/self/fd/" + std::to_string(fd);
}

}  // namespace moe::fuzz

#endif  // MOE_FUZZ_FUZZ_INPUT_H_
