// Reading and writing the safetensors format (8-byte little-endian header length,
// a JSON header, then the tensor bytes).
//
// SafetensorsFile memory-maps a file read-only and validates the whole header
// before anything is read: JSON syntax, known dtypes, non-negative shapes,
// shape x dtype size equal to the byte range, ranges inside the file and not
// overlapping. Every error names the file and the tensor. Immutable after Open,
// so safe to read from any number of threads; tensors it hands out keep the
// mapping alive.
#ifndef MOE_ENGINE_LOADING_SAFETENSORS_H_
#define MOE_ENGINE_LOADING_SAFETENSORS_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/tensor.h"

namespace moe {

class SafetensorsFile {
 public:
  // Maps and validates `path`.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool Has(const std::string& name) const { return entries_.count(name) > 0; }
  std::vector<std::string> Names() const;

  // The named tensor as a view into the mapping. NOT_FOUND if absent;
  // INVALID_ARGUMENT if its dtype is not F32, BF16 or F16.
  absl::StatusOr<HostTensor> Get(const std::string& name) const;

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    size_t begin = 0;  // absolute byte offsets in the file
    size_t end = 0;
  };
  SafetensorsFile() = default;
  absl::Status ParseHeader();

  std::string path_;
  const std::byte* base_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, Entry> entries_;
  std::weak_ptr<const SafetensorsFile> self_;
};

// A tensor to write.
struct NamedTensor {
  std::string name;
  HostTensor tensor;
};

// Writes `tensors` to `path` in the safetensors format (tensors in the given order).
absl::Status WriteSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors);

}  // namespace moe

#endif  // MOE_ENGINE_LOADING_SAFETENSORS_H_
