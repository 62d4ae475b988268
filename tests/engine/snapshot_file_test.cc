// The snapshot file (snapshot_file.h): what a writer puts where (checked
// against the documented offsets of docs/SNAPSHOT_FORMAT.md, read raw, as
// another reader would), that memory round-trips through it, that it stays
// sparse, that a failed snapshot never replaces a good one, and that the
// reader refuses every kind of damaged or hostile file with a message that
// says what is wrong where.
#include "pmlmig/engine/snapshot_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::engine {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kHigh = 4ull << 30;  // gpa of the second region

// Header offsets, as docs/SNAPSHOT_FORMAT.md gives them.
constexpr uint64_t kOffMajor = 8, kOffMinor = 10, kOffHeaderBytes = 12, kOffFlags = 16, kOffVcpus = 28;
constexpr uint64_t kOffRegionCount = 32, kOffDataOffset = 64, kOffMetaOffset = 80, kOffMetaBytes = 88;
constexpr uint64_t kOffDescriptionBytes = 96, kOffStateBytes = 104, kOffChunkCount = 120;
constexpr uint64_t kOffLayoutChecksum = 136, kOffHeaderChecksum = 152;

// Guest memory: `low` at gpa 0 (slot 0), `high` at 4 GiB (slot 1).
struct Memory {
  Mapping low, high;
  SlotTable slots;
};

Memory NewMemory(uint64_t low_bytes = 4 * kMiB, uint64_t high_bytes = 2 * kMiB) {
  Memory m;
  m.low = Mapping::Map(low_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "low").value();
  m.high = Mapping::Map(high_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "high").value();
  EXPECT_TRUE(m.slots.Set({0, 0, m.low.data(), m.low.size(), 0}).ok());
  EXPECT_TRUE(m.slots.Set({1, kHigh, m.high.data(), m.high.size(), 0}).ok());
  return m;
}

void Fill(uint8_t* p, uint64_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (uint64_t i = 0; i < bytes; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, 8);
  }
}

uint64_t ReadLe(const std::string& path, uint64_t offset, unsigned width) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  uint8_t b[8] = {};
  EXPECT_EQ(::pread(fd.get(), b, width, static_cast<off_t>(offset)), static_cast<ssize_t>(width));
  uint64_t v = 0;
  for (unsigned i = 0; i < width; ++i) v |= uint64_t{b[i]} << (8 * i);
  return v;
}

// Writes `value` at `offset`; with `fix`, recomputes the header checksum the
// way the format defines it (XXH3-64 of the header with the field zero).
void Patch(const std::string& path, uint64_t offset, unsigned width, uint64_t value, bool fix = true) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  uint8_t b[8];
  for (unsigned i = 0; i < width; ++i) b[i] = static_cast<uint8_t>(value >> (8 * i));
  ASSERT_EQ(::pwrite(fd.get(), b, width, static_cast<off_t>(offset)), static_cast<ssize_t>(width));
  if (!fix) return;
  std::vector<uint8_t> header(4096);
  ASSERT_EQ(::pread(fd.get(), header.data(), 4096, 0), 4096);
  std::memset(header.data() + kOffHeaderChecksum, 0, 8);
  const uint64_t sum = XXH3_64bits(header.data(), header.size());
  std::memcpy(header.data() + kOffHeaderChecksum, &sum, 8);  // little-endian host
  ASSERT_EQ(::pwrite(fd.get(), header.data(), 4096, 0), 4096);
}

void FlipByte(const std::string& path, uint64_t offset) {
  Patch(path, offset, 1, ReadLe(path, offset, 1) ^ 0x40, false);
}

class SnapshotFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/pmlmig_snapshot_test.XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/vm.snap";
    src_ = NewMemory();
    Fill(src_.low.data(), src_.low.size(), 1);
    Fill(src_.high.data(), src_.high.size(), 2);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  SnapshotWriter NewWriter(const std::string& description = "vm description") {
    auto w = SnapshotWriter::Create(path_, SnapshotRegionsOf(src_.slots), 2, description);
    EXPECT_TRUE(w.ok()) << w.status().ToString();
    return std::move(*w);
  }
  static void WriteAll(SnapshotWriter& w, const SlotTable& from) {
    for (const MemorySlot& s : from.slots()) ASSERT_TRUE(w.WritePages(s.gpa, s.pages(), s.host).ok());
  }
  // A finished snapshot of src_ with state "state bytes".
  void MakeSnapshot(const std::string& description = "vm description") {
    SnapshotWriter w = NewWriter(description);
    WriteAll(w, src_.slots);
    const std::vector<uint64_t> expected = DigestAllChunks(src_.slots, ChunkLayout(src_.slots), ZeroPages::kNull);
    const std::string state = "state bytes";
    ASSERT_TRUE(w.Finish({reinterpret_cast<const uint8_t*>(state.data()), state.size()}, &expected).ok());
  }
  std::string OpenError() {
    auto r = SnapshotReader::Open(path_);
    EXPECT_FALSE(r.ok());
    return r.status().ToString();
  }
  std::string LoadError() {
    auto r = SnapshotReader::Open(path_);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    if (!r.ok()) return "";
    Memory fresh = NewMemory();
    auto loaded = r->LoadInto(fresh.slots, 2);
    EXPECT_EQ(loaded.status().code(), Code::kDataLoss);
    EXPECT_EQ(r->VerifyFile(2).ToString(), loaded.status().ToString());
    return loaded.status().ToString();
  }

  std::string dir_, path_;
  Memory src_;
};

TEST_F(SnapshotFileTest, RoundTripOverRoundsWithZeroPages) {
  SnapshotWriter w = NewWriter();
  WriteAll(w, src_.slots);  // round 1
  // Round 2: some pages changed (one run across the chunk boundary at 2 MiB), some became zero.
  Fill(src_.low.data() + 2 * kMiB - 3 * 4096, 5 * 4096, 3);
  ASSERT_TRUE(w.WritePages(2 * kMiB - 3 * 4096, 5, src_.low.data() + 2 * kMiB - 3 * 4096).ok());
  Fill(src_.high.data() + 40 * 4096, 4096, 4);
  ASSERT_TRUE(w.WritePages(kHigh + 40 * 4096, 1, src_.high.data() + 40 * 4096).ok());
  std::memset(src_.low.data() + 64 * 4096, 0, 256 * 4096);
  ASSERT_TRUE(w.WriteZeroPages(64 * 4096, 256).ok());
  std::memset(src_.high.data(), 0, 4096);
  ASSERT_TRUE(w.WriteZeroPages(kHigh, 1).ok());
  EXPECT_EQ(w.bytes_written(), 6 * kMiB + 6 * 4096);
  const std::vector<uint64_t> expected = DigestAllChunks(src_.slots, ChunkLayout(src_.slots), ZeroPages::kNull);
  EXPECT_EQ(w.chunk_digests(), expected);
  const std::vector<uint8_t> state = {1, 2, 3, 0, 255};
  ASSERT_TRUE(w.Finish(state, &expected).ok());
  EXPECT_TRUE(w.finished());
  EXPECT_FALSE(std::filesystem::exists(path_ + ".partial"));

  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->description(), "vm description");
  EXPECT_EQ(std::vector<uint8_t>(r->state().begin(), r->state().end()), state);
  EXPECT_EQ(r->vcpus(), 2u);
  EXPECT_EQ(r->guest_bytes(), 6 * kMiB);
  EXPECT_EQ(r->chunk_bytes(), 2 * kMiB);
  EXPECT_EQ(std::vector<uint64_t>(r->chunk_digests().begin(), r->chunk_digests().end()), expected);
  ASSERT_EQ(r->regions().size(), 2u);
  EXPECT_EQ(r->regions()[1].slot, 1u);
  EXPECT_EQ(r->regions()[1].gpa, kHigh);

  Memory fresh = NewMemory();
  auto stats = r->LoadInto(fresh.slots, 3);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(std::memcmp(fresh.low.data(), src_.low.data(), src_.low.size()), 0);
  EXPECT_EQ(std::memcmp(fresh.high.data(), src_.high.data(), src_.high.size()), 0);
  EXPECT_EQ(stats->bytes_read + stats->hole_bytes, 6 * kMiB);
  EXPECT_GE(stats->hole_bytes, 257 * 4096u);  // the zeroed pages were never read
  EXPECT_GE(stats->data_extents, 3u);
  EXPECT_TRUE(r->VerifyFile(1).ok());
  std::vector<uint8_t> page(4096, 0xff);
  ASSERT_TRUE(r->ReadPages(kHigh, 1, page.data()).ok());
  EXPECT_EQ(page, std::vector<uint8_t>(4096, 0));
}

