#include "security_flags.h"

#include <filesystem>

namespace pmlmig::tools {

void AddSecurityFlags(CLI::App* cmd, SecurityFlags* f, bool sender) {
  const char* group = "Security";
  const std::string peer = sender ? "the receiver's" : "the sender's";
  cmd->add_option("--tls-ca", f->tls_ca, "PEM CA certificate that must have signed " + peer + " certificate (mutual TLS)")
      ->group(group);
  cmd->add_option("--tls-cert", f->tls_cert, "PEM certificate of this side (scripts/make-certs.sh makes test ones)")
      ->group(group);
  cmd->add_option("--tls-key", f->tls_key, "PEM private key of this side")->group(group);
  if (sender) {
    cmd->add_option("--tls-server-name", f->tls_server_name,
                    "Name the receiver's certificate must carry, if not the host of the target")
        ->group(group);
  }
  cmd->add_option("--token-file", f->token_file,
                  "File (mode 0600) holding a shared secret of 16+ printable characters; both sides need the same")
      ->group(group);
}

void AddDataPathFlag(CLI::App* cmd, std::string* data_path, bool sender, const std::string& group) {
  cmd->add_option("--data-path", *data_path,
                  sender ? "direct: page data on plain TCP connections of their own when the receiver offers them "
                           "(never with TLS; about half gRPC's CPU per byte); grpc: on the gRPC Pages calls"
                         : "direct: offer senders page data on plain TCP connections to the listen port (the only "
                           "port either way; never with TLS); grpc: only the gRPC Pages calls")
      ->check(CLI::IsMember({"direct", "grpc"}))
      ->capture_default_str()
      ->group(group);
}

Result<transport::TransportSecurity> LoadSecurity(const SecurityFlags& f) {
  return transport::LoadTransportSecurity(f.tls_ca, f.tls_cert, f.tls_key, f.token_file, f.tls_server_name);
}

SecurityFlags AbsolutePaths(const SecurityFlags& f) {
  auto abs = [](const std::string& p) {
    if (p.empty()) return p;
    std::error_code ec;
    auto a = std::filesystem::absolute(p, ec);
    return ec ? p : a.string();
  };
  SecurityFlags out = f;
  out.tls_ca = abs(f.tls_ca);
  out.tls_cert = abs(f.tls_cert);
  out.tls_key = abs(f.tls_key);
  out.token_file = abs(f.token_file);
  return out;
}

}  // namespace pmlmig::tools
