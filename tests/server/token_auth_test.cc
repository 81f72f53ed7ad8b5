// Bearer tokens from a file: what is refused with which code, constant-time
// comparison, and the file read again when it changes (and only then, and
// no more often than asked).
#include "server/frontend/token_auth.h"

#include <filesystem>
#include <fstream>

#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::StatusIs;
using ::testing::HasSubstr;
using ::testing::Not;

using Metadata = std::multimap<grpc::string_ref, grpc::string_ref>;

std::string TokenFile(const std::string& name, const std::string& text) {
  const std::string path = ::moe::testing::ProcessTempDir("moe_token_auth_test") + "/" + name;
  std::ofstream(path) << text;
  return path;
}

// Writes `text` to a new file and renames it over `path` (as a Secret
// update does): a new inode, whatever the clock's granularity.
void Replace(const std::string& path, const std::string& text) {
  std::ofstream(path + ".new") << text;
  fs::rename(path + ".new", path);
}

absl::Status CheckHeader(TokenAuthenticator& auth, const std::string& value) {
  const Metadata metadata = {{"authorization", value}};
  return auth.Check(metadata);
}

TEST(TokenAuthenticator, NoTokenIsUnauthenticatedAndAWrongOneIsDenied) {
  const std::string path = TokenFile("tokens", "# operators\n\n  alpha-1 \nbeta-2\n");
  ASSERT_OK_AND_ASSIGN(auto auth, TokenAuthenticator::Create({.token_file = path}));
  EXPECT_THAT(auth->Check(Metadata{}), StatusIs(absl::StatusCode::kUnauthenticated, HasSubstr("Bearer <token>")));
  EXPECT_THAT(CheckHeader(*auth, "Basic YWxwaGEtMQ=="), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_));
  EXPECT_THAT(CheckHeader(*auth, "Bearer "), StatusIs(absl::StatusCode::kUnauthenticated, ::testing::_));
  EXPECT_OK(CheckHeader(*auth, "Bearer alpha-1"));
  EXPECT_OK(CheckHeader(*auth, "bearer beta-2"));  // the scheme is case-insensitive
  for (const std::string wrong : {"alpha-", "alpha-11", "beta-3", "# operators", "alpha-1beta-2"}) {
    const absl::Status status = CheckHeader(*auth, "Bearer " + wrong);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_)) << wrong;
    // A refusal never repeats what was presented.
    EXPECT_THAT(std::string(status.message()), Not(HasSubstr(wrong))) << wrong;
  }
}

TEST(TokenAuthenticator, ReadsTheFileAgainWhenItChanges) {
  const std::string path = TokenFile("reloaded", "alpha\n");
  ASSERT_OK_AND_ASSIGN(auto auth,
                       TokenAuthenticator::Create({.token_file = path, .reload_interval = absl::ZeroDuration()}));
  EXPECT_OK(CheckHeader(*auth, "Bearer alpha"));
  Replace(path, "beta\n");
  EXPECT_THAT(CheckHeader(*auth, "Bearer alpha"), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
  EXPECT_OK(CheckHeader(*auth, "Bearer beta"));
  // Rewritten in place, longer.
  std::ofstream(path) << "beta\ngamma\n";
  EXPECT_OK(CheckHeader(*auth, "Bearer gamma"));
  // Emptied: every token is revoked.
  Replace(path, "# none\n");
  EXPECT_THAT(CheckHeader(*auth, "Bearer beta"), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
}

TEST(TokenAuthenticator, LooksAtTheFileNoMoreOftenThanTheInterval) {
  const std::string path = TokenFile("slow", "alpha\n");
  ASSERT_OK_AND_ASSIGN(auto auth, TokenAuthenticator::Create({.token_file = path, .reload_interval = absl::Hours(1)}));
  Replace(path, "beta\n");
  EXPECT_OK(CheckHeader(*auth, "Bearer alpha"));
  EXPECT_THAT(CheckHeader(*auth, "Bearer beta"), StatusIs(absl::StatusCode::kPermissionDenied, ::testing::_));
}

TEST(TokenAuthenticator, AFileThatCannotBeReadAgainKeepsTheTokensReadLast) {
  const std::string path = TokenFile("removed", "alpha\n");
  ASSERT_OK_AND_ASSIGN(auto auth,
                       TokenAuthenticator::Create({.token_file = path, .reload_interval = absl::ZeroDuration()}));
  fs::remove(path);
  EXPECT_OK(CheckHeader(*auth, "Bearer alpha"));
  std::ofstream(path) << "beta\n";
  EXPECT_OK(CheckHeader(*auth, "Bearer beta"));
}

TEST(TokenAuthenticator, CreateFailsWithoutAReadableFileOfTokens) {
  EXPECT_THAT(TokenAuthenticator::Create({.token_file = "/nonexistent/tokens"}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("/nonexistent/tokens")));
  EXPECT_THAT(TokenAuthenticator::Create({.token_file = TokenFile("empty", "\n# nothing\n")}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("holds no token")));
  EXPECT_THAT(TokenAuthenticator::Create({}), StatusIs(absl::StatusCode::kInvalidArgument, ::testing::_));
}

TEST(ConstantTimeEquals, ComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secreT", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secretsecret", "secret"));  // b repeated is not b
  EXPECT_FALSE(ConstantTimeEquals("", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("s", ""));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
}

}  // namespace
}  // namespace moe
