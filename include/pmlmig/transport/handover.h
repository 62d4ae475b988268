// Same-host handover: moving a running VM to another process on this host
// without copying its memory. The source hands its guest memory's file
// descriptors (memfds) to the target over a unix socket (SCM_RIGHTS); the
// target builds its KVM VM over the very same pages, restores the vCPU
// state and resumes on Commit. proto/handover.proto is the wire and its
// state machine; docs/ARCHITECTURE.md, "Same-host handover", the design.
//
//   source: engine::MigrationSource --> HandoverSink (shares_memory())
//   target: HandoverServer --> engine::MigrationTarget (OnSetup with
//           MigrationSetup::shared_memory)
//
// Who may take part: the socket is created 0600, and each side checks the
// other's credentials (SO_PEERCRED). No protobuf type appears here.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/transport/received.h"

namespace pmlmig::transport {

// "unix:PATH" -> PATH; an error for anything else (a handover needs this
// host: the memory is shared, not sent).
Result<std::string> ParseUnixAddress(const std::string& address);

struct HandoverSinkOptions {
  // The receiver's socket (the PATH of "unix:PATH"). Required.
  std::string path;
  // How long Begin keeps trying to connect while the socket is missing or
  // refuses (a receiver still starting). Default 10 s.
  std::chrono::milliseconds connect_timeout{10000};
  // How long each answer may take: the target builds its VM (setup),
  // restores and, verifying, digests the shared memory (final). Default 60 s.
  std::chrono::milliseconds reply_timeout{60000};
  // How long Commit waits for its answer before it resolves. Default 10 s.
  std::chrono::milliseconds commit_timeout{10000};
  // Free text sent in the setup, for the receiver's logs.
  std::string sender_name = "pmlmig";
};

// engine::MigrationSink over a unix socket; shares_memory(): the engine
// sends no page. Thread-safety: as MigrationSink (Abort from any thread).
class HandoverSink final : public engine::MigrationSink {
 public:
  // Checks the options; connects in Begin.
  static Result<std::unique_ptr<HandoverSink>> Create(HandoverSinkOptions options);
  ~HandoverSink() override;

  Status Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory) override;
  Result<engine::TransferStats> SendPages(uint32_t round, engine::PageList& pages) override;
  Result<engine::FinalReply> Finish(const engine::FinalState& state) override;
  engine::CommitResult Commit() override;
  void Abort(const std::string& why) override;
  bool shares_memory() const override { return true; }

  class Impl;

 private:
  explicit HandoverSink(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct HandoverServerOptions {
  // Users besides the receiver's own uid who may hand a VM over. Default:
  // none (root is not allowed unless listed, or the receiver is root).
  std::vector<uid_t> allowed_uids;
  // Most vCPUs and memory regions a setup may announce. Defaults 1024, 64.
  uint32_t max_vcpus = 1024;
  uint32_t max_regions = 64;
  // A connection must send its setup within this. Default 30 s.
  std::chrono::milliseconds handshake_timeout{30000};
  // Between setup and the final state: the source may wait for its moment
  // (a VM handed over later). Default 10 min; 0 = no limit.
  std::chrono::milliseconds idle_timeout{600000};
  // A prepared VM whose Commit does not come within this is discarded.
  // Default 30 s.
  std::chrono::milliseconds commit_timeout{30000};
  // Free text sent in the setup reply.
  std::string receiver_name = "pmlmig";
};

// Listens on a unix socket and receives handovers one at a time, each into
// a target from `factory`. Threads: every method from any thread; the
// factory and the targets run on the server's own thread.
class HandoverServer final : public MigrationReceiver {
 public:
  using TargetFactory = std::function<std::unique_ptr<engine::MigrationTarget>()>;
  // Creates the socket at `path` (which must not exist; a stale socket that
  // nothing listens on is replaced), mode 0600, and starts serving.
  static Result<std::unique_ptr<HandoverServer>> Start(const std::string& path, TargetFactory factory,
                                                       HandoverServerOptions options = {});
  ~HandoverServer() override;  // Shutdown()

  Result<ReceivedMigration> WaitForMigration(std::chrono::steady_clock::time_point deadline) override;
  void RefuseNewMigrations(std::string why) override;
  void Shutdown() override;  // also removes the socket
  const std::string& path() const;

  class Impl;

 private:
  explicit HandoverServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmlmig::transport
