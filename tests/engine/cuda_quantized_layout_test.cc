// The CUDA executor's quantized experts ([DEVICE_QUANT_LAYOUT]:
// engine/cuda/quantized_layout.h and quantized_pack.h) on the host: every
// weight a device thread reads is the published rule's value that the
// checkpoint's QuantizedMatrix gives, for FP8 blocks (partial ones, and a
// view that starts inside a block) and MXFP4 (a view of every other row,
// as gpt-oss's fused gate_up is read), so a GPU computes on the same
// weights as the CPU without a GPU here to show it.
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/api/model_spec.h"
#include "engine/api/quantized.h"
#include "engine/cuda/quantized_layout.h"
#include "engine/cuda/quantized_pack.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace dm = ::moe::device_math;
using ::testing::HasSubstr;

// Bit-equal, NaN equal to NaN.
void ExpectSameFloat(float a, float b, const std::string& what) {
  if (std::isnan(a) || std::isnan(b)) {
    EXPECT_TRUE(std::isnan(a) && std::isnan(b)) << what;
  } else {
    EXPECT_EQ(a, b) << what;
    EXPECT_EQ(std::signbit(a), std::signbit(b)) << what;
  }
}

TEST(DeviceQuantizedTest, CodesDecodeAsTheEnginesDefinitions) {
  for (int code = 0; code < 256; ++code) {
    const auto byte = static_cast<uint8_t>(code);
    ExpectSameFloat(dm::DecodeE4m3(byte), E4m3ToFloat(byte), "e4m3 " + std::to_string(code));
    ExpectSameFloat(dm::DecodeE8m0(byte), E8m0ToFloat(byte), "e8m0 " + std::to_string(code));
  }
  for (int nibble = 0; nibble < 16; ++nibble) {
    const auto n = static_cast<uint8_t>(nibble);
    ExpectSameFloat(dm::DecodeE2m1(n), E2m1ToFloat(n), "e2m1 " + std::to_string(nibble));
  }
}

HostTensor RandomMatrix(int64_t rows, int64_t columns, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> values(static_cast<size_t>(rows * columns));
  for (float& v : values) v = normal(rng);
  return HostTensor::FromFloats({rows, columns}, values, DType::kF32);
}

// One expert of `format`: w1 and w3 [inner, hidden], w2 [hidden, inner].
// FP8 takes blocks of 32 x 64 (partial in both directions) and w1/w3 as
// views 40 rows into larger matrices (inside a block); MXFP4 takes w1 and
// w3 as the even and odd rows of one fused matrix.
FfnWeights QuantizedExpert(QuantFormat format, int hidden, int inner, bool two_products, uint32_t seed) {
  std::mt19937 rng(seed);
  FfnWeights ffn;
  if (format == QuantFormat::kFp8Block) {
    auto view = [&](int64_t rows, int64_t columns, int64_t skip) {
      auto q = QuantizeMatrix(RandomMatrix(rows + skip, columns, rng), format, 32, 64);
      EXPECT_OK(q.status());
      return q->Rows(skip, rows);
    };
    ffn.q1 = view(inner, hidden, 40);
    if (two_products) ffn.q3 = view(inner, hidden, 40);
    ffn.q2 = view(hidden, inner, 0);
  } else {
    auto fused = QuantizeMatrix(RandomMatrix(2 * inner, hidden, rng), format);
    EXPECT_OK(fused.status());
    ffn.q1 = fused->Rows(0, inner, 2);
    if (two_products) ffn.q3 = fused->Rows(1, inner, 2);
    auto down = QuantizeMatrix(RandomMatrix(hidden, inner, rng), format);
    EXPECT_OK(down.status());
    ffn.q2 = *down;
  }
  return ffn;
}

struct Case {
  QuantFormat format;
  bool two_products;
};

class DevicePackTest : public ::testing::TestWithParam<Case> {};

TEST_P(DevicePackTest, EveryWeightIsThePublishedRulesValue) {
  const Case c = GetParam();
  constexpr int kHidden = 96, kInner = 160;
  const FfnWeights ffn = QuantizedExpert(c.format, kHidden, kInner, c.two_products, 7);
  ASSERT_OK_AND_ASSIGN(const dm::QuantFfnLayout layout, cuda::PlanQuantizedFfn(ffn, c.two_products));
  ASSERT_EQ(layout.inner(), kInner);
  ASSERT_EQ(layout.hidden(), kHidden);
  ASSERT_EQ(layout.FirstWidth(), c.two_products ? 2 * kInner : kInner);
  std::vector<uint8_t> slot(static_cast<size_t>(layout.slot_bytes), 0xAB);
  ASSERT_OK(cuda::PackQuantizedFfn(ffn, layout, slot.data()));
  for (int64_t r = 0; r < layout.FirstWidth(); ++r) {
    const QuantizedMatrix& q = r < kInner ? ffn.q1 : ffn.q3;
    const dm::QuantRow row = layout.FirstRow(slot.data(), r);
    for (int k = 0; k < kHidden; ++k) {
      ASSERT_EQ(row.Value(k), q.Value(r % kInner, k)) << "first [" << r << ", " << k << "]";
      // As the decode kernels read a scale block: its scale once, then codes.
      ASSERT_EQ(row.Code(k) * row.Scale(k / row.block_columns), q.Value(r % kInner, k));
    }
  }
  for (int64_t r = 0; r < kHidden; ++r) {
    const dm::QuantRow row = layout.DownRow(slot.data(), r);
    for (int k = 0; k < kInner; ++k) {
      ASSERT_EQ(row.Value(k), ffn.q2.Value(r, k)) << "down [" << r << ", " << k << "]";
    }
  }
  // The expansion's rows: the first matrix's, then the down matrix's, packed
  // one after another.
  const int64_t first = static_cast<int64_t>(layout.FirstWidth()) * kHidden;
  ASSERT_EQ(layout.ExpandedValues(), first + int64_t{kHidden} * kInner);
  ASSERT_EQ(layout.ExpandedRows(), layout.FirstWidth() + kHidden);
  EXPECT_EQ(layout.ExpandedOffset(3), 3 * kHidden);
  EXPECT_EQ(layout.ExpandedWidth(3), kHidden);
  EXPECT_EQ(layout.ExpandedRow(slot.data(), 3).Value(5), layout.FirstRow(slot.data(), 3).Value(5));
  const int down_row = layout.FirstWidth() + 2;
  EXPECT_EQ(layout.ExpandedOffset(down_row), first + 2 * kInner);
  EXPECT_EQ(layout.ExpandedWidth(down_row), kInner);
  EXPECT_EQ(layout.ExpandedRow(slot.data(), down_row).Value(7), ffn.q2.Value(2, 7));
  EXPECT_EQ(layout.ExpandedOffset(layout.ExpandedRows() - 1) + kInner, layout.ExpandedValues());
}

