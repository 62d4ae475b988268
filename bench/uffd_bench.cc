// Which userfaultfd mode should post-copy use for memfd-backed guest memory?
//
// After pre-copy the destination's memfd holds every page; those dirtied since
// they were sent are stale and must be fetched on demand. Two ways:
//   A MISSING: punch the stale pages (fallocate PUNCH_HOLE), register the guest
//     mapping MODE_MISSING, fill a fault with UFFDIO_COPY (the kernel allocates
//     a fresh page and copies into it).
//   B MINOR: keep the stale pages in the page cache, drop the mapping's PTEs
//     (MADV_DONTNEED over the whole region), register MODE_MINOR
//     (UFFD_FEATURE_MINOR_SHMEM), fill a fault with pwrite(2) into the memfd
//     (reusing the allocated page), then UFFDIO_CONTINUE.
//   B2 (extra): B, but MADV_DONTNEED only the stale runs, so the pages that are
//     not stale keep their PTEs and never fault.
// Per mode, medians of --repeat interleaved runs, each on a fresh memfd first
// written whole through the guest mapping (what pre-copy did):
//   1 fault latency: a plain thread (not a KVM vCPU) writes a byte to each of
//     --faults random stale pages; a handler thread poll()s and read()s the uffd
//     and services each fault; timed around the write, in the toucher. Twice:
//     handler pinned to the toucher's CPU, and to another CPU. On a nested VM,
//     waking a thread on an idle (halted) vCPU is expensive and would hide the
//     modes' own cost, so both placements are shown, plus the handler's share
//     (read() returned to fill ioctl done).
//   2 bulk fill: no faults; every stale 1 MiB run installed with one UFFDIO_COPY,
//     or one pwrite + one UFFDIO_CONTINUE; GB/s of stale data.
//   3 touching the pages that are not stale: no fault in A and B2; in B each is
//     in the page cache but unmapped, so it takes a MINOR fault to CONTINUE.
//   4 setup before registration: punching (A) or MADV_DONTNEED (B, B2).
// First-touching new memory is slow on this host (A fills fresh pages, B reuses
// them), hence the populate rate. Run it on otherwise idle CPUs.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pmlmig/base/mapping.h"
#include "pmlmig/base/status.h"
#include "pmlmig/base/unique_fd.h"

namespace {

using pmlmig::Mapping;
using pmlmig::Result;
using pmlmig::Status;
using pmlmig::UniqueFd;

constexpr size_t kPage = 4096;
constexpr size_t kRunPages = 256;  // stale pages come in 1 MiB runs
constexpr size_t kRun = kPage * kRunPages;
constexpr uint8_t kStale = 0x5a, kFetched = 0xc3;  // page contents, checked after filling

enum Mode { kMissing, kMinor, kMinorSparse, kNumModes };
constexpr const char* kModeKey[] = {"missing", "minor", "minor_sparse"};
constexpr const char* kModeLabel[] = {"A MISSING", "B MINOR", "B2 MINOR-sparse"};

// Per fault trial (handler on the toucher's CPU, then on another), then the rest.
enum Metric { kP50, kP99, kMax, kSvc, kTouchNs, kTrialMetrics = 5 };
enum { kSame = 0, kOther = kTrialMetrics, kFillGbs = 2 * kTrialMetrics, kTouchFaults, kSetupMs, kPopulateGbs,
       kNumMetrics };
struct MetricInfo { const char* key; const char* label; int digits; };
constexpr MetricInfo kMetrics[] = {
    {"same_cpu_fault_p50_us", "1 fault, handler same CPU: p50 (us)", 1},
    {"same_cpu_fault_p99_us", "                           p99 (us)", 1},
    {"same_cpu_fault_max_us", "                           max (us)", 0},
    {"same_cpu_service_p50_us", "    handler's share p50 (us)", 1},
    {"same_cpu_touch_present_ns", "3 touch non-stale, same CPU (ns/page)", 0},
    {"other_cpu_fault_p50_us", "1 fault, handler other CPU: p50 (us)", 1},
    {"other_cpu_fault_p99_us", "                            p99 (us)", 1},
    {"other_cpu_fault_max_us", "                            max (us)", 0},
    {"other_cpu_service_p50_us", "    handler's share p50 (us)", 1},
    {"other_cpu_touch_present_ns", "3 touch non-stale, other CPU (ns/page)", 0},
    {"fill_gbps", "2 bulk fill (GB/s)", 2},
    {"touch_present_uffd_faults", "3 uffd faults per non-stale pass", 0},
    {"setup_ms", "4 setup: punch / DONTNEED (ms)", 2},
    {"populate_gbps", "  info: populate, first touch (GB/s)", 2},
};
static_assert(std::size(kMetrics) == kNumMetrics);
// Printed in this order: latencies, then 2, 3, 4.
constexpr int kRowOrder[] = {0, 1, 2, 3, 5, 6, 7, 8, 10, 4, 9, 11, 12, 13};

struct Options {
  size_t size_mib = 256;         // memfd size
  double needed_fraction = 0.5;  // fraction of the 1 MiB runs that are stale
  size_t faults = 20000;         // faults per latency trial (at most the stale pages)
  int repeat = 5;                // interleaved runs; medians are reported
  std::string json;              // also write JSON here when set
};

uint64_t NowNs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return uint64_t(ts.tv_sec) * 1'000'000'000 + uint64_t(ts.tv_nsec);
}

