#include "pmlmig/vmm/workload.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace pmlmig::vmm {
namespace {

Status BadSpec(std::string_view text, const std::string& why) {
  return InvalidArgument("invalid workload '" + std::string(text) + "': " + why +
                         " (expected idle, seq, seq:fraction=F, random or hotset:fraction=F,share=S, each "
                         "with an optional rate=PAGES_PER_SECOND)");
}

bool ParseDouble(std::string_view s, double* out) {
  std::string str(s);
  char* end = nullptr;
  *out = std::strtod(str.c_str(), &end);
  return !str.empty() && end == str.c_str() + str.size();
}

bool ParseUint(std::string_view s, uint64_t* out) {
  if (s.empty() || s.size() > 18) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

}  // namespace

std::string WorkloadSpec::ToString() const {
  std::string out;
  switch (kind) {
    case PMLMIG_WORKLOAD_IDLE: out = "idle"; break;
    case PMLMIG_WORKLOAD_SEQ: {
      out = "seq";
      if (hot_fraction != 1.0) {
        char buf[48];
        std::snprintf(buf, sizeof buf, ":fraction=%g", hot_fraction);
        out += buf;
      }
      break;
    }
    case PMLMIG_WORKLOAD_RANDOM: out = "random"; break;
    case PMLMIG_WORKLOAD_HOTSET: {
      char buf[96];
      std::snprintf(buf, sizeof buf, "hotset:fraction=%g,share=%g", hot_fraction, hot_share);
      out = buf;
      break;
    }
  }
  if (rate != 0) {
    out += out.find(':') != std::string::npos ? "," : ":";
    out += "rate=" + std::to_string(rate);
  }
  return out;
}

Result<WorkloadSpec> ParseWorkload(std::string_view text) {
  WorkloadSpec spec;
  const size_t colon = text.find(':');
  const std::string_view name = text.substr(0, colon);
  if (name == "idle") spec.kind = PMLMIG_WORKLOAD_IDLE;
  else if (name == "seq") {
    spec.kind = PMLMIG_WORKLOAD_SEQ;
    spec.hot_fraction = 1.0;  // sweep the whole share unless told otherwise
  }
  else if (name == "random") spec.kind = PMLMIG_WORKLOAD_RANDOM;
  else if (name == "hotset") spec.kind = PMLMIG_WORKLOAD_HOTSET;
  else return BadSpec(text, "unknown workload '" + std::string(name) + "'");

  std::string_view rest = colon == std::string_view::npos ? std::string_view() : text.substr(colon + 1);
  if (colon != std::string_view::npos && rest.empty()) return BadSpec(text, "empty parameter list");
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) return BadSpec(text, "parameter '" + std::string(item) + "' has no value");
    const std::string_view key = item.substr(0, eq);
    const std::string_view value = item.substr(eq + 1);
    if (key == "rate") {
      if (!ParseUint(value, &spec.rate) || spec.rate == 0) {
        return BadSpec(text, "rate must be a positive whole number of pages per second");
      }
      if (spec.kind == PMLMIG_WORKLOAD_IDLE) return BadSpec(text, "idle takes no rate");
    } else if ((spec.kind == PMLMIG_WORKLOAD_HOTSET || spec.kind == PMLMIG_WORKLOAD_SEQ) && key == "fraction") {
      if (!ParseDouble(value, &spec.hot_fraction) || !(spec.hot_fraction > 0.0 && spec.hot_fraction <= 1.0)) {
        return BadSpec(text, "fraction must be a number in (0, 1]");
      }
    } else if (spec.kind == PMLMIG_WORKLOAD_HOTSET && key == "share") {
      if (!ParseDouble(value, &spec.hot_share) || !(spec.hot_share >= 0.0 && spec.hot_share <= 1.0)) {
        return BadSpec(text, "share must be a number in [0, 1]");
      }
    } else {
      return BadSpec(text, "unknown parameter '" + std::string(key) + "' for " + std::string(name));
    }
  }
  return spec;
}

Result<VcpuWorkload> ParseVcpuWorkload(std::string_view text) {
  const size_t eq = text.find('=');
  if (eq == std::string_view::npos) {
    return InvalidArgument("'" + std::string(text) + "' has no '=' (expected N=SPEC, e.g. 2=random:rate=1000)");
  }
  const std::string_view index = text.substr(0, eq);
  uint64_t vcpu = 0;
  // Nine digits at most: any real index fits, and so does the range check's message.
  if (index.size() > 9 || !ParseUint(index, &vcpu)) {
    return InvalidArgument("'" + std::string(text) + "': vCPU '" + std::string(index) + "' is not a number");
  }
  auto spec = ParseWorkload(text.substr(eq + 1));
  if (!spec.ok()) return spec.status().WithContext("vCPU " + std::to_string(vcpu));
  return VcpuWorkload{static_cast<uint32_t>(vcpu), *spec};
}

Result<VcpuWorkloads> ParseVcpuWorkloads(std::span<const std::string> texts, uint32_t vcpus) {
  VcpuWorkloads out;
  std::map<uint32_t, std::string_view> seen;  // for the message on a repeat
  for (const std::string& text : texts) {
    PMLMIG_ASSIGN_OR_RETURN(VcpuWorkload w, ParseVcpuWorkload(text));
    if (w.vcpu >= vcpus) {
      return InvalidArgument("'" + text + "': vCPU " + std::to_string(w.vcpu) + " does not exist (the VM has " +
                             std::to_string(vcpus) + " vCPU" + (vcpus == 1 ? "" : "s") + ", 0.." +
                             std::to_string(vcpus - 1) + ")");
    }
    if (const auto [it, fresh] = seen.emplace(w.vcpu, text); !fresh) {
      return InvalidArgument("vCPU " + std::to_string(w.vcpu) + " is given twice ('" + std::string(it->second) +
                             "' and '" + text + "')");
    }
    out.emplace(w.vcpu, w.spec);
  }
  return out;
}

std::string DescribeWorkloads(const WorkloadSpec& all, const VcpuWorkloads& overrides) {
  std::string text = all.ToString();
  const char* sep = " (";
  for (const auto& [vcpu, spec] : overrides) {
    text += sep + ("vcpu " + std::to_string(vcpu)) + ": " + spec.ToString();
    sep = ", ";
  }
  return overrides.empty() ? text : text + ")";
}

Result<FillMode> ParseFillMode(std::string_view text) {
  if (text == "random") return FillMode::kRandom;
  if (text == "zero") return FillMode::kZero;
  return InvalidArgument("invalid fill '" + std::string(text) + "': expected random or zero");
}

std::string_view FillModeName(FillMode mode) { return mode == FillMode::kRandom ? "random" : "zero"; }

}  // namespace pmlmig::vmm
