// Fuzzes the expert worker's request decoder: any bytes parsed as an
// ExpertRowsRequest (the front end to worker protocol) and answered by a
// worker service holding every expert of a small model.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "engine/api/executor_factory.h"
#include "engine/api/model_builder.h"
#include "google/protobuf/stubs/logging.h"
#include "proto/expert_worker.pb.h"
#include "server/worker/expert_worker_service.h"

namespace {

const moe::ExpertWorkerService& Service() {
  static const moe::ExpertWorkerService* service = [] {
    moe::ModelSpec spec;
    spec.name = "fuzz";
    spec.hidden_size = 16;
    spec.intermediate_size = 24;
    spec.router.num_experts = 4;
    spec.router.top_k = 2;
    const moe::ModelDefinition model = moe::GenerateRandomModel(spec, 2, 1);
    auto executor = moe::CreateExecutor(model, {.compute = moe::DType::kF32, .held = std::nullopt});
    if (!executor.ok()) abort();
    return new moe::ExpertWorkerService(std::shared_ptr<const moe::LayerExecutor>(std::move(executor).value()),
                                        model.spec, 2, nullptr);
  }();
  return *service;
}

}  // namespace

// Quiet: protobuf logs every string field of invalid UTF-8 it parses.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::worker::ExpertRowsRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  moe::worker::ExpertRowsResponse response;
  (void)Service().Answer(request, &response);
  return 0;
}
