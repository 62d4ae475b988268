// GrpcMigrationSink: the sending side of the migration transport. It
// implements engine::MigrationSink over the gRPC service of
// proto/migration.proto (protocol version 2, described at the top of that
// file): one Control stream plus `streams` Pages streams, each on its own TCP
// connection.
//
// No protobuf or gRPC type appears in this header; the engine sees only the
// MigrationSink interface.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/transport/security.h"

namespace pmlmig::transport {

// How page data travels. Each batch is compressed on its own; a batch that
// does not shrink travels uncompressed.
enum class Compression : uint8_t { kNone = 0, kLz4 = 1, kZstd = 2 };

// "none" | "lz4" | "zstd".
Result<Compression> ParseCompression(std::string_view text);
std::string_view CompressionName(Compression c);

inline constexpr uint32_t kMaxStreams = 64;
inline constexpr uint32_t kMaxBatchPages = 1024;  // 4 MiB of page data

// How many Pages streams a sink opens unless told: half of this machine's
// CPUs, at least 2 and at most 8. One connection leaves the receiver's work
// (checksum, writing memory) on one thread; more streams than cores only
// add switching (docs/BENCHMARKS.md has the sweep).
uint32_t DefaultStreams();

struct GrpcSinkOptions {
  // Where the receiver listens, "host:port" or "[v6-address]:port", port
  // 1..65535 (see ParseHostPort). Required; no default.
  std::string target;
  // Parallel Pages streams, each on its own connection, 1..64. Default
  // DefaultStreams(); 0 means the same.
  uint32_t streams = DefaultStreams();
  // Page data compression. Default none.
  Compression compress = Compression::kNone;
  // zstd level when compress is zstd. Default 1 (fast).
  int zstd_level = 1;
  // Bytes per second on the wire, shared by all streams (a token bucket).
  // Default 0: unlimited.
  uint64_t max_bandwidth = 0;
  // Pages per batch. Default 256 (1 MiB), 1..1024.
  uint32_t batch_pages = 256;
  // Bytes of batches a stream may have sent but not yet seen acknowledged;
  // beyond it the stream waits for acks (backpressure). Default 16 MiB.
  uint64_t max_inflight_bytes = 16ull << 20;
  // How long Begin waits for each connection to come up. Default 5 s. A
  // port that refuses connections (nothing listens there) fails Begin at
  // once, "connection refused to <target>"; only a host that does not
  // answer, or a handshake that fails, waits this long.
  std::chrono::milliseconds connect_timeout{5000};
  // How long Begin waits for the receiver to answer Hello and to build the VM
  // after Setup. Default 60 s.
  std::chrono::milliseconds setup_timeout{60000};
  // How long SendPages tolerates a stream that has batches in flight but
  // gets no ack and cannot write (a stalled or dead receiver) before it
  // fails the migration. Default 10 s.
  std::chrono::milliseconds stall_timeout{10000};
  // How long Finish waits for the receiver to restore and verify the VM.
  // Default 120 s.
  std::chrono::milliseconds final_timeout{120000};
  // How long Commit waits for the receiver to say the VM runs before it
  // asks through Resolve. Default 10 s.
  std::chrono::milliseconds commit_timeout{10000};
  // How long Commit keeps asking (Resolve on fresh connections) before it
  // reports the switch-over as in doubt. Default 60 s.
  std::chrono::milliseconds resolve_timeout{60000};
  // TLS and/or token (see security.h). Default: neither.
  TransportSecurity security;
  // HTTP/2 keepalive: a ping after this much idle time on a connection...
  // Default 5 s.
  std::chrono::milliseconds keepalive_time{5000};
  // ...that must be answered within this time, or the connection (and every
  // call on it) fails. Default 5 s. So a silent dead peer is noticed within
  // about 10 s even on an idle connection.
  std::chrono::milliseconds keepalive_timeout{5000};
  // How long Abort waits for the receiver to confirm the Abort message before
  // it cancels the calls. Default 1 s.
  std::chrono::milliseconds abort_grace{1000};
  // Post-copy: how long, after the link to the target breaks, the sender
  // keeps trying to resume it (a new connection and a PostcopyResume; the
  // target's VM runs on, its vCPUs waiting for missing pages) before it
  // fails the migration (Outcome::kPostcopyFailed). Counted afresh after
  // each break. A target whose port refuses connections (its process is
  // gone), or that says the session is over, ends the tries at once.
  // Default 5 min; 0 = no recovery (fail at the first break, as 0.6).
  std::chrono::milliseconds postcopy_recovery{300000};
  // Page data on direct TCP connections (proto/migration.proto, "Direct
  // data streams") when the receiver offers them: one per stream, to a port
  // the receiver names at Setup on the target's host, instead of the Pages
  // calls; about half the CPU per byte of gRPC (docs/BENCHMARKS.md). Never
  // with TLS; a receiver older than 0.9, or one that does not offer them,
  // gets Pages calls. Default on.
  bool direct_data = true;
  // Free text sent in Hello, for the receiver's logs. Default "pmlmig".
  std::string sender_name = "pmlmig";
};

// Threads: one controlling thread calls Begin, SendPages (per round), Finish
// and Commit, in that order; Abort may be called at any time from any thread and
// unblocks the others. SendPages runs one sender thread per stream; it
// returns once every batch of the round is acknowledged. After any failure
// or Abort every further call fails (the sink is single use) and the
// receiver sees its calls cancelled, so it discards the VM.
class GrpcMigrationSink final : public engine::MigrationSink {
 public:
  // Checks the options (nothing is connected yet). Also, once per process,
  // makes glibc keep freed multi-MiB blocks instead of unmapping them (gRPC
  // allocates such a buffer for most messages; unmapping and faulting them
  // in again cost about 15% of a transfer's CPU).
  static Result<std::unique_ptr<GrpcMigrationSink>> Create(GrpcSinkOptions options);
  ~GrpcMigrationSink() override;

