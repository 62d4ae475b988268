// Post-copy memory (postcopy.h): the target's userfaultfd and the source's
// backlog. Every kernel interaction of post-copy is in this file.
#include "pmlmig/engine/postcopy.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>

#include "pmlmig/base/linux_compat.h"
#include "pmlmig/base/proc.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/memory_digest.h"

namespace pmlmig::engine {
namespace {

// Sets bits [first, first + count) of `words`, a word at a time (a 16 GiB
// run is 4 M pages: one atomic per page would be 40 ms); returns how many
// were clear before.
uint64_t SetBits(std::atomic<uint64_t>* words, uint64_t first, uint64_t count) {
  uint64_t newly = 0;
  while (count > 0) {
    const unsigned bit = static_cast<unsigned>(first & 63);
    const uint64_t n = std::min<uint64_t>(count, 64 - bit);
    const uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
    const uint64_t old = words[first >> 6].fetch_or(mask, std::memory_order_relaxed);
    newly += static_cast<uint64_t>(std::popcount(mask & ~old));
    first += n;
    count -= n;
  }
  return newly;
}

constexpr uint64_t kFeatures = UFFD_FEATURE_MISSING_SHMEM;

}  // namespace

// Faults come from the kernel, so no UFFD_USER_MODE_ONLY (root has
// CAP_SYS_PTRACE).
Result<UniqueFd> OpenMissingFaultUffd() {
  UniqueFd uffd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (!uffd.valid()) {
    const int err = errno;
    return Status(Code::kUnavailable,
                  std::string("userfaultfd: ") + std::strerror(err) +
                      (err == EPERM ? " (kernel faults need CAP_SYS_PTRACE where vm.unprivileged_userfaultfd is 0)"
                                    : ""));
  }
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = kFeatures;
  if (IoctlNoEintr(uffd.get(), UFFDIO_API, &api) < 0) {
    return Status(Code::kUnavailable, std::string("UFFDIO_API (UFFD_FEATURE_MISSING_SHMEM, Linux 4.11+): ") +
                                          std::strerror(errno));
  }
  return uffd;
}

// ------------------------------------------------------------- PageIndex

PageIndex::PageIndex(const SlotTable& memory) {
  for (const MemorySlot& s : memory.slots()) {
    slots_.push_back({s.gpa, total_, s.pages()});
    total_ += s.pages();
  }
}

std::optional<uint64_t> PageIndex::Of(uint64_t gpa) const {
  for (const Slot& s : slots_) {
    if (gpa >= s.gpa && gpa < s.gpa + (s.pages << kPageShift)) return s.first + ((gpa - s.gpa) >> kPageShift);
  }
  return std::nullopt;
}

uint64_t PageIndex::GpaOf(uint64_t index) const {
  for (const Slot& s : slots_) {
    if (index < s.first + s.pages) return s.gpa + ((index - s.first) << kPageShift);
  }
  return 0;
}

uint64_t PageIndex::SlotEnd(uint64_t index) const {
  for (const Slot& s : slots_) {
    if (index < s.first + s.pages) return s.first + s.pages;
  }
  return total_;
}

// ------------------------------------------------------------- target

Status PostcopyMemory::Available() {
  Result<UniqueFd> uffd = OpenMissingFaultUffd();
  return uffd.ok() ? Status::Ok() : uffd.status();
}

PostcopyMemory::PostcopyMemory(const SlotTable& memory, PageDigestTable* digests)
    : memory_(memory), index_(memory), digests_(digests) {}

namespace {

// The slot holding all of `r`, or why not.
Result<const MemorySlot*> SlotOfRun(const SlotTable& memory, const PageRun& r) {
  const MemorySlot* s = memory.FindByGpa(r.gpa);
  if (s == nullptr || r.pages == 0 || r.gpa + (r.pages << kPageShift) > s->gpa_end() ||
      (r.gpa & (kPageSize - 1)) != 0) {
    return InvalidArgument("post-copy: owed pages at gpa " + FormatHex(r.gpa) + " (+" + std::to_string(r.pages) +
                           ") lie outside guest memory");
  }
  return s;
}

// Makes `pages` pages from `gpa` (inside slot `s`, the i-th) holes: the page
// cache forgets the stale copy, and the mapping's page tables with it, so
// the next touch is a missing fault.
Status PunchPages(const SlotTable& memory, const std::vector<std::optional<MemoryFile>>& files, const MemorySlot& s,
                  uint64_t gpa, uint64_t pages) {
  const size_t i = static_cast<size_t>(&s - memory.slots().data());
  const uint64_t off = gpa - s.gpa, len = pages << kPageShift;
  if (i < files.size() && files[i]) {
    if (::fallocate(files[i]->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(files[i]->offset + off), static_cast<off_t>(len)) < 0) {
      return Status::FromErrno(errno, "post-copy: punching gpa " + FormatHex(gpa) + " out of guest memory");
    }
  } else if (::madvise(s.host + off, len, MADV_DONTNEED) < 0) {
    return Status::FromErrno(errno, "post-copy: dropping gpa " + FormatHex(gpa));
  }
  return Status::Ok();
}

// Punches the pages of `r` that `punched` does not hold (all without it),
// one call per stretch of them.
Status PunchRun(const SlotTable& memory, const std::vector<std::optional<MemoryFile>>& files, const MemorySlot& s,
                const PageIndex& index, const PageRun& r, const PageBits* punched) {
  if (punched == nullptr) return PunchPages(memory, files, s, r.gpa, r.pages);
  const uint64_t first = *index.Of(r.gpa);
  uint64_t p = first;
  const uint64_t end = first + r.pages;
  while (p < end) {
    if (punched->Test(p)) {
      ++p;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && !punched->Test(q)) ++q;
    PMLMIG_RETURN_IF_ERROR(PunchPages(memory, files, s, index.GpaOf(p), q - p));
    p = q;
  }
  return Status::Ok();
}

}  // namespace

Status PostcopyMemory::Punch(const SlotTable& memory, const std::vector<std::optional<MemoryFile>>& files,
                             std::span<const PageRun> runs, PageBits* punched) {
  for (const PageRun& r : runs) {
    PMLMIG_ASSIGN_OR_RETURN(const MemorySlot* s, SlotOfRun(memory, r));
    PMLMIG_RETURN_IF_ERROR(PunchRun(memory, files, *s, punched->index(), r, punched));
    const uint64_t first = *punched->index().Of(r.gpa);
    for (uint64_t p = first; p < first + r.pages; ++p) punched->Set(p);
  }
  return Status::Ok();
}

Result<std::unique_ptr<PostcopyMemory>> PostcopyMemory::Arm(const SlotTable& memory,
                                                            const std::vector<std::optional<MemoryFile>>& files,
                                                            std::span<const PageRun> needed, PageDigestTable* digests,
                                                            const PageBits* punched) {
  std::unique_ptr<PostcopyMemory> m(new PostcopyMemory(memory, digests));
  const uint64_t words = (m->index_.total() + 63) / 64;
  m->owed_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  for (uint64_t w = 0; w < words; ++w) m->owed_[w].store(0, std::memory_order_relaxed);
  const auto& slots = memory.slots();
  for (const PageRun& r : needed) {
    PMLMIG_ASSIGN_OR_RETURN(const MemorySlot* s, SlotOfRun(memory, r));
    PMLMIG_RETURN_IF_ERROR(PunchRun(memory, files, *s, m->index_, r, punched));
    m->needed_ += SetBits(m->owed_.get(), *m->index_.Of(r.gpa), r.pages);
  }
  if (punched != nullptr) {
    // A page made a hole before the switch and not owed now would read as
    // zero: refused.
    for (size_t w = 0; w < punched->words() && w < words; ++w) {
      if (const uint64_t lost = punched->word(w) & ~m->owed_[w].load(std::memory_order_relaxed); lost != 0) {
        const uint64_t gpa = m->index_.GpaOf(w * 64 + static_cast<uint64_t>(__builtin_ctzll(lost)));
        return InvalidArgument("post-copy: gpa " + FormatHex(gpa) +
                               " was prepared as owed (PostcopyPrepare) but the switch does not owe it");
      }
    }
  }
  m->remaining_.store(m->needed_, std::memory_order_release);
  m->counts_.needed_pages = m->needed_;
  PMLMIG_ASSIGN_OR_RETURN(m->uffd_, OpenMissingFaultUffd());
  for (const MemorySlot& s : slots) {
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uint64_t>(s.host);
    reg.range.len = s.size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (IoctlNoEintr(m->uffd_.get(), UFFDIO_REGISTER, &reg) < 0) {
      return Status::FromErrno(errno, "post-copy: UFFDIO_REGISTER (missing faults) of slot " + std::to_string(s.slot));
    }
  }
  m->stop_.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!m->stop_.valid()) return Status::FromErrno(errno, "post-copy: eventfd");
  return m;
}

