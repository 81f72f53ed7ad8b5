#include "engine/api/cpu_path.h"

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "absl/strings/str_cat.h"
#include "engine/cpu/thread_team.h"

namespace moe {
namespace {

#if defined(__x86_64__) || defined(__i386__)
// F16C (CPUID leaf 1, ECX bit 29): read directly, as clang's
// __builtin_cpu_supports has no name for it.
bool HasF16c() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

constexpr CpuPath kConcretePaths[] = {CpuPath::kAvx512, CpuPath::kAvx2, CpuPath::kPortable};

bool X86Supports(CpuPath path, DType compute) {
#if defined(__x86_64__) || defined(__i386__)
  switch (path) {
    case CpuPath::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             (compute != DType::kBF16 || __builtin_cpu_supports("avx512bf16"));
    case CpuPath::kAvx2:
      // F16C widens quantized weights; every AVX2 CPU has it, but say so.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && HasF16c();
    default:
      return false;
  }
#else
  (void)path;
  (void)compute;
  return false;
#endif
}

}  // namespace

const char* CpuPathName(CpuPath path) {
  switch (path) {
    case CpuPath::kAuto:
      return "auto";
    case CpuPath::kAvx512:
      return "avx512";
    case CpuPath::kAvx2:
      return "avx2";
    case CpuPath::kPortable:
      return "portable";
  }
  return "unknown";
}

absl::StatusOr<CpuPath> ParseCpuPath(std::string_view name) {
  for (CpuPath path : {CpuPath::kAuto, CpuPath::kAvx512, CpuPath::kAvx2, CpuPath::kPortable}) {
    if (name == std::string_view(CpuPathName(path))) return path;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown CPU path '", std::string(name), "': expected auto, avx512, avx2 or portable"));
}

bool CpuPathSupported(CpuPath path, DType compute) {
  if (path == CpuPath::kAuto || path == CpuPath::kPortable) return true;
  return X86Supports(path, compute);
}

std::vector<CpuPath> SupportedCpuPaths(DType compute) {
  std::vector<CpuPath> paths;
  for (CpuPath path : kConcretePaths) {
    if (CpuPathSupported(path, compute)) paths.push_back(path);
  }
  return paths;
}

absl::StatusOr<CpuPath> ResolveCpuPath(CpuPath requested, DType compute) {
  if (compute != DType::kF32 && compute != DType::kBF16) {
    return absl::InvalidArgumentError("the CPU kernels compute in fp32 or bf16");
  }
  CpuPath path = requested;
  if (path == CpuPath::kAuto) {
    if (const char* forced = std::getenv(kCpuPathEnvironmentVariable); forced && *forced) {
      auto parsed = ParseCpuPath(forced);
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(kCpuPathEnvironmentVariable, ": ", parsed.status().message()));
      }
      path = *parsed;
    }
  }
  if (path == CpuPath::kAuto) return SupportedCpuPaths(compute).front();
  if (!CpuPathSupported(path, compute)) {
    return absl::FailedPreconditionError(absl::StrCat("this CPU does not run the ", CpuPathName(path), " path for ",
                                                      compute == DType::kBF16 ? "bf16" : "fp32", " compute"));
  }
  return path;
}

int CpuExecutorThreads() { return ThreadTeam::Shared().size(); }

}  // namespace moe
