// The batch codec on plain memory: round trips (with and without
// compression, zero pages, slot boundaries) and every rejection the
// receiver makes, each of which must leave target memory untouched.
#include "../../transport/batch_codec.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"
#include "test_memory.h"
#include "../../transport/uffd_fill.h"

namespace pmlmig::transport {
namespace {

using engine::kPageSize;

constexpr uint64_t kHighGpa = 4ull << 30;

using test::FillRandom;

// Compressible but not trivial: short text-like patterns.
void FillCompressible(uint8_t* p, uint64_t len, uint64_t seed) {
  static const char kWords[] = "the quick brown fox jumps over the lazy dog; pmlmig migrates pages. ";
  for (uint64_t i = 0; i < len; ++i) p[i] = static_cast<uint8_t>(kWords[(i + seed) % (sizeof kWords - 1)]);
  p[seed % len] = static_cast<uint8_t>(seed);
}

// Guest memory for tests: slots at gpa 0 and gpa 4 GiB (or adjacent ones).
struct Memory {
  std::vector<Mapping> maps;
  engine::SlotTable slots;

  void Add(uint32_t slot, uint64_t gpa, uint64_t size) {
    auto m = Mapping::Map(size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "test memory");
    ASSERT_TRUE(m.ok()) << m.status().message();
    engine::MemorySlot s;
    s.slot = slot;
    s.gpa = gpa;
    s.host = m->data();
    s.size = size;
    ASSERT_TRUE(slots.Set(s).ok());
    maps.push_back(std::move(m).value());
  }
  uint8_t* At(uint64_t gpa) const { return slots.HostAddress(gpa, kPageSize); }
  std::vector<uint8_t> Snapshot() const {
    std::vector<uint8_t> out;
    for (const engine::MemorySlot& s : slots.slots()) out.insert(out.end(), s.host, s.host + s.size);
    return out;
  }
};

Memory TwoSlots(uint64_t pages_each) {
  Memory m;
  m.Add(0, 0, pages_each * kPageSize);
  m.Add(1, kHighGpa, pages_each * kPageSize);
  return m;
}

BatchHeader Header(uint64_t seq = 0) { return BatchHeader{0x1234, 1, 2, seq}; }

// Builds a valid batch of `pages` pages at `gpa` and returns it.
proto::PageBatch Build(const Memory& src, uint64_t gpa, uint64_t pages, Compression c = Compression::kNone,
                       uint64_t seq = 0) {
  BatchBuilder b(c);
  proto::PageBatch batch;
  Status s = b.Build(src.slots, gpa, pages, Header(seq), &batch);
  EXPECT_TRUE(s.ok()) << s.message();
  return batch;
}

// Recomputes a tampered batch's checksum so only the intended check fails.
void Reseal(proto::PageBatch* b, const uint8_t* data, uint64_t len) {
  b->set_checksum(BatchChecksum(*b, XXH64(data, len, 0)));
}

class BatchCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    src_ = TwoSlots(64);
    dst_ = TwoSlots(64);
    // Slot 0: pages 0-9 random, 10-19 zero, 20-39 compressible, the rest random.
    // Slot 1: all random.
    for (uint64_t p = 0; p < 64; ++p) {
      FillRandom(src_.At(kHighGpa + p * kPageSize), kPageSize, 1000 + p);
      uint8_t* page = src_.At(p * kPageSize);
      if (p >= 10 && p < 20) continue;
      if (p >= 20 && p < 40) {
        FillCompressible(page, kPageSize, p);
      } else {
        FillRandom(page, kPageSize, p);
      }
    }
  }

  // Applies and expects a rejection whose message contains `what`, with
  // target memory unchanged.
  void ExpectRejected(const proto::PageBatch& b, const std::string& what, Code code = Code::kInvalidArgument) {
    const std::vector<uint8_t> before = dst_.Snapshot();
    BatchApplier applier;
    Result<ApplyResult> r = applier.Apply(b, dst_.slots);
    ASSERT_FALSE(r.ok()) << "expected a rejection mentioning \"" << what << "\"";
    EXPECT_EQ(r.status().code(), code) << r.status().message();
    EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().message();
    EXPECT_NE(r.status().message().find("batch " + std::to_string(b.sequence())), std::string::npos)
        << r.status().message();
    EXPECT_TRUE(dst_.Snapshot() == before) << "a rejected batch wrote into target memory";
  }