[[noreturn]] void Fatal(int err, const std::string& what) {
  std::fprintf(stderr, "pmlmig_bench_uffd: %s: %s\n", what.c_str(), std::strerror(err));
  std::fflush(stderr);
  ::_exit(1);  // from any thread: the toucher may be blocked in a fault
}

void Pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (::sched_setaffinity(0, sizeof set, &set) != 0) Fatal(errno, "sched_setaffinity " + std::to_string(cpu));
}

// userfaultfd(2); where unprivileged use is off (EPERM), /dev/userfaultfd.
Result<UniqueFd> OpenUffd(uint64_t features) {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  UniqueFd fd(static_cast<int>(::syscall(SYS_userfaultfd, flags)));
  if (!fd.valid() && errno == EPERM) {
    UniqueFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
    if (!dev.valid()) return Status::FromErrno(errno, "userfaultfd(2) gave EPERM; open /dev/userfaultfd");
    fd.Reset(::ioctl(dev.get(), USERFAULTFD_IOC_NEW, flags));
    if (!fd.valid()) return Status::FromErrno(errno, "USERFAULTFD_IOC_NEW on /dev/userfaultfd");
  } else if (!fd.valid()) {
    return Status::FromErrno(errno, "userfaultfd(2)");
  }
  uffdio_api api{.api = UFFD_API, .features = features, .ioctls = 0};
  if (::ioctl(fd.get(), UFFDIO_API, &api) != 0) {
    return Status::FromErrno(errno, features ? "UFFDIO_API (UFFD_FEATURE_MINOR_SHMEM)" : "UFFDIO_API");
  }
  return fd;
}

// 0 or the errno of UFFDIO_COPY / UFFDIO_CONTINUE / pwrite over a range;
// EAGAIN (the mm changed under the ioctl) resumes after what it did.
int CopyRange(int uffd, uint64_t dst, const uint8_t* src, size_t len) {
  for (size_t done = 0;;) {
    uffdio_copy c{.dst = dst + done, .src = reinterpret_cast<uint64_t>(src + done), .len = len - done,
                  .mode = 0, .copy = 0};
    if (::ioctl(uffd, UFFDIO_COPY, &c) == 0) return 0;
    if (errno != EAGAIN) return errno;
    if (c.copy > 0) done += size_t(c.copy);
  }
}
int ContinueRange(int uffd, uint64_t dst, size_t len) {
  for (size_t done = 0;;) {
    uffdio_continue c{.range = {dst + done, len - done}, .mode = 0, .mapped = 0};
    if (::ioctl(uffd, UFFDIO_CONTINUE, &c) == 0) return 0;
    if (errno != EAGAIN) return errno;
    if (c.mapped > 0) done += size_t(c.mapped);
  }
}
int PwriteAll(int fd, const uint8_t* src, size_t len, off_t off) {
  for (size_t done = 0; done < len;) {
    ssize_t n = ::pwrite(fd, src + done, len - done, off + off_t(done));
    if (n < 0 && errno != EINTR) return errno;
    if (n > 0) done += size_t(n);
  }
  return 0;
}

