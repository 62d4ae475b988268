#include "pmlmig/engine/dirty_ring.h"

#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

namespace pmlmig::engine {
namespace {

#ifndef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
#define KVM_DIRTY_GFN_F_DIRTY (1u << 0)
#define KVM_DIRTY_GFN_F_RESET (1u << 1)
#endif

uint64_t NowNs() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

}  // namespace

RingHarvester::Result RingHarvester::Harvest(DirtySet& set, uint32_t max) {
  Result r;
  while (r.harvested < max) {
    kvm_dirty_gfn& e = entries_[fetch_ & mask_];
    // Acquire pairs with KVM's release store of DIRTY after it wrote slot and
    // offset: once we see DIRTY, slot and offset are the ones KVM published.
    std::atomic_ref<uint32_t> flags(e.flags);
    if ((flags.load(std::memory_order_acquire) & KVM_DIRTY_GFN_F_DIRTY) == 0) break;
    const uint32_t slot = e.slot;
    const uint64_t offset = e.offset;
    if (!set.MarkExclusive(slot, offset, r.newly_set)) [[unlikely]] {
      if (r.invalid++ == 0) {
        r.first_bad_slot = slot;
        r.first_bad_offset = offset;
      }
    }
    // Release pairs with KVM_RESET_DIRTY_RINGS reading RESET: our reads of
    // slot/offset happen before KVM may recycle the entry.
    flags.store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
    ++fetch_;
    ++r.harvested;
  }
  return r;
}

uint32_t RingHarvester::Resync() {
  const uint32_t size = mask_ + 1;
  for (uint32_t d = 1; d < size; ++d) {
    std::atomic_ref<uint32_t> flags(entries_[(fetch_ + d) & mask_].flags);
    if ((flags.load(std::memory_order_acquire) & KVM_DIRTY_GFN_F_DIRTY) == 0) continue;
    // KVM publishes in order, and the acquire above makes everything it wrote
    // before entry fetch+d visible: if entry `fetch` is published now, it was
    // simply late (no gap) and a normal harvest takes it.
    std::atomic_ref<uint32_t> head(entries_[fetch_ & mask_].flags);
    if ((head.load(std::memory_order_acquire) & KVM_DIRTY_GFN_F_DIRTY) != 0) return 0;
    // Entries fetch .. fetch+d-1 were skipped by KVM: hand them back as
    // harvested so the in-order reset can walk past them. KVM re-protects
    // whatever slot/offset they still hold, which only ever adds a log entry.
    for (uint32_t g = 0; g < d; ++g) {
      std::atomic_ref<uint32_t>(entries_[(fetch_ + g) & mask_].flags).store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
    }
    fetch_ += d;
    return d;
  }
  return 0;
}

DirtyRingTracker::DirtyRingTracker(VmControl& vm, const DirtyRingOptions& options)
    : vm_(vm), options_(options), pending_(vm.memory_slots()) {}

Result<std::unique_ptr<DirtyRingTracker>> DirtyRingTracker::Create(VmControl& vm, const DirtyRingOptions& options) {
  const uint32_t entries = vm.dirty_ring_entries();
  if (entries == 0) return Unavailable("ring tracker: the VM was created without a dirty ring");
  if ((entries & (entries - 1)) != 0 || entries <= kRingReservedEntries) {
    return InvalidArgument("ring tracker: " + std::to_string(entries) + " entries: the ring needs a power of two above " +
                           std::to_string(kRingReservedEntries) + " (KVM keeps that many free)");
  }
  auto t = std::unique_ptr<DirtyRingTracker>(new DirtyRingTracker(vm, options));
  const long page = sysconf(_SC_PAGESIZE);
  const size_t bytes = static_cast<size_t>(entries) * sizeof(kvm_dirty_gfn);
  for (uint32_t i = 0; i < vm.vcpu_count(); ++i) {
    auto ring = std::make_unique<Ring>();
    PMLMIG_ASSIGN_OR_RETURN(ring->mapping,
                            Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vm.vcpu_fd(i),
                                         static_cast<off_t>(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
                                         "dirty ring of vcpu " + std::to_string(i)));
    ring->harvester = RingHarvester(reinterpret_cast<kvm_dirty_gfn*>(ring->mapping.data()), entries);
    t->rings_.push_back(std::move(ring));
  }
  return t;
}

DirtyRingTracker::~DirtyRingTracker() { (void)Disable(); }

Status DirtyRingTracker::Enable() {
  {
    std::lock_guard lock(mu_);
    if (running_) return Status::Ok();
    running_ = true;
    stop_ = false;
    error_ = Status::Ok();
    overflow_ = false;
  }
  // What an earlier tracking harvested (Disable's last pass included) is
  // history: the caller reads every page after this Enable anyway. No
  // collector runs yet, so the set is this thread's.
  pending_.Clear();
  vm_.SetDirtyRingFullHandler([this](uint32_t vcpu) { return OnRingFull(vcpu); });
  collector_ = std::thread([this] { CollectorLoop(); });
  Status s = vm_.SetDirtyLogging(true);
  if (!s.ok()) {
    (void)Disable();
    return s.WithContext("ring tracker");
  }
  return Status::Ok();
}

Status DirtyRingTracker::Disable() {
  {
    std::lock_guard lock(mu_);
    if (!running_) return Status::Ok();
  }
  Status s = vm_.SetDirtyLogging(false);
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (collector_.joinable()) collector_.join();
  // Leave the rings empty: a vCPU must never find its ring full once logging is off.
  Pass();
  vm_.SetDirtyRingFullHandler(nullptr);
  std::lock_guard lock(mu_);
  running_ = false;
  return s;
}

void DirtyRingTracker::CollectorLoop() {
  std::unique_lock lock(mu_);
  bool busy = false;
  while (!stop_) {
    // A ring found a quarter full or more gets drained again at once: the
    // guest writes faster than the period allows for this ring size.
    if (!busy) cv_.wait_for(lock, options_.collector_period, [&] { return stop_ || requested_ > completed_; });
    if (stop_) break;
    const uint64_t generation = requested_;
    DirtySet* take_into = take_generation_ <= generation ? take_into_ : nullptr;
    lock.unlock();
    busy = Pass();
    // The harvested set belongs to this thread: a Collect's take happens
    // here, after the pass its request started.
    const uint64_t taken = take_into != nullptr ? pending_.TakeInto(*take_into) : 0;
    rusage ru{};
    if (getrusage(RUSAGE_THREAD, &ru) == 0) {
      auto ns = [](const timeval& tv) { return static_cast<uint64_t>(tv.tv_sec) * 1000000000ull + static_cast<uint64_t>(tv.tv_usec) * 1000ull; };
      counters_.background_user_ns.store(ns(ru.ru_utime), std::memory_order_relaxed);
      counters_.background_sys_ns.store(ns(ru.ru_stime), std::memory_order_relaxed);
    }
    lock.lock();
    if (take_into != nullptr) {
      taken_pages_ = taken;
      take_into_ = nullptr;
    }
    completed_ = std::max(completed_, generation);
    cv_.notify_all();
  }
  // Release anyone still waiting: no pass will come.
  completed_ = requested_;
  cv_.notify_all();
}

bool DirtyRingTracker::Pass() {
  uint64_t harvested = 0;
  uint32_t busiest = 0;  // quarters of a ring found full
  bool overflow = false;
  Status bad;
  uint64_t skipped = 0;
  for (auto& ring : rings_) {
    RingHarvester::Result r = ring->harvester.Harvest(pending_);
    uint64_t newly_set = r.newly_set;
    const bool reported_full = ring->reported_full.exchange(false, std::memory_order_acq_rel);
    if (r.harvested == 0 && (reported_full || ring->suspect)) {
      // Full, yet nothing at our index: look for an overflow gap.
      if (const uint32_t gap = ring->harvester.Resync(); gap != 0) {
        skipped += gap;
        overflow = true;
        r = ring->harvester.Harvest(pending_);
        newly_set += r.newly_set;
      }
    }
    if (r.harvested != 0) {
      ring->new_pages.fetch_add(newly_set, std::memory_order_relaxed);
      ring->entries.fetch_add(r.harvested, std::memory_order_relaxed);
    }
    // A pass can take at most `size` entries (taken ones stay RESET until the
    // reset below); finding all of them published means KVM may have had to
    // write past a full ring. Between the soft limit (size - 64 here) and
    // size, nothing is lost yet.
    if (r.harvested >= ring->harvester.size()) {
      overflow = true;
      ring->suspect = true;
    } else if (r.harvested != 0) {
      ring->suspect = false;
    }
    busiest = std::max(busiest, r.harvested * 4 / ring->harvester.size());
    harvested += r.harvested;
    if (r.invalid != 0 && bad.ok()) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "dirty ring: %u entries outside guest memory (first: slot %u offset 0x%llx)",
                    r.invalid, r.first_bad_slot, static_cast<unsigned long long>(r.first_bad_offset));
      bad = DataLoss(buf);
    }
  }
  counters_.background_harvests.fetch_add(1, std::memory_order_relaxed);
  if (harvested + skipped != 0) {
    counters_.entries_harvested.fetch_add(harvested, std::memory_order_relaxed);
    const int reset = ::ioctl(vm_.vm_fd(), KVM_RESET_DIRTY_RINGS, 0);
    if (reset < 0) {
      if (bad.ok()) bad = Status::FromErrno(errno, "KVM_RESET_DIRTY_RINGS (vm)");
      overflow = true;
    } else if (static_cast<uint64_t>(reset) != harvested + skipped) {
      overflow = true;  // KVM recycled a different number than we took: entries were lost
    }
  }
  if (overflow) {
    counters_.overflows.fetch_add(1, std::memory_order_relaxed);
    pending_.MarkAll();
  }
  if (overflow || !bad.ok()) {
    std::lock_guard lock(mu_);
    overflow_ |= overflow;
    if (error_.ok()) error_ = bad;
  }
  return busiest >= 1;
}