  Memory src_;
  Memory dst_;
};

TEST_F(BatchCodecTest, RoundTripUncompressedWithZeroPages) {
  proto::PageBatch b = Build(src_, 0, 64, Compression::kNone, 5);
  EXPECT_EQ(b.compression(), proto::COMPRESSION_NONE);
  EXPECT_EQ(b.uncompressed_length(), 54 * kPageSize);
  EXPECT_EQ(b.payload().size(), 54 * kPageSize);
  ASSERT_EQ(b.runs_size(), 3);  // data 0-9, zero 10-19, data 20-63
  EXPECT_EQ(b.runs(1).gpa(), 10 * kPageSize);
  EXPECT_EQ(b.runs(1).pages(), 10u);
  EXPECT_EQ(b.runs(1).flags(), static_cast<uint32_t>(proto::PAGE_RUN_ZERO));
  // A zero page must be cleared even if the target had data there.
  std::memset(dst_.At(12 * kPageSize), 0xaa, kPageSize);
  BatchApplier applier;
  Result<ApplyResult> r = applier.Apply(b, dst_.slots);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->normal_pages, 54u);
  EXPECT_EQ(r->zero_pages, 10u);
  EXPECT_EQ(std::memcmp(src_.At(0), dst_.At(0), 64 * kPageSize), 0);
}

TEST_F(BatchCodecTest, RoundTripCompressed) {
  for (Compression c : {Compression::kLz4, Compression::kZstd}) {
    SCOPED_TRACE(std::string(CompressionName(c)));
    // Compressible pages 20..39 only: the payload must shrink.
    proto::PageBatch b = Build(src_, 20 * kPageSize, 20, c);
    EXPECT_EQ(b.compression(), c == Compression::kLz4 ? proto::COMPRESSION_LZ4 : proto::COMPRESSION_ZSTD);
    EXPECT_LT(b.payload().size(), b.uncompressed_length() / 4);
    BatchApplier applier;
    ASSERT_TRUE(applier.Apply(b, dst_.slots).ok());
    EXPECT_EQ(std::memcmp(src_.At(20 * kPageSize), dst_.At(20 * kPageSize), 20 * kPageSize), 0);
    // A mixed batch, and the applier reused across batches.
    proto::PageBatch all = Build(src_, 0, 64, c, 1);
    ASSERT_TRUE(applier.Apply(all, dst_.slots).ok());
    EXPECT_EQ(std::memcmp(src_.At(0), dst_.At(0), 64 * kPageSize), 0);
  }
}

TEST_F(BatchCodecTest, IncompressibleDataTravelsUncompressed) {
  proto::PageBatch b = Build(src_, kHighGpa, 64, Compression::kLz4);
  EXPECT_EQ(b.compression(), proto::COMPRESSION_NONE);
  EXPECT_EQ(b.payload().size(), 64 * kPageSize);
  b = Build(src_, kHighGpa, 64, Compression::kZstd);
  EXPECT_EQ(b.compression(), proto::COMPRESSION_NONE);
  BatchApplier applier;
  ASSERT_TRUE(applier.Apply(b, dst_.slots).ok());
  EXPECT_EQ(std::memcmp(src_.At(kHighGpa), dst_.At(kHighGpa), 64 * kPageSize), 0);
}

TEST_F(BatchCodecTest, AllZeroBatchIsHeaderOnly) {
  proto::PageBatch b = Build(src_, 10 * kPageSize, 10, Compression::kZstd);
  EXPECT_TRUE(b.payload().empty());
  EXPECT_EQ(b.uncompressed_length(), 0u);
  ASSERT_EQ(b.runs_size(), 1);
  std::memset(dst_.At(15 * kPageSize), 0x55, kPageSize);
  BatchApplier applier;
  ASSERT_TRUE(applier.Apply(b, dst_.slots).ok());
  EXPECT_TRUE(IsZeroPage(dst_.At(15 * kPageSize)));
}

