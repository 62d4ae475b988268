#include "c_vm.h"

#include <cstdio>
#include <unordered_map>

namespace pmlmig::capi {
namespace {

thread_local std::string t_error;

}  // namespace

int ErrnoOf(Code code) {
  switch (code) {
    case Code::kOk: return 0;
    case Code::kInvalidArgument: return -EINVAL;
    case Code::kNotFound: return -ENOENT;
    case Code::kPermissionDenied: return -EACCES;
    case Code::kUnavailable: return -EHOSTUNREACH;
    case Code::kResourceExhausted: return -ENOMEM;
    case Code::kAborted: return -ECANCELED;
    case Code::kDataLoss: return -EBADMSG;
    case Code::kInternal: return -EIO;
  }
  return -EIO;
}

void SetThreadError(std::string message) { t_error = std::move(message); }

const char* ErrorSlot::c_str() const {
  thread_local std::string copy;
  std::lock_guard lock(mu_);
  copy = message_;
  return copy.c_str();
}
const std::string& ThreadError() { return t_error; }

int Fail(ErrorSlot* slot, const Status& s) {
  if (s.ok()) return 0;
  if (slot != nullptr) slot->Set(s.message());
  SetThreadError(s.message());
  return ErrnoOf(s.code());
}

}  // namespace pmlmig::capi

using pmlmig::Code;
using pmlmig::InvalidArgument;
using pmlmig::Result;
using pmlmig::Status;
namespace engine = pmlmig::engine;

Result<pmlmig_vm*> pmlmig_vm::Create(const pmlmig_vm_config& c, const pmlmig_vm_ops& ops, void* opaque) {
  if (ops.pause == nullptr || ops.resume == nullptr || ops.kick_all == nullptr || ops.set_dirty_logging == nullptr ||
      ops.save_state == nullptr || ops.load_state == nullptr) {
    return InvalidArgument("pmlmig_vm_ops: pause, resume, kick_all, set_dirty_logging, save_state and load_state are required");
  }
  if (c.vcpu_count == 0) return InvalidArgument("pmlmig_vm_config: vcpu_count is 0");
  if (c.vcpu_fds == nullptr) return InvalidArgument("pmlmig_vm_config: vcpu_fds is NULL");
  if (c.region_count == 0 || c.regions == nullptr) return InvalidArgument("pmlmig_vm_config: no memory regions");
  if (c.description_length > 0 && c.description == nullptr) {
    return InvalidArgument("pmlmig_vm_config: description is NULL with a length of " +
                           std::to_string(c.description_length));
  }
  if (c.description_length > (1u << 20)) return InvalidArgument("pmlmig_vm_config: description above 1 MiB");
  if (c.dirty_ring_entries != 0 && (c.dirty_ring_entries & (c.dirty_ring_entries - 1)) != 0) {
    return InvalidArgument("pmlmig_vm_config: dirty_ring_entries " + std::to_string(c.dirty_ring_entries) +
                           " is not a power of two");
  }
  std::unique_ptr<pmlmig_vm> vm(new pmlmig_vm(ops, nullptr));  // opaque set last: a refused VM is not released
  vm->vm_fd_ = c.vm_fd;
  vm->ring_entries_ = c.dirty_ring_entries;
  vm->vcpu_fds_.assign(c.vcpu_fds, c.vcpu_fds + c.vcpu_count);
  std::unordered_map<uint32_t, uint32_t> slot_index;  // slot id -> the region that has it
  for (uint32_t i = 0; i < c.region_count; ++i) {
    const pmlmig_region& r = c.regions[i];
    if (auto [it, fresh] = slot_index.emplace(r.slot, i); !fresh) {
      return InvalidArgument("pmlmig_vm_config: regions " + std::to_string(it->second) + " and " + std::to_string(i) +
                             " both have slot id " + std::to_string(r.slot) + " (each region needs its own)");
    }
    engine::MemorySlot s;
    s.slot = r.slot;
    s.gpa = r.gpa;
    s.host = static_cast<uint8_t*>(r.host);
    s.size = r.size;
    if (Status st = vm->slots_.Set(s); !st.ok()) return st.WithContext("pmlmig_vm_config: region " + std::to_string(i));
    vm->regions_.push_back(r);
  }
  vm->description_.assign(static_cast<const char*>(c.description), c.description_length);
  vm->marks_ = std::make_unique<engine::UserspaceWriteTracker>(
      vm->slots_, engine::UserspaceTrackerOptions{.mode = engine::UserspaceTrackMode::kExplicitOnly});
  vm->opaque_ = opaque;
  vm->owns_opaque_ = true;
  return vm.release();
}

