// The direct data path (proto/migration.proto, "Direct data streams"): page
// batches on plain TCP connections of their own, beside the gRPC calls, so
// that bulk data pays neither HTTP/2 framing nor gRPC's threads. The
// receiver offers it in SetupReply (a port and a per-session key) when the
// sender asks for it in Setup and the session is not under TLS; the sender
// then opens one connection per stream instead of the Pages calls. Nothing
// else changes: the same PageBatch header and payload, the same checks
// (receiver_checks.h, BatchApplier), the same acks, the same Final totals.
//
// On the connection, all integers little-endian:
//   sender -> receiver
//     hello  "PMLMIGD1", u32 version (1), u32 stream, u64 session, 16 bytes key
//     batch  u32 header_len (1..1 MiB), u32 payload_len (0..4 MiB),
//            header_len bytes of PageBatch without its payload, the payload
//     end    u32 0, u32 0 (the sender's half-close: every batch is sent)
//   receiver -> sender, 16-byte replies
//     ack    u32 1, u32 pages, u64 sequence
//     end    u32 2, u32 0, u64 batches (every batch applied; the stream's OK)
//     error  u32 3, u32 code (pmlmig::Code), u64 length (<= 4096), the message
//
// This header holds the codec and the socket helpers both ends use; the
// sender is direct_stream.h, the receiver direct_receiver.h. No gRPC.
#pragma once

#include <functional>
#include <span>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::transport::direct {

inline constexpr uint32_t kVersion = 1;
inline constexpr char kMagic[8] = {'P', 'M', 'L', 'M', 'I', 'G', 'D', '1'};
inline constexpr size_t kKeyBytes = 16;
inline constexpr size_t kHelloBytes = 8 + 4 + 4 + 8 + kKeyBytes;
inline constexpr size_t kFrameBytes = 8;   // a batch's or the end's prefix
inline constexpr size_t kReplyBytes = 16;  // every reply's fixed part
inline constexpr uint32_t kMaxHeaderBytes = 1 << 20;
inline constexpr uint64_t kMaxErrorBytes = 4096;

using Key = std::array<uint8_t, kKeyBytes>;

struct Hello {
  uint32_t version = kVersion;
  uint32_t stream = 0;
  uint64_t session_id = 0;
  Key key{};
};
std::array<uint8_t, kHelloBytes> EncodeHello(const Hello& h);
// Checks the magic; the version, session, stream and key are the caller's.
Result<Hello> DecodeHello(std::span<const uint8_t, kHelloBytes> bytes);

enum class ReplyKind : uint32_t { kAck = 1, kEnd = 2, kError = 3 };
struct Reply {
  ReplyKind kind = ReplyKind::kAck;
  uint32_t a = 0;  // ack: pages; error: the code
  uint64_t b = 0;  // ack: sequence; end: batches; error: the message's length
};
std::array<uint8_t, kReplyBytes> EncodeReply(const Reply& r);
// Checks the kind and an error's length.
Result<Reply> DecodeReply(std::span<const uint8_t, kReplyBytes> bytes);

void PutU32(uint8_t* p, uint32_t v);
void PutU64(uint8_t* p, uint64_t v);
uint32_t GetU32(const uint8_t* p);
uint64_t GetU64(const uint8_t* p);

// A fresh random session key (getrandom).
Result<Key> NewKey();
bool SameKey(const Key& a, std::string_view b);  // constant time; b of any size

// Blocking socket helpers with a way out: each waits in poll() slices of at
// most 50 ms and gives up with kAborted once `stop` is set, or with
// kUnavailable at `deadline`. A peer that closes gives kUnavailable.
using Deadline = std::chrono::steady_clock::time_point;
inline constexpr Deadline kNoDeadline = Deadline::max();
Status ReadFull(int fd, uint8_t* buf, size_t n, const std::atomic<bool>& stop, Deadline deadline = kNoDeadline);
Status WriteFull(int fd, const uint8_t* buf, size_t n, const std::atomic<bool>& stop,
                 Deadline deadline = kNoDeadline);
// ReadFull into the pieces of `dest`, in order, one recvmsg for several.
// With `landed`, each read takes at most kLandingBytes and `landed` sees
// each part as it arrives (still in cache: a checksum over it costs no
// second read).
inline constexpr size_t kLandingBytes = 256 << 10;
Status ReadScattered(int fd, std::span<const std::span<uint8_t>> dest, const std::atomic<bool>& stop,
                     const std::function<void(const uint8_t*, size_t)>& landed, Deadline deadline = kNoDeadline);

// A TCP connection to host:port (every address of the host, in order, until
// one answers), TCP_NODELAY, close-on-exec, non-blocking. Fails naming the
// address.
Result<UniqueFd> Connect(const std::string& host, uint16_t port, const std::atomic<bool>& stop, Deadline deadline);
// Listening sockets on every address of host:port (SO_REUSEADDR,
// non-blocking; IPv6 ones IPv6-only when the host has IPv4 addresses too),
// all on one port: *bound (port 0 picks a free one). Addresses that cannot
// be bound are skipped while one can; fails naming the address otherwise.
Result<std::vector<UniqueFd>> Listen(const std::string& host, uint16_t port, uint16_t* bound);
// TCP_NODELAY: a reply or a frame's end never waits for the peer's delayed
// ACK (both ends).
void TuneBulkSocket(int fd);

}  // namespace pmlmig::transport::direct