PostcopyMemory::~PostcopyMemory() { Release(); }

void PostcopyMemory::Release() {
  if (faults_.joinable()) {
    const uint64_t one = 1;
    (void)!::write(stop_.get(), &one, sizeof one);
    faults_.join();
  }
  // Closed after the thread: a vCPU still waiting is woken, and its fault
  // is retried without userfaultfd.
  uffd_.Reset();
}

void PostcopyMemory::Start(Requester request) {
  request_ = std::move(request);
  started_ = std::chrono::steady_clock::now();
  {
    std::lock_guard lock(mu_);
    last_placed_ = started_;
  }
  faults_ = std::thread([this] { FaultLoop(); });
}

void PostcopyMemory::FaultLoop() {
  (void)SetThreadNice(-10);  // a vCPU waits on each fault: ahead of the guest's busy ones
  uffd_msg msgs[64];
  pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    const ssize_t n = ::read(uffd_.get(), msgs, sizeof msgs);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return;
    }
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) OnFault(msgs[i].arg.pagefault.address & ~(kPageSize - 1));
    }
  }
}

void PostcopyMemory::OnFault(uint64_t address) {
  // The slot and page of the address.
  const MemorySlot* slot = nullptr;
  for (const MemorySlot& s : memory_.slots()) {
    const uint64_t base = reinterpret_cast<uint64_t>(s.host);
    if (address >= base && address < base + s.size) slot = &s;
  }
  if (slot == nullptr) return;
  const uint64_t gpa = slot->gpa + (address - reinterpret_cast<uint64_t>(slot->host));
  const uint64_t index = *index_.Of(gpa);
  if (!Owed(index)) {
    // A hole the source does not owe (never written there), or a page
    // placed since the fault: zero-fill it, or, if it is there, just wake.
    uffdio_zeropage z{};
    z.range.start = address;
    z.range.len = kPageSize;
    if (IoctlNoEintr(uffd_.get(), UFFDIO_ZEROPAGE, &z) == 0) {
      std::lock_guard lock(mu_);
      ++counts_.zero_faults;
      return;
    }
    uffdio_range wake{address, kPageSize};
    (void)IoctlNoEintr(uffd_.get(), UFFDIO_WAKE, &wake);
    return;
  }
  {
    std::lock_guard lock(mu_);
    if (!waiting_.emplace(index, std::chrono::steady_clock::now()).second) return;  // asked already
    ++counts_.faults;
  }
  // Placed between the check and here: its UFFDIO_COPY woke the vCPU, and
  // the request's answer is dropped as a duplicate.
  if (request_) request_(gpa);
}

