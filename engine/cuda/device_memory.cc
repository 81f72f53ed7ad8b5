#include "engine/cuda/device_memory.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/api/dtype.h"
#include "engine/api/quantized.h"

namespace moe::cuda {
namespace {

// Each half of the uploader's staging buffer.
constexpr size_t kStagingHalfBytes = size_t{16} << 20;

float ValueAt(const HostTensor& tensor, int64_t index) {
  switch (tensor.dtype()) {
    case DType::kF32:
      return static_cast<const float*>(tensor.data())[index];
    case DType::kBF16:
      return Bf16ToFloat(static_cast<const uint16_t*>(tensor.data())[index]);
    case DType::kF16:
      return F16ToFloat(static_cast<const uint16_t*>(tensor.data())[index]);
    case DType::kF8E4M3:
      return E4m3ToFloat(static_cast<const uint8_t*>(tensor.data())[index]);
    case DType::kU8:
      return static_cast<const uint8_t*>(tensor.data())[index];
  }
  return 0.0f;
}

}  // namespace

absl::Status CudaStatus(cudaError_t error, absl::string_view what) {
  if (error == cudaSuccess) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": CUDA error ", cudaGetErrorName(error), " (", cudaGetErrorString(error), ")");
  switch (error) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasStatus(cublasStatus_t status, absl::string_view what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  const std::string message =
      absl::StrCat(what, ": cuBLAS error ", cublasGetStatusName(status), " (", cublasGetStatusString(status), ")");
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

std::string AllocationWhat(size_t bytes, bool device, absl::string_view what) {
  return absl::StrCat("allocating ", bytes, " bytes of ", device ? "device memory" : "pinned host memory", " for ",
                      what);
}

void ConvertValues(const HostTensor& tensor, int64_t first, int64_t count, Storage storage, void* out) {
  const size_t source_bytes = DTypeSize(tensor.dtype());
  const bool same = (storage == Storage::kF32 && tensor.dtype() == DType::kF32) ||
                    (storage == Storage::kBF16 && tensor.dtype() == DType::kBF16);
  if (same) {
    std::memcpy(out, static_cast<const char*>(tensor.data()) + first * source_bytes, count * source_bytes);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const float value = ValueAt(tensor, first + i);
    if (storage == Storage::kF32) {
      static_cast<float*>(out)[i] = value;
    } else {
      static_cast<uint16_t*>(out)[i] = FloatToBf16(value);
    }
  }
}

absl::StatusOr<WeightUploader> WeightUploader::Create() {
  WeightUploader uploader;
  auto staging = PinnedBuffer::Allocate(2 * kStagingHalfBytes, "weight staging");
  if (!staging.ok()) return staging.status();
  uploader.staging_ = std::move(staging).value();
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&uploader.stream_, cudaStreamNonBlocking), "upload stream");
  for (cudaEvent_t& event : uploader.done_) {
    MOE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "upload event");
  }
  return uploader;
}

WeightUploader::WeightUploader(WeightUploader&& other) noexcept
    : staging_(std::move(other.staging_)), stream_(std::exchange(other.stream_, nullptr)), half_(other.half_) {
  for (int i = 0; i < 2; ++i) done_[i] = std::exchange(other.done_[i], nullptr);
}

WeightUploader::~WeightUploader() {
  if (stream_) cudaStreamSynchronize(stream_);
  for (cudaEvent_t event : done_) {
    if (event) cudaEventDestroy(event);
  }
  if (stream_) cudaStreamDestroy(stream_);
}

absl::Status WeightUploader::Upload(const HostTensor& tensor, Storage storage, void* destination) {
  const size_t value_bytes = StorageBytes(storage);
  const int64_t per_chunk = static_cast<int64_t>(kStagingHalfBytes / value_bytes);
  const int64_t total = tensor.num_elements();
  for (int64_t first = 0; first < total; first += per_chunk) {
    const int64_t count = std::min(per_chunk, total - first);
    // This half's previous copy must have left it before it is refilled.
    MOE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done_[half_]), "weight upload");
    char* half = staging_.as<char>() + half_ * kStagingHalfBytes;
    ConvertValues(tensor, first, count, storage, half);
    MOE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(destination) + first * value_bytes, half,
                                             count * value_bytes, cudaMemcpyHostToDevice, stream_),
                             "weight upload");
    MOE_CUDA_RETURN_IF_ERROR(cudaEventRecord(done_[half_], stream_), "weight upload");
    half_ ^= 1;
  }
  return absl::OkStatus();
}

absl::Status WeightUploader::Wait() {
  MOE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_), "weight upload");
  return absl::OkStatus();
}

}  // namespace moe::cuda