// One trial's guest memory: stale runs prepared for `mode`, then registered.
struct Region {
  UniqueFd memfd;
  Mapping guest;
  UniqueFd uffd;
  uint8_t* base() const { return guest.data(); }
};

Result<Region> Prepare(Mode mode, size_t bytes, const std::vector<size_t>& runs, double* setup_ms,
                       double* populate_gbps) {
  Region r;
  r.memfd.Reset(::memfd_create("pmlmig_bench_uffd", MFD_CLOEXEC));
  if (!r.memfd.valid()) return Status::FromErrno(errno, "memfd_create");
  if (::ftruncate(r.memfd.get(), off_t(bytes)) != 0) return Status::FromErrno(errno, "ftruncate memfd");
  PMLMIG_ASSIGN_OR_RETURN(r.guest, Mapping::Map(bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                                                r.memfd.get(), 0, "guest memfd"));
  uint64_t t0 = NowNs();
  std::memset(r.base(), kStale, bytes);  // pre-copy wrote every page through the guest mapping
  *populate_gbps = double(bytes) / double(NowNs() - t0);

  t0 = NowNs();  // A: punch the stale runs; B: unmap everything; B2: unmap the stale runs
  int err = mode == kMinor && ::madvise(r.base(), bytes, MADV_DONTNEED) != 0 ? errno : 0;
  for (size_t i = 0; mode != kMinor && err == 0 && i < runs.size(); ++i) {
    const size_t off = runs[i] * kRun;
    if ((mode == kMissing ? ::fallocate(r.memfd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off_t(off),
                                        off_t(kRun))
                          : ::madvise(r.base() + off, kRun, MADV_DONTNEED)) != 0) {
      err = errno;
    }
  }
  if (err != 0) return Status::FromErrno(err, mode == kMissing ? "fallocate PUNCH_HOLE" : "madvise DONTNEED");
  *setup_ms = double(NowNs() - t0) / 1e6;

  PMLMIG_ASSIGN_OR_RETURN(r.uffd, OpenUffd(mode == kMissing ? 0 : UFFD_FEATURE_MINOR_SHMEM));
  uffdio_register reg{};
  reg.range = {reinterpret_cast<uint64_t>(r.base()), bytes};
  reg.mode = mode == kMissing ? UFFDIO_REGISTER_MODE_MISSING : UFFDIO_REGISTER_MODE_MINOR;
  if (::ioctl(r.uffd.get(), UFFDIO_REGISTER, &reg) != 0) {
    return Status::FromErrno(errno, std::string("UFFDIO_REGISTER ") + kModeKey[mode] + " on memfd mapping");
  }
  const uint64_t want = uint64_t{1} << (mode == kMissing ? _UFFDIO_COPY : _UFFDIO_CONTINUE);
  if ((reg.ioctls & want) == 0) return pmlmig::Unavailable("UFFDIO_REGISTER: fill ioctl not offered");
  return r;
}

