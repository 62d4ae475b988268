// Page batches: building them from guest memory (sender) and checking and
// applying them into guest memory (receiver). Pure functions over a
// SlotTable and a proto::PageBatch; no I/O, no gRPC. The batch format, its
// checksum and what the receiver rejects are described at the top of
// proto/migration.proto.
//
// What this code must never do: write outside the slots of the SlotTable it
// is given, or write anything of a batch that fails any check. One
// exception, for the checksum only: a batch read in place (PlanInPlace)
// lands before its checksum can be checked; one that then fails it ends
// the migration, whose target is discarded without running.
//
// Private to transport/ (it speaks protobuf); the tests include it by path.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>
#define XXH_STATIC_LINKING_ONLY  // the hash states, by value
#include <xxhash.h>

#include "migration.pb.h"
#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/migration.h"
#include "pmlmig/engine/slot_table.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/version.h"

namespace pmlmig::engine {
class PostcopyMemory;
}

namespace pmlmig::transport {

inline constexpr uint32_t kProtocolVersion = kWireVersion;  // PMLMIG_WIRE_VERSION
inline constexpr uint64_t kMaxBatchPayload = uint64_t{kMaxBatchPages} * engine::kPageSize;
// gRPC max message size on both sides: a batch (4 MiB of data plus at most
// 1024 runs) and the largest control message (8 MiB of VM state) fit.
inline constexpr int kMaxMessageBytes = 16 << 20;
inline constexpr uint64_t kMaxVmStateBytes = 8ull << 20;
inline constexpr uint64_t kMaxVmDescriptionBytes = 1ull << 20;
inline constexpr int kMaxMemoryRanges = 256;
// engine::ChunkLayout keeps a guest at 65536 chunks, plus one partial chunk per range.
inline constexpr uint64_t kMaxChunkDigests = 65536 + kMaxMemoryRanges;
// Runs of owed pages in a post-copy Final.
inline constexpr int kMaxPostcopyRuns = 1 << 20;

// Where a batch belongs: copied into its header and covered by its checksum.
struct BatchHeader {
  uint64_t session_id = 0;
  uint32_t stream = 0;
  uint32_t round = 0;
  uint64_t sequence = 0;
};

// How batches are checksummed (proto::BatchChecksum; see the top of
// proto/migration.proto). Both sides agree on it at Setup.
enum class Checksum { kXxh64, kXxh3 };

// The hash of a batch's uncompressed payload, fed in pieces.
class PayloadHash {
 public:
  explicit PayloadHash(Checksum kind);
  void Update(const void* data, size_t len);
  uint64_t Digest();

 private:
  Checksum kind_;
  XXH64_state_t xxh64_;
  XXH3_state_t xxh3_;
};

// The checksum of a batch whose payload, uncompressed, hashes to
// `payload_hash` (PayloadHash of the same kind).
uint64_t BatchChecksum(const proto::PageBatch& batch, uint64_t payload_hash, Checksum kind = Checksum::kXxh64);

// Bytes as they arrived, possibly in several pieces (gRPC slices), in order.
using Chunks = std::span<const std::span<const uint8_t>>;
using ChunkList = std::vector<std::span<const uint8_t>>;

// On the wire a PageBatch is its other fields followed by the payload
// (field 15), so a sender can serialize the small header with protobuf and
// append the payload without copying it. Writes the payload's tag and
// length (at most 6 bytes) to `out`; returns how many.
size_t EncodePayloadPrefix(uint64_t payload_len, uint8_t* out);

// Splits a serialized PageBatch, as received, into its fields other than
// the payload (parsed into `header`) and the payload's bytes (`payload`,
// pointing into `wire`, nothing copied). Rejects what is not a valid
// PageBatch, a payload field given twice, and headers over 1 MiB.
Status DecodeBatch(Chunks wire, proto::PageBatch* header, ChunkList* payload);

// Builds batches on one sender thread. Keeps its compression context and
// scratch buffer between batches; not thread-safe (one per stream).
class BatchBuilder {
 public:
  explicit BatchBuilder(Compression compression, int zstd_level = 1);
  ~BatchBuilder();
  // The checksum of the batches built from now on (XXH64 until set).
  void set_checksum(Checksum c) { checksum_ = c; }
  BatchBuilder(const BatchBuilder&) = delete;
  BatchBuilder& operator=(const BatchBuilder&) = delete;

