#include "client/moe_client.h"

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/client_interceptor.h"
#include "proto/health.grpc.pb.h"

namespace moe {

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

namespace {

// Adds "authorization: Bearer <token>" to every call of a channel, so that
// stubs made on it (of any service) carry it without each call saying so.
class BearerTokenInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit BearerTokenInterceptor(const std::string* header) : header_(*header) {}
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(grpc::experimental::InterceptionHookPoints::PRE_SEND_INITIAL_METADATA)) {
      methods->GetSendInitialMetadata()->insert({"authorization", header_});
    }
    methods->Proceed();
  }

 private:
  const std::string& header_;  // owned by the factory, which the channel keeps
};

class BearerTokenInterceptorFactory : public grpc::experimental::ClientInterceptorFactoryInterface {
 public:
  explicit BearerTokenInterceptorFactory(const std::string& token) : header_("Bearer " + token) {}
  grpc::experimental::Interceptor* CreateClientInterceptor(grpc::experimental::ClientRpcInfo*) override {
    return new BearerTokenInterceptor(&header_);
  }

 private:
  const std::string header_;
};

}  // namespace

absl::StatusOr<MoeClient::Options> MoeClient::WithTlsFiles(Options options, const std::string& ca_file,
                                                           const std::string& cert_file, const std::string& key_file) {
  for (const auto& [path, pem] :
       {std::pair{&ca_file, &options.tls_root_certs}, std::pair{&cert_file, &options.tls_cert_chain},
        std::pair{&key_file, &options.tls_private_key}}) {
    if (path->empty()) continue;
    std::ifstream in(*path);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read '", *path, "'"));
    std::stringstream text;
    text << in.rdbuf();
    *pem = text.str();
    options.tls = true;
  }
  if (cert_file.empty() != key_file.empty()) {
    return absl::InvalidArgumentError("a client certificate needs its key, and a key its certificate");
  }
  return options;
}

MoeClient::MoeClient(const std::string& address) : MoeClient(address, Options()) {}

MoeClient::MoeClient(const std::string& address, const Options& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  std::vector<std::unique_ptr<grpc::experimental::ClientInterceptorFactoryInterface>> interceptors;
  if (!options.token.empty()) interceptors.push_back(std::make_unique<BearerTokenInterceptorFactory>(options.token));
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls) {
    credentials = grpc::SslCredentials({.pem_root_certs = options.tls_root_certs,
                                        .pem_private_key = options.tls_private_key,
                                        .pem_cert_chain = options.tls_cert_chain});
  }
  channel_ =
      grpc::experimental::CreateCustomChannelWithInterceptors(address, credentials, args, std::move(interceptors));
  stub_ = inference::GRPCInferenceService::NewStub(channel_);
}

absl::StatusOr<MoeClient::Health> MoeClient::CheckHealth() {
  using Stub = inference::GRPCInferenceService::Stub;
  Health health;
  auto live = Unary<inference::ServerLiveResponse>(&Stub::ServerLive, inference::ServerLiveRequest());
  if (!live.ok()) return live.status();
  health.live = live->live();
  auto ready = Unary<inference::ServerReadyResponse>(&Stub::ServerReady, inference::ServerReadyRequest());
  if (!ready.ok()) return ready.status();
  health.ready = ready->ready();
  auto readiness = CheckHealthService("readiness");
  if (!readiness.ok()) return readiness.status();
  health.health_readiness = *readiness;
  return health;
}

absl::StatusOr<std::string> MoeClient::CheckHealthService(const std::string& service) {
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  auto health_stub = grpc::health::v1::Health::NewStub(channel_);
  if (auto s = health_stub->Check(&context, request, &response); !s.ok()) return FromGrpcStatus(s);
  return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
}

absl::StatusOr<inference::ServerMetadataResponse> MoeClient::ServerMetadata() {
  return Unary<inference::ServerMetadataResponse>(&inference::GRPCInferenceService::Stub::ServerMetadata,
                                                  inference::ServerMetadataRequest());
}

absl::StatusOr<inference::ModelMetadataResponse> MoeClient::ModelMetadata(const std::string& model,
                                                                          const std::string& version) {
  inference::ModelMetadataRequest request;
  request.set_name(model);
  request.set_version(version);
  return Unary<inference::ModelMetadataResponse>(&inference::GRPCInferenceService::Stub::ModelMetadata, request);
}

absl::StatusOr<inference::ModelConfigResponse> MoeClient::ModelConfig(const std::string& model,
                                                                      const std::string& version) {
  inference::ModelConfigRequest request;
  request.set_name(model);
  request.set_version(version);
  return Unary<inference::ModelConfigResponse>(&inference::GRPCInferenceService::Stub::ModelConfig, request);
}

inference::ModelInferRequest MoeClient::BuildRequest(const InferRequest& r) {
  inference::ModelInferRequest request;
  request.set_model_name(r.model);
  request.set_model_version(r.version);
  auto* input = request.add_inputs();
  input->set_name("hidden_states");
  input->set_datatype("FP32");
  input->add_shape(r.tokens);
  input->add_shape(r.hidden);
  request.add_raw_input_contents()->assign(reinterpret_cast<const char*>(r.input),
                                           static_cast<size_t>(r.tokens) * r.hidden * sizeof(float));
  if (r.return_routing) (*request.mutable_parameters())["return_routing"].set_bool_param(true);
  if (r.layer >= 0) (*request.mutable_parameters())["layer"].set_int64_param(r.layer);
  return request;
}

absl::StatusOr<MoeClient::InferResult> MoeClient::Infer(const InferRequest& r) {
  grpc::ClientContext context;
  if (r.deadline != absl::InfiniteDuration()) context.set_deadline(absl::ToChronoTime(absl::Now() + r.deadline));
  const inference::ModelInferRequest request = BuildRequest(r);
  inference::ModelInferResponse response;
  auto status = stub_->ModelInfer(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  if (response.raw_output_contents_size() != response.outputs_size()) {
    return absl::DataLossError("response has outputs without raw contents");
  }
  InferResult result;
  for (int i = 0; i < response.outputs_size(); ++i) {
    const auto& tensor = response.outputs(i);
    const std::string& raw = response.raw_output_contents(i);
    if (tensor.name() == "expert_ids") {
      result.expert_ids.resize(raw.size() / 4);
      std::memcpy(result.expert_ids.data(), raw.data(), raw.size());
      result.routing_shape.assign(tensor.shape().begin(), tensor.shape().end());
    } else if (tensor.name() == "expert_weights") {
      result.expert_weights.resize(raw.size() / 4);
      std::memcpy(result.expert_weights.data(), raw.data(), raw.size());
    } else {
      std::vector<float> values(raw.size() / 4);
      std::memcpy(values.data(), raw.data(), raw.size());
      result.outputs.push_back(std::move(values));
    }
  }
  return result;
}

}  // namespace moe
