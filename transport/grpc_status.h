// The one mapping between pmlmig's Status and gRPC's, for every gRPC
// service and client of the transport (migration and control).
#pragma once

#include <grpc/grpc.h>  // GRPC_ARG_*
#include <grpcpp/support/status.h>

#include "pmlmig/base/status.h"

namespace pmlmig::transport {

inline grpc::Status ToGrpc(const Status& s) {
  grpc::StatusCode code = grpc::StatusCode::INTERNAL;
  switch (s.code()) {
    case Code::kOk: return grpc::Status::OK;
    case Code::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case Code::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case Code::kPermissionDenied: code = grpc::StatusCode::PERMISSION_DENIED; break;
    case Code::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case Code::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case Code::kAborted: code = grpc::StatusCode::ABORTED; break;
    case Code::kDataLoss: code = grpc::StatusCode::DATA_LOSS; break;
    case Code::kInternal: code = grpc::StatusCode::INTERNAL; break;
  }
  return grpc::Status(code, s.message());
}

// The code a gRPC status maps to (kOk for OK).
inline Code CodeFromGrpc(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK: return Code::kOk;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE: return Code::kInvalidArgument;
    case grpc::StatusCode::DATA_LOSS: return Code::kDataLoss;
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return Code::kResourceExhausted;
    case grpc::StatusCode::CANCELLED:
    case grpc::StatusCode::ABORTED: return Code::kAborted;
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED: return Code::kUnavailable;
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::UNIMPLEMENTED: return Code::kNotFound;
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNAUTHENTICATED: return Code::kPermissionDenied;
    default: return Code::kInternal;
  }
}

// Channel arguments for bulk page data, the same on both sides: an 8 MiB
// initial HTTP/2 stream window (two 4 MiB batches in flight before the first
// WINDOW_UPDATE, instead of 64 KiB growing by BDP probes). Larger TCP read
// chunks (GRPC_ARG_TCP_*READ_CHUNK_SIZE) were tried and dropped: with TLS,
// gRPC 1.51's secure endpoint then leaks a buffer per connection (LeakSanitizer
// in security_test), and their gain was within this machine's noise
// (docs/BENCHMARKS.md, issue 11).
template <typename Set>
void SetBulkTransferArgs(Set&& set) {
  set(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
}

}  // namespace pmlmig::transport
