// UserspaceWriteTracker: see the header for the modes, the ordering rule and
// the soft-dirty race. This file owns every kernel interaction: userfaultfd
// registration and write protection, PAGEMAP_SCAN, pagemap reads and
// clear_refs writes. It must never read guest page contents (the caller
// copies pages after Collect) and never allocate in the per-page loops.
#include "pmlmig/base/units.h"
#include "pmlmig/engine/userspace_tracker.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "pmlmig/base/linux_compat.h"
#include "pmlmig/base/mapping.h"

namespace pmlmig::engine {
namespace {

namespace lc = linux_compat;

// Features the uffd mode needs: the kernel resolves write faults itself
// (WP_ASYNC), protects never-touched pages too (WP_UNPOPULATED: without it
// a first write to an empty anonymous pte would go unseen), and supports
// write-protect markers on shmem (memfd guest RAM). On 6.7+ WP_ASYNC alone
// already admits shmem, but a kernel without WP_HUGETLBFS_SHMEM has no pte
// markers and so cannot track shmem at all: asking for it makes UFFDIO_API
// fail early and clearly on such a kernel.
constexpr uint64_t kUffdFeatures =
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
constexpr char kUffdFeatureNames[] = "WP_ASYNC | WP_UNPOPULATED | WP_HUGETLBFS_SHMEM";

static_assert(sizeof(page_region) == 3 * sizeof(uint64_t));
static_assert(lc::kPagemapEntryBytes == sizeof(uint64_t));

// clear_refs is process-wide: a second soft-dirty user in this process would
// clear the first one's bits. True while a tracker (or a probe) owns it.
// Acquire/release so that an owner's clear_refs writes happen after the
// previous owner's.
std::atomic<bool> g_soft_dirty_owned{false};

bool ClaimSoftDirty() {
  bool expected = false;
  return g_soft_dirty_owned.compare_exchange_strong(expected, true, std::memory_order_acquire,
                                                    std::memory_order_relaxed);
}
void ReleaseSoftDirty() { g_soft_dirty_owned.store(false, std::memory_order_release); }

uint64_t HostBase(const MemorySlot& s) { return reinterpret_cast<uintptr_t>(s.host); }

// "slot 0 (gpa 0x0, 64 MiB) host [0x7f0000000000, 0x7f0004000000)"
std::string DescribeHost(const MemorySlot& s, uint64_t from) {
  return DescribeSlot(s) + " host [" + FormatHex(from) + ", " + FormatHex(HostBase(s) + s.size) + ")";
}
std::string DescribeHost(const MemorySlot& s) { return DescribeHost(s, HostBase(s)); }

// errno as a Status whose code says "this kernel lacks the feature", so that
// kAuto can tell a missing feature from a real failure.
Status UnavailableErrno(int err, const std::string& what) {
  return Status(Code::kUnavailable, Status::FromErrno(err, what).message());
}


uint64_t NowNs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// A userfaultfd with the uffd-wp-async features enabled.
Result<UniqueFd> OpenUffd() {
  // UFFD_USER_MODE_ONLY keeps this working where vm.unprivileged_userfaultfd
  // is 0; it only affects missing/minor faults, which we never register, and
  // async write faults are resolved in the kernel whatever their origin.
  UniqueFd uffd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)));
  if (!uffd.valid() && errno == EINVAL) {  // before 5.11: flag unknown
    uffd.Reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  }
  if (!uffd.valid()) {
    return UnavailableErrno(errno, "userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)");
  }
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = kUffdFeatures;
  if (IoctlNoEintr(uffd.get(), UFFDIO_API, &api) < 0) {
    // A kernel that does not know a requested feature answers EINVAL.
    return UnavailableErrno(errno, std::string("UFFDIO_API (features ") + kUffdFeatureNames +
                                       "; asynchronous write protection needs Linux 6.7+)");
  }
  if ((api.features & kUffdFeatures) != kUffdFeatures) {
    return Unavailable(std::string("UFFDIO_API: kernel offers features ") + FormatHex(api.features) +
                       ", lacking some of " + kUffdFeatureNames);
  }
  return uffd;
}

