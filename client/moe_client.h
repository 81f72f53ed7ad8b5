// MoeClient: a small C++ client for moe-serve (or any Open Inference
// Protocol server): health, metadata and inference. Thread-safe: one client
// may be shared by many threads (gRPC stubs are).
#ifndef MOE_CLIENT_MOE_CLIENT_H_
#define MOE_CLIENT_MOE_CLIENT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/inference.grpc.pb.h"

namespace moe {

// grpc::Status -> absl::Status (codes share their numbering).
absl::Status FromGrpcStatus(const grpc::Status& status);

class MoeClient {
 public:
  struct Options {
    // Sent on every call as "authorization: Bearer <token>" metadata, for a
    // server started with --auth_token_file. Empty: none.
    std::string token{};
    // TLS: the server's certificate is checked against `tls_root_certs`
    // (PEM; empty: the system's roots). With a certificate chain and its
    // key (PEM), the client presents them (mutual TLS).
    bool tls = false;
    std::string tls_root_certs{};
    std::string tls_cert_chain{};
    std::string tls_private_key{};
  };

  // Options with the PEM files read: TLS when any of the three is given.
  // NOT_FOUND naming a file that cannot be read.
  static absl::StatusOr<Options> WithTlsFiles(Options options, const std::string& ca_file, const std::string& cert_file,
                                              const std::string& key_file);

  // Connects lazily to `address` ("host:port").
  explicit MoeClient(const std::string& address);
  MoeClient(const std::string& address, const Options& options);

  struct Health {
    bool live = false;
    bool ready = false;
    std::string health_readiness;  // grpc.health.v1 status of "readiness"
  };
  absl::StatusOr<Health> CheckHealth();
  // The standard gRPC health service's status of `service` ("SERVING",
  // "NOT_SERVING", ...); NOT_FOUND when the server has no such service. Needs
  // only grpc.health.v1, so it also asks servers that are no inference
  // server, moe-worker among them.
  absl::StatusOr<std::string> CheckHealthService(const std::string& service);
  absl::StatusOr<inference::ServerMetadataResponse> ServerMetadata();
  absl::StatusOr<inference::ModelMetadataResponse> ModelMetadata(const std::string& model,
                                                                 const std::string& version = "");
  absl::StatusOr<inference::ModelConfigResponse> ModelConfig(const std::string& model, const std::string& version = "");

  struct InferRequest {
    std::string model{};
    std::string version{};
    // fp32 [tokens, hidden], sent raw.
    const float* input = nullptr;
    int tokens = 0;
    int hidden = 0;
    bool return_routing = false;
    int layer = -1;  // -1: every layer
    absl::Duration deadline = absl::InfiniteDuration();
  };
  struct InferResult {
    std::vector<std::vector<float>> outputs;  // per task, [tokens, hidden]
    std::vector<int32_t> expert_ids;          // [tokens, layers, slots]
    std::vector<float> expert_weights;
    std::vector<int64_t> routing_shape;
  };
  absl::StatusOr<InferResult> Infer(const InferRequest& request);

  // The request message Infer sends, for callers that build their own.
  static inference::ModelInferRequest BuildRequest(const InferRequest& request);

  inference::GRPCInferenceService::Stub& stub() { return *stub_; }
  // The channel, for stubs of other services; its calls carry the token.
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }

 private:
  // Calls the unary `method` of the stub and converts its status.
  template <typename Response, typename Request, typename Method>
  absl::StatusOr<Response> Unary(Method method, const Request& request) {
    grpc::ClientContext context;
    Response response;
    const grpc::Status status = ((*stub_).*method)(&context, request, &response);
    if (!status.ok()) return FromGrpcStatus(status);
    return response;
  }

  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
};

}  // namespace moe

#endif  // MOE_CLIENT_MOE_CLIENT_H_
