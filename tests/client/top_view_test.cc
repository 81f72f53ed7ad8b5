// `moe-client top` rendered from two recorded /metrics samples of moe-serve
// (testdata/metrics_before.txt and metrics_after.txt, one second apart in the
// test's terms), and the text-format parser and quantile it relies on.
#include "client/top_view.h"

#include <fstream>

#include "tests/test_util.h"

namespace moe {
namespace {

using ::testing::HasSubstr;

std::vector<MetricSample> Load(const std::string& name) {
  std::ifstream in(std::string(MOE_SOURCE_DIR) + "/tests/client/testdata/" + name);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto samples = ParseMetricsText(text);
  EXPECT_OK(samples);
  return samples.ok() ? *samples : std::vector<MetricSample>();
}

TEST(TopView, RendersRatesAndEachExpertsShareOfItsLayer) {
  const std::string view = RenderTop(Load("metrics_after.txt"), Load("metrics_before.txt"), 1.0, {});
  // 20380 - 13496 tokens, 5095 - 3374 requests, 1271 - 841 batches in 1 s.
  EXPECT_THAT(view, HasSubstr("model demo"));
  EXPECT_THAT(view, HasSubstr("tokens/s     6884.0"));
  EXPECT_THAT(view, HasSubstr("requests/s   1721.0"));
  EXPECT_THAT(view, HasSubstr("batches/s   430.0"));
  EXPECT_THAT(view, HasSubstr("tokens/batch   16.0"));
  // Layer 0: 13768 selections = 6884 tokens x top-2.
  EXPECT_THAT(view, HasSubstr("layer 0   13768 selections (13768.0/s)"));
  EXPECT_THAT(view, HasSubstr("  e1     12.5% |####################                    |\n"));
  EXPECT_THAT(view, HasSubstr("  e3     25.0% |########################################|  <- hottest\n"));
  EXPECT_THAT(view, HasSubstr("  e0      0.0% |                                        |  <- coldest\n"));
  EXPECT_THAT(view, HasSubstr("layer 1"));
  EXPECT_THAT(view, HasSubstr("latency ms  p50"));
  EXPECT_THAT(view, ::testing::Not(HasSubstr("p50     -")));
}

TEST(TopView, FirstScreenShowsTotalsSinceStart) {
  const std::string view = RenderTop(Load("metrics_before.txt"), {}, 0, {.model = "demo", .bar_width = 10});
  EXPECT_THAT(view, HasSubstr("totals since start"));
  EXPECT_THAT(view, HasSubstr("layer 0   26992 selections   imbalance"));
  EXPECT_THAT(view, HasSubstr("  e3     25.0% |##########|  <- hottest"));
}

TEST(TopView, UnknownModelSaysSo) {
  EXPECT_EQ(RenderTop({}, {}, 1.0, {}), "no moe-serve models found in the metrics\n");
}

TEST(ParseMetricsText, ReadsLabelsEscapesAndSpecialValues) {
  ASSERT_OK_AND_ASSIGN(auto samples, ParseMetricsText("# HELP x y\nx_total{a=\"q\\\"uote\",b=\"2\"} 3.5\n"
                                                      "h_bucket{le=\"+Inf\"} 7\nup +Inf\n\n"));
  ASSERT_EQ(samples.size(), 3u);
  EXPECT_EQ(samples[0].name, "x_total");
  EXPECT_EQ(samples[0].labels.at("a"), "q\"uote");
  EXPECT_EQ(samples[0].value, 3.5);
  EXPECT_EQ(samples[1].labels.at("le"), "+Inf");
  EXPECT_TRUE(std::isinf(samples[2].value));
  EXPECT_THAT(ParseMetricsText("x{a=\"1\" 2\n"),
              ::moe::testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 1")));
  EXPECT_THAT(ParseMetricsText("ok 1\nbad abc\n"),
              ::moe::testing::StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("line 2")));
}

TEST(HistogramQuantile, InterpolatesInsideTheBucketAsPrometheusDoes) {
  // 10 below 1 ms, 10 between 1 and 2 ms, none above.
  const std::vector<std::pair<double, double>> buckets = {{0.001, 10}, {0.002, 20}, {HUGE_VAL, 20}};
  EXPECT_DOUBLE_EQ(HistogramQuantile(0.5, buckets), 0.001);
  EXPECT_DOUBLE_EQ(HistogramQuantile(0.75, buckets), 0.0015);
  EXPECT_DOUBLE_EQ(HistogramQuantile(0.25, buckets), 0.0005);
  EXPECT_TRUE(std::isnan(HistogramQuantile(0.5, {})));
}

}  // namespace
}  // namespace moe