TEST_F(BatchCodecTest, RunsSplitAtSlotBoundaries) {
  Memory src;
  src.Add(0, 0, 4 * kPageSize);
  src.Add(1, 4 * kPageSize, 4 * kPageSize);  // adjacent slot
  FillRandom(src.At(0), 4 * kPageSize, 1);
  FillRandom(src.At(4 * kPageSize), 4 * kPageSize, 2);
  Memory dst;
  dst.Add(0, 0, 4 * kPageSize);
  dst.Add(1, 4 * kPageSize, 4 * kPageSize);
  proto::PageBatch b = Build(src, 2 * kPageSize, 4);
  ASSERT_EQ(b.runs_size(), 2);
  EXPECT_EQ(b.runs(0).pages(), 2u);
  EXPECT_EQ(b.runs(1).gpa(), 4 * kPageSize);
  BatchApplier applier;
  ASSERT_TRUE(applier.Apply(b, dst.slots).ok());
  EXPECT_EQ(std::memcmp(src.At(2 * kPageSize), dst.At(2 * kPageSize), 2 * kPageSize), 0);
  EXPECT_EQ(std::memcmp(src.At(4 * kPageSize), dst.At(4 * kPageSize), 2 * kPageSize), 0);
}

TEST_F(BatchCodecTest, BuilderRejectsPagesOutsideSourceMemory) {
  BatchBuilder b(Compression::kNone);
  proto::PageBatch batch;
  Status s = b.Build(src_.slots, 62 * kPageSize, 4, Header(), &batch);  // runs past slot 0 into the hole
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("gpa 0x40000 is not in source memory"), std::string::npos) << s.message();
  EXPECT_FALSE(b.Build(src_.slots, 0, 0, Header(), &batch).ok());
  EXPECT_FALSE(b.Build(src_.slots, 0, kMaxBatchPages + 1, Header(), &batch).ok());
  EXPECT_FALSE(b.Build(src_.slots, 100, 1, Header(), &batch).ok());
}

TEST_F(BatchCodecTest, RejectsBadChecksum) {
  proto::PageBatch b = Build(src_, 0, 8, Compression::kNone, 17);
  (*b.mutable_payload())[100] ^= 1;
  ExpectRejected(b, "checksum mismatch", Code::kDataLoss);
  // The checksum covers the header too: the same data sent elsewhere fails.
  b = Build(src_, 0, 8, Compression::kNone, 17);
  b.mutable_runs(0)->set_gpa(kHighGpa);
  ExpectRejected(b, "checksum mismatch", Code::kDataLoss);
  b = Build(src_, 0, 8, Compression::kNone, 17);
  b.set_round(b.round() + 1);
  ExpectRejected(b, "checksum mismatch", Code::kDataLoss);
}

TEST_F(BatchCodecTest, RejectsGpaOutsideGuestMemory) {
  proto::PageBatch b = Build(src_, 0, 8, Compression::kNone, 17);
  b.mutable_runs(0)->set_gpa(0x1234000);
  ExpectRejected(b, "batch 17: run 0: gpa 0x1234000 (+8 pages) lies outside guest memory");
  b.mutable_runs(0)->set_gpa(kHighGpa + 64 * kPageSize);  // just past the last slot
  ExpectRejected(b, "lies outside guest memory");
  b.mutable_runs(0)->set_gpa(~uint64_t{0} & ~(kPageSize - 1));  // would wrap around
  ExpectRejected(b, "lies outside guest memory");
}

TEST_F(BatchCodecTest, RejectsRunStraddlingSlotEnd) {
  proto::PageBatch b = Build(src_, 0, 8, Compression::kNone, 3);
  b.mutable_runs(0)->set_gpa(60 * kPageSize);  // pages 60..67: slot 0 has 64
  ExpectRejected(b, "straddles the end of slot 0");
}

TEST_F(BatchCodecTest, RejectsPageCountPayloadMismatch) {
  // More data pages declared than the payload holds.
  proto::PageBatch b = Build(src_, 0, 8);
  b.mutable_runs(0)->set_pages(9);
  ExpectRejected(b, "uncompressed_length 32768 does not match 9 data pages");
  // uncompressed_length agrees with the runs, but the payload is short.
  b = Build(src_, 0, 8);
  b.mutable_payload()->resize(7 * kPageSize);
  ExpectRejected(b, "payload is 28672 bytes, expected 32768");
  // A zero run that claims data.
  b = Build(src_, 10 * kPageSize, 4);
  b.mutable_runs(0)->set_flags(proto::PAGE_RUN_DATA);
  ExpectRejected(b, "does not match 4 data pages");
}