  // Fills `out` with the `pages` pages (1..1024) starting at `gpa`, read
  // from `memory` now: zero pages become PAGE_RUN_ZERO runs (no data), the
  // others are copied into the payload (compressed when that shrinks it),
  // runs are split at slot boundaries, and the checksum is set. `out` is
  // cleared first; its payload buffer is reused, so pass the same message
  // each time. Error: a page outside `memory`, or a bad page count.
  Status Build(const engine::SlotTable& memory, uint64_t gpa, uint64_t pages, const BatchHeader& header,
               proto::PageBatch* out);
  // The same, but the payload goes to `payload` (room for pages * 4096
  // bytes) and its length to `*payload_len`; `out`'s payload is left empty.
  Status Build(const engine::SlotTable& memory, uint64_t gpa, uint64_t pages, const BatchHeader& header,
               proto::PageBatch* out, uint8_t* payload, size_t* payload_len);
  // The same for several runs of pages (1..1024 pages in all), one batch:
  // scattered dirty pages travel together instead of one message per run.
  Status Build(const engine::SlotTable& memory, std::span<const engine::PageRun> runs, const BatchHeader& header,
               proto::PageBatch* out, uint8_t* payload, size_t* payload_len);

 private:
  Compression compression_;
  int zstd_level_;
  Checksum checksum_ = Checksum::kXxh64;
  std::unique_ptr<uint8_t[]> scratch_;  // kMaxBatchPayload bytes, once compressing
  void* zstd_ = nullptr;                // ZSTD_CCtx*
};

// The files behind the target's memory slots, by slot id (from
// engine::MigrationTarget::memory_file): BatchApplier writes data pages
// through them with pwritev(2), which fills fresh memory without a page-
// table fault per page. Slots without a file are written through the mapping.
class UffdFill;

class SlotFiles {
 public:
  SlotFiles() = default;
  // `write_through`: data pages go through the files (else only zero runs
  // over holes use them). A write holds the file's inode lock, so writers of
  // one file take turns: worth it for one writer (1.6x into fresh memory),
  // not for several, whose page faults through the mapping run in parallel
  // (datapath_bench: two writers, 1.73 GB/s through the mapping against
  // 1.56-1.76 through the file).
  static SlotFiles Of(const engine::MigrationTarget& target, bool write_through = true);
  const engine::MemoryFile* Find(uint32_t slot) const;
  const std::vector<std::pair<uint32_t, engine::MemoryFile>>& entries() const { return files_; }
  bool empty() const { return files_.empty(); }
  bool write_through() const { return write_through_; }
  // Round 0 of several streams: data runs into missing pages are placed
  // with the session's UffdFill (uffd_fill.h) while it runs.
  void set_fill(std::shared_ptr<UffdFill> fill) { fill_ = std::move(fill); }
  UffdFill* fill() const { return fill_.get(); }

 private:
  std::vector<std::pair<uint32_t, engine::MemoryFile>> files_;
  bool write_through_ = true;
  std::shared_ptr<UffdFill> fill_;
};

struct ApplyResult {
  uint64_t normal_pages = 0;
  uint64_t zero_pages = 0;
};

// Checks and applies batches on one receiver thread. Keeps its decompression
// context and scratch buffer between batches; not thread-safe (one per
// stream).
class BatchApplier {
 public:
  BatchApplier();
  ~BatchApplier();
  // The checksum batches must carry from now on (XXH64 until set).
  void set_checksum(Checksum c) { checksum_ = c; }
  BatchApplier(const BatchApplier&) = delete;
  BatchApplier& operator=(const BatchApplier&) = delete;

