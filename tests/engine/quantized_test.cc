// Quantized experts (engine/api/quantized.h, [QUANT_PANEL_LAYOUT] in
// engine/cpu/panel_kernels.h): the published decoding rules against
// decoders written here; PanelFfns over FP8 and MXFP4 matrices against
// PanelFfns over their dequantized weights (bit for bit: the kernels expand
// each code to the compute dtype by the same rule) and against a naive
// double-precision FFN of independently dequantized weights, on every CPU
// path; what they refuse; their memory; and the loader's quantization_config.
#include "engine/api/quantized.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>

#include "engine/api/hf_loader.h"
#include "engine/cpu/panel_ffn.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::CpuPathParamName;
using ::moe::testing::NormalizedMaxError;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

// e4m3fn by its definition: 1 sign, 4 exponent (bias 7), 3 mantissa bits,
// subnormals at exponent 0, S.1111.111 NaN.
double ReferenceE4m3(uint8_t byte) {
  const int sign = byte >> 7, exponent = (byte >> 3) & 15, mantissa = byte & 7;
  if (exponent == 15 && mantissa == 7) return std::nan("");
  const double magnitude =
      exponent == 0 ? mantissa / 8.0 * std::pow(2.0, -6) : (1 + mantissa / 8.0) * std::pow(2.0, exponent - 7);
  return sign ? -magnitude : magnitude;
}

double ReferenceE2m1(int code) {
  const int exponent = (code >> 1) & 3, mantissa = code & 1;
  const double magnitude = exponent == 0 ? mantissa * 0.5 : (1 + mantissa / 2.0) * std::pow(2.0, exponent - 1);
  return code & 8 ? -magnitude : magnitude;
}

TEST(QuantizedCodes, E4m3DecodesEveryByteAsItsDefinition) {
  for (int byte = 0; byte < 256; ++byte) {
    const double expected = ReferenceE4m3(static_cast<uint8_t>(byte));
    const float actual = E4m3ToFloat(static_cast<uint8_t>(byte));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << byte;
    } else {
      EXPECT_EQ(actual, expected) << byte;
      EXPECT_EQ(std::signbit(actual), (byte & 0x80) != 0) << byte;
      EXPECT_EQ(FloatToE4m3(actual), byte) << "round trip of " << byte;
    }
  }
  EXPECT_EQ(E4m3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
  EXPECT_EQ(FloatToE4m3(1000.0f), 0x7E);                // saturates
  EXPECT_EQ(FloatToE4m3(1.0625f), FloatToE4m3(1.0f));   // a tie goes to the even code
  EXPECT_EQ(FloatToE4m3(1.1875f), FloatToE4m3(1.25f));  // ... which is 1.25 here
  EXPECT_EQ(FloatToE4m3(std::nanf("")), 0x7F);
}

TEST(QuantizedCodes, E2m1AndE8m0AreTheirDefinitions) {
  for (int code = 0; code < 16; ++code) EXPECT_EQ(E2m1ToFloat(static_cast<uint8_t>(code)), ReferenceE2m1(code));
  EXPECT_TRUE(std::signbit(E2m1ToFloat(8)));  // -0
  for (int e = 0; e < 255; ++e) EXPECT_EQ(E8m0ToFloat(static_cast<uint8_t>(e)), std::ldexp(1.0, e - 127)) << e;
  EXPECT_TRUE(std::isnan(E8m0ToFloat(255)));
}

// The quantizers' codes are the nearest to value / scale: FP8 within half
// an e4m3 step (2^-4 of the value, or 2^-10 of the scale among subnormals);
// MXFP4's blocks put their largest value in [4, 8) codes, where 6 clips.
TEST(QuantizedCodes, QuantizersKeepValuesWithinHalfACode) {
  std::mt19937 rng(2);
  std::normal_distribution<float> normal(0, 0.05f);
  std::vector<float> values(64 * 160);
  for (float& v : values) v = normal(rng);
  const HostTensor matrix = HostTensor::FromFloats({64, 160}, values);
  ASSERT_OK_AND_ASSIGN(QuantizedMatrix fp8, QuantizeMatrix(matrix, QuantFormat::kFp8Block, 32, 128));
  ASSERT_OK_AND_ASSIGN(QuantizedMatrix mxfp4, QuantizeMatrix(matrix, QuantFormat::kMxfp4));
  for (int64_t r = 0; r < 64; ++r) {
    for (int64_t c = 0; c < 160; ++c) {
      const float v = values[r * 160 + c];
      EXPECT_LE(std::fabs(fp8.Value(r, c) - v), std::max(std::fabs(v) / 16, fp8.Scale(r, c) / 1024)) << r << " " << c;
      EXPECT_LE(std::fabs(mxfp4.Value(r, c) - v), 2 * mxfp4.Scale(r, c)) << r << " " << c;
    }
  }
  EXPECT_EQ(fp8.block_rows, 32);
  EXPECT_EQ(mxfp4.block_columns, 32);
}

