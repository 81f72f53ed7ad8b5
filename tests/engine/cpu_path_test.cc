// The choice of CPU kernel path: names, what this CPU runs, the MOE_CPU_PATH
// override, and the errors for a path that cannot run.
#include "engine/api/cpu_path.h"

#include <cstdlib>
#include <string>

#include "engine/api/model_builder.h"
#include "engine/api/moe_model.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

// One layer of 4 experts, hidden 32, weights in `dtype`.
ModelDefinition TinyModel(DType dtype) {
  ModelSpec spec;
  spec.hidden_size = 32;
  spec.intermediate_size = 32;
  spec.router.num_experts = 4;
  spec.router.top_k = 2;
  spec.weight_dtype = dtype;
  return GenerateRandomModel(spec, 1, 1);
}

TEST(CpuPath, NamesParseBackAndUnknownNamesAreRejected) {
  for (CpuPath path : {CpuPath::kAuto, CpuPath::kAvx512, CpuPath::kAvx2, CpuPath::kPortable}) {
    ASSERT_OK_AND_ASSIGN(CpuPath parsed, ParseCpuPath(CpuPathName(path)));
    EXPECT_EQ(parsed, path);
  }
  EXPECT_THAT(ParseCpuPath("sse"), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("'sse'")));
  EXPECT_THAT(ParseCpuPath(""), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("avx2")));
}

TEST(CpuPath, SupportedPathsAreWidestFirstAndEndWithPortable) {
  for (DType compute : {DType::kF32, DType::kBF16}) {
    const std::vector<CpuPath> paths = SupportedCpuPaths(compute);
    ASSERT_FALSE(paths.empty());
    EXPECT_EQ(paths.back(), CpuPath::kPortable);
    for (CpuPath path : paths) EXPECT_TRUE(CpuPathSupported(path, compute)) << CpuPathName(path);
#if defined(__x86_64__)
    // AVX-512 implies AVX2 on every CPU that has it: a wider path never
    // stands alone.
    if (CpuPathSupported(CpuPath::kAvx512, compute)) {
      EXPECT_TRUE(CpuPathSupported(CpuPath::kAvx2, compute));
    }
#else
    EXPECT_EQ(paths.size(), 1u);
#endif
  }
  // bf16 on AVX-512 needs AVX512_BF16 on top of what fp32 needs.
  if (CpuPathSupported(CpuPath::kAvx512, DType::kBF16)) {
    EXPECT_TRUE(CpuPathSupported(CpuPath::kAvx512, DType::kF32));
  }
}

TEST(CpuPath, AutoPicksTheWidestUnlessTheVariableForcesOne) {
  testing::ScopedEnv unset(kCpuPathEnvironmentVariable, nullptr);
  for (DType compute : {DType::kF32, DType::kBF16}) {
    ASSERT_OK_AND_ASSIGN(CpuPath widest, ResolveCpuPath(CpuPath::kAuto, compute));
    EXPECT_EQ(widest, SupportedCpuPaths(compute).front());
  }
  {
    testing::ScopedEnv forced(kCpuPathEnvironmentVariable, "portable");
    ASSERT_OK_AND_ASSIGN(CpuPath path, ResolveCpuPath(CpuPath::kAuto, DType::kBF16));
    EXPECT_EQ(path, CpuPath::kPortable);
    // An explicit choice wins over the variable.
    ASSERT_OK_AND_ASSIGN(CpuPath explicit_path, ResolveCpuPath(SupportedCpuPaths(DType::kF32).front(), DType::kF32));
    EXPECT_EQ(explicit_path, SupportedCpuPaths(DType::kF32).front());
  }
  {
    testing::ScopedEnv bogus(kCpuPathEnvironmentVariable, "avx1024");
    EXPECT_THAT(ResolveCpuPath(CpuPath::kAuto, DType::kF32),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("MOE_CPU_PATH")));
  }
  EXPECT_THAT(ResolveCpuPath(CpuPath::kAuto, DType::kF16),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("fp32 or bf16")));
}

TEST(CpuPath, APathThisCpuDoesNotRunFailsTheModelsLoadByName) {
  std::vector<CpuPath> unsupported;
  for (CpuPath path : {CpuPath::kAvx512, CpuPath::kAvx2}) {
    if (!CpuPathSupported(path, DType::kBF16)) unsupported.push_back(path);
  }
  if (unsupported.empty()) GTEST_SKIP() << "this CPU runs every path";
  const ModelDefinition model = TinyModel(DType::kBF16);
  for (CpuPath path : unsupported) {
    EXPECT_THAT(MoeModel::Create(model, {.cpu_path = path}),
                StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr(CpuPathName(path))));
  }
}

TEST(CpuPath, TheModelSaysWhichPathRuns) {
  const ModelDefinition model = TinyModel(DType::kF32);
  for (CpuPath path : SupportedCpuPaths(DType::kF32)) {
    ASSERT_OK_AND_ASSIGN(auto loaded, MoeModel::Create(model, {.cpu_path = path}));
    EXPECT_THAT(loaded->executor().Describe(), HasSubstr(std::string(CpuPathName(path)) + " kernels"));
  }
}

}  // namespace
}  // namespace moe