Status DirtyRingTracker::RequestPassAndWait(DirtySet* take_into) {
  std::unique_lock lock(mu_);
  if (!running_ || stop_) return Status::Ok();
  const uint64_t generation = ++requested_;
  if (take_into != nullptr) {
    take_into_ = take_into;
    take_generation_ = generation;
  }
  cv_.notify_all();
  cv_.wait(lock, [&] { return completed_ >= generation || stop_; });
  return Status::Ok();
}

Status DirtyRingTracker::OnRingFull(uint32_t vcpu) {
  // On the vCPU's thread: the collector drains this ring (and resets it) in
  // the next pass; KVM_RUN then has room again.
  counters_.ring_full_exits.fetch_add(1, std::memory_order_relaxed);
  if (vcpu < rings_.size()) rings_[vcpu]->reported_full.store(true, std::memory_order_release);
  return RequestPassAndWait(nullptr);
}

Status DirtyRingTracker::Collect(DirtySet& out) {
  if (!out.SameGeometry(pending_)) return InvalidArgument("ring tracker: dirty set does not match the memslots");
  const uint64_t start = NowNs();
  // Flush: every vCPU leaves guest mode (on PML hosts, that empties its PML
  // buffer into its ring), then a pass that started after that drains and
  // resets every ring. Only then are the pages safe to read.
  PMLMIG_RETURN_IF_ERROR(vm_.KickAll().WithContext("ring tracker: kick"));
  {
    std::lock_guard lock(mu_);
    if (!running_) return InvalidArgument("ring tracker: Collect before Enable");
  }
  PMLMIG_RETURN_IF_ERROR(RequestPassAndWait(&out));
  Status err;
  bool overflow;
  uint64_t pages;
  {
    std::lock_guard lock(mu_);
    err = error_;
    error_ = Status::Ok();
    overflow = overflow_;
    overflow_ = false;
    pages = taken_pages_;
    taken_pages_ = 0;
    if (take_into_ != nullptr) {  // the collector stopped before taking
      take_into_ = nullptr;
      return Aborted("ring tracker: disabled during Collect");
    }
  }
  if (overflow) {
    // Entries were lost, and with them the re-protection of their pages:
    // those pages would stay writable without logging. Turning logging off
    // and on write-protects every page again; then everything is reported.
    Status rearm = vm_.SetDirtyLogging(false);
    if (rearm.ok()) rearm = vm_.SetDirtyLogging(true);
    if (!rearm.ok() && err.ok()) err = rearm.WithContext("ring tracker: re-arming after overflow");
    out.MarkAll();
    pages = out.total_pages();
  }
  const uint64_t ns = NowNs() - start;
  counters_.RecordCollection(pages, ns);
  return err;
}

TrackerStats DirtyRingTracker::stats() const { return counters_.Snapshot(); }

bool DirtyRingTracker::vcpu_counts(std::vector<VcpuDirtyCount>& out) const {
  out.resize(rings_.size());
  for (size_t i = 0; i < rings_.size(); ++i) {
    out[i].new_pages = rings_[i]->new_pages.load(std::memory_order_relaxed);
    out[i].entries = rings_[i]->entries.load(std::memory_order_relaxed);
  }
  return true;
}

}  // namespace pmlmig::engine
