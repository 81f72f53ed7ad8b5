// One MoE layer on the CUDA executor against the GPU's limits, measured in
// the same run: for a Mixtral-sized layer (hidden 4096, intermediate 14336,
// 8 experts, top-2) and a DeepSeek-V3-sized one (hidden 7168, intermediate
// 2048, 256 experts, top-8, sigmoid group routing 8/4, one shared expert),
// with bf16 experts and with FP8 (128 x 128 blocks) and MXFP4 ones kept
// quantized on the device, at T = 1 to 16384 tokens, it prints per T:
//   - the layer's time (Begin .. Finish, input and output on the device),
//     tokens/s and TFLOP/s of its expert products;
//   - the same FLOPs as one dense cuBLAS bf16 GEMM (the compute reference),
//     and the ratio;
//   - the bytes of the experts the batch selected over the layer's time, as
//     a fraction of a device-to-device copy's bandwidth (the HBM reference).
// The DeepSeek-sized layer's 256 experts repeat the weights of 8 (each
// uploaded as its own copy), as drawing 11 G random weights would take
// minutes. Lines are tab-separated with a header, for scripts/gpu_check.sh to join
// with the PyTorch peer (bench/cuda_torch_peer.py).
//
//   build/bench/cuda_bench [--shape=mixtral|deepseek] [--formats=bf16,fp8,mxfp4] [--tokens=1,16,4096]
//
// Without a CUDA device it says so and exits 77.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "engine/api/router.h"
#include "engine/api/status_macros.h"

ABSL_FLAG(std::string, shape, "mixtral,deepseek", "layer shapes: mixtral, deepseek");
ABSL_FLAG(std::string, tokens, "1,2,4,8,16,64,256,1024,4096,16384", "batch sizes");
ABSL_FLAG(std::string, formats, "bf16,fp8,mxfp4", "expert weights: bf16, fp8 or mxfp4");
ABSL_FLAG(int, iterations, 20, "timed runs per batch size (the median is printed)");