TEST_F(BatchCodecTest, RejectsOversizedBatch) {
  proto::PageBatch b;
  b.set_sequence(9);
  for (int i = 0; i < 2; ++i) {
    proto::PageRun* r = b.add_runs();
    r->set_gpa(0);
    r->set_pages(kMaxBatchPages / 2 + 1);
    r->set_flags(proto::PAGE_RUN_ZERO);
  }
  ExpectRejected(b, "more than 1024 pages (oversized batch)");
  proto::PageBatch many;
  many.set_sequence(9);
  for (uint32_t i = 0; i < kMaxBatchPages + 1; ++i) {
    proto::PageRun* r = many.add_runs();
    r->set_gpa(0);
    r->set_pages(1);
    r->set_flags(proto::PAGE_RUN_ZERO);
  }
  ExpectRejected(many, "1025 runs");
}

TEST_F(BatchCodecTest, RejectsMalformedRuns) {
  proto::PageBatch b = Build(src_, 0, 4);
  b.clear_runs();
  ExpectRejected(b, "no pages");
  b = Build(src_, 0, 4);
  b.mutable_runs(0)->set_pages(0);
  ExpectRejected(b, "run 0: 0 pages");
  b = Build(src_, 0, 4);
  b.mutable_runs(0)->set_gpa(100);
  ExpectRejected(b, "run 0: gpa 0x64 is not page aligned");
  b = Build(src_, 0, 4);
  b.mutable_runs(0)->set_flags(6);
  ExpectRejected(b, "run 0: unknown flags 0x6");
}

TEST_F(BatchCodecTest, RejectsGarbageCompressedPayload) {
  std::vector<uint8_t> garbage(3000);
  FillRandom(garbage.data(), garbage.size(), 99);
  for (auto [c, name] : {std::pair{proto::COMPRESSION_LZ4, "lz4 payload is corrupt"},
                         std::pair{proto::COMPRESSION_ZSTD, "zstd payload is corrupt"}}) {
    proto::PageBatch b = Build(src_, 0, 2);
    b.set_compression(c);
    b.set_payload(garbage.data(), garbage.size());
    ExpectRejected(b, name, Code::kDataLoss);
  }
}

TEST_F(BatchCodecTest, RejectsPayloadDecompressingToWrongLength) {
  // A valid lz4 block of one page, declared as two pages of data.
  proto::PageBatch b = Build(src_, 20 * kPageSize, 2, Compression::kLz4);
  ASSERT_EQ(b.compression(), proto::COMPRESSION_LZ4);
  BatchBuilder one(Compression::kLz4);
  proto::PageBatch single;
  ASSERT_TRUE(one.Build(src_.slots, 20 * kPageSize, 1, Header(), &single).ok());
  ASSERT_EQ(single.compression(), proto::COMPRESSION_LZ4);
  b.set_payload(single.payload());
  ExpectRejected(b, "lz4 payload decompresses to 4096 bytes, expected 8192", Code::kDataLoss);

  proto::PageBatch z = Build(src_, 20 * kPageSize, 2, Compression::kZstd);
  BatchBuilder zone(Compression::kZstd);
  ASSERT_TRUE(zone.Build(src_.slots, 20 * kPageSize, 1, Header(), &single).ok());
  z.set_payload(single.payload());
  ExpectRejected(z, "zstd payload decompresses to 4096 bytes, expected 8192", Code::kDataLoss);
}

TEST_F(BatchCodecTest, RejectsUnknownCompression) {
  proto::PageBatch b = Build(src_, 0, 2);
  b.set_compression(static_cast<proto::Compression>(7));
  ExpectRejected(b, "unknown compression 7");
}

