// The control API of a running VM (`pmlmig run --control PATH`): gRPC on a
// unix socket created with mode 0600. The server side calls a ControlHandler
// that the VM's owner implements; the client side is three calls. No
// protobuf type appears here (proto/control.proto is the wire format).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/transport/grpc_sink.h"

namespace pmlmig::transport {

struct MigrateCommand {
  std::string to;
  uint32_t streams = 0;  // 0: the sink's default (DefaultStreams())
  std::string compress = "none";
  uint64_t max_bandwidth = 0;
  uint32_t downtime_limit_ms = 300;
  uint32_t max_rounds = 50;
  uint64_t timeout_ms = 0;
  bool force_on_timeout = false;
  bool verify = false;
  engine::VerifyOrder verify_order = engine::VerifyOrder::kAfterCommit;
  engine::ConvergeAid aid = engine::ConvergeAid::kNone;
  double dirty_limit_pages_per_s = 0;  // dirty-limit's per-vCPU quota; 0: derived
  uint32_t stall_rounds = 5;           // 0: only max_rounds and the timeout end it
  engine::PostcopyMode postcopy = engine::PostcopyMode::kOff;
  uint64_t postcopy_recovery_ms = 300000;  // resuming a broken post-copy link; 0: never
  // Page data on the gRPC Pages calls even where the receiver offers direct
  // data streams (GrpcSinkOptions::direct_data off).
  bool grpc_data = false;
  bool local = false;  // a same-host handover to `to` = "unix:PATH" (handover.h): no page is copied
  // A snapshot to this file (engine/snapshot_sink.h) instead of a migration
  // (`to` unused): with live rounds while the VM runs (else paused for the
  // whole write); the VM stops once it is complete (else it runs on).
  std::string snapshot_to;
  bool live = false;
  bool snapshot_stop = false;
  // Security of the migration port: paths (absolute) read by the VM's process.
  std::string tls_ca, tls_cert, tls_key, tls_server_name, token_file;
};

// What a MigrateCommand asks of the sink (security files read, options
// checked) and of the engine. The one place a command's migration request
// becomes options: `run --migrate-to` and the control API both use it.
Result<GrpcSinkOptions> SinkOptionsFor(const MigrateCommand& command);
engine::MigrationOptions MigrationOptionsFor(const MigrateCommand& command);
// The sink a command asks for: the gRPC sink; with `local` the same-host
// HandoverSink; with `snapshot_to` a SnapshotSink (their options checked:
// no compression, limit or TLS; a snapshot has no post-copy).
Result<std::unique_ptr<engine::MigrationSink>> SinkFor(const MigrateCommand& command);

struct ControlStatus {
  std::string vm = "running";      // running, migrated, failed, paused-in-doubt
  uint64_t pages_written = 0;
  std::string migration = "none";  // none, active, completed, failed, cancelled, in-doubt
  std::string phase;
  uint32_t round = 0;
  uint64_t remaining_pages = 0;
  double bandwidth_mbps = 0;
  double expected_downtime_ms = 0;
  uint64_t sent_bytes = 0;
  double elapsed_ms = 0;
  uint32_t throttle_pct = 0;
  double vcpu_quota_pages_per_s = 0;
  std::vector<engine::VcpuRate> vcpus;  // held_ns and the quota only, with the rates
  uint64_t postcopy_requests = 0;
  std::string error;
  std::string stats_json;
};

// Implemented by whoever runs the VM; called on gRPC threads.
class ControlHandler {
 public:
  virtual ~ControlHandler() = default;
  virtual Status StartMigration(const MigrateCommand& command) = 0;  // returns once started or refused
  virtual ControlStatus GetStatus() = 0;
  virtual Status CancelMigration() = 0;
};

class ControlServer {
 public:
  // Listens on the unix socket `path` (which must not exist), mode 0600.
  static Result<std::unique_ptr<ControlServer>> Start(const std::string& path, ControlHandler& handler);
  ~ControlServer();  // stops and removes the socket

  class Impl;

 private:
  explicit ControlServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Client calls; errors name the socket and what the VM answered.
Status ControlMigrate(const std::string& path, const MigrateCommand& command);
Result<ControlStatus> ControlGetStatus(const std::string& path);
Status ControlCancel(const std::string& path);

}  // namespace pmlmig::transport