// The post-copy fault handler: one thread on `cpu`, poll() + read() of
// uffd_msg, each fault serviced before the next read. Stop() joins it.
class Handler {
 public:
  Handler(Mode mode, const Region& r, const std::vector<uint8_t>& stale, const uint8_t* src, int cpu)
      : mode_(mode), r_(r), stale_(stale), src_(src), stop_(::eventfd(0, EFD_CLOEXEC)) {
    if (!stop_.valid()) Fatal(errno, "eventfd");
    service_us_.reserve(stale.size() + 1024);  // no allocation while servicing
    thread_ = std::thread([this, cpu] { Pin(cpu), Loop(); });
  }
  ~Handler() { Stop(); }
  void Stop() {
    if (!thread_.joinable()) return;
    uint64_t one = 1;
    if (::write(stop_.get(), &one, sizeof one) != sizeof one) Fatal(errno, "eventfd write");
    thread_.join();
  }
  uint64_t faults() const { return faults_.load(std::memory_order_relaxed); }
  // Per fault in order, read() returned to fill ioctl done. After Stop() only.
  const std::vector<float>& service_us() const { return service_us_; }

 private:
  void Loop() {
    pollfd fds[2] = {{r_.uffd.get(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    uffd_msg msgs[16];
    for (;;) {
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        Fatal(errno, "poll uffd");
      }
      if (fds[1].revents != 0) return;
      const ssize_t n = ::read(r_.uffd.get(), msgs, sizeof msgs);
      const uint64_t t0 = NowNs();
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) continue;
        Fatal(errno, "read uffd");
      }
      for (ssize_t i = 0; i < n / ssize_t(sizeof(uffd_msg)); ++i) {
        if (msgs[i].event != UFFD_EVENT_PAGEFAULT) continue;
        // Counted before the wake, so a toucher that resumed sees its own fault.
        faults_.fetch_add(1, std::memory_order_relaxed);
        Service(msgs[i].arg.pagefault.address & ~uint64_t{kPage - 1});
        if (service_us_.size() < service_us_.capacity()) service_us_.push_back(float(NowNs() - t0) / 1e3f);
      }
    }
  }
  void Service(uint64_t page) {
    const size_t idx = (page - reinterpret_cast<uint64_t>(r_.base())) / kPage;
    const uint8_t* data = src_ + (idx % kRunPages) * kPage;
    int err = 0;
    if (mode_ == kMissing) {
      err = CopyRange(r_.uffd.get(), page, data, kPage);
    } else {
      if (stale_[idx] != 0 && (err = PwriteAll(r_.memfd.get(), data, kPage, off_t(idx * kPage))) != 0) {
        Fatal(err, "pwrite memfd page " + std::to_string(idx));
      }
      err = ContinueRange(r_.uffd.get(), page, kPage);
    }
    if (err == EEXIST) {  // already mapped: just wake the faulter
      uffdio_range range{page, kPage};
      if (::ioctl(r_.uffd.get(), UFFDIO_WAKE, &range) != 0) Fatal(errno, "UFFDIO_WAKE");
    } else if (err != 0) {
      Fatal(err, std::string(mode_ == kMissing ? "UFFDIO_COPY" : "UFFDIO_CONTINUE") + " page " +
                     std::to_string(idx));
    }
  }

  const Mode mode_;
  const Region& r_;
  const std::vector<uint8_t>& stale_;
  const uint8_t* const src_;
  UniqueFd stop_;
  std::atomic<uint64_t> faults_{0};  // written by the handler, read by the toucher
  std::vector<float> service_us_;    // the handler's until Stop()
  std::thread thread_;
};

float Percentile(std::vector<float>::iterator b, std::vector<float>::iterator e, double q) {
  if (b == e) return 0;
  auto at = b + std::min<ptrdiff_t>(e - b - 1, ptrdiff_t(std::ceil(double(e - b) * q)) - 1);
  std::nth_element(b, at, e);
  return *at;
}

struct Trial {  // what one run of one mode shares between its measurements
  Mode mode;
  size_t bytes;
  const std::vector<size_t>& runs;
  const std::vector<uint8_t>& stale;
  const uint8_t* src;
};

