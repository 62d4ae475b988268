// The migration port's security flags, shared by `run --migrate-to`,
// `receive` and `migrate`: mutual TLS and/or a token file.
#pragma once

#include <CLI/CLI.hpp>

#include <string>

#include "pmlmig/base/status.h"
#include "pmlmig/transport/security.h"

namespace pmlmig::tools {

struct SecurityFlags {
  std::string tls_ca;
  std::string tls_cert;
  std::string tls_key;
  std::string tls_server_name;  // sender only
  std::string token_file;
};

// Adds --tls-ca, --tls-cert, --tls-key, --token-file (and, for a sender,
// --tls-server-name) to `cmd`, in the group "Security".
void AddSecurityFlags(CLI::App* cmd, SecurityFlags* f, bool sender);

// --data-path direct|grpc (the page data's carrier, shared by the same
// commands), in `group`; `sender` words the help for one side.
void AddDataPathFlag(CLI::App* cmd, std::string* data_path, bool sender, const std::string& group);

// Reads and checks the files; errors name the flag and the file.
Result<transport::TransportSecurity> LoadSecurity(const SecurityFlags& f);

// The same paths made absolute (for another process: 'pmlmig migrate' hands
// them to 'pmlmig run --control').
SecurityFlags AbsolutePaths(const SecurityFlags& f);

}  // namespace pmlmig::tools
