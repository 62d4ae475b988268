// Page batches: see batch_codec.h and the top of proto/migration.proto.
//
// The receiver side checks a whole batch (every run against guest memory,
// lengths, decompression, checksum) before it writes a single byte, so a
// rejected batch leaves guest memory untouched.
#include "batch_codec.h"

#include "pmlmig/engine/postcopy.h"

#include <lz4.h>
#include <xxh_x86dispatch.h>  // XXH3 with AVX2 where the CPU has it
#include <zstd.h>

#include <fcntl.h>
#include <malloc.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <mutex>
#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/memory_digest.h"
#include "uffd_fill.h"

namespace pmlmig::transport {
namespace {

using engine::kPageShift;
using engine::kPageSize;

ZSTD_CCtx* AsCCtx(void* p) { return static_cast<ZSTD_CCtx*>(p); }
ZSTD_DCtx* AsDCtx(void* p) { return static_cast<ZSTD_DCtx*>(p); }

}  // namespace

Result<Compression> ParseCompression(std::string_view text) {
  if (text == "none") return Compression::kNone;
  if (text == "lz4") return Compression::kLz4;
  if (text == "zstd") return Compression::kZstd;
  return InvalidArgument("compression \"" + std::string(text) + "\": expected none, lz4 or zstd");
}

std::string_view CompressionName(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kLz4: return "lz4";
    case Compression::kZstd: return "zstd";
  }
  return "unknown";
}

void TuneMallocForTransfer() {
  static std::once_flag once;
  std::call_once(once, [] {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
  });
}

bool IsZeroPage(const uint8_t* p) {
  // Guest data that is not zero almost always has a non-zero first word;
  // test it alone first, then whole 256-byte blocks (vectorised ORs).
  uint64_t first;
  std::memcpy(&first, p, sizeof first);
  if (first != 0) return false;
  for (size_t off = 0; off < kPageSize; off += 256) {
    uint64_t w[32];
    std::memcpy(w, p + off, sizeof w);
    uint64_t acc = 0;
    for (uint64_t x : w) acc |= x;
    if (acc != 0) return false;
  }
  return true;
}

PayloadHash::PayloadHash(Checksum kind) : kind_(kind) {
  if (kind_ == Checksum::kXxh3) {
    XXH3_64bits_reset(&xxh3_);
  } else {
    XXH64_reset(&xxh64_, 0);
  }
}

void PayloadHash::Update(const void* data, size_t len) {
  if (kind_ == Checksum::kXxh3) {
    XXH3_64bits_update_dispatch(&xxh3_, data, len);
  } else {
    XXH64_update(&xxh64_, data, len);
  }
}

uint64_t PayloadHash::Digest() { return kind_ == Checksum::kXxh3 ? XXH3_64bits_digest(&xxh3_) : XXH64_digest(&xxh64_); }

uint64_t BatchChecksum(const proto::PageBatch& batch, uint64_t payload_hash, Checksum kind) {
  // x86-64 only (the project refuses other hosts): native order is the
  // little-endian order the protocol specifies.
  uint64_t words[5 + 3 * kMaxBatchPages];
  size_t n = 0;
  words[n++] = batch.session_id();
  words[n++] = batch.stream();
  words[n++] = batch.round();
  words[n++] = batch.sequence();
  words[n++] = static_cast<uint64_t>(batch.runs_size());
  for (const proto::PageRun& r : batch.runs()) {
    if (n + 3 > std::size(words)) break;  // more runs than a batch may hold: the check refuses it anyway
    words[n++] = r.gpa();
    words[n++] = r.pages();
    words[n++] = r.flags();
  }
  if (kind == Checksum::kXxh3) return XXH3_64bits_withSeed_dispatch(words, n * sizeof(uint64_t), payload_hash);
  return XXH64(words, n * sizeof(uint64_t), payload_hash);
}

// ---------------------------------------------------------------- sender

BatchBuilder::BatchBuilder(Compression compression, int zstd_level)
    : compression_(compression), zstd_level_(zstd_level) {}

BatchBuilder::~BatchBuilder() {
  if (zstd_ != nullptr) ZSTD_freeCCtx(AsCCtx(zstd_));
}