// Measurements 1 and 3 (and 4) with the handler on `cpu`; m: kTrialMetrics values.
Status FaultTrial(const Trial& t, const std::vector<size_t>& touch, int cpu, double* m, double* setup_ms,
                  double* populate_gbps, double* touch_faults) {
  PMLMIG_ASSIGN_OR_RETURN(Region r, Prepare(t.mode, t.bytes, t.runs, setup_ms, populate_gbps));
  Handler handler(t.mode, r, t.stale, t.src, cpu);
  std::vector<float> lat(touch.size());
  volatile uint8_t* g = r.base();
  for (size_t i = 0; i < touch.size(); ++i) {
    const uint64_t t0 = NowNs();
    g[touch[i] * kPage + 1] = 1;
    lat[i] = float(NowNs() - t0) / 1e3f;
  }
  for (size_t p : touch) {  // the fetched data, not the stale data, must be there
    if (g[p * kPage] != kFetched) return pmlmig::DataLoss("fault-filled page " + std::to_string(p));
  }
  m[kP50] = Percentile(lat.begin(), lat.end(), 0.5);
  m[kP99] = Percentile(lat.begin(), lat.end(), 0.99);
  m[kMax] = *std::max_element(lat.begin(), lat.end());

  const uint64_t before = handler.faults();
  size_t touched = 0;
  const uint64_t t0 = NowNs();
  for (size_t p = 0; p < t.stale.size(); ++p) {
    if (t.stale[p] != 0) continue;
    g[p * kPage + 2] = 1;
    ++touched;
  }
  m[kTouchNs] = touched == 0 ? 0 : double(NowNs() - t0) / double(touched);
  *touch_faults = double(handler.faults() - before);
  handler.Stop();
  std::vector<float> svc = handler.service_us();
  m[kSvc] = Percentile(svc.begin(), svc.begin() + ptrdiff_t(std::min<size_t>(before, svc.size())), 0.5);
  return Status::Ok();
}

// Measurement 2: a filler thread installs every stale run; GB/s.
Status FillTrial(const Trial& t, double* gbps) {
  double unused_setup, unused_populate;
  PMLMIG_ASSIGN_OR_RETURN(Region r, Prepare(t.mode, t.bytes, t.runs, &unused_setup, &unused_populate));
  Status st;
  uint64_t elapsed = 0;
  std::thread filler([&] {
    const uint64_t t0 = NowNs();
    for (size_t run : t.runs) {
      const uint64_t dst = reinterpret_cast<uint64_t>(r.base()) + run * kRun;
      int err = t.mode == kMissing ? CopyRange(r.uffd.get(), dst, t.src, kRun)
                                   : PwriteAll(r.memfd.get(), t.src, kRun, off_t(run * kRun));
      if (err == 0 && t.mode != kMissing) err = ContinueRange(r.uffd.get(), dst, kRun);
      if (err != 0) {
        st = Status::FromErrno(err, "bulk fill run " + std::to_string(run));
        return;
      }
    }
    elapsed = NowNs() - t0;
  });
  filler.join();
  PMLMIG_RETURN_IF_ERROR(st);
  for (size_t run : t.runs) {
    const uint8_t* p = r.base() + run * kRun;
    if (p[0] != kFetched || p[kRun - 1] != kFetched) return pmlmig::DataLoss("filled run " + std::to_string(run));
  }
  *gbps = double(t.runs.size() * kRun) / double(elapsed);
  return Status::Ok();
}

double Median(std::vector<double> v) {  // NaN (not measured) if any sample is
  if (std::any_of(v.begin(), v.end(), [](double x) { return std::isnan(x); })) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

[[noreturn]] void Usage(int rc) {
  std::fprintf(rc ? stderr : stdout,
               "usage: pmlmig_bench_uffd [--size-mib N] [--needed-fraction F] [--faults N] [--repeat N]\n"
               "                         [--json FILE]\n"
               "  --size-mib N         memfd size in MiB (default 256)\n"
               "  --needed-fraction F  fraction (0,1] of the 1 MiB runs that are stale (default 0.5)\n"
               "  --faults N           faults per latency trial (default 20000)\n"
               "  --repeat N           interleaved runs per mode; medians reported (default 5)\n"
               "  --json FILE          also write the results as JSON\n");
  std::exit(rc);
}

template <typename T>
T ParseNumber(std::string_view flag, std::string_view s, T lo, T hi, const char* want) {
  T v{};
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || !(v >= lo && v <= hi)) {
    std::fprintf(stderr, "pmlmig_bench_uffd: %.*s: bad value '%.*s' (want %s)\n", int(flag.size()), flag.data(),
                 int(s.size()), s.data(), want);
    std::exit(2);
  }
  return v;
}

