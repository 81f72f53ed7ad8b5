// Each CPU path's panel kernels (engine/cpu/panel_kernels.h) against references
// written here: the block product in double precision over every block
// height and step counts on both sides of the AVX2 kernel's 128-step chunks,
// the row conversion bit for bit (rounding ties, odd counts, NaN, infinities,
// subnormals), the epilogues against the activations' definitions.
#include "engine/cpu/panel_kernels.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <random>

#include "engine/api/dtype.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::AllCpuPaths;
using ::moe::testing::CpuPathParamName;
using ::moe::testing::ReferenceActivation;

// 64-byte aligned storage, as the engine's panels are.
struct AlignedWords {
  explicit AlignedWords(size_t count)
      : data(static_cast<uint32_t*>(std::aligned_alloc(64, (count * 4 + 63) / 64 * 64)), &std::free) {}
  std::unique_ptr<uint32_t, decltype(&std::free)> data;
  uint32_t* get() const { return data.get(); }
};

uint32_t Bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
float FromBits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}
// The two values of a step in `compute`.
double LowOf(uint32_t step, bool bf16) { return bf16 ? Bf16ToFloat(static_cast<uint16_t>(step)) : FromBits(step); }
double HighOf(uint32_t step) { return Bf16ToFloat(static_cast<uint16_t>(step >> 16)); }

uint32_t RandomStep(std::mt19937& rng, bool bf16) {
  std::normal_distribution<float> normal;
  if (!bf16) return Bits(normal(rng));
  return static_cast<uint32_t>(FloatToBf16(normal(rng))) | static_cast<uint32_t>(FloatToBf16(normal(rng))) << 16;
}

class PanelKernelsTest : public ::testing::TestWithParam<CpuPath> {
 protected:
  const PanelKernels& kernels() const { return PanelKernelsFor(GetParam()); }
};

TEST_P(PanelKernelsTest, BlockTimesPanelMatchesDoublePrecisionForEveryHeight) {
  for (DType compute : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(GetParam(), compute);
    ASSERT_EQ(kernels().path, GetParam());
    const bool bf16 = compute == DType::kBF16;
    std::mt19937 rng(11);
    for (int64_t steps : {1, 7, 128, 129, 300}) {
      AlignedWords panel(static_cast<size_t>(steps) * kPanelColumns);
      for (int64_t i = 0; i < steps * kPanelColumns; ++i) panel.get()[i] = RandomStep(rng, bf16);
      for (int mr = 1; mr <= kMaxBlockRows; ++mr) {
        std::vector<uint32_t> block(static_cast<size_t>(steps) * mr);
        for (uint32_t& step : block) step = RandomStep(rng, bf16);
        std::vector<float> tile(kMaxBlockRows * kPanelColumns + 1, -7.0f);
        kernels().multiply_block_panel(compute, block.data(), mr, panel.get(), steps, tile.data(), nullptr, false);
        for (int i = 0; i < mr; ++i) {
          for (int c = 0; c < kPanelColumns; ++c) {
            double sum = 0, magnitude = 0;
            for (int64_t s = 0; s < steps; ++s) {
              const uint32_t a = block[s * mr + i], w = panel.get()[s * kPanelColumns + c];
              double term = LowOf(a, bf16) * LowOf(w, bf16);
              if (bf16) term += HighOf(a) * HighOf(w);
              sum += term;
              magnitude += std::fabs(term);
            }
            // fp32 sums of `steps` (or 2 steps) terms: a few ulps of their magnitude.
            EXPECT_NEAR(tile[i * kPanelColumns + c], sum, 1e-6 * magnitude * (2 * steps + 2))
                << CpuPathName(GetParam()) << (bf16 ? " bf16" : " fp32") << " steps " << steps << " mr " << mr
                << " row " << i << " column " << c;
          }
        }
        EXPECT_EQ(tile[mr * kPanelColumns], -7.0f) << "written past the block's rows";
      }
    }
  }
}