Status BatchBuilder::Build(const engine::SlotTable& memory, uint64_t gpa, uint64_t pages,
                           const BatchHeader& header, proto::PageBatch* out) {
  // Not out->clear_payload(): growing it again would zero-fill it before
  // we overwrite it; it only grows when a larger batch comes.
  std::string* payload = out->mutable_payload();
  if (pages <= kMaxBatchPages && payload->size() < (pages << kPageShift)) payload->resize(pages << kPageShift);
  size_t len = 0;
  Status s = Build(memory, gpa, pages, header, out, reinterpret_cast<uint8_t*>(payload->data()), &len);
  payload->resize(s.ok() ? len : 0);  // shrinks: no fill
  return s;
}

Status BatchBuilder::Build(const engine::SlotTable& memory, uint64_t gpa, uint64_t pages,
                           const BatchHeader& header, proto::PageBatch* out, uint8_t* payload,
                           size_t* payload_len) {
  const engine::PageRun one{gpa, pages};
  return Build(memory, std::span<const engine::PageRun>(&one, 1), header, out, payload, payload_len);
}

Status BatchBuilder::Build(const engine::SlotTable& memory, std::span<const engine::PageRun> runs,
                           const BatchHeader& header, proto::PageBatch* out, uint8_t* payload,
                           size_t* payload_len) {
  *payload_len = 0;
  uint64_t pages = 0;
  for (const engine::PageRun& r : runs) {
    if ((r.gpa & (kPageSize - 1)) != 0) return InvalidArgument("batch at gpa " + FormatHex(r.gpa) + ": not page aligned");
    pages += r.pages;
  }
  if (pages == 0 || pages > kMaxBatchPages) {
    return InvalidArgument("batch of " + std::to_string(pages) + " pages: must be 1.." +
                           std::to_string(kMaxBatchPages));
  }
  // Every field but the payload is set; the payload field is not touched.
  out->set_session_id(header.session_id);
  out->set_stream(header.stream);
  out->set_round(header.round);
  out->set_sequence(header.sequence);
  out->clear_runs();

  const bool compressing = compression_ != Compression::kNone;
  uint8_t* data = payload;
  if (compressing) {
    if (!scratch_) scratch_.reset(new uint8_t[kMaxBatchPayload]);
    data = scratch_.get();
  }

  // One pass per page: the zero test reads the source; a data page is copied
  // and hashed from the copy (still in L1), never from guest memory, which
  // may change under us: the checksum must describe what is sent.
  PayloadHash hash(checksum_);
  uint64_t data_bytes = 0;
  for (const engine::PageRun& r : runs) {
  uint64_t g = r.gpa;
  uint64_t left = r.pages;
  while (left > 0) {
    const engine::MemorySlot* slot = memory.FindByGpa(g);
    if (slot == nullptr) return InvalidArgument("page at gpa " + FormatHex(g) + " is not in source memory");
    const uint64_t n = std::min(left, (slot->gpa_end() - g) >> kPageShift);
    const uint8_t* src = slot->host + (g - slot->gpa);
    proto::PageRun* run = nullptr;  // a run never crosses a slot boundary
    bool run_zero = false;
    for (uint64_t i = 0; i < n; ++i, src += kPageSize, g += kPageSize) {
      const bool zero = IsZeroPage(src);
      if (!zero) {
        uint8_t* dst = data + data_bytes;
        std::memcpy(dst, src, kPageSize);
        hash.Update(dst, kPageSize);
        data_bytes += kPageSize;
      }
      if (run != nullptr && run_zero == zero) {
        run->set_pages(run->pages() + 1);
      } else {
        run = out->add_runs();
        run->set_gpa(g);
        run->set_pages(1);
        run->set_flags(zero ? proto::PAGE_RUN_ZERO : proto::PAGE_RUN_DATA);
        run_zero = zero;
      }
    }
    left -= n;
  }
  }

  out->set_uncompressed_length(static_cast<uint32_t>(data_bytes));
  out->set_compression(proto::COMPRESSION_NONE);
  *payload_len = data_bytes;
  if (compressing && data_bytes > 0) {
    // Compressed only if that saves something: a payload must never be
    // larger than its uncompressed length.
    const size_t cap = data_bytes - 1;
    char* dst = reinterpret_cast<char*>(payload);
    size_t n = 0;
    if (compression_ == Compression::kLz4) {
      const int r = LZ4_compress_default(reinterpret_cast<const char*>(data), dst, static_cast<int>(data_bytes),
                                         static_cast<int>(cap));
      n = r > 0 ? static_cast<size_t>(r) : 0;
      if (n > 0) out->set_compression(proto::COMPRESSION_LZ4);
    } else {
      if (zstd_ == nullptr) zstd_ = ZSTD_createCCtx();
      if (zstd_ == nullptr) return ResourceExhausted("zstd: cannot create a compression context");
      const size_t r = ZSTD_compressCCtx(AsCCtx(zstd_), dst, cap, data, data_bytes, zstd_level_);
      n = ZSTD_isError(r) ? 0 : r;  // dstSize_tooSmall: it did not shrink
      if (n > 0) out->set_compression(proto::COMPRESSION_ZSTD);
    }
    if (n > 0) {
      *payload_len = n;
    } else {
      std::memcpy(payload, data, data_bytes);
    }
  }
  out->set_checksum(BatchChecksum(*out, hash.Digest(), checksum_));
  return Status::Ok();
}