Status RegisterWp(int uffd, uint64_t start, uint64_t len, const std::string& what) {
  uffdio_register reg{};
  reg.range.start = start;
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (IoctlNoEintr(uffd, UFFDIO_REGISTER, &reg) < 0) {
    const int err = errno;
    const std::string msg = "UFFDIO_REGISTER (mode WP) " + what;
    // EINVAL: a mapping type the kernel cannot write-protect. EBUSY:
    // another userfaultfd (another tracker) owns the range.
    if (err == EINVAL || err == EPERM) return UnavailableErrno(err, msg);
    return Status::FromErrno(err, msg);
  }
  if ((reg.ioctls & (1ull << _UFFDIO_WRITEPROTECT)) == 0) {
    return Unavailable("UFFDIO_REGISTER (mode WP) " + what + ": UFFDIO_WRITEPROTECT not offered");
  }
  return Status::Ok();
}

Status WriteProtect(int uffd, uint64_t start, uint64_t len, const std::string& what) {
  uffdio_writeprotect wp{};
  wp.range.start = start;
  wp.range.len = len;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  if (IoctlNoEintr(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
    return Status::FromErrno(errno, "UFFDIO_WRITEPROTECT " + what);
  }
  return Status::Ok();
}

// One PAGEMAP_SCAN that reports written pages of [start, end) and re-protects
// exactly those it reports. Returns the region count; `walk_end` says where
// the kernel stopped (end, or earlier when `vec` filled up).
int ScanWritten(int pagemap, uint64_t start, uint64_t end, page_region* vec, size_t vec_len,
                uint64_t* walk_end) {
  pm_scan_arg arg{};
  arg.size = sizeof arg;
  arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
  arg.start = start;
  arg.end = end;
  arg.vec = reinterpret_cast<uintptr_t>(vec);
  arg.vec_len = vec_len;
  arg.category_mask = PAGE_IS_WRITTEN;
  arg.return_mask = PAGE_IS_WRITTEN;
  // EINTR comes only from a fatal signal (the walk takes mmap_lock
  // killably): not retried, the process is going away.
  const int n = ::ioctl(pagemap, PAGEMAP_SCAN, &arg);
  *walk_end = arg.walk_end;
  return n;
}

Status ScanError(int err, const std::string& what) {
  // ENOTTY/EINVAL: no PAGEMAP_SCAN (before 6.7). EPERM: PM_SCAN_CHECK_WPASYNC
  // found a part of the range not registered for async write protection.
  if (err == ENOTTY || err == EINVAL || err == EPERM || err == EOPNOTSUPP) {
    return UnavailableErrno(err, "PAGEMAP_SCAN " + what);
  }
  return Status::FromErrno(err, "PAGEMAP_SCAN " + what);
}

Status PreadFull(int fd, void* buf, size_t len, uint64_t offset, const std::string& what) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    const ssize_t r = ::pread(fd, p, len, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Status::FromErrno(errno, "pread " + what);
    if (r == 0) return Internal("pread " + what + ": unexpected end of file");
    p += r;
    len -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return Status::Ok();
}

Status ClearSoftDirty(int clear_refs) {
  const size_t len = sizeof(lc::kClearRefsSoftDirty) - 1;
  ssize_t r;
  do {
    r = ::write(clear_refs, lc::kClearRefsSoftDirty, len);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return Status::FromErrno(errno, "write \"4\" to /proc/self/clear_refs");
  if (static_cast<size_t>(r) != len) return Internal("write \"4\" to /proc/self/clear_refs: short write");
  return Status::Ok();
}

Result<UniqueFd> OpenProc(const char* path, int flags) {
  UniqueFd fd(::open(path, flags | O_CLOEXEC));
  if (!fd.valid()) return UnavailableErrno(errno, std::string("open ") + path);
  return fd;
}

Result<uint64_t> ReadPagemapEntry(int pagemap, const void* addr) {
  uint64_t entry = 0;
  const uint64_t vpn = reinterpret_cast<uintptr_t>(addr) >> kPageShift;
  PMLMIG_RETURN_IF_ERROR(PreadFull(pagemap, &entry, sizeof entry, vpn * lc::kPagemapEntryBytes,
                                   "/proc/self/pagemap at " + FormatHex(reinterpret_cast<uintptr_t>(addr))));
  return entry;
}

bool SoftDirtyBit(uint64_t entry) { return (entry >> lc::kPagemapSoftDirtyBit) & 1; }

// The caller owns the soft-dirty claim. Clears, checks a touched page reads
// clean, writes it, checks it reads dirty.
Status ProbeSoftDirtyClaimed() {
  PMLMIG_ASSIGN_OR_RETURN(Mapping m, Mapping::Map(kPageSize, PROT_READ | PROT_WRITE,
                                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "soft-dirty probe"));
  volatile uint8_t* page = m.data();
  page[0] = 1;
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd clear_refs, OpenProc("/proc/self/clear_refs", O_WRONLY));
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd pagemap, OpenProc("/proc/self/pagemap", O_RDONLY));
  PMLMIG_RETURN_IF_ERROR(ClearSoftDirty(clear_refs.get()));
  PMLMIG_ASSIGN_OR_RETURN(uint64_t before, ReadPagemapEntry(pagemap.get(), m.data()));
  page[0] = 2;
  PMLMIG_ASSIGN_OR_RETURN(uint64_t after, ReadPagemapEntry(pagemap.get(), m.data()));
  if (SoftDirtyBit(before) || !SoftDirtyBit(after)) {
    return Unavailable("soft-dirty: pagemap bit 55 reads " + std::to_string(SoftDirtyBit(before)) +
                       " after clear_refs and " + std::to_string(SoftDirtyBit(after)) +
                       " after a write (expected 0 then 1); the kernel is built without "
                       "CONFIG_MEM_SOFT_DIRTY");
  }
  return Status::Ok();
}

