#include "pmlmig/engine/vcpu_throttle.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace pmlmig::engine {
namespace {

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t Ns(std::chrono::milliseconds ms) { return std::chrono::duration_cast<std::chrono::nanoseconds>(ms).count(); }

}  // namespace

std::unique_ptr<VcpuThrottle> VcpuThrottle::Start(VmControl& vm, const DirtyTracker& tracker,
                                                  VcpuThrottleOptions options) {
  auto t = std::unique_ptr<VcpuThrottle>(new VcpuThrottle(vm, tracker, options));
  t->per_vcpu_ = tracker.vcpu_counts(t->counts_) && t->counts_.size() == t->vcpus_.size();
  if (t->per_vcpu_) {
    for (size_t i = 0; i < t->vcpus_.size(); ++i) {
      t->vcpus_[i].last_new_pages = t->counts_[i].new_pages;
      t->vcpus_[i].last_entries = t->counts_[i].entries;
    }
  }
  t->hooked_ = vm.SetVcpuThrottleHook([p = t.get()](uint32_t vcpu) { return p->HoldFor(vcpu); });
  if (t->per_vcpu_ || t->hooked_) t->thread_ = std::thread([p = t.get()] { p->Loop(); });
  return t;
}

VcpuThrottle::VcpuThrottle(VmControl& vm, const DirtyTracker& tracker, VcpuThrottleOptions options)
    : vm_(vm), tracker_(tracker), options_(options), vcpus_(vm.vcpu_count()) {}

VcpuThrottle::~VcpuThrottle() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  // Lifted: no hold is extended any more, and the VMM, whose wait the hook's
  // removal ends, never calls us again once this returns.
  for (Vcpu& v : vcpus_) v.hold_until_ns.store(0, std::memory_order_relaxed);
  if (hooked_) (void)vm_.SetVcpuThrottleHook(nullptr);
}

Status VcpuThrottle::SetQuota(double pages_per_s) {
  if (pages_per_s < 0 || !std::isfinite(pages_per_s)) return InvalidArgument("dirty-limit: the quota must be >= 0");
  if (pages_per_s > 0 && !per_vcpu_) {
    return Unavailable("dirty-limit needs per-vCPU dirty rates, which only the dirty ring tracker gives");
  }
  if (pages_per_s > 0 && !hooked_) return Unavailable("dirty-limit: this VMM cannot hold its vCPUs");
  std::lock_guard lock(mu_);
  if (pages_per_s > 0 && quota_ == 0) {
    for (Vcpu& v : vcpus_) v.tokens = pages_per_s * std::chrono::duration<double>(options_.burst).count();
  }
  quota_ = pages_per_s;
  if (pages_per_s > 0) {
    duty_pct_ = 0;
    min_quota_ = min_quota_ == 0 ? pages_per_s : std::min(min_quota_, pages_per_s);
  }
  cv_.notify_all();
  return Status::Ok();
}

Status VcpuThrottle::SetDutyCycle(uint32_t pct) {
  if (pct > 99) return InvalidArgument("auto-converge: the throttle is at most 99%, not " + std::to_string(pct) + "%");
  if (pct > 0 && !hooked_) return Unavailable("auto-converge: this VMM cannot hold its vCPUs");
  std::lock_guard lock(mu_);
  if (pct > 0 && duty_pct_ == 0) {
    const int64_t now = SteadyNs();
    for (Vcpu& v : vcpus_) v.next_slice_end_ns = now + Ns(options_.duty_slice);
  }
  duty_pct_ = pct;
  max_duty_pct_ = std::max(max_duty_pct_, pct);
  if (pct > 0) quota_ = 0;
  cv_.notify_all();
  return Status::Ok();
}

ThrottleStats VcpuThrottle::stats() const {
  ThrottleStats s;
  s.per_vcpu_rates = per_vcpu_;
  s.can_throttle = hooked_;
  std::lock_guard lock(mu_);
  s.duty_pct = duty_pct_;
  s.quota_pages_per_s = quota_;
  s.max_duty_pct = max_duty_pct_;
  s.min_quota_pages_per_s = min_quota_;
  s.vcpus.reserve(vcpus_.size());
  for (const Vcpu& v : vcpus_) {
    s.vcpus.push_back({v.dirty_rate, v.entry_rate, quota_, v.held_ns, v.holds, v.dirty_pages});
  }
  return s;
}

