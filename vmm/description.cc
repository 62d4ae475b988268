#include "pmlmig/vmm/description.h"

#include <sys/mman.h>

#include <cerrno>
#include <nlohmann/json.hpp>

#include "pmlmig/vmm/checker.h"
#include "pmlmig/vmm/guest_memory.h"

namespace pmlmig::vmm {
namespace {

constexpr std::string_view kFormat = "pmlmig-test-vm";
constexpr int kVersion = 1;         // a VM whose vCPUs all run one workload
constexpr int kVersionPerVcpu = 2;  // adds "vcpu_workloads"
constexpr const char* kVcpuWorkloads = "vcpu_workloads";

using Json = nlohmann::json;

// The field `key` of `j` as T, or an error naming it.
template <typename T>
Result<T> Field(const Json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end()) return InvalidArgument(std::string("test VM description: no field \"") + key + "\"");
  try {
    return it->get<T>();
  } catch (const Json::exception&) {
    return InvalidArgument(std::string("test VM description: field \"") + key + "\" has the wrong type");
  }
}

Json VcpuWorkloadsJson(const VcpuWorkloads& overrides) {
  Json out = Json::object();
  for (const auto& [vcpu, spec] : overrides) out[std::to_string(vcpu)] = spec.ToString();
  return out;
}

// "vcpu_workloads" of a version-2 description for a VM of `vcpus` vCPUs,
// checked as the --vcpu-workload flag is.
Result<VcpuWorkloads> DecodeVcpuWorkloads(const Json& j, uint32_t vcpus) {
  PMLMIG_ASSIGN_OR_RETURN(Json overrides, Field<Json>(j, kVcpuWorkloads));
  const std::string context = std::string("test VM description: ") + kVcpuWorkloads;
  if (!overrides.is_object()) return InvalidArgument(context + " is not an object");
  std::vector<std::string> texts;
  for (const auto& [index, spec] : overrides.items()) {
    if (!spec.is_string()) return InvalidArgument(context + ": entry \"" + index + "\" is not a string");
    texts.push_back(index + "=" + spec.get<std::string>());
  }
  auto parsed = ParseVcpuWorkloads(texts, vcpus);
  if (!parsed.ok()) return parsed.status().WithContext(context);
  return parsed;
}

}  // namespace

std::string EncodeTestVmDescription(const MachineOptions& o) {
  const bool per_vcpu = !o.guest.vcpu_workloads.empty();
  Json j = {{"format", kFormat},
            {"version", per_vcpu ? kVersionPerVcpu : kVersion},
            {"memory_bytes", o.guest.memory_bytes},
            {"vcpus", o.guest.vcpus},
            {"workload", o.guest.workload.ToString()},
            {"fill", FillModeName(o.guest.fill)},
            {"seed", o.guest.seed},
            {"irqchip", o.irqchip}};
  if (per_vcpu) j[kVcpuWorkloads] = VcpuWorkloadsJson(o.guest.vcpu_workloads);
  return j.dump();
}

Result<MachineOptions> DecodeTestVmDescription(std::string_view bytes) {
  const Json j = Json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return InvalidArgument("test VM description: not a JSON object");
  PMLMIG_ASSIGN_OR_RETURN(std::string format, Field<std::string>(j, "format"));
  if (format != kFormat) return InvalidArgument("test VM description: format \"" + format + "\" is not " + std::string(kFormat));
  PMLMIG_ASSIGN_OR_RETURN(int version, Field<int>(j, "version"));
  if (version != kVersion && version != kVersionPerVcpu) {
    return InvalidArgument("test VM description: version " + std::to_string(version) + " (this build reads " +
                           std::to_string(kVersion) + " and " + std::to_string(kVersionPerVcpu) + ")");
  }
  MachineOptions o;
  PMLMIG_ASSIGN_OR_RETURN(o.guest.memory_bytes, Field<uint64_t>(j, "memory_bytes"));
  if (auto layout = PcLayout(o.guest.memory_bytes); !layout.ok()) {
    return layout.status().WithContext("test VM description: memory_bytes");
  }
  PMLMIG_ASSIGN_OR_RETURN(o.guest.vcpus, Field<uint32_t>(j, "vcpus"));
  if (o.guest.vcpus == 0 || o.guest.vcpus > PMLMIG_MAX_VCPUS) {
    return InvalidArgument("test VM description: vcpus " + std::to_string(o.guest.vcpus) + " is outside 1.." +
                           std::to_string(PMLMIG_MAX_VCPUS));
  }
  PMLMIG_ASSIGN_OR_RETURN(std::string workload, Field<std::string>(j, "workload"));
  auto spec = ParseWorkload(workload);
  if (!spec.ok()) return spec.status().WithContext("test VM description: workload");
  o.guest.workload = *spec;
  if (version == kVersion && j.contains(kVcpuWorkloads)) {
    return InvalidArgument(std::string("test VM description: field \"") + kVcpuWorkloads + "\" needs version " +
                           std::to_string(kVersionPerVcpu));
  }
  if (version == kVersionPerVcpu) {
    PMLMIG_ASSIGN_OR_RETURN(o.guest.vcpu_workloads, DecodeVcpuWorkloads(j, o.guest.vcpus));
  }
  PMLMIG_ASSIGN_OR_RETURN(std::string fill, Field<std::string>(j, "fill"));
  auto mode = ParseFillMode(fill);
  if (!mode.ok()) return mode.status().WithContext("test VM description: fill");
  o.guest.fill = *mode;
  PMLMIG_ASSIGN_OR_RETURN(o.guest.seed, Field<uint64_t>(j, "seed"));
  PMLMIG_ASSIGN_OR_RETURN(o.irqchip, Field<bool>(j, "irqchip"));
  return o;
}

