// The one place where an absl::Status becomes a grpc::Status: the codes map
// one to one and the message is bounded, so a huge error never becomes a huge
// trailer. Pure function: thread-safe.
#ifndef MOE_SERVER_FRONTEND_GRPC_STATUS_H_
#define MOE_SERVER_FRONTEND_GRPC_STATUS_H_

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace moe {

// Longest message sent to a client.
inline constexpr size_t kMaxStatusMessageBytes = 1024;

grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace moe

#endif  // MOE_SERVER_FRONTEND_GRPC_STATUS_H_
