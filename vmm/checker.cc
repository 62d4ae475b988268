#include "pmlmig/vmm/checker.h"

#include <tbb/blocked_range.h>
#include <tbb/parallel_reduce.h>

#include <cstdio>
#include <algorithm>
#include <cstring>

#include "pmlmig/vmm/fill.h"

namespace pmlmig::vmm {
namespace {

bool PageIsFill(const TestGuestConfig& config, uint64_t gfn, const uint8_t* page, size_t from) {
  if (config.fill == FillMode::kRandom) return MatchesFill(config.seed, gfn, page, from);
  for (size_t i = from; i < PMLMIG_PAGE_SIZE; i += 8) {
    uint64_t w;
    std::memcpy(&w, page + i, 8);
    if (w != 0) return false;
  }
  return true;
}

std::string Problem(uint64_t gfn, const char* fmt, unsigned long long a = 0, unsigned long long b = 0) {
  char what[160];
  std::snprintf(what, sizeof what, fmt, a, b);
  char buf[200];
  std::snprintf(buf, sizeof buf, "gfn 0x%llx: %s", static_cast<unsigned long long>(gfn), what);
  return buf;
}

}  // namespace

Status CheckReport::ToStatus() const {
  if (ok()) return Status::Ok();
  return DataLoss("memory check failed on " + std::to_string(pages_bad) + " of " +
                  std::to_string(pages_checked) + " pages; first: " + first_problem);
}

CheckReport CheckGuestMemory(const GuestMemory& memory, const TestGuestConfig& config,
                             const std::vector<uint64_t>& counters) {
  CheckReport empty;
  auto layout = ComputeGuestLayout(memory, config.vcpus);
  if (!layout.ok()) {
    empty.pages_bad = 1;
    empty.first_problem = layout.status().message();
    return empty;
  }
  const GuestLayout& l = *layout;
  // Where each vCPU's own workload stops writing in its share (seq:fraction
  // sweeps only the first pages, idle none): a stamp beyond is not its.
  std::vector<uint64_t> writes_end;
  for (uint32_t v = 0; v < config.vcpus; ++v) {
    writes_end.push_back(l.shares[v].first_page + PagesWrittenInto(config.WorkloadOf(v), l.shares[v].pages));
  }
  auto check_range = [&](const tbb::blocked_range<uint64_t>& r, CheckReport acc) {
    // Shares are contiguous and in vCPU order: find the owner of r.begin().
    uint32_t owner = 0;
    while (owner + 1 < l.shares.size() && r.begin() >= l.shares[owner + 1].first_page) ++owner;
    for (uint64_t i = r.begin(); i != r.end(); ++i) {
      while (owner + 1 < l.shares.size() && i >= l.shares[owner + 1].first_page) ++owner;
      const uint64_t gpa = l.PageGpa(i);
      const uint64_t gfn = gpa >> 12;
      const uint8_t* page = memory.HostAddress(gpa, PMLMIG_PAGE_SIZE);
      ++acc.pages_checked;
      std::string problem;
      if (!PageIsFill(config, gfn, page, 0)) {
        uint64_t w0, w1;
        std::memcpy(&w0, page, 8);
        std::memcpy(&w1, page + 8, 8);
        const uint64_t magic = w0 >> 48, vcpu = (w0 >> 32) & 0xffff, stamped_gfn = w0 & 0xffffffffull;
        const uint64_t limit = owner < counters.size() ? counters[owner] : 0;
        uint64_t fill_w1 = 0;
        if (config.fill == FillMode::kRandom) {
          uint8_t expect[PMLMIG_PAGE_SIZE];
          FillPage(config.seed, gfn, expect);
          std::memcpy(&fill_w1, expect + 8, 8);
        }
        // A stamp is two stores; a pause between them leaves the vCPU's
        // current page with the new first word and the page's old second
        // word. For a first write that is the fill's; one such page per vCPU.
        const bool own_stamp = magic == PMLMIG_STAMP_MAGIC && vcpu == owner && stamped_gfn == (gfn & 0xffffffffull);
        const bool in_flight = own_stamp && w1 == fill_w1;
        if (own_stamp && i >= writes_end[owner]) {
          problem = Problem(gfn, "stamped by vcpu %llu, whose workload writes only the first %llu pages of its share",
                            owner, writes_end[owner] - l.shares[owner].first_page);
        } else if (in_flight && !PageIsFill(config, gfn, page, 16)) {
          problem = Problem(gfn, "half-written stamp but the rest of the page differs from the fill");
        } else if (in_flight) {
          ++acc.pages_in_flight;
          ++acc.pages_stamped;
          acc.in_flight_vcpus.push_back(static_cast<uint32_t>(owner));
        } else if (magic != PMLMIG_STAMP_MAGIC) problem = Problem(gfn, "neither the fill nor a stamp (first word 0x%llx)", w0);
        else if (vcpu != owner) problem = Problem(gfn, "stamped by vcpu %llu, owned by vcpu %llu", vcpu, owner);
        else if (stamped_gfn != (gfn & 0xffffffffull)) problem = Problem(gfn, "stamp names gfn 0x%llx", stamped_gfn);
        else if (w1 == 0 || w1 > limit) problem = Problem(gfn, "stamp sequence %llu beyond vcpu counter %llu", w1, limit);
        else if (!PageIsFill(config, gfn, page, 16)) problem = Problem(gfn, "valid stamp but the rest of the page differs from the fill");
        else ++acc.pages_stamped;
      }
      if (!problem.empty()) {
        if (acc.pages_bad == 0 || gfn < acc.first_bad_gfn) {
          acc.first_bad_gfn = gfn;
          acc.first_problem = std::move(problem);
        }
        ++acc.pages_bad;
      }
    }
    return acc;
  };
  auto join = [](CheckReport a, const CheckReport& b) {
    a.pages_in_flight += b.pages_in_flight;
    a.in_flight_vcpus.insert(a.in_flight_vcpus.end(), b.in_flight_vcpus.begin(), b.in_flight_vcpus.end());
    if (b.pages_bad != 0 && (a.pages_bad == 0 || b.first_bad_gfn < a.first_bad_gfn)) {
      a.first_bad_gfn = b.first_bad_gfn;
      a.first_problem = b.first_problem;
    }
    a.pages_checked += b.pages_checked;
    a.pages_stamped += b.pages_stamped;
    a.pages_bad += b.pages_bad;
    return a;
  };
  CheckReport report = tbb::parallel_reduce(tbb::blocked_range<uint64_t>(0, l.total_pages, 1024), CheckReport{},
                                            check_range, join);
  // At most one half-written stamp per vCPU: its current write.
  std::sort(report.in_flight_vcpus.begin(), report.in_flight_vcpus.end());
  for (size_t i = 1; i < report.in_flight_vcpus.size(); ++i) {
    if (report.in_flight_vcpus[i] == report.in_flight_vcpus[i - 1]) {
      ++report.pages_bad;
      if (report.first_problem.empty()) {
        report.first_problem = "vcpu " + std::to_string(report.in_flight_vcpus[i]) +
                               " has more than one half-written stamp (a lost second store)";
      }
    }
  }
  return report;
}

}  // namespace pmlmig::vmm
