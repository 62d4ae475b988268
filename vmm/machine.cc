#include "pmlmig/vmm/machine.h"

#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstring>

#include "ioctl.h"

namespace pmlmig::vmm {
namespace {

// The signal that kicks a vCPU thread out of KVM_RUN. Its handler does
// nothing: the point is the EINTR, and immediate_exit covers the window
// before the thread enters KVM_RUN.
int KickSignal() { return SIGRTMIN + 3; }

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = [](int) {};
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(KickSignal(), &sa, nullptr);
  });
}

}  // namespace

std::string_view VcpuRunStateName(VcpuRunState s) {
  switch (s) {
    case VcpuRunState::kCreated: return "created";
    case VcpuRunState::kRunning: return "running";
    case VcpuRunState::kPaused: return "paused";
    case VcpuRunState::kStopped: return "stopped";
  }
  return "unknown";
}

Result<std::unique_ptr<Machine>> Machine::Build(const Kvm& kvm, const MachineOptions& options) {
  const TestGuestConfig& g = options.guest;
  if (g.vcpus == 0 || g.vcpus > PMLMIG_MAX_VCPUS) {
    return InvalidArgument("vcpu count " + std::to_string(g.vcpus) + " is outside 1.." +
                           std::to_string(PMLMIG_MAX_VCPUS));
  }
  const int max_vcpus = kvm.CheckExtension(KVM_CAP_MAX_VCPUS);
  if (max_vcpus > 0 && g.vcpus > static_cast<uint32_t>(max_vcpus)) {
    return InvalidArgument("vcpu count " + std::to_string(g.vcpus) + " exceeds this host's KVM limit of " +
                           std::to_string(max_vcpus));
  }
  auto m = std::unique_ptr<Machine>(new Machine());
  m->options_ = options;
  PMLMIG_ASSIGN_OR_RETURN(m->memory_, GuestMemory::Create({g.memory_bytes, options.huge_pages, options.memory_fd}));
  PMLMIG_ASSIGN_OR_RETURN(m->vm_, Vm::Create(kvm, {options.irqchip, options.dirty_ring_bytes}));
  PMLMIG_RETURN_IF_ERROR(m->vm_->AddMemory(m->memory_, options.slot_flags));
  PMLMIG_ASSIGN_OR_RETURN(m->msr_indices_, kvm.MsrIndexList());
  PMLMIG_ASSIGN_OR_RETURN(m->run_size_, kvm.VcpuMmapSize());
  const int xsave2 = kvm.CheckExtension(KVM_CAP_XSAVE2);
  m->xsave_size_ = xsave2 > 0 ? static_cast<size_t>(xsave2) : 0;
  PMLMIG_ASSIGN_OR_RETURN(auto cpuid, kvm.SupportedCpuid());
  for (uint32_t i = 0; i < g.vcpus; ++i) {
    auto t = std::make_unique<VcpuThread>();
    PMLMIG_ASSIGN_OR_RETURN(t->vcpu, m->vm_->CreateVcpu(kvm, i, cpuid));
    m->vcpus_.push_back(std::move(t));
  }
  return m;
}

Result<std::unique_ptr<Machine>> Machine::Create(const Kvm& kvm, const MachineOptions& options) {
  if (options.memory_fd >= 0) return InvalidArgument("a booted test VM cannot take over memory (CreateForRestore can)");
  PMLMIG_ASSIGN_OR_RETURN(auto m, Build(kvm, options));
  PMLMIG_RETURN_IF_ERROR(PrepareTestGuest(m->memory_, options.guest));
  for (auto& t : m->vcpus_) PMLMIG_RETURN_IF_ERROR(SetBootRegisters(*t->vcpu));
  return m;
}

Result<std::unique_ptr<Machine>> Machine::CreateForRestore(const Kvm& kvm, const MachineOptions& options) {
  return Build(kvm, options);
}

Machine::~Machine() { Stop(); }