// Scratch memory of one kind guest RAM uses, for the uffd probe.
Result<Mapping> ProbeMapping(bool shared_memfd, size_t size) {
  if (!shared_memfd) {
    return Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "uffd probe (anonymous)");
  }
  UniqueFd memfd(::memfd_create("pmlmig-uffd-probe", MFD_CLOEXEC));
  if (!memfd.valid()) return Status::FromErrno(errno, "memfd_create (uffd probe)");
  if (::ftruncate(memfd.get(), static_cast<off_t>(size)) < 0) {
    return Status::FromErrno(errno, "ftruncate memfd (uffd probe)");
  }
  return Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd.get(), 0, "uffd probe (memfd)");
}

// Probes one mapping kind: register, protect, write page 1, expect exactly
// page 1 reported, then nothing on a second scan.
Status ProbeUffdOn(bool shared_memfd) {
  const char* kind = shared_memfd ? "memfd MAP_SHARED" : "anonymous";
  constexpr size_t kPages = 4;
  PMLMIG_ASSIGN_OR_RETURN(Mapping m, ProbeMapping(shared_memfd, kPages * kPageSize));
  m.data()[0] = 1;  // one populated page, the rest empty
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd uffd, OpenUffd());
  const uint64_t start = reinterpret_cast<uintptr_t>(m.data());
  const uint64_t end = start + m.size();
  const std::string what = std::string(kind) + " probe [" + FormatHex(start) + ", " + FormatHex(end) + ")";
  PMLMIG_RETURN_IF_ERROR(RegisterWp(uffd.get(), start, m.size(), what));
  PMLMIG_RETURN_IF_ERROR(WriteProtect(uffd.get(), start, m.size(), what));
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd pagemap, OpenProc("/proc/self/pagemap", O_RDONLY));

  m.data()[kPageSize + 5] = 7;
  page_region regions[kPages] = {};
  uint64_t walk_end = 0;
  int n = ScanWritten(pagemap.get(), start, end, regions, kPages, &walk_end);
  if (n < 0) return ScanError(errno, what);
  if (n != 1 || regions[0].start != start + kPageSize || regions[0].end != start + 2 * kPageSize ||
      walk_end != end) {
    return Unavailable("PAGEMAP_SCAN " + what + ": a write to page 1 was reported as " +
                       std::to_string(n) + " region(s); async uffd-wp does not work on " + kind + " memory");
  }
  n = ScanWritten(pagemap.get(), start, end, regions, kPages, &walk_end);
  if (n != 0) {
    return Unavailable("PAGEMAP_SCAN " + what + ": reported pages were not re-protected");
  }
  return Status::Ok();
}

}  // namespace