// A row's sums do not depend on the rows beside it: each row of a block of
// 12 is the same bits as the row alone.
TEST_P(PanelKernelsTest, RowSumsDoNotDependOnTheBlock) {
  for (DType compute : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(GetParam(), compute);
    const bool bf16 = compute == DType::kBF16;
    std::mt19937 rng(12);
    const int64_t steps = 260;
    AlignedWords panel(static_cast<size_t>(steps) * kPanelColumns);
    for (int64_t i = 0; i < steps * kPanelColumns; ++i) panel.get()[i] = RandomStep(rng, bf16);
    std::vector<uint32_t> block(static_cast<size_t>(steps) * kMaxBlockRows);
    for (uint32_t& step : block) step = RandomStep(rng, bf16);
    std::vector<float> all(kMaxBlockRows * kPanelColumns);
    kernels().multiply_block_panel(compute, block.data(), kMaxBlockRows, panel.get(), steps, all.data(), nullptr,
                                   false);
    for (int i = 0; i < kMaxBlockRows; ++i) {
      std::vector<uint32_t> row(steps);
      for (int64_t s = 0; s < steps; ++s) row[s] = block[s * kMaxBlockRows + i];
      std::vector<float> alone(kPanelColumns);
      kernels().multiply_block_panel(compute, row.data(), 1, panel.get(), steps, alone.data(), nullptr, false);
      EXPECT_TRUE(std::equal(alone.begin(), alone.end(), all.begin() + i * kPanelColumns)) << "row " << i;
    }
  }
}

// Steps as FloatToBf16 (engine/api/dtype.h) makes them, bit for bit, whatever
// the row count, the step count (odd value counts padded with zero) and the
// values: rounding ties both ways, NaN, infinities, subnormals, -0.
TEST_P(PanelKernelsTest, RowStepsAreTheScalarConversionBitForBit) {
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::denorm_min(),
                            -0.0f,
                            FromBits(0x3f808000u),   // a tie, rounds down to even
                            FromBits(0x3f818000u),   // a tie, rounds up to even
                            FromBits(0x7f7fffffu),   // the largest float: rounds to infinity
                            FromBits(0xff800001u)};  // a signalling NaN
  for (DType compute : {DType::kF32, DType::kBF16}) {
    SKIP_UNLESS_CPU_RUNS(GetParam(), compute);
    const bool bf16 = compute == DType::kBF16;
    std::mt19937 rng(13);
    std::normal_distribution<float> normal;
    for (int64_t count : {1, 2, 15, 16, 17, 33, 70}) {
      const int64_t steps = bf16 ? (count + 1) / 2 : count;
      for (int num_rows : {1, 5, 12, 16}) {
        std::vector<std::vector<float>> rows(num_rows, std::vector<float>(count));
        const float* row_of[16];
        for (int i = 0; i < num_rows; ++i) {
          for (int64_t k = 0; k < count; ++k) {
            rows[i][k] = (k + i) % 5 == 0 ? specials[(k + 3 * i) % std::size(specials)] : normal(rng);
          }
          row_of[i] = rows[i].data();
        }
        const int64_t stride = num_rows + 3;  // the gaps between steps stay untouched
        std::vector<uint32_t> out(static_cast<size_t>(steps * stride), 0xDEADBEEFu);
        kernels().write_row_steps(compute, row_of, num_rows, count, steps, out.data(), stride);
        for (int64_t s = 0; s < steps; ++s) {
          for (int64_t i = 0; i < stride; ++i) {
            uint32_t expected = 0xDEADBEEFu;
            if (i < num_rows && bf16) {
              const float low = rows[i][2 * s], high = 2 * s + 1 < count ? rows[i][2 * s + 1] : 0.0f;
              expected = FloatToBf16(low) | static_cast<uint32_t>(FloatToBf16(high)) << 16;
            } else if (i < num_rows) {
              expected = Bits(rows[i][s]);
            }
            ASSERT_EQ(out[s * stride + i], expected)
                << CpuPathName(GetParam()) << (bf16 ? " bf16" : " fp32") << " count " << count << " rows " << num_rows
                << " step " << s << " row " << i;
          }
        }
      }
    }
  }
}

