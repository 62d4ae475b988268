/* The contract between the VMM and the test guests (vmm/guest/). Plain C so
 * the freestanding guest and the C++ host include the same definitions.
 *
 * Guest-physical layout (all below 1 MiB except the page tables of very
 * large guests):
 *   0x01000  boot parameters (struct pmlmig_boot_params), written by the host
 *   0x02000  GDT (64-bit code, data)
 *   0x04000  per-vCPU statistics, 64 bytes each (struct pmlmig_vcpu_stats)
 *   0x10000  guest program image (at most 64 KiB)
 *   0x40000  stacks, 4 KiB per vCPU (at most PMLMIG_MAX_VCPUS)
 *   0x80000  PML4, then PDPT, then one page directory per GiB of address
 *            space (identity map with 2 MiB pages, hole included)
 *   workload_start (first 64 KiB boundary after the page tables) .. end of
 *            RAM: the workload area, split between the vCPUs. Above 3 GiB of
 *            RAM it continues at 4 GiB (PC layout), so it has up to two ranges.
 *
 * Every page the workload writes gets a 16-byte stamp at its start:
 *   word0 = PMLMIG_STAMP_MAGIC << 48 | vcpu << 32 | gfn (low 32 bits)
 *   word1 = sequence (the vCPU's pages_written after the increment)
 * The guest stores its pages_written counter *before* the stamp, so at any
 * pause point every stamp's sequence is <= its vCPU's counter. */
#ifndef PMLMIG_VMM_GUEST_ABI_H_
#define PMLMIG_VMM_GUEST_ABI_H_

#include <stdint.h>

#define PMLMIG_PAGE_SIZE 4096ull
#define PMLMIG_MAX_VCPUS 64
#define PMLMIG_MAX_RANGES 2

#define PMLMIG_BOOT_PARAMS_GPA 0x1000ull
#define PMLMIG_GDT_GPA 0x2000ull
#define PMLMIG_STATS_GPA 0x4000ull
#define PMLMIG_IMAGE_GPA 0x10000ull
#define PMLMIG_IMAGE_MAX 0x10000ull
#define PMLMIG_STACK_GPA 0x40000ull
#define PMLMIG_STACK_SIZE 0x1000ull
#define PMLMIG_PAGE_TABLE_GPA 0x80000ull

#define PMLMIG_BOOT_MAGIC 0x31544f4f424d4c50ull /* "PLMBOOT1" little-endian */
#define PMLMIG_BOOT_VERSION 2u /* 2: workload, hot_share, throttle_batch per vCPU */
#define PMLMIG_STAMP_MAGIC 0x504dull            /* 16 bits */

/* Port I/O from guest to host (32-bit OUT unless noted). */
#define PMLMIG_PORT_CONSOLE 0xe9   /* 8-bit: one character of guest output */
#define PMLMIG_PORT_STARTED 0x500  /* value: vCPU id, once at start */
#define PMLMIG_PORT_THROTTLE 0x504 /* value: pages written since the last report */
#define PMLMIG_PORT_PANIC 0x508    /* value: enum pmlmig_guest_panic */

enum pmlmig_workload {
  PMLMIG_WORKLOAD_IDLE = 0,
  PMLMIG_WORKLOAD_SEQ = 1,
  PMLMIG_WORKLOAD_RANDOM = 2,
  PMLMIG_WORKLOAD_HOTSET = 3,
};

enum pmlmig_guest_panic {
  PMLMIG_PANIC_BAD_MAGIC = 1,
  PMLMIG_PANIC_BAD_VCPU = 2,
  PMLMIG_PANIC_EMPTY_RANGE = 3,
};

struct pmlmig_range {
  uint64_t gpa;   /* page aligned */
  uint64_t pages;
};

/* Everything about a vCPU's workload is per vCPU (since version 2), so one VM
 * can mix workloads, e.g. two vCPUs on a hot set and a third rate-limited. */
struct pmlmig_vcpu_params {
  uint64_t first_page;      /* index into the workload area (across ranges) */
  uint64_t pages;           /* this vCPU's share; 0 only for idle */
  uint64_t hot_pages;       /* hotset: the first hot_pages of the share are hot; seq: pages swept */
  uint64_t seed;            /* xorshift64 state, never 0 */
  uint32_t workload;        /* enum pmlmig_workload */
  uint32_t hot_share;       /* hotset: share of writes to the hot pages, in 1/2^32 */
  uint32_t throttle_batch;  /* report to PMLMIG_PORT_THROTTLE every N pages; 0 = never */
  uint32_t reserved;        /* 0 */
};

struct pmlmig_boot_params {
  uint64_t magic;
  uint32_t version;
  uint32_t num_vcpus;
  uint32_t num_ranges;
  uint32_t reserved;  /* 0 */
  struct pmlmig_range ranges[PMLMIG_MAX_RANGES];
  struct pmlmig_vcpu_params vcpu[PMLMIG_MAX_VCPUS];
};

struct pmlmig_vcpu_stats {
  uint64_t pages_written; /* also the last stamp's sequence */
  uint64_t loops;         /* completed passes (one share's worth of writes; halts for idle) */
  uint64_t started;       /* 1 once the vCPU entered its workload */
  uint64_t reserved[5];
};

#ifdef __cplusplus
static_assert(sizeof(struct pmlmig_vcpu_stats) == 64, "one cache line per vCPU");
static_assert(sizeof(struct pmlmig_vcpu_params) == 48, "no hidden padding between host and guest");
static_assert(sizeof(struct pmlmig_boot_params) <= 4096, "boot params fit one page");
#endif

#endif /* PMLMIG_VMM_GUEST_ABI_H_ */
