// A host tensor: dtype, shape and bytes, either owned or borrowed from a
// memory-mapped file that it keeps alive. Immutable after construction, so it is
// safe to read from any number of threads.
#ifndef MOE_ENGINE_API_TENSOR_H_
#define MOE_ENGINE_API_TENSOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/api/dtype.h"

namespace moe {

class HostTensor {
 public:
  HostTensor() = default;

  // A tensor owning a copy of `values` converted to `dtype`.
  static HostTensor FromFloats(std::vector<int64_t> shape, const std::vector<float>& values, DType dtype = DType::kF32);
  // A tensor viewing `data`; `owner` keeps the bytes alive (e.g. a file mapping).
  static HostTensor Borrow(DType dtype, std::vector<int64_t> shape, const void* data,
                           std::shared_ptr<const void> owner);

  DType dtype() const { return dtype_; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_[i]; }
  size_t rank() const { return shape_.size(); }
  int64_t num_elements() const;
  size_t num_bytes() const { return static_cast<size_t>(num_elements()) * DTypeSize(dtype_); }
  const void* data() const { return data_; }
  bool empty() const { return data_ == nullptr; }

  // The index-th sub-tensor along dimension 0 (a view sharing ownership).
  HostTensor Index0(int64_t index) const;
  // Rows [begin, begin + count) along dimension 0 (a view sharing ownership).
  HostTensor Rows(int64_t begin, int64_t count) const;
  // The values as fp32.
  std::vector<float> ToFloats() const;
  // "[8, 64]".
  std::string ShapeString() const;

 private:
  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  const void* data_ = nullptr;
  std::shared_ptr<const void> owner_;
};

// "[8, 64]".
std::string ShapeToString(const std::vector<int64_t>& shape);

// The transpose of a 2-D tensor: an owned copy in its dtype.
HostTensor Transposed(const HostTensor& matrix);

}  // namespace moe

#endif  // MOE_ENGINE_API_TENSOR_H_
