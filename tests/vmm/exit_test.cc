// Drives the exit decoder and dispatcher with made-up kvm_run pages.
#include "pmlmig/vmm/exit.h"

#include <gtest/gtest.h>

#include <cstring>
#include <vector>

namespace pmlmig::vmm {
namespace {

// Like KVM: kvm_run first, the PIO data page at offset 4096.
constexpr size_t kRunSize = 3 * 4096;

struct FakeRun {
  alignas(64) uint8_t page[kRunSize] = {};
  kvm_run* run() { return reinterpret_cast<kvm_run*>(page); }
};

struct RecordingHandler : ExitHandler {
  std::vector<std::string> calls;
  ExitAction OnPortOut(uint32_t vcpu, uint16_t port, uint8_t size, uint64_t value) override {
    calls.push_back("out " + std::to_string(vcpu) + " " + std::to_string(port) + " " + std::to_string(size) +
                    " " + std::to_string(value));
    return ExitAction::Continue();
  }
  ExitAction OnHalt(uint32_t vcpu) override {
    calls.push_back("hlt " + std::to_string(vcpu));
    return ExitAction::Continue();
  }
  ExitAction OnDirtyRingFull(uint32_t vcpu) override {
    calls.push_back("ringfull " + std::to_string(vcpu));
    return ExitAction::Continue();
  }
};

void MakeIo(FakeRun& f, uint8_t dir, uint16_t port, uint8_t size, uint32_t count, uint64_t offset) {
  f.run()->exit_reason = KVM_EXIT_IO;
  f.run()->io.direction = dir;
  f.run()->io.port = port;
  f.run()->io.size = size;
  f.run()->io.count = count;
  f.run()->io.data_offset = offset;
}

TEST(ExitTest, IoOutDecodedAndDispatched) {
  FakeRun f;
  MakeIo(f, KVM_EXIT_IO_OUT, 0x504, 4, 1, 4096);
  const uint32_t v = 0x12345678;
  std::memcpy(f.page + 4096, &v, 4);
  ExitEvent e = DecodeExit(f.run(), kRunSize);
  ASSERT_EQ(e.kind, ExitKind::kIo);
  EXPECT_TRUE(e.io_out);
  EXPECT_EQ(e.port, 0x504);
  EXPECT_EQ(e.io_value(), 0x12345678u);
  RecordingHandler h;
  EXPECT_EQ(HandleExit(3, e, h).kind, ExitAction::kContinue);
  ASSERT_EQ(h.calls.size(), 1u);
  EXPECT_EQ(h.calls[0], "out 3 1284 4 305419896");
}

TEST(ExitTest, IoInReadsAllOnes) {
  FakeRun f;
  MakeIo(f, KVM_EXIT_IO_IN, 0x60, 2, 1, 4096);
  ExitEvent e = DecodeExit(f.run(), kRunSize);
  RecordingHandler h;
  EXPECT_EQ(HandleExit(0, e, h).kind, ExitAction::kContinue);
  EXPECT_EQ(f.page[4096], 0xff);
  EXPECT_EQ(f.page[4097], 0xff);
  EXPECT_EQ(f.page[4098], 0x00);
  EXPECT_TRUE(h.calls.empty());
}

TEST(ExitTest, IoDataOutsideRunPageIsMalformed) {
  RecordingHandler h;
  for (auto [offset, size, count] : {std::tuple<uint64_t, uint8_t, uint32_t>{3 * 4096 - 2, 4, 1}, {4 * 4096, 1, 1},
                                     {4096, 4, 1000000}, {4096, 3, 1}, {4096, 1, 0}, {8, 1, 1}}) {
    FakeRun f;
    MakeIo(f, KVM_EXIT_IO_OUT, 0x504, size, count, offset);
    ExitEvent e = DecodeExit(f.run(), kRunSize);
    EXPECT_EQ(e.kind, ExitKind::kMalformed) << offset;
    ExitAction a = HandleExit(1, e, h);
    EXPECT_EQ(a.kind, ExitAction::kStop);
    EXPECT_NE(a.error.message().find("vcpu 1: malformed IO exit"), std::string::npos) << a.error.message();
  }
  EXPECT_TRUE(h.calls.empty());
}

TEST(ExitTest, HaltAndRingFullGoToHandler) {
  FakeRun f;
  RecordingHandler h;
  f.run()->exit_reason = KVM_EXIT_HLT;
  EXPECT_EQ(HandleExit(2, DecodeExit(f.run(), kRunSize), h).kind, ExitAction::kContinue);
  f.run()->exit_reason = KVM_EXIT_DIRTY_RING_FULL;
  EXPECT_EQ(DecodeExit(f.run(), kRunSize).kind, ExitKind::kDirtyRingFull);
  EXPECT_EQ(HandleExit(2, DecodeExit(f.run(), kRunSize), h).kind, ExitAction::kContinue);
  ASSERT_EQ(h.calls.size(), 2u);
  EXPECT_EQ(h.calls[0], "hlt 2");
  EXPECT_EQ(h.calls[1], "ringfull 2");
}

TEST(ExitTest, FatalExitsStopWithNamedReason) {
  RecordingHandler h;
  struct Case {
    uint32_t reason;
    const char* expect;
  };
  for (const Case& c : {Case{KVM_EXIT_SHUTDOWN, "SHUTDOWN"}, Case{KVM_EXIT_FAIL_ENTRY, "FAIL_ENTRY"},
                        Case{KVM_EXIT_INTERNAL_ERROR, "INTERNAL_ERROR (suberror 1"},
                        Case{KVM_EXIT_MMIO, "MMIO write gpa 0xfee00000"}, Case{999, "unknown exit reason 999"}}) {
    FakeRun f;
    f.run()->exit_reason = c.reason;
    f.run()->fail_entry.hardware_entry_failure_reason = 0x21;
    if (c.reason == KVM_EXIT_INTERNAL_ERROR) f.run()->internal.suberror = KVM_INTERNAL_ERROR_EMULATION;
    if (c.reason == KVM_EXIT_MMIO) {
      f.run()->mmio.phys_addr = 0xfee00000;
      f.run()->mmio.len = 4;
      f.run()->mmio.is_write = 1;
    }
    ExitAction a = HandleExit(5, DecodeExit(f.run(), kRunSize), h);
    EXPECT_EQ(a.kind, ExitAction::kStop);
    EXPECT_NE(a.error.message().find("vcpu 5: "), std::string::npos);
    EXPECT_NE(a.error.message().find(c.expect), std::string::npos) << a.error.message();
  }
  EXPECT_TRUE(h.calls.empty());
}

TEST(ExitTest, IntrIsNotAnError) {
  FakeRun f;
  f.run()->exit_reason = KVM_EXIT_INTR;
  RecordingHandler h;
  EXPECT_EQ(HandleExit(0, DecodeExit(f.run(), kRunSize), h).kind, ExitAction::kContinue);
}

}  // namespace
}  // namespace pmlmig::vmm
