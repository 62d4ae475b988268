// libFuzzer target for the receiver's message handling: the pure checks the
// MigrationServer runs on what a (possibly hostile) sender sends. No gRPC
// here: the bytes go straight into the functions the server calls.
//
// The first input byte chooses what the rest is:
//   even: a serialized ControlRequest. A Setup goes to ValidateSetup, a
//         Final to ValidateFinalShape (for (byte0 >> 1) & 127 streams);
//         each verdict is checked against an independent statement of the
//         limits in proto/migration.proto.
//   odd:  a PageBatch as it arrives on a Pages stream, split into 1..3
//         chunks (like gRPC slices; each chunk its own heap block, so ASan
//         sees any read past one) as byte0 says (see Cuts). With bit 1 of
//         byte0 set, the harness first recomputes the batch's checksum from
//         its contents, as any sender can: so the fuzzer reaches the write
//         path with batches of its own making. DecodeBatch, then
//         AdmitBatch against a fixed cursor, then BatchApplier::Apply (even
//         when admission refused it: the codec must be safe on anything)
//         into a small guest memory of three slots, each between PROT_NONE
//         guard pages, so a write outside a slot faults. Checked after:
//           - a rejected batch wrote nothing (memory compared byte for byte);
//           - an accepted one obeys every limit, and memory is exactly the
//             old contents with its runs applied in order (its payload
//             decompressed here independently), so nothing was written
//             outside its runs;
//           - DecodeBatch agrees with protobuf's own parse of the whole
//             message, and applying that parse (one payload piece) gives
//             the same verdict as applying the chunks.
//           - read in place (BatchApplier::PlanInPlace, FinishInPlace, as
//             a direct stream does), the batch gets Apply's verdict and, if
//             accepted, the same memory.
// One BatchApplier lives across inputs, as one does per Pages stream.
//
//   receiver_fuzz --make-corpus DIR   writes the seed corpus (valid Setups,
//                                     Finals, batches with none/lz4/zstd
//                                     compression and zero runs) and exits.
#include <lz4.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "batch_codec.h"
#include "receiver_checks.h"
#include "migration.pb.h"

