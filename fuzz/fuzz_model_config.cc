// Fuzzes config.pbtxt: any text parsed as a model configuration, and a
// parsed one turned into a model spec.
#include <cstddef>
#include <cstdint>
#include <string>

#include "engine/api/repository_model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = moe::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (config.ok()) (void)moe::SpecFromConfig(*config);
  return 0;
}