// ---------------------------------------------------------------- wire

namespace {

constexpr uint32_t kPayloadField = 15;
constexpr uint64_t kMaxHeaderBytes = 1 << 20;

void AppendVarint(std::string* out, uint64_t v) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Reads protobuf wire data spread over chunks, never past their end.
class WireReader {
 public:
  explicit WireReader(Chunks chunks) : chunks_(chunks) { SkipEmpty(); }
  bool AtEnd() const { return chunk_ >= chunks_.size(); }
  uint64_t position() const { return pos_; }

  bool ReadVarint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (AtEnd()) return false;
      const uint8_t b = chunks_[chunk_][off_];
      Advance(1);
      *v |= uint64_t{b & 0x7fu} << shift;
      if ((b & 0x80) == 0) return true;
    }
    return false;  // more than 10 bytes
  }
  // The next n bytes, as spans into the chunks (appended to `out`), or
  // copied onto the end of `copy`.
  bool Take(uint64_t n, ChunkList* out, std::string* copy) {
    while (n > 0) {
      if (AtEnd()) return false;
      const std::span<const uint8_t> c = chunks_[chunk_];
      const uint64_t k = std::min<uint64_t>(n, c.size() - off_);
      if (out != nullptr) out->push_back(c.subspan(off_, k));
      if (copy != nullptr) copy->append(reinterpret_cast<const char*>(c.data() + off_), k);
      Advance(k);
      n -= k;
    }
    return true;
  }

 private:
  void Advance(uint64_t n) {
    off_ += n;
    pos_ += n;
    if (off_ == chunks_[chunk_].size()) {
      ++chunk_;
      off_ = 0;
      SkipEmpty();
    }
  }
  void SkipEmpty() {
    while (chunk_ < chunks_.size() && chunks_[chunk_].empty()) ++chunk_;
  }
  Chunks chunks_;
  size_t chunk_ = 0;
  uint64_t off_ = 0;
  uint64_t pos_ = 0;
};

}  // namespace

size_t EncodePayloadPrefix(uint64_t payload_len, uint8_t* out) {
  std::string s;
  AppendVarint(&s, (uint64_t{kPayloadField} << 3) | 2);
  AppendVarint(&s, payload_len);
  std::memcpy(out, s.data(), s.size());
  return s.size();
}