  // Checks everything about `batch` that does not depend on the session
  // (runs against `memory`, page counts, lengths, compression, checksum),
  // and only then writes its pages into `memory` (zero runs are cleared).
  // Errors name the batch and the problem, e.g. "batch 17: run 0: gpa
  // 0x1234000 (+2 pages) lies outside guest memory".
  // With `digests` (verifying), each page's value is updated from memory
  // after it was written. With `files`, data runs of slots that have a file
  // are written through it (an error writing it, e.g. ENOMEM, fails the
  // batch after part of it may have been written: the migration ends).
  Result<ApplyResult> Apply(const proto::PageBatch& batch, const engine::SlotTable& memory,
                            engine::PageDigestTable* digests = nullptr, const SlotFiles* files = nullptr);
  // The same for a batch split by DecodeBatch: `header`'s payload field is
  // ignored; the payload is `payload`. With `postcopy`, pages are placed
  // through it (only where still missing; it keeps `digests` itself).
  Result<ApplyResult> Apply(const proto::PageBatch& header, Chunks payload, const engine::SlotTable& memory,
                            engine::PageDigestTable* digests = nullptr, const SlotFiles* files = nullptr,
                            engine::PostcopyMemory* postcopy = nullptr);

  // Reading a batch's payload straight into guest memory (a direct data
  // stream: no staging buffer, no copy). When `b` passes every check Apply
  // makes before the checksum, is uncompressed with `payload_len` bytes of
  // data, and each of its data runs would be copied through the mapping
  // (not written through a file nor placed with userfaultfd), sets `dest`
  // to where the payload's bytes go, in order, and returns true. Else
  // false: read the payload and Apply it, which reports what is wrong.
  bool PlanInPlace(const proto::PageBatch& b, uint64_t payload_len, const engine::SlotTable& memory,
                   const SlotFiles* files, std::vector<std::span<uint8_t>>* dest);
  // Once a PlanInPlace batch's payload has landed, fed to `hash` (of
  // checksum(), in order) as it did: checks the checksum, clears the zero
  // runs and updates `digests`.
  Result<ApplyResult> FinishInPlace(const proto::PageBatch& b, PayloadHash& hash, const engine::SlotTable& memory,
                                    engine::PageDigestTable* digests = nullptr, const SlotFiles* files = nullptr);
  Checksum checksum() const { return checksum_; }

 private:
  std::unique_ptr<uint8_t[]> scratch_;  // kMaxBatchPayload bytes, once decompressing
  std::unique_ptr<uint8_t[]> gather_;   // kMaxBatchPayload bytes, for a compressed payload in pieces
  Checksum checksum_ = Checksum::kXxh64;
  void* zstd_ = nullptr;                // ZSTD_DCtx*
  UniqueFd pagemap_;                    // /proc/self/pagemap, opened at the first file-backed run
  bool pagemap_failed_ = false;
  // Whether the `pages` pages at `host` are mapped in this process (then a
  // copy through the mapping takes no fault), judged by the first and last.
  bool AllMapped(const uint8_t* host, uint64_t pages);
  // The checks of a batch's runs against `memory` (Apply's step 1): its data pages.
  Result<uint64_t> CheckRuns(const proto::PageBatch& b, const engine::SlotTable& memory);
  // The `len` bytes of the run starting at data[*chunk] + *off, in one
  // piece (gathered when they span pieces); advances *chunk/*off past them.
  const uint8_t* RunSource(Chunks data, size_t* chunk, uint64_t* off, uint64_t len);
  // Whether the data run `r` at `dst` is written through its slot's file
  // (fresh memory of a single writer) rather than through the mapping.
  bool ThroughFile(const proto::PageRun& r, uint8_t* dst, const SlotFiles* files, const engine::SlotTable& memory,
                   const engine::MemoryFile** file, uint64_t* file_pos);
  // How Apply writes the data run `r` at `dst`: through its slot's file
  // (ThroughFile; *file and *file_pos set), placed with the UffdFill
  // (fresh memory of several streams), or copied through the mapping (the
  // only route PlanInPlace reads in place).
  enum class Route { kFile, kFill, kMapping };
  Route RouteOf(const proto::PageRun& r, uint8_t* dst, const SlotFiles* files, const engine::SlotTable& memory,
                const engine::MemoryFile** file, uint64_t* file_pos);
};

// Whether the 4 KiB page at `p` is all zero.
bool IsZeroPage(const uint8_t* p);

// Once per process, before the sink or server moves data: keeps freed
// multi-MiB blocks in glibc's heap (mmap threshold 64 MiB, trim threshold
// 512 MiB). gRPC allocates a fresh 1-4 MiB buffer for most messages it reads
// or writes; by default glibc maps each one anew and every page faults in
// again, which cost about 15% of a transfer's CPU here.
void TuneMallocForTransfer();

}  // namespace pmlmig::transport