pmlmig_vm::~pmlmig_vm() {
  marks_.reset();
  if (ops_.release != nullptr && owns_opaque_) ops_.release(opaque_);
}

Status pmlmig_vm::Call(const char* what, int rc) const {
  if (rc >= 0) return Status::Ok();
  const Status s = Status::FromErrno(-rc, std::string(what) + " callback");
  const std::string& detail = pmlmig::capi::ThreadError();  // what the callback gave pmlmig_set_error
  return detail.empty() ? s : Status(s.code(), s.message() + " (" + detail + ")");
}

std::optional<engine::VmControl::Backing> pmlmig_vm::slot_backing(uint32_t slot) const {
  for (const pmlmig_region& r : regions_) {
    if (r.slot == slot && r.memfd >= 0) return Backing{r.memfd, r.memfd_offset};
  }
  return std::nullopt;
}

Status pmlmig_vm::SetDirtyLogging(bool on) {
  pmlmig::capi::SetThreadError("");
  return Call("set_dirty_logging", ops_.set_dirty_logging(opaque_, on ? 1 : 0));
}
Status pmlmig_vm::Pause() {
  pmlmig::capi::SetThreadError("");
  return Call("pause", ops_.pause(opaque_));
}
Status pmlmig_vm::Resume() {
  pmlmig::capi::SetThreadError("");
  return Call("resume", ops_.resume(opaque_));
}
Status pmlmig_vm::KickAll() {
  pmlmig::capi::SetThreadError("");
  return Call("kick_all", ops_.kick_all(opaque_));
}

void pmlmig_vm::SetDirtyRingFullHandler(std::function<Status(uint32_t)> handler) {
  std::lock_guard lock(ring_mu_);
  ring_full_ = std::move(handler);
}

bool pmlmig_vm::SetVcpuThrottleHook(ThrottleHook hook) {
  if (ops_.kick_vcpu == nullptr) return false;
  std::unique_lock lock(throttle_mu_);
  throttle_active_.store(hook != nullptr);
  throttle_ = std::move(hook);
  return true;
}

void pmlmig_vm::KickVcpu(uint32_t vcpu) {
  if (ops_.kick_vcpu != nullptr && vcpu < vcpu_fds_.size()) ops_.kick_vcpu(opaque_, vcpu);
}

uint64_t pmlmig_vm::ThrottleNs(uint32_t vcpu) {
  if (!throttle_active_.load(std::memory_order_relaxed) || vcpu >= vcpu_fds_.size()) return 0;
  std::shared_lock lock(throttle_mu_);
  return throttle_ ? static_cast<uint64_t>(throttle_(vcpu).count()) : 0;
}

int pmlmig_vm::OnDirtyRingFull(uint32_t vcpu) {
  std::function<Status(uint32_t)> handler;
  {
    std::lock_guard lock(ring_mu_);  // a rare exit: the copy keeps a concurrent re-set harmless
    handler = ring_full_;
  }
  if (vcpu >= vcpu_fds_.size()) {
    return pmlmig::capi::Fail(&error_, InvalidArgument("dirty ring full: vcpu " + std::to_string(vcpu) +
                                                           " of a VM with " + std::to_string(vcpu_fds_.size())));
  }
  if (!handler) {
    return pmlmig::capi::Fail(&error_, Status(Code::kNotFound, "dirty ring full on vcpu " + std::to_string(vcpu) +
                                                                    ", but no migration tracks this VM's rings"));
  }
  return pmlmig::capi::Fail(&error_, handler(vcpu));
}

Result<std::vector<uint8_t>> pmlmig_vm::SaveState() {
  pmlmig_buffer buffer;
  pmlmig::capi::SetThreadError("");
  PMLMIG_RETURN_IF_ERROR(Call("save_state", ops_.save_state(opaque_, &buffer)));
  return std::move(buffer.bytes);
}

Status pmlmig_vm::LoadState(std::span<const uint8_t> state) {
  pmlmig::capi::SetThreadError("");
  return Call("load_state", ops_.load_state(opaque_, state.data(), state.size()));
}
