// A VM snapshot on disk: guest memory at fixed offsets, the VM description,
// the vCPU/VM state and per-chunk digests, written while the VM runs (pre-copy
// rounds overwrite pages in place) and read back for an eager or lazy restore.
//
// Format version 1.0 (docs/SNAPSHOT_FORMAT.md has every field and offset and
// what a reader checks; this summary is for readers of the code). All
// integers little-endian.
//   [0, 4096)        header: magic "PMLMIGSN", version, flags (bit 0:
//                    complete), sizes and offsets of the sections below,
//                    XXH3-64 checksums of the layout, the meta section and
//                    the header itself.
//   [4096, ...)      layout: per region {u32 slot, u32 0, u64 gpa, u64 size,
//                    u64 file offset}, sorted by gpa.
//   data section     each region's pages contiguous from a 2 MiB-aligned
//                    offset: the page at gpa G of region R is at
//                    R.file_offset + (G - R.gpa). Pages never written, or
//                    written as zero, are holes (a sparse file).
//   meta section     after the data: description, state, then one u64 digest
//                    per chunk of ChunkLayout (memory_digest.h).
// A reader refuses a newer major version; a minor version only adds header
// fields in bytes that are reserved (zero) in 1.0, which older readers ignore.
//
// What this file must never do: leave a file at the final path that reads as
// complete but is not (the writer works on "<path>.partial" and renames over
// <path> only after everything is on disk and the digests agree), or let a
// hostile file make the reader allocate or read past what the file holds.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/slot_table.h"

namespace pmlmig::engine {

constexpr uint16_t kSnapshotMajorVersion = 1;
constexpr uint16_t kSnapshotMinorVersion = 0;
constexpr uint64_t kSnapshotHeaderBytes = 4096;
// Every region starts at a multiple of this in the file, so a lazy restore can
// map the file with huge pages.
constexpr uint64_t kSnapshotRegionAlign = 2ull << 20;
// Limits of version 1, enforced by the writer and the reader alike (a reader
// never allocates more than these for a file's claims).
constexpr uint32_t kSnapshotMaxRegions = 65536;
constexpr uint64_t kSnapshotMaxDescriptionBytes = 16ull << 20;
constexpr uint64_t kSnapshotMaxStateBytes = 1ull << 30;

struct SnapshotRegion {
  uint32_t slot = 0;         // the memslot id, as in MemorySlot
  uint64_t gpa = 0;          // page aligned
  uint64_t size = 0;         // bytes, page aligned, > 0
  uint64_t file_offset = 0;  // of the region's first page; chosen by the writer (ignored in Create's input)
  uint64_t gpa_end() const { return gpa + size; }
};

// The regions of `memory` (slot, gpa, size), for SnapshotWriter::Create.
std::vector<SnapshotRegion> SnapshotRegionsOf(const SlotTable& memory);

// Writes one snapshot. Create, any number of WritePages / WriteZeroPages,
// then Finish (or Abandon).
//
// Thread-safety: WritePages and WriteZeroPages may run concurrently from any
// threads, on disjoint or overlapping pages; each page's bytes in the file and
// its digest are updated together under a per-chunk lock, so whichever write
// of a page comes last defines both. Finish, Abandon, the move operations and
// the destructor must not run concurrently with anything else.
class SnapshotWriter {
 public:
  // Creates "<path>.partial" (mode 0600; a stale one is unlinked first, never
  // truncated under another writer that may still hold it), sized to the end
  // of the data section (holes), with a header whose complete flag is clear.
  // An existing <path> is untouched until Finish. `regions` need not be
  // sorted; empty, unaligned, overlapping or duplicate-slot regions, no
  // vCPUs or a description over the limit are InvalidArgument naming what.
  static Result<SnapshotWriter> Create(const std::string& path, std::span<const SnapshotRegion> regions,
                                       uint32_t vcpus, std::string_view description);

  SnapshotWriter(SnapshotWriter&& o) noexcept;
  SnapshotWriter& operator=(SnapshotWriter&& o) noexcept;
  ~SnapshotWriter();  // Abandon() unless Finish succeeded

  // Writes `pages` pages from `data` (pages * 4096 bytes) at the page of
  // `gpa`; a later write of a page replaces it. The run must lie in one
  // region (else InvalidArgument naming the region). `data` may be live guest
  // memory: a page the guest changes during the call may land in the file
  // and the digest in different versions, but such a page is dirty and is
  // written again in a later round (the last with the VM paused); Finish's
  // expected digests prove that nothing was missed.
  Status WritePages(uint64_t gpa, uint64_t pages, const uint8_t* data);
  // Makes `pages` pages from `gpa` read as zero and hold no disk blocks
  // (punches a hole; writes zeros on a file system that cannot punch).
  Status WriteZeroPages(uint64_t gpa, uint64_t pages);

