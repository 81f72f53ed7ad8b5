// y[M, N] = epilogue(x[M, K] W^T) on the CPU with oneDNN, for a weight W [N, K]
// (PyTorch linear layout) packed once into oneDNN's preferred layout.
//
// Plan, then run: Create packs the weights (keeping 16-bit weights 16-bit)
// and creates one matmul primitive per row bucket (primitives are shared with
// every CpuLinear of the same shape through a CpuMatmulCache); Run only
// executes. Row counts are rounded up to a bucket (RowBucket), so the x, y and
// multiplier buffers must hold RowBucket(M) rows; the extra rows are computed
// and ignored. Run is const and thread-safe given distinct buffers.
#ifndef MOE_ENGINE_CPU_LINEAR_H_
#define MOE_ENGINE_CPU_LINEAR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/model_spec.h"
#include "engine/tensor.h"

namespace moe {

class CpuMatmulCache;

// Rows a matmul over M rows computes: exact below 16, then rounded up to 16
// (to 256), to 64 (to 1024); larger M runs as chunks of 1024 plus a bucket.
int64_t RowBucket(int64_t rows);

class CpuLinear {
 public:
  enum class Epilogue {
    kNone,
    kActivation,  // act(x W^T + b)
    kMultiply,    // (x W^T) * multiplier, elementwise with an fp32 [M, N] tensor
  };
  struct Options {
    // Dtype of x and of the packed weights: kF32 or kBF16 (default).
    DType compute = DType::kBF16;
    // Dtype of y: kF32 (default) or kBF16.
    DType output = DType::kF32;
    Epilogue epilogue = Epilogue::kNone;
    // Used when epilogue == kActivation.
    Activation activation = Activation::kSilu;
  };

  // Packs `weight` [N, K] (and `bias` [N] if given). `cache` must outlive the result.
  static absl::StatusOr<std::unique_ptr<CpuLinear>> Create(const HostTensor& weight, const HostTensor* bias,
                                                           const Options& options, CpuMatmulCache* cache);
  ~CpuLinear();

  // Runs on `rows` rows. x: [RowBucket(rows), K], y: [RowBucket(rows), N],
  // multiplier (kMultiply only): [RowBucket(rows), N] fp32, all row-major
  // and dense. `scratchpad` must hold scratchpad_bytes().
  void Run(const void* x, int64_t rows, void* y, const float* multiplier, void* scratchpad) const;

  int64_t in_features() const;
  int64_t out_features() const;
  size_t scratchpad_bytes() const;
  // Bytes of packed weights (and bias).
  size_t weight_bytes() const;

 private:
  struct Impl;
  friend struct CpuLinearInternals;
  explicit CpuLinear(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Primitives shared by every CpuLinear of the same shape and options.
// Thread-safe.
class CpuMatmulCache {
 public:
  CpuMatmulCache();
  ~CpuMatmulCache();
  // Number of primitives created so far.
  size_t size() const;
  // The implementation oneDNN chose for the last created primitive (e.g.
  // "brg:avx512_core_bf16"), for reports.
  std::string last_implementation() const;

 private:
  friend class CpuLinear;
  friend struct CpuLinearInternals;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe

#endif  // MOE_ENGINE_CPU_LINEAR_H_