// What another reader relies on: the documented offsets, read raw.
TEST_F(SnapshotFileTest, FileMatchesTheDocumentedLayout) {
  MakeSnapshot();
  std::ifstream in(path_, std::ios::binary);
  std::string magic(8, '\0');
  in.read(magic.data(), 8);
  EXPECT_EQ(magic, "PMLMIGSN");
  EXPECT_EQ(ReadLe(path_, kOffMajor, 2), 1u);
  EXPECT_EQ(ReadLe(path_, kOffMinor, 2), 0u);
  EXPECT_EQ(ReadLe(path_, kOffHeaderBytes, 4), 4096u);
  EXPECT_EQ(ReadLe(path_, kOffFlags, 8), 1u);
  EXPECT_EQ(ReadLe(path_, 24, 4), 4096u);
  EXPECT_EQ(ReadLe(path_, kOffVcpus, 4), 2u);
  EXPECT_EQ(ReadLe(path_, kOffRegionCount, 4), 2u);
  EXPECT_EQ(ReadLe(path_, 40, 8), 6 * kMiB);
  EXPECT_EQ(ReadLe(path_, 48, 8), 4096u);
  EXPECT_EQ(ReadLe(path_, 56, 8), 64u);
  EXPECT_EQ(ReadLe(path_, kOffDataOffset, 8), 2 * kMiB);
  EXPECT_EQ(ReadLe(path_, 72, 8), 6 * kMiB);
  EXPECT_EQ(ReadLe(path_, kOffMetaOffset, 8), 8 * kMiB);
  EXPECT_EQ(ReadLe(path_, kOffDescriptionBytes, 8), 14u);
  EXPECT_EQ(ReadLe(path_, kOffStateBytes, 8), 11u);
  EXPECT_EQ(ReadLe(path_, kOffChunkCount, 8), 3u);
  EXPECT_EQ(ReadLe(path_, kOffMetaBytes, 8), 14u + 11u + 3 * 8);
  EXPECT_EQ(std::filesystem::file_size(path_), 8 * kMiB + 14 + 11 + 3 * 8);
  // Layout entry 1: slot, reserved, gpa, size, file offset (2 MiB + 4 MiB).
  EXPECT_EQ(ReadLe(path_, 4096 + 32, 4), 1u);
  EXPECT_EQ(ReadLe(path_, 4096 + 36, 4), 0u);
  EXPECT_EQ(ReadLe(path_, 4096 + 40, 8), kHigh);
  EXPECT_EQ(ReadLe(path_, 4096 + 48, 8), 2 * kMiB);
  EXPECT_EQ(ReadLe(path_, 4096 + 56, 8), 6 * kMiB);
  // A page at R.file_offset + (G - R.gpa); the digests after the description and state.
  uint64_t v;
  std::memcpy(&v, src_.high.data() + 0x1238, 8);
  EXPECT_EQ(ReadLe(path_, 6 * kMiB + 0x1238, 8), v);
  const std::vector<uint64_t> digests = DigestAllChunks(src_.slots, ChunkLayout(src_.slots), ZeroPages::kNull);
  EXPECT_EQ(ReadLe(path_, 8 * kMiB + 25 + 16, 8), digests[2]);
  // The header checksum, computed as documented.
  std::vector<uint8_t> header(4096);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(header.data()), 4096);
  std::memset(header.data() + kOffHeaderChecksum, 0, 8);
  EXPECT_EQ(ReadLe(path_, kOffHeaderChecksum, 8), XXH3_64bits(header.data(), 4096));
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(SnapshotFileTest, UntouchedMemoryCostsNoDiskAndIsNeverTouchedOnLoad) {
  const std::vector<SnapshotRegion> regions = {{0, 0, 1ull << 30, 0}};
  auto w = SnapshotWriter::Create(path_, regions, 1, "big");
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_TRUE(w->WritePages(0x12345000, 4, src_.low.data()).ok());
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(w->Finish({}).ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_GT(static_cast<uint64_t>(st.st_size), 1ull << 30);
  EXPECT_LE(static_cast<uint64_t>(st.st_blocks) * 512, 4 * kMiB);

  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto mem = Mapping::Map(1ull << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0, "m");
  ASSERT_TRUE(mem.ok());
  SlotTable slots;
  ASSERT_TRUE(slots.Set({0, 0, mem->data(), mem->size(), 0}).ok());
  auto stats = r->LoadInto(slots, 2);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->data_extents, 1u);
  EXPECT_LE(stats->bytes_read, 64 * 1024u);
  EXPECT_EQ(std::memcmp(mem->data() + 0x12345000, src_.low.data(), 4 * 4096), 0);
  // Only the pages read became resident: holes were never touched.
  std::vector<unsigned char> resident(mem->size() / 4096);
  ASSERT_EQ(::mincore(mem->data(), mem->size(), resident.data()), 0);
  uint64_t n = 0;
  for (unsigned char c : resident) n += c & 1;
  EXPECT_LE(n, 16u);
}