Status DecodeBatch(Chunks wire, proto::PageBatch* header, ChunkList* payload) {
  payload->clear();
  std::string rest;  // every field but the payload, re-encoded
  bool have_payload = false;
  WireReader r(wire);
  auto malformed = [&](const std::string& what) {
    return InvalidArgument("malformed PageBatch at byte " + std::to_string(r.position()) + ": " + what);
  };
  while (!r.AtEnd()) {
    uint64_t tag;
    if (!r.ReadVarint(&tag)) return malformed("truncated field tag");
    const uint64_t field = tag >> 3;
    const uint32_t type = tag & 7;
    if (field == 0 || field > 0x1fffffff) return malformed("field number " + std::to_string(field));
    if (field == kPayloadField) {
      if (type != 2) return malformed("payload field with wire type " + std::to_string(type));
      if (have_payload) return malformed("payload given twice");
      uint64_t len;
      if (!r.ReadVarint(&len)) return malformed("truncated payload length");
      if (len > kMaxBatchPayload) {
        return malformed("payload of " + std::to_string(len) + " bytes, more than " +
                         std::to_string(kMaxBatchPayload));
      }
      if (!r.Take(len, payload, nullptr)) return malformed("payload truncated");
      have_payload = true;
      continue;
    }
    AppendVarint(&rest, tag);
    uint64_t v;
    switch (type) {
      case 0:
        if (!r.ReadVarint(&v)) return malformed("truncated varint");
        AppendVarint(&rest, v);
        break;
      case 1:
        if (!r.Take(8, nullptr, &rest)) return malformed("truncated fixed64");
        break;
      case 5:
        if (!r.Take(4, nullptr, &rest)) return malformed("truncated fixed32");
        break;
      case 2:
        if (!r.ReadVarint(&v)) return malformed("truncated length");
        if (v > kMaxHeaderBytes) return malformed("field of " + std::to_string(v) + " bytes");
        AppendVarint(&rest, v);
        if (!r.Take(v, nullptr, &rest)) return malformed("truncated field");
        break;
      default:
        return malformed("unsupported wire type " + std::to_string(type));
    }
    if (rest.size() > kMaxHeaderBytes) return malformed("header larger than 1 MiB");
  }
  if (!header->ParseFromString(rest)) return InvalidArgument("malformed PageBatch: its fields do not parse");
  return Status::Ok();
}

// ---------------------------------------------------------------- receiver

BatchApplier::BatchApplier() = default;

BatchApplier::~BatchApplier() {
  if (zstd_ != nullptr) ZSTD_freeDCtx(AsDCtx(zstd_));
}

SlotFiles SlotFiles::Of(const engine::MigrationTarget& target, bool write_through) {
  SlotFiles f;
  f.write_through_ = write_through;
  for (const engine::MemorySlot& s : target.memory().slots()) {
    if (std::optional<engine::MemoryFile> file = target.memory_file(s.slot); file && file->fd >= 0) {
      f.files_.emplace_back(s.slot, *file);
    }
  }
  return f;
}

const engine::MemoryFile* SlotFiles::Find(uint32_t slot) const {
  for (const auto& [id, file] : files_) {
    if (id == slot) return &file;
  }
  return nullptr;
}

namespace {

// Writes `len` bytes of `data`, starting at data[*chunk] + *off, to `fd` at
// `pos`; advances *chunk/*off past them. The kernel copies straight from the
// received buffers into the file's pages.
Status WriteToFile(int fd, uint64_t pos, uint64_t len, Chunks data, size_t* chunk, uint64_t* off) {
  constexpr int kMaxIov = 64;
  while (len > 0) {
    iovec iov[kMaxIov];
    int n = 0;
    uint64_t want = 0;
    size_t c = *chunk;
    uint64_t o = *off;
    while (n < kMaxIov && want < len) {
      while (o == data[c].size()) {
        ++c;
        o = 0;
      }
      const uint64_t k = std::min(len - want, data[c].size() - o);
      iov[n].iov_base = const_cast<uint8_t*>(data[c].data() + o);
      iov[n].iov_len = k;
      ++n;
      want += k;
      o += k;
    }
    const ssize_t w = ::pwritev(fd, iov, n, static_cast<off_t>(pos));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      return ResourceExhausted(w < 0 ? Status::FromErrno(errno, "writing guest memory (pwritev)").message()
                                     : std::string("writing guest memory (pwritev): no progress"));
    }
    // Advance past what was written (all of it, on a memfd, unless short of memory).
    uint64_t done = static_cast<uint64_t>(w);
    pos += done;
    len -= done;
    while (done > 0) {
      while (*off == data[*chunk].size()) {
        ++*chunk;
        *off = 0;
      }
      const uint64_t k = std::min(done, data[*chunk].size() - *off);
      *off += k;
      done -= k;
    }
  }
  return Status::Ok();
}