std::string_view UserspaceWriteTracker::ModeName(Mode mode) {
  switch (mode) {
    case Mode::kAuto: return "auto";
    case Mode::kUffdWpAsync: return "uffd-wp";
    case Mode::kSoftDirty: return "soft-dirty";
    case Mode::kExplicitOnly: return "explicit";
  }
  return "unknown";
}

Status UserspaceWriteTracker::ProbeUffdWpAsync() {
  PMLMIG_RETURN_IF_ERROR(ProbeUffdOn(/*shared_memfd=*/false));
  return ProbeUffdOn(/*shared_memfd=*/true);
}

Status UserspaceWriteTracker::ProbeSoftDirty() {
  if (!ClaimSoftDirty()) {
    return Unavailable("soft-dirty probe: a soft-dirty tracker is enabled in this process, and "
                       "clear_refs would wipe its bits");
  }
  Status s = ProbeSoftDirtyClaimed();
  ReleaseSoftDirty();
  return s;
}

UserspaceWriteTracker::UserspaceWriteTracker(SlotTable slots, Options options)
    : slots_(std::move(slots)),
      options_(options),
      pending_(slots_),
      mode_(options.mode) {}

UserspaceWriteTracker::~UserspaceWriteTracker() {
  if (enabled_) static_cast<void>(Disable());
}

std::string_view UserspaceWriteTracker::name() const {
  switch (mode()) {
    case Mode::kAuto: return "userspace/auto";
    case Mode::kUffdWpAsync: return "userspace/uffd-wp";
    case Mode::kSoftDirty: return "userspace/soft-dirty";
    case Mode::kExplicitOnly: return "userspace/explicit";
  }
  return "userspace";
}

Status UserspaceWriteTracker::Enable() {
  if (enabled_) return InvalidArgument("userspace write tracker: Enable while already enabled");
  if (options_.scan_regions == 0 || options_.pagemap_batch == 0) {
    return InvalidArgument("userspace write tracker: scan_regions and pagemap_batch must be > 0");
  }
  Status s;
  if (options_.mode != Mode::kExplicitOnly) s = CheckMapped();
  if (!s.ok()) return s;
  switch (options_.mode) {
    case Mode::kUffdWpAsync:
      s = EnableUffd();
      break;
    case Mode::kSoftDirty:
      s = EnableSoftDirty();
      break;
    case Mode::kExplicitOnly:
      break;
    case Mode::kAuto: {
      s = EnableUffd();
      // Fall back only when the kernel lacks the feature; a real failure
      // (a range another uffd owns) would fail the fallback too, or worse,
      // not: report it.
      if (s.code() != Code::kUnavailable) break;
      ReleaseKernelState();
      Status sd = EnableSoftDirty();
      if (sd.ok() || sd.code() != Code::kUnavailable) {
        s = sd;
        break;
      }
      s = Unavailable("no kernel write tracking for these slots; uffd-wp: " + s.message() +
                      "; soft-dirty: " + sd.message());
      break;
    }
  }
  if (!s.ok()) {
    ReleaseKernelState();
    return s;
  }
  enabled_ = true;
  return Status::Ok();
}

Status UserspaceWriteTracker::CheckMapped() const {
  // Neither mechanism notices a hole: UFFDIO_REGISTER and PAGEMAP_SCAN skip
  // it and pagemap reads zeros for it, so memory mapped there later would be
  // silently untracked. MS_ASYNC writes nothing back; msync fails with
  // ENOMEM when part of the range is unmapped.
  for (const MemorySlot& s : slots_.slots()) {
    if (::msync(s.host, s.size, MS_ASYNC) < 0) {
      return InvalidArgument(Status::FromErrno(errno, "msync(MS_ASYNC) " + DescribeHost(s)).message() +
                             " (slot memory not fully mapped)");
    }
  }
  return Status::Ok();
}