TEST_F(BatchCodecTest, ResealedTamperingIsCaughtByStructureChecks) {
  // Even with a valid checksum, a batch may not point outside guest memory.
  proto::PageBatch b = Build(src_, 0, 4);
  b.mutable_runs(0)->set_gpa(kHighGpa + 62 * kPageSize);
  Reseal(&b, reinterpret_cast<const uint8_t*>(b.payload().data()), b.payload().size());
  ExpectRejected(b, "straddles the end of slot 1");
}

TEST_F(BatchCodecTest, Xxh3ChecksumRoundTripsAndIsNotXxh64) {
  BatchBuilder xxh3(Compression::kNone);
  xxh3.set_checksum(Checksum::kXxh3);
  proto::PageBatch b;
  ASSERT_TRUE(xxh3.Build(src_.slots, 0, 64, Header(3), &b).ok());
  EXPECT_NE(b.checksum(), Build(src_, 0, 64, Compression::kNone, 3).checksum());
  // A receiver expecting XXH64 refuses it (the sides must agree at Setup).
  ExpectRejected(b, "checksum mismatch", Code::kDataLoss);
  BatchApplier applier;
  applier.set_checksum(Checksum::kXxh3);
  Result<ApplyResult> r = applier.Apply(b, dst_.slots);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(std::memcmp(src_.At(0), dst_.At(0), 64 * kPageSize), 0);
  // It covers data and header like XXH64 does.
  (*b.mutable_payload())[5] ^= 1;
  r = applier.Apply(b, dst_.slots);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
}

// `payload` cut into pieces of `size` bytes (the last one shorter), as gRPC
// slices arrive.
std::vector<std::span<const uint8_t>> Pieces(const std::string& payload, size_t size) {
  std::vector<std::span<const uint8_t>> pieces;
  for (size_t off = 0; off < payload.size(); off += size) {
    pieces.emplace_back(reinterpret_cast<const uint8_t*>(payload.data()) + off, std::min(size, payload.size() - off));
  }
  return pieces;
}

// Guest memory in one memfd, written through the file (pwritev) as the
// receiver does for a VM whose memory is a memfd.
class FileTarget final : public engine::MigrationTarget {
 public:
  explicit FileTarget(uint64_t bytes) {
    fd_ = UniqueFd(::memfd_create("batch_codec_test", MFD_CLOEXEC));
    EXPECT_TRUE(fd_.valid());
    EXPECT_EQ(::ftruncate(fd_.get(), static_cast<off_t>(bytes)), 0);
    auto m = Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0, "test memfd");
    EXPECT_TRUE(m.ok());
    map_ = std::move(m).value();
    engine::MemorySlot s;
    s.slot = 7;
    s.gpa = 0;
    s.host = map_.data();
    s.size = bytes;
    EXPECT_TRUE(slots_.Set(s).ok());
  }
  Status OnSetup(const engine::MigrationSetup&) override { return Status::Ok(); }
  const engine::SlotTable& memory() const override { return slots_; }
  std::optional<engine::MemoryFile> memory_file(uint32_t slot) const override {
    if (slot != 7) return std::nullopt;
    return engine::MemoryFile{fd_.get(), 0};
  }
  Result<engine::FinalReply> OnFinal(const engine::FinalState&) override { return engine::FinalReply{}; }
  Result<double> OnCommit() override { return 0.0; }
  void OnAbort(const std::string&) override {}
  std::unique_ptr<engine::VmControl> TakeVm() override { return nullptr; }
  int fd() const { return fd_.get(); }

 private:
  UniqueFd fd_;
  Mapping map_;
  engine::SlotTable slots_;
};