// Whether [pos, pos+len) of `fd` is all hole (never written: reads as zero).
bool IsHole(int fd, uint64_t pos, uint64_t len) {
  const off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
  if (data < 0) return errno == ENXIO;  // no data from pos to the end
  return static_cast<uint64_t>(data) >= pos + len;
}

// Whether `b`'s checksum is that of its header and the data `hash` was fed.
Status VerifyChecksum(const proto::PageBatch& b, PayloadHash& hash, Checksum kind) {
  const uint64_t sum = BatchChecksum(b, hash.Digest(), kind);
  if (sum == b.checksum()) return Status::Ok();
  return DataLoss("batch " + std::to_string(b.sequence()) + ": checksum mismatch (batch says " +
                  FormatHex(b.checksum()) + ", contents give " + FormatHex(sum) + ")");
}

// Clears the zero run `r` at `dst`: pages a previous round may have filled.
// Pages already zero (never touched, e.g. the host's shared zero page) are
// only read, so they are not made resident, and a hole of the file, which
// already reads as zero, is not even read (that would allocate a page).
void ClearZeroRun(const proto::PageRun& r, uint8_t* dst, const SlotFiles* files, const engine::SlotTable& memory,
                  engine::PageDigestTable* digests) {
  const uint64_t len = uint64_t{r.pages()} << kPageShift;
  const engine::MemorySlot* slot = files != nullptr && !files->empty() ? memory.FindByGpa(r.gpa()) : nullptr;
  const engine::MemoryFile* file = slot != nullptr ? files->Find(slot->slot) : nullptr;
  if (file == nullptr || !IsHole(file->fd, file->offset + (r.gpa() - slot->gpa), len)) {
    for (uint64_t o = 0; o < len; o += kPageSize) {
      if (!IsZeroPage(dst + o)) std::memset(dst + o, 0, kPageSize);
    }
  }
  if (digests != nullptr) digests->SetZero(r.gpa(), r.pages());
}

// The data run `r` was written at `dst`, its checksum passed.
void Written(const proto::PageRun& r, uint8_t* dst, engine::PageDigestTable* digests) {
  // A test's stand-in for memory corrupted after the checksum passed: only
  // the end-to-end digest can notice it.
  if (TamperPoint("tamper.receiver.after_checksum")) dst[(uint64_t{r.pages()} << kPageShift) / 2] ^= 0x01;
  if (digests != nullptr) digests->Update(r.gpa(), r.pages());
}

}  // namespace

bool BatchApplier::AllMapped(const uint8_t* host, uint64_t pages) {
  // /proc/self/pagemap: one 64-bit entry per virtual page, bit 63 = present.
  if (!pagemap_.valid()) {
    if (pagemap_failed_) return false;
    pagemap_ = UniqueFd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (!pagemap_.valid()) {
      pagemap_failed_ = true;
      return false;
    }
  }
  // The first and the last page only: runs are filled one way or the other
  // (fresh, or populated ahead), and a wrong guess only costs a fault.
  for (const uint64_t page : {uint64_t{0}, pages - 1}) {
    uint64_t entry = 0;
    const off_t pos = static_cast<off_t>((reinterpret_cast<uintptr_t>(host) >> kPageShift) + page) * 8;
    if (::pread(pagemap_.get(), &entry, sizeof entry, pos) != static_cast<ssize_t>(sizeof entry)) return false;
    if ((entry >> 63) == 0) return false;
  }
  return true;
}

Result<ApplyResult> BatchApplier::Apply(const proto::PageBatch& batch, const engine::SlotTable& memory,
                                        engine::PageDigestTable* digests, const SlotFiles* files) {
  const std::span<const uint8_t> payload(reinterpret_cast<const uint8_t*>(batch.payload().data()),
                                         batch.payload().size());
  return Apply(batch, Chunks(&payload, 1), memory, digests, files);
}