Status UserspaceWriteTracker::EnableUffd() {
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd uffd, OpenUffd());
  const auto slots = slots_.slots();
  for (const MemorySlot& s : slots) {
    PMLMIG_RETURN_IF_ERROR(RegisterWp(uffd.get(), HostBase(s), s.size, DescribeHost(s)));
  }
  for (const MemorySlot& s : slots) {
    PMLMIG_RETURN_IF_ERROR(WriteProtect(uffd.get(), HostBase(s), s.size, DescribeHost(s)));
  }
  PMLMIG_ASSIGN_OR_RETURN(pagemap_, OpenProc("/proc/self/pagemap", O_RDONLY));
  uffd_ = std::move(uffd);
  scan_buffer_.assign(options_.scan_regions * sizeof(page_region), std::byte{0});
  mode_.store(Mode::kUffdWpAsync, std::memory_order_release);

  // A first scan proves that PAGEMAP_SCAN with PM_SCAN_CHECK_WPASYNC works on
  // these mappings. Anything it finds was written after the protection
  // above, so it belongs to the first collection: it goes to pending_.
  // If it fails, Enable fails and nothing was promised yet: no conservative
  // marking.
  for (size_t i = 0; i < slots.size(); ++i) {
    uint64_t pages = 0;
    PMLMIG_RETURN_IF_ERROR(ScanSlotUffd(i, &pages, /*mark_on_failure=*/false));
    kernel_pages_.fetch_add(pages, std::memory_order_relaxed);
  }
  return Status::Ok();
}

Status UserspaceWriteTracker::EnableSoftDirty() {
  if (!ClaimSoftDirty()) {
    return InvalidArgument("soft-dirty: another soft-dirty tracker is enabled in this process "
                           "(clear_refs is process-wide; each would clear the other's bits)");
  }
  owns_soft_dirty_ = true;
  PMLMIG_RETURN_IF_ERROR(ProbeSoftDirtyClaimed());
  PMLMIG_ASSIGN_OR_RETURN(pagemap_, OpenProc("/proc/self/pagemap", O_RDONLY));
  PMLMIG_ASSIGN_OR_RETURN(clear_refs_, OpenProc("/proc/self/clear_refs", O_WRONLY));
  scan_buffer_.assign(options_.pagemap_batch * lc::kPagemapEntryBytes, std::byte{0});
  PMLMIG_RETURN_IF_ERROR(ClearSoftDirty(clear_refs_.get()));
  mode_.store(Mode::kSoftDirty, std::memory_order_release);
  return Status::Ok();
}

void UserspaceWriteTracker::ReleaseKernelState() {
  uffd_.Reset();  // closing unregisters whatever is still registered
  pagemap_.Reset();
  clear_refs_.Reset();
  scan_buffer_.clear();
  scan_buffer_.shrink_to_fit();
  if (owns_soft_dirty_) {
    owns_soft_dirty_ = false;
    ReleaseSoftDirty();
  }
  mode_.store(options_.mode, std::memory_order_release);
}

Status UserspaceWriteTracker::Disable() {
  if (!enabled_) return Status::Ok();
  Status first;
  if (uffd_.valid()) {
    for (const MemorySlot& s : slots_.slots()) {
      uffdio_range range{};
      range.start = HostBase(s);
      range.len = s.size;
      if (IoctlNoEintr(uffd_.get(), UFFDIO_UNREGISTER, &range) < 0 && first.ok()) {
        first = Status::FromErrno(errno, "UFFDIO_UNREGISTER " + DescribeHost(s));
      }
    }
  }
  ReleaseKernelState();
  enabled_ = false;
  return first;
}