Status Machine::Start() {
  if (started_) return InvalidArgument("machine already started");
  InstallKickHandler();
  started_ = true;
  for (auto& tp : vcpus_) {
    VcpuThread& t = *tp;
    t.request.store(Request::kRun);
    {
      std::lock_guard lock(mu_);
      t.state = VcpuRunState::kRunning;
    }
    t.thread = std::thread([this, &t] { Loop(t); });
  }
  return Status::Ok();
}

void Machine::Kick(VcpuThread& t) {
  // Order matters: the request (stored by the caller, seq_cst) before
  // immediate_exit (seq_cst) before the signal. The vCPU thread clears
  // immediate_exit and then loads the request, so either it sees the request
  // or KVM sees immediate_exit / the signal interrupts KVM_RUN.
  t.vcpu->SetImmediateExit(true);
  const pthread_t h = t.handle.load();
  if (h != pthread_t{}) pthread_kill(h, KickSignal());
  cv_.notify_all();  // wakes a vCPU waiting in OnHalt or a throttle sleep
}

void Machine::WaitAll(std::unique_lock<std::mutex>& lock, VcpuRunState a, VcpuRunState b) {
  cv_.wait(lock, [&] {
    for (auto& t : vcpus_) {
      if (t->state != a && t->state != b) return false;
    }
    return true;
  });
}

Status Machine::Pause() {
  if (!started_) return Status::Ok();  // created vCPUs are already out of KVM_RUN
  std::unique_lock lock(mu_);
  for (auto& t : vcpus_) {
    if (t->state == VcpuRunState::kStopped) continue;
    t->request.store(Request::kPause);
    Kick(*t);
  }
  WaitAll(lock, VcpuRunState::kPaused, VcpuRunState::kStopped);
  return error_;
}

Status Machine::KickAll() {
  if (!started_) return Status::Ok();
  std::unique_lock lock(mu_);
  const uint64_t gen = kick_gen_.fetch_add(1) + 1;
  for (auto& t : vcpus_) {
    if (t->state == VcpuRunState::kRunning) Kick(*t);
  }
  cv_.wait(lock, [&] {
    for (auto& t : vcpus_) {
      if (t->state == VcpuRunState::kRunning && t->kick_ack < gen) return false;
    }
    return true;
  });
  return error_;
}

Status Machine::SetDirtyLogging(bool on) {
  for (const engine::MemorySlot& s : std::vector<engine::MemorySlot>(vm_->slots().slots().begin(),
                                                                      vm_->slots().slots().end())) {
    engine::MemorySlot changed = s;
    changed.flags = on ? (s.flags | KVM_MEM_LOG_DIRTY_PAGES) : (s.flags & ~KVM_MEM_LOG_DIRTY_PAGES);
    if (changed.flags != s.flags) PMLMIG_RETURN_IF_ERROR(vm_->SetMemorySlot(changed));
  }
  return Status::Ok();
}

void Machine::SetDirtyRingFullHandler(std::function<Status(uint32_t)> handler) {
  std::lock_guard lock(mu_);
  dirty_ring_full_ = std::move(handler);
}

bool Machine::SetVcpuThrottleHook(ThrottleHook hook) {
  {
    std::unique_lock lock(throttle_mu_);
    throttle_active_.store(hook != nullptr);
    throttle_hook_ = std::move(hook);
  }
  // A vCPU held right now goes back to the guest when the hook goes: its
  // wait (under mu_) checks throttle_active_.
  { std::lock_guard lock(mu_); }
  cv_.notify_all();
  return true;
}

void Machine::KickVcpu(uint32_t vcpu) {
  if (vcpu >= vcpus_.size()) return;
  Kick(*vcpus_[vcpu]);
}

std::chrono::nanoseconds Machine::ThrottleHold(uint32_t vcpu) {
  std::shared_lock lock(throttle_mu_);
  return throttle_hook_ ? throttle_hook_(vcpu) : std::chrono::nanoseconds{0};
}