std::chrono::nanoseconds VcpuThrottle::HoldFor(uint32_t vcpu) const {
  if (vcpu >= vcpus_.size()) return std::chrono::nanoseconds{0};
  const int64_t left = vcpus_[vcpu].hold_until_ns.load(std::memory_order_relaxed) - SteadyNs();
  return std::chrono::nanoseconds{std::max<int64_t>(left, 0)};
}

void VcpuThrottle::Hold(uint32_t vcpu, int64_t now_ns, int64_t until_ns) {
  Vcpu& v = vcpus_[vcpu];
  const int64_t was = v.hold_until_ns.load(std::memory_order_relaxed);
  if (until_ns <= was) return;
  v.held_ns += static_cast<uint64_t>(until_ns - std::max(was, now_ns));
  if (was <= now_ns) ++v.holds;
  v.hold_until_ns.store(until_ns, std::memory_order_relaxed);
  vm_.KickVcpu(vcpu);
}

void VcpuThrottle::Sample(int64_t now_ns, double dt_s) {
  if (!per_vcpu_ || dt_s <= 0) return;
  if (!tracker_.vcpu_counts(counts_) || counts_.size() != vcpus_.size()) return;
  const double keep = std::exp(-dt_s / std::chrono::duration<double>(options_.rate_time_constant).count());
  const double burst_s = std::chrono::duration<double>(options_.burst).count();
  for (uint32_t i = 0; i < vcpus_.size(); ++i) {
    Vcpu& v = vcpus_[i];
    const uint64_t fresh = counts_[i].new_pages - v.last_new_pages;
    const uint64_t entries = counts_[i].entries - v.last_entries;
    v.last_new_pages = counts_[i].new_pages;
    v.last_entries = counts_[i].entries;
    v.dirty_pages += fresh;
    v.dirty_rate = keep * v.dirty_rate + (1 - keep) * (static_cast<double>(fresh) / dt_s);
    v.entry_rate = keep * v.entry_rate + (1 - keep) * (static_cast<double>(entries) / dt_s);
    if (quota_ <= 0) continue;
    // The bucket refills at the quota up to the burst; what the vCPU dirtied
    // beyond it is paid back out of guest mode (the bucket keeps refilling
    // while the vCPU is held, so a later sample computes the same end).
    v.tokens = std::min(v.tokens + quota_ * dt_s, quota_ * burst_s) - static_cast<double>(fresh);
    if (v.tokens < 0) Hold(i, now_ns, now_ns + static_cast<int64_t>(-v.tokens / quota_ * 1e9));
  }
}

int64_t VcpuThrottle::Slices(int64_t now_ns) {
  const int64_t slice = Ns(options_.duty_slice);
  int64_t next = now_ns + slice;
  if (duty_pct_ == 0) return next;
  const int64_t hold = slice * duty_pct_ / (100 - duty_pct_);
  for (uint32_t i = 0; i < vcpus_.size(); ++i) {
    Vcpu& v = vcpus_[i];
    if (now_ns >= v.next_slice_end_ns) {
      Hold(i, now_ns, now_ns + hold);
      v.next_slice_end_ns = now_ns + hold + slice;
    }
    next = std::min(next, v.next_slice_end_ns);
  }
  return next;
}

void VcpuThrottle::Loop() {
  std::unique_lock lock(mu_);
  int64_t last = SteadyNs();
  int64_t next_sample = last + Ns(options_.sample_period);
  while (!stop_) {
    const int64_t next_slice = Slices(SteadyNs());
    const int64_t wake = std::min(next_sample, next_slice);
    cv_.wait_for(lock, std::chrono::nanoseconds(std::max<int64_t>(wake - SteadyNs(), 0)), [&] { return stop_; });
    if (stop_) break;
    const int64_t now = SteadyNs();
    if (now >= next_sample) {
      Sample(now, static_cast<double>(now - last) / 1e9);
      last = now;
      next_sample = now + Ns(options_.sample_period);
    }
  }
}

}  // namespace pmlmig::engine