Options ParseFlags(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i], flag = arg, value;
    if (arg == "--help" || arg == "-h") Usage(0);
    const size_t eq = arg.find('=');
    if (eq != arg.npos) flag = arg.substr(0, eq), value = arg.substr(eq + 1);
    static constexpr std::string_view kKnown[] = {"--size-mib", "--needed-fraction", "--faults", "--repeat",
                                                  "--json"};
    if (std::find(std::begin(kKnown), std::end(kKnown), flag) == std::end(kKnown)) {
      std::fprintf(stderr, "pmlmig_bench_uffd: unknown argument '%.*s' (try --help)\n", int(flag.size()),
                   flag.data());
      std::exit(2);
    }
    if (eq == arg.npos && i + 1 >= argc) {
      std::fprintf(stderr, "pmlmig_bench_uffd: %s needs a value\n", argv[i]);
      std::exit(2);
    }
    if (eq == arg.npos) value = argv[++i];
    if (flag == "--size-mib") o.size_mib = ParseNumber<size_t>(flag, value, 1, 1 << 20, "1 to 1048576");
    if (flag == "--needed-fraction") o.needed_fraction = ParseNumber<double>(flag, value, 1e-9, 1, "0 < F <= 1");
    if (flag == "--faults") o.faults = ParseNumber<size_t>(flag, value, 1, size_t{1} << 32, "1 to 2^32");
    if (flag == "--repeat") o.repeat = ParseNumber<int>(flag, value, 1, 1000, "1 to 1000");
    if (flag == "--json") o.json = value;
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = ParseFlags(argc, argv);
  const size_t chunks = o.size_mib, pages = chunks * kRunPages;
  const size_t nruns = std::max<size_t>(1, size_t(std::lround(o.needed_fraction * double(chunks))));
  const size_t nfaults = std::min(o.faults, nruns * kRunPages);
  cpu_set_t allowed;
  if (::sched_getaffinity(0, sizeof allowed, &allowed) != 0) Fatal(errno, "sched_getaffinity");
  std::vector<int> cpus;
  for (int c = 0; c < CPU_SETSIZE && cpus.size() < 2; ++c) {
    if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
  }
  Pin(cpus[0]);  // the toucher, the filler and the main thread
  auto src = Mapping::Map(kRun, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, "source buffer");
  if (!src.ok()) return std::fprintf(stderr, "%s\n", src.status().message().c_str()), 1;
  std::memset(src->data(), kFetched, kRun);  // the "fetched" data, already in memory

  std::vector<double> samples[kNumModes][kNumMetrics];
  for (int rep = 0; rep < o.repeat; ++rep) {
    std::mt19937_64 rng(0x75ffd + uint64_t(rep));  // the same stale set for every mode of a repeat
    std::vector<size_t> runs(chunks);
    std::iota(runs.begin(), runs.end(), 0);
    std::shuffle(runs.begin(), runs.end(), rng);
    runs.resize(nruns);
    std::sort(runs.begin(), runs.end());
    std::vector<uint8_t> stale(pages, 0);
    std::vector<size_t> touch;
    for (size_t run : runs) {
      std::fill_n(stale.begin() + ptrdiff_t(run * kRunPages), kRunPages, 1);
      for (size_t p = run * kRunPages; p < (run + 1) * kRunPages; ++p) touch.push_back(p);
    }
    std::shuffle(touch.begin(), touch.end(), rng);
    touch.resize(nfaults);
    for (int mode = 0; mode < kNumModes; ++mode) {
      const Trial t{Mode(mode), o.size_mib << 20, runs, stale, src->data()};
      double m[kNumMetrics], unused[2];
      std::fill(std::begin(m), std::end(m), NAN);
      Status st = FaultTrial(t, touch, cpus[0], &m[kSame], &m[kSetupMs], &m[kPopulateGbs], &m[kTouchFaults]);
      if (st.ok() && cpus.size() > 1) {
        st = FaultTrial(t, touch, cpus[1], &m[kOther], &unused[0], &unused[1], &unused[0]);
      }
      if (st.ok()) st = FillTrial(t, &m[kFillGbs]);
      if (!st.ok()) {  // e.g. userfaultfd unavailable, or MINOR_SHMEM unsupported
        std::fprintf(stderr, "pmlmig_bench_uffd: mode %s: %s\n", kModeKey[mode], st.message().c_str());
        return 1;
      }
      for (int k = 0; k < kNumMetrics; ++k) samples[mode][k].push_back(m[k]);
    }
  }

  utsname u{};
  ::uname(&u);
  std::string thp;
  std::getline(std::ifstream("/sys/kernel/mm/transparent_hugepage/shmem_enabled"), thp);
  if (size_t b = thp.find('['), e = thp.find(']'); b < e && e != thp.npos) thp = thp.substr(b + 1, e - b - 1);
  std::printf("pmlmig_bench_uffd: %zu MiB memfd, %zu of %zu 1 MiB runs stale (%zu pages), %zu faults per trial,\n"
              "  medians of %d interleaved runs; kernel %s; shmem THP: %s; CPUs %d and %d\n"
              "  toucher: a plain thread (not a KVM vCPU); handler: one thread, poll()+read()\n\n",
              o.size_mib, nruns, chunks, nruns * kRunPages, nfaults, o.repeat, u.release, thp.c_str(), cpus[0],
              cpus.size() > 1 ? cpus[1] : -1);
  std::printf("%-40s", "metric");
  for (const char* label : kModeLabel) std::printf("%17s", label);
  std::printf("\n");
  for (int k : kRowOrder) {
    std::printf("%-40s", kMetrics[k].label);
    for (int mode = 0; mode < kNumModes; ++mode) {
      const double v = Median(samples[mode][k]);
      std::isnan(v) ? std::printf("%17s", "n/a") : std::printf("%17.*f", kMetrics[k].digits, v);
    }
    std::printf("\n");
  }
  if (o.json.empty()) return 0;
  std::FILE* f = std::fopen(o.json.c_str(), "w");
  if (f == nullptr) return std::fprintf(stderr, "open %s: %s\n", o.json.c_str(), std::strerror(errno)), 1;
  auto num = [f](double v) { std::isnan(v) ? std::fprintf(f, "null") : std::fprintf(f, "%.6g", v); };
  std::fprintf(f,
               "{\n  \"config\": {\"size_mib\": %zu, \"stale_runs\": %zu, \"runs\": %zu, \"faults\": %zu, "
               "\"repeat\": %d, \"kernel\": \"%s\", \"shmem_thp\": \"%s\", \"toucher\": \"thread\"},\n"
               "  \"modes\": {",
               o.size_mib, nruns, chunks, nfaults, o.repeat, u.release, thp.c_str());
  for (int mode = 0; mode < kNumModes; ++mode) {
    std::fprintf(f, "%s\n    \"%s\": {", mode ? "," : "", kModeKey[mode]);
    for (int k = 0; k < kNumMetrics; ++k) {
      std::fprintf(f, "%s\n      \"%s\": {\"median\": ", k ? "," : "", kMetrics[k].key);
      num(Median(samples[mode][k]));
      std::fprintf(f, ", \"samples\": [");
      for (size_t i = 0; i < samples[mode][k].size(); ++i) {
        std::fprintf(f, "%s", i ? ", " : "");
        num(samples[mode][k][i]);
      }
      std::fprintf(f, "]}");
    }
    std::fprintf(f, "\n    }");
  }
  std::fprintf(f, "\n  }\n}\n");
  return std::fclose(f) == 0 ? 0 : 1;
}