Result<uint64_t> BatchApplier::CheckRuns(const proto::PageBatch& b, const engine::SlotTable& memory) {
  const std::string name = "batch " + std::to_string(b.sequence());
  auto invalid = [&](const std::string& what) { return InvalidArgument(name + ": " + what); };
  if (b.runs_size() == 0) return invalid("no pages");
  if (b.runs_size() > static_cast<int>(kMaxBatchPages)) {
    return invalid(std::to_string(b.runs_size()) + " runs, more than the " + std::to_string(kMaxBatchPages) +
                   " pages a batch may hold");
  }
  uint64_t total_pages = 0;
  for (int i = 0; i < b.runs_size(); ++i) {
    const proto::PageRun& r = b.runs(i);
    if (r.pages() == 0) return invalid("run " + std::to_string(i) + ": 0 pages");
    total_pages += r.pages();
    if (total_pages > kMaxBatchPages) {
      return invalid("more than " + std::to_string(kMaxBatchPages) + " pages (oversized batch)");
    }
  }
  uint64_t data_pages = 0;
  for (int i = 0; i < b.runs_size(); ++i) {
    const proto::PageRun& r = b.runs(i);
    const std::string run = "run " + std::to_string(i) + ": ";
    if (r.flags() != proto::PAGE_RUN_DATA && r.flags() != proto::PAGE_RUN_ZERO) {
      return invalid(run + "unknown flags " + FormatHex(r.flags()));
    }
    if ((r.gpa() & (kPageSize - 1)) != 0) return invalid(run + "gpa " + FormatHex(r.gpa()) + " is not page aligned");
    const uint64_t len = uint64_t{r.pages()} << kPageShift;
    if (memory.HostAddress(r.gpa(), len) == nullptr) {
      const std::string where = "gpa " + FormatHex(r.gpa()) + " (+" + std::to_string(r.pages()) + " pages) ";
      if (const engine::MemorySlot* s = memory.FindByGpa(r.gpa()); s != nullptr) {
        return invalid(run + where + "straddles the end of " + engine::DescribeSlot(*s));
      }
      return invalid(run + where + "lies outside guest memory");
    }
    if (r.flags() == proto::PAGE_RUN_DATA) data_pages += r.pages();
  }
  const uint64_t data_len = data_pages << kPageShift;
  if (b.uncompressed_length() != data_len) {
    return invalid("uncompressed_length " + std::to_string(b.uncompressed_length()) + " does not match " +
                   std::to_string(data_pages) + " data pages (" + std::to_string(data_len) + " bytes)");
  }
  return data_pages;
}

