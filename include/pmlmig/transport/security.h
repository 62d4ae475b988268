// How the migration port is protected: mutual TLS, a shared secret (token),
// both, or neither (loopback, or --insecure). Used by both sides; no gRPC
// type appears here.
//
//   TLS    the receiver demands a client certificate signed by the CA and
//          verifies it; the sender verifies the receiver's certificate
//          against the same CA and the host name it connects to. Encrypts
//          and authenticates everything on the wire.
//   token  every call carries "authorization: Bearer <token>"; the receiver
//          compares it (in constant time) before it creates any state.
//          Without TLS the token and the guest's memory cross the network in
//          clear: use it alone only on a network you trust.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"

namespace pmlmig::transport {

struct TransportSecurity {
  // Mutual TLS, PEM contents (not paths): all three or none.
  std::string tls_ca_pem;    // the CA that must have signed the peer's certificate
  std::string tls_cert_pem;  // this side's certificate (chain)
  std::string tls_key_pem;   // this side's private key
  // Sender only: the name the receiver's certificate must carry, when it is
  // not the host part of the target (e.g. connecting through a proxy).
  std::string tls_server_name;
  // Shared secret, 16..1024 printable ASCII characters without spaces.
  std::string token;

  bool tls() const { return !tls_cert_pem.empty(); }
  bool authenticated() const { return tls() || !token.empty(); }
};

// Reads the files named by the command line flags (any may be empty) and
// checks them: all three TLS files or none, each readable and PEM; a token
// file that only its owner can read, holding one valid token (a trailing
// newline is ignored). Errors name the flag and the file.
Result<TransportSecurity> LoadTransportSecurity(const std::string& tls_ca, const std::string& tls_cert,
                                                const std::string& tls_key, const std::string& token_file,
                                                const std::string& tls_server_name = "");

// Checks a TransportSecurity built in code (the same rules, no files).
Status ValidateTransportSecurity(const TransportSecurity& sec);

// Splits "host:port" or "[v6-address]:port" into host (without brackets)
// and port. False when there is no ":port".
bool SplitHostPort(std::string_view host_port, std::string* host, std::string* port);

// An address as a person types it: "host:port" or "[v6-address]:port".
struct HostPort {
  std::string host;  // without brackets; never empty
  uint16_t port = 0;
};

// Parses and checks `text`: a host, then ':' and a decimal port 0..65535.
// gRPC itself would take "99999" modulo 65536, an empty port for 443, and a
// non-numeric one for a service name, so nothing reaches it unchecked.
// Errors quote the text and say what is wrong, e.g. "\"127.0.0.1:99999\":
// port 99999 is outside 0..65535"; callers put what the address is for in
// front. Whether port 0 makes sense (a listener picks a free port) is the
// caller's decision.
Result<HostPort> ParseHostPort(std::string_view text);

// Whether "host:port" names a loopback address (127.0.0.0/8, ::1,
// localhost). Anything else, including 0.0.0.0 and [::], is not.
bool IsLoopbackListenAddress(std::string_view host_port);

}  // namespace pmlmig::transport