Result<std::vector<uint8_t>> Machine::SaveState() {
  PMLMIG_ASSIGN_OR_RETURN(MachineState s, CaptureState());
  return EncodeMachineState(s);
}

Status Machine::LoadState(std::span<const uint8_t> bytes) {
  PMLMIG_ASSIGN_OR_RETURN(MachineState s, DecodeMachineState(bytes));
  return RestoreState(s);
}

std::optional<engine::VmControl::Backing> Machine::slot_backing(uint32_t slot) const {
  const engine::MemorySlot* s = vm_->slots().FindById(slot);
  if (s == nullptr) return std::nullopt;
  return Backing{memory_.memfd(), static_cast<uint64_t>(s->host - memory_.host())};
}

Status Machine::Resume() {
  if (!started_) return Start();
  std::unique_lock lock(mu_);
  if (!error_.ok()) return error_;
  for (auto& t : vcpus_) {
    if (t->state == VcpuRunState::kStopped) continue;
    t->request.store(Request::kRun);
  }
  cv_.notify_all();
  WaitAll(lock, VcpuRunState::kRunning, VcpuRunState::kStopped);
  return error_;
}

void Machine::Stop() {
  {
    std::unique_lock lock(mu_);
    for (auto& t : vcpus_) {
      t->request.store(Request::kStop);
      if (t->thread.joinable()) Kick(*t);
    }
  }
  for (auto& t : vcpus_) {
    if (t->thread.joinable()) t->thread.join();
    std::lock_guard lock(mu_);
    t->state = VcpuRunState::kStopped;
  }
}

VcpuRunState Machine::state(uint32_t i) const {
  std::lock_guard lock(mu_);
  return vcpus_[i]->state;
}

void Machine::Fail(const Status& s) {
  std::lock_guard lock(mu_);
  if (error_.ok()) error_ = s;
}

Status Machine::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

std::string Machine::console_output() const {
  std::lock_guard lock(mu_);
  return console_;
}

void Machine::Loop(VcpuThread& t) {
  t.handle.store(pthread_self());
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);  // Ctrl-C belongs to the controlling thread
  sigemptyset(&set);
  sigaddset(&set, KickSignal());
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);

  Vcpu& vcpu = *t.vcpu;
  t.pace_start = std::chrono::steady_clock::now();
  Status failure;
  for (;;) {
    Request r = t.request.load();
    if (r != Request::kRun) {
      if (t.io_pending) {
        // KVM completes an I/O exit only on the next KVM_RUN; do that (and
        // return at once) so the saved state is consistent.
        vcpu.SetImmediateExit(true);
        auto done = vcpu.Run();
        t.io_pending = false;
        if (!done.ok()) {
          failure = done.status();
          break;
        }
      }
      if (r == Request::kStop) break;
      std::unique_lock lock(mu_);
      t.state = VcpuRunState::kPaused;
      cv_.notify_all();
      cv_.wait(lock, [&] { return t.request.load() != Request::kPause; });
      if (t.request.load() == Request::kRun) t.state = VcpuRunState::kRunning;
      cv_.notify_all();
      t.pace_start = std::chrono::steady_clock::now();
      t.paced_pages = 0;
      continue;
    }
    if (throttle_active_.load(std::memory_order_relaxed)) {
      // Dirty-limit or auto-converge holds this vCPU out of guest mode for a
      // while; a pause or stop request ends the wait.
      if (const auto hold = ThrottleHold(vcpu.id()); hold.count() > 0) {
        std::unique_lock lock(mu_);
        cv_.wait_for(lock, hold, [&] { return t.request.load() != Request::kRun || !throttle_active_.load(); });
        continue;  // asks the hook again: the hold may have grown meanwhile
      }
    }
    vcpu.SetImmediateExit(false);
    if (t.request.load() != Request::kRun) continue;
    // A KickAll that came after our last ack may have set immediate_exit
    // just before we cleared it, and its signal may have landed while we
    // were out of KVM_RUN: nothing would then make KVM_RUN return. We are
    // out of guest mode now, which is what it waits for: ack it here. (If
    // this load misses a new generation, its immediate_exit store comes
    // after our clear in the seq_cst order, and KVM_RUN returns at once.)
    if (const uint64_t gen = kick_gen_.load(); gen != t.kick_ack) {
      std::lock_guard lock(mu_);
      t.kick_ack = gen;
      cv_.notify_all();
    }
    auto ran = vcpu.Run();
    if (!ran.ok()) {
      failure = ran.status();
      break;
    }
    // A KickAll waits until each vCPU has been out of guest mode since it
    // asked; being here (KVM_RUN returned) is exactly that.
    if (const uint64_t gen = kick_gen_.load(std::memory_order_acquire); gen != 0) {
      std::lock_guard lock(mu_);
      if (t.kick_ack != gen) {
        t.kick_ack = gen;
        cv_.notify_all();
      }
    }
    if (!*ran) continue;  // kicked
    const ExitEvent e = DecodeExit(vcpu.run(), run_size_);
    t.io_pending = e.kind == ExitKind::kIo || e.kind == ExitKind::kMmio;
    ExitAction a = HandleExit(vcpu.id(), e, *this);
    if (a.kind == ExitAction::kStop) {
      failure = a.error;
      break;
    }
  }
  if (!failure.ok()) Fail(failure);
  std::lock_guard lock(mu_);
  t.state = VcpuRunState::kStopped;
  cv_.notify_all();
}