Result<ApplyResult> BatchApplier::Apply(const proto::PageBatch& b, Chunks payload, const engine::SlotTable& memory,
                                        engine::PageDigestTable* digests, const SlotFiles* files,
                                        engine::PostcopyMemory* postcopy) {
  const std::string name = "batch " + std::to_string(b.sequence());
  auto invalid = [&](const std::string& what) { return InvalidArgument(name + ": " + what); };

  // 1. The runs: how many pages, where every page goes, which carry data.
  PMLMIG_ASSIGN_OR_RETURN(const uint64_t data_pages, CheckRuns(b, memory));
  const uint64_t data_len = data_pages << kPageShift;

  // 2. The payload: exactly data_len bytes once decompressed.
  uint64_t payload_len = 0;
  for (const auto& c : payload) payload_len += c.size();
  std::span<const uint8_t> unpacked;  // the data, when it had to be decompressed
  switch (b.compression()) {
    case proto::COMPRESSION_NONE:
      if (payload_len != data_len) {
        return invalid("payload is " + std::to_string(payload_len) + " bytes, expected " +
                       std::to_string(data_len) + " (uncompressed)");
      }
      break;
    case proto::COMPRESSION_LZ4:
    case proto::COMPRESSION_ZSTD: {
      const char* cname = b.compression() == proto::COMPRESSION_LZ4 ? "lz4" : "zstd";
      if (data_len == 0 || payload_len == 0 || payload_len > data_len) {
        return invalid(std::string(cname) + " payload of " + std::to_string(payload_len) + " bytes for " +
                       std::to_string(data_len) + " bytes of data");
      }
      const uint8_t* src = payload[0].data();
      if (payload.size() > 1) {  // the decompressors want it in one piece
        if (!gather_) gather_.reset(new uint8_t[kMaxBatchPayload]);
        uint64_t off = 0;
        for (const auto& c : payload) {
          std::memcpy(gather_.get() + off, c.data(), c.size());
          off += c.size();
        }
        src = gather_.get();
      }
      if (!scratch_) scratch_.reset(new uint8_t[kMaxBatchPayload]);
      uint64_t got = 0;
      if (b.compression() == proto::COMPRESSION_LZ4) {
        const int r = LZ4_decompress_safe(reinterpret_cast<const char*>(src), reinterpret_cast<char*>(scratch_.get()),
                                          static_cast<int>(payload_len), static_cast<int>(data_len));
        if (r < 0) return DataLoss(name + ": lz4 payload is corrupt (does not decompress)");
        got = static_cast<uint64_t>(r);
      } else {
        if (zstd_ == nullptr) zstd_ = ZSTD_createDCtx();
        if (zstd_ == nullptr) return ResourceExhausted("zstd: cannot create a decompression context");
        const size_t r = ZSTD_decompressDCtx(AsDCtx(zstd_), scratch_.get(), data_len, src, payload_len);
        if (ZSTD_isError(r)) return DataLoss(name + ": zstd payload is corrupt: " + ZSTD_getErrorName(r));
        got = r;
      }
      if (got != data_len) {
        return DataLoss(name + ": " + cname + " payload decompresses to " + std::to_string(got) +
                        " bytes, expected " + std::to_string(data_len));
      }
      unpacked = std::span<const uint8_t>(scratch_.get(), data_len);
      break;
    }
    default:
      return invalid("unknown compression " + std::to_string(static_cast<int>(b.compression())));
  }
  const Chunks data = unpacked.data() != nullptr ? Chunks(&unpacked, 1) : payload;

  // 3. The checksum, over the uncompressed data and the header.
  PayloadHash hash(checksum_);
  for (const auto& c : data) hash.Update(c.data(), c.size());
  PMLMIG_RETURN_IF_ERROR(VerifyChecksum(b, hash, checksum_));

  // 4. Only now write. Post-copy: each run placed where its pages are still
  // missing (engine/postcopy.h), in one piece from the payload.
  ApplyResult result;
  size_t chunk = 0;
  uint64_t off = 0;  // into data[chunk]
  if (postcopy != nullptr) {
    for (const proto::PageRun& r : b.runs()) {
      const uint64_t len = uint64_t{r.pages()} << kPageShift;
      if (r.flags() != proto::PAGE_RUN_DATA) {
        PMLMIG_RETURN_IF_ERROR(postcopy->Place(r.gpa(), r.pages(), nullptr).status().WithContext(name));
        result.zero_pages += r.pages();
        continue;
      }
      const uint8_t* src = RunSource(data, &chunk, &off, len);
      PMLMIG_RETURN_IF_ERROR(postcopy->Place(r.gpa(), r.pages(), src).status().WithContext(name));
      result.normal_pages += r.pages();
    }
    return result;
  }
  for (const proto::PageRun& r : b.runs()) {
    const uint64_t len = uint64_t{r.pages()} << kPageShift;
    uint8_t* dst = memory.HostAddress(r.gpa(), len);
    if (r.flags() != proto::PAGE_RUN_DATA) {
      ClearZeroRun(r, dst, files, memory, digests);
      result.zero_pages += r.pages();
      continue;
    }
    const engine::MemoryFile* file = nullptr;
    uint64_t file_pos = 0;
    const Route route = RouteOf(r, dst, files, memory, &file, &file_pos);
    if (route == Route::kFile) {
      PMLMIG_RETURN_IF_ERROR(WriteToFile(file->fd, file_pos, len, data, &chunk, &off).WithContext(name));
    } else if (route == Route::kFill) {
      // Fresh memory, several streams: placed in the kernel (uffd_fill.h).
      const uint8_t* src = RunSource(data, &chunk, &off, len);
      const uint64_t placed = files->fill()->Place(dst, src, len);
      if (placed < len) std::memcpy(dst + placed, src + placed, len - placed);
    } else {
      for (uint64_t done = 0; done < len;) {
        while (off == data[chunk].size()) {
          ++chunk;
          off = 0;
        }
        const uint64_t k = std::min(len - done, data[chunk].size() - off);
        std::memcpy(dst + done, data[chunk].data() + off, k);
        done += k;
        off += k;
      }
    }
    Written(r, dst, digests);
    result.normal_pages += r.pages();
  }
  return result;
}

