// Hardware Page-Modification-Log (PML) pages: the format, the index rules of
// Intel VMX and AMD SVM, and the drain that turns a log into dirty pages.
//
// Who calls this: an embedding hypervisor that owns the PML buffers itself
// (its own VMCS/VMCB per vCPU) and hands each log page to the engine at a
// PML-full exit or whenever the vCPU leaves guest mode. On a KVM host nobody
// here sees a PML page: KVM drains PML into the dirty ring at every VM exit
// (REFERENCE §1, §2), and the ring harvester (dirty_ring.h) is the consumer.
// The software CPU in pml_model.h also drains through this file.
//
// The log page (both vendors): 4 KiB, 512 little-endian u64 entries. Each
// entry is the guest-physical address of a page whose EPT/NPT dirty bit the
// CPU just set; bits 11:0 carry no meaning and are ignored here. Bits above
// the CPU's physical-address width are not masked: such an entry falls
// outside every memslot and is reported as an error like any other.
//
// The index (both vendors): a 16-bit field that counts down.
//   - "Empty" is 511. The CPU writes entry[index], then decrements index, so
//     entries are written 511, 510, ... 0.
//   - index <= 511: entries index+1 .. 511 are valid (none when index is 511,
//     which is why 511 means empty; 510 means one entry, in slot 511).
//   - index > 511: the log is full and all 512 entries are valid. After
//     writing entry 0 the CPU decrements 0 to 0xFFFF (16-bit wrap); any value
//     from 512 to 0xFFFF is read as full, as KVM's flush does.
//   - The next write that would log with a full index causes a PML-full exit
//     instead (VMX exit reason 62, SVM exit code 0x407), before the dirty bit
//     is set; the owner drains, resets the index to 511 and resumes, and the
//     guest's write is then logged at entry 511.
//
// VMX versus SVM (what we found and checked): Intel keeps the index in the
// VMCS field GUEST_PML_INDEX (16 bits, read with VMREAD) and the log address
// in PML_ADDRESS. AMD's PML (the series "KVM: SVM: Add Page Modification
// Logging (PML) support", Nikunj A Dadhania, RFC Aug 2025 through v5 Jan
// 2026, kvm@vger.kernel.org) keeps `u16 pml_index` at VMCB control offset
// 0x1d0 and `u64 pml_addr` at 0x1c8, enables it with nested_ctl bit 11, and
// exits with code 0x407 when full. The series states that PML_INDEX is
// initialised to 511 and that the CPU decrements it after logging each GPA,
// and it drains SVM logs with the same kvm_flush_pml_buffer() as VMX
// (index >= 512 means all 512 valid, else index+1..511; reset to 511). We
// found no difference in index semantics: both formats share one
// implementation here, and PmlFormat records which vendor's field the index
// came from (for messages, and so a future difference has one place to go).
// Differences that do not change the drain: SVM's index lives in ordinary
// VMCB memory the hypervisor reads directly, and the SVM series sets a nested
// guest's (vmcb02) pml_index to 0xFFFF with PML disabled, which reads as
// "full", so it must never be drained as a real log.
//
// What the drain must never do: write outside the DirtySet. Every entry is
// checked against the slots before a bit is set.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string_view>

#include "pmlmig/base/status.h"
#include "pmlmig/engine/dirty_set.h"

namespace pmlmig::engine {

enum class PmlFormat : uint8_t {
  kVmx,  // Intel: VMCS GUEST_PML_INDEX, PML-full exit reason 62
  kSvm,  // AMD: VMCB pml_index (offset 0x1d0), PML-full exit code 0x407
};

// "vmx" or "svm".
std::string_view PmlFormatName(PmlFormat format);

constexpr uint32_t kPmlLogEntries = 512;
// The index of the first entry the CPU writes; also the "empty" index.
constexpr uint16_t kPmlHeadIndex = kPmlLogEntries - 1;

// One hardware log page, aligned as the CPU requires.
struct alignas(4096) PmlLogPage {
  std::array<uint64_t, kPmlLogEntries> entries{};
};
static_assert(sizeof(PmlLogPage) == 4096, "a PML log is exactly one 4 KiB page");

// The index value that means "empty" for `format`: what the owner writes into
// the VMCS/VMCB after a drain.
constexpr uint16_t PmlEmptyIndex(PmlFormat /*format: the same 511 for VMX and SVM*/) { return kPmlHeadIndex; }
// Resets `index` to empty for `format`.
constexpr void ResetPmlIndex(PmlFormat format, uint16_t& index) { index = PmlEmptyIndex(format); }
// Whether `index` says the log is full (512 valid entries; the next logging
// write takes a PML-full exit).
constexpr bool PmlLogFull(PmlFormat /*format*/, uint16_t index) { return index >= kPmlLogEntries; }
// The lowest valid entry: index+1, or 0 when full. Valid entries are
// [PmlFirstValidEntry, 511]; none when this returns 512.
constexpr uint32_t PmlFirstValidEntry(PmlFormat format, uint16_t index) {
  return PmlLogFull(format, index) ? 0u : static_cast<uint32_t>(index) + 1u;
}
// How many entries `index` says are valid: 0..512.
constexpr uint32_t PmlValidEntries(PmlFormat format, uint16_t index) {
  return kPmlLogEntries - PmlFirstValidEntry(format, index);
}

// What a drain saw; filled whether or not the drain succeeded.
struct PmlDrainStats {
  uint32_t valid = 0;              // entries the index says are valid
  uint32_t marked = 0;             // of those, marked in the DirtySet
  uint32_t outside = 0;            // of those, outside every memslot: not marked
  uint64_t first_outside_gpa = 0;  // page address of the first such entry (log order)
};

// Drains the valid entries of `log` (as `index` describes them for `format`)
// into `out`, in the order the CPU wrote them (entry 511 first). Returns the
// number of entries marked.
//
// An entry outside every slot of `out` is counted, never written anywhere,
// and the rest of the log is still drained: the log is the only record of
// those writes, and the owner resets the index after the drain, so stopping
// early would lose pages that are known to be dirty (a subset is never safe).
// After the whole log, any such entry turns the result into an
// InvalidArgument error naming the first bad GPA and the counts; `stats` (if
// given) still says what was marked.
//
// Hot loop: no allocation, no lock, no virtual call per entry; at most one
// relaxed atomic OR per entry (DirtySet's contract allows concurrent marking),
// and one per bitmap word for consecutive entries in the same word. The slot
// found for one entry is tried first for the next, since guests dirty pages
// in runs.
//
// Thread-safety: the caller guarantees the CPU is not writing `log` (the vCPU
// is out of guest mode). Any thread may drain into a DirtySet that others are
// marking or taking.
Result<uint32_t> DrainPmlLog(PmlFormat format, std::span<const uint64_t, kPmlLogEntries> log, uint16_t index,
                             DirtySet& out, PmlDrainStats* stats = nullptr);

inline Result<uint32_t> DrainPmlLog(PmlFormat format, const PmlLogPage& log, uint16_t index, DirtySet& out,
                                    PmlDrainStats* stats = nullptr) {
  return DrainPmlLog(format, std::span<const uint64_t, kPmlLogEntries>(log.entries), index, out, stats);
}

}  // namespace pmlmig::engine
