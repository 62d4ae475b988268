// The engine's migration logic end to end on real KVM guests, with an
// in-process sink in place of the network: MigrationSource on one Machine,
// VmMigrationTarget building a second Machine, pages copied directly.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <thread>

#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/memory_digest.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/machine.h"

namespace pmlmig {
namespace {

using namespace std::chrono_literals;

// Copies pages from the source's memory into the target's, optionally at a
// limited rate (to make a guest dirty faster than the "link").
class LocalSink final : public engine::MigrationSink {
 public:
  LocalSink(engine::MigrationTarget& target, double max_pages_per_second = 0)
      : target_(target), rate_(max_pages_per_second) {}
  Status Begin(const engine::MigrationSetup& setup, const engine::SlotTable& source) override {
    source_ = &source;
    return target_.OnSetup(setup);
  }
  Result<engine::TransferStats> SendPages(uint32_t, engine::PageList& pages) override {
    engine::TransferStats st;
    engine::PageRun run;
    const auto start = std::chrono::steady_clock::now();
    while (pages.Next(64, &run)) {
      // Abort() discards the target under this lock: never while we write into it.
      std::lock_guard lock(mu_);
      if (aborted_) return Aborted("aborted");
      for (uint64_t p = 0; p < run.pages; ++p) {
        const uint64_t gpa = run.gpa + p * 4096;
        const uint8_t* from = source_->HostAddress(gpa, 4096);
        uint8_t* to = target_.memory().HostAddress(gpa, 4096);
        if (from == nullptr || to == nullptr) return InvalidArgument("page outside memory");
        std::memcpy(to, from, 4096);
        if (engine::PageDigestTable* d = target_.digests()) d->Update(gpa, 1);  // what a transport must do
        ++st.pages;
        ++st.normal_pages;
        st.payload_bytes += 4096;
        st.wire_bytes += 4096;
      }
      ++st.batches;
      if (rate_ > 0) {
        std::this_thread::sleep_until(start + std::chrono::duration<double>(static_cast<double>(st.pages) / rate_));
      }
    }
    return st;
  }
  Result<engine::FinalReply> Finish(const engine::FinalState& state) override { return target_.OnFinal(state); }
  engine::CommitResult Commit() override {
    engine::CommitResult r;
    auto resumed = target_.OnCommit();
    r.state = resumed.ok() ? engine::CommitState::kCommitted : engine::CommitState::kNotCommitted;
    if (resumed.ok()) r.target_resume_ms = *resumed;
    else r.detail = resumed.status();
    return r;
  }
  void Abort(const std::string& why) override {
    std::lock_guard lock(mu_);
    aborted_ = true;
    target_.OnAbort(why);
  }

 private:
  engine::MigrationTarget& target_;
  const engine::SlotTable* source_ = nullptr;
  double rate_;
  std::mutex mu_;
  bool aborted_ = false;  // guarded by mu_
};

class MigrationKvmTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is absent or not read-write";
    auto k = vmm::Kvm::Open();
    ASSERT_TRUE(k.ok());
    kvm_ = std::make_unique<vmm::Kvm>(std::move(*k));
  }
  vmm::MachineOptions Options(const char* tracker, const char* workload, uint32_t vcpus) {
    vmm::MachineOptions o;
    o.guest.memory_bytes = 128ull << 20;
    o.guest.vcpus = vcpus;
    o.guest.workload = *vmm::ParseWorkload(workload);
    if (std::string(tracker) == "ring") o.dirty_ring_bytes = 65536 * 16;
    return o;
  }
  std::unique_ptr<vmm::Kvm> kvm_;
};

std::vector<uint64_t> Counters(const vmm::Machine& m) {
  std::vector<uint64_t> c;
  for (const auto& s : m.Stats()) c.push_back(s.pages_written);
  return c;
}