// Owned bytes viewed as a tensor of `dtype`.
HostTensor BytesTensor(DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
  auto owned = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  return HostTensor::Borrow(dtype, std::move(shape), owned->data(), owned);
}

// Random e4m3 codes (every non-NaN byte likely) with block scales of about
// the size a checkpoint's take (amax / 448 for weights of 0.01 .. 0.1).
QuantizedMatrix RandomFp8(std::mt19937& rng, int64_t rows, int64_t columns, int64_t block_rows, int64_t block_columns) {
  std::vector<uint8_t> codes(static_cast<size_t>(rows * columns));
  for (uint8_t& code : codes) {
    do code = static_cast<uint8_t>(rng());
    while ((code & 0x7F) == 0x7F);
  }
  const int64_t scale_rows = (rows + block_rows - 1) / block_rows;
  const int64_t scale_columns = (columns + block_columns - 1) / block_columns;
  std::uniform_real_distribution<float> log2_scale(-16.0f, -12.0f);
  std::vector<float> scales(static_cast<size_t>(scale_rows * scale_columns));
  for (float& scale : scales) scale = std::exp2(log2_scale(rng));
  auto m = MakeQuantizedMatrix(QuantFormat::kFp8Block, "fp8", BytesTensor(DType::kF8E4M3, {rows, columns}, codes),
                               HostTensor::FromFloats({scale_rows, scale_columns}, scales), rows, columns, block_rows,
                               block_columns);
  EXPECT_OK(m);
  return *m;
}

// Random e2m1 pairs, e8m0 scales 2^-9 .. 2^-3, and an all-zero block whose
// scale is 0 (as quantizers write for blocks of zeros).
QuantizedMatrix RandomMxfp4(std::mt19937& rng, int64_t rows, int64_t columns) {
  std::vector<uint8_t> pairs(static_cast<size_t>(rows * columns / 2)), scales(static_cast<size_t>(rows * columns / 32));
  for (uint8_t& pair : pairs) pair = static_cast<uint8_t>(rng());
  for (uint8_t& e : scales) e = static_cast<uint8_t>(118 + rng() % 7);
  std::fill(pairs.begin(), pairs.begin() + 16, 0);
  scales[0] = 0;
  auto m = MakeQuantizedMatrix(QuantFormat::kMxfp4, "mxfp4", BytesTensor(DType::kU8, {rows, columns / 32, 16}, pairs),
                               BytesTensor(DType::kU8, {rows, columns / 32}, scales), rows, columns, 1, 32);
  EXPECT_OK(m);
  return *m;
}

