// VcpuThrottle: measures each vCPU's dirty rate during a migration and, when
// the switch-over policy asks, slows vCPUs down so that the migration
// converges. Two ways to slow them, one at a time:
//
//   dirty-limit    each vCPU's rate of new dirty pages is capped at a quota
//                  (pages/s). One token bucket per vCPU, refilled at the
//                  quota: a vCPU that has dirtied more than its bucket holds
//                  is kicked out of guest mode and held there until it has
//                  paid the excess back. A vCPU under its quota is neither
//                  kicked nor held, so vCPUs that do not write keep their
//                  speed. Needs a tracker that counts per vCPU (the ring).
//   auto-converge  every vCPU is held pct% of the time, QEMU's cpu-throttle:
//                  after each 10 ms of running, pct/(100-pct) * 10 ms out.
//
// Where it is enforced: before each guest entry, on the vCPU's own thread
// (VmControl::SetVcpuThrottleHook), with a kick (VmControl::KickVcpu) for
// a vCPU that must stop now. QEMU instead sleeps in the ring-full exit, which
// needs rings that fill; this host's rings lose entries when they fill
// (REFERENCE §1), so the collector keeps them drained and ring-full exits
// stay rare. A kick costs one exit per hold, and the quota then also works
// for a VMM whose guests never fill a ring.
//
// The rate is "new dirty pages": pages a vCPU added to the dirty set, each
// counted once between two collections, i.e. what the next round must send.
// (The raw ring entry rate is reported too; this host logs about three
// entries per page write.) Sampled every 10 ms, reported as a moving average
// with a 1 s time constant.
//
// Thread-safety: SetQuota/SetDutyCycle from the owner's thread; stats() from
// any thread; the hook runs on vCPU threads. Destruction lifts every limit:
// the hook is removed and a vCPU held at that moment goes back to the guest.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/tracker.h"
#include "pmlmig/engine/vm_control.h"

namespace pmlmig::engine {

struct VcpuRate {
  double dirty_pages_per_s = 0;  // new dirty pages, moving average
  double entries_per_s = 0;      // log entries, moving average
  double quota_pages_per_s = 0;  // the dirty-limit in force (0: none)
  uint64_t held_ns = 0;          // time held out of guest mode by the throttle, in total
  uint64_t holds = 0;            // times it was held
  uint64_t dirty_pages = 0;      // new dirty pages counted since the throttle started
};

struct ThrottleStats {
  bool per_vcpu_rates = false;   // the tracker counts per vCPU (else `vcpus` has no rates)
  bool can_throttle = false;     // the VMM holds vCPUs for the throttle
  uint32_t duty_pct = 0;         // auto-converge's throttle in force (0: none)
  double quota_pages_per_s = 0;  // dirty-limit's per-vCPU quota in force (0: none)
  uint32_t max_duty_pct = 0;     // the highest either reached
  double min_quota_pages_per_s = 0;
  std::vector<VcpuRate> vcpus;
};

struct VcpuThrottleOptions {
  std::chrono::milliseconds sample_period{10};   // how often rates and buckets are updated
  std::chrono::milliseconds rate_time_constant{1000};
  std::chrono::milliseconds duty_slice{10};      // auto-converge: run time between two holds (QEMU: 10 ms)
  // Dirty-limit: the bucket holds this much time's worth of quota, so a
  // vCPU may burst briefly above its quota before it is held.
  std::chrono::milliseconds burst{50};
};

class VcpuThrottle {
 public:
  // Starts measuring (when the tracker counts per vCPU) and installs the
  // hook (when the VMM can throttle). Neither is an error: stats() says
  // which, and SetQuota/SetDutyCycle refuse what cannot work.
  static std::unique_ptr<VcpuThrottle> Start(VmControl& vm, const DirtyTracker& tracker,
                                             VcpuThrottleOptions options = {});
  ~VcpuThrottle();
  VcpuThrottle(const VcpuThrottle&) = delete;
  VcpuThrottle& operator=(const VcpuThrottle&) = delete;

  // Dirty-limit: every vCPU's quota, in new dirty pages per second (0 lifts
  // it). Ends auto-converge. Fails without per-vCPU rates or throttling.
  Status SetQuota(double pages_per_s);
  // Auto-converge: hold every vCPU pct% of the time (0 lifts it; at most
  // 99). Ends dirty-limit. Fails without throttling.
  Status SetDutyCycle(uint32_t pct);
  ThrottleStats stats() const;

 private:
  struct alignas(64) Vcpu {
    std::atomic<int64_t> hold_until_ns{0};  // steady clock; the hook holds the vCPU until then
    // The sampling thread's own:
    uint64_t last_new_pages = 0;
    uint64_t last_entries = 0;
    double tokens = 0;
    int64_t next_slice_end_ns = 0;  // auto-converge: when its current run slice ends
    // Written by the sampling thread, read by stats() (under mu_):
    double dirty_rate = 0;
    double entry_rate = 0;
    uint64_t held_ns = 0;
    uint64_t holds = 0;
    uint64_t dirty_pages = 0;
  };

  VcpuThrottle(VmControl& vm, const DirtyTracker& tracker, VcpuThrottleOptions options);
  void Loop();
  // One sample: rates, then the dirty-limit buckets. mu_ held.
  void Sample(int64_t now_ns, double dt_s);
  // Auto-converge: holds every vCPU whose slice has ended. mu_ held. Returns
  // when the next slice ends.
  int64_t Slices(int64_t now_ns);
  void Hold(uint32_t vcpu, int64_t now_ns, int64_t until_ns);  // mu_ held
  std::chrono::nanoseconds HoldFor(uint32_t vcpu) const;       // the hook

  VmControl& vm_;
  const DirtyTracker& tracker_;
  const VcpuThrottleOptions options_;
  std::vector<Vcpu> vcpus_;
  std::vector<VcpuDirtyCount> counts_;  // the sampling thread's scratch
  bool per_vcpu_ = false;
  bool hooked_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;            // guarded by mu_
  double quota_ = 0;             // guarded by mu_
  uint32_t duty_pct_ = 0;        // guarded by mu_
  uint32_t max_duty_pct_ = 0;    // guarded by mu_
  double min_quota_ = 0;         // guarded by mu_
  std::thread thread_;
};

}  // namespace pmlmig::engine