TEST_F(BatchCodecTest, WritesThroughTheMemoryFile) {
  FileTarget target(64 * kPageSize);
  const SlotFiles files = SlotFiles::Of(target);
  ASSERT_FALSE(files.empty());
  ASSERT_NE(files.Find(7), nullptr);
  EXPECT_EQ(files.Find(0), nullptr);
  // Pages 10-19 of the source are zero: a zero run over a hole allocates nothing.
  proto::PageBatch b = Build(src_, 0, 64);
  BatchApplier applier;
  Result<ApplyResult> r = applier.Apply(b, target.memory(), nullptr, &files);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->normal_pages, 54u);
  // (Checked before anything reads the pages through the mapping, which allocates them.)
  EXPECT_EQ(::lseek(target.fd(), 10 * kPageSize, SEEK_DATA), static_cast<off_t>(20 * kPageSize))
      << "the zero pages 10-19 were made resident";
  EXPECT_EQ(std::memcmp(src_.At(0), target.memory().HostAddress(0, 64 * kPageSize), 64 * kPageSize), 0);
  // Pages now mapped here (the memcmp read them) are copied through the mapping: same result.
  std::memset(target.memory().HostAddress(0, 64 * kPageSize), 0x5a, 64 * kPageSize);
  r = applier.Apply(b, target.memory(), nullptr, &files);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(std::memcmp(src_.At(0), target.memory().HostAddress(0, 64 * kPageSize), 64 * kPageSize), 0);
  // Data where a zero page comes later: it is cleared, whichever way it was written.
  proto::PageBatch zeros = Build(src_, 10 * kPageSize, 10);
  zeros.mutable_runs(0)->set_gpa(0);
  zeros.set_checksum(BatchChecksum(zeros, XXH64(nullptr, 0, 0)));
  r = applier.Apply(zeros, target.memory(), nullptr, &files);
  ASSERT_TRUE(r.ok()) << r.status().message();
  const uint8_t* host = target.memory().HostAddress(0, kPageSize);
  EXPECT_TRUE(IsZeroPage(host)) << "a zero run did not clear a page that had data";
  // A payload split into pieces (gRPC slices) lands the same way.
  proto::PageBatch header = b;
  header.clear_payload();
  const std::vector<std::span<const uint8_t>> pieces = Pieces(b.payload(), 12345);
  FileTarget again(64 * kPageSize);
  const SlotFiles files2 = SlotFiles::Of(again);
  r = applier.Apply(header, Chunks(pieces), again.memory(), nullptr, &files2);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(std::memcmp(src_.At(0), again.memory().HostAddress(0, 64 * kPageSize), 64 * kPageSize), 0);
}

// Several streams' round 0: data runs into missing pages are placed with
// UFFDIO_COPY (uffd_fill.h); pages that exist are copied; anything else
// touching a missing page meanwhile gets a zero page from the handler.
TEST_F(BatchCodecTest, PlacesFreshPagesThroughUserfaultfd) {
  FileTarget target(64 * kPageSize);
  SlotFiles files = SlotFiles::Of(target, /*write_through=*/false);
  Result<std::shared_ptr<UffdFill>> started = UffdFill::Start(target.memory(), files.entries());
  if (!started.ok() && started.status().code() == Code::kUnavailable) {
    GTEST_SKIP() << "no userfaultfd here: " << started.status().message();
  }
  ASSERT_TRUE(started.ok()) << started.status().message();
  const std::shared_ptr<UffdFill> fill = *started;
  files.set_fill(fill);
  uint8_t* host = target.memory().HostAddress(0, 64 * kPageSize);
  ASSERT_TRUE(fill->Covers(host, 64 * kPageSize));
  EXPECT_FALSE(fill->Covers(host + kPageSize, 64 * kPageSize)) << "past the slot's end";
  // A write and a read of missing pages before any data: the handler maps
  // zero pages, so neither waits forever and the read sees zero.
  host[30 * kPageSize] = 0x77;
  EXPECT_EQ(host[50 * kPageSize + 9], 0);
  EXPECT_EQ(fill->zero_faults(), 2u);
  // Pages 10-19 of the source are zero: holes stay holes. Pages 30 and 50
  // exist now: copied over. The other 52 data pages are placed.
  proto::PageBatch b = Build(src_, 0, 64);
  BatchApplier applier;
  Result<ApplyResult> r = applier.Apply(b, target.memory(), nullptr, &files);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(r->normal_pages, 54u);
  EXPECT_EQ(fill->placed_bytes(), 54 * kPageSize);  // the two existing pages by the copy it falls back to
  EXPECT_EQ(fill->zero_faults(), 2u) << "the applier touched a missing page";
  EXPECT_EQ(::lseek(target.fd(), 10 * kPageSize, SEEK_DATA), static_cast<off_t>(20 * kPageSize))
      << "the zero pages 10-19 were made resident";
  // Reading the holes 10-19 while registered: zero pages from the handler.
  EXPECT_EQ(std::memcmp(src_.At(0), host, 64 * kPageSize), 0);
  EXPECT_EQ(fill->zero_faults(), 12u);
  // After Stop the memory is ordinary: a hole reads as zero without the
  // handler, and batches are copied.
  fill->Stop();
  fill->Stop();  // again: nothing
  EXPECT_FALSE(fill->Covers(host, kPageSize));
  ASSERT_EQ(::fallocate(target.fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 15 * kPageSize, kPageSize), 0);
  EXPECT_TRUE(IsZeroPage(host + 15 * kPageSize));
  EXPECT_EQ(fill->zero_faults(), 12u) << "a hole faulted to the handler after Stop";
  std::memset(host, 0x5a, 64 * kPageSize);
  r = applier.Apply(b, target.memory(), nullptr, &files);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ(std::memcmp(src_.At(0), host, 64 * kPageSize), 0);
  EXPECT_EQ(fill->Place(host, src_.At(0), kPageSize), 0u) << "placed after Stop";

  // A payload in pieces (gRPC slices): each run is gathered, then placed.
  FileTarget again(64 * kPageSize);
  SlotFiles files2 = SlotFiles::Of(again, false);
  started = UffdFill::Start(again.memory(), files2.entries());
  ASSERT_TRUE(started.ok()) << started.status().message();
  files2.set_fill(*started);
  proto::PageBatch header = b;
  header.clear_payload();
  const std::vector<std::span<const uint8_t>> pieces = Pieces(b.payload(), 12345);
  r = applier.Apply(header, Chunks(pieces), again.memory(), nullptr, &files2);
  ASSERT_TRUE(r.ok()) << r.status().message();
  EXPECT_EQ((*started)->placed_bytes(), 54 * kPageSize);
  (*started)->Stop();
  EXPECT_EQ(std::memcmp(src_.At(0), again.memory().HostAddress(0, 64 * kPageSize), 64 * kPageSize), 0);
  EXPECT_EQ((*started)->zero_faults(), 0u);
}

