#include "uffd_fill.h"

#include <linux/magic.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "pmlmig/base/linux_compat.h"
#include "pmlmig/engine/postcopy.h"

namespace pmlmig::transport {
namespace {

constexpr uint64_t kPage = engine::kPageSize;

bool OnTmpfs(int fd) {
  struct statfs st{};
  return ::fstatfs(fd, &st) == 0 && st.f_type == TMPFS_MAGIC;
}

}  // namespace

Result<std::shared_ptr<UffdFill>> UffdFill::Start(const engine::SlotTable& memory, std::span<const SlotFile> files) {
  PMLMIG_ASSIGN_OR_RETURN(UniqueFd uffd, engine::OpenMissingFaultUffd());
  std::vector<Range> ranges;
  Status first_refusal = Unavailable("no slot of the target's memory has a memfd");
  for (const engine::MemorySlot& s : memory.slots()) {
    const engine::MemoryFile* file = nullptr;
    for (const auto& [id, f] : files) {
      if (id == s.slot) file = &f;
    }
    if (file == nullptr || file->fd < 0 || !OnTmpfs(file->fd)) continue;
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uintptr_t>(s.host);
    reg.range.len = s.size;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (IoctlNoEintr(uffd.get(), UFFDIO_REGISTER, &reg) < 0) {
      // Another userfaultfd has it (EBUSY), or a mapping that cannot
      // take one: that slot is filled the ordinary way.
      if (ranges.empty()) first_refusal = Status::FromErrno(errno, "UFFDIO_REGISTER of slot " + std::to_string(s.slot));
      continue;
    }
    if ((reg.ioctls & (uint64_t{1} << _UFFDIO_COPY)) == 0 || (reg.ioctls & (uint64_t{1} << _UFFDIO_ZEROPAGE)) == 0) {
      uffdio_range r{reg.range.start, reg.range.len};
      (void)IoctlNoEintr(uffd.get(), UFFDIO_UNREGISTER, &r);
      if (ranges.empty()) first_refusal = Unavailable("slot " + std::to_string(s.slot) + ": no UFFDIO_COPY here");
      continue;
    }
    ranges.push_back({reg.range.start, reg.range.len});
  }
  if (ranges.empty()) return first_refusal;
  UniqueFd wake(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake.valid()) return Status::FromErrno(errno, "eventfd");
  std::shared_ptr<UffdFill> fill(new UffdFill(std::move(uffd), std::move(wake), std::move(ranges)));
  fill->handler_ = std::thread([f = fill.get()] { f->Serve(); });
  return fill;
}

UffdFill::UffdFill(UniqueFd uffd, UniqueFd wake, std::vector<Range> ranges)
    : uffd_(std::move(uffd)), wake_(std::move(wake)), ranges_(std::move(ranges)) {}

UffdFill::~UffdFill() {
  // Without Stop the memory may be gone already: only the handler is
  // ended, and closing the userfaultfd unregisters whatever it still has.
  stopped_.store(true, std::memory_order_relaxed);
  const uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
  if (handler_.joinable()) handler_.join();
}

bool UffdFill::Covers(const uint8_t* host, uint64_t len) const {
  if (stopped_.load(std::memory_order_relaxed)) return false;
  const uintptr_t a = reinterpret_cast<uintptr_t>(host);
  for (const Range& r : ranges_) {
    if (a >= r.start && a - r.start + len <= r.len) return true;
  }
  return false;
}

uint64_t UffdFill::Place(uint8_t* dst, const uint8_t* src, uint64_t len) {
  uint64_t done = 0;
  while (done < len && !stopped_.load(std::memory_order_relaxed)) {
    uffdio_copy c{};
    c.dst = reinterpret_cast<uintptr_t>(dst + done);
    c.src = reinterpret_cast<uintptr_t>(src + done);
    c.len = len - done;
    if (IoctlNoEintr(uffd_.get(), UFFDIO_COPY, &c) == 0) {
      done = len;
      break;
    }
    const int err = errno;
    if (c.copy > 0) done += static_cast<uint64_t>(c.copy);  // the pages before the one that stopped it
    if (err == EAGAIN) continue;                            // the mapping changed meanwhile: the rest again
    if (err != EEXIST || done >= len) break;                // unregistered (ENOENT), or out of memory
    // That page exists (the handler zero-filled it, or a later round's
    // copy): an ordinary copy, then the pages after it.
    std::memcpy(dst + done, src + done, kPage);
    done += kPage;
  }
  placed_.fetch_add(done, std::memory_order_relaxed);
  return done;
}

void UffdFill::Stop() {
  std::lock_guard lock(stop_mu_);
  stopped_.store(true, std::memory_order_relaxed);
  if (unregistered_) return;
  unregistered_ = true;
  // Unregistering wakes any fault waiting on these ranges; it is then taken
  // as an ordinary fault, and no new one comes to the handler. The handler
  // is told to end but not waited for (the destructor joins it): a switch-
  // over calls this while the guest is paused.
  for (const Range& r : ranges_) {
    uffdio_range range{r.start, r.len};
    (void)IoctlNoEintr(uffd_.get(), UFFDIO_UNREGISTER, &range);
  }
  const uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
}

void UffdFill::Serve() {
  pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {wake_.get(), POLLIN, 0}};
  for (;;) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    uffd_msg msgs[16];
    const ssize_t n = ::read(uffd_.get(), msgs, sizeof msgs);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return;
    }
    for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
      if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
      const uintptr_t page = msgs[i].arg.pagefault.address & ~(kPage - 1);
      uffdio_zeropage z{};
      z.range = {page, kPage};
      z.mode = UFFDIO_ZEROPAGE_MODE_DONTWAKE;  // counted before the faulting thread goes on
      if (IoctlNoEintr(uffd_.get(), UFFDIO_ZEROPAGE, &z) == 0) zero_faults_.fetch_add(1, std::memory_order_relaxed);
      // Woken in any case: also when the page was placed meanwhile (EEXIST).
      uffdio_range wake{page, kPage};
      (void)IoctlNoEintr(uffd_.get(), UFFDIO_WAKE, &wake);
    }
  }
}

}  // namespace pmlmig::transport
