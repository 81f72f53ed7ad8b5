// Fuzzes the safetensors reader: a file of any bytes is mapped, its header
// validated, and every tensor it lists read; nothing may crash or read out
// of the mapping.
#include <cstddef>
#include <cstdint>

#include "engine/loading/safetensors.h"
#include "fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = moe::SafetensorsFile::Open(moe::fuzz::AsFile(data, size));
  if (!file.ok()) return 0;
  for (const std::string& name : (*file)->Names()) {
    auto tensor = (*file)->Get(name);
    if (tensor.ok() && tensor->num_elements() > 0) {
      // Touch the first and last values: both must lie inside the mapping.
      volatile float first = tensor->ToFloats().front();
      (void)first;
    }
  }
  return 0;
}