namespace pmlmig::transport {
namespace {

using engine::kPageSize;

constexpr uint64_t kSession = 0x5eed5eed5eed5eedull;
constexpr uint32_t kStream = 0;
constexpr uint64_t kHighGpa = 4ull << 30;

// Failed invariant: abort with a message libFuzzer reports as a crash.
[[noreturn]] void Fail(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "receiver_fuzz: invariant violated: %s%s%s\n", what, detail.empty() ? "" : ": ",
               detail.c_str());
  std::abort();
}
#define FUZZ_CHECK(cond, ...) \
  do {                        \
    if (!(cond)) Fail(#cond, ##__VA_ARGS__); \
  } while (0)

// RECEIVER_FUZZ_VERBOSE=1: say what became of each input (to read a
// reproducer's story).
bool Verbose() {
  static const bool v = std::getenv("RECEIVER_FUZZ_VERBOSE") != nullptr;
  return v;
}

// ------------------------------------------------------------- guest memory

struct SlotSpec {
  uint32_t slot;
  uint64_t gpa;
  uint64_t pages;
};
// Slots 0 and 1 are adjacent in guest-physical space (a run crossing from
// one into the other must be refused), slot 2 is far above them. In host
// memory every slot sits between guard pages.
constexpr SlotSpec kSlots[] = {{0, 0, 8}, {1, 8 * kPageSize, 4}, {2, kHighGpa, 2}};

struct GuestMemory {
  engine::SlotTable table;
  std::vector<uint8_t*> hosts;  // per kSlots entry
  std::vector<uint8_t> pattern; // the contents every input starts from, slots concatenated

  GuestMemory() {
    uint64_t total = 1;  // leading guard page
    for (const SlotSpec& s : kSlots) total += s.pages + 1;
    auto* base = static_cast<uint8_t*>(
        mmap(nullptr, total * kPageSize, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (base == MAP_FAILED) Fail("mmap guest memory");
    uint8_t* p = base + kPageSize;
    for (const SlotSpec& s : kSlots) {
      if (mprotect(p, s.pages * kPageSize, PROT_READ | PROT_WRITE) != 0) Fail("mprotect guest memory");
      engine::MemorySlot m;
      m.slot = s.slot;
      m.gpa = s.gpa;
      m.host = p;
      m.size = s.pages * kPageSize;
      if (!table.Set(m).ok()) Fail("SlotTable::Set");
      hosts.push_back(p);
      p += (s.pages + 1) * kPageSize;
    }
    // Non-zero everywhere but one zero page per slot (the last), so zero
    // runs both clear pages and skip pages that are already zero.
    uint64_t x = 0x1234;
    for (const SlotSpec& s : kSlots) {
      for (uint64_t i = 0; i < s.pages * kPageSize; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        pattern.push_back(i >= (s.pages - 1) * kPageSize ? 0 : static_cast<uint8_t>((x >> 33) | 1));
      }
    }
  }
  void Reset() {
    size_t off = 0;
    for (size_t i = 0; i < hosts.size(); ++i) {
      const size_t len = kSlots[i].pages * kPageSize;
      std::memcpy(hosts[i], pattern.data() + off, len);
      off += len;
    }
  }
  std::vector<uint8_t> Snapshot() const {
    std::vector<uint8_t> out;
    for (size_t i = 0; i < hosts.size(); ++i) out.insert(out.end(), hosts[i], hosts[i] + kSlots[i].pages * kPageSize);
    return out;
  }
  // Offset into a Snapshot() of [gpa, gpa+len) if it lies inside one slot;
  // -1 otherwise. Written independently of SlotTable::HostAddress.
  int64_t Offset(uint64_t gpa, uint64_t len) const {
    uint64_t off = 0;
    for (const SlotSpec& s : kSlots) {
      const unsigned __int128 end = static_cast<unsigned __int128>(gpa) + len;
      if (gpa >= s.gpa && end <= static_cast<unsigned __int128>(s.gpa) + s.pages * kPageSize) {
        return static_cast<int64_t>(off + (gpa - s.gpa));
      }
      off += s.pages * kPageSize;
    }
    return -1;
  }
};

GuestMemory& Memory() {
  static GuestMemory* m = new GuestMemory();
  return *m;
}

BatchApplier& Applier() {
  static BatchApplier* a = new BatchApplier();  // one per stream, reused
  return *a;
}

// ------------------------------------------------------------- control

bool SetupIsValid(const proto::Setup& s, const ReceiverLimits& l) {
  if (s.vm_description().size() > (1u << 20)) return false;
  if (s.memory_size() < 1 || s.memory_size() > 256) return false;
  unsigned __int128 total = 0;
  for (int i = 0; i < s.memory_size(); ++i) {
    const proto::MemoryRange& r = s.memory(i);
    if (r.size() == 0 || r.gpa() % kPageSize != 0 || r.size() % kPageSize != 0) return false;
    // gpa_end must be representable: a range may not reach 2^64.
    if (static_cast<unsigned __int128>(r.gpa()) + r.size() >= (static_cast<unsigned __int128>(1) << 64)) return false;
    total += r.size();
    for (int j = 0; j < i; ++j) {
      const proto::MemoryRange& q = s.memory(j);
      if (q.slot() == r.slot()) return false;
      const unsigned __int128 r_end = static_cast<unsigned __int128>(r.gpa()) + r.size();
      const unsigned __int128 q_end = static_cast<unsigned __int128>(q.gpa()) + q.size();
      if (r.gpa() < q_end && q.gpa() < r_end) return false;
    }
  }
  if (total > l.max_memory_bytes) return false;
  if (s.vcpus() < 1 || s.vcpus() > l.max_vcpus) return false;
  if (s.verify_order() != proto::VERIFY_BEFORE_COMMIT && s.verify_order() != proto::VERIFY_AFTER_COMMIT) return false;
  if (s.checksum() != proto::BATCH_CHECKSUM_XXH64 && s.checksum() != proto::BATCH_CHECKSUM_XXH3) return false;
  const uint32_t max_streams = l.max_streams < 64 ? l.max_streams : 64;
  return s.streams() >= 1 && s.streams() <= max_streams;
}

void FuzzControl(uint8_t selector, const uint8_t* data, size_t size) {
  proto::ControlRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return;
  if (req.has_setup()) {
    // Two receivers: one with room for the fuzz memory, one with 1 TiB and
    // smaller vCPU/stream limits.
    const ReceiverLimits limits[] = {{1ull << 30, 1024, 64}, {1ull << 40, 8, 4}};
    const ReceiverLimits& l = limits[(selector >> 1) & 1];
    const Status s = ValidateSetup(req.setup(), l);
    if (Verbose()) std::fprintf(stderr, "receiver_fuzz: Setup: %s\n", s.ok() ? "ok" : s.message().c_str());
    FUZZ_CHECK(s.ok() == SetupIsValid(req.setup(), l), s.ok() ? "accepted" : s.message());
    FUZZ_CHECK(s.ok() || !s.message().empty());
  }
  if (req.has_final()) {
    const uint32_t streams = (selector >> 1) & 127;
    const proto::Final& f = req.final();
    const Status s = ValidateFinalShape(f, streams);
    if (Verbose()) std::fprintf(stderr, "receiver_fuzz: Final: %s\n", s.ok() ? "ok" : s.message().c_str());
    bool valid = f.vm_state().size() <= (8u << 20) && f.streams_size() == static_cast<int>(streams) &&
                 f.chunk_digests_size() <= 65536 + 256;
    for (int i = 0; valid && i < f.streams_size(); ++i) valid = f.streams(i).stream() == static_cast<uint32_t>(i);
    FUZZ_CHECK(s.ok() == valid, s.ok() ? "accepted" : s.message());
    FUZZ_CHECK(s.ok() || !s.message().empty());
  }
}

// ------------------------------------------------------------- batches

// The selector of a batch input: bit 0 set (a batch), bit 1 reseal, bit 2
// the cursor after round 2, bits 3-4 the chunks (0 and 1: one; 2: two; 3:
// three), bits 5-6 where the first cut is (a quarter of the bytes per step),
// bit 7 where the second is (a third or two thirds of the rest).
constexpr uint8_t kReseal = 0x02;
constexpr uint8_t kLaterCursor = 0x04;

// Splits `n` bytes into chunks as `selector` says (cuts may be at the very
// start or end: gRPC never sends empty slices, the decoder copes).
std::vector<size_t> Cuts(uint8_t selector, size_t n) {
  const unsigned c = (selector >> 3) & 3;
  const unsigned chunks = c < 2 ? 1 : c;
  const unsigned a = (selector >> 5) & 3, b = (selector >> 7) & 1;
  std::vector<size_t> cuts;
  if (chunks >= 2) cuts.push_back(n * a / 4);
  if (chunks == 3) cuts.push_back(cuts[0] + (n - cuts[0]) * (1 + b) / 3);
  return cuts;
}

// The data pages of an accepted batch, decompressed here independently.
bool Unpack(const proto::PageBatch& b, const std::string& payload, std::string* out) {
  const size_t len = b.uncompressed_length();
  if (len > kMaxBatchPayload) return false;
  switch (b.compression()) {
    case proto::COMPRESSION_NONE: *out = payload; return true;
    case proto::COMPRESSION_LZ4: {
      out->assign(len, '\0');
      const int r = LZ4_decompress_safe(payload.data(), out->data(), static_cast<int>(payload.size()),
                                        static_cast<int>(len));
      return r >= 0 && static_cast<size_t>(r) == len;
    }
    case proto::COMPRESSION_ZSTD: {
      out->assign(len, '\0');
      const size_t r = ZSTD_decompress(out->data(), len, payload.data(), payload.size());
      return !ZSTD_isError(r) && r == len;
    }
    default: return false;
  }
}

// An accepted batch must satisfy every limit, and memory must be `before`
// with its runs applied in order.
void CheckAccepted(const proto::PageBatch& b, const std::string& payload, const ApplyResult& r,
                   const std::vector<uint8_t>& before, const std::vector<uint8_t>& after) {
  GuestMemory& mem = Memory();
  FUZZ_CHECK(b.runs_size() >= 1);
  uint64_t pages = 0, data_pages = 0, zero_pages = 0;
  for (const proto::PageRun& run : b.runs()) {
    FUZZ_CHECK(run.pages() >= 1);
    FUZZ_CHECK(run.gpa() % kPageSize == 0);
    FUZZ_CHECK(run.flags() == proto::PAGE_RUN_DATA || run.flags() == proto::PAGE_RUN_ZERO);
    FUZZ_CHECK(mem.Offset(run.gpa(), uint64_t{run.pages()} * kPageSize) >= 0, "run outside one slot");
    pages += run.pages();
    (run.flags() == proto::PAGE_RUN_DATA ? data_pages : zero_pages) += run.pages();
  }
  FUZZ_CHECK(pages <= kMaxBatchPages);
  FUZZ_CHECK(r.normal_pages == data_pages && r.zero_pages == zero_pages);
  FUZZ_CHECK(b.uncompressed_length() == data_pages * kPageSize);
  FUZZ_CHECK(payload.size() <= b.uncompressed_length() || b.compression() == proto::COMPRESSION_NONE);
  std::string data;
  FUZZ_CHECK(Unpack(b, payload, &data), "accepted payload does not decompress to uncompressed_length");
  FUZZ_CHECK(data.size() == data_pages * kPageSize);
  FUZZ_CHECK(BatchChecksum(b, XXH64(data.data(), data.size(), 0)) == b.checksum());
  std::vector<uint8_t> expect = before;
  size_t off = 0;
  for (const proto::PageRun& run : b.runs()) {
    const uint64_t len = uint64_t{run.pages()} * kPageSize;
    uint8_t* dst = expect.data() + mem.Offset(run.gpa(), len);
    if (run.flags() == proto::PAGE_RUN_DATA) {
      std::memcpy(dst, data.data() + off, len);
      off += len;
    } else {
      std::memset(dst, 0, len);
    }
  }
  FUZZ_CHECK(after == expect, "memory after an accepted batch is not its runs applied in order");
}

void FuzzBatch(uint8_t selector, const uint8_t* data, size_t size) {
  // The wire bytes in 1..3 separately allocated chunks.
  const std::vector<size_t> cuts = Cuts(selector, size);
  std::vector<std::vector<uint8_t>> owned;
  size_t from = 0;
  for (size_t i = 0; i <= cuts.size(); ++i) {
    const size_t to = i < cuts.size() ? cuts[i] : size;
    owned.emplace_back(data + from, data + to);
    owned.back().shrink_to_fit();
    from = to;
  }
  ChunkList wire;
  for (const auto& c : owned) wire.emplace_back(c.data(), c.size());

  proto::PageBatch header;
  ChunkList payload;
  const Status decoded = DecodeBatch(wire, &header, &payload);
  if (!decoded.ok()) {
    if (Verbose()) std::fprintf(stderr, "receiver_fuzz: decode: %s\n", decoded.message().c_str());
    FUZZ_CHECK(!decoded.message().empty());
    return;
  }
  std::string joined;
  for (const auto& c : payload) {
    // Every payload piece must lie inside one input chunk.
    bool inside = false;
    for (const auto& w : wire) {
      inside |= c.empty() || (c.data() >= w.data() && c.data() + c.size() <= w.data() + w.size());
    }
    FUZZ_CHECK(inside, "payload piece outside the input chunks");
    joined.append(reinterpret_cast<const char*>(c.data()), c.size());
  }
  FUZZ_CHECK(header.payload().empty(), "DecodeBatch left a payload in the header");
  FUZZ_CHECK(joined.size() <= kMaxBatchPayload);

  // A sender that checksums whatever it sends.
  if ((selector & kReseal) != 0) {
    std::string contents;
    if (Unpack(header, joined, &contents)) {
      header.set_checksum(BatchChecksum(header, XXH64(contents.data(), contents.size(), 0)));
    }
  }

  // Differential: protobuf's parse of the whole message, where it accepts
  // it, must see the same fields and payload.
  proto::PageBatch full;
  const bool parsed = full.ParseFromArray(data, static_cast<int>(size));
  if (parsed) {
    full.set_checksum(header.checksum());  // resealed or not
    FUZZ_CHECK(full.payload() == joined, "payload differs from protobuf's parse");
    proto::PageBatch h = full;
    h.clear_payload();
    FUZZ_CHECK(h.SerializeAsString() == header.SerializeAsString(), "header differs from protobuf's parse");
  }

  // Admission against a stream expecting batch 0 (or 1, after round 2).
  const StreamCursor cursor = (selector & kLaterCursor) ? StreamCursor{1, 2} : StreamCursor{0, 0};
  const Status admitted = AdmitBatch(kSession, kStream, cursor, header);
  FUZZ_CHECK(admitted.ok() == (header.session_id() == kSession && header.stream() == kStream &&
                               header.sequence() == cursor.next_sequence && header.round() >= cursor.last_round),
             admitted.message());

  GuestMemory& mem = Memory();
  mem.Reset();
  const std::vector<uint8_t>& before = mem.pattern;
  Result<ApplyResult> applied = Applier().Apply(header, payload, mem.table);
  const std::vector<uint8_t> after = mem.Snapshot();
  if (Verbose()) {
    std::fprintf(stderr, "receiver_fuzz: %zu chunks; admit: %s; apply: %s\n", wire.size(),
                 admitted.ok() ? "ok" : admitted.message().c_str(),
                 applied.ok() ? "ok" : applied.status().message().c_str());
  }
  if (!applied.ok()) {
    FUZZ_CHECK(after == before, "a rejected batch wrote into guest memory: " + applied.status().message());
    FUZZ_CHECK(applied.status().message().find("batch " + std::to_string(header.sequence())) != std::string::npos,
               applied.status().message());
  } else {
    CheckAccepted(header, joined, *applied, before, after);
  }

  // The same batch in one piece (the overload for a parsed message) gets
  // the same verdict; applying it again leaves memory as it is.
  if (parsed) {
    Result<ApplyResult> again = Applier().Apply(full, mem.table);
    FUZZ_CHECK(again.ok() == applied.ok(), again.ok() ? "one piece accepted" : again.status().message());
    if (!again.ok()) {
      FUZZ_CHECK(again.status().message() == applied.status().message(), again.status().message());
    }
    FUZZ_CHECK(mem.Snapshot() == after, "applying the batch twice changed memory");
  }

  // In place, as a direct stream reads it: where PlanInPlace plans, the
  // payload landing there (each place inside a slot, or a guard page
  // faults) and FinishInPlace give Apply's verdict and memory; every
  // uncompressed batch Apply accepts is planned.
  mem.Reset();
  std::vector<std::span<uint8_t>> dest;
  const bool planned = Applier().PlanInPlace(header, joined.size(), mem.table, nullptr, &dest);
  FUZZ_CHECK(planned || !applied.ok() || header.compression() != proto::COMPRESSION_NONE,
             "an uncompressed batch Apply accepts was not planned in place");
  if (planned) {
    FUZZ_CHECK(header.compression() == proto::COMPRESSION_NONE, "a compressed batch planned in place");
    PayloadHash hash(Checksum::kXxh64);
    size_t landed = 0;
    for (const std::span<uint8_t>& d : dest) {
      FUZZ_CHECK(landed + d.size() <= joined.size(), "the plan holds more than the payload");
      std::memcpy(d.data(), joined.data() + landed, d.size());
      hash.Update(d.data(), d.size());
      landed += d.size();
    }
    FUZZ_CHECK(landed == joined.size(), "the plan holds less than the payload");
    Result<ApplyResult> in_place = Applier().FinishInPlace(header, hash, mem.table);
    FUZZ_CHECK(in_place.ok() == applied.ok(), in_place.ok() ? "accepted in place" : in_place.status().message());
    if (applied.ok()) FUZZ_CHECK(mem.Snapshot() == after, "in place differs from Apply");
  }
}

// ------------------------------------------------------------- seeds

void Write(const std::string& dir, const std::string& name, uint8_t selector, const std::string& body) {
  const std::string path = dir + "/seed-" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) Fail("cannot write", path);
  std::fputc(selector, f);
  std::fwrite(body.data(), 1, body.size(), f);
  std::fclose(f);
}

int MakeCorpus(const std::string& dir) {
  // Control messages.
  proto::ControlRequest req;
  proto::Setup* s = req.mutable_setup();
  for (const SlotSpec& spec : kSlots) {
    proto::MemoryRange* m = s->add_memory();
    m->set_slot(spec.slot);
    m->set_gpa(spec.gpa);
    m->set_size(spec.pages * kPageSize);
  }
  s->set_vm_description("fuzz vm");
  s->set_vcpus(2);
  s->set_streams(1);
  s->set_verify(true);
  Write(dir, "setup-valid", 0, req.SerializeAsString());
  s->set_streams(64);
  s->set_vcpus(1024);
  Write(dir, "setup-max", 0, req.SerializeAsString());
  Write(dir, "setup-small-limits", 2, req.SerializeAsString());
  s->mutable_memory(1)->set_gpa(4 * kPageSize);
  Write(dir, "setup-overlap", 0, req.SerializeAsString());
  s->mutable_memory(1)->set_gpa(8 * kPageSize + 1);
  Write(dir, "setup-unaligned", 0, req.SerializeAsString());
  s->mutable_memory(1)->set_gpa(~0ull << 12);
  Write(dir, "setup-wraps", 0, req.SerializeAsString());
  req.Clear();
  proto::Final* f = req.mutable_final();
  f->set_vm_state("state");
  f->set_has_digest(true);
  f->set_memory_digest(42);
  for (uint32_t i = 0; i < 2; ++i) {
    proto::StreamTotals* t = f->add_streams();
    t->set_stream(i);
    t->set_batches(3);
    t->set_pages(100);
  }
  Write(dir, "final-2streams", 2 << 1, req.SerializeAsString());
  Write(dir, "final-wrong-count", 3 << 1, req.SerializeAsString());
  req.Clear();
  req.mutable_hello()->set_version(kProtocolVersion);
  Write(dir, "hello", 0, req.SerializeAsString());

  // Batches, built by the sender's own code from memory shaped like the
  // fuzz guest memory.
  GuestMemory src;
  src.Reset();
  for (size_t i = 0; i < src.hosts.size(); ++i) {
    // Page 0 of each slot compressible text, page 1 random-ish (from the
    // pattern), the last page zero.
    static const char kText[] = "guest page contents that compress well. ";
    for (uint64_t k = 0; k < kPageSize; ++k) src.hosts[i][k] = static_cast<uint8_t>(kText[k % (sizeof kText - 1)]);
  }
  for (uint64_t k = 2 * kPageSize; k < 6 * kPageSize; ++k) src.hosts[0][k] = static_cast<uint8_t>("abcd"[k % 4]);
  struct BatchSeed {
    const char* name;
    Compression c;
    std::vector<engine::PageRun> runs;
  };
  const std::vector<BatchSeed> seeds = {
      {"none-1page", Compression::kNone, {{0, 1}}},
      {"none-zero-run", Compression::kNone, {{7 * kPageSize, 1}}},
      {"none-across-adjacent-slots", Compression::kNone, {{6 * kPageSize, 4}}},
      {"none-high-slot", Compression::kNone, {{kHighGpa, 2}}},
      {"lz4-4pages", Compression::kLz4, {{2 * kPageSize, 4}}},
      {"zstd-4pages", Compression::kZstd, {{2 * kPageSize, 4}}},
      {"zstd-multirun", Compression::kZstd, {{0, 1}, {3 * kPageSize, 2}, {11 * kPageSize, 1}, {kHighGpa, 1}}},
      {"lz4-multirun", Compression::kLz4, {{2 * kPageSize, 3}, {8 * kPageSize, 1}, {kHighGpa + kPageSize, 1}}},
  };
  for (const BatchSeed& seed : seeds) {
    BatchBuilder builder(seed.c);
    proto::PageBatch b;
    std::string payload(kMaxBatchPayload, '\0');
    size_t len = 0;
    const Status st = builder.Build(src.table, seed.runs, BatchHeader{kSession, kStream, 0, 0}, &b,
                                    reinterpret_cast<uint8_t*>(payload.data()), &len);
    if (!st.ok()) Fail("BatchBuilder", st.message());
    payload.resize(len);
    // Header, then the payload field, as a sender writes it.
    std::string wire = b.SerializeAsString();
    uint8_t prefix[16];
    wire.append(reinterpret_cast<const char*>(prefix), EncodePayloadPrefix(len, prefix));
    wire += payload;
    // Selectors: 1 chunk; 2 chunks cut a quarter in (resealed: a no-op
    // here); 3 chunks cut a quarter in and two thirds of the rest on.
    Write(dir, std::string(seed.name) + "-1chunk", 0x01, wire);
    Write(dir, std::string(seed.name) + "-2chunks", 0x01 | kReseal | 0x10 | 0x20, wire);
    Write(dir, std::string(seed.name) + "-3chunks", 0x01 | 0x18 | 0x20 | 0x80, wire);
  }
  // A batch for the cursor after round 2 (sequence 1), and hand-made wire
  // oddities: payload given twice, an unknown field, a truncated message.
  {
    BatchBuilder builder(Compression::kNone);
    proto::PageBatch b;
    if (!builder.Build(src.table, 8 * kPageSize, 2, BatchHeader{kSession, kStream, 3, 1}, &b).ok()) Fail("build");
    Write(dir, "none-seq1-round3", 0x01 | kLaterCursor, b.SerializeAsString());
    std::string wire = b.SerializeAsString();
    Write(dir, "payload-twice", 0x01, wire + std::string("\x7a\x01x", 3));
    Write(dir, "unknown-field", 0x01, std::string("\x72\x03xyz", 5) + wire);
    Write(dir, "truncated", 0x01, wire.substr(0, wire.size() - 100));
  }
  std::printf("receiver_fuzz: seed corpus written to %s\n", dir.c_str());
  return 0;
}

}  // namespace
}  // namespace pmlmig::transport

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  for (int i = 1; i + 1 < *argc; ++i) {
    if (std::strcmp((*argv)[i], "--make-corpus") == 0) std::exit(pmlmig::transport::MakeCorpus((*argv)[i + 1]));
  }
  pmlmig::transport::Memory();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t selector = data[0];
  if ((selector & 1) == 0) {
    pmlmig::transport::FuzzControl(selector, data + 1, size - 1);
  } else {
    pmlmig::transport::FuzzBatch(selector, data + 1, size - 1);
  }
  return 0;
}
