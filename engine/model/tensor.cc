#include "engine/api/tensor.h"

#include <functional>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace moe {

HostTensor HostTensor::FromFloats(std::vector<int64_t> shape, const std::vector<float>& values, DType dtype) {
  auto bytes = std::make_shared<std::vector<std::byte>>(values.size() * DTypeSize(dtype));
  ConvertFromFloat(dtype, values.data(), values.size(), bytes->data());
  HostTensor tensor;
  tensor.dtype_ = dtype;
  tensor.shape_ = std::move(shape);
  tensor.data_ = bytes->data();
  tensor.owner_ = std::move(bytes);
  return tensor;
}

HostTensor HostTensor::Borrow(DType dtype, std::vector<int64_t> shape, const void* data,
                              std::shared_ptr<const void> owner) {
  HostTensor tensor;
  tensor.dtype_ = dtype;
  tensor.shape_ = std::move(shape);
  tensor.data_ = data;
  tensor.owner_ = std::move(owner);
  return tensor;
}

int64_t HostTensor::num_elements() const {
  return std::accumulate(shape_.begin(), shape_.end(), int64_t{1}, std::multiplies<>());
}

HostTensor HostTensor::Index0(int64_t index) const {
  std::vector<int64_t> inner(shape_.begin() + 1, shape_.end());
  HostTensor view = Rows(index, 1);
  view.shape_ = std::move(inner);
  return view;
}

HostTensor HostTensor::Rows(int64_t begin, int64_t count) const {
  std::vector<int64_t> shape = shape_;
  const int64_t row_elements = shape[0] == 0 ? 0 : num_elements() / shape[0];
  shape[0] = count;
  const auto* base = static_cast<const std::byte*>(data_);
  return Borrow(dtype_, std::move(shape), base + static_cast<size_t>(begin * row_elements) * DTypeSize(dtype_), owner_);
}

std::vector<float> HostTensor::ToFloats() const {
  std::vector<float> out(static_cast<size_t>(num_elements()));
  ConvertToFloat(dtype_, data_, out.size(), out.data());
  return out;
}

std::string HostTensor::ShapeString() const { return ShapeToString(shape_); }

std::string ShapeToString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

HostTensor Transposed(const HostTensor& matrix) {
  const int64_t rows = matrix.dim(0), cols = matrix.dim(1);
  const std::vector<float> values = matrix.ToFloats();
  std::vector<float> out(values.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c)
      out[static_cast<size_t>(c * rows + r)] = values[static_cast<size_t>(r * cols + c)];
  }
  return HostTensor::FromFloats({cols, rows}, out, matrix.dtype());
}

}  // namespace moe