TEST_P(PanelKernelsTest, EpiloguesFollowTheActivationsDefinitions) {
  SKIP_UNLESS_CPU_RUNS(GetParam(), DType::kF32);
  std::mt19937 rng(14);
  std::uniform_real_distribution<float> uniform(-6.0f, 6.0f);
  for (Activation act : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh, Activation::kRelu}) {
    for (ExpertKind kind : {ExpertKind::kGlu, ExpertKind::kMlp}) {
      float row[kPanelColumns], bias[kPanelColumns];
      for (int c = 0; c < kPanelColumns; ++c) {
        row[c] = uniform(rng);
        bias[c] = uniform(rng) / 4;
      }
      float out[kPanelColumns];
      std::copy(row, row + kPanelColumns, out);
      kernels().activate_tile_row(kind, act, kind == ExpertKind::kMlp ? bias : nullptr, SwigluClamp{}, out);
      const int width = kind == ExpertKind::kGlu ? kPanelColumns / 2 : kPanelColumns;
      for (int c = 0; c < width; ++c) {
        const double expected = kind == ExpertKind::kGlu ? ReferenceActivation(act, row[c]) * row[kPanelColumns / 2 + c]
                                                         : ReferenceActivation(act, double{row[c]} + bias[c]);
        EXPECT_NEAR(out[c], expected, 1e-5 * (1 + std::fabs(expected))) << static_cast<int>(act) << " column " << c;
      }
    }
  }
}

// gpt-oss: g = min(gate + b, limit), u = clamp(up + b, -limit, limit),
// (u + 1) * g * sigmoid(alpha * g), with values on both sides of the limits.
TEST_P(PanelKernelsTest, ClampedSwigluEpilogueClampsBiasedGateAndUp) {
  SKIP_UNLESS_CPU_RUNS(GetParam(), DType::kF32);
  std::mt19937 rng(15);
  std::uniform_real_distribution<float> uniform(-6.0f, 6.0f);
  const SwigluClamp clamp{.alpha = 1.702f, .limit = 2.5f};
  float row[kPanelColumns], bias[kPanelColumns], out[kPanelColumns];
  for (int c = 0; c < kPanelColumns; ++c) {
    row[c] = uniform(rng);
    bias[c] = uniform(rng) / 4;
  }
  std::copy(row, row + kPanelColumns, out);
  kernels().activate_tile_row(ExpertKind::kClampedSwiglu, Activation::kSilu, bias, clamp, out);
  for (int c = 0; c < kPanelColumns / 2; ++c) {
    const double g = std::min(double{row[c]} + bias[c], 2.5);
    const double u = std::clamp(double{row[16 + c]} + bias[16 + c], -2.5, 2.5);
    const double expected = (u + 1) * g / (1 + std::exp(-1.702 * g));
    EXPECT_NEAR(out[c], expected, 1e-5 * (1 + std::fabs(expected))) << "column " << c;
  }
}

TEST_P(PanelKernelsTest, TileRowsStoreWithTheirBiasAndStopAtTheWidth) {
  SKIP_UNLESS_CPU_RUNS(GetParam(), DType::kF32);
  float row[kPanelColumns], bias[kPanelColumns];
  for (int c = 0; c < kPanelColumns; ++c) {
    row[c] = 0.5f * c - 3;
    bias[c] = 0.25f * c;
  }
  for (int width : {1, 7, 8, 9, 16, 31, 32}) {
    for (const float* b : {static_cast<const float*>(nullptr), static_cast<const float*>(bias)}) {
      std::vector<float> out(kPanelColumns + 1, -9.0f);
      kernels().store_tile_row(row, b, width, out.data());
      for (int c = 0; c <= kPanelColumns; ++c) {
        const float expected = c < width ? row[c] + (b ? b[c] : 0.0f) : -9.0f;
        EXPECT_EQ(out[c], expected) << "width " << width << " column " << c;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, PanelKernelsTest, ::testing::ValuesIn(AllCpuPaths()), CpuPathParamName());

}  // namespace
}  // namespace moe
