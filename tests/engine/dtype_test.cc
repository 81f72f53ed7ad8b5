// Conversions between fp32, bf16 and fp16, exhaustively where the domain allows.
#include "engine/api/dtype.h"

#include <cmath>
#include <limits>

#include "tests/test_util.h"

namespace moe {
namespace {

TEST(F16, EveryHalfSurvivesARoundTripThroughFloat) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = F16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(F16ToFloat(FloatToF16(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToF16(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(F16, KnownValuesAndRoundingToNearestEven) {
  EXPECT_EQ(F16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(F16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(F16ToFloat(0x7bff), 65504.0f);                          // largest finite
  EXPECT_EQ(F16ToFloat(0x0001), std::ldexp(1.0f, -24));             // smallest subnormal
  EXPECT_EQ(FloatToF16(65520.0f), 0x7c00);                          // rounds to infinity
  EXPECT_EQ(FloatToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // halfway: to even (down)
  EXPECT_EQ(FloatToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // halfway: to even (up)
  EXPECT_EQ(FloatToF16(std::ldexp(1.0f, -25)), 0x0000);             // halfway to the smallest subnormal: to even (zero)
  EXPECT_EQ(FloatToF16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(FloatToF16(-0.0f), 0x8000);
  EXPECT_EQ(FloatToF16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(FloatToF16(1e-10f), 0x0000);
}

TEST(Bf16, RoundsToNearestEvenAndKeepsNaN) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // halfway: to even
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // halfway: to even (up)
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(b));
    if (!std::isnan(f)) {
      EXPECT_EQ(FloatToBf16(f), b);
    }
  }
}

TEST(Conversions, BulkConversionsMatchTheScalarOnes) {
  const std::vector<float> values = {0.1f, -3.5f, 1e-6f, 70000.0f, 2.0f};
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<std::byte> bytes(values.size() * DTypeSize(dtype));
    ConvertFromFloat(dtype, values.data(), values.size(), bytes.data());
    std::vector<float> back(values.size());
    ConvertToFloat(dtype, bytes.data(), values.size(), back.data());
    for (size_t i = 0; i < values.size(); ++i) {
      const float expected = dtype == DType::kF32    ? values[i]
                             : dtype == DType::kBF16 ? RoundToBf16(values[i])
                                                     : F16ToFloat(FloatToF16(values[i]));
      EXPECT_EQ(back[i], expected) << DTypeName(dtype) << " " << values[i];
    }
  }
  EXPECT_EQ(DTypeName(DType::kF16), "F16");
  EXPECT_THAT(ParseDType("F64"),
              ::moe::testing::StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("'F64'")));
}

}  // namespace
}  // namespace moe
