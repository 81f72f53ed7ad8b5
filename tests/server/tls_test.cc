// TLS and mutual TLS on moe-serve's gRPC port, with certificates made by the
// openssl command line for each test process: a client that trusts another
// CA, an expired certificate and a missing or foreign client certificate
// are refused; certificates replaced on disk are served without a restart.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "client/moe_client.h"
#include "server/server.h"
#include "tests/test_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using ::moe::testing::StatusIs;

// Certificates in a directory of their own: CAs, and leaves they sign for
// "localhost" and 127.0.0.1 (each usable by a server and a client).
class Pki {
 public:
  static bool Available() { return std::system("openssl version > /dev/null 2>&1") == 0; }

  Pki() : dir_(::moe::testing::ProcessTempDir("moe_tls_test")) {
    std::ofstream(dir_ + "/san.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
  }

  // A self-signed CA `name` (name.pem, name.key).
  void MakeCa(const std::string& name) {
    Run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=" + name +
        " -keyout " + Path(name + ".key") + " -out " + Path(name + ".pem"));
  }
  // A certificate `name` signed by CA `ca`, valid for `days` from now (-1:
  // expired yesterday).
  void MakeLeaf(const std::string& name, const std::string& ca, int days = 30) {
    Run("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost -keyout " +
        Path(name + ".key") + " -out " + Path(name + ".csr"));
    Run("openssl x509 -req -in " + Path(name + ".csr") + " -CA " + Path(ca + ".pem") + " -CAkey " + Path(ca + ".key") +
        " -set_serial " + std::to_string(++serial_) + " -days " + std::to_string(days) + " -extfile " +
        Path("san.ext") + " -out " + Path(name + ".pem"));
  }
  std::string Path(const std::string& file) const { return dir_ + "/" + file; }
  std::string Pem(const std::string& file) const {
    std::ifstream in(Path(file));
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }

 private:
  static void Run(const std::string& command) {
    ASSERT_EQ(std::system((command + " > /dev/null 2>&1").c_str()), 0) << command;
  }
  const std::string dir_;
  int serial_ = 0;
};

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!Pki::Available()) GTEST_SKIP() << "no openssl command";
    pki_.MakeCa("ca");
    pki_.MakeCa("other_ca");
    pki_.MakeLeaf("server", "ca");
    pki_.MakeLeaf("client", "ca");
    pki_.MakeLeaf("foreign_client", "other_ca");
  }

  void Start(const TlsFiles& tls) {
    MoeServer::Options options;
    options.grpc_address = "127.0.0.1:0";
    // The built-in demo model: what is served does not matter here.
    options.tls = tls;
    ASSERT_OK_AND_ASSIGN(server_, MoeServer::Create(options));
  }

  // ServerMetadata from a new client with `ca` as its roots ("": none, plaintext)
  // and the client certificate `client` ("": none).
  absl::Status Call(const std::string& ca, const std::string& client = "") {
    MoeClient::Options options;
    if (!ca.empty()) {
      options.tls = true;
      options.tls_root_certs = pki_.Pem(ca + ".pem");
    }
    if (!client.empty()) {
      options.tls_cert_chain = pki_.Pem(client + ".pem");
      options.tls_private_key = pki_.Pem(client + ".key");
    }
    MoeClient moe_client("127.0.0.1:" + std::to_string(server_->port()), options);
    return moe_client.ServerMetadata().status();
  }

  Pki pki_;
  std::unique_ptr<MoeServer> server_;
};

TEST_F(TlsTest, ServesClientsThatTrustItsCaAndRefusesOthers) {
  Start({.cert_file = pki_.Path("server.pem"), .key_file = pki_.Path("server.key")});
  EXPECT_OK(Call("ca"));
  EXPECT_OK(Call("ca", "client"));  // a certificate nobody asked for is harmless
  EXPECT_THAT(Call("other_ca"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
  EXPECT_THAT(Call(""), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
}

TEST_F(TlsTest, AnExpiredServerCertificateIsRefused) {
  pki_.MakeLeaf("expired", "ca", /*days=*/-1);
  Start({.cert_file = pki_.Path("expired.pem"), .key_file = pki_.Path("expired.key")});
  EXPECT_THAT(Call("ca"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
}

TEST_F(TlsTest, WithACaClientsMustPresentACertificateItSigned) {
  pki_.MakeLeaf("expired_client", "ca", /*days=*/-1);
  Start({.cert_file = pki_.Path("server.pem"), .key_file = pki_.Path("server.key"), .ca_file = pki_.Path("ca.pem")});
  EXPECT_OK(Call("ca", "client"));
  EXPECT_THAT(Call("ca"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
  EXPECT_THAT(Call("ca", "foreign_client"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
  EXPECT_THAT(Call("ca", "expired_client"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
}

TEST_F(TlsTest, CertificatesReplacedOnDiskAreServedWithoutARestart) {
  pki_.MakeLeaf("rotated", "other_ca");
  const std::string cert = pki_.Path("live.pem"), key = pki_.Path("live.key");
  fs::copy_file(pki_.Path("server.pem"), cert, fs::copy_options::overwrite_existing);
  fs::copy_file(pki_.Path("server.key"), key, fs::copy_options::overwrite_existing);
  Start({.cert_file = cert, .key_file = key});
  ASSERT_OK(Call("ca"));
  // The new pair, each file replaced at once (rename).
  fs::copy_file(pki_.Path("rotated.key"), key + ".new", fs::copy_options::overwrite_existing);
  fs::copy_file(pki_.Path("rotated.pem"), cert + ".new", fs::copy_options::overwrite_existing);
  fs::rename(key + ".new", key);
  fs::rename(cert + ".new", cert);
  // gRPC looks at the files every second; new connections get the new pair.
  const absl::Time deadline = absl::Now() + absl::Seconds(15);
  while (!Call("other_ca").ok() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(200));
  EXPECT_OK(Call("other_ca"));
  EXPECT_THAT(Call("ca"), StatusIs(absl::StatusCode::kUnavailable, ::testing::_));
}

TEST(TlsFiles, BadFilesFailTheStartNamingThem) {
  EXPECT_THAT(ServerCredentialsFor({.cert_file = "/nonexistent/cert.pem", .key_file = "/nonexistent/key.pem"}),
              StatusIs(absl::StatusCode::kNotFound, ::testing::HasSubstr("/nonexistent/cert.pem")));
  EXPECT_THAT(ServerCredentialsFor({.cert_file = "cert.pem"}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("both the certificate and the key")));
  EXPECT_THAT(ServerCredentialsFor({.ca_file = "ca.pem"}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("certificate and key too")));
  const std::string not_pem = ::moe::testing::ProcessTempDir("moe_tls_test_files") + "/not.pem";
  std::ofstream(not_pem) << "hello\n";
  EXPECT_THAT(ServerCredentialsFor({.cert_file = not_pem, .key_file = not_pem}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("holds no PEM block")));
  // The client side (links to workers).
  EXPECT_THAT(ChannelCredentialsFor({.ca_file = "/nonexistent/ca.pem"}),
              StatusIs(absl::StatusCode::kNotFound, ::testing::HasSubstr("/nonexistent/ca.pem")));
  EXPECT_THAT(ChannelCredentialsFor({.cert_file = not_pem}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("needs its key")));
  EXPECT_THAT(ChannelCredentialsFor({.ca_file = not_pem}),
              StatusIs(absl::StatusCode::kInvalidArgument, ::testing::HasSubstr("holds no PEM block")));
  EXPECT_OK(ChannelCredentialsFor({}));  // the system's roots
}

}  // namespace
}  // namespace moe