namespace moe {
namespace {

struct Shape {
  std::string name;
  ModelSpec spec;
};

Shape MixtralSized() {
  ModelSpec spec;
  spec.name = "mixtral_sized";
  spec.hidden_size = 4096;
  spec.intermediate_size = 14336;
  spec.router.num_experts = 8;
  spec.router.top_k = 2;
  spec.router.norm_topk_prob = true;
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = DType::kBF16;
  return {"mixtral", spec};
}

Shape DeepSeekV3Sized() {
  ModelSpec spec;
  spec.name = "deepseek_v3_sized";
  spec.hidden_size = 7168;
  spec.intermediate_size = 2048;
  spec.shared_intermediate_size = 2048;
  spec.router.kind = RouterKind::kSigmoidGroupTopK;
  spec.router.num_experts = 256;
  spec.router.top_k = 8;
  spec.router.n_group = 8;
  spec.router.topk_group = 4;
  spec.router.norm_topk_prob = true;
  spec.router.routed_scaling_factor = 2.5f;
  spec.pre_norm = true;
  spec.residual = true;
  spec.weight_dtype = DType::kBF16;
  return {"deepseek", spec};
}

// A layer of `spec` whose routed experts repeat the weights of a few
// (distinct copies on the device all the same), quantized in `format`
// unless kNone: random bytes for 256 DeepSeek-sized experts would take
// minutes to draw.
absl::StatusOr<ModelDefinition> LayerWithRepeatedExperts(const ModelSpec& spec, int distinct, QuantFormat format) {
  ModelSpec few = spec;
  few.router.num_experts = std::min(distinct, spec.router.num_experts);
  few.router.n_group = 1;
  few.router.topk_group = 1;
  few.router.top_k = 1;
  ModelDefinition experts = GenerateRandomModel(few, 1, 7);
  if (format != QuantFormat::kNone) RETURN_IF_ERROR(QuantizeExperts(format, &experts));
  ModelSpec narrow = spec;  // the router, bias, norm and shared expert at full size
  narrow.intermediate_size = 16;
  ModelDefinition model = GenerateRandomModel(narrow, 1, 8);
  model.spec = spec;
  model.spec.expert_format = format;
  std::vector<FfnWeights>& routed = model.layers[0].experts;
  for (int e = 0; e < spec.router.num_experts; ++e) routed[e] = experts.layers[0].experts[e % few.router.num_experts];
  return model;
}

double MedianOf(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// Device-to-device copy bandwidth (bytes read + written per second).
double CopyBandwidth() {
  const size_t bytes = size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  cudaMalloc(&a, bytes);
  cudaMalloc(&b, bytes);
  std::vector<double> seconds;
  for (int i = 0; i < 10; ++i) {
    const auto start = std::chrono::steady_clock::now();
    cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / MedianOf(seconds);
}

// TFLOP/s of one dense bf16 GEMM [m, k] x [k, n] with fp32 accumulation.
double DenseTflops(cublasHandle_t blas, int64_t m, int64_t n, int64_t k) {
  void *a = nullptr, *b = nullptr, *c = nullptr;
  cudaMalloc(&a, m * k * 2);
  cudaMalloc(&b, k * n * 2);
  cudaMalloc(&c, m * n * 2);
  cudaMemset(a, 0, m * k * 2);
  cudaMemset(b, 0, k * n * 2);
  const float one = 1.0f, zero = 0.0f;
  std::vector<double> seconds;
  for (int i = 0; i < 12; ++i) {
    const auto start = std::chrono::steady_clock::now();
    cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_16BF, k, a, CUDA_R_16BF, k, &zero, c,
                 CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cudaDeviceSynchronize();
    if (i >= 2) seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * m * n * k / MedianOf(seconds) / 1e12;
}

// Bytes of one routed expert's matrices as the device reads them.
size_t ExpertBytes(const FfnWeights& ffn) {
  if (ffn.quantized()) return ffn.q1.stored_bytes() + ffn.q3.stored_bytes() + ffn.q2.stored_bytes();
  return ffn.w1.num_bytes() + ffn.w3.num_bytes() + ffn.w2.num_bytes();
}

void RunShape(const Shape& shape, QuantFormat format, const std::vector<int>& token_counts, int iterations,
              double copy_bandwidth, cublasHandle_t blas) {
  const ModelSpec& spec = shape.spec;
  // bf16 rows keep the shape's name (scripts/gpu_check.sh joins them with the peer's).
  const std::string name =
      format == QuantFormat::kNone ? shape.name : shape.name + "_" + std::string(QuantFormatName(format));
  std::fprintf(stderr, "cuda_bench: generating the %s layer...\n", name.c_str());
  auto definition = LayerWithRepeatedExperts(spec, 8, format);
  auto executor = definition.ok()
                      ? CreateExecutor(*definition, {.kind = "cuda", .compute = DType::kBF16, .held = std::nullopt})
                      : definition.status();
  if (!executor.ok()) {
    std::fprintf(stderr, "cuda_bench: %s\n", std::string(executor.status().message()).c_str());
    return;
  }
  const int max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  auto workspace = (*executor)->NewWorkspace(max_tokens);
  if (!workspace.ok()) {
    std::fprintf(stderr, "cuda_bench: %s\n", std::string(workspace.status().message()).c_str());
    return;
  }
  const int64_t d = spec.hidden_size, inner = spec.intermediate_size, k = spec.router.top_k;
  const size_t expert_bytes = ExpertBytes(definition->layers[0].experts[0]);
  float *input = nullptr, *output = nullptr;
  cudaMalloc(&input, max_tokens * d * sizeof(float));
  cudaMalloc(&output, max_tokens * d * sizeof(float));
  cudaMemset(input, 0, max_tokens * d * sizeof(float));
  std::printf("# %s on %s\n", name.c_str(), (*executor)->Describe().c_str());
  std::printf("shape\ttokens\tlayer_us\ttokens_per_s\texpert_tflops\tdense_tflops\tof_dense\tweight_gbps\tof_hbm\n");
  for (int tokens : token_counts) {
    const TensorRef in{.data = input, .dtype = DType::kF32, .device = Device::kCuda, .rows = tokens, .cols = d};
    const MutableTensorRef out{
        .data = output, .dtype = DType::kF32, .device = Device::kCuda, .rows = tokens, .cols = d};
    std::vector<double> seconds;
    int64_t experts_touched = 0;
    for (int i = 0; i < iterations + 3; ++i) {
      const auto start = std::chrono::steady_clock::now();
      bool ok = (*executor)->Begin(in, **workspace).ok() && (*executor)->Enqueue({.layer = 0}, **workspace).ok() &&
                (*executor)->Finish({&out, 1}, **workspace).ok();
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (!ok) {
        std::fprintf(stderr, "cuda_bench: a batch of %d tokens failed\n", tokens);
        return;
      }
      if (i >= 3) seconds.push_back(elapsed);  // the first runs capture graphs and warm caches
      const LayerRecord& record = (*workspace)->records()[0];
      experts_touched = 0;
      for (size_t e = 0; e < record.tokens_routed.size(); ++e) experts_touched += record.tokens_routed[e] > 0;
    }
    const double layer = MedianOf(seconds);
    const double flops = 2.0 * tokens * k * 3 * d * inner;
    const double dense = DenseTflops(blas, std::max<int64_t>(tokens * k, 1), 3 * inner, d);
    const double tflops = flops / layer / 1e12;
    const double bytes = static_cast<double>(experts_touched) * expert_bytes;
    std::printf("%s\t%d\t%.1f\t%.0f\t%.2f\t%.2f\t%.3f\t%.0f\t%.3f\n", name.c_str(), tokens, layer * 1e6, tokens / layer,
                tflops, dense, tflops / dense, bytes / layer / 1e9, bytes / layer / copy_bandwidth);
    std::fflush(stdout);
  }
  cudaFree(input);
  cudaFree(output);
}

}  // namespace
}  // namespace moe

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  std::vector<int> tokens;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_tokens), ',')) {
    int value = 0;
    if (!absl::SimpleAtoi(part, &value) || value < 1) {
      std::fprintf(stderr, "cuda_bench: --tokens: '%s' is not a token count\n", std::string(part).c_str());
      return 2;
    }
    tokens.push_back(value);
  }
  // Formats by their quant_method names (QuantFormatName); "bf16" for none.
  std::vector<moe::QuantFormat> formats;
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_formats), ',')) {
    const auto known = {moe::QuantFormat::kNone, moe::QuantFormat::kFp8Block, moe::QuantFormat::kMxfp4};
    const auto named = std::find_if(known.begin(), known.end(), [&](moe::QuantFormat format) {
      return std::string(part) == (format == moe::QuantFormat::kNone ? "bf16" : moe::QuantFormatName(format));
    });
    if (named == known.end()) {
      std::fprintf(stderr, "cuda_bench: --formats: '%s' is not bf16, fp8 or mxfp4\n", std::string(part).c_str());
      return 2;
    }
    formats.push_back(*named);
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_bench: no CUDA device here; nothing measured\n");
    return 77;
  }
  cudaDeviceProp properties{};
  cudaGetDeviceProperties(&properties, 0);
  cublasHandle_t blas = nullptr;
  cublasCreate(&blas);
  const double copy = moe::CopyBandwidth();
  std::printf("# GPU: %s; device-to-device copy %.0f GB/s\n", properties.name, copy / 1e9);
  for (absl::string_view name : absl::StrSplit(absl::GetFlag(FLAGS_shape), ',')) {
    for (moe::QuantFormat format : formats) {
      const int iterations = absl::GetFlag(FLAGS_iterations);
      if (name == "mixtral") moe::RunShape(moe::MixtralSized(), format, tokens, iterations, copy, blas);
      if (name == "deepseek") moe::RunShape(moe::DeepSeekV3Sized(), format, tokens, iterations, copy, blas);
    }
  }
  cublasDestroy(blas);
  return 0;
}
