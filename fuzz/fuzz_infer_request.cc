// Fuzzes the request decoder: any bytes parsed as a ModelInferRequest (the
// wire's protobuf) and decoded against the demo model, every input path
// (raw contents, typed contents, parameters) included.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "google/protobuf/stubs/logging.h"
#include "proto/inference.pb.h"
#include "server/frontend/infer_codec.h"
#include "server/models/model_registry.h"

namespace {

const moe::ServedModel& DemoModel() {
  static const moe::ModelRegistry* registry = [] {
    auto created = moe::ModelRegistry::Create(moe::ModelRegistry::Options{});
    if (!created.ok()) abort();
    return created->release();
  }();
  return *registry->Find("demo", "").value();
}

}  // namespace

// Quiet: protobuf logs every string field of invalid UTF-8 it parses.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  inference::ModelInferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  (void)moe::DecodeInferRequest(request, DemoModel(), /*max_request_tokens=*/64);
  return 0;
}