Result<uint64_t> PostcopyMemory::PlaceRun(uint64_t first, uint64_t pages, const uint8_t* data, bool* exists) {
  *exists = false;
  const uint64_t gpa = index_.GpaOf(first);
  uint8_t* host = memory_.HostAddress(gpa, pages << kPageShift);
  if (host == nullptr) return InvalidArgument("post-copy: gpa " + FormatHex(gpa) + " outside guest memory");
  int r;
  int64_t done;
  if (data != nullptr) {
    uffdio_copy c{};
    c.dst = reinterpret_cast<uint64_t>(host);
    c.src = reinterpret_cast<uint64_t>(data);
    c.len = pages << kPageShift;
    r = IoctlNoEintr(uffd_.get(), UFFDIO_COPY, &c);
    done = c.copy;
  } else {
    uffdio_zeropage z{};
    z.range.start = reinterpret_cast<uint64_t>(host);
    z.range.len = pages << kPageShift;
    r = IoctlNoEintr(uffd_.get(), UFFDIO_ZEROPAGE, &z);
    done = z.zeropage;
  }
  if (r == 0) return pages;
  const int err = errno;
  const uint64_t placed = done > 0 ? static_cast<uint64_t>(done) >> kPageShift : 0;
  if (err == EEXIST) {
    *exists = true;
    return placed;
  }
  if (err == EAGAIN) return placed;  // interrupted part-way: the caller goes on from there
  return Status::FromErrno(err, "post-copy: placing gpa " + FormatHex(gpa) + " (+" + std::to_string(pages) + ")");
}

