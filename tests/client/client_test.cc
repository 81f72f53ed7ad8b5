// The client library: .npy round trips and bad files, and the load generator
// in both modes against a real server on loopback.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "client/load_generator.h"
#include "client/npy.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace moe {
namespace {

using ::moe::testing::StatusIs;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  return (std::filesystem::temp_directory_path() / (name + std::to_string(::getpid()))).string();
}

TEST(Npy, RoundTripsFloat32Arrays) {
  const std::string path = TempPath("npy_roundtrip");
  const NpyArray array{{3, 4}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -11.5f}};
  ASSERT_OK(WriteNpy(path, array));
  ASSERT_OK_AND_ASSIGN(NpyArray back, ReadNpy(path));
  EXPECT_EQ(back.shape, array.shape);
  EXPECT_EQ(back.values, array.values);
  // The header is padded so the data starts on a 64-byte boundary (format 1.0).
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ((bytes.size() - 12 * 4) % 64, 0u);
  EXPECT_THAT(bytes, HasSubstr("'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"));
  std::filesystem::remove(path);
}

// No elements, no data: read as such (a fuzzer found the empty copy).
TEST(Npy, ReadsAnEmptyArray) {
  const std::string path = TempPath("npy_empty");
  ASSERT_OK(WriteNpy(path, {{0, 1}, {}}));
  ASSERT_OK_AND_ASSIGN(NpyArray back, ReadNpy(path));
  EXPECT_EQ(back.shape, (std::vector<int64_t>{0, 1}));
  EXPECT_TRUE(back.values.empty());
  std::filesystem::remove(path);
}

TEST(Npy, RejectsWhatItCannotRead) {
  const std::string path = TempPath("npy_bad");
  ASSERT_OK(WriteNpy(path, {{2}, {1, 2}}));
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  auto write = [&](const std::string& content) { std::ofstream(path, std::ios::binary | std::ios::trunc) << content; };
  write(bytes.substr(0, bytes.size() - 1));
  EXPECT_THAT(ReadNpy(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape needs 8")));
  std::string f8 = bytes;
  f8.replace(f8.find("<f4"), 3, "<f8");
  write(f8);
  EXPECT_THAT(ReadNpy(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("float32")));
  write("not numpy at all");
  EXPECT_THAT(ReadNpy(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not a .npy")));
  // Extents whose product overflows (a fuzzer's find).
  std::string huge = bytes;
  huge.replace(huge.find("(2,)"), 4, "(4611686018427387904, 4611686018427387904)");
  write(huge);
  EXPECT_THAT(ReadNpy(path), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("shape too large")));
  EXPECT_THAT(ReadNpy(path + "missing"), StatusIs(absl::StatusCode::kNotFound, HasSubstr("cannot open")));
  std::filesystem::remove(path);
}

class LoadGeneratorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MoeServer::Options options;
    options.grpc_address = "127.0.0.1:0";
    ASSERT_OK_AND_ASSIGN(server_, MoeServer::Create(options));  // the demo model
    client_ = std::make_unique<MoeClient>("127.0.0.1:" + std::to_string(server_->port()));
  }
  std::unique_ptr<MoeServer> server_;
  std::unique_ptr<MoeClient> client_;
};

TEST_F(LoadGeneratorTest, ClosedLoopSendsExactlyTheRequestCount) {
  const LoadReport report = RunLoad(
      *client_,
      {.model = "demo", .hidden = 256, .tokens = 2, .concurrency = 4, .duration = absl::Seconds(60), .requests = 40});
  EXPECT_EQ(report.ok, 40);
  EXPECT_EQ(report.errors, 0);
  EXPECT_NEAR(report.tokens_per_second, 2 * report.requests_per_second, 1e-6 * report.tokens_per_second);
  EXPECT_GT(report.p50_ms, 0);
  EXPECT_LE(report.p50_ms, report.p90_ms);
  EXPECT_LE(report.p90_ms, report.p99_ms);
  EXPECT_LE(report.p99_ms, report.max_ms);
  EXPECT_THAT(report.ToJson(), HasSubstr("\"ok\": 40"));
  EXPECT_THAT(report.ToText(), HasSubstr("requests: 40 ok, 0 errors"));
}

TEST_F(LoadGeneratorTest, OpenLoopKeepsItsRateAndCountsErrors) {
  // 100 requests/s for 1 s: about 100 requests, whatever the server does
  // (fewer only if the sending thread is starved of CPU).
  const LoadReport report =
      RunLoad(*client_, {.model = "demo", .hidden = 256, .tokens = 1, .rate = 100, .duration = absl::Seconds(1)});
  EXPECT_EQ(report.errors, 0);
  EXPECT_GE(report.ok, 50);
  EXPECT_LE(report.ok, 102);
  const LoadReport bad = RunLoad(*client_, {.model = "nope", .hidden = 256, .tokens = 1, .requests = 3});
  EXPECT_EQ(bad.ok, 0);
  EXPECT_EQ(bad.errors, 3);
  EXPECT_THAT(bad.first_error, HasSubstr("unknown model 'nope'"));
}

}  // namespace
}  // namespace moe