struct Case {
  std::string name;
  QuantFormat format;
  ExpertKind kind;
  int hidden, inner;
  int64_t block_rows, block_columns;  // fp8
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

FfnWeights RandomQuantizedFfn(const Case& c, std::mt19937& rng) {
  auto matrix = [&](int64_t rows, int64_t columns) {
    return c.format == QuantFormat::kFp8Block ? RandomFp8(rng, rows, columns, c.block_rows, c.block_columns)
                                              : RandomMxfp4(rng, rows, columns);
  };
  FfnWeights w;
  w.q1 = matrix(c.inner, c.hidden);
  w.q2 = matrix(c.hidden, c.inner);
  if (c.kind != ExpertKind::kMlp) w.q3 = matrix(c.inner, c.hidden);
  if (c.kind != ExpertKind::kGlu) {
    std::normal_distribution<float> normal(0, 0.5f);
    auto bias = [&](int64_t n) {
      std::vector<float> values(n);
      for (float& v : values) v = normal(rng);
      return HostTensor::FromFloats({n}, values, DType::kBF16);
    };
    w.b1 = bias(c.inner);
    w.b2 = bias(c.hidden);
    if (c.kind == ExpertKind::kClampedSwiglu) w.b3 = bias(c.inner);
  }
  return w;
}

// Runs `ffn` on `rows` rows of `tokens`.
std::vector<float> RunFfn(const PanelFfn& ffn, const std::vector<float>& tokens, int64_t rows) {
  std::vector<float> out(static_cast<size_t>(rows * ffn.hidden()));
  PanelFfnRunner runner;
  const PanelFfnTask task{.ffn = &ffn, .rows = rows, .out = out.data()};
  runner.Run(tokens.data(), &task, 1, nullptr);
  return out;
}

class QuantizedFfnTest : public ::testing::TestWithParam<std::tuple<Case, CpuPath>> {};

TEST_P(QuantizedFfnTest, ComputesExactlyAsItsDequantizedWeights) {
  const auto& [c, path] = GetParam();
  for (DType compute : {DType::kBF16, DType::kF32}) {
    SKIP_UNLESS_CPU_RUNS(path, compute);
    std::mt19937 rng(7);
    const FfnWeights quantized = RandomQuantizedFfn(c, rng);
    const PanelFfn::Options options{.kind = c.kind, .compute = compute, .path = path, .swiglu = {.limit = 2.0f}};
    ASSERT_OK_AND_ASSIGN(auto ffn, PanelFfn::Create(quantized, options));
    ASSERT_OK_AND_ASSIGN(auto plain, PanelFfn::Create(quantized.Dequantized(compute), options));
    std::normal_distribution<float> normal(0, 1);
    std::vector<float> tokens(static_cast<size_t>(100 * c.hidden));
    for (float& v : tokens) v = normal(rng);
    // Across the block (12 rows) and chunk (96 rows) boundaries.
    for (int64_t rows : {1, 3, 12, 13, 40, 100}) {
      EXPECT_EQ(RunFfn(*ffn, tokens, rows), RunFfn(*plain, tokens, rows))
          << c.name << " " << DTypeName(compute) << " rows " << rows;
    }
  }
}

// The FFN in double precision from weights dequantized here, as a bf16
// computation sees them.
std::vector<double> Reference(const Case& c, const FfnWeights& w, const std::vector<float>& tokens, int64_t rows) {
  auto value = [&](const QuantizedMatrix& q, int64_t r, int64_t k) {
    double code, scale;
    if (c.format == QuantFormat::kFp8Block) {
      code = ReferenceE4m3(q.values[r * q.value_stride + k]);
      scale = static_cast<const float*>(q.scales)[(r / c.block_rows) * q.scale_stride + k / c.block_columns];
    } else {
      const uint8_t pair = q.values[r * q.value_stride + k / 2];
      code = ReferenceE2m1(k % 2 == 0 ? pair & 15 : pair >> 4);
      scale = std::ldexp(1.0, static_cast<const uint8_t*>(q.scales)[r * q.scale_stride + k / 32] - 127);
    }
    return static_cast<double>(RoundToBf16(static_cast<float>(code * scale)));
  };
  std::vector<double> out(static_cast<size_t>(rows * c.hidden));
  for (int64_t t = 0; t < rows; ++t) {
    const float* x = tokens.data() + t * c.hidden;
    std::vector<double> h(c.inner);
    for (int i = 0; i < c.inner; ++i) {
      double gate = 0, up = 0;
      for (int k = 0; k < c.hidden; ++k) {
        gate += value(w.q1, i, k) * RoundToBf16(x[k]);
        up += value(w.q3, i, k) * RoundToBf16(x[k]);
      }
      h[i] = RoundToBf16(static_cast<float>(gate / (1 + std::exp(-gate)) * up));
    }
    for (int j = 0; j < c.hidden; ++j) {
      for (int i = 0; i < c.inner; ++i) out[t * c.hidden + j] += value(w.q2, j, i) * h[i];
    }
  }
  return out;
}

TEST_P(QuantizedFfnTest, MatchesANaiveFfnOfItsDequantizedWeights) {
  const auto& [c, path] = GetParam();
  if (c.kind != ExpertKind::kGlu) GTEST_SKIP() << "the reference is a SiLU GLU";
  SKIP_UNLESS_CPU_RUNS(path, DType::kBF16);
  std::mt19937 rng(11);
  const FfnWeights w = RandomQuantizedFfn(c, rng);
  ASSERT_OK_AND_ASSIGN(auto ffn, PanelFfn::Create(w, {.kind = c.kind, .path = path}));
  std::normal_distribution<float> normal(0, 1);
  std::vector<float> tokens(static_cast<size_t>(13 * c.hidden));
  for (float& v : tokens) v = normal(rng);
  const std::vector<float> actual = RunFfn(*ffn, tokens, 13);
  const std::vector<double> reference = Reference(c, w, tokens, 13);
  EXPECT_LT(NormalizedMaxError(actual, std::vector<float>(reference.begin(), reference.end())), 1e-2) << c.name;
}

std::vector<Case> Cases() {
  return {
      // DeepSeek-V3's 128 x 128 blocks, a partial block each way (hidden
      // 288 = 2.25 blocks, inner 160 = 1.25), the GLU of DeepSeek and Qwen3.
      {"fp8_glu", QuantFormat::kFp8Block, ExpertKind::kGlu, 288, 160, 128, 128},
      // Blocks narrower than an expansion chunk, rows not whole panels.
      {"fp8_blocks_64x32_mlp", QuantFormat::kFp8Block, ExpertKind::kMlp, 192, 200, 64, 32},
      // Blocks wider than an expansion chunk.
      {"fp8_blocks_128x256_glu", QuantFormat::kFp8Block, ExpertKind::kGlu, 640, 96, 128, 256},
      // gpt-oss: MXFP4 with the clamped SwiGLU and biases.
      {"mxfp4_clamped_swiglu", QuantFormat::kMxfp4, ExpertKind::kClampedSwiglu, 288, 160, 1, 32},
      {"mxfp4_glu", QuantFormat::kMxfp4, ExpertKind::kGlu, 192, 96, 1, 32},
  };
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantizedFfnTest,
                         ::testing::Combine(::testing::ValuesIn(Cases()), ::testing::ValuesIn(AllCpuPaths())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" + CpuPathName(std::get<1>(info.param));
                         });

// The published shapes (Qwen3-30B-A3B's FP8 experts, gpt-oss's MXFP4 ones)
// packed: codes at their size, scales a few percent, within 1.15x of what
// the checkpoint stores.
TEST(QuantizedFfnMemory, StaysNearTheCheckpointsSize) {
  std::mt19937 rng(3);
  for (const Case& c : {Case{"qwen3 fp8", QuantFormat::kFp8Block, ExpertKind::kGlu, 2048, 768, 128, 128},
                        Case{"gpt-oss mxfp4", QuantFormat::kMxfp4, ExpertKind::kClampedSwiglu, 2880, 2880, 1, 32}}) {
    const FfnWeights w = RandomQuantizedFfn(c, rng);
    ASSERT_OK_AND_ASSIGN(auto ffn, PanelFfn::Create(w, {.kind = c.kind}));
    size_t stored = w.q1.stored_bytes() + w.q2.stored_bytes() + w.q3.stored_bytes();
    for (const HostTensor* bias : {&w.b1, &w.b2, &w.b3}) stored += bias->empty() ? 0 : bias->num_bytes();
    const double ratio = static_cast<double>(ffn->weight_bytes()) / static_cast<double>(stored);
    EXPECT_LE(ratio, 1.15) << c.name;
    EXPECT_GE(ratio, 1.0) << c.name;
    std::cout << c.name << ": packed " << ffn->weight_bytes() << " bytes, " << ratio << "x the checkpoint's\n";
  }
}

// What the kernels cannot compute as the published rule does is refused at
// packing, naming it.
TEST(QuantizedFfnRefuses, WhatItCannotComputeExactly) {
  std::mt19937 rng(5);
  const Case fp8{"fp8", QuantFormat::kFp8Block, ExpertKind::kGlu, 256, 128, 128, 128};
  auto expect_refused = [](const FfnWeights& w, const std::string& message) {
    EXPECT_THAT(PanelFfn::Create(w, {}).status(), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(message)));
  };
  {
    FfnWeights w = RandomQuantizedFfn(fp8, rng);
    const_cast<uint8_t*>(w.q3.values)[5 * w.q3.value_stride + 7] = 0xFF;
    expect_refused(w, "the value at [5, 7] is NaN");
  }
  {
    FfnWeights w = RandomQuantizedFfn(fp8, rng);
    const_cast<float*>(static_cast<const float*>(w.q2.scales))[1] = 1e38f;
    expect_refused(w, "outside [2^-100, 2^100]");
  }
  {
    const Case wide{"fp8", QuantFormat::kFp8Block, ExpertKind::kGlu, 1024, 128, 128, 512};
    expect_refused(RandomQuantizedFfn(wide, rng), "scale blocks of an even width up to 256");
  }
  {
    const Case odd{"fp8", QuantFormat::kFp8Block, ExpertKind::kGlu, 255, 128, 128, 128};
    expect_refused(RandomQuantizedFfn(odd, rng), "an even number of columns");
  }
  {
    const Case mxfp4{"mxfp4", QuantFormat::kMxfp4, ExpertKind::kGlu, 64, 64, 1, 32};
    FfnWeights w = RandomQuantizedFfn(mxfp4, rng);
    const_cast<uint8_t*>(w.q1.values)[20] = 0x11;
    const_cast<uint8_t*>(static_cast<const uint8_t*>(w.q1.scales))[1] = 255;
    expect_refused(w, "scale 2^128 of row 0 is outside [2^-125, 2^125]");
  }
}