// What a direct stream does with a batch read in place: `payload` landing
// in `dest` in pieces of `step` bytes, each fed to `hash` as it lands.
void Land(const std::string& payload, const std::vector<std::span<uint8_t>>& dest, size_t step, PayloadHash* hash) {
  size_t from = 0;
  for (const std::span<uint8_t>& d : dest) {
    for (size_t off = 0; off < d.size();) {
      const size_t k = std::min({step, d.size() - off, payload.size() - from});
      ASSERT_GT(k, 0u) << "the plan holds more bytes than the payload";
      std::memcpy(d.data() + off, payload.data() + from, k);
      hash->Update(d.data() + off, k);
      off += k;
      from += k;
    }
  }
  EXPECT_EQ(from, payload.size()) << "the plan holds fewer bytes than the payload";
}

// A batch read straight into guest memory: the plan names each data run's
// place, and once the bytes have landed there (in any pieces) memory holds
// what Apply would have written, zero runs cleared.
TEST_F(BatchCodecTest, ReadsInPlaceWhereItWouldCopy) {
  proto::PageBatch b = Build(src_, 0, 64);  // data 0-9, zero 10-19, data 20-63
  ASSERT_EQ(b.runs_size(), 3);
  for (uint64_t p = 10; p < 20; ++p) FillRandom(dst_.At(p * kPageSize), kPageSize, 500 + p);  // an earlier round's
  for (Checksum c : {Checksum::kXxh64, Checksum::kXxh3}) {
    BatchBuilder builder(Compression::kNone);
    builder.set_checksum(c);
    ASSERT_TRUE(builder.Build(src_.slots, 0, 64, Header(), &b).ok());
    BatchApplier applier;
    applier.set_checksum(c);
    std::vector<std::span<uint8_t>> dest;
    ASSERT_TRUE(applier.PlanInPlace(b, b.payload().size(), dst_.slots, nullptr, &dest));
    ASSERT_EQ(dest.size(), 2u);
    EXPECT_EQ(dest[0].data(), dst_.At(0));
    EXPECT_EQ(dest[0].size(), 10 * kPageSize);
    EXPECT_EQ(dest[1].data(), dst_.At(20 * kPageSize));
    EXPECT_EQ(dest[1].size(), 44 * kPageSize);
    PayloadHash hash(applier.checksum());
    Land(b.payload(), dest, 12345, &hash);
    Result<ApplyResult> r = applier.FinishInPlace(b, hash, dst_.slots);
    ASSERT_TRUE(r.ok()) << r.status().message();
    EXPECT_EQ(r->normal_pages, 54u);
    EXPECT_EQ(r->zero_pages, 10u);
    EXPECT_EQ(std::memcmp(src_.At(0), dst_.At(0), 64 * kPageSize), 0);
  }
}

