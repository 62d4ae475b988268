// Live migration of real KVM guests over gRPC on loopback, in one process:
// MigrationSource + GrpcMigrationSink on one side, MigrationServer +
// VmMigrationTarget on the other. Failure cases: the target dies mid-round
// (the source VM keeps running and then migrates to a new target), and the
// connection cut during stop-and-copy (the same guarantees, and the target
// never runs the VM). Verification: both orders, each checked against a byte
// for byte comparison of the two sides' memory at the pause point, and three
// kinds of damage (a page dropped, a page left at an earlier round's copy, a
// page corrupted after its batch checksum passed) that must fail it and name
// the range.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include "pmlmig/base/failpoint.h"
#include "pmlmig/base/units.h"
#include "pmlmig/engine/migration_source.h"
#include "pmlmig/engine/migration_target.h"
#include "pmlmig/vmm/description.h"
#include "pmlmig/transport/grpc_server.h"
#include "pmlmig/transport/grpc_sink.h"
#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/machine.h"
#include "../support/loopback_proxy.h"

namespace pmlmig {
namespace {

using namespace std::chrono_literals;


class MigrationGrpcKvmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is absent or not read-write";
    auto k = vmm::Kvm::Open();
    ASSERT_TRUE(k.ok());
    kvm_ = std::make_unique<vmm::Kvm>(std::move(*k));
  }

  // A receiver that builds test VMs from the source's description.
  std::unique_ptr<transport::MigrationServer> StartReceiver() {
    factory_ = std::make_unique<vmm::TestVmFactory>(*kvm_, vmm::TestVmFactoryOptions{});
    auto server = transport::MigrationServer::Start("127.0.0.1:0", [this] { return factory_->MakeTarget(); });
    EXPECT_TRUE(server.ok()) << server.status().message();
    return server.ok() ? std::move(*server) : nullptr;
  }

  engine::MigrationStats Migrate(engine::VmControl& m, engine::DirtyTracker& tracker, int port, uint64_t max_bandwidth,
                                 std::function<void()> during = nullptr,
                                 engine::VerifyOrder order = engine::VerifyOrder::kAfterCommit) {
    transport::GrpcSinkOptions so;
    so.target = "127.0.0.1:" + std::to_string(port);
    so.streams = 2;
    so.max_bandwidth = max_bandwidth;
    so.stall_timeout = 3s;
    so.keepalive_time = 1s;
    so.keepalive_timeout = 1s;
    auto sink = transport::GrpcMigrationSink::Create(so);
    EXPECT_TRUE(sink.ok());
    engine::MigrationOptions mo;
    mo.verify = true;
    mo.verify_order = order;
    mo.convergence.downtime_limit = 100ms;
    engine::MigrationSource source(m, tracker, **sink, mo, description_);
    std::thread t;
    if (during) t = std::thread(during);
    engine::MigrationStats st = source.Run();
    if (t.joinable()) t.join();
    return st;
  }

  // A source VM (not started yet) that writes a 5% hot set, with a dirty ring; sets description_.
  Result<std::unique_ptr<vmm::Machine>> StartSource(uint64_t memory_bytes, uint32_t vcpus,
                                                    const char* workload = "hotset:fraction=0.05,share=0.9") {
    vmm::MachineOptions o;
    o.guest.memory_bytes = memory_bytes;
    o.guest.vcpus = vcpus;
    o.guest.workload = *vmm::ParseWorkload(workload);
    o.dirty_ring_bytes = 65536 * 16;
    PMLMIG_ASSIGN_OR_RETURN(std::unique_ptr<vmm::Machine> m, vmm::Machine::Create(*kvm_, o));
    description_ = vmm::EncodeTestVmDescription(o);
    return m;
  }

  // A receiver whose target first compares its memory with `source`'s byte
  // for byte at Final (the source is paused for stop-and-copy then), into
  // differing_.
  std::unique_ptr<transport::MigrationServer> StartComparingReceiver(const vmm::Machine& source);

  std::unique_ptr<vmm::Kvm> kvm_;
  std::vector<uint64_t> differing_;  // gpas of pages that differed at the pause point
  std::string description_;  // of the source VM
  std::unique_ptr<vmm::TestVmFactory> factory_;
};

