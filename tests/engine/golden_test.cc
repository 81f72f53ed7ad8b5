// The engine against transformers: fixtures written by tests/golden/make_golden.py
// (tiny random checkpoints of every supported Hugging Face type and what the
// transformers modules compute for them) and make_quantized_golden.py (FP8 and
// MXFP4 experts in their published layouts), on every CPU path this machine
// runs.
#include <iostream>
#include <string>

#include "engine/api/hf_loader.h"
#include "engine/api/moe_model.h"
#include "engine/loading/safetensors.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::NormalizedMaxError;
using ::moe::testing::PlanWorkspace;

struct Fixture {
  std::string dir;         // under tests/golden
  std::string golden_dir;  // where golden.safetensors is (fused variants share it)
  double tolerance;        // on NormalizedMaxError
};

void PrintTo(const Fixture& fixture, std::ostream* os) { *os << fixture.dir; }

std::string GoldenPath(const std::string& name) { return std::string(MOE_SOURCE_DIR) + "/tests/golden/" + name; }

// fp32 fixtures at fp32 precision; bf16 ones at bf16 precision (a few ulps
// of bf16, whose epsilon is 2^-8, after two layers of rounded activations).
constexpr double kFp32Tolerance = 5e-6;
constexpr double kBf16Tolerance = 3e-2;

std::vector<Fixture> AllFixtures() {
  std::vector<Fixture> out;
  for (const char* type : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                           "granitemoe", "llama4_text", "gpt_oss"}) {
    for (const char* dtype : {"fp32", "bf16"}) {
      const std::string name = std::string(type) + "_" + dtype;
      const double tolerance = std::string(dtype) == "fp32" ? kFp32Tolerance : kBf16Tolerance;
      out.push_back({name, name, tolerance});
      if (std::string(type) == "mixtral" || std::string(type) == "deepseek_v3") {
        out.push_back({name + "_fused", name, tolerance});
      }
    }
  }
  // Quantized experts compute in bf16 on their dequantized values.
  out.push_back({"deepseek_v3_fp8", "deepseek_v3_fp8", kBf16Tolerance});
  out.push_back({"qwen3_moe_fp8", "qwen3_moe_fp8", kBf16Tolerance});
  // Its MXFP4 scales reach 2^1, so weights reach 12 and activations grow
  // large: transformers' bf16 forward is 0.015 from its own fp32 forward,
  // this engine's 0.024, and the two bf16 computations differ by 0.031.
  out.push_back({"gpt_oss_mxfp4", "gpt_oss_mxfp4", 4e-2});
  return out;
}

class GoldenTest : public ::testing::TestWithParam<std::tuple<Fixture, CpuPath>> {
 protected:
  void SetUp() override {
    const Fixture& fixture = std::get<0>(GetParam());
    ASSERT_OK_AND_ASSIGN(ModelDefinition definition, LoadHuggingFaceModel(GoldenPath(fixture.dir)));
    const DType compute = definition.spec.weight_dtype == DType::kF32 ? DType::kF32 : DType::kBF16;
    SKIP_UNLESS_CPU_RUNS(std::get<1>(GetParam()), compute);
    ASSERT_OK_AND_ASSIGN(model_, MoeModel::Create(definition, {.cpu_path = std::get<1>(GetParam())}));
    ASSERT_OK_AND_ASSIGN(golden_, SafetensorsFile::Open(GoldenPath(fixture.golden_dir) + "/golden.safetensors"));
    ASSERT_OK_AND_ASSIGN(HostTensor input, golden_->Get("input"));
    input_ = input.ToFloats();
    tokens_ = static_cast<int>(input.dim(0));
  }
  const Fixture& fixture() const { return std::get<0>(GetParam()); }
  std::vector<float> Expected(const std::string& name) {
    auto tensor = golden_->Get(name);
    EXPECT_OK(tensor);
    return tensor.ok() ? tensor->ToFloats() : std::vector<float>();
  }

  std::unique_ptr<MoeModel> model_;
  std::shared_ptr<const SafetensorsFile> golden_;
  std::vector<float> input_;
  int tokens_ = 0;
};

TEST_P(GoldenTest, WholeStackMatchesTransformers) {
  auto ws = PlanWorkspace(*model_);
  MoeModel::RunResult result;
  ASSERT_OK(model_->Run(input_.data(), tokens_, {}, ws.get(), &result));
  const double error = NormalizedMaxError(result.outputs[0], Expected("output"));
  EXPECT_LT(error, fixture().tolerance) << fixture().dir;
  std::cout << fixture().dir << ": normalized max error " << error << " (tolerance " << fixture().tolerance << ")\n";
}

TEST_P(GoldenTest, EachLayerAloneMatchesTransformersAndRoutesTheSame) {
  auto ws = PlanWorkspace(*model_);
  for (int layer = 0; layer < model_->num_layers(); ++layer) {
    MoeModel::RunResult result;
    ASSERT_OK(model_->Run(input_.data(), tokens_, {.layer = layer, .return_routing = true}, ws.get(), &result));
    const std::string prefix = "layer" + std::to_string(layer);
    EXPECT_LT(NormalizedMaxError(result.outputs[0], Expected(prefix + ".output")), fixture().tolerance)
        << fixture().dir << " layer " << layer;
  }
  // Routing along the chained stack, compared as sorted expert sets.
  MoeModel::RunResult result;
  ASSERT_OK(model_->Run(input_.data(), tokens_, {.return_routing = true}, ws.get(), &result));
  const int slots = model_->routing_slots();
  const int layers = model_->num_layers();
  for (int layer = 0; layer < layers; ++layer) {
    const std::vector<float> expected = Expected("layer" + std::to_string(layer) + ".expert_ids");
    ASSERT_EQ(expected.size(), static_cast<size_t>(tokens_ * slots));
    for (int t = 0; t < tokens_; ++t) {
      std::vector<int> ours(slots), theirs(slots);
      for (int s = 0; s < slots; ++s) {
        ours[s] = result.expert_ids[(static_cast<size_t>(t) * layers + layer) * slots + s];
        theirs[s] = static_cast<int>(expected[static_cast<size_t>(t) * slots + s]);
      }
      std::sort(ours.begin(), ours.end());
      EXPECT_EQ(ours, theirs) << fixture().dir << " layer " << layer << " token " << t;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, GoldenTest,
                         ::testing::Combine(::testing::ValuesIn(AllFixtures()), ::testing::ValuesIn(AllCpuPaths())),
                         [](const auto& info) {
                           return std::get<0>(info.param).dir + "_" + CpuPathName(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace moe