TEST_P(DevicePackTest, ASlotIsTheCheckpointsSize) {
  const Case c = GetParam();
  const FfnWeights ffn = QuantizedExpert(c.format, 512, 256, c.two_products, 3);
  ASSERT_OK_AND_ASSIGN(const dm::QuantFfnLayout layout, cuda::PlanQuantizedFfn(ffn, c.two_products));
  size_t stored = ffn.q1.stored_bytes() + ffn.q2.stored_bytes();
  if (c.two_products) stored += ffn.q3.stored_bytes();
  // Only the 16-byte section padding (and, for a view inside a block, one
  // more block row of scales) is added.
  EXPECT_GE(static_cast<size_t>(layout.slot_bytes), stored);
  EXPECT_LT(static_cast<double>(layout.slot_bytes), 1.02 * static_cast<double>(stored));
}

TEST_P(DevicePackTest, AnotherExpertPacksWithTheSamePlan) {
  const Case c = GetParam();
  const FfnWeights a = QuantizedExpert(c.format, 64, 96, c.two_products, 1);
  const FfnWeights b = QuantizedExpert(c.format, 64, 96, c.two_products, 2);
  ASSERT_OK_AND_ASSIGN(const dm::QuantFfnLayout layout, cuda::PlanQuantizedFfn(a, c.two_products));
  std::vector<uint8_t> slot(static_cast<size_t>(layout.slot_bytes));
  ASSERT_OK(cuda::PackQuantizedFfn(b, layout, slot.data()));
  EXPECT_EQ(layout.DownRow(slot.data(), 5).Value(9), b.q2.Value(5, 9));
  // A differently shaped expert does not.
  const FfnWeights wider = QuantizedExpert(c.format, 64, 128, c.two_products, 3);
  std::vector<uint8_t> big(1 << 20);
  EXPECT_THAT(cuda::PackQuantizedFfn(wider, layout, big.data()),
              testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("laid out unlike")));
}

INSTANTIATE_TEST_SUITE_P(Formats, DevicePackTest,
                         ::testing::Values(Case{QuantFormat::kFp8Block, true}, Case{QuantFormat::kFp8Block, false},
                                           Case{QuantFormat::kMxfp4, true}, Case{QuantFormat::kMxfp4, false}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(QuantFormatName(info.param.format)) +
                                  (info.param.two_products ? "_glu" : "_mlp");
                         });

TEST(DeviceQuantizedTest, RefusesNaNCodesAndScalesAndUnquantizedExperts) {
  FfnWeights ffn = QuantizedExpert(QuantFormat::kFp8Block, 64, 64, true, 5);
  auto codes = std::make_shared<std::vector<uint8_t>>(ffn.q2.values, ffn.q2.values + 64 * 64);
  (*codes)[3 * 64 + 11] = 0xFF;  // -NaN
  ffn.q2.values = codes->data();
  ffn.q2.owner = codes;
  ASSERT_OK_AND_ASSIGN(const dm::QuantFfnLayout layout, cuda::PlanQuantizedFfn(ffn, true));
  std::vector<uint8_t> slot(static_cast<size_t>(layout.slot_bytes));
  EXPECT_THAT(cuda::PackQuantizedFfn(ffn, layout, slot.data()),
              testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("[3, 11] is NaN")));
  std::mt19937 rng(1);
  // An MXFP4 block scale of 0xFF (NaN).
  FfnWeights mxfp4 = QuantizedExpert(QuantFormat::kMxfp4, 64, 64, true, 6);
  auto scales = std::make_shared<std::vector<uint8_t>>(64 * 2, 127);
  (*scales)[5 * 2 + 1] = 0xFF;
  mxfp4.q2.scales = scales->data();
  mxfp4.q2.owner = scales;
  ASSERT_OK_AND_ASSIGN(const dm::QuantFfnLayout mxfp4_layout, cuda::PlanQuantizedFfn(mxfp4, true));
  std::vector<uint8_t> mxfp4_slot(static_cast<size_t>(mxfp4_layout.slot_bytes));
  EXPECT_THAT(cuda::PackQuantizedFfn(mxfp4, mxfp4_layout, mxfp4_slot.data()),
              testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("block [5, 1] is NaN")));
  FfnWeights plain;
  plain.w1 = RandomMatrix(8, 8, rng);
  EXPECT_THAT(cuda::PlanQuantizedFfn(plain, false),
              testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("w1 is not quantized")));
}

}  // namespace
}  // namespace moe