TEST_F(MigrationGrpcKvmTest, TargetDiesMidMigrationThenANewTargetSucceeds) {
  auto src = StartSource(256ull << 20, 2);
  ASSERT_TRUE(src.ok()) << src.status().message();
  auto tracker = engine::CreateTracker(engine::TrackerKind::kRing, **src, {});
  ASSERT_TRUE(tracker.ok());
  ASSERT_TRUE((*src)->Start().ok());

  // 1. The target goes away in round 0 (slowed to 64 MiB/s so there is a round 0 to kill).
  auto first = StartReceiver();
  ASSERT_TRUE(first);
  transport::MigrationServer* dying = first.get();
  const auto t0 = std::chrono::steady_clock::now();
  engine::MigrationStats failed = Migrate(**src, **tracker, first->port(), 64ull << 20, [dying] {
    std::this_thread::sleep_for(700ms);
    dying->Shutdown();
  });
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(failed.outcome, engine::Outcome::kFailed);
  EXPECT_FALSE(failed.error.empty());
  std::printf("first attempt: %s after %.1f s: %s\n", std::string(engine::OutcomeName(failed.outcome)).c_str(), took, failed.error.c_str());
  EXPECT_LT(took, 15.0) << "the source noticed the dead target too late";
  first.reset();

  // The source VM keeps running.
  EXPECT_TRUE((*src)->error().ok()) << (*src)->error().message();
  const auto before = vmm::PagesWritten(**src);
  std::this_thread::sleep_for(300ms);
  const auto after = vmm::PagesWritten(**src);
  for (size_t i = 0; i < after.size(); ++i) EXPECT_GT(after[i], before[i]) << "vcpu " << i;

  // 2. The same VM migrates to a new target.
  auto second = StartReceiver();
  ASSERT_TRUE(second);
  engine::MigrationStats ok = Migrate(**src, **tracker, second->port(), 0);
  ASSERT_EQ(ok.outcome, engine::Outcome::kCompleted) << ok.error;
  EXPECT_TRUE(ok.verified);
  (*src)->Stop();
  auto outcome = second->WaitForMigration(std::chrono::steady_clock::now() + 10s);
  ASSERT_TRUE(outcome.ok()) << outcome.status().message();
  ASSERT_EQ(outcome->outcome, engine::Outcome::kCompleted);
  std::unique_ptr<engine::VmControl> vm = std::move(outcome->vm);
  ASSERT_NE(vm, nullptr);
  vmm::Machine* last_target = factory_->last_built();
  ASSERT_NE(last_target, nullptr);
  const auto at_resume = vmm::PagesWritten(*last_target);
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(vm->Pause().ok());
  const auto later = vmm::PagesWritten(*last_target);
  for (size_t i = 0; i < later.size(); ++i) EXPECT_GT(later[i], at_resume[i]) << "vcpu " << i;
  const vmm::CheckReport r = vmm::CheckGuestMemory(last_target->memory(), factory_->last_options().guest, later);
  EXPECT_TRUE(r.ok()) << r.first_problem;
  std::printf("second attempt: %u rounds, downtime %.1f ms, %.0f Mbit/s\n", ok.rounds, ok.downtime_ms,
              ok.throughput_mbps);
}

// The source VM as the engine sees it, with a hook when it is paused for
// stop-and-copy.
class PauseHook final : public engine::VmControl {
 public:
  PauseHook(vmm::Machine& m, std::function<void()> on_pause) : m_(m), on_pause_(std::move(on_pause)) {}
  const engine::SlotTable& memory_slots() const override { return m_.memory_slots(); }
  int vm_fd() const override { return m_.vm_fd(); }
  uint32_t vcpu_count() const override { return m_.vcpu_count(); }
  int vcpu_fd(uint32_t v) const override { return m_.vcpu_fd(v); }
  uint32_t dirty_ring_entries() const override { return m_.dirty_ring_entries(); }
  std::optional<Backing> slot_backing(uint32_t slot) const override { return m_.slot_backing(slot); }
  Status SetDirtyLogging(bool on) override { return m_.SetDirtyLogging(on); }
  Status Pause() override {
    Status s = m_.Pause();
    if (on_pause_) on_pause_();
    return s;
  }
  Status Resume() override { return m_.Resume(); }
  Status KickAll() override { return m_.KickAll(); }
  void SetDirtyRingFullHandler(std::function<Status(uint32_t)> h) override { m_.SetDirtyRingFullHandler(std::move(h)); }
  Result<std::vector<uint8_t>> SaveState() override { return m_.SaveState(); }
  Status LoadState(std::span<const uint8_t> state) override { return m_.LoadState(state); }

 private:
  vmm::Machine& m_;
  std::function<void()> on_pause_;
};

