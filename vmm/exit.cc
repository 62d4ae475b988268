#include "pmlmig/vmm/exit.h"

#include <cstdio>
#include <cstring>

namespace pmlmig::vmm {

uint64_t ExitEvent::io_value() const {
  uint64_t v = 0;
  if (data != nullptr && size <= sizeof(v)) std::memcpy(&v, data, size);  // x86: little-endian
  return v;
}

ExitEvent DecodeExit(kvm_run* run, size_t run_size) {
  ExitEvent e;
  e.reason = run->exit_reason;
  switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      e.io_out = run->io.direction == KVM_EXIT_IO_OUT;
      e.port = run->io.port;
      e.size = run->io.size;
      e.count = run->io.count;
      const uint64_t bytes = static_cast<uint64_t>(e.size) * e.count;
      const bool size_ok = e.size == 1 || e.size == 2 || e.size == 4;
      if (!size_ok || e.count == 0 || run->io.data_offset < sizeof(kvm_run) ||
          run->io.data_offset > run_size || bytes > run_size - run->io.data_offset) {
        e.kind = ExitKind::kMalformed;
        return e;
      }
      e.kind = ExitKind::kIo;
      e.data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
      return e;
    }
    case KVM_EXIT_MMIO:
      e.kind = ExitKind::kMmio;
      e.mmio_addr = run->mmio.phys_addr;
      e.mmio_len = run->mmio.len;
      e.mmio_write = run->mmio.is_write != 0;
      return e;
    case KVM_EXIT_HLT: e.kind = ExitKind::kHlt; return e;
    case KVM_EXIT_SHUTDOWN: e.kind = ExitKind::kShutdown; return e;
    case KVM_EXIT_FAIL_ENTRY:
      e.kind = ExitKind::kFailEntry;
      e.hw_reason = run->fail_entry.hardware_entry_failure_reason;
      return e;
    case KVM_EXIT_INTERNAL_ERROR:
      e.kind = ExitKind::kInternalError;
      e.suberror = run->internal.suberror;
      return e;
    case KVM_EXIT_DIRTY_RING_FULL: e.kind = ExitKind::kDirtyRingFull; return e;
    case KVM_EXIT_INTR: e.kind = ExitKind::kIntr; return e;
    case KVM_EXIT_SYSTEM_EVENT:
      e.kind = ExitKind::kSystemEvent;
      e.suberror = run->system_event.type;
      return e;
    default: e.kind = ExitKind::kUnknown; return e;
  }
}

std::string DescribeExit(const ExitEvent& e) {
  char buf[160];
  switch (e.kind) {
    case ExitKind::kIo:
      std::snprintf(buf, sizeof buf, "IO %s port 0x%x size %u count %u", e.io_out ? "out" : "in",
                    e.port, e.size, e.count);
      return buf;
    case ExitKind::kMmio:
      std::snprintf(buf, sizeof buf, "MMIO %s gpa 0x%llx len %u", e.mmio_write ? "write" : "read",
                    static_cast<unsigned long long>(e.mmio_addr), e.mmio_len);
      return buf;
    case ExitKind::kHlt: return "HLT";
    case ExitKind::kShutdown: return "SHUTDOWN (triple fault)";
    case ExitKind::kFailEntry:
      std::snprintf(buf, sizeof buf, "FAIL_ENTRY (hardware entry failure reason 0x%llx)",
                    static_cast<unsigned long long>(e.hw_reason));
      return buf;
    case ExitKind::kInternalError:
      std::snprintf(buf, sizeof buf, "INTERNAL_ERROR (suberror %u%s)", e.suberror,
                    e.suberror == KVM_INTERNAL_ERROR_EMULATION ? ": instruction emulation failed" : "");
      return buf;
    case ExitKind::kDirtyRingFull: return "DIRTY_RING_FULL";
    case ExitKind::kIntr: return "INTR";
    case ExitKind::kSystemEvent:
      std::snprintf(buf, sizeof buf, "SYSTEM_EVENT (type %u)", e.suberror);
      return buf;
    case ExitKind::kMalformed:
      std::snprintf(buf, sizeof buf, "malformed IO exit (port 0x%x size %u count %u, data outside the run page)",
                    e.port, e.size, e.count);
      return buf;
    case ExitKind::kUnknown: break;
  }
  std::snprintf(buf, sizeof buf, "unknown exit reason %u", e.reason);
  return buf;
}

ExitAction HandleExit(uint32_t vcpu, const ExitEvent& e, ExitHandler& handler) {
  auto stop = [&](Code code) {
    return ExitAction::Stop(Status(code, "vcpu " + std::to_string(vcpu) + ": " + DescribeExit(e)));
  };
  switch (e.kind) {
    case ExitKind::kIo:
      if (!e.io_out) {
        std::memset(e.data, 0xff, static_cast<size_t>(e.size) * e.count);
        return ExitAction::Continue();
      }
      if (e.count != 1) return stop(Code::kInternal);  // string I/O: the test guest never does it
      return handler.OnPortOut(vcpu, e.port, e.size, e.io_value());
    case ExitKind::kHlt: return handler.OnHalt(vcpu);
    case ExitKind::kDirtyRingFull: return handler.OnDirtyRingFull(vcpu);
    case ExitKind::kIntr: return ExitAction::Continue();
    case ExitKind::kMmio:
    case ExitKind::kShutdown:
    case ExitKind::kFailEntry:
    case ExitKind::kInternalError:
    case ExitKind::kSystemEvent:
    case ExitKind::kMalformed:
    case ExitKind::kUnknown:
      return stop(Code::kInternal);
  }
  return stop(Code::kInternal);
}

}  // namespace pmlmig::vmm
