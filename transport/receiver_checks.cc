#include "receiver_checks.h"

#include <algorithm>
#include <cinttypes>
#include <string>
#include <utility>
#include <vector>

#include "batch_codec.h"
#include "pmlmig/base/units.h"

namespace pmlmig::transport {
namespace {

}  // namespace

Status ValidateSetup(const proto::Setup& s, const ReceiverLimits& limits) {
  if (s.vm_description().size() > kMaxVmDescriptionBytes) {
    return InvalidArgument("Setup.vm_description: " + std::to_string(s.vm_description().size()) +
                           " bytes, more than " + std::to_string(kMaxVmDescriptionBytes));
  }
  if (s.memory_size() == 0 || s.memory_size() > kMaxMemoryRanges) {
    return InvalidArgument("Setup.memory: " + std::to_string(s.memory_size()) + " ranges, expected 1.." +
                           std::to_string(kMaxMemoryRanges));
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  uint64_t total = 0;
  for (int i = 0; i < s.memory_size(); ++i) {
    const proto::MemoryRange& r = s.memory(i);
    const std::string name = "Setup.memory[" + std::to_string(i) + "] (slot " + std::to_string(r.slot()) +
                             ", gpa " + FormatHex(r.gpa()) + ", size " + FormatHex(r.size()) + ")";
    if (r.size() == 0) return InvalidArgument(name + ": empty");
    if (((r.gpa() | r.size()) & (engine::kPageSize - 1)) != 0) return InvalidArgument(name + ": not page aligned");
    if (r.gpa() + r.size() < r.gpa()) return InvalidArgument(name + ": overflows the address space");
    for (int j = 0; j < i; ++j) {
      if (s.memory(j).slot() == r.slot()) return InvalidArgument(name + ": slot id used twice");
    }
    total += r.size();
    if (total < r.size() || total > limits.max_memory_bytes) {
      return ResourceExhausted("Setup.memory: more than the " + FormatBytes(limits.max_memory_bytes) +
                               " of guest memory this receiver accepts (its memory limit)");
    }
    ranges.emplace_back(r.gpa(), r.gpa() + r.size());
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return InvalidArgument("Setup.memory: ranges at gpa " + FormatHex(ranges[i - 1].first) + " and " +
                             FormatHex(ranges[i].first) + " overlap");
    }
  }
  if (s.vcpus() == 0 || s.vcpus() > limits.max_vcpus) {
    return InvalidArgument("Setup.vcpus: " + std::to_string(s.vcpus()) + " is outside 1.." +
                           std::to_string(limits.max_vcpus));
  }
  if (!proto::VerifyOrder_IsValid(s.verify_order())) {
    return InvalidArgument("Setup.verify_order: unknown value " + std::to_string(s.verify_order()));
  }
  if (!proto::BatchChecksum_IsValid(s.checksum())) {
    return InvalidArgument("Setup.checksum: unknown value " + std::to_string(s.checksum()));
  }
  const uint32_t max_streams = std::min(limits.max_streams, kMaxStreams);
  if (s.streams() == 0 || s.streams() > max_streams) {
    return InvalidArgument("Setup.streams: " + std::to_string(s.streams()) + " is outside 1.." +
                           std::to_string(max_streams));
  }
  return Status::Ok();
}

Status ValidateFinalShape(const proto::Final& f, uint32_t streams) {
  if (f.vm_state().size() > kMaxVmStateBytes) {
    return InvalidArgument("Final.vm_state: " + std::to_string(f.vm_state().size()) + " bytes, more than " +
                           std::to_string(kMaxVmStateBytes));
  }
  if (f.chunk_digests_size() > static_cast<int>(kMaxChunkDigests)) {
    return InvalidArgument("Final.chunk_digests: " + std::to_string(f.chunk_digests_size()) + ", more than " +
                           std::to_string(kMaxChunkDigests));
  }
  if (f.streams_size() != static_cast<int>(streams)) {
    return InvalidArgument("Final: totals for " + std::to_string(f.streams_size()) + " streams, the migration has " +
                           std::to_string(streams));
  }
  for (int i = 0; i < f.streams_size(); ++i) {
    if (f.streams(i).stream() != static_cast<uint32_t>(i)) {
      return InvalidArgument("Final: totals[" + std::to_string(i) + "] name stream " +
                             std::to_string(f.streams(i).stream()) + " (expected streams in order 0.." +
                             std::to_string(streams - 1) + ")");
    }
  }
  return Status::Ok();
}

Status AdmitBatch(uint64_t session_id, uint32_t index, const StreamCursor& cursor, const proto::PageBatch& b) {
  const std::string name = "stream " + std::to_string(index) + ": batch " + std::to_string(b.sequence());
  if (b.session_id() != session_id || b.stream() != index) {
    return InvalidArgument(name + " names session " + FormatHex(b.session_id()) + " stream " + std::to_string(b.stream()) +
                           "; this call carries session " + FormatHex(session_id) + " stream " + std::to_string(index));
  }
  if (b.sequence() != cursor.next_sequence) {
    return InvalidArgument(name + ": expected batch " + std::to_string(cursor.next_sequence) +
                           " (a batch is missing or repeated)");
  }
  if (b.round() < cursor.last_round) {
    return InvalidArgument(name + ": round " + std::to_string(b.round()) + " after round " +
                           std::to_string(cursor.last_round));
  }
  return Status::Ok();
}

}  // namespace pmlmig::transport