TEST_F(MigrationGrpcKvmTest, ConnectionCutDuringStopAndCopyKeepsTheVmHere) {
  auto src = StartSource(128ull << 20, 1);
  ASSERT_TRUE(src.ok()) << src.status().message();
  auto tracker = engine::CreateTracker(engine::TrackerKind::kRing, **src, {});
  ASSERT_TRUE(tracker.ok());
  ASSERT_TRUE((*src)->Start().ok());

  auto receiver = StartReceiver();
  ASSERT_TRUE(receiver);
  testing_support::Proxy proxy(receiver->port());
  bool cut = false;
  PauseHook hooked(**src, [&] {  // the vCPUs have just stopped: cut before the last pages go out
    proxy.CutAll();
    cut = true;
  });
  const std::string target = proxy.target();
  engine::MigrationStats st = Migrate(hooked, **tracker, std::stoi(target.substr(target.rfind(':') + 1)), 0);
  ASSERT_TRUE(cut) << "the migration never reached stop-and-copy";
  EXPECT_EQ(st.outcome, engine::Outcome::kFailed) << st.error;
  std::printf("cut during stop-and-copy: %s\n", st.error.c_str());
  // The source VM runs again; the target discarded its copy.
  EXPECT_TRUE((*src)->error().ok()) << (*src)->error().message();
  const auto before = vmm::PagesWritten(**src);
  std::this_thread::sleep_for(300ms);
  const auto after = vmm::PagesWritten(**src);
  EXPECT_GT(after[0], before[0]) << "the source VM did not resume";
  auto outcome = receiver->WaitForMigration(std::chrono::steady_clock::now() + 10s);
  ASSERT_TRUE(outcome.ok()) << outcome.status().message();
  EXPECT_EQ(outcome->outcome, engine::Outcome::kFailed);
  EXPECT_EQ(outcome->target, nullptr);
  (*src)->Stop();
}

// The engine's target, with a byte for byte comparison of both sides' memory
// before it handles Final.
class ComparingTarget final : public engine::MigrationTarget {
 public:
  ComparingTarget(std::unique_ptr<engine::MigrationTarget> inner, const engine::SlotTable& source,
                  std::vector<uint64_t>* differing)
      : inner_(std::move(inner)), source_(source), differing_(differing) {}
  Status OnSetup(const engine::MigrationSetup& s) override { return inner_->OnSetup(s); }
  const engine::SlotTable& memory() const override { return inner_->memory(); }
  engine::PageDigestTable* digests() override { return inner_->digests(); }
  Result<engine::FinalReply> OnFinal(const engine::FinalState& state) override {
    differing_->clear();
    for (const engine::MemorySlot& s : source_.slots()) {
      const uint8_t* mine = inner_->memory().HostAddress(s.gpa, s.size);
      for (uint64_t off = 0; mine != nullptr && off < s.size; off += engine::kPageSize) {
        if (std::memcmp(mine + off, s.host + off, engine::kPageSize) != 0) differing_->push_back(s.gpa + off);
      }
    }
    return inner_->OnFinal(state);
  }
  Result<double> OnCommit() override { return inner_->OnCommit(); }
  void OnAbort(const std::string& why) override { inner_->OnAbort(why); }
  std::unique_ptr<engine::VmControl> TakeVm() override { return inner_->TakeVm(); }

 private:
  std::unique_ptr<engine::MigrationTarget> inner_;
  const engine::SlotTable& source_;
  std::vector<uint64_t>* differing_;
};

std::unique_ptr<transport::MigrationServer> MigrationGrpcKvmTest::StartComparingReceiver(const vmm::Machine& source) {
  factory_ = std::make_unique<vmm::TestVmFactory>(*kvm_, vmm::TestVmFactoryOptions{});
  auto server = transport::MigrationServer::Start("127.0.0.1:0", [this, &source] {
    return std::make_unique<ComparingTarget>(factory_->MakeTarget(), source.memory_slots(), &differing_);
  });
  EXPECT_TRUE(server.ok()) << server.status().message();
  return server.ok() ? std::move(*server) : nullptr;
}

struct VerifyCase {
  const char* name;
  const char* tamper;  // PMLMIG_FAILPOINTS syntax; empty: an honest migration
  engine::VerifyOrder order;
};
void PrintTo(const VerifyCase& c, std::ostream* os) { *os << c.name; }

class VerifyKvmTest : public MigrationGrpcKvmTest, public ::testing::WithParamInterface<VerifyCase> {
 protected:
  void TearDown() override { ArmFailPoints(""); }
};

