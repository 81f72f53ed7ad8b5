// The comparison every backend test relies on cannot pass by accident: a
// size mismatch is a test failure naming both sizes and an infinite error,
// and a NaN makes the error NaN, so that any tolerance check on it fails.
#include "tests/test_util.h"

#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest-spi.h"

namespace moe {
namespace {

using ::moe::testing::NormalizedMaxError;

TEST(NormalizedMaxError, IsTheLargestDifferenceOverTheLargestReference) {
  EXPECT_EQ(NormalizedMaxError({1.0f, 2.0f, 4.0f}, {1.0f, 2.5f, -5.0f}), 9.0 / 5.0);
  EXPECT_EQ(NormalizedMaxError({}, {}), 0.0);
}

TEST(NormalizedMaxError, DifferentSizesAreATestFailureNamingBoth) {
  double error = 0;
  EXPECT_NONFATAL_FAILURE(error = NormalizedMaxError({1.0f, 2.0f, 3.0f}, {1.0f, 2.0f}), "3 values against 2 expected");
  EXPECT_EQ(error, std::numeric_limits<double>::infinity());
  EXPECT_NONFATAL_FAILURE(error = NormalizedMaxError({}, {1.0f}), "0 values against 1 expected");
  EXPECT_EQ(error, std::numeric_limits<double>::infinity());
}

TEST(NormalizedMaxError, ANanAnywhereIsANanError) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(NormalizedMaxError({1.0f, nan, 3.0f}, {1.0f, 2.0f, 3.0f})));
  EXPECT_TRUE(std::isnan(NormalizedMaxError({1.0f, 2.0f}, {nan, 2.0f})));
}

}  // namespace
}  // namespace moe
