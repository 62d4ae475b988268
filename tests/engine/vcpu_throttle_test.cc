// VcpuThrottle against fakes: "vCPU" threads that dirty pages at a set rate
// and honour the throttle hook as a VMM does, and a tracker that counts per
// vCPU. Checks who gets held and roughly how much, with wide bands: the
// machine is shared, and these are behaviours, not speed targets.
#include "pmlmig/engine/vcpu_throttle.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pmlmig::engine {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

class ThrottledVm final : public VmControl {
 public:
  explicit ThrottledVm(uint32_t vcpus, bool can_throttle = true) : vcpus_(vcpus), can_throttle_(can_throttle) {}
  const SlotTable& memory_slots() const override { return slots_; }
  int vm_fd() const override { return -1; }
  uint32_t vcpu_count() const override { return vcpus_; }
  int vcpu_fd(uint32_t) const override { return -1; }
  uint32_t dirty_ring_entries() const override { return 0; }
  Status SetDirtyLogging(bool) override { return Status::Ok(); }
  Status Pause() override { return Status::Ok(); }
  Status Resume() override { return Status::Ok(); }
  Status KickAll() override { return Status::Ok(); }
  void SetDirtyRingFullHandler(std::function<Status(uint32_t)>) override {}
  Result<std::vector<uint8_t>> SaveState() override { return std::vector<uint8_t>{}; }
  Status LoadState(std::span<const uint8_t>) override { return Status::Ok(); }
  bool SetVcpuThrottleHook(ThrottleHook hook) override {
    if (!can_throttle_) return false;
    std::lock_guard lock(mu_);
    hook_ = std::move(hook);
    ++hook_sets;
    return true;
  }
  void KickVcpu(uint32_t) override { kicks.fetch_add(1); }

  // What a vCPU thread does before entering the guest.
  std::chrono::nanoseconds Hold(uint32_t vcpu) {
    std::lock_guard lock(mu_);
    return hook_ ? hook_(vcpu) : 0ns;
  }
  bool hooked() {
    std::lock_guard lock(mu_);
    return hook_ != nullptr;
  }

  std::atomic<int> kicks{0};
  int hook_sets = 0;

 private:
  uint32_t vcpus_;
  bool can_throttle_;
  SlotTable slots_;
  std::mutex mu_;
  ThrottleHook hook_;
};

class CountingTracker final : public DirtyTracker {
 public:
  explicit CountingTracker(uint32_t vcpus, bool per_vcpu = true) : counts_(vcpus), per_vcpu_(per_vcpu) {}
  std::string_view name() const override { return "counting"; }
  Status Enable() override { return Status::Ok(); }
  Status Collect(DirtySet&) override { return Status::Ok(); }
  Status Disable() override { return Status::Ok(); }
  TrackerStats stats() const override { return {}; }
  bool vcpu_counts(std::vector<VcpuDirtyCount>& out) const override {
    if (!per_vcpu_) return false;
    out.resize(counts_.size());
    for (size_t i = 0; i < counts_.size(); ++i) {
      out[i].new_pages = counts_[i].load();
      out[i].entries = 3 * counts_[i].load();
    }
    return true;
  }
  void Add(uint32_t vcpu, uint64_t pages) { counts_[vcpu].fetch_add(pages); }
  uint64_t count(uint32_t vcpu) const { return counts_[vcpu].load(); }

 private:
  std::vector<std::atomic<uint64_t>> counts_;
  bool per_vcpu_;
};

// vCPU threads dirtying `rates[i]` pages/s each in 1 ms steps, held whenever
// the hook says so, for `duration`.
struct Guest {
  std::vector<uint64_t> written;
  std::vector<std::chrono::nanoseconds> held;

  Guest(ThrottledVm& vm, CountingTracker& tracker, std::vector<double> rates, std::chrono::milliseconds duration)
      : written(rates.size()), held(rates.size()) {
    std::vector<std::thread> threads;
    const auto end = Clock::now() + duration;
    for (uint32_t i = 0; i < rates.size(); ++i) {
      threads.emplace_back([&, i] {
        const auto start = Clock::now();
        double due = 0;
        while (Clock::now() < end) {
          if (const auto h = vm.Hold(i); h > 0ns) {
            const auto t = Clock::now();
            std::this_thread::sleep_for(std::min<std::chrono::nanoseconds>(h, 2ms));
            held[i] += Clock::now() - t;
            continue;
          }
          // Catch up to the rate, 1 ms of it at a time.
          due += rates[i] / 1000.0;
          const auto n = static_cast<uint64_t>(due);
          due -= static_cast<double>(n);
          tracker.Add(i, n);
          written[i] += n;
          std::this_thread::sleep_for(1ms);
        }
        (void)start;
      });
    }
    for (auto& t : threads) t.join();
  }
};

