// Fuzzes moe-client's .npy reader: any bytes as a .npy file.
#include <cstddef>
#include <cstdint>

#include "client/npy.h"
#include "fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto array = moe::ReadNpy(moe::fuzz::AsFile(data, size));
  if (array.ok() && !array->values.empty()) {
    volatile float last = array->values.back();
    (void)last;
  }
  return 0;
}