TEST(QuantizedMatrix, ChecksTheCheckpointsShapesAndDtypes) {
  const HostTensor codes = BytesTensor(DType::kF8E4M3, {4, 6}, std::vector<uint8_t>(24));
  const HostTensor scales = HostTensor::FromFloats({1, 1}, {1.0f});
  EXPECT_OK(MakeQuantizedMatrix(QuantFormat::kFp8Block, "w", codes, scales, 4, 6, 128, 128));
  EXPECT_THAT(
      MakeQuantizedMatrix(QuantFormat::kFp8Block, "w", codes, HostTensor::FromFloats({3, 1}, {1, 1, 1}), 4, 6, 2, 128)
          .status(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("w scales is F32 [3, 1], expected F32 [2, 1]")));
  EXPECT_THAT(
      MakeQuantizedMatrix(QuantFormat::kFp8Block, "w", codes, scales, 4, 8, 128, 128).status(),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("w values is F8_E4M3 [4, 6], expected F8_E4M3 [4, 8]")));
  EXPECT_THAT(MakeQuantizedMatrix(QuantFormat::kMxfp4, "blocks", codes, scales, 4, 6, 1, 32).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("blocks blocks is F8_E4M3 [4, 6]")));
}

// A copy of a golden fixture whose config.json has `from` replaced by `to`.
std::string FixtureWithConfig(const std::string& fixture, const std::string& from, const std::string& to) {
  namespace fs = std::filesystem;
  const fs::path source = testing::SourceDir() + "/tests/golden/" + fixture;
  const fs::path copy = fs::path(testing::ProcessTempDir("quantized_test")) / (fixture + std::to_string(std::rand()));
  fs::create_directories(copy);
  fs::copy_file(source / "model.safetensors", copy / "model.safetensors");
  std::ifstream in(source / "config.json");
  std::stringstream text;
  text << in.rdbuf();
  std::string config = text.str();
  const size_t at = config.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) config.replace(at, from.size(), to);
  std::ofstream(copy / "config.json") << config;
  return copy.string();
}

