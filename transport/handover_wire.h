// The frames of proto/handover.proto over a unix stream socket: a u32
// length, one HandoverMessage, and the descriptors a setup carries
// (SCM_RIGHTS on the frame's first byte). Plus the two checks both sides
// make of a connection: the peer's credentials and a setup's shape.
//
// Private to transport/ (it speaks protobuf); tests include it by path.
// Thread-safety: functions of one socket; Shutdown from any thread wakes a
// Receive blocked on it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "handover.pb.h"
#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::transport {

inline constexpr uint32_t kHandoverVersion = 1;
inline constexpr uint64_t kMaxHandoverFrame = (1ull << 30) + (1ull << 20);  // a 1 GiB state blob and the rest
inline constexpr size_t kMaxHandoverFds = 64;

struct HandoverFrame {
  proto::HandoverMessage message;
  std::vector<UniqueFd> fds;  // only a setup carries any
};

using Deadline = std::chrono::steady_clock::time_point;

// Sends one frame (and `fds` with it). A peer that stops reading fails it
// at `deadline`.
Status SendFrame(int sock, const proto::HandoverMessage& message, Deadline deadline, std::span<const int> fds = {});
// Receives one frame, waiting until `deadline` ("no answer within ..."
// names `what`). Errors: the peer closed the connection (kUnavailable),
// a frame that is too large, does not parse, or carries more than `max_fds`
// descriptors (kInvalidArgument; received descriptors are closed).
Result<HandoverFrame> ReceiveFrame(int sock, Deadline deadline, size_t max_fds, std::string_view what);

// The connected peer's credentials (SO_PEERCRED).
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};
Result<PeerCredentials> PeerOf(int sock);
// OK when the peer's uid is `own` or in `allowed`; else kPermissionDenied
// naming the peer ("pid 123, uid 65534").
Status CheckPeer(const PeerCredentials& peer, uid_t own, std::span<const uid_t> allowed, std::string_view role);

// The shape of a setup the receiver accepts, before a target sees it: the
// version, 1..max_regions page-aligned, non-empty, non-overlapping ranges
// with one descriptor each, every descriptor a file that holds its range,
// and 1..max_vcpus vCPUs.
Status ValidateHandoverSetup(const proto::HandoverSetup& setup, std::span<const UniqueFd> fds, uint32_t max_regions,
                             uint32_t max_vcpus);

}  // namespace pmlmig::transport