TEST_F(SnapshotFileTest, ZeroPagesAfterDataReadZeroAndFreeBlocks) {
  SnapshotWriter w = NewWriter();
  WriteAll(w, src_.slots);
  struct stat before {}, after {};
  ASSERT_EQ(::fstat(w.data_fd(), &before), 0);
  ASSERT_TRUE(w.WriteZeroPages(0, 1024).ok());  // all of slot 0
  ASSERT_EQ(::fstat(w.data_fd(), &after), 0);
  EXPECT_LE(static_cast<uint64_t>(after.st_blocks) * 512 + 4 * kMiB - 64 * 1024,
            static_cast<uint64_t>(before.st_blocks) * 512);
  std::memset(src_.low.data(), 0, src_.low.size());
  const std::vector<uint64_t> expected = DigestAllChunks(src_.slots, ChunkLayout(src_.slots), ZeroPages::kNull);
  ASSERT_TRUE(w.Finish({}, &expected).ok());
  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok());
  std::vector<uint8_t> pages(8 * 4096, 0xaa);
  ASSERT_TRUE(r->ReadPages(0x100000, 8, pages.data()).ok());
  EXPECT_EQ(pages, std::vector<uint8_t>(8 * 4096, 0));
}

TEST_F(SnapshotFileTest, WriterRefusesBadLayoutsAndRuns) {
  auto create = [&](std::vector<SnapshotRegion> regions) {
    auto w = SnapshotWriter::Create(path_, regions, 1, "");
    EXPECT_EQ(w.status().code(), Code::kInvalidArgument);
    return w.status().ToString();
  };
  EXPECT_THAT(create({}), HasSubstr("no memory regions"));
  EXPECT_THAT(create({{3, 0x1000, 0, 0}}), HasSubstr("slot 3 (gpa 0x1000, 0 B): empty region"));
  EXPECT_THAT(create({{3, 0x1001, 4096, 0}}), HasSubstr("slot 3 (gpa 0x1001, 4 KiB): gpa or size not page aligned"));
  EXPECT_THAT(create({{0, 0, 8192, 0}, {1, 4096, 4096, 0}}), HasSubstr("slot 1 (gpa 0x1000, 4 KiB) overlaps slot 0"));
  EXPECT_THAT(create({{0, 0, 4096, 0}, {0, 8192, 4096, 0}}), HasSubstr("two regions are slot 0"));
  EXPECT_FALSE(std::filesystem::exists(path_ + ".partial"));
  const std::vector<SnapshotRegion> one = {{0, 0, 4096, 0}};
  EXPECT_THAT(SnapshotWriter::Create(path_, one, 0, "").status().ToString(), HasSubstr("no vCPUs"));

  SnapshotWriter w = NewWriter();
  EXPECT_THAT(w.WritePages(4 * kMiB - 4096, 2, src_.low.data()).ToString(),
              HasSubstr("2 pages from gpa 0x3ff000 run past the end of slot 0 (gpa 0x0, 4 MiB)"));
  EXPECT_THAT(w.WritePages(5 * kMiB, 1, src_.low.data()).ToString(), HasSubstr("gpa 0x500000 lies in no region"));
  EXPECT_THAT(w.WriteZeroPages(0x10, 1).ToString(), HasSubstr("not page aligned"));
  EXPECT_EQ(w.bytes_written(), 0u);
}