void UserspaceWriteTracker::MarkPending(size_t index, uint64_t first, uint64_t count) {
  // One atomic OR per 64-page word, whatever the run length.
  while (count > 0) {
    const uint64_t bit = first & 63;
    const uint64_t n = std::min<uint64_t>(count, 64 - bit);
    const uint64_t mask = n == 64 ? ~0ull : ((1ull << n) - 1) << bit;
    pending_.OrWord(index, first >> 6, mask);
    first += n;
    count -= n;
  }
}

void UserspaceWriteTracker::MarkRestConservatively(size_t index, uint64_t first) {
  const auto slots = slots_.slots();
  for (size_t i = index; i < slots.size(); ++i) {
    const uint64_t from = i == index ? first : 0;
    if (from < slots[i].pages()) MarkPending(i, from, slots[i].pages() - from);
  }
  counters_.overflows.fetch_add(1, std::memory_order_relaxed);
}

Status UserspaceWriteTracker::ScanSlotUffd(size_t index, uint64_t* pages, bool mark_on_failure) {
  const MemorySlot& s = slots_.slots()[index];
  const uint64_t base = HostBase(s);
  const uint64_t end = base + s.size;
  auto* regions = reinterpret_cast<page_region*>(scan_buffer_.data());
  uint64_t from = base;
  while (from < end) {
    uint64_t walk_end = 0;
    const int n = ScanWritten(pagemap_.get(), from, end, regions, options_.scan_regions, &walk_end);
    scan_calls_.fetch_add(1, std::memory_order_relaxed);
    if (n < 0) {
      // The kernel may have re-protected pages it never got to report.
      const int err = errno;
      if (mark_on_failure) MarkRestConservatively(index, (from - base) >> kPageShift);
      return ScanError(err, DescribeHost(s, from));
    }
    for (int r = 0; r < n; ++r) {
      // The kernel reports inside [from, end); clamping keeps a bad answer
      // from marking outside the slot.
      const uint64_t rs = std::clamp<uint64_t>(regions[r].start, base, end);
      const uint64_t re = std::clamp<uint64_t>(regions[r].end, rs, end);
      const uint64_t count = (re - rs) >> kPageShift;
      MarkPending(index, (rs - base) >> kPageShift, count);
      *pages += count;
    }
    counters_.entries_harvested.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
    if (walk_end >= end) break;
    if (walk_end <= from) {
      if (mark_on_failure) MarkRestConservatively(index, (from - base) >> kPageShift);
      return Internal("PAGEMAP_SCAN " + DescribeHost(s, from) + ": no progress (walk_end " + FormatHex(walk_end) + ")");
    }
    // The region array filled up: the kernel stopped at walk_end, having
    // re-protected exactly what it reported; continue from there.
    partial_scans_.fetch_add(1, std::memory_order_relaxed);
    from = walk_end;
  }
  return Status::Ok();
}

Status UserspaceWriteTracker::CollectUffd(uint64_t* pages) {
  for (size_t i = 0; i < slots_.slots().size(); ++i) {
    PMLMIG_RETURN_IF_ERROR(ScanSlotUffd(i, pages, /*mark_on_failure=*/true));
  }
  return Status::Ok();
}

Status UserspaceWriteTracker::CollectSoftDirty(uint64_t* pages) {
  // Read every slot (R), then clear once (C); the header explains the window
  // between the two and what it costs.
  auto* entries = reinterpret_cast<uint64_t*>(scan_buffer_.data());
  const auto slots = slots_.slots();
  for (size_t i = 0; i < slots.size(); ++i) {
    const MemorySlot& s = slots[i];
    const uint64_t first_vpn = HostBase(s) >> kPageShift;
    const uint64_t slot_pages = s.pages();
    for (uint64_t page = 0; page < slot_pages; page += options_.pagemap_batch) {
      const uint64_t n = std::min<uint64_t>(options_.pagemap_batch, slot_pages - page);
      Status st = PreadFull(pagemap_.get(), entries, n * lc::kPagemapEntryBytes,
                            (first_vpn + page) * lc::kPagemapEntryBytes, "/proc/self/pagemap for " + DescribeHost(s));
      scan_calls_.fetch_add(1, std::memory_order_relaxed);
      if (!st.ok()) {
        // Nothing is cleared below, so the kernel keeps its bits; what this
        // collection could not read is reported dirty.
        MarkRestConservatively(i, page);
        return st;
      }
      uint64_t run = 0;  // length of the dirty run ending at entry j - 1
      for (uint64_t j = 0; j < n; ++j) {
        if (SoftDirtyBit(entries[j])) {
          ++run;
          continue;
        }
        if (run != 0) MarkPending(i, page + j - run, run);
        *pages += run;
        run = 0;
      }
      if (run != 0) MarkPending(i, page + n - run, run);
      *pages += run;
    }
  }
  counters_.entries_harvested.fetch_add(*pages, std::memory_order_relaxed);
  // If the clear fails the bits stay set: the next collection reports a
  // superset, which is safe.
  return ClearSoftDirty(clear_refs_.get());
}