std::vector<uint64_t> PagesWritten(const Machine& machine) {
  std::vector<uint64_t> c;
  for (const VcpuStats& s : machine.Stats()) c.push_back(s.pages_written);
  return c;
}

std::unique_ptr<engine::MigrationTarget> TestVmFactory::MakeTarget() {
  engine::VmMigrationTarget::Check check = nullptr;
  if (options_.check_memory) check = [this](engine::VmControl&) { return Check(); };
  auto target = std::make_unique<engine::VmMigrationTarget>(
      [this](const engine::MigrationSetup& setup) { return BuildVm(setup); }, check);
  target->SetProgressCounter([](engine::VmControl& vm) {
    uint64_t n = 0;
    for (uint64_t c : PagesWritten(static_cast<Machine&>(vm))) n += c;
    return n;
  });
  return target;
}

Result<std::unique_ptr<engine::VmControl>> TestVmFactory::BuildVm(const engine::MigrationSetup& setup) {
  if (options_.require_verify && !setup.verify) {
    return InvalidArgument("this receiver requires memory verification and the source did not ask for it");
  }
  PMLMIG_ASSIGN_OR_RETURN(MachineOptions o, DecodeTestVmDescription(setup.vm_description));
  // A handover: the test VM's RAM is one memfd, and every range of it was
  // handed over as that file (VmMigrationTarget checks each range's file
  // and offset against the VM built here).
  const bool shared = !setup.shared_memory.empty();
  if (shared) o.memory_fd = setup.shared_memory.front().fd;
  PMLMIG_ASSIGN_OR_RETURN(std::unique_ptr<Machine> m, Machine::CreateForRestore(kvm_, o));
  o.memory_fd = -1;
  if (options_.prefault && !shared && ::madvise(m->memory().host(), m->memory().size(), MADV_POPULATE_WRITE) != 0) {
    return Status::FromErrno(errno, "madvise(MADV_POPULATE_WRITE) on the new VM's memory");
  }
  {
    std::lock_guard lock(mu_);
    last_ = m.get();
    last_options_ = o;
    at_check_.clear();
  }
  if (options_.on_build) options_.on_build(o);
  return std::unique_ptr<engine::VmControl>(std::move(m));
}

Result<std::string> TestVmFactory::Check() {
  Machine* m;
  MachineOptions o;
  {
    std::lock_guard lock(mu_);
    m = last_;
    o = last_options_;
  }
  if (m == nullptr) return Internal("memory check without a VM");
  std::vector<uint64_t> counters = PagesWritten(*m);
  const CheckReport r = CheckGuestMemory(m->memory(), o.guest, counters);
  {
    std::lock_guard lock(mu_);
    at_check_ = std::move(counters);
  }
  if (!r.ok()) return r.ToStatus();
  return "memory checker passed on " + std::to_string(r.pages_checked) + " pages (" + std::to_string(r.pages_stamped) +
         " stamped)";
}

Machine* TestVmFactory::last_built() const {
  std::lock_guard lock(mu_);
  return last_;
}
MachineOptions TestVmFactory::last_options() const {
  std::lock_guard lock(mu_);
  return last_options_;
}
std::vector<uint64_t> TestVmFactory::counters_at_check() const {
  std::lock_guard lock(mu_);
  return at_check_;
}

}  // namespace pmlmig::vmm