TEST_F(SnapshotFileTest, StalePartialIsReplacedAndAbandonLeavesNothing) {
  { std::ofstream(path_ + ".partial") << "stale junk"; }
  {
    SnapshotWriter w = NewWriter();
    EXPECT_EQ(ReadLe(path_ + ".partial", 0, 8), 0x4e5347494d4c4d50u);  // "PMLMIGSN", not the junk
    EXPECT_EQ(std::filesystem::file_size(path_ + ".partial"), 8 * kMiB);
    WriteAll(w, src_.slots);
    w.Abandon();
    EXPECT_FALSE(std::filesystem::exists(path_ + ".partial"));
    EXPECT_FALSE(w.Finish({}).ok());
  }
  { SnapshotWriter w = NewWriter(); }  // destroyed unfinished
  EXPECT_FALSE(std::filesystem::exists(path_ + ".partial"));
  EXPECT_FALSE(std::filesystem::exists(path_));
}

TEST_F(SnapshotFileTest, SecondWriterOfTheSamePathIsRefusedWhileTheFirstWrites) {
  auto regions = SnapshotRegionsOf(src_.slots);
  {
    SnapshotWriter first = NewWriter();
    auto second = SnapshotWriter::Create(path_, regions, 2, "other");
    ASSERT_FALSE(second.ok());
    EXPECT_THAT(second.status().message(), HasSubstr("another snapshot to this file is being written"));
    // The refused writer left the first one's partial file alone.
    EXPECT_EQ(ReadLe(path_ + ".partial", 0, 8), 0x4e5347494d4c4d50u);
    WriteAll(first, src_.slots);
    ASSERT_TRUE(first.Finish({}).ok());
  }
  EXPECT_TRUE(std::filesystem::exists(path_));
  // Once it is done, the next writer goes ahead.
  auto next = SnapshotWriter::Create(path_, regions, 2, "next");
  EXPECT_TRUE(next.ok()) << next.status().message();
}

TEST_F(SnapshotFileTest, OnlyARegularFileIsReplaced) {
  auto regions = SnapshotRegionsOf(src_.slots);
  const std::string fifo = dir_ + "/fifo", link = dir_ + "/link", sub = dir_ + "/sub";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ASSERT_EQ(::symlink(path_.c_str(), link.c_str()), 0);
  ASSERT_EQ(::mkdir(sub.c_str(), 0700), 0);
  for (const auto& [p, what] : {std::pair{fifo, "is a FIFO"}, {link, "is a symbolic link"}, {sub, "is a directory"},
                                {std::string("/dev/null"), "is a device"}}) {
    auto w = SnapshotWriter::Create(p, regions, 2, "");
    ASSERT_FALSE(w.ok()) << p;
    EXPECT_THAT(w.status().message(), HasSubstr(what)) << p;
    EXPECT_FALSE(std::filesystem::exists(p + ".partial")) << p;
  }
  // Nor is one opened for reading: a FIFO would block the open.
  auto r = SnapshotReader::Open(fifo);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("not a regular file"));
  struct stat st {};
  ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
  ASSERT_EQ(::stat("/dev/null", &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
}

TEST_F(SnapshotFileTest, FailedFinishLeavesThePreviousSnapshot) {
  MakeSnapshot("first");
  Fill(src_.low.data(), src_.low.size(), 9);
  SnapshotWriter w = NewWriter("second");
  WriteAll(w, src_.slots);
  Fill(src_.low.data() + 3 * kMiB + 4096, 4096, 10);  // the source changed a page nobody re-sent
  const std::vector<uint64_t> expected = DigestAllChunks(src_.slots, ChunkLayout(src_.slots), ZeroPages::kNull);
  const Status finished = w.Finish({}, &expected);
  EXPECT_EQ(finished.code(), Code::kDataLoss);
  EXPECT_THAT(finished.ToString(), HasSubstr("1 chunk (2 MiB) differs: gpa 0x200000-0x3fffff"));
  auto first = SnapshotReader::Open(path_);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_EQ(first->description(), "first");
  // The caller re-sends the page and finishes after all.
  ASSERT_TRUE(w.WritePages(3 * kMiB + 4096, 1, src_.low.data() + 3 * kMiB + 4096).ok());
  ASSERT_TRUE(w.Finish({}, &expected).ok());
  auto second = SnapshotReader::Open(path_);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->description(), "second");
}

TEST_F(SnapshotFileTest, ConcurrentWritersKeepFileAndDigestsInStep) {
  SnapshotWriter w = NewWriter();
  // Four threads write every page of slot 0 in overlapping runs of differing
  // content; whichever write of a page lands last, its digest must agree.
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint8_t> buf(7 * 4096);
      for (uint64_t page = static_cast<uint64_t>(t); page + 7 <= 1024; page += 3) {
        Fill(buf.data(), buf.size(), page * 4 + static_cast<uint64_t>(t));
        EXPECT_TRUE(w.WritePages(page * 4096, 7, buf.data()).ok());
      }
    });
  }
  for (std::thread& t : threads) t.join();
  ASSERT_TRUE(w.WritePages(kHigh, 512, src_.high.data()).ok());
  ASSERT_TRUE(w.Finish({}).ok());
  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->VerifyFile(4).ok());
}

