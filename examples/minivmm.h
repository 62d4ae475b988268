/*
 * minivmm: a tiny KVM VMM in C that embeds pmlmig through its C ABI alone
 * (pmlmig/pmlmig.h). This header is the example's own; it shares nothing with
 * the project's C++ VMM in vmm/.
 *
 * Files:
 *   vm.c       the KVM VM: /dev/kvm, memfd guest RAM in one memslot, the dirty
 *              ring, one thread per vCPU, pause / resume / kick, dirty logging
 *   guest.c    the guest program, its memory layout and boot state, and the
 *              checker that proves every page holds what the registers explain
 *   state.c    the vCPU state format save_state / load_state carry
 *   migrate.c  everything that calls pmlmig: the ops table, the description,
 *              --send and --receive
 *   main.c     the command line and --run
 *
 * Errors: every function that can fail returns 0 or a negative errno and
 * writes one line saying what failed, on what, and why into an mv_error.
 */
#ifndef MINIVMM_H_
#define MINIVMM_H_

#include <linux/kvm.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Errors --------------------------------------------------------------- */

typedef struct mv_error {
  char msg[512];
} mv_error;

/* "<printf>: <strerror(errnum)>"; returns -errnum. */
int mv_fail_errno(mv_error *err, int errnum, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* "<printf>"; returns code (a negative errno). */
int mv_fail(mv_error *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- Guest memory layout (guest-physical addresses) -----------------------
 *
 *   0x0000  GDT: null, flat 32-bit code (0x08), flat data (0x10), TSS (0x18)
 *   0x1000  the guest program (guest.c)
 *   0x2000  stats: one 16-byte record per vCPU {u32 seq, u32 cursor, 0, 0}
 *   0x3000  the TSS (zero; only there because VMX wants a usable TR)
 *   0x4000  data pages, up to the end of RAM, split evenly between the vCPUs
 */
#define MV_PAGE_SIZE 4096u
#define MV_GDT_GPA 0x0000u
#define MV_CODE_GPA 0x1000u
#define MV_STATS_GPA 0x2000u
#define MV_TSS_GPA 0x3000u
#define MV_DATA_GPA 0x4000u
#define MV_MAX_VCPUS 64u
#define MV_MIN_MEMORY_MIB 1u
/* Stays below the TSS area KVM_SET_TSS_ADDR reserves at 0xfffbd000 and keeps
 * every address a 32-bit register can hold. */
#define MV_MAX_MEMORY_MIB 3072u
/* Ring sizes: 65536 entries when the host allows it, never under 4096 (small
 * rings overflow on emulating hosts, REFERENCE.md §1). */
#define MV_RING_ENTRIES_WANTED 65536u
#define MV_RING_ENTRIES_MIN 4096u

/* The pages of vCPU `id`: [first, first + count), page numbers (gpa >> 12). */
typedef struct mv_share {
  uint32_t first;
  uint32_t count;
} mv_share;

/* 0 when memory_mib and vcpus give every vCPU at least one page. */
int mv_layout_share(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, mv_share *share, mv_error *err);

/* ---- The VM (vm.c) --------------------------------------------------------- */

typedef struct mv_vm_options {
  uint32_t memory_mib; /* MV_MIN_MEMORY_MIB..MV_MAX_MEMORY_MIB */
  uint32_t vcpus;      /* 1..MV_MAX_VCPUS */
  int use_ring;        /* enable the dirty ring if the host has one (else the bitmap) */
  /* A same-host handover's target: map this memfd (the source's guest RAM,
   * dup'ed here, never written before the VM resumes) instead of creating
   * one. Only when adopt_memfd_valid is set. */
  int adopt_memfd_valid;
  int adopt_memfd;
} mv_vm_options;

/* Called on a vCPU's thread on KVM_EXIT_DIRTY_RING_FULL; 0 re-enters KVM_RUN,
 * a negative errno stops the vCPU. */
typedef int (*mv_ring_full_fn)(void *ctx, uint32_t vcpu);
/* Before each KVM_RUN: nanoseconds this vCPU must stay out of guest mode
 * (a migration's throttle), 0 to enter now. */
typedef uint64_t (*mv_throttle_fn)(void *ctx, uint32_t vcpu);

typedef enum mv_want { MV_WANT_PAUSE = 0, MV_WANT_RUN = 1, MV_WANT_QUIT = 2 } mv_want;

typedef struct mv_vm mv_vm;

typedef struct mv_vcpu {
  mv_vm *vm;
  uint32_t id;
  int fd;
  struct kvm_run *run; /* mmap of the vCPU fd; run->immediate_exit is written only under vm->lock */
  size_t run_size;
  pthread_t thread;
  int thread_started;
  /* Guarded by vm->lock. */
  int in_run;     /* set just before KVM_RUN, cleared once it returned */
  int parked;     /* waiting for MV_WANT_RUN */
  int dead;       /* the thread stopped on an error (vm->vcpu_error) */
  uint64_t exits; /* KVM_RUN returns, for kick_all */
} mv_vcpu;

struct mv_vm {
  mv_vm_options options;
  uint64_t memory_bytes;
  int kvm_fd;
  int vm_fd;
  int mem_fd;
  uint8_t *mem; /* MAP_SHARED view of mem_fd, memory_bytes long */
  uint32_t ring_entries; /* 0: no dirty ring */
  uint32_t ring_cap;     /* KVM_CAP_DIRTY_LOG_RING(_ACQ_REL) that was enabled, or 0 */
  uint32_t vcpu_count;
  mv_vcpu *vcpus;

  pthread_mutex_t lock;
  pthread_cond_t cond; /* any change of the fields lock guards */
  int sync_ready;      /* lock and cond are initialised */
  /* Guarded by lock. */
  mv_want want;
  mv_ring_full_fn ring_full;
  void *ring_full_ctx;
  mv_throttle_fn throttle;
  void *throttle_ctx;
  int vcpu_failed;
  mv_error vcpu_error; /* the first vCPU failure */
};

/* Builds a VM with zeroed memory and parked vCPU threads (nothing runs until
 * mv_vm_resume). */
int mv_vm_create(const mv_vm_options *options, mv_vm **out, mv_error *err);
/* Stops and joins the vCPU threads, unmaps and closes everything. NULL is fine. */
void mv_vm_free(mv_vm *vm);

/* These four may be called from any thread, one caller at a time. */
/* Every vCPU out of KVM_RUN and parked (or stopped on an error). */
int mv_vm_pause(mv_vm *vm, mv_error *err);
/* Every vCPU running (fails if one stopped on an error). */
int mv_vm_resume(mv_vm *vm, mv_error *err);
/* Returns once every vCPU that was in KVM_RUN at the call has left it. */
int mv_vm_kick_all(mv_vm *vm, mv_error *err);
int mv_vm_set_dirty_logging(mv_vm *vm, int on, mv_error *err);

void mv_vm_set_ring_full_handler(mv_vm *vm, mv_ring_full_fn fn, void *ctx);
void mv_vm_set_throttle_handler(mv_vm *vm, mv_throttle_fn fn, void *ctx);
/* Makes vCPU `id` leave KVM_RUN soon; does not wait. Any thread. */
void mv_vm_kick_vcpu(mv_vm *vm, uint32_t id);
/* 0, or the first vCPU failure in *err. */
int mv_vm_vcpu_status(mv_vm *vm, mv_error *err);
/* vCPUs parked: each vCPU's registers (regs[vcpu_count]). */
int mv_vm_get_regs(mv_vm *vm, struct kvm_regs *regs, mv_error *err);

/* ---- The guest (guest.c) -------------------------------------------------- */

/* Writes the GDT, program, stats and the data pages' initial content into a
 * zeroed VM and sets every vCPU's boot registers. */
int mv_guest_prepare(mv_vm *vm, mv_error *err);

typedef struct mv_check_result {
  uint64_t pages_checked;
  uint64_t bad_pages;
  uint64_t first_bad_gpa;
  char first_bad[256]; /* "gpa 0x...: expected ..., found ..." or a register problem */
} mv_check_result;

/* Verifies every page of guest memory against what the vCPUs' registers
 * explain. 0: all good; -EBADMSG: see result (first_bad). */
int mv_check(const uint8_t *mem, uint64_t memory_bytes, uint32_t vcpus, const struct kvm_regs *regs,
             mv_check_result *result);
/* Pauses nothing: reads the registers of parked vCPUs and runs mv_check. */
int mv_check_vm(mv_vm *vm, struct kvm_regs *regs_out, mv_check_result *result, mv_error *err);

/* How far vCPU `id` has come: pages stored since boot (seq and cursor). */
uint64_t mv_progress(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, const struct kvm_regs *regs);
/* "seq 12 page 0x1f3 (of 0x4..0x803)" */
void mv_describe_position(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, const struct kvm_regs *regs,
                          char *buf, size_t size);
/* One line per vCPU on stdout: "<prefix>  vcpu N: seq ... pages stored". */
void mv_print_positions(const char *prefix, const mv_vm *vm, const struct kvm_regs *regs);
/* Index (0..MV_GUEST_BOUNDARIES-1) of the instruction boundary a vCPU stopped
 * at, or -1. */
int mv_guest_boundary(uint64_t rip);
#define MV_GUEST_BOUNDARIES 13

/* A 64-bit digest of all guest memory (for comparing two sides by eye or script). */
uint64_t mv_memory_digest(const uint8_t *mem, uint64_t memory_bytes);

/* ---- vCPU state format (state.c) ------------------------------------------ */

size_t mv_state_size(uint32_t vcpus);
/* vCPUs parked: writes mv_state_size() bytes into buf. */
int mv_state_save(mv_vm *vm, void *buf, size_t capacity, size_t *length, mv_error *err);
/* vCPUs parked: checks and restores what mv_state_save wrote. */
int mv_state_load(mv_vm *vm, const void *buf, size_t length, mv_error *err);

/* ---- Modes (migrate.c, main.c) -------------------------------------------- */

typedef struct mv_send_args {
  const char *target;
  uint32_t after_ms;
  mv_vm_options vm;
  uint32_t streams;
  int verify;
  int postcopy; /* 0: pre-copy only; 'n': post-copy now; 'a': post-copy auto */
  int auto_converge;
  uint32_t downtime_limit_ms; /* 0: pmlmig's default */
  int local;                  /* same-host handover to unix:PATH: the memory is shared, not copied */
  int snapshot;               /* target is a FILE: a snapshot, and the VM runs on here */
  int live;                   /* snapshot: pre-copy rounds into the file while the guest runs */
} mv_send_args;

typedef struct mv_receive_args {
  const char *listen;         /* --restore: the snapshot FILE */
  double run_after_s;
  int lazy;                   /* --restore */
} mv_receive_args;

int mv_send(const mv_send_args *args);      /* process exit status */
int mv_receive(const mv_receive_args *args); /* process exit status */
int mv_restore(const mv_receive_args *args); /* process exit status */

/* Shared helpers (main.c). */
void mv_sleep_ms(uint64_t ms);
double mv_now_ms(void);

#endif /* MINIVMM_H_ */