void PostcopyMemory::Placed(uint64_t first, uint64_t pages, const uint8_t* data) {
  const auto now = std::chrono::steady_clock::now();
  uint64_t cleared = 0;
  for (uint64_t p = first; p < first + pages; ++p) {
    const uint64_t bit = uint64_t{1} << (p & 63);
    if (owed_[p >> 6].fetch_and(~bit, std::memory_order_acq_rel) & bit) ++cleared;
  }
  if (digests_ != nullptr) {
    const uint64_t gpa = index_.GpaOf(first);
    if (data != nullptr) {
      digests_->SetFrom(gpa, pages, data);
    } else {
      digests_->SetZero(gpa, pages);
    }
  }
  std::lock_guard lock(mu_);
  for (uint64_t p = first; p < first + pages; ++p) {
    auto it = waiting_.find(p);
    if (it == waiting_.end()) {
      ++counts_.background_pages;
      continue;
    }
    latencies_ms_.push_back(std::chrono::duration<double, std::milli>(now - it->second).count());
    ++counts_.requested_pages;
    waiting_.erase(it);
  }
  last_placed_ = now;
  if (remaining_.fetch_sub(cleared, std::memory_order_acq_rel) == cleared) cv_.notify_all();
}

Result<uint64_t> PostcopyMemory::Place(uint64_t gpa, uint64_t pages, const uint8_t* data) {
  const std::optional<uint64_t> start = index_.Of(gpa);
  if (!start || *start + pages > index_.SlotEnd(*start)) {
    return InvalidArgument("post-copy: gpa " + FormatHex(gpa) + " (+" + std::to_string(pages) +
                           ") lies outside one memory slot");
  }
  uint64_t placed = 0, dropped = 0;
  uint64_t p = *start;
  const uint64_t end = *start + pages;
  while (p < end) {
    if (!Owed(p)) {
      ++dropped;
      ++p;
      continue;
    }
    uint64_t q = p + 1;
    while (q < end && Owed(q)) ++q;
    bool exists = false;
    const uint8_t* src = data != nullptr ? data + ((p - *start) << kPageShift) : nullptr;
    PMLMIG_ASSIGN_OR_RETURN(uint64_t n, PlaceRun(p, q - p, src, &exists));
    if (n > 0) Placed(p, n, src);
    placed += n;
    p += n;
    if (exists) {  // another thread placed it a moment ago
      ++dropped;
      ++p;
    }
  }
  if (dropped > 0) {
    std::lock_guard lock(mu_);
    counts_.duplicate_pages += dropped;
  }
  return placed;
}

bool PostcopyMemory::WaitComplete(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return remaining() == 0; });
}

std::vector<PageRun> PostcopyMemory::Missing() const {
  // Runs inside one slot each, of at most 2^31 pages (a proto PageRun).
  std::vector<PageRun> runs;
  uint64_t run_end = 0;  // the index just past runs.back()
  for (uint64_t p = 0; p < index_.total(); ++p) {
    if (!Owed(p)) continue;
    if (!runs.empty() && run_end == p && index_.SlotEnd(p - 1) > p && runs.back().pages < (uint64_t{1} << 31)) {
      ++runs.back().pages;
    } else {
      runs.push_back({index_.GpaOf(p), 1});
    }
    run_end = p + 1;
  }
  return runs;
}

std::vector<uint64_t> PostcopyMemory::Waiting() const {
  std::vector<uint64_t> gpas;
  std::lock_guard lock(mu_);
  gpas.reserve(waiting_.size());
  for (const auto& [index, since] : waiting_) gpas.push_back(index_.GpaOf(index));
  std::sort(gpas.begin(), gpas.end());
  return gpas;
}