TEST_P(VerifyKvmTest, VerificationAgreesWithTheBytes) {
  const VerifyCase c = GetParam();
  // Every write goes to the hot pages (the first 5% of each vCPU's share), so
  // a damaged cold page is never healed by a later round.
  auto src = StartSource(128ull << 20, 2, "hotset:fraction=0.05,share=1");
  ASSERT_TRUE(src.ok()) << src.status().message();
  auto tracker = engine::CreateTracker(engine::TrackerKind::kRing, **src, {});
  ASSERT_TRUE(tracker.ok());
  ASSERT_TRUE((*src)->Start().ok());
  std::this_thread::sleep_for(200ms);
  auto receiver = StartComparingReceiver(**src);
  ASSERT_TRUE(receiver);
  ASSERT_TRUE(ArmFailPoints(c.tamper));
  const engine::MigrationStats st = Migrate(**src, **tracker, receiver->port(), 0, nullptr, c.order);
  ArmFailPoints("");
  const engine::VerifyReport& v = st.verification;
  std::printf("[%s] %s; verification %s: %s; %zu pages differed at the pause point; source digest at the pause: "
              "%llu pages in %.2f ms (witness %s)\n",
              c.name, std::string(engine::OutcomeName(st.outcome)).c_str(),
              std::string(engine::VerifyVerdictName(v.verdict)).c_str(), v.detail.c_str(), differing_.size(),
              static_cast<unsigned long long>(v.source.pause_pages), v.source_digest_ms, v.source.witness ? "on" : "off");
  EXPECT_TRUE(v.source.witness) << v.source.no_witness_reason;
  const bool honest = std::string(c.tamper).empty();
  if (honest) {
    EXPECT_EQ(st.outcome, engine::Outcome::kCompleted) << st.error;
    EXPECT_EQ(v.verdict, engine::VerifyVerdict::kMatched) << v.detail;
    EXPECT_TRUE(differing_.empty()) << differing_.size() << " pages differ, first at " << FormatHex(differing_[0]);
    (*src)->Stop();
    return;
  }
  // Damaged: the bytes differ in exactly the page the tamper point chose,
  // and verification names the 2 MiB chunk that holds it.
  ASSERT_EQ(differing_.size(), 1u) << "the tamper point should damage one page";
  const uint64_t chunk = differing_[0] & ~((2ull << 20) - 1);
  EXPECT_EQ(v.verdict, engine::VerifyVerdict::kMismatch) << v.detail;
  const std::string named = "1 chunk (2 MiB) differs: gpa " + FormatHex(chunk) + "-" + FormatHex(chunk + (2ull << 20) - 1);
  EXPECT_NE(v.detail.find(named), std::string::npos) << v.detail << " (expected " << named << ")";
  const auto before = vmm::PagesWritten(**src);
  std::this_thread::sleep_for(200ms);
  const auto after = vmm::PagesWritten(**src);
  if (c.order == engine::VerifyOrder::kBeforeCommit) {
    // Strict: the migration failed and the VM runs on here.
    EXPECT_EQ(st.outcome, engine::Outcome::kFailed);
    EXPECT_GT(after[0], before[0]) << "the source VM did not resume";
    auto outcome = receiver->WaitForMigration(std::chrono::steady_clock::now() + 10s);
    ASSERT_TRUE(outcome.ok());
    EXPECT_NE(outcome->outcome, engine::Outcome::kCompleted);
  } else {
    // After commit: the target runs; the source's copy stays paused, intact.
    EXPECT_EQ(st.outcome, engine::Outcome::kCompleted) << st.error;
    ASSERT_EQ(v.mismatch.ranges.size(), 1u);
    EXPECT_EQ(v.mismatch.ranges[0].gpa, chunk);
    EXPECT_EQ(after[0], before[0]) << "the source's copy must stay paused";
  }
  (*src)->Stop();
}

INSTANTIATE_TEST_SUITE_P(
    Verify, VerifyKvmTest,
    ::testing::Values(VerifyCase{"honest_before_commit", "", engine::VerifyOrder::kBeforeCommit},
                      VerifyCase{"honest_after_commit", "", engine::VerifyOrder::kAfterCommit},
                      VerifyCase{"dropped_page_before_commit", "tamper.source.drop_page=1",
                                 engine::VerifyOrder::kBeforeCommit},
                      VerifyCase{"stale_page_before_commit", "tamper.source.stale_page=1",
                                 engine::VerifyOrder::kBeforeCommit},
                      VerifyCase{"corrupted_after_checksum_before_commit", "tamper.receiver.after_checksum=30",
                                 engine::VerifyOrder::kBeforeCommit},
                      VerifyCase{"dropped_page_after_commit", "tamper.source.drop_page=1",
                                 engine::VerifyOrder::kAfterCommit},
                      VerifyCase{"stale_page_after_commit", "tamper.source.stale_page=1",
                                 engine::VerifyOrder::kAfterCommit}),
    [](const ::testing::TestParamInfo<VerifyCase>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace pmlmig