  // Connects (control and data connections), Hello, Setup; returns once the
  // receiver has built the VM. `source_memory` must stay valid and keep its
  // layout until Finish or Abort: SendPages reads pages from it.
  Status Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source_memory) override;
  // Reads each page of `pages` from source memory when its batch is built
  // (zero pages travel as a header only) and sends it; returns when every
  // batch is acknowledged. Rounds must not decrease.
  Result<engine::TransferStats> SendPages(uint32_t round, engine::PageList& pages) override;
  // Closes the Pages streams, sends Final (with per-stream totals), and
  // returns the receiver's reply: the VM is restored there but not running.
  Result<engine::FinalReply> Finish(const engine::FinalState& state) override;
  // Sends Commit and waits for CommitReply. Without it (the connection
  // broke, or commit_timeout passed) asks Resolve on fresh connections until
  // the receiver answers, its port refuses connections (no process there
  // runs the VM: kNotCommitted), or resolve_timeout passes (kInDoubt).
  engine::CommitResult Commit() override;
  // Best effort: tells the receiver to discard everything, then cancels
  // every call. Idempotent. Does nothing once Commit has started.
  void Abort(const std::string& why) override;

  // Everything sent so far (all rounds, a failed one's part included).
  engine::TransferStats totals() const override;
  // The receiver (pmlmig 0.6+, with userfaultfd) can take post-copy.
  bool can_postcopy() const override;
  // Before a post-copy switch: a PostcopyPrepare naming `stale`, when the
  // receiver takes it (0.7+); otherwise nothing.
  Status PreparePostcopy(std::span<const engine::PageRun> stale) override;
  // After Commit of a post-copy Finish: two Postcopy calls on connections
  // of their own, one answering page requests, one pushing the rest
  // (postcopy_client.h), until the receiver's PostcopyDone. Failures: the
  // VM ran on the target and cannot go on there; nothing is resumed here.
  Result<engine::PostcopyResult> Postcopy(engine::PostcopyBacklog& backlog) override;
  const GrpcSinkOptions& options() const;

  class Impl;

 private:
  explicit GrpcMigrationSink(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pmlmig::transport
