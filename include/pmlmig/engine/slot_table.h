// SlotTable: how the engine sees guest memory. A memslot maps a page-aligned
// guest-physical range to host memory; the table is the VMM's list of them.
// The engine depends on nothing in vmm/: an embedding VMM fills a SlotTable
// from its own memory map.
//
// Thread-safety: const methods may run concurrently. Set() must not run
// concurrently with anything else, except that a change of flags alone (same
// slot, gpa, host and size) is made in place and may run while other threads
// translate addresses (they never read flags).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "pmlmig/base/status.h"

namespace pmlmig::engine {

constexpr uint64_t kPageSize = 4096;
constexpr unsigned kPageShift = 12;

struct MemorySlot {
  uint32_t slot = 0;        // KVM slot id (as_id << 16 | id)
  uint64_t gpa = 0;         // guest-physical base, page aligned
  uint8_t* host = nullptr;  // host virtual base, page aligned
  uint64_t size = 0;        // bytes, page aligned, > 0
  uint32_t flags = 0;       // KVM_MEM_* flags
  uint64_t pages() const { return size >> kPageShift; }
  uint64_t gpa_end() const { return gpa + size; }
};

// "slot 1 (gpa 0x100000000, 1 GiB)": how errors name a slot.
std::string DescribeSlot(const MemorySlot& s);

class SlotTable {
 public:
  // Whether `s` may be added or may replace the slot with the same id:
  // aligned, non-empty, no overflow, and overlapping no other slot in guest-
  // physical or host address space.
  Status Validate(const MemorySlot& s) const;
  // The one function that changes the table: Validate, then insert or
  // replace the slot with the same id. Slots stay sorted by gpa.
  Status Set(const MemorySlot& s);

  std::span<const MemorySlot> slots() const { return slots_; }
  const MemorySlot* FindById(uint32_t slot) const;
  const MemorySlot* FindByGpa(uint64_t gpa) const;
  // Host address of [gpa, gpa+len) if it lies within one slot, else nullptr.
  uint8_t* HostAddress(uint64_t gpa, uint64_t len) const;
  uint64_t total_bytes() const;

 private:
  std::vector<MemorySlot> slots_;  // sorted by gpa
};

}  // namespace pmlmig::engine
