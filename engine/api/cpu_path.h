// Which of the engine's CPU kernel paths runs: AVX-512 (with AVX512_BF16 for
// bf16 compute), AVX2 with FMA, or portable C++ that any CPU runs. The path is
// chosen at run time from CPUID; an option, or the MOE_CPU_PATH environment
// variable, forces one (so that a narrower path can be run and tested on a
// wider CPU). Pure functions: thread-safe.
#ifndef MOE_ENGINE_API_CPU_PATH_H_
#define MOE_ENGINE_API_CPU_PATH_H_

#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/api/dtype.h"

namespace moe {

enum class CpuPath {
  kAuto,      // the widest path this CPU supports for the compute dtype
  kAvx512,    // AVX-512 F/BW/VL/DQ; bf16 compute also needs AVX512_BF16
  kAvx2,      // AVX2 and FMA
  kPortable,  // plain C++, no ISA extension: the reference the others are tested against
};

// The environment variable that forces a path when the options leave kAuto.
inline constexpr char kCpuPathEnvironmentVariable[] = "MOE_CPU_PATH";

// "auto", "avx512", "avx2", "portable".
const char* CpuPathName(CpuPath path);

// Parses CpuPathName's spellings; anything else is INVALID_ARGUMENT naming
// the accepted ones.
absl::StatusOr<CpuPath> ParseCpuPath(std::string_view name);

// Whether this CPU (and this build) runs `path` for `compute` (kF32 or kBF16).
// kAuto and kPortable are always supported.
bool CpuPathSupported(CpuPath path, DType compute);

// Every concrete path this CPU runs for `compute`, widest first (ends with
// kPortable). For tests that run each path the host supports.
std::vector<CpuPath> SupportedCpuPaths(DType compute);

// The concrete path to run: `requested`, or, when it is kAuto, the path named
// by MOE_CPU_PATH if set, else the widest supported one. FAILED_PRECONDITION
// when the path asked for is not supported here; INVALID_ARGUMENT when
// MOE_CPU_PATH is not a path's name.
absl::StatusOr<CpuPath> ResolveCpuPath(CpuPath requested, DType compute);

// Threads the CPU executor runs a batch on: one per CPU this process may use.
int CpuExecutorThreads();

}  // namespace moe

#endif  // MOE_ENGINE_API_CPU_PATH_H_