bool BatchApplier::PlanInPlace(const proto::PageBatch& b, uint64_t payload_len, const engine::SlotTable& memory,
                               const SlotFiles* files, std::vector<std::span<uint8_t>>* dest) {
  dest->clear();
  if (b.compression() != proto::COMPRESSION_NONE) return false;
  const Result<uint64_t> data_pages = CheckRuns(b, memory);
  if (!data_pages.ok() || (*data_pages << kPageShift) != payload_len) return false;
  for (const proto::PageRun& r : b.runs()) {
    if (r.flags() != proto::PAGE_RUN_DATA) continue;
    const uint64_t len = uint64_t{r.pages()} << kPageShift;
    uint8_t* dst = memory.HostAddress(r.gpa(), len);
    const engine::MemoryFile* file = nullptr;
    uint64_t file_pos = 0;
    if (RouteOf(r, dst, files, memory, &file, &file_pos) != Route::kMapping) return false;
    dest->emplace_back(dst, len);
  }
  return true;
}

Result<ApplyResult> BatchApplier::FinishInPlace(const proto::PageBatch& b, PayloadHash& hash,
                                                const engine::SlotTable& memory, engine::PageDigestTable* digests,
                                                const SlotFiles* files) {
  PMLMIG_RETURN_IF_ERROR(VerifyChecksum(b, hash, checksum_));
  ApplyResult result;
  for (const proto::PageRun& r : b.runs()) {
    uint8_t* dst = memory.HostAddress(r.gpa(), uint64_t{r.pages()} << kPageShift);
    if (r.flags() != proto::PAGE_RUN_DATA) {
      ClearZeroRun(r, dst, files, memory, digests);
      result.zero_pages += r.pages();
    } else {
      Written(r, dst, digests);
      result.normal_pages += r.pages();
    }
  }
  return result;
}

const uint8_t* BatchApplier::RunSource(Chunks data, size_t* chunk, uint64_t* off, uint64_t len) {
  while (*off == data[*chunk].size()) {
    ++*chunk;
    *off = 0;
  }
  const uint8_t* src = data[*chunk].data() + *off;
  if (data[*chunk].size() - *off >= len) {
    *off += len;
    return src;
  }
  if (!gather_) gather_.reset(new uint8_t[kMaxBatchPayload]);
  for (uint64_t done = 0; done < len;) {
    while (*off == data[*chunk].size()) {
      ++*chunk;
      *off = 0;
    }
    const uint64_t k = std::min(len - done, data[*chunk].size() - *off);
    std::memcpy(gather_.get() + done, data[*chunk].data() + *off, k);
    done += k;
    *off += k;
  }
  return gather_.get();
}

BatchApplier::Route BatchApplier::RouteOf(const proto::PageRun& r, uint8_t* dst, const SlotFiles* files,
                                          const engine::SlotTable& memory, const engine::MemoryFile** file,
                                          uint64_t* file_pos) {
  if (ThroughFile(r, dst, files, memory, file, file_pos)) return Route::kFile;
  UffdFill* fill = files != nullptr ? files->fill() : nullptr;
  if (fill != nullptr && fill->Covers(dst, uint64_t{r.pages()} << kPageShift) && !AllMapped(dst, r.pages())) {
    return Route::kFill;
  }
  return Route::kMapping;
}

bool BatchApplier::ThroughFile(const proto::PageRun& r, uint8_t* dst, const SlotFiles* files,
                               const engine::SlotTable& memory, const engine::MemoryFile** file, uint64_t* file_pos) {
  // Through the file where the pages are not yet mapped here (fresh
  // memory: no page-table fault per page); through the mapping where they
  // are (a plain copy, twice as fast as pwritev into resident pages).
  if (files == nullptr || files->empty() || !files->write_through()) return false;
  const engine::MemorySlot* slot = memory.FindByGpa(r.gpa());
  *file = slot != nullptr ? files->Find(slot->slot) : nullptr;
  if (*file == nullptr || AllMapped(dst, r.pages())) return false;
  *file_pos = (*file)->offset + (r.gpa() - slot->gpa);
  return true;
}

}  // namespace pmlmig::transport