TEST_P(MigrationKvmTest, MigratesVerifiesAndCarriesOn) {
  const char* tracker_name = GetParam();
  vmm::MachineOptions src_opts = Options(tracker_name, "hotset:fraction=0.05,share=0.9", 2);
  auto src = vmm::Machine::Create(*kvm_, src_opts);
  ASSERT_TRUE(src.ok()) << src.status().message();
  auto tracker = engine::CreateTracker(*engine::ParseTrackerKind(tracker_name), **src, {});
  ASSERT_TRUE(tracker.ok()) << tracker.status().message();
  ASSERT_TRUE((*src)->Start().ok());
  std::this_thread::sleep_for(300ms);

  vmm::Machine* target_machine = nullptr;
  engine::VmMigrationTarget target(
      [&](const engine::MigrationSetup&) -> Result<std::unique_ptr<engine::VmControl>> {
        auto m = vmm::Machine::CreateForRestore(*kvm_, src_opts);
        if (!m.ok()) return m.status();
        target_machine = m->get();
        return std::unique_ptr<engine::VmControl>(std::move(*m));
      },
      [&](engine::VmControl&) -> Result<std::string> {
        const vmm::CheckReport r = vmm::CheckGuestMemory(target_machine->memory(), src_opts.guest, Counters(*target_machine));
        if (!r.ok()) return r.ToStatus();
        return "checker passed on " + std::to_string(r.pages_checked) + " pages";
      });
  LocalSink sink(target);
  engine::MigrationOptions mo;
  mo.verify = true;
  mo.verify_order = engine::VerifyOrder::kBeforeCommit;  // the checker runs only then (it needs the VM paused)
  mo.convergence.downtime_limit = 50ms;
  engine::MigrationSource source(**src, **tracker, sink, mo, "test");
  const engine::MigrationStats st = source.Run();
  ASSERT_EQ(st.outcome, engine::Outcome::kCompleted) << st.error;
  EXPECT_TRUE(st.verified);
  EXPECT_GE(st.rounds, 2u);
  EXPECT_NE(st.final_reply.verify_detail.find("checker passed"), std::string::npos) << st.final_reply.verify_detail;
  const auto at_switch = Counters(**src);
  (*src)->Stop();

  auto vm = target.TakeVm();
  ASSERT_NE(vm, nullptr);
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(vm->Pause().ok());
  const auto after = Counters(*target_machine);
  for (size_t i = 0; i < after.size(); ++i) EXPECT_GT(after[i], at_switch[i]) << "vcpu " << i << " stopped on the target";
  const vmm::CheckReport r = vmm::CheckGuestMemory(target_machine->memory(), src_opts.guest, after);
  EXPECT_TRUE(r.ok()) << r.first_problem;
  std::printf("[%s] %u rounds, %llu pages, downtime %.1f ms, total %.1f ms\n", tracker_name, st.rounds,
              static_cast<unsigned long long>(st.transferred.pages), st.downtime_ms, st.total_time_ms);
}

TEST_P(MigrationKvmTest, NotConvergingCancelsAndTheVmKeepsRunning) {
  const char* tracker_name = GetParam();
  vmm::MachineOptions src_opts = Options(tracker_name, "random", 1);
  src_opts.guest.fill = vmm::FillMode::kZero;  // a short round 0: only what the guest wrote
  // and at most 4096 pages (about 1 s at the link's 4000 pages/s), however
  // long the guest ran before on a loaded host
  src_opts.guest.memory_bytes = 16ull << 20;
  auto src = vmm::Machine::Create(*kvm_, src_opts);
  ASSERT_TRUE(src.ok());
  auto tracker = engine::CreateTracker(*engine::ParseTrackerKind(tracker_name), **src, {});
  ASSERT_TRUE(tracker.ok());
  ASSERT_TRUE((*src)->Start().ok());
  // Let the guest get going: the point is a guest that writes faster than the link.
  while ((*src)->Stats()[0].pages_written < 2000) std::this_thread::sleep_for(10ms);
  engine::VmMigrationTarget target([&](const engine::MigrationSetup&) -> Result<std::unique_ptr<engine::VmControl>> {
    auto m = vmm::Machine::CreateForRestore(*kvm_, src_opts);
    if (!m.ok()) return m.status();
    return std::unique_ptr<engine::VmControl>(std::move(*m));
  });
  // 4000 pages/s: well below what the guest dirties, even on a loaded host or
  // under sanitizers (the guest then still writes some 20k pages/s).
  LocalSink sink(target, 4000);
  engine::MigrationOptions mo;
  mo.convergence.downtime_limit = 10ms;
  mo.convergence.timeout = 3000ms;
  engine::MigrationSource source(**src, **tracker, sink, mo, "test");
  const engine::MigrationStats st = source.Run();
  for (const auto& r : st.round_stats) {
    std::printf("round %u: %llu dirty, %llu sent, %.1f ms, %.0f Mbit/s, expected %.1f ms\n", r.round,
                static_cast<unsigned long long>(r.dirty_pages), static_cast<unsigned long long>(r.sent.pages),
                r.duration_ms, r.bandwidth_mbps, r.expected_downtime_ms);
  }
  EXPECT_EQ(st.outcome, engine::Outcome::kCancelled);
  EXPECT_NE(st.error.find("not converging"), std::string::npos) << st.error;
  EXPECT_EQ(target.TakeVm(), nullptr);
  const auto before = Counters(**src);
  std::this_thread::sleep_for(300ms);
  EXPECT_GT(Counters(**src)[0], before[0]) << "the source VM must keep running";
  EXPECT_TRUE((*src)->error().ok());
}

INSTANTIATE_TEST_SUITE_P(Trackers, MigrationKvmTest, ::testing::Values("ring", "bitmap"),
                         [](const auto& p) { return std::string(p.param); });

}  // namespace
}  // namespace pmlmig