TEST_F(SnapshotFileTest, ForeignFilesAreNotSnapshots) {
  std::vector<uint8_t> junk(8192);
  Fill(junk.data(), junk.size(), 5);
  std::ofstream(path_, std::ios::binary).write(reinterpret_cast<const char*>(junk.data()), 8192);
  EXPECT_THAT(OpenError(), HasSubstr(path_ + ": not a pmlmig snapshot"));
  std::ofstream(path_) << "a plain text file\n";
  EXPECT_THAT(OpenError(), HasSubstr("not a pmlmig snapshot"));
  std::ofstream(path_, std::ios::trunc).flush();
  EXPECT_THAT(OpenError(), HasSubstr("not a pmlmig snapshot"));
  MakeSnapshot();
  FlipByte(path_, 3);
  EXPECT_THAT(OpenError(), HasSubstr("not a pmlmig snapshot (no \"PMLMIGSN\" magic at offset 0)"));
}

TEST_F(SnapshotFileTest, VersionRule) {
  MakeSnapshot();
  Patch(path_, kOffMinor, 2, 7);  // a newer minor version only adds fields: still read
  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->minor_version(), 7u);
  Patch(path_, kOffMajor, 2, 2);
  EXPECT_THAT(OpenError(), HasSubstr("format version 2.7 (header offset 8), this pmlmig reads 1.x"));
}

TEST_F(SnapshotFileTest, DamagedHeaderIsRefused) {
  MakeSnapshot();
  FlipByte(path_, 2000);  // a reserved byte
  EXPECT_THAT(OpenError(), HasSubstr("header checksum mismatch: header checksum (header offset 152) is 0x"));
  FlipByte(path_, 2000);
  ASSERT_TRUE(SnapshotReader::Open(path_).ok());
  FlipByte(path_, kOffVcpus);
  EXPECT_THAT(OpenError(), HasSubstr("header checksum mismatch"));
}

TEST_F(SnapshotFileTest, UnfinishedSnapshotReadsIncomplete) {
  SnapshotWriter w = NewWriter();
  WriteAll(w, src_.slots);
  std::filesystem::rename(path_ + ".partial", path_);  // as if someone published it by hand
  EXPECT_THAT(OpenError(), HasSubstr("incomplete: the snapshot was not finished"));
}

TEST_F(SnapshotFileTest, TruncatedFileIsRefused) {
  MakeSnapshot();
  const uint64_t size = std::filesystem::file_size(path_);
  std::filesystem::resize_file(path_, size - 1);
  EXPECT_THAT(OpenError(), HasSubstr("truncated: the meta section ends at byte " + std::to_string(size) +
                                     " but the file has " + std::to_string(size - 1) + " bytes"));
  std::filesystem::resize_file(path_, 5 * kMiB);
  EXPECT_THAT(OpenError(),
              HasSubstr("truncated: the data section ends at byte 8388608 but the file has 5242880 bytes"));
  std::filesystem::resize_file(path_, 100);
  EXPECT_THAT(OpenError(), HasSubstr("truncated: the header ends at byte 4096 but the file has 100 bytes"));
}

TEST_F(SnapshotFileTest, TruncatedAfterOpenIsDataLossNamingTheGpa) {
  MakeSnapshot();
  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok());
  std::filesystem::resize_file(path_, 6 * kMiB + 2 * 4096);
  std::vector<uint8_t> page(4096);
  const Status s = r->ReadPages(kHigh + 2 * 4096, 1, page.data());
  EXPECT_EQ(s.code(), Code::kDataLoss);
  EXPECT_THAT(s.ToString(), HasSubstr("short read at gpa 0x100002000"));
  EXPECT_TRUE(r->ReadPages(kHigh + 4096, 1, page.data()).ok());
  EXPECT_THAT(r->VerifyFile(2).ToString(), HasSubstr("truncated after it was opened"));
}