  // Writes the meta section (description, `state`, the writer's digests),
  // syncs, writes the header with the complete flag, syncs, renames over
  // <path> and syncs the directory. When `expected_chunk_digests` is given
  // (the source's digests of its memory at the pause), it is compared first:
  // a difference is DataLoss naming the guest-physical ranges, nothing is
  // written and <path> is untouched; the writer stays open, so the caller may
  // write the missing pages and Finish again.
  Status Finish(std::span<const uint8_t> state, const std::vector<uint64_t>* expected_chunk_digests = nullptr);
  // Closes and unlinks the partial file; nothing else to do afterwards.
  void Abandon();

  const std::string& path() const;
  std::string partial_path() const;
  std::span<const SnapshotRegion> regions() const;  // sorted by gpa, with their file offsets
  std::optional<uint64_t> FileOffset(uint64_t gpa) const;  // none outside every region
  uint64_t bytes_written() const;  // by WritePages, overwrites counted again
  const ChunkLayout& layout() const;
  std::vector<uint64_t> chunk_digests() const;  // of what the file holds now
  int data_fd() const;  // -1 once finished or abandoned
  bool finished() const;

 private:
  struct State;
  explicit SnapshotWriter(std::unique_ptr<State> state);
  Status CreateFile();
  // Runs write(gpa, pages, file_offset) for each piece of the run that lies
  // in one chunk, holding that chunk's lock.
  template <typename Write>
  Status UnderChunkLocks(const char* op, uint64_t gpa, uint64_t pages, Write&& write);
  Status WriteMeta(std::span<const uint8_t> state, const std::vector<uint64_t>& digests);
  Status Publish();

  std::unique_ptr<State> s_;  // null once moved from
};

struct SnapshotLoadStats {
  uint64_t bytes_read = 0;    // data read from the file
  uint64_t data_extents = 0;  // runs of data between holes
  uint64_t hole_bytes = 0;    // guest memory left untouched (holes in the file)
  double ms = 0;
};

// Reads a finished snapshot. Open checks everything it can without reading
// the data; LoadInto and VerifyFile check the data against the digests.
//
// Thread-safety: every method is const and may run concurrently (pread only).
class SnapshotReader {
 public:
  // Refuses a foreign file, a newer major version, a bad checksum, an
  // unfinished snapshot, sections that do not fit the file or each other, and
  // a layout that is unaligned, overlapping or disagrees with the chunk
  // digests. Each message names the file and the field (with its offset).
  static Result<SnapshotReader> Open(const std::string& path);

  const std::string& path() const { return path_; }
  std::span<const SnapshotRegion> regions() const { return regions_; }
  uint32_t vcpus() const { return vcpus_; }
  uint16_t minor_version() const { return minor_; }
  const std::string& description() const { return description_; }
  std::span<const uint8_t> state() const { return state_; }
  std::span<const uint64_t> chunk_digests() const { return digests_; }
  uint64_t chunk_bytes() const { return layout_.chunk_bytes(); }
  uint64_t guest_bytes() const { return guest_bytes_; }
  uint64_t created_ns() const { return created_ns_; }  // unix time Finish wrote the header
  const ChunkLayout& layout() const { return layout_; }
  int fd() const { return fd_.get(); }
  std::optional<uint64_t> FileOffset(uint64_t gpa) const;

  // Reads `pages` pages from `gpa` (inside one region) into `dst`; holes read
  // as zero. A file that ends early (truncated after Open) is DataLoss naming
  // the gpa.
  Status ReadPages(uint64_t gpa, uint64_t pages, uint8_t* dst) const;
  // Eager restore into `memory`, whose slots must be the regions (slot, gpa,
  // size) and whose memory must be zero (fresh): only the file's data extents
  // are read, on `threads` threads, and pages that are holes are never
  // touched. The digests of what was loaded must match the stored ones, else
  // DataLoss naming the damaged guest-physical ranges (memory then holds the
  // damaged data).
  Result<SnapshotLoadStats> LoadInto(const SlotTable& memory, unsigned threads) const;
  // The same digest check, reading the file into scratch buffers (a lazy
  // restore's background check).
  Status VerifyFile(unsigned threads) const;

 private:
  SnapshotReader() = default;
  Result<SnapshotLoadStats> Scan(const SlotTable* memory, unsigned threads) const;

  std::string path_;
  UniqueFd fd_;
  // The file opened O_DIRECT (invalid where the file system refuses it):
  // reads into page-aligned memory bypass the page cache, whose fresh
  // pages cost more than the disk here (docs/BENCHMARKS.md, "Snapshots").
  UniqueFd direct_;
  int FdFor(const uint8_t* dst) const;
  uint64_t file_end_ = 0;  // the end of the meta section
  uint16_t minor_ = 0;
  uint32_t vcpus_ = 0;
  uint64_t guest_bytes_ = 0;
  uint64_t created_ns_ = 0;
  std::vector<SnapshotRegion> regions_;  // sorted by gpa
  std::string description_;
  std::vector<uint8_t> state_;
  std::vector<uint64_t> digests_;
  ChunkLayout layout_;
};

}  // namespace pmlmig::engine
