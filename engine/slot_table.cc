#include "pmlmig/engine/slot_table.h"

#include <algorithm>
#include <cstdio>

#include "pmlmig/base/units.h"

namespace pmlmig::engine {

std::string DescribeSlot(const MemorySlot& s) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "slot %u (gpa 0x%llx, %s)", s.slot,
                static_cast<unsigned long long>(s.gpa), FormatBytes(s.size).c_str());
  return buf;
}

Status SlotTable::Validate(const MemorySlot& s) const {
  const std::string name = DescribeSlot(s);
  if (s.size == 0) return InvalidArgument(name + ": empty slot");
  if ((s.gpa | s.size) & (kPageSize - 1)) return InvalidArgument(name + ": gpa or size not page aligned");
  if (reinterpret_cast<uintptr_t>(s.host) & (kPageSize - 1)) {
    return InvalidArgument(name + ": host address not page aligned");
  }
  if (s.host == nullptr) return InvalidArgument(name + ": no host memory");
  if (s.gpa + s.size < s.gpa) return InvalidArgument(name + ": guest-physical range overflows");
  const auto host = reinterpret_cast<uintptr_t>(s.host);
  if (host + s.size < host) return InvalidArgument(name + ": host range overflows");
  for (const MemorySlot& o : slots_) {
    if (o.slot == s.slot) continue;  // replaced
    if (s.gpa < o.gpa_end() && o.gpa < s.gpa_end()) {
      return InvalidArgument(name + " overlaps " + DescribeSlot(o) + " in guest-physical memory");
    }
    const auto ohost = reinterpret_cast<uintptr_t>(o.host);
    if (host < ohost + o.size && ohost < host + s.size) {
      return InvalidArgument(name + " overlaps " + DescribeSlot(o) + " in host memory");
    }
  }
  return Status::Ok();
}

Status SlotTable::Set(const MemorySlot& s) {
  PMLMIG_RETURN_IF_ERROR(Validate(s));
  // A flags-only change (dirty logging on or off) updates the slot in place:
  // readers of gpa/host/size on other threads (a migration's senders) never
  // see the table move.
  for (MemorySlot& o : slots_) {
    if (o.slot == s.slot && o.gpa == s.gpa && o.size == s.size && o.host == s.host) {
      o.flags = s.flags;
      return Status::Ok();
    }
  }
  std::erase_if(slots_, [&](const MemorySlot& o) { return o.slot == s.slot; });
  auto pos = std::lower_bound(slots_.begin(), slots_.end(), s.gpa,
                              [](const MemorySlot& o, uint64_t gpa) { return o.gpa < gpa; });
  slots_.insert(pos, s);
  return Status::Ok();
}

const MemorySlot* SlotTable::FindById(uint32_t slot) const {
  for (const MemorySlot& s : slots_) {
    if (s.slot == slot) return &s;
  }
  return nullptr;
}

const MemorySlot* SlotTable::FindByGpa(uint64_t gpa) const {
  auto it = std::upper_bound(slots_.begin(), slots_.end(), gpa,
                             [](uint64_t g, const MemorySlot& o) { return g < o.gpa; });
  if (it == slots_.begin()) return nullptr;
  --it;
  return gpa < it->gpa_end() ? &*it : nullptr;
}

uint8_t* SlotTable::HostAddress(uint64_t gpa, uint64_t len) const {
  const MemorySlot* s = FindByGpa(gpa);
  if (s == nullptr || len > s->gpa_end() - gpa) return nullptr;
  return s->host + (gpa - s->gpa);
}

uint64_t SlotTable::total_bytes() const {
  uint64_t total = 0;
  for (const MemorySlot& s : slots_) total += s.size;
  return total;
}

}  // namespace pmlmig::engine