ExitAction Machine::OnPortOut(uint32_t id, uint16_t port, uint8_t size, uint64_t value) {
  VcpuThread& t = *vcpus_[id];
  switch (port) {
    case PMLMIG_PORT_CONSOLE: {
      const char c = static_cast<char>(value);
      if (c != '\n' && t.console_line.size() < 256) {
        t.console_line += c;
        return ExitAction::Continue();
      }
      std::string line = "vcpu " + std::to_string(id) + ": " + t.console_line + "\n";
      t.console_line.clear();
      if (options_.echo_console) std::fputs(line.c_str(), stderr);
      std::lock_guard lock(mu_);
      if (console_.size() < (1u << 20)) console_ += line;
      return ExitAction::Continue();
    }
    case PMLMIG_PORT_STARTED: return ExitAction::Continue();
    case PMLMIG_PORT_THROTTLE: {
      // Pace the vCPU at its own workload's `rate` pages per second: sleep
      // until the time by which this many pages were due. A pause or stop
      // request ends the wait.
      const uint64_t rate = options_.guest.WorkloadOf(id).rate;
      if (rate == 0) return ExitAction::Continue();
      t.paced_pages += value;
      const auto due = t.pace_start + std::chrono::nanoseconds(
          static_cast<int64_t>(static_cast<double>(t.paced_pages) * 1e9 / static_cast<double>(rate)));
      const auto now = std::chrono::steady_clock::now();
      if (due < now - std::chrono::seconds(1)) {  // far behind (e.g. host busy): no catch-up burst
        t.pace_start = now;
        t.paced_pages = 0;
        return ExitAction::Continue();
      }
      std::unique_lock lock(mu_);
      cv_.wait_until(lock, due, [&] { return t.request.load() != Request::kRun; });
      return ExitAction::Continue();
    }
    case PMLMIG_PORT_PANIC: {
      const char* why = value == PMLMIG_PANIC_BAD_MAGIC ? "bad boot parameters"
                        : value == PMLMIG_PANIC_BAD_VCPU ? "vcpu id out of range"
                        : value == PMLMIG_PANIC_EMPTY_RANGE ? "empty workload share"
                                                            : "unknown reason";
      return ExitAction::Stop(Internal("vcpu " + std::to_string(id) + ": guest panic " +
                                       std::to_string(value) + " (" + why + ")"));
    }
    default:
      return ExitAction::Stop(Internal("vcpu " + std::to_string(id) + ": write of " + std::to_string(size) +
                                       " bytes to unknown port 0x" + [&] {
                                         char b[8];
                                         std::snprintf(b, sizeof b, "%x", port);
                                         return std::string(b);
                                       }()));
  }
}