// Where Apply would not copy through the mapping, or would refuse, nothing
// is planned (the stream then reads into a buffer and Apply says why); a
// payload that lands damaged fails the checksum.
TEST_F(BatchCodecTest, ReadsInPlaceOnlyWhatItCanCheckAfterwards) {
  BatchApplier applier;
  std::vector<std::span<uint8_t>> dest;
  proto::PageBatch b = Build(src_, 0, 64);
  EXPECT_FALSE(applier.PlanInPlace(b, b.payload().size() - 1, dst_.slots, nullptr, &dest)) << "short payload";
  EXPECT_FALSE(applier.PlanInPlace(b, b.payload().size() + kPageSize, dst_.slots, nullptr, &dest)) << "long payload";
  proto::PageBatch outside = b;
  outside.mutable_runs(0)->set_gpa(0x1234000);
  EXPECT_FALSE(applier.PlanInPlace(outside, b.payload().size(), dst_.slots, nullptr, &dest)) << "run outside memory";
  const proto::PageBatch lz4 = Build(src_, 20 * kPageSize, 20, Compression::kLz4);
  ASSERT_EQ(lz4.compression(), proto::COMPRESSION_LZ4);
  EXPECT_FALSE(applier.PlanInPlace(lz4, lz4.payload().size(), dst_.slots, nullptr, &dest)) << "compressed";
  EXPECT_TRUE(dest.empty());
  // A single writer's fresh memfd pages go through the file; once they are
  // mapped, through the mapping, so in place.
  FileTarget target(64 * kPageSize);
  const SlotFiles files = SlotFiles::Of(target);
  EXPECT_FALSE(applier.PlanInPlace(b, b.payload().size(), target.memory(), &files, &dest)) << "fresh memfd pages";
  std::memset(target.memory().HostAddress(0, 64 * kPageSize), 0x5a, 64 * kPageSize);
  ASSERT_TRUE(applier.PlanInPlace(b, b.payload().size(), target.memory(), &files, &dest));
  // One byte damaged on its way in: the checksum fails.
  std::string damaged = b.payload();
  damaged[777] ^= 0x10;
  PayloadHash hash(applier.checksum());
  Land(damaged, dest, 4096, &hash);
  Result<ApplyResult> r = applier.FinishInPlace(b, hash, target.memory(), nullptr, &files);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_NE(r.status().message().find("batch 0: checksum mismatch"), std::string::npos) << r.status().message();
}

// Memory without a memfd is left alone.
TEST(UffdFillTest, NeedsAMemfd) {
  auto m = Mapping::Map(16 * kPageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "anonymous");
  ASSERT_TRUE(m.ok());
  engine::SlotTable slots;
  ASSERT_TRUE(slots.Set({0, 0, m->data(), 16 * kPageSize, 0}).ok());
  Result<std::shared_ptr<UffdFill>> f = UffdFill::Start(slots, {});
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.status().code(), Code::kUnavailable);
}

TEST(CompressionTest, ParsesNames) {
  EXPECT_EQ(*ParseCompression("none"), Compression::kNone);
  EXPECT_EQ(*ParseCompression("lz4"), Compression::kLz4);
  EXPECT_EQ(*ParseCompression("zstd"), Compression::kZstd);
  Result<Compression> bad = ParseCompression("gzip");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("gzip"), std::string::npos);
  EXPECT_EQ(CompressionName(Compression::kZstd), "zstd");
}

}  // namespace
}  // namespace pmlmig::transport
