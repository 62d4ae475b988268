#include "pmlmig/transport/security.h"

#include <arpa/inet.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace pmlmig::transport {
namespace {

Result<std::string> ReadSmallFile(const std::string& flag, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return InvalidArgument(flag + " " + path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) return InvalidArgument(flag + " " + path + ": not a regular file");
  if (st.st_size > (1 << 20)) return InvalidArgument(flag + " " + path + ": larger than 1 MiB");
  std::ifstream in(path, std::ios::binary);
  if (!in) return InvalidArgument(flag + " " + path + ": cannot be read");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Status CheckPem(const std::string& flag, const std::string& what, const std::string& pem) {
  if (pem.find("-----BEGIN ") == std::string::npos || pem.find("-----END ") == std::string::npos) {
    return InvalidArgument(flag + ": not a PEM " + what + " (no -----BEGIN/-----END lines)");
  }
  return Status::Ok();
}

Status CheckToken(std::string_view token) {
  if (token.size() < 16) return InvalidArgument("token: " + std::to_string(token.size()) + " characters, at least 16 needed");
  if (token.size() > 1024) return InvalidArgument("token: longer than 1024 characters");
  for (char c : token) {
    if (c <= ' ' || c > '~') return InvalidArgument("token: only printable ASCII without spaces is allowed");
  }
  return Status::Ok();
}

}  // namespace

Status ValidateTransportSecurity(const TransportSecurity& sec) {
  const int tls_parts = !sec.tls_ca_pem.empty() + !sec.tls_cert_pem.empty() + !sec.tls_key_pem.empty();
  if (tls_parts != 0 && tls_parts != 3) {
    return InvalidArgument("TLS needs all three of a CA certificate, a certificate and a private key");
  }
  if (tls_parts == 3) {
    PMLMIG_RETURN_IF_ERROR(CheckPem("the TLS CA file", "certificate", sec.tls_ca_pem));
    PMLMIG_RETURN_IF_ERROR(CheckPem("the TLS certificate file", "certificate", sec.tls_cert_pem));
    PMLMIG_RETURN_IF_ERROR(CheckPem("the TLS key file", "private key", sec.tls_key_pem));
  } else if (!sec.tls_server_name.empty()) {
    return InvalidArgument("a TLS server name needs TLS (a CA certificate, a certificate and a private key)");
  }
  if (!sec.token.empty()) PMLMIG_RETURN_IF_ERROR(CheckToken(sec.token));
  return Status::Ok();
}

Result<TransportSecurity> LoadTransportSecurity(const std::string& tls_ca, const std::string& tls_cert,
                                                const std::string& tls_key, const std::string& token_file,
                                                const std::string& tls_server_name) {
  TransportSecurity sec;
  sec.tls_server_name = tls_server_name;
  if (!tls_ca.empty()) {
    PMLMIG_ASSIGN_OR_RETURN(sec.tls_ca_pem, ReadSmallFile("TLS CA file", tls_ca));
  }
  if (!tls_cert.empty()) {
    PMLMIG_ASSIGN_OR_RETURN(sec.tls_cert_pem, ReadSmallFile("TLS certificate file", tls_cert));
  }
  if (!tls_key.empty()) {
    PMLMIG_ASSIGN_OR_RETURN(sec.tls_key_pem, ReadSmallFile("TLS key file", tls_key));
  }
  if (!token_file.empty()) {
    struct stat st {};
    if (::stat(token_file.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
      char mode[8];
      std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
      return InvalidArgument("token file " + token_file + ": readable or writable by others (mode " + mode +
                             "); run chmod 600 on it");
    }
    PMLMIG_ASSIGN_OR_RETURN(std::string token, ReadSmallFile("token file", token_file));
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
    if (Status s = CheckToken(token); !s.ok()) return InvalidArgument("token file " + token_file + ": " + s.message());
    sec.token = std::move(token);
  }
  PMLMIG_RETURN_IF_ERROR(ValidateTransportSecurity(sec));
  return sec;
}

bool SplitHostPort(std::string_view host_port, std::string* host, std::string* port) {
  size_t colon;
  if (!host_port.empty() && host_port.front() == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string_view::npos || close + 1 >= host_port.size() || host_port[close + 1] != ':') return false;
    *host = std::string(host_port.substr(1, close - 1));
    colon = close + 1;
  } else {
    colon = host_port.rfind(':');
    if (colon == std::string_view::npos) return false;
    *host = std::string(host_port.substr(0, colon));
  }
  *port = std::string(host_port.substr(colon + 1));
  return true;
}

Result<HostPort> ParseHostPort(std::string_view text) {
  const std::string quoted = "\"" + std::string(text) + "\": ";
  auto bad = [&](const std::string& why) { return InvalidArgument(quoted + why); };
  if (text.empty()) return bad("empty (expected HOST:PORT)");
  HostPort out;
  std::string_view port;
  if (text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos) return bad("no ']' after the IPv6 address (expected [ADDRESS]:PORT)");
    if (close + 1 >= text.size() || text[close + 1] != ':') return bad("no ':PORT' after ']' (expected [ADDRESS]:PORT)");
    out.host = std::string(text.substr(1, close - 1));
    port = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no port (expected HOST:PORT)");
    out.host = std::string(text.substr(0, colon));
    port = text.substr(colon + 1);
    if (out.host.find(':') != std::string::npos) {
      return bad("an IPv6 address needs brackets (expected [ADDRESS]:PORT)");
    }
  }
  if (out.host.empty()) return bad("no host before the port (expected HOST:PORT)");
  if (port.empty()) return bad("no port after the ':' (expected HOST:PORT)");
  uint32_t value = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return bad("port '" + std::string(port) + "' is not a decimal number");
    value = value * 10 + static_cast<uint32_t>(c - '0');
    if (value > 65535) return bad("port " + std::string(port) + " is outside 0..65535");
  }
  out.port = static_cast<uint16_t>(value);
  return out;
}

bool IsLoopbackListenAddress(std::string_view host_port) {
  std::string host, port;
  if (!SplitHostPort(host_port, &host, &port)) return false;
  if (host == "localhost") return true;
  in_addr v4{};
  if (::inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  if (::inet_pton(AF_INET6, host.c_str(), &v6) == 1) return IN6_IS_ADDR_LOOPBACK(&v6);
  return false;
}

}  // namespace pmlmig::transport