Status UserspaceWriteTracker::Collect(DirtySet& out) {
  if (!enabled_) return InvalidArgument("userspace write tracker: Collect before Enable");
  if (!out.SameGeometry(pending_)) {
    return InvalidArgument("userspace write tracker: Collect into a DirtySet of other slots");
  }
  const uint64_t t0 = NowNs();
  uint64_t kernel_pages = 0;
  Status s;
  switch (mode()) {
    case Mode::kUffdWpAsync: s = CollectUffd(&kernel_pages); break;
    case Mode::kSoftDirty: s = CollectSoftDirty(&kernel_pages); break;
    case Mode::kExplicitOnly:
    case Mode::kAuto: break;
  }
  // Kernel reports were marked into pending_ too, so one take reports the
  // union, each page once. Taken even after a failure: `out` then holds the
  // conservative superset.
  const uint64_t taken = pending_.TakeInto(out);
  // Pairs with the release fence in MarkDirty: a writer's data stores before
  // its MarkDirty are visible to whoever copies the page after this returns.
  std::atomic_thread_fence(std::memory_order_acquire);

  const uint64_t ns = NowNs() - t0;
  counters_.RecordCollection(taken, ns);
  kernel_pages_.fetch_add(kernel_pages, std::memory_order_relaxed);
  return s;
}

Status UserspaceWriteTracker::MarkDirty(uint64_t gpa, uint64_t length) {
  if (length == 0) return Status::Ok();
  const uint64_t end = gpa + length;
  // Messages are built only on failure: the success path allocates nothing.
  auto range = [&] { return "MarkDirty [gpa " + FormatHex(gpa) + ", +" + FormatHex(length) + ")"; };
  if (end < gpa) return InvalidArgument(range() + ": range wraps around");
  // Check the whole range first so that a bad one marks nothing. Adjacent
  // slots may share a boundary, so a range may span several.
  for (uint64_t at = gpa; at < end;) {
    const MemorySlot* s = slots_.FindByGpa(at);
    if (s == nullptr) return InvalidArgument(range() + ": gpa " + FormatHex(at) + " lies outside every memory slot");
    at = std::min(end, s->gpa_end());
  }
  // Pairs with the acquire fence in Collect (the marks themselves may be
  // relaxed): the caller's writes to these pages happen before the copy.
  std::atomic_thread_fence(std::memory_order_release);
  const MemorySlot* first_slot = slots_.slots().data();
  for (uint64_t at = gpa; at < end;) {
    const MemorySlot* s = slots_.FindByGpa(at);
    const uint64_t stop = std::min(end, s->gpa_end());
    const uint64_t first = (at - s->gpa) >> kPageShift;
    const uint64_t last = (stop - 1 - s->gpa) >> kPageShift;
    MarkPending(static_cast<size_t>(s - first_slot), first, last - first + 1);
    at = stop;
  }
  return Status::Ok();
}

TrackerStats UserspaceWriteTracker::stats() const { return counters_.Snapshot(); }

UserspaceWriteTracker::ScanStats UserspaceWriteTracker::scan_stats() const {
  ScanStats s;
  s.scan_calls = scan_calls_.load(std::memory_order_relaxed);
  s.partial_scans = partial_scans_.load(std::memory_order_relaxed);
  s.kernel_pages = kernel_pages_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace pmlmig::engine