TEST_F(SnapshotFileTest, DamagedLayoutIsRefused) {
  MakeSnapshot();
  FlipByte(path_, 4096 + 40);  // region 1's gpa
  EXPECT_THAT(OpenError(), HasSubstr("layout checksum mismatch: layout checksum (header offset 136)"));
  FlipByte(path_, 4096 + 40);
  // A consistent but impossible layout: region 1 moved onto region 0, checksums redone.
  Patch(path_, 4096 + 40, 8, 0x200000, false);
  std::vector<uint8_t> layout(64);
  UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(::pread(fd.get(), layout.data(), 64, 4096), 64);
  Patch(path_, kOffLayoutChecksum, 8, XXH3_64bits(layout.data(), 64));
  EXPECT_THAT(OpenError(), HasSubstr("layout (offset 4096): slot 1 (gpa 0x200000, 2 MiB) overlaps slot 0"));
  // A file offset outside the data section.
  Patch(path_, 4096 + 40, 8, kHigh, false);
  Patch(path_, 4096 + 56, 8, 8 * kMiB, false);
  ASSERT_EQ(::pread(fd.get(), layout.data(), 64, 4096), 64);
  Patch(path_, kOffLayoutChecksum, 8, XXH3_64bits(layout.data(), 64));
  EXPECT_THAT(OpenError(), HasSubstr("layout entry 1 (offset 4128), slot 1 (gpa 0x100000000, 2 MiB): file offset"));
}

TEST_F(SnapshotFileTest, DamagedMetaIsRefused) {
  MakeSnapshot();
  FlipByte(path_, 8 * kMiB + 16);  // inside the state
  EXPECT_THAT(OpenError(), HasSubstr("meta checksum mismatch: meta checksum (header offset 128)"));
}

TEST_F(SnapshotFileTest, FlippedDataByteNamesTheDamagedRange) {
  MakeSnapshot();
  FlipByte(path_, 2 * kMiB + 0x234567);
  EXPECT_THAT(LoadError(), HasSubstr("1 chunk (2 MiB) differs: gpa 0x200000-0x3fffff"));
  FlipByte(path_, 2 * kMiB + 0x234567);
  FlipByte(path_, 6 * kMiB + 0x1234);
  EXPECT_THAT(LoadError(), HasSubstr("gpa 0x100000000-0x1001fffff"));
}

TEST_F(SnapshotFileTest, HostileSizesAreRefusedBeforeAllocating) {
  MakeSnapshot();
  Patch(path_, kOffStateBytes, 8, 1ull << 60);
  EXPECT_THAT(OpenError(), HasSubstr("meta bytes (header offset 88) is 49: not description bytes + state bytes"));
  Patch(path_, kOffMetaBytes, 8, (1ull << 60) + 14 + 3 * 8);
  EXPECT_THAT(OpenError(), HasSubstr("truncated: the meta section ends at byte"));
  Patch(path_, kOffStateBytes, 8, ~0ull);
  EXPECT_THAT(OpenError(), HasSubstr("(overflows)"));
  MakeSnapshot();
  Patch(path_, kOffRegionCount, 4, 0x80000000u);
  EXPECT_THAT(OpenError(), HasSubstr("region count (header offset 32) is 2147483648"));
  MakeSnapshot();
  Patch(path_, kOffChunkCount, 8, 2);
  Patch(path_, kOffMetaBytes, 8, 14 + 11 + 2 * 8);
  EXPECT_THAT(OpenError(), HasSubstr("the regions make 3 chunks"));
  MakeSnapshot();
  Patch(path_, kOffDataOffset, 8, 3 * kMiB);
  EXPECT_THAT(OpenError(), HasSubstr("data offset (header offset 64) is 3145728: not 2 MiB aligned"));
}

TEST_F(SnapshotFileTest, LoadIntoRefusesOtherMemory) {
  MakeSnapshot();
  auto r = SnapshotReader::Open(path_);
  ASSERT_TRUE(r.ok());
  Memory other = NewMemory(4 * kMiB, 4 * kMiB);
  auto loaded = r->LoadInto(other.slots, 1);
  EXPECT_EQ(loaded.status().code(), Code::kInvalidArgument);
  EXPECT_THAT(loaded.status().ToString(),
              HasSubstr("memory slot 1 (gpa 0x100000000, 4 MiB) is not the snapshot's slot 1 (gpa 0x100000000, 2 MiB)"));
}

}  // namespace
}  // namespace pmlmig::engine
