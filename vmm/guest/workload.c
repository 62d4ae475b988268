/* The test guest: one freestanding 64-bit program that every vCPU runs.
 *
 * The VMM enters it in long mode at PMLMIG_IMAGE_GPA with
 *   rdi = vCPU id, rsi = boot parameters (struct pmlmig_boot_params),
 *   rsp = top of this vCPU's stack,
 * and identity-mapped memory. It writes pages of its share of the workload
 * area with its own workload (bp->vcpu[id]), stamping each (see
 * guest_abi.h), and never returns.
 *
 * The host emulates guest instructions here (about 1.4 M/s per vCPU), so the
 * loops are kept to a couple of dozen instructions per page: no SSE, no
 * calls, counters in registers, one store to the statistics page per write.
 * It must never touch memory outside the boot page, its statistics slot, its
 * stack and its share of the workload area. */
#include "pmlmig/vmm/guest_abi.h"

static inline void outl(uint16_t port, uint32_t value) {
  __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static __attribute__((noreturn)) void panic(uint32_t code) {
  for (;;) {
    outl(PMLMIG_PORT_PANIC, code);
    __asm__ volatile("hlt");
  }
}

static inline uint64_t mulhi(uint64_t a, uint64_t b) {
  return (uint64_t)(((unsigned __int128)a * b) >> 64);
}

/* Stamps workload page `index` (across both ranges). */
#define WRITE_PAGE(index)                                                    \
  do {                                                                       \
    uint64_t gpa_ = ((index) < r0_pages ? r0_base : r1_base) + ((index) << 12); \
    volatile uint64_t* p_ = (volatile uint64_t*)gpa_;                        \
    st->pages_written = ++seq;                                               \
    p_[0] = tag | ((gpa_ >> 12) & 0xffffffffull);                            \
    p_[1] = seq;                                                             \
  } while (0)

#define THROTTLE()                                              \
  do {                                                          \
    if (batch != 0 && ++since == batch) {                       \
      outl(PMLMIG_PORT_THROTTLE, since);                        \
      since = 0;                                                \
    }                                                           \
  } while (0)

__attribute__((section(".text.start"), noreturn, used)) void pmlmig_guest_start(
    uint64_t vcpu, const struct pmlmig_boot_params* bp) {
  if (bp->magic != PMLMIG_BOOT_MAGIC || bp->version != PMLMIG_BOOT_VERSION) panic(PMLMIG_PANIC_BAD_MAGIC);
  if (vcpu >= bp->num_vcpus || vcpu >= PMLMIG_MAX_VCPUS) panic(PMLMIG_PANIC_BAD_VCPU);

  volatile struct pmlmig_vcpu_stats* st =
      (volatile struct pmlmig_vcpu_stats*)(PMLMIG_STATS_GPA + vcpu * sizeof(struct pmlmig_vcpu_stats));
  outl(PMLMIG_PORT_STARTED, (uint32_t)vcpu);
  st->started = 1;

  /* This vCPU's own workload (vCPUs of one VM may differ), read once. */
  const struct pmlmig_vcpu_params* vp = &bp->vcpu[vcpu];
  const uint32_t workload = vp->workload;
  if (workload == PMLMIG_WORKLOAD_IDLE) {
    for (;;) {
      __asm__ volatile("hlt");
      st->loops = st->loops + 1;
    }
  }

  const uint64_t first = vp->first_page;
  const uint64_t pages = vp->pages;
  if (pages == 0) panic(PMLMIG_PANIC_EMPTY_RANGE);
  /* Index i of the workload area lives at r0_base + i*4096 below the first
   * range's end and at r1_base + i*4096 after it (r1_base pre-biased). */
  const uint64_t r0_pages = bp->ranges[0].pages;
  const uint64_t r0_base = bp->ranges[0].gpa;
  const uint64_t r1_base = bp->num_ranges > 1 ? bp->ranges[1].gpa - (r0_pages << 12) : r0_base;
  const uint64_t tag = (PMLMIG_STAMP_MAGIC << 48) | (vcpu << 32);
  const uint32_t batch = vp->throttle_batch;
  uint32_t since = 0;
  uint64_t seq = st->pages_written;
  uint64_t x = vp->seed ? vp->seed : 0x9e3779b97f4a7c15ull;

  if (workload == PMLMIG_WORKLOAD_SEQ) {
    const uint64_t span = vp->hot_pages != 0 && vp->hot_pages < pages ? vp->hot_pages : pages;
    for (;;) {
      for (uint64_t i = first; i < first + span; ++i) {
        WRITE_PAGE(i);
        THROTTLE();
      }
      st->loops = st->loops + 1;
    }
  }

  uint64_t hot = vp->hot_pages;
  if (workload != PMLMIG_WORKLOAD_HOTSET || hot == 0 || hot >= pages) hot = 0;
  const uint64_t cold = pages - hot;
  const uint32_t hot_share = vp->hot_share;
  for (;;) {
    for (uint64_t n = 0; n < pages; ++n) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      uint64_t index;
      if (hot != 0 && (uint32_t)x < hot_share) index = first + mulhi(x, hot);
      else index = first + hot + mulhi(x, cold);
      WRITE_PAGE(index);
      THROTTLE();
    }
    st->loops = st->loops + 1;
  }
}