ExitAction Machine::OnHalt(uint32_t id) {
  // Without an in-kernel irqchip nothing would ever wake the guest: park until
  // the controller wants something.
  VcpuThread& t = *vcpus_[id];
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return t.request.load() != Request::kRun; });
  return ExitAction::Continue();
}

ExitAction Machine::OnDirtyRingFull(uint32_t id) {
  std::function<Status(uint32_t)> handler;
  {
    std::lock_guard lock(mu_);  // a rare exit: the copy keeps a concurrent re-set harmless
    handler = dirty_ring_full_;
  }
  if (handler) {
    Status s = handler(id);
    return s.ok() ? ExitAction::Continue() : ExitAction::Stop(s.WithContext("vcpu " + std::to_string(id)));
  }
  return ExitAction::Stop(Internal("vcpu " + std::to_string(id) +
                                   ": dirty ring full, but no dirty tracker harvests the ring"));
}

std::vector<VcpuStats> Machine::Stats() const {
  std::vector<VcpuStats> out(vcpus_.size());
  auto* stats = reinterpret_cast<const pmlmig_vcpu_stats*>(
      memory_.HostAddress(PMLMIG_STATS_GPA, PMLMIG_MAX_VCPUS * sizeof(pmlmig_vcpu_stats)));
  for (size_t i = 0; i < out.size(); ++i) {
    // The guest writes these concurrently; aligned 8-byte loads are atomic on x86.
    out[i].pages_written = std::atomic_ref<const uint64_t>(stats[i].pages_written).load(std::memory_order_relaxed);
    out[i].loops = std::atomic_ref<const uint64_t>(stats[i].loops).load(std::memory_order_relaxed);
    out[i].started = std::atomic_ref<const uint64_t>(stats[i].started).load(std::memory_order_relaxed) != 0;
  }
  return out;
}

Result<MachineState> Machine::CaptureState() {
  {
    std::lock_guard lock(mu_);
    for (auto& t : vcpus_) {
      if (t->state == VcpuRunState::kRunning) return InvalidArgument("SaveState: vcpus must be paused");
    }
  }
  MachineState s;
  PMLMIG_ASSIGN_OR_RETURN(s.vm, CaptureVmState(vm_->fd(), vcpus_[0]->vcpu->fd(), options_.irqchip));
  for (auto& t : vcpus_) {
    PMLMIG_ASSIGN_OR_RETURN(VcpuState v, CaptureVcpuState(t->vcpu->fd(), t->vcpu->id(), msr_indices_,
                                                          options_.irqchip, xsave_size_));
    s.vcpus.push_back(std::move(v));
  }
  return s;
}

Status Machine::RestoreState(const MachineState& s) {
  {
    std::lock_guard lock(mu_);
    for (auto& t : vcpus_) {
      if (t->state == VcpuRunState::kRunning) return InvalidArgument("RestoreState: vcpus must be paused");
    }
  }
  if (s.vcpus.size() != vcpus_.size()) {
    return InvalidArgument("RestoreState: state has " + std::to_string(s.vcpus.size()) + " vcpus, machine has " +
                           std::to_string(vcpus_.size()));
  }
  if (s.vm.irqchip != options_.irqchip) return InvalidArgument("RestoreState: irqchip mismatch");
  PMLMIG_RETURN_IF_ERROR(RestoreVmState(vm_->fd(), s.vm));
  for (size_t i = 0; i < vcpus_.size(); ++i) {
    PMLMIG_RETURN_IF_ERROR(RestoreVcpuState(vcpus_[i]->vcpu->fd(), s.vcpus[i]));
  }
  return Status::Ok();
}

}  // namespace pmlmig::vmm
