// Live migration of real KVM guests over gRPC on loopback, in one process:
// MigrationSource + GrpcMigrationSink on one side, MigrationServer +
// VmMigrationTarget on the other. Failure cases: the target dies mid-round
// (the source VM keeps running and then migrates to a new target), and the
// connection cut during stop-and-copy (the same guarantees, and the target
// never runs the VM).
#include <gtest/gtest.h>
#include <unistd.h>

#include <thread>

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
                                 std::function<void()> during = nullptr) {
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
    mo.convergence.downtime_limit = 100ms;
    engine::MigrationSource source(m, tracker, **sink, mo, description_);
    std::thread t;
    if (during) t = std::thread(during);
    engine::MigrationStats st = source.Run();
    if (t.joinable()) t.join();
    return st;
  }

  // A source VM (not started yet) that writes a 5% hot set, with a dirty ring; sets description_.
  Result<std::unique_ptr<vmm::Machine>> StartSource(uint64_t memory_bytes, uint32_t vcpus) {
    vmm::MachineOptions o;
    o.guest.memory_bytes = memory_bytes;
    o.guest.vcpus = vcpus;
    o.guest.workload = *vmm::ParseWorkload("hotset:fraction=0.05,share=0.9");
    o.dirty_ring_bytes = 65536 * 16;
    PMLMIG_ASSIGN_OR_RETURN(std::unique_ptr<vmm::Machine> m, vmm::Machine::Create(*kvm_, o));
    description_ = vmm::EncodeTestVmDescription(o);
    return m;
  }

  std::unique_ptr<vmm::Kvm> kvm_;
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

}  // namespace
}  // namespace pmlmig