TEST(VcpuThrottle, MeasuresEachVcpusRateWithoutHoldingAnyone) {
  ThrottledVm vm(2);
  CountingTracker tracker(2);
  auto throttle = VcpuThrottle::Start(vm, tracker);
  const auto t = Clock::now();
  Guest g(vm, tracker, {4000, 400}, 1500ms);
  const double achieved = static_cast<double>(g.written[0]) / std::chrono::duration<double>(Clock::now() - t).count();
  const ThrottleStats s = throttle->stats();
  ASSERT_TRUE(s.per_vcpu_rates);
  ASSERT_TRUE(s.can_throttle);
  ASSERT_EQ(s.vcpus.size(), 2u);
  // A 1 s moving average after 1.5 s has reached most of the rate the
  // thread achieved (the sleeping "vCPU" threads run slower than asked on a
  // loaded machine, or under a sanitizer).
  EXPECT_GT(s.vcpus[0].dirty_pages_per_s, 4 * s.vcpus[1].dirty_pages_per_s);
  EXPECT_GT(s.vcpus[0].dirty_pages_per_s, 0.5 * achieved) << achieved;
  EXPECT_NEAR(s.vcpus[0].entries_per_s, 3 * s.vcpus[0].dirty_pages_per_s, 0.05 * s.vcpus[0].entries_per_s + 1);
  EXPECT_EQ(s.vcpus[0].holds, 0u);
  EXPECT_EQ(s.vcpus[1].holds, 0u);
  EXPECT_EQ(vm.kicks.load(), 0);
}

TEST(VcpuThrottle, DirtyLimitHoldsOnlyTheVcpuOverItsQuota) {
  ThrottledVm vm(2);
  CountingTracker tracker(2);
  auto throttle = VcpuThrottle::Start(vm, tracker);
  ASSERT_TRUE(throttle->SetQuota(1000).ok());
  const auto t = Clock::now();
  Guest g(vm, tracker, {8000, 300}, 2000ms);
  const double s = std::chrono::duration<double>(Clock::now() - t).count();
  const ThrottleStats st = throttle->stats();
  // The writer is capped near its quota (plus the burst), the light one is
  // never kicked or held.
  const double capped = static_cast<double>(g.written[0]) / s;
  EXPECT_LT(capped, 1600) << g.written[0] << " pages in " << s << " s";
  EXPECT_GT(capped, 500) << g.written[0] << " pages in " << s << " s";
  EXPECT_GT(st.vcpus[0].holds, 0u);
  EXPECT_GT(g.held[0], 50ms);
  EXPECT_EQ(st.vcpus[1].holds, 0u);
  EXPECT_EQ(g.held[1], 0ns);
  EXPECT_EQ(st.quota_pages_per_s, 1000);
  EXPECT_EQ(st.vcpus[0].quota_pages_per_s, 1000);
  EXPECT_GT(vm.kicks.load(), 0);
}

TEST(VcpuThrottle, AutoConvergeHoldsEveryVcpuItsShareOfTheTime) {
  ThrottledVm vm(2);
  CountingTracker tracker(2, /*per_vcpu=*/false);  // the bitmap: no rates, the duty cycle still works
  auto throttle = VcpuThrottle::Start(vm, tracker);
  ASSERT_TRUE(throttle->SetDutyCycle(50).ok());
  const auto t = Clock::now();
  Guest g(vm, tracker, {2000, 100}, 1500ms);
  const auto elapsed = Clock::now() - t;
  for (int i = 0; i < 2; ++i) {
    const double share = std::chrono::duration<double>(g.held[i]) / std::chrono::duration<double>(elapsed);
    EXPECT_GT(share, 0.25) << "vcpu " << i;
    EXPECT_LT(share, 0.75) << "vcpu " << i;
  }
  const ThrottleStats st = throttle->stats();
  EXPECT_FALSE(st.per_vcpu_rates);
  EXPECT_EQ(st.duty_pct, 50u);
  EXPECT_EQ(st.max_duty_pct, 50u);
  EXPECT_GT(st.vcpus[1].holds, 10u);
}

TEST(VcpuThrottle, DestructionLiftsTheLimitAndRemovesTheHook) {
  ThrottledVm vm(1);
  CountingTracker tracker(1);
  {
    auto throttle = VcpuThrottle::Start(vm, tracker);
    ASSERT_TRUE(vm.hooked());
    ASSERT_TRUE(throttle->SetDutyCycle(99).ok());
    std::this_thread::sleep_for(200ms);
    EXPECT_GT(vm.Hold(0), 100ms);  // held for most of a second
  }
  EXPECT_FALSE(vm.hooked());
  EXPECT_EQ(vm.Hold(0), 0ns);
}

TEST(VcpuThrottle, RefusesWhatCannotWork) {
  {
    ThrottledVm vm(1);
    CountingTracker tracker(1, /*per_vcpu=*/false);
    auto throttle = VcpuThrottle::Start(vm, tracker);
    const Status s = throttle->SetQuota(1000);
    EXPECT_EQ(s.code(), Code::kUnavailable);
    EXPECT_NE(s.message().find("dirty ring"), std::string::npos) << s.message();
    EXPECT_TRUE(throttle->SetQuota(0).ok());  // lifting is always fine
    EXPECT_EQ(throttle->SetDutyCycle(100).code(), Code::kInvalidArgument);
    EXPECT_EQ(throttle->SetQuota(-1).code(), Code::kInvalidArgument);
  }
  {
    ThrottledVm vm(1, /*can_throttle=*/false);
    CountingTracker tracker(1);
    auto throttle = VcpuThrottle::Start(vm, tracker);
    EXPECT_FALSE(throttle->stats().can_throttle);
    EXPECT_EQ(throttle->SetDutyCycle(20).code(), Code::kUnavailable);
    EXPECT_EQ(throttle->SetQuota(1000).code(), Code::kUnavailable);
  }
}

}  // namespace
}  // namespace pmlmig::engine
