// The snapshot file format: see snapshot_file.h and docs/SNAPSHOT_FORMAT.md.
// Every integer is encoded byte by byte (PutLe/GetLe), so the format is
// little-endian whatever the host, and the header's fields are one table
// (kFields) that both the encoder and the decoder walk.
#include "pmlmig/engine/snapshot_file.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxh_x86dispatch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>

#include "pmlmig/base/clock.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/base/units.h"

namespace pmlmig::engine {

namespace {

constexpr char kMagic[8] = {'P', 'M', 'L', 'M', 'I', 'G', 'S', 'N'};
constexpr uint64_t kFlagComplete = 1;
constexpr uint64_t kKnownFlags = kFlagComplete;
constexpr uint64_t kLayoutOffset = kSnapshotHeaderBytes;
constexpr uint64_t kRegionEntryBytes = 32;
constexpr uint64_t kMaxFileOffset = static_cast<uint64_t>(std::numeric_limits<off_t>::max());
// The work unit of LoadInto and VerifyFile: a few MiB, and never across a
// chunk boundary, so each piece adds to exactly one chunk's sum.
constexpr uint64_t kPieceBytes = 4ull << 20;
// Locks serialising writes per chunk (chunk i uses kLockStripes' i-th modulo):
// enough that writers of different chunks rarely share one.
constexpr size_t kLockStripes = 256;

alignas(64) const uint8_t kZeros[64 * 1024] = {};

// The header, decoded; every field held as u64. kFields says where each one
// lives and how wide it is; bytes that no field covers are reserved (zero).
struct Header {
  uint64_t major = 0, minor = 0, header_bytes = 0, flags = 0, page_size = 0, vcpus = 0, region_count = 0;
  uint64_t guest_bytes = 0, layout_offset = 0, layout_bytes = 0, data_offset = 0, data_bytes = 0;
  uint64_t meta_offset = 0, meta_bytes = 0, description_bytes = 0, state_bytes = 0, chunk_bytes = 0;
  uint64_t chunk_count = 0, meta_checksum = 0, layout_checksum = 0, created_ns = 0, header_checksum = 0;
};

struct Field {
  const char* name;
  uint32_t offset;
  uint32_t width;
  uint64_t Header::*member;
};
constexpr Field kFields[] = {
    {"major version", 8, 2, &Header::major},          {"minor version", 10, 2, &Header::minor},
    {"header bytes", 12, 4, &Header::header_bytes},   {"flags", 16, 8, &Header::flags},
    {"page size", 24, 4, &Header::page_size},         {"vcpus", 28, 4, &Header::vcpus},
    {"region count", 32, 4, &Header::region_count},   {"guest bytes", 40, 8, &Header::guest_bytes},
    {"layout offset", 48, 8, &Header::layout_offset}, {"layout bytes", 56, 8, &Header::layout_bytes},
    {"data offset", 64, 8, &Header::data_offset},     {"data bytes", 72, 8, &Header::data_bytes},
    {"meta offset", 80, 8, &Header::meta_offset},     {"meta bytes", 88, 8, &Header::meta_bytes},
    {"description bytes", 96, 8, &Header::description_bytes},
    {"state bytes", 104, 8, &Header::state_bytes},    {"chunk bytes", 112, 8, &Header::chunk_bytes},
    {"chunk count", 120, 8, &Header::chunk_count},    {"meta checksum", 128, 8, &Header::meta_checksum},
    {"layout checksum", 136, 8, &Header::layout_checksum},
    {"created ns", 144, 8, &Header::created_ns},      {"header checksum", 152, 8, &Header::header_checksum},
};
constexpr uint32_t kHeaderChecksumOffset = 152;

using HeaderBytes = std::array<uint8_t, kSnapshotHeaderBytes>;

void PutLe(uint8_t* p, uint64_t v, unsigned width) {
  for (unsigned i = 0; i < width; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t GetLe(const uint8_t* p, unsigned width) {
  uint64_t v = 0;
  for (unsigned i = 0; i < width; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}
uint64_t AlignUp(uint64_t v, uint64_t align) { return (v + align - 1) & ~(align - 1); }

// Cat("ends at byte ", n, ...): messages without a chain of std::to_string.
void Append(std::string& s, std::string_view v) { s += v; }
void Append(std::string& s, uint64_t v) { s += std::to_string(v); }
template <typename... A>
std::string Cat(const A&... a) {
  std::string s;
  (Append(s, a), ...);
  return s;
}

// "state bytes (header offset 104)": how messages name a field.
std::string FieldName(uint64_t Header::*member) {
  for (const Field& f : kFields) {
    if (f.member == member) return Cat(f.name, " (header offset ", uint64_t{f.offset}, ")");
  }
  return "?";
}

// By value: the checksum field is zeroed in a copy.
uint64_t HeaderChecksum(HeaderBytes b) {
  PutLe(b.data() + kHeaderChecksumOffset, 0, 8);
  return XXH3_64bits_dispatch(b.data(), b.size());
}

HeaderBytes EncodeHeader(const Header& h) {
  HeaderBytes b{};
  std::memcpy(b.data(), kMagic, sizeof kMagic);
  for (const Field& f : kFields) PutLe(b.data() + f.offset, h.*f.member, f.width);
  PutLe(b.data() + kHeaderChecksumOffset, HeaderChecksum(b), 8);
  return b;
}

Header DecodeHeader(const HeaderBytes& b) {
  Header h;
  for (const Field& f : kFields) h.*f.member = GetLe(b.data() + f.offset, f.width);
  return h;
}

std::vector<uint8_t> EncodeLayout(std::span<const SnapshotRegion> regions) {
  std::vector<uint8_t> out(regions.size() * kRegionEntryBytes);
  for (size_t i = 0; i < regions.size(); ++i) {
    uint8_t* p = out.data() + i * kRegionEntryBytes;
    PutLe(p, regions[i].slot, 4);  // p + 4: reserved, zero
    PutLe(p + 8, regions[i].gpa, 8);
    PutLe(p + 16, regions[i].size, 8);
    PutLe(p + 24, regions[i].file_offset, 8);
  }
  return out;
}

std::vector<SnapshotRegion> DecodeLayout(std::span<const uint8_t> bytes) {
  std::vector<SnapshotRegion> out(bytes.size() / kRegionEntryBytes);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t* p = bytes.data() + i * kRegionEntryBytes;
    out[i] = {static_cast<uint32_t>(GetLe(p, 4)), GetLe(p + 8, 8), GetLe(p + 16, 8), GetLe(p + 24, 8)};
  }
  return out;
}

std::string Where(const std::string& path) { return "snapshot " + path; }
Status Corrupt(const std::string& path, const std::string& what) { return DataLoss(Where(path) + ": " + what); }
std::string DescribeRegion(const SnapshotRegion& r) { return DescribeSlot({r.slot, r.gpa, nullptr, r.size, 0}); }

Status PwriteAll(int fd, const uint8_t* src, uint64_t len, uint64_t off, const std::string& file) {
  while (len > 0) {
    const ssize_t n = ::pwrite(fd, src, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Status::FromErrno(n < 0 ? errno : EIO, Cat("pwrite (", file, ", offset ", off, ")"));
    src += n;
    len -= static_cast<uint64_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

// Reads until `len` bytes or the end of the file; returns how many were read.
Result<uint64_t> PreadAll(int fd, uint8_t* dst, uint64_t len, uint64_t off, const std::string& file) {
  uint64_t done = 0;
  while (done < len) {
    const ssize_t n = ::pread(fd, dst + done, len - done, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Status::FromErrno(errno, Cat("pread (", file, ", offset ", off + done, ")"));
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  return done;
}

// Reads `len` bytes of the guest memory at `gpa` from `file_offset`; a file
// that ends early (truncated after Open) is DataLoss naming the gpa.
Status ReadRun(int fd, const std::string& path, uint64_t gpa, uint64_t file_offset, uint64_t len, uint8_t* dst) {
  PMLMIG_ASSIGN_OR_RETURN(const uint64_t n, PreadAll(fd, dst, len, file_offset, path));
  if (n == len) return Status::Ok();
  return Corrupt(path, Cat("short read at gpa ", FormatHex(gpa + (n & ~(kPageSize - 1))), ": the file ends at byte ",
                           file_offset + n, " (truncated after it was opened?)"));
}

// Makes [off, off+len) read as zero and hold no blocks; a file system that
// cannot punch holes gets zeros written instead (correct, not sparse).
Status PunchHole(int fd, uint64_t off, uint64_t len, const std::string& file) {
  int r;
  do {
    r = ::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), static_cast<off_t>(len));
  } while (r < 0 && errno == EINTR);
  if (r == 0) return Status::Ok();
  if (errno != EOPNOTSUPP && errno != ENOSYS) {
    return Status::FromErrno(errno, Cat("fallocate PUNCH_HOLE (", file, ", offset ", off, ")"));
  }
  for (uint64_t done = 0; done < len; done += sizeof kZeros) {
    PMLMIG_RETURN_IF_ERROR(PwriteAll(fd, kZeros, std::min<uint64_t>(sizeof kZeros, len - done), off + done, file));
  }
  return Status::Ok();
}

// Why `regions` (meant to be sorted by gpa) cannot be a snapshot's layout,
// naming the region; empty when they can.
std::string RegionsProblem(std::span<const SnapshotRegion> regions) {
  if (regions.empty()) return "no memory regions";
  if (regions.size() > kSnapshotMaxRegions) return Cat(regions.size(), " regions, more than ", kSnapshotMaxRegions);
  for (size_t i = 0; i < regions.size(); ++i) {
    const SnapshotRegion& r = regions[i];
    const std::string name = DescribeRegion(r);
    if (r.size == 0) return name + ": empty region";
    if ((r.gpa | r.size) & (kPageSize - 1)) return name + ": gpa or size not page aligned";
    if (r.gpa_end() < r.gpa) return name + ": guest-physical range overflows";
    if (i == 0) continue;
    if (r.gpa < regions[i - 1].gpa) return name + " after " + DescribeRegion(regions[i - 1]) + ": not sorted by gpa";
    if (r.gpa < regions[i - 1].gpa_end()) return name + " overlaps " + DescribeRegion(regions[i - 1]);
  }
  std::vector<uint32_t> ids;
  for (const SnapshotRegion& r : regions) ids.push_back(r.slot);
  std::sort(ids.begin(), ids.end());
  const auto dup = std::adjacent_find(ids.begin(), ids.end());
  if (dup != ids.end()) return Cat("two regions are slot ", uint64_t{*dup});
  return {};
}

// SlotTable and ChunkLayout speak of host memory, and a snapshot has none. The
// table gets addresses inside a PROT_NONE reservation instead: address space
// only, no memory and no commit charge. Nothing here reads through them
// (ChunkLayout, and PageDigestTable's kZero, SetFrom and SetZero, never do);
// anything that did would fault at once rather than read another object.
struct AddressOnlySlots {
  Mapping reservation;
  SlotTable table;
};

// `regions` passed RegionsProblem.
Result<AddressOnlySlots> BuildSlots(std::span<const SnapshotRegion> regions) {
  uint64_t total = 0;
  for (const SnapshotRegion& r : regions) total += r.size;  // no overflow: disjoint ranges below 2^64
  AddressOnlySlots out;
  PMLMIG_ASSIGN_OR_RETURN(out.reservation, Mapping::Map(total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                                        -1, 0, "snapshot layout reservation"));
  uint64_t at = 0;
  for (const SnapshotRegion& r : regions) {
    PMLMIG_RETURN_IF_ERROR(out.table.Set({r.slot, r.gpa, out.reservation.data() + at, r.size, 0}));
    at += r.size;
  }
  return out;
}

const SnapshotRegion* FindRegion(std::span<const SnapshotRegion> regions, uint64_t gpa) {
  auto it = std::upper_bound(regions.begin(), regions.end(), gpa,
                             [](uint64_t g, const SnapshotRegion& r) { return g < r.gpa; });
  if (it == regions.begin()) return nullptr;
  --it;
  return gpa < it->gpa_end() ? &*it : nullptr;
}

std::optional<uint64_t> OffsetOf(std::span<const SnapshotRegion> regions, uint64_t gpa) {
  const SnapshotRegion* r = FindRegion(regions, gpa);
  if (r == nullptr) return std::nullopt;
  return r->file_offset + (gpa - r->gpa);
}

// The region that holds all `pages` pages from `gpa`, or why none does.
Result<const SnapshotRegion*> FindRun(const std::string& path, std::span<const SnapshotRegion> regions, uint64_t gpa,
                                      uint64_t pages) {
  if (gpa & (kPageSize - 1)) return InvalidArgument(Where(path) + ": gpa " + FormatHex(gpa) + " is not page aligned");
  const SnapshotRegion* r = FindRegion(regions, gpa);
  if (r == nullptr) return InvalidArgument(Where(path) + ": gpa " + FormatHex(gpa) + " lies in no region");
  if (pages > ((r->gpa_end() - gpa) >> kPageShift)) {
    return InvalidArgument(Cat(Where(path), ": ", pages, " pages from gpa ", FormatHex(gpa), " run past the end of ",
                               DescribeRegion(*r)));
  }
  return r;
}

// Runs work(i, worker) for every i in [0, n) on `workers` threads (the
// caller's among them); the first error stops the rest and is returned.
template <typename Work>
Status RunParallel(size_t n, unsigned workers, Work&& work) {
  std::atomic<size_t> next{0};       // relaxed: only hands out indices
  std::atomic<bool> failed{false};   // relaxed: a hint to stop; `first` is read after the joins
  std::mutex mu;
  Status first;
  auto run = [&](unsigned worker) {
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;
      Status s = work(i, worker);
      if (s.ok()) continue;
      std::lock_guard lock(mu);
      if (!failed.exchange(true, std::memory_order_relaxed)) first = std::move(s);
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(run, w);
  run(0);
  for (std::thread& t : pool) t.join();
  return first;
}

}  // namespace

std::vector<SnapshotRegion> SnapshotRegionsOf(const SlotTable& memory) {
  std::vector<SnapshotRegion> out;
  for (const MemorySlot& s : memory.slots()) out.push_back({s.slot, s.gpa, s.size, 0});
  return out;
}

// ---------------------------------------------------------------- writer

struct SnapshotWriter::State {
  explicit State(AddressOnlySlots s) : slots(std::move(s)), digests(slots.table, PageDigestTable::Initial::kZero, ZeroPages::kNull) {}

  std::string path, partial;
  UniqueFd fd;  // of `partial`; valid from its creation until Finish or Abandon
  // The same file opened O_DIRECT, for page data written from page-aligned
  // memory: a guest-sized snapshot then does not grow the page cache by the
  // guest's size, whose fresh pages cost 4-6x the disk's own speed on this
  // kind of host (docs/BENCHMARKS.md, "Snapshots"). Invalid where the file
  // system refuses O_DIRECT (tmpfs): buffered writes then.
  UniqueFd direct;
  AddressOnlySlots slots;   // the reservation the digest table's slots point into
  PageDigestTable digests;  // every page's value as the file holds it
  std::vector<SnapshotRegion> regions;  // sorted by gpa: the order of slots.table
  std::string description;
  Header header;  // layout and data fields from Create; Finish fills the rest
  struct alignas(64) Stripe { std::mutex mu; };  // one per cache line: no false sharing
  // Held while a piece of one chunk is written and its digest replaced, so a
  // page's bytes and its value always come from the same write.
  std::array<Stripe, kLockStripes> locks;
  std::atomic<uint64_t> bytes_written{0};  // relaxed: a statistic, orders nothing
  bool finished = false;
};

SnapshotWriter::SnapshotWriter(std::unique_ptr<State> state) : s_(std::move(state)) {}
SnapshotWriter::SnapshotWriter(SnapshotWriter&& o) noexcept = default;
SnapshotWriter& SnapshotWriter::operator=(SnapshotWriter&& o) noexcept {
  if (this != &o) {
    Abandon();
    s_ = std::move(o.s_);
  }
  return *this;
}
SnapshotWriter::~SnapshotWriter() { Abandon(); }

Result<SnapshotWriter> SnapshotWriter::Create(const std::string& path, std::span<const SnapshotRegion> regions_in,
                                              uint32_t vcpus, std::string_view description) {
  if (vcpus == 0) return InvalidArgument(Where(path) + ": no vCPUs");
  if (description.size() > kSnapshotMaxDescriptionBytes) {
    return InvalidArgument(Where(path) + ": a description of " + FormatBytes(description.size()) +
                           " exceeds the limit of " + FormatBytes(kSnapshotMaxDescriptionBytes));
  }
  std::vector<SnapshotRegion> regions(regions_in.begin(), regions_in.end());
  std::sort(regions.begin(), regions.end(), [](const auto& a, const auto& b) { return a.gpa < b.gpa; });
  if (std::string why = RegionsProblem(regions); !why.empty()) return InvalidArgument(Where(path) + ": " + why);
  PMLMIG_ASSIGN_OR_RETURN(AddressOnlySlots slots, BuildSlots(regions));

  auto s = std::make_unique<State>(std::move(slots));
  Header& h = s->header;
  h.major = kSnapshotMajorVersion, h.minor = kSnapshotMinorVersion, h.header_bytes = kSnapshotHeaderBytes;
  h.page_size = kPageSize, h.vcpus = vcpus, h.region_count = regions.size();
  h.layout_offset = kLayoutOffset, h.layout_bytes = regions.size() * kRegionEntryBytes;
  h.data_offset = AlignUp(kLayoutOffset + h.layout_bytes, kSnapshotRegionAlign);
  uint64_t at = h.data_offset;
  for (SnapshotRegion& r : regions) {
    r.file_offset = at;
    at = AlignUp(at + r.size, kSnapshotRegionAlign);
    h.guest_bytes += r.size;
  }
  h.data_bytes = regions.back().file_offset + regions.back().size - h.data_offset;
  h.meta_offset = h.data_offset + h.data_bytes;  // page aligned: so are region sizes
  h.chunk_bytes = s->digests.layout().chunk_bytes(), h.chunk_count = s->digests.layout().size();
  if (h.meta_offset > kMaxFileOffset / 2) return InvalidArgument(Where(path) + ": guest memory too large for a file");
  s->path = path, s->partial = path + ".partial", s->description = description;
  s->regions = std::move(regions);
  SnapshotWriter w(std::move(s));  // from here on, a failure unlinks the partial file
  PMLMIG_RETURN_IF_ERROR(w.CreateFile());
  return w;
}

// Opens <path>.partial as this writer's own: created if absent, and held
// with an exclusive flock for the writer's life. A partial file another
// writer holds is refused; one nobody holds (a writer that crashed) is
// taken over and emptied. The lock is checked against the name once held:
// the inode may have been renamed into place by its writer meanwhile.
Result<UniqueFd> OpenPartial(const std::string& path, const std::string& partial) {
  for (int attempt = 0; attempt < 8; ++attempt) {
    UniqueFd fd(::open(partial.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!fd.valid()) return Status::FromErrno(errno, "create " + partial);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) < 0) {
      if (errno == EWOULDBLOCK) {
        return Unavailable("snapshot " + path + ": another snapshot to this file is being written (it holds " +
                           partial + ")");
      }
      return Status::FromErrno(errno, "lock " + partial);
    }
    struct stat held {}, named {};
    if (::fstat(fd.get(), &held) < 0) return Status::FromErrno(errno, "stat " + partial);
    if (::stat(partial.c_str(), &named) < 0 || held.st_ino != named.st_ino || held.st_dev != named.st_dev) continue;
    if (!S_ISREG(held.st_mode)) return InvalidArgument("snapshot " + path + ": " + partial + " is not a regular file");
    if (::ftruncate(fd.get(), 0) < 0) return Status::FromErrno(errno, "empty stale " + partial);
    return fd;
  }
  return Unavailable("snapshot " + path + ": " + partial + " keeps changing (other writers?)");
}

Status SnapshotWriter::CreateFile() {
  State& s = *s_;
  // Only a regular file is replaced: never a device, a FIFO, a symlink or a
  // directory someone named by mistake (the rename would replace the link
  // or the node itself, after the whole snapshot was written).
  struct stat st {};
  if (::lstat(s.path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    const char* what = S_ISDIR(st.st_mode)   ? "a directory"
                       : S_ISLNK(st.st_mode) ? "a symbolic link"
                       : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                       : S_ISFIFO(st.st_mode) ? "a FIFO"
                                              : "not a regular file";
    return InvalidArgument("snapshot " + s.path + ": exists and is " + std::string(what) +
                           "; a snapshot replaces only a regular file");
  }
  PMLMIG_ASSIGN_OR_RETURN(s.fd, OpenPartial(s.path, s.partial));
  const int fd = s.fd.get();
  s.direct.Reset(::open(s.partial.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC | O_NOFOLLOW));  // -1: buffered only
  const uint64_t data_end = s.header.data_offset + s.header.data_bytes;
  if (::ftruncate(fd, static_cast<off_t>(data_end)) < 0) {
    return Status::FromErrno(errno, Cat("ftruncate ", s.partial, " to ", data_end, " bytes"));
  }
  const std::vector<uint8_t> layout = EncodeLayout(s.regions);
  s.header.layout_checksum = XXH3_64bits_dispatch(layout.data(), layout.size());
  PMLMIG_RETURN_IF_ERROR(PwriteAll(fd, layout.data(), layout.size(), kLayoutOffset, s.partial));
  const HeaderBytes header = EncodeHeader(s.header);  // complete flag clear
  return PwriteAll(fd, header.data(), header.size(), 0, s.partial);
}

template <typename Write>
Status SnapshotWriter::UnderChunkLocks(const char* op, uint64_t gpa, uint64_t pages, Write&& write) {
  if (s_ == nullptr || !s_->fd.valid()) return InvalidArgument(std::string(op) + " after Finish or Abandon");
  State& s = *s_;
  PMLMIG_ASSIGN_OR_RETURN(const SnapshotRegion* r, FindRun(s.path, s.regions, gpa, pages));
  const size_t index = static_cast<size_t>(r - s.regions.data());
  const ChunkLayout& layout = s.digests.layout();
  const uint64_t end = gpa + (pages << kPageShift);
  while (gpa < end) {
    const uint64_t off = gpa - r->gpa;
    const uint64_t len = std::min(end - gpa, layout.chunk_bytes() - off % layout.chunk_bytes());
    const size_t chunk = layout.ChunkOf(index, off >> kPageShift);
    std::lock_guard lock(s.locks[chunk % kLockStripes].mu);
    PMLMIG_RETURN_IF_ERROR(write(gpa, len >> kPageShift, r->file_offset + off));
    gpa += len;
  }
  return Status::Ok();
}

// Runs shorter than this are written through the page cache (WritePages).
constexpr uint64_t kDirectMinPages = 32;

Status SnapshotWriter::WritePages(uint64_t gpa, uint64_t pages, const uint8_t* data) {
  if (data == nullptr && pages > 0) return InvalidArgument("WritePages: no data");
  const uint64_t first = gpa;
  Status written = UnderChunkLocks("WritePages", gpa, pages, [&](uint64_t at, uint64_t n, uint64_t offset) {
    const uint8_t* src = data + (at - first);
    const bool aligned = reinterpret_cast<uintptr_t>(src) % kPageSize == 0;
    // Large runs bypass the page cache (a whole guest's worth of fresh cache
    // is slow to get on a host that backs memory lazily); short ones, the
    // scattered pages of a live snapshot's last rounds, go through it, and
    // Finish's fdatasync writes them back together instead of one
    // synchronous O_DIRECT write each while the VM is paused.
    const bool direct = aligned && n >= kDirectMinPages && s_->direct.valid();
    PMLMIG_RETURN_IF_ERROR(
        PwriteAll(direct ? s_->direct.get() : s_->fd.get(), src, n << kPageShift, offset, s_->partial));
    s_->digests.SetFrom(at, n, src);
    return Status::Ok();
  });
  if (!written.ok()) return written;
  s_->bytes_written.fetch_add(pages << kPageShift, std::memory_order_relaxed);
  return Status::Ok();
}

Status SnapshotWriter::WriteZeroPages(uint64_t gpa, uint64_t pages) {
  return UnderChunkLocks("WriteZeroPages", gpa, pages, [&](uint64_t at, uint64_t n, uint64_t offset) {
    PMLMIG_RETURN_IF_ERROR(PunchHole(s_->fd.get(), offset, n << kPageShift, s_->partial));
    s_->digests.SetZero(at, n);
    return Status::Ok();
  });
}

Status SnapshotWriter::Finish(std::span<const uint8_t> state, const std::vector<uint64_t>* expected) {
  if (s_ == nullptr || !s_->fd.valid()) return InvalidArgument("Finish after Finish or Abandon");
  State& s = *s_;
  if (state.size() > kSnapshotMaxStateBytes) {
    return InvalidArgument(Where(s.path) + ": a state of " + FormatBytes(state.size()) + " exceeds the limit of " +
                           FormatBytes(kSnapshotMaxStateBytes));
  }
  const std::vector<uint64_t> digests = s.digests.Snapshot();
  if (expected != nullptr) {
    if (expected->size() != digests.size()) {
      return InvalidArgument(Cat(Where(s.path), ": ", expected->size(), " expected chunk digests for a layout of ",
                                 digests.size(), " chunks"));
    }
    const DigestMismatch m = CompareChunkDigests(s.digests.layout(), digests, *expected);
    if (!m.empty()) {
      return DataLoss(Where(s.path) + ": the pages written differ from the source's memory, so it was not published: " +
                      m.Describe());
    }
  }
  PMLMIG_RETURN_IF_ERROR(WriteMeta(state, digests));
  return Publish();
}

Status SnapshotWriter::WriteMeta(std::span<const uint8_t> state, const std::vector<uint64_t>& digests) {
  State& s = *s_;
  std::vector<uint8_t> meta(s.description.begin(), s.description.end());
  meta.insert(meta.end(), state.begin(), state.end());
  const size_t at = meta.size();
  meta.resize(at + digests.size() * 8);
  for (size_t i = 0; i < digests.size(); ++i) PutLe(meta.data() + at + i * 8, digests[i], 8);
  Header& h = s.header;
  h.description_bytes = s.description.size(), h.state_bytes = state.size(), h.meta_bytes = meta.size();
  h.meta_checksum = XXH3_64bits_dispatch(meta.data(), meta.size());
  // Exactly this long, also when an earlier Finish wrote a longer meta section.
  const uint64_t end = h.meta_offset + h.meta_bytes;
  if (::ftruncate(s.fd.get(), static_cast<off_t>(end)) < 0) {
    return Status::FromErrno(errno, Cat("ftruncate ", s.partial, " to ", end, " bytes"));
  }
  PMLMIG_RETURN_IF_ERROR(PwriteAll(s.fd.get(), meta.data(), meta.size(), h.meta_offset, s.partial));
  // Pages and meta on disk before a header that calls them complete.
  if (::fdatasync(s.fd.get()) < 0) return Status::FromErrno(errno, "fdatasync " + s.partial);
  return Status::Ok();
}

Status SnapshotWriter::Publish() {
  State& s = *s_;
  s.header.flags |= kFlagComplete;
  s.header.created_ns = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
  const HeaderBytes header = EncodeHeader(s.header);
  s.header.flags &= ~kFlagComplete;  // until the rename, a retried Finish starts from here
  PMLMIG_RETURN_IF_ERROR(PwriteAll(s.fd.get(), header.data(), header.size(), 0, s.partial));
  // The header on disk before the name: a crash leaves the old <path> or this one, complete.
  if (::fdatasync(s.fd.get()) < 0) return Status::FromErrno(errno, "fdatasync " + s.partial);
  if (::rename(s.partial.c_str(), s.path.c_str()) < 0) {
    return Status::FromErrno(errno, "rename " + s.partial + " to " + s.path);
  }
  s.finished = true;
  s.fd.Reset();
  s.direct.Reset();
  std::string dir = std::filesystem::path(s.path).parent_path().string();
  if (dir.empty()) dir = ".";
  UniqueFd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dfd.valid() || ::fsync(dfd.get()) < 0) {
    return Status::FromErrno(errno, "fsync directory " + dir + " (" + s.path +
                                        " is complete but its name may not survive a crash)");
  }
  return Status::Ok();
}

void SnapshotWriter::Abandon() {
  if (s_ == nullptr || s_->finished || !s_->fd.valid()) return;
  // Unlinked while still locked, so the name never goes from under a writer
  // that took it over; best effort: a stale one is taken over by the next.
  ::unlink(s_->partial.c_str());
  s_->direct.Reset();
  s_->fd.Reset();
}

const std::string& SnapshotWriter::path() const { return s_->path; }
std::string SnapshotWriter::partial_path() const { return s_->partial; }
std::span<const SnapshotRegion> SnapshotWriter::regions() const { return s_->regions; }
std::optional<uint64_t> SnapshotWriter::FileOffset(uint64_t gpa) const { return OffsetOf(s_->regions, gpa); }
uint64_t SnapshotWriter::bytes_written() const { return s_->bytes_written.load(std::memory_order_relaxed); }
const ChunkLayout& SnapshotWriter::layout() const { return s_->digests.layout(); }
std::vector<uint64_t> SnapshotWriter::chunk_digests() const { return s_->digests.Snapshot(); }
int SnapshotWriter::data_fd() const { return s_ == nullptr ? -1 : s_->fd.get(); }
bool SnapshotWriter::finished() const { return s_ != nullptr && s_->finished; }

// ---------------------------------------------------------------- reader

namespace {

Result<Header> ReadHeader(int fd, const std::string& path, uint64_t file_size) {
  HeaderBytes b{};
  PMLMIG_ASSIGN_OR_RETURN(const uint64_t n, PreadAll(fd, b.data(), b.size(), 0, path));
  if (n < sizeof kMagic || std::memcmp(b.data(), kMagic, sizeof kMagic) != 0) {
    return InvalidArgument(Where(path) + ": not a pmlmig snapshot (no \"PMLMIGSN\" magic at offset 0)");
  }
  const Header h = DecodeHeader(b);
  if (n >= 12 && h.major != kSnapshotMajorVersion) {
    return Unavailable(Cat(Where(path), ": format version ", h.major, ".", h.minor,
                           " (header offset 8), this pmlmig reads ", uint64_t{kSnapshotMajorVersion}, ".x"));
  }
  if (n < kSnapshotHeaderBytes) {
    return Corrupt(path, Cat("truncated: the header ends at byte 4096 but the file has ", file_size, " bytes"));
  }
  auto bad = [&](uint64_t Header::*f, std::string_view why) { return Corrupt(path, Cat(FieldName(f), why)); };
  if (h.header_bytes != kSnapshotHeaderBytes) return bad(&Header::header_bytes, " is not 4096 as in version 1");
  if (const uint64_t sum = HeaderChecksum(b); sum != h.header_checksum) {
    return Corrupt(path, Cat("header checksum mismatch: ", FieldName(&Header::header_checksum), " is ",
                             FormatHex(h.header_checksum), ", the header hashes to ", FormatHex(sum)));
  }
  if ((h.flags & kFlagComplete) == 0) {
    return Corrupt(path, Cat("incomplete: the snapshot was not finished (", FieldName(&Header::flags),
                             " lacks the complete bit)"));
  }
  if (h.flags & ~kKnownFlags) return bad(&Header::flags, Cat(" has unknown bits ", FormatHex(h.flags & ~kKnownFlags)));
  if (h.page_size != kPageSize) return bad(&Header::page_size, Cat(" is ", h.page_size, ", not 4096"));
  return h;
}

// Sizes and offsets against each other and the file, before anything they
// describe is read or allocated. Sums are checked for overflow.
Status CheckSections(const Header& h, const std::string& path, uint64_t file_size) {
  auto bad = [&](uint64_t Header::*f, std::string_view why) {
    return Corrupt(path, Cat(FieldName(f), " is ", h.*f, ": ", why));
  };
  if (h.vcpus == 0) return bad(&Header::vcpus, "a VM has at least one");
  if (h.region_count == 0 || h.region_count > kSnapshotMaxRegions) return bad(&Header::region_count, "not 1 to 65536");
  if (h.layout_offset != kLayoutOffset) return bad(&Header::layout_offset, "version 1 has the layout at 4096");
  if (h.layout_bytes != h.region_count * kRegionEntryBytes) return bad(&Header::layout_bytes, "not 32 per region");
  const uint64_t layout_end = kLayoutOffset + h.layout_bytes;
  if (h.data_offset % kSnapshotRegionAlign != 0 || h.data_offset < layout_end || h.data_offset > kMaxFileOffset) {
    return bad(&Header::data_offset, Cat("not 2 MiB aligned after the layout's end (", layout_end, ")"));
  }
  if (h.data_bytes % kPageSize != 0 || h.data_bytes > kMaxFileOffset - h.data_offset) {
    return bad(&Header::data_bytes, "not page aligned, or past the largest file offset");
  }
  const uint64_t data_end = h.data_offset + h.data_bytes;
  if (h.meta_offset % kPageSize != 0 || h.meta_offset < data_end || h.meta_offset > kMaxFileOffset) {
    return bad(&Header::meta_offset, Cat("not page aligned at or after the data's end (", data_end, ")"));
  }
  uint64_t meta = 0;
  const bool overflow = __builtin_mul_overflow(h.chunk_count, 8, &meta) ||
                        __builtin_add_overflow(meta, h.description_bytes, &meta) ||
                        __builtin_add_overflow(meta, h.state_bytes, &meta);
  if (overflow || h.meta_bytes != meta) {
    return bad(&Header::meta_bytes, Cat("not description bytes + state bytes + 8 * chunk count (",
                                        overflow ? std::string("overflows") : std::to_string(meta), ")"));
  }
  auto truncated = [&](std::string_view section, uint64_t end) {
    return Corrupt(path, Cat("truncated: the ", section, " section ends at byte ", end, " but the file has ",
                             file_size, " bytes"));
  };
  if (data_end > file_size) return truncated("data", data_end);
  // meta_offset + meta_bytes: no overflow, both are below 2^63 once meta_bytes is.
  if (h.meta_bytes > kMaxFileOffset || h.meta_offset + h.meta_bytes > file_size) {
    return truncated("meta", h.meta_bytes > kMaxFileOffset ? h.meta_bytes : h.meta_offset + h.meta_bytes);
  }
  if (h.description_bytes > kSnapshotMaxDescriptionBytes) return bad(&Header::description_bytes, "over the limit");
  if (h.state_bytes > kSnapshotMaxStateBytes) return bad(&Header::state_bytes, "over the limit");
  return Status::Ok();
}

Result<std::vector<SnapshotRegion>> ReadLayout(int fd, const std::string& path, const Header& h) {
  std::vector<uint8_t> bytes(h.layout_bytes);  // at most 2 MiB: region count checked
  PMLMIG_ASSIGN_OR_RETURN(const uint64_t n, PreadAll(fd, bytes.data(), bytes.size(), h.layout_offset, path));
  if (n < bytes.size()) return Corrupt(path, "truncated inside the layout");
  if (const uint64_t sum = XXH3_64bits_dispatch(bytes.data(), bytes.size()); sum != h.layout_checksum) {
    return Corrupt(path, Cat("layout checksum mismatch: ", FieldName(&Header::layout_checksum), " is ",
                             FormatHex(h.layout_checksum), ", the layout at byte 4096 hashes to ", FormatHex(sum)));
  }
  std::vector<SnapshotRegion> regions = DecodeLayout(bytes);
  if (std::string why = RegionsProblem(regions); !why.empty()) return Corrupt(path, "layout (offset 4096): " + why);
  const uint64_t data_end = h.data_offset + h.data_bytes;
  uint64_t free_from = h.data_offset, guest = 0;
  for (size_t i = 0; i < regions.size(); ++i) {
    const SnapshotRegion& r = regions[i];
    if (r.file_offset % kSnapshotRegionAlign != 0 || r.file_offset < free_from || r.file_offset > data_end ||
        r.size > data_end - r.file_offset) {
      return Corrupt(path, Cat("layout entry ", i, " (offset ", kLayoutOffset + i * kRegionEntryBytes, "), ",
                               DescribeRegion(r), ": file offset ", r.file_offset,
                               " is not 2 MiB aligned after the previous region inside the data section (bytes ",
                               h.data_offset, "-", data_end, ")"));
    }
    free_from = r.file_offset + r.size;
    guest += r.size;
  }
  if (guest != h.guest_bytes) {
    return Corrupt(path, Cat(FieldName(&Header::guest_bytes), " is ", h.guest_bytes, " but the regions hold ", guest));
  }
  return regions;
}

struct Meta {
  std::string description;
  std::vector<uint8_t> state;
  std::vector<uint64_t> digests;
};

// `h` passed CheckSections, and its chunk count matched the layout.
Result<Meta> ReadMeta(int fd, const std::string& path, const Header& h) {
  std::vector<uint8_t> bytes(h.meta_bytes);
  PMLMIG_ASSIGN_OR_RETURN(const uint64_t n, PreadAll(fd, bytes.data(), bytes.size(), h.meta_offset, path));
  if (n < bytes.size()) return Corrupt(path, "truncated inside the meta section");
  if (const uint64_t sum = XXH3_64bits_dispatch(bytes.data(), bytes.size()); sum != h.meta_checksum) {
    return Corrupt(path, Cat("meta checksum mismatch: ", FieldName(&Header::meta_checksum), " is ",
                             FormatHex(h.meta_checksum), ", the meta section at byte ", h.meta_offset, " hashes to ",
                             FormatHex(sum)));
  }
  Meta m;
  const uint8_t* p = bytes.data();
  m.description.assign(reinterpret_cast<const char*>(p), h.description_bytes);
  p += h.description_bytes;
  m.state.assign(p, p + h.state_bytes);
  p += h.state_bytes;
  m.digests.resize(h.chunk_count);
  for (uint64_t i = 0; i < h.chunk_count; ++i) m.digests[i] = GetLe(p + i * 8, 8);
  return m;
}

// A run of guest memory that LoadInto/VerifyFile handle as one unit: inside
// one chunk, and all data (read) or all hole (zero, never touched).
struct Piece {
  uint64_t gpa, file_offset, pages;
  size_t chunk;
  bool data;
};

// The next data extent in [from, limit) as page-aligned [begin, end), or
// {limit, limit} when there is none.
Result<std::pair<uint64_t, uint64_t>> NextData(int fd, const std::string& path, uint64_t from, uint64_t limit) {
  const off_t d = ::lseek(fd, static_cast<off_t>(from), SEEK_DATA);
  if (d < 0 && errno == ENXIO) return std::pair{limit, limit};  // only holes after `from`
  if (d < 0) return Status::FromErrno(errno, Cat("lseek SEEK_DATA (", path, ", offset ", from, ")"));
  if (static_cast<uint64_t>(d) >= limit) return std::pair{limit, limit};
  const off_t h = ::lseek(fd, d, SEEK_HOLE);
  if (h < 0) return Status::FromErrno(errno, Cat("lseek SEEK_HOLE (", path, ", offset ", uint64_t(d), ")"));
  const uint64_t begin = static_cast<uint64_t>(d) & ~(kPageSize - 1);  // >= from: from is page aligned
  return std::pair{begin, std::min(limit, AlignUp(static_cast<uint64_t>(h), kPageSize))};
}

Result<std::vector<Piece>> PlanPieces(int fd, const std::string& path, std::span<const SnapshotRegion> regions,
                                      const ChunkLayout& layout, uint64_t* extents) {
  std::vector<Piece> out;
  // Region-relative byte offsets [from, to), cut at chunk boundaries.
  auto add = [&](size_t i, uint64_t from, uint64_t to, bool data) {
    const SnapshotRegion& r = regions[i];
    while (from < to) {
      const uint64_t n = std::min({to - from, layout.chunk_bytes() - from % layout.chunk_bytes(), kPieceBytes});
      out.push_back({r.gpa + from, r.file_offset + from, n >> kPageShift, layout.ChunkOf(i, from >> kPageShift), data});
      from += n;
    }
  };
  for (size_t i = 0; i < regions.size(); ++i) {
    const SnapshotRegion& r = regions[i];
    uint64_t at = 0;
    while (at < r.size) {
      PMLMIG_ASSIGN_OR_RETURN(const auto extent, NextData(fd, path, r.file_offset + at, r.file_offset + r.size));
      add(i, at, extent.first - r.file_offset, false);
      add(i, extent.first - r.file_offset, extent.second - r.file_offset, true);
      if (extent.second > extent.first) ++*extents;
      at = extent.second - r.file_offset;
    }
  }
  return out;
}

}  // namespace

Result<SnapshotReader> SnapshotReader::Open(const std::string& path) {
  SnapshotReader r;
  r.path_ = path;
  // Never opened unless it is a regular file (opening a FIFO blocks, a
  // device may act on it); O_NONBLOCK covers a name replaced in between.
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    return InvalidArgument(Where(path) + ": not a regular file");
  }
  r.fd_.Reset(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!r.fd_.valid()) return Status::FromErrno(errno, "open snapshot " + path);
  if (::fstat(r.fd_.get(), &st) < 0) return Status::FromErrno(errno, "fstat " + path);
  if (!S_ISREG(st.st_mode)) return InvalidArgument(Where(path) + ": not a regular file");
  r.direct_.Reset(::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC));  // -1: buffered reads only
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);

  PMLMIG_ASSIGN_OR_RETURN(const Header h, ReadHeader(r.fd_.get(), path, file_size));
  PMLMIG_RETURN_IF_ERROR(CheckSections(h, path, file_size));
  PMLMIG_ASSIGN_OR_RETURN(r.regions_, ReadLayout(r.fd_.get(), path, h));
  {
    PMLMIG_ASSIGN_OR_RETURN(const AddressOnlySlots slots, BuildSlots(r.regions_));
    r.layout_ = ChunkLayout(slots.table);  // keeps no host address
  }
  if (h.chunk_bytes != r.layout_.chunk_bytes() || h.chunk_count != r.layout_.size()) {
    return Corrupt(path, Cat(FieldName(&Header::chunk_bytes), " and ", FieldName(&Header::chunk_count), " are ",
                             h.chunk_bytes, " and ", h.chunk_count, ", the regions make ", r.layout_.size(),
                             " chunks of ", r.layout_.chunk_bytes()));
  }
  PMLMIG_ASSIGN_OR_RETURN(Meta meta, ReadMeta(r.fd_.get(), path, h));
  r.description_ = std::move(meta.description), r.state_ = std::move(meta.state);
  r.digests_ = std::move(meta.digests);
  r.file_end_ = h.meta_offset + h.meta_bytes, r.guest_bytes_ = h.guest_bytes, r.created_ns_ = h.created_ns;
  r.minor_ = static_cast<uint16_t>(h.minor), r.vcpus_ = static_cast<uint32_t>(h.vcpus);
  return r;
}

std::optional<uint64_t> SnapshotReader::FileOffset(uint64_t gpa) const { return OffsetOf(regions_, gpa); }

int SnapshotReader::FdFor(const uint8_t* dst) const {
  return direct_.valid() && reinterpret_cast<uintptr_t>(dst) % kPageSize == 0 ? direct_.get() : fd_.get();
}

Status SnapshotReader::ReadPages(uint64_t gpa, uint64_t pages, uint8_t* dst) const {
  PMLMIG_ASSIGN_OR_RETURN(const SnapshotRegion* r, FindRun(path_, regions_, gpa, pages));
  return ReadRun(FdFor(dst), path_, gpa, r->file_offset + (gpa - r->gpa), pages << kPageShift, dst);
}

Result<SnapshotLoadStats> SnapshotReader::LoadInto(const SlotTable& memory, unsigned threads) const {
  const auto slots = memory.slots();
  if (slots.size() != regions_.size()) {
    return InvalidArgument(Cat(Where(path_), ": the memory has ", slots.size(), " slots, the snapshot ",
                               regions_.size(), " regions"));
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    const SnapshotRegion& r = regions_[i];
    if (slots[i].slot != r.slot || slots[i].gpa != r.gpa || slots[i].size != r.size) {
      return InvalidArgument(Where(path_) + ": memory " + DescribeSlot(slots[i]) + " is not the snapshot's " +
                             DescribeRegion(r));
    }
  }
  return Scan(&memory, threads);
}

Status SnapshotReader::VerifyFile(unsigned threads) const { return Scan(nullptr, threads).status(); }

Result<SnapshotLoadStats> SnapshotReader::Scan(const SlotTable* memory, unsigned threads) const {
  const Clock::TimePoint start = Clock::Steady().Now();
  struct stat st {};
  if (::fstat(fd_.get(), &st) < 0) return Status::FromErrno(errno, "fstat " + path_);
  if (static_cast<uint64_t>(st.st_size) < file_end_) {
    return Corrupt(path_, Cat("truncated after it was opened: the meta section ends at byte ", file_end_,
                              " but the file has ", uint64_t(st.st_size), " bytes"));
  }
  SnapshotLoadStats stats;
  PMLMIG_ASSIGN_OR_RETURN(const std::vector<Piece> pieces,
                          PlanPieces(fd_.get(), path_, regions_, layout_, &stats.data_extents));
  const unsigned workers = static_cast<unsigned>(std::clamp<size_t>(threads, 1, std::max<size_t>(pieces.size(), 1)));
  std::vector<std::vector<uint8_t>> scratch(memory == nullptr ? workers : 0, std::vector<uint8_t>(kPieceBytes));
  std::unique_ptr<std::atomic<uint64_t>[]> sums(new std::atomic<uint64_t>[layout_.size()]());
  std::atomic<uint64_t> read{0}, holes{0};  // relaxed, as the sums: read after the joins
  Status scanned = RunParallel(pieces.size(), workers, [&](size_t i, unsigned worker) -> Status {
    const Piece& p = pieces[i];
    const uint64_t len = p.pages << kPageShift;
    uint64_t sum = 0;
    if (!p.data) {  // never touched: a fresh target's memory is already zero
      holes.fetch_add(len, std::memory_order_relaxed);  // zero pages count 0 (ZeroPages::kNull)
    } else {
      uint8_t* dst = memory != nullptr ? memory->HostAddress(p.gpa, len) : scratch[worker].data();
      PMLMIG_RETURN_IF_ERROR(ReadRun(FdFor(dst), path_, p.gpa, p.file_offset, len, dst));
      for (uint64_t k = 0; k < p.pages; ++k) {
        sum += PageValueOf(p.gpa + (k << kPageShift), dst + (k << kPageShift), ZeroPages::kNull);
      }
      read.fetch_add(len, std::memory_order_relaxed);
    }
    sums[p.chunk].fetch_add(sum, std::memory_order_relaxed);
    return Status::Ok();
  });
  if (!scanned.ok()) return scanned;
  std::vector<uint64_t> mine(layout_.size());
  for (size_t i = 0; i < mine.size(); ++i) mine[i] = sums[i].load(std::memory_order_relaxed);
  const DigestMismatch m = CompareChunkDigests(layout_, mine, digests_);
  if (!m.empty()) return Corrupt(path_, "guest memory read from it does not match its digests: " + m.Describe());
  stats.bytes_read = read.load(std::memory_order_relaxed);
  stats.hole_bytes = holes.load(std::memory_order_relaxed);
  stats.ms = MsSince(Clock::Steady(), start);
  return stats;
}

}  // namespace pmlmig::engine