TEST(QuantizationConfig, UnsupportedMethodsAndBlockSizesAreNamed) {
  EXPECT_THAT(LoadHuggingFaceModel(FixtureWithConfig("deepseek_v3_fp8", "\"fp8\"", "\"gptq\"")).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("quant_method 'gptq' is not supported")));
  EXPECT_THAT(LoadHuggingFaceModel(FixtureWithConfig("deepseek_v3_fp8", "\"weight_block_size\"", "\"block\"")).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("weight_block_size is missing")));
  EXPECT_THAT(
      LoadHuggingFaceModel(FixtureWithConfig("deepseek_v3_fp8", "\"quantization_config\"", "\"other\"")).status(),
      StatusIs(absl::StatusCode::kInvalidArgument,
               HasSubstr("is F8_E4M3 but config.json's quantization_config does not say fp8")));
  EXPECT_THAT(LoadHuggingFaceModel(FixtureWithConfig("gpt_oss_mxfp4", "\"quantization_config\"", "\"other\"")).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("does not say mxfp4")));
}

TEST(QuantizationConfig, PublishedCheckpointsLoadQuantized) {
  for (const char* fixture : {"deepseek_v3_fp8", "qwen3_moe_fp8", "gpt_oss_mxfp4"}) {
    ASSERT_OK_AND_ASSIGN(ModelDefinition model,
                         LoadHuggingFaceModel(testing::SourceDir() + "/tests/golden/" + fixture));
    const QuantFormat expected =
        std::string(fixture).find("fp8") != std::string::npos ? QuantFormat::kFp8Block : QuantFormat::kMxfp4;
    EXPECT_EQ(model.spec.expert_format, expected) << fixture;
    EXPECT_EQ(model.spec.weight_dtype, DType::kBF16) << fixture;
    for (const LayerWeights& layer : model.layers) {
      for (const FfnWeights& expert : layer.experts) EXPECT_TRUE(expert.quantized()) << fixture;
      if (layer.shared) {
        EXPECT_TRUE(layer.shared->quantized()) << fixture;
      }
    }
  }
}

}  // namespace
}  // namespace moe
