// Reading and writing .npy files (format 1.0/2.0, little-endian float32,
// C order), for moe-client's input and output. Pure functions: thread-safe.
#ifndef MOE_CLIENT_NPY_H_
#define MOE_CLIENT_NPY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moe {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

absl::StatusOr<NpyArray> ReadNpy(const std::string& path);
absl::Status WriteNpy(const std::string& path, const NpyArray& array);

}  // namespace moe

#endif  // MOE_CLIENT_NPY_H_
