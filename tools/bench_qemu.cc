#include "bench_qemu.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <utility>
#include <vector>

#include "bench_baselines.h"
#include "commands.h"
#include "pmlmig/base/mapping.h"
#include "pmlmig/base/unique_fd.h"

namespace pmlmig::tools {
namespace {

using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

constexpr auto kPoll = std::chrono::milliseconds(25);      // query-migrate while migrating
constexpr auto kStartTimeout = std::chrono::seconds(20);   // process start to QMP greeting
constexpr auto kCommandTimeout = std::chrono::seconds(20); // one QMP command's reply

// A private directory for the QMP sockets and the processes' logs, removed
// with what is in it.
class TempDir {
 public:
  static Result<TempDir> Create() {
    std::string tmpl = "/tmp/pmlmig-qemu-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) return Status::FromErrno(errno, "mkdtemp /tmp/pmlmig-qemu-XXXXXX");
    TempDir d;
    d.path_ = tmpl;
    return d;
  }
  TempDir() = default;
  TempDir(TempDir&& o) noexcept : path_(std::exchange(o.path_, {})), files_(std::move(o.files_)) {}
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir() {
    if (path_.empty()) return;
    for (const std::string& f : files_) ::unlink(f.c_str());
    ::rmdir(path_.c_str());
  }
  // A path inside, deleted with the directory.
  std::string File(const std::string& name) {
    files_.push_back(path_ + "/" + name);
    return files_.back();
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

// A file in /dev/shm of the guest's size; unlinked by Unlink() or at the end.
class ShmFile {
 public:
  static Result<ShmFile> Create(const std::string& role, uint64_t bytes) {
    static int counter = 0;
    ShmFile f;
    f.path_ = "/dev/shm/pmlmig-qemu-" + std::to_string(::getpid()) + "-" + std::to_string(++counter) + "-" + role;
    UniqueFd fd(::open(f.path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd.valid()) return Status::FromErrno(errno, "create " + f.path_);
    f.linked_ = true;
    if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) return Status::FromErrno(errno, "ftruncate " + f.path_);
    f.fd_ = std::move(fd);
    return f;
  }
  ShmFile() = default;
  ShmFile(ShmFile&& o) noexcept
      : path_(std::move(o.path_)), fd_(std::move(o.fd_)), linked_(std::exchange(o.linked_, false)) {}
  ShmFile& operator=(ShmFile&&) = delete;
  ~ShmFile() { Unlink(); }
  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  void Unlink() {
    if (linked_) ::unlink(path_.c_str());
    linked_ = false;
  }

 private:
  std::string path_;
  UniqueFd fd_;
  bool linked_ = false;
};

// A QMP connection: JSON objects, one a line. Execute() skips async events.
class Qmp {
 public:
  explicit Qmp(UniqueFd fd) : fd_(std::move(fd)) {}

  // The next message; fails at `deadline` or on Ctrl-C.
  Result<Json> Read(Clock::time_point deadline) {
    for (;;) {
      if (const size_t nl = buf_.find('\n'); nl != std::string::npos) {
        Json j = Json::parse(buf_.substr(0, nl), nullptr, false);
        buf_.erase(0, nl + 1);
        if (j.is_discarded() || !j.is_object()) return Internal("QMP: a line that is not a JSON object");
        return j;
      }
      if (Interrupted()) return Aborted("interrupted");
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return Internal("QMP: no reply in time");
      pollfd p{fd_.get(), POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 100)));
      if (r < 0 && errno != EINTR) return Status::FromErrno(errno, "QMP poll");
      if (r <= 0) continue;
      char chunk[65536];
      const ssize_t n = ::read(fd_.get(), chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::FromErrno(errno, "QMP read");
      if (n == 0) return Internal("QMP: QEMU closed the connection");
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }

  // Runs `command` and returns its "return" value.
  Result<Json> Execute(const std::string& command, const Json& arguments = Json::object()) {
    Json m = {{"execute", command}};
    if (!arguments.empty()) m["arguments"] = arguments;
    const std::string line = m.dump() + "\n";
    for (size_t off = 0; off < line.size();) {
      const ssize_t n = ::send(fd_.get(), line.data() + off, line.size() - off, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::FromErrno(errno, "QMP write (" + command + ")");
      off += static_cast<size_t>(n);
    }
    const Clock::time_point deadline = Clock::now() + kCommandTimeout;
    for (;;) {
      PMLMIG_ASSIGN_OR_RETURN(Json reply, Read(deadline));
      if (reply.contains("event")) continue;
      if (reply.contains("error")) {
        return Internal("QMP " + command + ": " + reply["error"].value("desc", reply["error"].dump()));
      }
      if (reply.contains("return")) return reply["return"];
    }
  }

 private:
  UniqueFd fd_;
  std::string buf_;
};

std::string Tail(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  if (s.size() > 600) s = "..." + s.substr(s.size() - 600);
  for (char& c : s) {
    if (c == '\n') c = ' ';
  }
  return s;
}

// One QEMU process, killed and reaped when this goes away.
class QemuProcess {
 public:
  // Starts `argv` (argv[0] the binary) with its output in `log`, and
  // connects to its QMP socket `qmp_path` (negotiated: ready for commands).
  static Result<QemuProcess> Start(const std::vector<std::string>& argv, const std::string& log,
                                   const std::string& qmp_path) {
    ::unlink(qmp_path.c_str());  // a stale socket from a start that failed
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    UniqueFd log_fd(::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!log_fd.valid()) return Status::FromErrno(errno, "create " + log);
    UniqueFd null_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (!null_fd.valid()) return Status::FromErrno(errno, "open /dev/null");
    const pid_t parent = ::getpid();
    QemuProcess q;
    q.pid_ = ::fork();
    if (q.pid_ < 0) return Status::FromErrno(errno, "fork");
    if (q.pid_ == 0) {
      // Async-signal-safe calls only until exec. Own process group: a
      // Ctrl-C reaches the benchmark, which then stops QEMU itself.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::setpgid(0, 0);
      ::dup2(null_fd.get(), 0);
      ::dup2(log_fd.get(), 1);
      ::dup2(log_fd.get(), 2);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    const Clock::time_point deadline = Clock::now() + kStartTimeout;
    for (;;) {
      int status = 0;
      if (::waitpid(q.pid_, &status, WNOHANG) == q.pid_) {
        q.pid_ = -1;
        const std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                                  : "was killed by signal " + std::to_string(WTERMSIG(status));
        const std::string said = Tail(log);
        return Unavailable(argv[0] + " " + how + " at start" + (said.empty() ? "" : ": " + said));
      }
      UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
      if (!s.valid()) return Status::FromErrno(errno, "socket (AF_UNIX)");
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", qmp_path.c_str());
      if (::connect(s.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) {
        q.qmp_ = std::make_unique<Qmp>(std::move(s));
        break;
      }
      if (Interrupted()) return Aborted("interrupted");
      if (Clock::now() > deadline) return Internal(argv[0] + ": no QMP socket after 20 s: " + Tail(log));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    PMLMIG_ASSIGN_OR_RETURN(Json greeting, q.qmp_->Read(deadline));
    if (!greeting.contains("QMP")) return Internal("QMP: no greeting from " + argv[0]);
    try {
      const Json& v = greeting["QMP"]["version"];
      q.version_ = std::to_string(v["qemu"]["major"].get<int>()) + "." + std::to_string(v["qemu"]["minor"].get<int>()) +
                   "." + std::to_string(v["qemu"]["micro"].get<int>());
      if (const std::string pkg = v.value("package", ""); !pkg.empty()) q.version_ += " (" + pkg + ")";
    } catch (const Json::exception&) {
      q.version_ = "unknown";
    }
    PMLMIG_RETURN_IF_ERROR(q.qmp_->Execute("qmp_capabilities").status());
    return q;
  }

  QemuProcess() = default;
  QemuProcess(QemuProcess&& o) noexcept
      : pid_(std::exchange(o.pid_, -1)), qmp_(std::move(o.qmp_)), version_(std::move(o.version_)) {}
  QemuProcess& operator=(QemuProcess&&) = delete;
  ~QemuProcess() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    while (::waitpid(pid_, nullptr, 0) < 0 && errno == EINTR) {
    }
  }

  Qmp& qmp() { return *qmp_; }
  const std::string& version() const { return version_; }

  // utime + stime of every thread, ms.
  Result<double> CpuMs() const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/stat");
    std::string line;
    if (!std::getline(in, line)) return Internal("cannot read /proc/" + std::to_string(pid_) + "/stat");
    const size_t close = line.rfind(')');
    if (close == std::string::npos) return Internal("/proc/PID/stat: no ')'");
    std::istringstream fields(line.substr(close + 2));
    std::vector<std::string> f;
    for (std::string x; fields >> x;) f.push_back(x);
    if (f.size() < 13) return Internal("/proc/PID/stat: too few fields");
    // f[0] is field 3 (state): utime is field 14, stime field 15.
    const double ticks = std::strtod(f[11].c_str(), nullptr) + std::strtod(f[12].c_str(), nullptr);
    return ticks * 1e3 / static_cast<double>(::sysconf(_SC_CLK_TCK));
  }

 private:
  pid_t pid_ = -1;
  std::unique_ptr<Qmp> qmp_;
  std::string version_;
};

std::vector<std::string> QemuArgs(const QemuMigrateOptions& o, const std::string& accel, const std::string& mem_path,
                                  const std::string& qmp_path, bool incoming) {
  const std::string size = std::to_string(o.bytes / (1ull << 20)) + "M";
  std::vector<std::string> a = {o.binary, "-accel", accel, "-machine", "pc,memory-backend=mem", "-object",
                                "memory-backend-file,id=mem,size=" + size + ",mem-path=" + mem_path + ",share=on",
                                "-m", size, "-S", "-nographic", "-nodefaults", "-display", "none",
                                "-qmp", "unix:" + qmp_path + ",server=on,wait=off"};
  if (incoming) {
    a.push_back("-incoming");
    a.push_back("defer");
  }
  return a;
}

std::string QueryStatus(const Json& q) { return q.is_object() ? q.value("status", "") : ""; }

// Sets both processes up, migrates, and fills `run` from query-migrate.
Status Drive(QemuProcess& source, QemuProcess& target, const QemuMigrateOptions& o, QemuMigrateRun& run) {
  for (QemuProcess* p : {&source, &target}) {
    const bool multifd = o.multifd_channels > 0;
    PMLMIG_RETURN_IF_ERROR(p->qmp()
                               .Execute("migrate-set-capabilities",
                                        {{"capabilities", Json::array({{{"capability", "multifd"}, {"state", multifd}}})}})
                               .status());
    if (multifd) {
      PMLMIG_RETURN_IF_ERROR(p->qmp()
                                 .Execute("migrate-set-parameters", {{"multifd-channels", o.multifd_channels},
                                                                     {"multifd-compression", "none"}})
                                 .status());
    }
  }
  // Unlimited bandwidth (10 TB/s): 7.2's default is 128 MiB/s.
  PMLMIG_RETURN_IF_ERROR(source.qmp().Execute("migrate-set-parameters", {{"max-bandwidth", 10000000000000ull}}).status());
  PMLMIG_RETURN_IF_ERROR(target.qmp().Execute("migrate-incoming", {{"uri", "tcp:127.0.0.1:0"}}).status());
  PMLMIG_ASSIGN_OR_RETURN(Json listening, target.qmp().Execute("query-migrate"));
  std::string port;
  try {
    port = listening.at("socket-address").at(0).at("port").get<std::string>();
  } catch (const Json::exception&) {
    return Internal("QEMU target: query-migrate names no listening port: " + listening.dump());
  }

  PMLMIG_ASSIGN_OR_RETURN(const double source_cpu0, source.CpuMs());
  PMLMIG_ASSIGN_OR_RETURN(const double target_cpu0, target.CpuMs());
  const Clock::time_point t0 = Clock::now();
  PMLMIG_RETURN_IF_ERROR(source.qmp().Execute("migrate", {{"uri", "tcp:127.0.0.1:" + port}}).status());
  const Clock::time_point deadline = t0 + o.timeout;
  Json done;
  for (QemuProcess* p : {&source, &target}) {
    for (;;) {
      PMLMIG_ASSIGN_OR_RETURN(Json q, p->qmp().Execute("query-migrate"));
      const std::string status = QueryStatus(q);
      if (status == "completed") {
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        if (p == &source) {
          run.wall_ms = ms;
          done = q;
        } else {
          run.target_wall_ms = ms;
        }
        break;
      }
      if (status == "failed" || status == "cancelled") {
        return Internal(std::string("QEMU ") + (p == &source ? "source" : "target") + ": migration " + status +
                        (q.contains("error-desc") ? ": " + q["error-desc"].get<std::string>() : std::string()));
      }
      if (Interrupted()) return Aborted("interrupted");
      if (Clock::now() > deadline) {
        return Internal("QEMU migration of " + std::to_string(o.bytes >> 20) + " MiB not completed after " +
                        std::to_string(o.timeout.count()) + " s (status '" + status + "')");
      }
      std::this_thread::sleep_for(kPoll);
    }
  }
  PMLMIG_ASSIGN_OR_RETURN(const double source_cpu1, source.CpuMs());
  PMLMIG_ASSIGN_OR_RETURN(const double target_cpu1, target.CpuMs());
  run.source_cpu_ms = source_cpu1 - source_cpu0;
  run.target_cpu_ms = target_cpu1 - target_cpu0;
  run.total_ms = done.value("total-time", 0.0);
  run.setup_ms = done.value("setup-time", 0.0);
  run.downtime_ms = done.value("downtime", 0.0);
  if (done.contains("ram")) {
    run.transferred_bytes = done["ram"].value("transferred", uint64_t{0});
    run.normal_pages = done["ram"].value("normal", uint64_t{0});
    run.zero_pages = done["ram"].value("duplicate", uint64_t{0});
  }
  return Status::Ok();
}

}  // namespace

std::string FindOnPath(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::stringstream ss(path != nullptr ? path : "");
  for (std::string dir; std::getline(ss, dir, ':');) {
    if (dir.empty()) continue;
    const std::string candidate = dir + "/" + name;
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) && ::access(candidate.c_str(), X_OK) == 0) {
      return candidate;
    }
  }
  return "";
}

Result<QemuMigrateRun> QemuMigrate(const QemuMigrateOptions& o) {
  PMLMIG_ASSIGN_OR_RETURN(TempDir dir, TempDir::Create());
  PMLMIG_ASSIGN_OR_RETURN(ShmFile source_ram, ShmFile::Create("source", o.bytes));
  PMLMIG_ASSIGN_OR_RETURN(ShmFile target_ram, ShmFile::Create("target", o.bytes));
  {
    PMLMIG_ASSIGN_OR_RETURN(Mapping m, Mapping::Map(o.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, source_ram.fd(), 0,
                                                    source_ram.path()));
    FillLikeRandomGuest(m.data(), o.bytes, o.seed);
  }
  QemuMigrateRun run;
  const std::string source_qmp = dir.File("source.qmp"), target_qmp = dir.File("target.qmp");
  const std::string source_log = dir.File("source.log"), target_log = dir.File("target.log");

  // The source: KVM if it starts, else TCG (a paused guest runs nothing).
  std::vector<std::string> accels = {o.accel};
  if (o.accel.empty()) accels = {"kvm", "tcg"};
  std::optional<QemuProcess> source;
  std::string failures;
  for (const std::string& accel : accels) {
    auto p = QemuProcess::Start(QemuArgs(o, accel, source_ram.path(), source_qmp, false), source_log, source_qmp);
    if (p.ok()) {
      source.emplace(std::move(*p));
      run.accel = accel;
      break;
    }
    if (p.status().code() == Code::kAborted) return p.status();
    failures += (failures.empty() ? "" : "; ") + p.status().WithContext("QEMU source (-accel " + accel + ")").message();
  }
  if (!source) return Unavailable(failures);
  PMLMIG_ASSIGN_OR_RETURN(QemuProcess target,
                          QemuProcess::Start(QemuArgs(o, run.accel, target_ram.path(), target_qmp, true), target_log,
                                             target_qmp));
  // Both have mapped their RAM: the files need no name any more.
  source_ram.Unlink();
  target_ram.Unlink();
  run.version = source->version();

  if (Status st = Drive(*source, target, o, run); !st.ok()) {
    if (st.code() == Code::kAborted) return st;
    const std::string source_said = Tail(source_log), target_said = Tail(target_log);
    return Status(st.code(), st.message() + (source_said.empty() ? "" : " [source log: " + source_said + "]") +
                                 (target_said.empty() ? "" : " [target log: " + target_said + "]"));
  }
  return run;
}

}  // namespace pmlmig::tools
