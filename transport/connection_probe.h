// ConnectionRefused: the sender's raw-socket probe, asked when gRPC reports
// a failed connection attempt (it would otherwise retry a refused port with
// backoff until its deadline) and when a lost commit cannot be resolved (a
// receiver that refuses connections runs no VM). Knows nothing of gRPC.
//
// Thread-safety: a plain function; blocks up to a second per address.
#pragma once

#include <string>

namespace pmlmig::transport {

// Whether nothing listens at `target` ("host:port"): every address of the
// host actively refuses a TCP connection. A timeout or any other error is
// not a refusal.
bool ConnectionRefused(const std::string& target);

}  // namespace pmlmig::transport
