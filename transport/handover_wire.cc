#include "handover_wire.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "pmlmig/base/units.h"

namespace pmlmig::transport {
namespace {

// Waits until `sock` is ready for `events` or the deadline passes.
Status WaitFor(int sock, short events, Deadline deadline, std::string_view what) {
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Unavailable(std::string(what) + ": no answer in time");
    pollfd p{sock, events, 0};
    const int n = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 1000)));
    if (n < 0 && errno != EINTR) return Status::FromErrno(errno, "poll the handover socket");
    if (n > 0) return Status::Ok();  // ready, or an error / hang-up the next call reports
  }
}

Status Closed(std::string_view what) {
  return Unavailable(std::string(what) + ": the peer closed the connection");
}

// Reads exactly `len` bytes; the first read also takes descriptors.
Status ReadAll(int sock, uint8_t* out, size_t len, Deadline deadline, std::string_view what, size_t max_fds,
               std::vector<UniqueFd>* fds) {
  size_t got = 0;
  while (got < len) {
    PMLMIG_RETURN_IF_ERROR(WaitFor(sock, POLLIN, deadline, what));
    iovec iov{out + got, len - got};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxHandoverFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n < 0) return Status::FromErrno(errno, std::string(what) + ": read the handover socket");
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        fds->emplace_back(fd);  // owned (and closed) from here, whatever follows
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) != 0 || fds->size() > max_fds) {
      return InvalidArgument(std::string(what) + ": the message carries more file descriptors than the " +
                             std::to_string(max_fds) + " allowed");
    }
    if (n == 0) return Closed(what);
    got += static_cast<size_t>(n);
  }
  return Status::Ok();
}

}  // namespace

Status SendFrame(int sock, const proto::HandoverMessage& message, Deadline deadline, std::span<const int> fds) {
  std::string bytes;
  if (!message.SerializeToString(&bytes)) return Internal("handover: cannot encode a message");
  if (bytes.size() > kMaxHandoverFrame) return InvalidArgument("handover: message of " + FormatBytes(bytes.size()) + " is too large");
  if (fds.size() > kMaxHandoverFds) return InvalidArgument("handover: too many memory files");
  const uint32_t len = static_cast<uint32_t>(bytes.size());
  uint8_t header[4] = {uint8_t(len), uint8_t(len >> 8), uint8_t(len >> 16), uint8_t(len >> 24)};
  bytes.insert(0, reinterpret_cast<const char*>(header), sizeof header);
  size_t sent = 0;
  while (sent < bytes.size()) {
    PMLMIG_RETURN_IF_ERROR(WaitFor(sock, POLLOUT, deadline, "handover: send"));
    iovec iov{bytes.data() + sent, bytes.size() - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxHandoverFds)] = {};
    if (sent == 0 && !fds.empty()) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) return Closed("handover: send");
    if (n < 0) return Status::FromErrno(errno, "handover: write the socket");
    sent += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Result<HandoverFrame> ReceiveFrame(int sock, Deadline deadline, size_t max_fds, std::string_view what) {
  HandoverFrame frame;
  uint8_t header[4];
  PMLMIG_RETURN_IF_ERROR(ReadAll(sock, header, sizeof header, deadline, what, max_fds, &frame.fds));
  const uint32_t len = header[0] | (header[1] << 8) | (header[2] << 16) | (uint32_t(header[3]) << 24);
  if (len > kMaxHandoverFrame) {
    return InvalidArgument(std::string(what) + ": a message of " + FormatBytes(len) + " is larger than the " +
                           FormatBytes(kMaxHandoverFrame) + " allowed");
  }
  // Grown as bytes arrive, so a length alone allocates nothing.
  std::string bytes;
  constexpr size_t kStep = 16u << 20;
  while (bytes.size() < len) {
    const size_t at = bytes.size();
    bytes.resize(std::min<size_t>(len, at + kStep));
    PMLMIG_RETURN_IF_ERROR(ReadAll(sock, reinterpret_cast<uint8_t*>(bytes.data()) + at, bytes.size() - at, deadline,
                                   what, max_fds, &frame.fds));
  }
  if (!frame.message.ParseFromString(bytes)) {
    return InvalidArgument(std::string(what) + ": a message that is not a handover message");
  }
  return frame;
}

Result<PeerCredentials> PeerOf(int sock) {
  ucred c{};
  socklen_t len = sizeof c;
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &c, &len) != 0) {
    return Status::FromErrno(errno, "read the peer's credentials (SO_PEERCRED)");
  }
  return PeerCredentials{c.pid, c.uid, c.gid};
}

Status CheckPeer(const PeerCredentials& peer, uid_t own, std::span<const uid_t> allowed, std::string_view role) {
  if (peer.uid == own || std::find(allowed.begin(), allowed.end(), peer.uid) != allowed.end()) return Status::Ok();
  return PermissionDenied("refused a handover " + std::string(role) + ": pid " + std::to_string(peer.pid) + ", uid " +
                          std::to_string(peer.uid) + " is not allowed (this process runs as uid " +
                          std::to_string(own) + ")");
}

Status ValidateHandoverSetup(const proto::HandoverSetup& setup, std::span<const UniqueFd> fds, uint32_t max_regions,
                             uint32_t max_vcpus) {
  if (setup.version() != kHandoverVersion) {
    return InvalidArgument("handover version " + std::to_string(setup.version()) + ", this receiver speaks " +
                           std::to_string(kHandoverVersion));
  }
  if (setup.vm_description().size() > (1u << 20)) return InvalidArgument("setup: VM description larger than 1 MiB");
  if (setup.vcpus() == 0 || setup.vcpus() > max_vcpus) {
    return InvalidArgument("setup: " + std::to_string(setup.vcpus()) + " vCPUs, this receiver takes 1.." +
                           std::to_string(max_vcpus));
  }
  const int n = setup.regions_size();
  if (n == 0 || static_cast<uint32_t>(n) > max_regions) {
    return InvalidArgument("setup: " + std::to_string(n) + " memory ranges, this receiver takes 1.." +
                           std::to_string(max_regions));
  }
  if (fds.size() != static_cast<size_t>(n)) {
    return InvalidArgument("setup: " + std::to_string(fds.size()) + " memory files for " + std::to_string(n) +
                           " memory ranges");
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (int i = 0; i < n; ++i) {
    const proto::HandoverRegion& r = setup.regions(i);
    const std::string name = "setup: memory range " + std::to_string(i) + " (slot " + std::to_string(r.slot()) + ")";
    constexpr uint64_t kPage = 4096;
    if (r.size() == 0 || r.size() % kPage != 0 || r.gpa() % kPage != 0 || r.file_offset() % kPage != 0 ||
        r.gpa() + r.size() < r.gpa() || r.file_offset() + r.size() < r.file_offset()) {
      return InvalidArgument(name + ": not page-aligned, empty or wrapping around");
    }
    struct stat st{};
    if (::fstat(fds[static_cast<size_t>(i)].get(), &st) != 0) return Status::FromErrno(errno, name + ": fstat");
    if (!S_ISREG(st.st_mode)) return InvalidArgument(name + ": its descriptor is not a memory file");
    if (static_cast<uint64_t>(st.st_size) < r.file_offset() + r.size()) {
      return InvalidArgument(name + ": its file holds " + FormatBytes(static_cast<uint64_t>(st.st_size)) +
                             ", the range ends at byte " + std::to_string(r.file_offset() + r.size()));
    }
    ranges.emplace_back(r.gpa(), r.gpa() + r.size());
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return InvalidArgument("setup: memory ranges overlap");
  }
  return Status::Ok();
}

}  // namespace pmlmig::transport