PostcopyStats PostcopyMemory::stats() const {
  std::lock_guard lock(mu_);
  PostcopyStats s = counts_;
  std::vector<double> l = latencies_ms_;
  if (!l.empty()) {
    std::sort(l.begin(), l.end());
    auto at = [&](double q) { return l[std::min(l.size() - 1, static_cast<size_t>(q * static_cast<double>(l.size())))]; };
    s.latency_p50_ms = at(0.50);
    s.latency_p99_ms = at(0.99);
    s.latency_max_ms = l.back();
  }
  if (started_ != std::chrono::steady_clock::time_point{}) {
    const auto end = remaining() == 0 ? last_placed_ : std::chrono::steady_clock::now();
    s.duration_ms = std::chrono::duration<double, std::milli>(end - started_).count();
  }
  return s;
}

// ------------------------------------------------------------- source

PostcopyBacklog::PostcopyBacklog(const SlotTable& memory, std::span<const PageRun> owed) : index_(memory) {
  words_ = (index_.total() + 63) / 64;
  bits_ = std::make_unique<std::atomic<uint64_t>[]>(words_);
  Reset(owed);
  total_ = left();
}

void PostcopyBacklog::SetLinkDown(bool down) {
  if (link_down_.exchange(down, std::memory_order_relaxed) && !down) {
    recoveries_.fetch_add(1, std::memory_order_relaxed);
  }
}

void PostcopyBacklog::Reset(std::span<const PageRun> owed) {
  for (uint64_t w = 0; w < words_; ++w) bits_[w].store(0, std::memory_order_relaxed);
  uint64_t n = 0;
  for (const PageRun& r : owed) {
    const std::optional<uint64_t> first = index_.Of(r.gpa);
    if (!first) continue;
    const uint64_t end = std::min(*first + r.pages, index_.SlotEnd(*first));
    n += SetBits(bits_.get(), *first, end - *first);
  }
  left_.store(n, std::memory_order_relaxed);
  hint_.store(0, std::memory_order_relaxed);
}

bool PostcopyBacklog::Claim(uint64_t gpa) {
  const std::optional<uint64_t> p = index_.Of(gpa);
  if (!p) return false;
  requests_.fetch_add(1, std::memory_order_relaxed);
  hint_.store(*p + 1 < index_.total() ? *p + 1 : 0, std::memory_order_relaxed);
  const uint64_t bit = uint64_t{1} << (*p & 63);
  if ((bits_[*p >> 6].fetch_and(~bit, std::memory_order_acq_rel) & bit) == 0) return false;
  left_.fetch_sub(1, std::memory_order_relaxed);
  return true;
}

bool PostcopyBacklog::Next(uint64_t max_pages, PageRun* out) {
  if (max_pages == 0 || words_ == 0) return false;
  const uint64_t hint = std::min(hint_.load(std::memory_order_relaxed), index_.total() - 1);
  const uint64_t start_word = hint >> 6;
  // From the hint to the end, then from the start; the hint's own word is
  // visited twice: first from the hint's bit, last below it.
  for (uint64_t k = 0; k <= words_; ++k) {
    const uint64_t w = (start_word + k) % words_;
    const uint64_t from = k == 0 ? ~uint64_t{0} << (hint & 63) : ~uint64_t{0};
    uint64_t v = bits_[w].load(std::memory_order_acquire);
    while ((v & from) != 0) {
      // The first run of set bits (at or after the hint's bit in its word),
      // at most max_pages long and inside one slot.
      const unsigned lo = static_cast<unsigned>(std::countr_zero(v & from));
      const uint64_t from_lo = v >> lo;
      unsigned len = static_cast<unsigned>(std::countr_one(from_lo));
      const uint64_t first = w * 64 + lo;
      len = static_cast<unsigned>(std::min<uint64_t>({len, max_pages, index_.SlotEnd(first) - first}));
      const uint64_t mask = (len == 64 ? ~uint64_t{0} : ((uint64_t{1} << len) - 1)) << lo;
      if (bits_[w].compare_exchange_weak(v, v & ~mask, std::memory_order_acq_rel)) {
        left_.fetch_sub(len, std::memory_order_relaxed);
        pushed_.fetch_add(len, std::memory_order_relaxed);
        out->gpa = index_.GpaOf(first);
        out->pages = len;
        // Keep going from here next time (a request moves it elsewhere).
        hint_.store(first + len, std::memory_order_relaxed);
        return true;
      }
    }
  }
  return false;
}

}  // namespace pmlmig::engine
