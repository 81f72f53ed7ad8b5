// Fuzzes the Hugging Face loader's reading of config.json: any bytes as the
// config of a checkpoint directory without weights. The loader must answer
// with a status (a missing weight file at best), never crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/api/hf_loader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    char name[] = "/tmp/moe-fuzz-hf-XXXXXX";
    if (!mkdtemp(name)) abort();
    return std::string(name);
  }();
  FILE* config = fopen((dir + "/config.json").c_str(), "wb");
  if (!config) abort();
  fwrite(data, 1, size, config);
  fclose(config);
  (void)moe::LoadHuggingFaceModel(dir);
  return 0;
}
