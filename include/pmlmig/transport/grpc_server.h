// MigrationServer: the receiving side of the migration transport. It serves
// the gRPC service of proto/migration.proto (protocol version 2; the state
// machine, limits and rejections are described at the top of that file), one
// migration at a time, and drives an engine::MigrationTarget made by the
// caller's factory for each migration.
//
// It never writes outside the target's guest memory: every batch is checked
// against target->memory() (and its checksum) before anything is written.
// No protobuf or gRPC type appears in this header.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/transport/received.h"
#include "pmlmig/transport/security.h"

namespace pmlmig::transport {

struct MigrationServerOptions {
  // Most Pages streams a sender may announce. Default 64 (also the maximum).
  uint32_t max_streams = 64;
  // Most guest memory a Setup may ask for, in bytes. Default 0: what the
  // host has available (MemAvailable) when the Setup arrives.
  uint64_t max_memory_bytes = 0;
  // Most vCPUs a Setup may ask for. Default 1024.
  uint32_t max_vcpus = 1024;
  // How long Final waits for batches still being applied before it refuses
  // with DATA_LOSS. Default 5 s.
  std::chrono::milliseconds final_drain_timeout{5000};
  // How long a sender may take from opening the control stream to a valid
  // Setup. Default 30 s.
  std::chrono::milliseconds handshake_timeout{30000};
  // How long a migration may stay silent while receiving (no batch applied,
  // no control message) before it fails; in post-copy, how long no owed
  // page may arrive (the VM is then discarded). Default 60 s; 0 = no limit.
  std::chrono::milliseconds idle_timeout{60000};
  // How long a prepared VM waits for Commit before it is discarded.
  // Default 30 s.
  std::chrono::milliseconds commit_timeout{30000};
  // Post-copy: how long a VM whose link to the source broke runs on,
  // waiting for the source to resume (proto PostcopyResume), before it is
  // discarded. vCPUs touching a missing page wait meanwhile. Longer than a
  // sender's own window (GrpcSinkOptions::postcopy_recovery) so that the
  // source gives up first. Default 10 min; 0 = discard at once (0.6).
  std::chrono::milliseconds postcopy_recovery_timeout{600000};
  // Longest a migration may take from Hello to Final. Default 0: no limit.
  std::chrono::milliseconds max_duration{0};
  // Who may connect: mutual TLS and/or a token (see security.h).
  TransportSecurity security;
  // Listening on an address other than loopback without TLS or a token is
  // refused unless this is set.
  bool allow_insecure = false;
  // HTTP/2 keepalive pings to the sender after this much idle time... Default 5 s.
  std::chrono::milliseconds keepalive_time{5000};
  // ...answered within this, or the connection fails and the migration with
  // it (a dead source is noticed). Default 5 s.
  std::chrono::milliseconds keepalive_timeout{5000};
  // Free text sent in HelloReply. Default "pmlmig".
  std::string receiver_name = "pmlmig";
  // Offer direct data streams (proto/migration.proto) to a sender that asks:
  // page data on plain TCP connections to the listen port itself (told
  // apart from gRPC by their first bytes), authenticated by a per-session
  // key sent on the authorized Control call. Never under TLS
  // (the data then stays in the TLS-protected Pages calls). Default on.
  bool direct_data = true;
  // Threads that make the target's fresh memory resident just ahead of
  // where round 0's page data arrives (MADV_POPULATE_WRITE on 2 MiB chunks,
  // up to populate_lookahead_bytes past the last data the stream applied;
  // memory whose batches carry only zero pages is never touched), for a
  // migration of one stream. Where first-touching memory is slow (a nested
  // VM) several threads at once get through it faster than the stream's own
  // page faults (1.4-1.5x for a 2 GiB guest, docs/BENCHMARKS.md); with
  // several streams their faults already overlap, and nothing is started.
  // 0: off. Default 4.
  uint32_t populate_threads = 4;
  uint64_t populate_lookahead_bytes = 64ull << 20;
  // For a migration of several streams: round 0's pages are placed into the
  // target's fresh memory with userfaultfd (UFFDIO_COPY: allocated and
  // copied in the kernel, no page fault per page), for the slots that have
  // a memfd, until the first later round. Where first-touching memory is
  // slow (a nested VM) that fills it 1.3-1.6x faster than the streams' own
  // page faults (docs/BENCHMARKS.md). Without userfaultfd (no
  // CAP_SYS_PTRACE where vm.unprivileged_userfaultfd is 0) pages are
  // copied as before. Default on.
  bool uffd_fill = true;
  // Direct data streams (direct_data): the payload of each uncompressed
  // batch whose pages are copied through the mapping (resident memory, or
  // without a file or userfaultfd to place them) is read from the socket
  // straight into guest memory and checked there, not staged in a buffer
  // and copied (0.12; 7-11% less CPU per byte into resident memory,
  // docs/BENCHMARKS.md). A batch that then fails its checksum has written
  // its pages, and the migration fails as before: its target is discarded
  // without running. Default on.
  bool read_in_place = true;
};

// Threads: Start, WaitForMigration, RefuseNewMigrations, port and Shutdown
// may be called from any thread. The factory and every MigrationTarget
// method run on gRPC's server threads: OnSetup, OnFinal, OnCommit and OnAbort
// on the control stream's thread, never two at once; pages are written into memory() by the Pages streams' threads
// only between OnSetup and OnFinal/OnAbort (OnAbort and OnFinal run only once
// no batch is being written).
class MigrationServer final : public MigrationReceiver {
 public:
  using TargetFactory = std::function<std::unique_ptr<engine::MigrationTarget>()>;

  // Listens on `listen` ("host:port" or "[v6-address]:port", checked by
  // ParseHostPort; port 0 picks a free one, see port()).
  // Like GrpcMigrationSink::Create, tunes glibc malloc once per process.
  // Refuses a non-loopback address without TLS or a token unless
  // options.allow_insecure.
  static Result<std::unique_ptr<MigrationServer>> Start(const std::string& listen, TargetFactory factory,
                                                        MigrationServerOptions options = {});
  ~MigrationServer() override;  // Shutdown()

  // The port actually bound.
  int port() const;

  // Waits until a migration ends (completed, failed or aborted) and returns
  // its outcome; outcomes are returned oldest first, each once. Error
  // (kAborted) when the deadline passes first or the server shuts down.
  Result<ReceivedMigration> WaitForMigration(std::chrono::steady_clock::time_point deadline) override;

  // From now on a Hello is refused (UNAVAILABLE, naming `why`), while
  // Resolve keeps answering. Keep the server running like this as long as a
  // VM it received runs: a source whose commit reply was lost asks it, and
  // takes a closed port to mean that no VM runs here.
  void RefuseNewMigrations(std::string why) override;

  // Cancels every call (a migration in progress fails: its target's OnAbort
  // runs), stops listening, and waits for the handlers. Idempotent.
  void Shutdown() override;

  class Impl;

 private:
  explicit MigrationServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmlmig::transport
