// Device and pinned host memory for the CUDA executor, owned RAII-style, the
// translation of CUDA and cuBLAS errors to absl::Status, and the uploader
// that moves host tensors (memory-mapped checkpoints) to the device through
// one small pinned staging buffer. Private to engine/cuda/.
//
// Thread-safety: a buffer is owned by one object; the uploader serves one
// caller at a time.
#ifndef MOE_ENGINE_CUDA_DEVICE_MEMORY_H_
#define MOE_ENGINE_CUDA_DEVICE_MEMORY_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/api/tensor.h"
#include "engine/cuda/kernels.h"

namespace moe::cuda {

// OK, or the error named with `what`: RESOURCE_EXHAUSTED for memory,
// UNAVAILABLE when there is no usable device, INTERNAL otherwise.
absl::Status CudaStatus(cudaError_t error, absl::string_view what);
absl::Status CublasStatus(cublasStatus_t status, absl::string_view what);
// "allocating N bytes of device memory for WHAT" (or pinned host memory).
std::string AllocationWhat(size_t bytes, bool device, absl::string_view what);

#define MOE_CUDA_RETURN_IF_ERROR(expr, what)                                       \
  do {                                                                             \
    const absl::Status _moe_cuda_status = ::moe::cuda::CudaStatus((expr), (what)); \
    if (!_moe_cuda_status.ok()) return _moe_cuda_status;                           \
  } while (false)
#define MOE_CUBLAS_RETURN_IF_ERROR(expr, what)                                         \
  do {                                                                                 \
    const absl::Status _moe_cublas_status = ::moe::cuda::CublasStatus((expr), (what)); \
    if (!_moe_cublas_status.ok()) return _moe_cublas_status;                           \
  } while (false)

// Device memory (cudaMalloc) or pinned, device-visible host memory
// (cudaMallocHost), freed with the object.
enum class MemoryKind { kDevice, kPinnedHost };

template <MemoryKind kind>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  CudaBuffer& operator=(CudaBuffer&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(bytes_, other.bytes_);
    return *this;
  }
  ~CudaBuffer() {
    if (data_) kind == MemoryKind::kDevice ? cudaFree(data_) : cudaFreeHost(data_);
  }
  // RESOURCE_EXHAUSTED, naming the bytes and `what`, when there is no room.
  static absl::StatusOr<CudaBuffer> Allocate(size_t bytes, absl::string_view what) {
    CudaBuffer buffer;
    if (bytes == 0) return buffer;
    const cudaError_t error =
        kind == MemoryKind::kDevice ? cudaMalloc(&buffer.data_, bytes) : cudaMallocHost(&buffer.data_, bytes);
    if (error != cudaSuccess) {
      buffer.data_ = nullptr;
      return CudaStatus(error, AllocationWhat(bytes, kind == MemoryKind::kDevice, what));
    }
    buffer.bytes_ = bytes;
    return buffer;
  }

  void* get() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};
using DeviceBuffer = CudaBuffer<MemoryKind::kDevice>;
using PinnedBuffer = CudaBuffer<MemoryKind::kPinnedHost>;

// Copies host tensors to device memory, converted to a storage type, in
// chunks through two pinned staging halves (one fills while the other is
// copied), so a model streams from its mapped files without a second host
// copy. Not thread-safe.
class WeightUploader {
 public:
  static absl::StatusOr<WeightUploader> Create();
  WeightUploader(WeightUploader&& other) noexcept;
  ~WeightUploader();

  // Writes `tensor`'s values, converted to `storage`, to `destination`
  // (device memory of tensor.num_elements() values of that storage).
  absl::Status Upload(const HostTensor& tensor, Storage storage, void* destination);
  // Waits for every upload to land.
  absl::Status Wait();

 private:
  WeightUploader() = default;
  PinnedBuffer staging_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t done_[2] = {nullptr, nullptr};
  int half_ = 0;
};

// One host value as `storage` bytes: fp32, or bf16 rounded to nearest even.
void ConvertValues(const HostTensor& tensor, int64_t first, int64_t count, Storage storage, void* out);

}  // namespace moe::cuda

#endif  // MOE_ENGINE_CUDA_DEVICE_MEMORY_H_
