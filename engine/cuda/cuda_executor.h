// The CUDA executor: a LayerExecutor (engine/api/layer_executor.h) that runs
// whole MoE layers on an NVIDIA GPU with cuBLAS. This header carries no CUDA
// type, so the rest of the engine and the server build the same with or
// without CUDA. It lives in the plugin libmoe_cuda.so (engine/cuda/plugin.h),
// which the executor factory loads for kind "cuda" in builds with MOE_CUDA.
//
// What runs where:
//  - Weights are uploaded once, at creation, in the compute dtype (bf16, or
//    fp16 for an fp16 checkpoint, or fp32 when computing in fp32), read from
//    the loader's (memory-mapped) tensors through a small pinned staging
//    buffer: no second host copy of the model.
//  - A layer stays on the device: RMSNorm, the router's product (fp32),
//    selection (softmax top-k and both group-limited families on the
//    device; hierarchical, dense, expert-choice and multi-gate routers on the
//    host, from the logits), a counting sort of the selections by expert with
//    the capacity rule, gather, the expert products, the activation, the
//    shared experts (and Qwen's shared gate) on a second stream, the combine
//    in slot order and the residual.
//  - Two ways to run the routed experts, chosen by the batch's tokens:
//      grouped (more than decode_max_tokens tokens): cuBLAS grouped GEMMs
//        (cublasGemmGroupedBatchedEx, fp32 accumulation), whose group sizes
//        are host arrays: the layer copies the experts' row counts to the
//        host once (the one host sync of a layer);
//      decode (up to decode_max_tokens): kernels that read each selected
//        expert's weights for its tokens (one block per selection), whose
//        sizes the token count alone fixes, so the whole batch (every layer
//        from Begin to Finish) is captured in a CUDA graph the second time
//        its shape comes (the first runs as it is, to warm up) and replayed
//        after.
//  - Plan, then run: NewWorkspace sizes every device and pinned buffer, the
//    streams, events and cuBLAS handle and workspace for its largest batch;
//    a batch allocates nothing (the capture of a decode shape instantiates
//    its graph). cuBLAS's grouped GEMM is asked once, at creation, whether
//    it takes the types; where it does not, a GEMM per expert.
//
// Timing: ExpertTiming::kPerExpert, by a stated method: CUDA events measure
// each layer's expert section (routed and shared, on the device), and each
// routed expert is given that time in proportion to its rows (its share of
// the layer's expert FLOPs, as every routed expert has the same shape).
// Token counts per expert are exact: the dispatch's own counts, copied back.
//
// Every expert form of engine/api/model_spec.h runs: GLU, MLP with biases,
// gpt-oss's clamped SwiGLU with its biases, with a router logit bias, and
// Llama 4's routing weights that scale the expert input.
//
// Not yet: experts offloaded to workers (ExecutorOptions::offload) are
// refused at creation; a front end on the GPU holds every expert.
//
// Thread-safety: as LayerExecutor. Each workspace has its own streams and
// cuBLAS handle, so batches of different workspaces run concurrently.
#ifndef MOE_ENGINE_CUDA_CUDA_EXECUTOR_H_
#define MOE_ENGINE_CUDA_CUDA_EXECUTOR_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "engine/api/executor_factory.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"

namespace moe {

// The CUDA devices this process sees; UNAVAILABLE, with the driver's
// reason, when there are none (no driver, no device, CUDA_VISIBLE_DEVICES
// empty).
absl::StatusOr<int> CudaDeviceCount();

// "NVIDIA H200 (sm_90, 139 GiB)" for device `index`.
absl::StatusOr<std::string> CudaDeviceName(int index);

// Builds the CUDA executor on device options.device_index. Reads
// options.compute (kBF16 or kF32) and options.held. UNAVAILABLE when the
// device is absent; RESOURCE_EXHAUSTED when the weights do not fit in its
// memory; INVALID_ARGUMENT for options it does not take (an offload).
absl::StatusOr<std::unique_ptr<LayerExecutor>> CreateCudaExecutor(const ModelDefinition& model,
                                                                  const ExecutorOptions& options);

}  // namespace moe

#endif  // MOE_ENGINE_CUDA_CUDA_EXECUTOR_H_
