// The CUDA executor as a plugin: libmoe_cuda.so holds engine/cuda/ and
// links the CUDA runtime and cuBLAS; the engine's executor factory loads it
// with dlopen when a model asks for kind "cuda". So a process that never
// runs on a GPU never loads CUDA's libraries: it starts where they are not
// installed, and cuBLAS's large static thread-local storage (which leaves
// too little room on the fixed-size stacks of the metrics server's threads)
// stays out of it. No CUDA type here.
#ifndef MOE_ENGINE_CUDA_PLUGIN_H_
#define MOE_ENGINE_CUDA_PLUGIN_H_

#include <memory>

#include "absl/status/status.h"
#include "engine/api/executor_factory.h"
#include "engine/api/layer_executor.h"
#include "engine/api/model_spec.h"

// The plugin's file name, and the entry point the factory looks up in it.
#define MOE_CUDA_PLUGIN_FILE "libmoe_cuda.so"
#define MOE_CUDA_PLUGIN_ENTRY "MoeCreateCudaExecutor"

extern "C" {
// CreateCudaExecutor (engine/cuda/cuda_executor.h) behind a C name: the
// executor in *out, or the reason there is none.
using MoeCreateCudaExecutorFn = absl::Status (*)(const moe::ModelDefinition& model, const moe::ExecutorOptions& options,
                                                 std::unique_ptr<moe::LayerExecutor>* out);
}

#endif  // MOE_ENGINE_CUDA_PLUGIN_H_
