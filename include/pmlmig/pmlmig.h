/*
 * pmlmig.h: the C ABI of pmlmig (C11; also valid C++). Usable from Rust
 * through bindgen: plain structs, int-sized enums (a value the library does
 * not know is refused, never trusted), opaque handles, no macros needed to
 * call anything.
 *
 * The model (docs/EMBEDDING.md has the whole story):
 *   - The embedder owns its VM: the KVM VM fd, the vCPU threads, guest memory.
 *     pmlmig drives it through a table of callbacks (pmlmig_vm_ops) and reads
 *     guest memory through the regions the embedder describes.
 *   - Source side: pmlmig_source migrates one running VM to a receiver
 *     (pmlmig_source_start returns at once; the migration runs on a library
 *     thread; pmlmig_source_wait collects the outcome).
 *   - Target side: pmlmig_receiver listens; for each incoming migration it
 *     calls the embedder's factory, which builds a VM from the opaque
 *     description the source sent, and hands the resumed VM back through
 *     pmlmig_receiver_wait.
 *
 * Rules of the ABI:
 *   - Errors: a Status kind becomes -EINVAL (bad input), -ENOENT, -EACCES,
 *     -EHOSTUNREACH (unavailable: a peer or a capability), -ENOMEM,
 *     -ECANCELED, -EBADMSG (data loss) or -EIO (anything else).
 *   - Every function that can fail returns 0 or a negative errno value (the
 *     few that return a value, such as pmlmig_receiver_port, say so) and
 *     leaves a message: pmlmig_*_last_error(handle) for a handle (the last
 *     failing call on it, from any thread), or pmlmig_last_error() (per
 *     thread) for the call that failed on this thread. A handle's message is
 *     copied for the calling thread: the pointer stays valid until that
 *     thread's next pmlmig_*_last_error call, whatever other threads do.
 *   - Every options or statistics struct starts with `size`, which the caller
 *     sets to sizeof the struct it was compiled with (the *_init functions do
 *     this): the library reads or writes only the fields that size covers, so
 *     structs grow at their end without breaking older callers.
 *   - No C++ exception crosses this interface; callbacks must not unwind
 *     through it either (a C++ embedder catches its own exceptions).
 *   - Numbered variants (pmlmig_foo_2) are how a function's signature changes;
 *     the old one stays for the life of the ABI major version.
 *
 * Versions, each on its own (docs/EMBEDDING.md states what interoperates):
 *   PMLMIG_VERSION_*       the library release;
 *   PMLMIG_ABI_VERSION     this header's ABI (the shared library's SONAME);
 *   PMLMIG_WIRE_VERSION    the migration protocol (proto/migration.proto).
 * The embedder's VM state blob and description are opaque to pmlmig: their
 * format and version are the embedder's.
 */
#ifndef PMLMIG_PMLMIG_H_
#define PMLMIG_PMLMIG_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(PMLMIG_BUILDING_LIBRARY)
#define PMLMIG_API __attribute__((visibility("default")))
#else
#define PMLMIG_API
#endif

#define PMLMIG_VERSION_MAJOR 0
#define PMLMIG_VERSION_MINOR 13
#define PMLMIG_VERSION_PATCH 0
/* (major << 16) | (minor << 8) | patch, comparable with pmlmig_version(). */
#define PMLMIG_VERSION ((PMLMIG_VERSION_MAJOR << 16) | (PMLMIG_VERSION_MINOR << 8) | PMLMIG_VERSION_PATCH)
#define PMLMIG_ABI_VERSION 1
#define PMLMIG_WIRE_VERSION 2

/* ---- Versions, features, errors ------------------------------------------ */

/* The library's version as PMLMIG_VERSION encodes it (may be newer than the
 * header the caller was compiled with). */
PMLMIG_API uint32_t pmlmig_version(void);
/* "0.13.0" */
PMLMIG_API const char *pmlmig_version_string(void);
PMLMIG_API uint32_t pmlmig_abi_version(void);
PMLMIG_API uint32_t pmlmig_wire_version(void);

#define PMLMIG_FEATURE_MIGRATION (1ull << 0)    /* the gRPC transport is built in */
#define PMLMIG_FEATURE_DIRTY_RING (1ull << 1)   /* this host's KVM offers the dirty ring */
#define PMLMIG_FEATURE_DIRTY_BITMAP (1ull << 2) /* this host's KVM offers the dirty bitmap (/dev/kvm usable) */
#define PMLMIG_FEATURE_TLS (1ull << 3)          /* mutual TLS and tokens on the migration port */
#define PMLMIG_FEATURE_LZ4 (1ull << 4)
#define PMLMIG_FEATURE_ZSTD (1ull << 5)
#define PMLMIG_FEATURE_MARK_DIRTY (1ull << 6)   /* pmlmig_vm_mark_dirty */
#define PMLMIG_FEATURE_HANDOVER (1ull << 7)     /* same-host handover (local, unix:PATH, shared_factory) */
#define PMLMIG_FEATURE_SNAPSHOT (1ull << 8)     /* since 0.10: snapshot_to, pmlmig_restore_* */
/* What this library and host offer (opens /dev/kvm to ask). */
PMLMIG_API uint64_t pmlmig_features(void);

/* The message of the last call that failed on this thread ("" if none). Valid
 * until the next failing call on this thread. */
PMLMIG_API const char *pmlmig_last_error(void);

/* ---- The embedder's VM --------------------------------------------------- */

/* One range of guest RAM. The same slots, in the same order, on both sides. */
typedef struct pmlmig_region {
  uint32_t slot;          /* KVM memslot id (as_id << 16 | id) */
  uint32_t reserved;      /* 0 */
  uint64_t gpa;           /* guest-physical base, 4 KiB aligned */
  uint64_t size;          /* bytes, 4 KiB aligned, > 0 */
  void *host;             /* where the embedder mapped it, 4 KiB aligned */
  int32_t memfd;          /* the file behind it, or -1: lets round 0 skip never-written holes */
  uint32_t reserved2;     /* 0 */
  uint64_t memfd_offset;  /* offset of `host` in memfd */
} pmlmig_region;

/* A growable byte buffer owned by the library, filled by save_state. */
typedef struct pmlmig_buffer pmlmig_buffer;
PMLMIG_API int pmlmig_buffer_append(pmlmig_buffer *buffer, const void *data, size_t length);

/* How pmlmig drives the embedder's VM. Each returns 0 or a negative errno;
 * a failing callback may say why with pmlmig_set_error (the message joins the
 * migration's error). Every callback runs on a library thread (the
 * migration's, on the source; the receiver's control thread, on the target),
 * never two at once for one VM. A vCPU thread blocked in
 * pmlmig_vm_dirty_ring_full is outside guest mode: pause and kick_all must
 * count it as such and not wait for it to re-enter KVM_RUN (the library keeps
 * draining the rings while they run). */
typedef struct pmlmig_vm_ops {
  size_t size; /* sizeof(pmlmig_vm_ops) */
  /* Every vCPU out of KVM_RUN and parked; returns once they are. */
  int (*pause)(void *opaque);
  /* Every vCPU running again (on a VM whose vCPUs never ran: starts them). */
  int (*resume)(void *opaque);
  /* Returns once every running vCPU has left guest mode at least once since
   * the call (flushes PML buffers into the dirty rings). */
  int (*kick_all)(void *opaque);
  /* Sets (on != 0) or clears KVM_MEM_LOG_DIRTY_PAGES on every region's memslot. */
  int (*set_dirty_logging)(void *opaque, int on);
  /* vCPUs paused: append the VM's whole architectural state to `out`. */
  int (*save_state)(void *opaque, pmlmig_buffer *out);
  /* vCPUs not running: restore what save_state wrote on the source. */
  int (*load_state)(void *opaque, const void *data, size_t length);
  /* Optional (may be NULL): pmlmig_vm_destroy calls it last, so a VM handed
   * to the library (by a factory) can be freed by it. Not called when
   * pmlmig_vm_create fails. */
  void (*release)(void *opaque);
  /* Optional (since 0.5; NULL: this VM cannot be throttled, and a migration
   * asking for dirty-limit or auto-converge is refused): makes vCPU `vcpu`
   * leave guest mode soon, without waiting for it (a signal plus
   * immediate_exit, as kick_all does for every vCPU). Any library thread,
   * also while another callback runs (the one exception to the rule above).
   * Its vCPU threads must call pmlmig_vm_throttle_ns before each KVM_RUN. */
  void (*kick_vcpu)(void *opaque, uint32_t vcpu);
} pmlmig_vm_ops;
PMLMIG_API void pmlmig_vm_ops_init(pmlmig_vm_ops *ops);

typedef struct pmlmig_vm_config {
  size_t size;                 /* sizeof(pmlmig_vm_config) */
  int32_t vm_fd;               /* the KVM VM fd */
  uint32_t vcpu_count;
  const int32_t *vcpu_fds;     /* vcpu_count KVM vCPU fds (the dirty rings are mapped from them) */
  /* Entries per vCPU dirty ring (enabled on the VM before its vCPUs were
   * created, with KVM_CAP_DIRTY_LOG_RING_ACQ_REL or KVM_CAP_DIRTY_LOG_RING;
   * a power of two; this host needs at least 2048, see docs/EMBEDDING.md),
   * or 0: the VM has no ring, and pmlmig tracks with the bitmap. */
  uint32_t dirty_ring_entries;
  uint32_t region_count;
  const pmlmig_region *regions;
  /* Opaque bytes for the target's factory: how to build this VM (memory,
   * vCPUs, devices); at most 1 MiB. */
  const void *description;
  size_t description_length;
} pmlmig_vm_config;

/* pmlmig's view of one VM: a deep copy of the config (the fd and region
 * arrays and the description may be freed after pmlmig_vm_create returns;
 * the fds and mappings themselves must stay valid while the VM lives) and
 * the callbacks. The save_state blob may be up to 1 GiB. */
typedef struct pmlmig_vm pmlmig_vm;
PMLMIG_API void pmlmig_vm_config_init(pmlmig_vm_config *config);
PMLMIG_API int pmlmig_vm_create(const pmlmig_vm_config *config, const pmlmig_vm_ops *ops, void *opaque,
                                pmlmig_vm **out);
/* Calls ops->release(opaque) if set. Not while a source uses the VM or a
 * vCPU thread may still call pmlmig_vm_dirty_ring_full. NULL: no-op (as for
 * every *_destroy). */
PMLMIG_API void pmlmig_vm_destroy(pmlmig_vm *vm);
PMLMIG_API void *pmlmig_vm_opaque(const pmlmig_vm *vm);
PMLMIG_API const char *pmlmig_vm_last_error(const pmlmig_vm *vm);
/* `vcpu` is an index into the config's vcpu_fds.
 * On the vCPU's own thread, when KVM_RUN exits with KVM_EXIT_DIRTY_RING_FULL:
 * returns once the ring has room again; then re-enter KVM_RUN. A negative
 * value means the vCPU must stop (-ENOENT: no migration is tracking; the
 * embedder's VM has logging on without pmlmig, which is its bug). */
PMLMIG_API int pmlmig_vm_dirty_ring_full(pmlmig_vm *vm, uint32_t vcpu);
/* Since 0.5. On the vCPU's own thread before each KVM_RUN, when ops.kick_vcpu
 * is set: how long, in nanoseconds, this vCPU must stay out of guest mode
 * first (a migration's dirty-limit or auto-converge; 0: enter now). Wait at
 * most that long and at most 10 ms at a time, ending early to pause or stop
 * the vCPU, then ask again (so a lifted limit frees the vCPU within 10 ms).
 * 0 for a bad vcpu index or without a migration. */
PMLMIG_API uint64_t pmlmig_vm_throttle_ns(pmlmig_vm *vm, uint32_t vcpu);
/* From any thread at any time, after the write: the VMM itself wrote
 * [gpa, gpa+length) (device emulation, a DMA, a write through another
 * mapping), which KVM does not log. The next collection of a migration in
 * progress (or of the next one) sends those pages again. -EINVAL when the
 * range leaves guest memory (nothing is marked). */
PMLMIG_API int pmlmig_vm_mark_dirty(pmlmig_vm *vm, uint64_t gpa, uint64_t length);

/* ---- Source: migrating a running VM ------------------------------------- */

typedef enum pmlmig_outcome {
  PMLMIG_OUTCOME_NONE = 0,      /* no migration has ended yet */
  PMLMIG_OUTCOME_COMPLETED = 1, /* the VM runs on the target: stop it here, never resume it */
  PMLMIG_OUTCOME_FAILED = 2,    /* the VM was resumed here and runs on (unless the stats'
                                   source_paused says resuming it failed too) */
  PMLMIG_OUTCOME_CANCELLED = 3, /* on request, a timeout or the policy: the VM runs on here (the
                                   same exception) */
  PMLMIG_OUTCOME_IN_DOUBT = 4,  /* the commit's answer was lost: the VM stays paused here; never
                                   resume it without learning whether the target runs it */
  PMLMIG_OUTCOME_POSTCOPY_FAILED = 5 /* since 0.6: post-copy broke after the switch; the target's run
                                        is lost, the VM stays paused here as of the switch */
} pmlmig_outcome;
/* "none", "completed", "failed", "cancelled", "in-doubt", "postcopy-failed" */
PMLMIG_API const char *pmlmig_outcome_name(pmlmig_outcome outcome);

typedef enum pmlmig_phase {
  PMLMIG_PHASE_SETUP = 0,
  PMLMIG_PHASE_ROUND = 1,
  PMLMIG_PHASE_STOP_AND_COPY = 2,
  PMLMIG_PHASE_COMMIT = 3,
  PMLMIG_PHASE_DONE = 4,
  PMLMIG_PHASE_POSTCOPY = 5  /* since 0.6: the VM runs on the target; owed pages still go out */
} pmlmig_phase;

typedef enum pmlmig_tracker {
  PMLMIG_TRACKER_AUTO = 0,        /* the dirty ring if the VM has one, else the bitmap */
  PMLMIG_TRACKER_RING = 1,
  PMLMIG_TRACKER_BITMAP = 2,      /* KVM_GET_DIRTY_LOG */
  PMLMIG_TRACKER_BITMAP_CLEAR = 3 /* manual protect: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG */
} pmlmig_tracker;

typedef enum pmlmig_compression {
  PMLMIG_COMPRESSION_NONE = 0,
  PMLMIG_COMPRESSION_LZ4 = 1,
  PMLMIG_COMPRESSION_ZSTD = 2
} pmlmig_compression;

/* What a switch-over policy decides before each live round. */
/* pmlmig_migrate_options.verify */
#define PMLMIG_VERIFY_OFF 0
#define PMLMIG_VERIFY_BEFORE_COMMIT 1
#define PMLMIG_VERIFY_AFTER_COMMIT 2

typedef enum pmlmig_verify_verdict {
  PMLMIG_VERIFY_NOT_ASKED = 0,
  PMLMIG_VERIFY_MATCHED = 1,
  PMLMIG_VERIFY_MISMATCH = 2,     /* before commit: the migration failed; after: the VM runs on the
                                     target with wrong memory, and the source's paused copy is intact */
  PMLMIG_VERIFY_NOT_DONE = 3,
} pmlmig_verify_verdict;

typedef enum pmlmig_decision {
  PMLMIG_DECISION_CONTINUE = 0,      /* send this round live */
  PMLMIG_DECISION_STOP_AND_COPY = 1, /* pause now and send the rest */
  PMLMIG_DECISION_ABORT = 2          /* give up: the VM keeps running here (CANCELLED) */
} pmlmig_decision;

/* Handed by value to the policy before each live round (round >= 1). */
typedef struct pmlmig_round_stats {
  size_t size;
  uint32_t round;                /* the live round about to be sent */
  uint32_t reserved;
  uint64_t remaining_pages;      /* dirty pages collected for it */
  double bytes_per_page;         /* on the wire, averaged over everything sent */
  double bandwidth_mbps;         /* megabits/s, measured over the last rounds */
  double expected_downtime_ms;   /* remaining_pages * bytes_per_page / bandwidth */
  double dirty_pages_rate;       /* pages/s dirtied during the previous round */
  double elapsed_ms;             /* since the migration started */
  uint64_t wire_bytes;           /* sent so far */
} pmlmig_round_stats;

typedef struct pmlmig_progress {
  size_t size;
  pmlmig_phase phase;
  uint32_t round;
  uint64_t remaining_pages;
  double bandwidth_mbps;         /* megabits/s */
  double expected_downtime_ms;
  uint64_t wire_bytes;
  double elapsed_ms;
} pmlmig_progress;

/* Since 0.5. */
typedef enum pmlmig_converge {
  PMLMIG_CONVERGE_NONE = 0,         /* a migration that does not converge ends, or is forced */
  PMLMIG_CONVERGE_DIRTY_LIMIT = 1,  /* cap each writing vCPU's dirty rate (the ring tracker) */
  PMLMIG_CONVERGE_AUTO = 2,         /* hold every vCPU 20%, +10 per step, up to 99% of the time */
} pmlmig_converge;

/* Since 0.6. */
typedef enum pmlmig_postcopy {
  PMLMIG_POSTCOPY_OFF = 0,
  PMLMIG_POSTCOPY_AUTO = 1,  /* pre-copy first; post-copy once the rounds do not converge */
  PMLMIG_POSTCOPY_NOW = 2    /* pure post-copy: the VM moves at once, its pages follow */
} pmlmig_postcopy;

typedef struct pmlmig_migrate_options {
  size_t size;                     /* pmlmig_migrate_options_init sets it and every default */
  const char *target;              /* "host:port" of a receiver; required */
  uint32_t streams;                /* parallel data connections, 1..64; default half the CPUs, 2..8 */
  pmlmig_compression compression;  /* default NONE */
  uint64_t max_bandwidth;          /* bytes/s on the wire; 0 (default) = unlimited */
  uint32_t downtime_limit_ms;      /* default policy: switch over when the expected downtime fits; 300 */
  uint32_t max_rounds;             /* default policy: live rounds before giving up; 50 */
  uint64_t timeout_ms;             /* whole migration; 0 (default) = none */
  int32_t force_on_timeout;        /* at max_rounds or timeout: 0 (default) cancel, 1 switch over anyway */
  int32_t verify;                  /* 0 (default) off; PMLMIG_VERIFY_BEFORE_COMMIT (1): the target compares
                                      memory digests before it resumes, a mismatch keeps the VM here;
                                      PMLMIG_VERIFY_AFTER_COMMIT (2): the target resumes at once, the
                                      source compares afterwards (see stats.verify_verdict) */
  pmlmig_tracker tracker;          /* default AUTO */
  uint32_t reserved;
  /* Security of the migration port: file paths, or NULL. */
  const char *tls_ca;
  const char *tls_cert;
  const char *tls_key;
  const char *tls_server_name;
  const char *token_file;
  /* Optional: after each round and phase change, on the migration thread. */
  void (*on_progress)(void *user, const pmlmig_progress *progress);
  /* Optional: replaces the default policy (downtime limit, max rounds,
   * timeout) before each live round, on the migration thread. */
  pmlmig_decision (*policy)(void *user, pmlmig_round_stats stats);
  void *user;
  /* Since 0.5: what the default policy may do when the guest dirties memory
   * faster than the link carries it (docs/ARCHITECTURE.md, "Convergence").
   * DIRTY_LIMIT needs the ring tracker; both need ops.kick_vcpu. */
  pmlmig_converge converge;        /* default NONE */
  uint32_t stall_rounds;           /* rounds without a smaller dirty set before "not converging"; default 5,
                                      0 = only max_rounds and timeout_ms end it */
  double dirty_limit_pages_per_s;  /* DIRTY_LIMIT's quota per vCPU, new dirty pages/s; 0 (default) = derived
                                      from the measured bandwidth */
  /* Since 0.6 (docs/ARCHITECTURE.md, "Post-copy"): needs a 0.6 receiver. The
   * VM's memory is read, paused, until the target holds every page. */
  pmlmig_postcopy postcopy;        /* default OFF */
  uint32_t reserved2;
  /* Since 0.7: after the link breaks in post-copy, how long to keep trying to
   * resume it (the target's VM runs on meanwhile) before the migration fails
   * with POSTCOPY_FAILED. Default 300000 (5 min); 0 = fail at the first break
   * (0.6). Needs a 0.7 receiver; with a 0.6 one it fails at once, as 0.6 did. */
  uint32_t postcopy_recovery_ms;
  uint32_t reserved3;
  /* Since 0.8 (docs/EMBEDDING.md, "Same-host handover"): target is "unix:PATH"
   * of a receiver on this host, which takes the VM's memory itself: each
   * region's memfd is handed over (SCM_RIGHTS), no page is copied, and only
   * the state moves while the VM is paused. Every region needs its memfd.
   * Compression, max_bandwidth, TLS, tokens, converge and postcopy do not
   * apply (refused). After COMPLETED the memory belongs to the target: never
   * write it again (unmapping it is fine). */
  int32_t local;
  uint32_t reserved4;
  /* Since 0.10 (docs/EMBEDDING.md, "Snapshots"): instead of a migration, a
   * snapshot of the VM to this file (docs/SNAPSHOT_FORMAT.md), written under a
   * temporary name and renamed into place once complete; target must then
   * be NULL or empty. The VM is paused for the whole write, or with
   * snapshot_live pre-copy rounds go into the file while it runs, under the
   * same switch-over policy as a migration's rounds. After COMPLETED the VM
   * runs on here (stats.source_kept) and another migration or snapshot may
   * start. Compression, max_bandwidth, TLS, tokens, local, postcopy and verify
   * do not apply (refused): the file carries digests, checked on restore. */
  const char *snapshot_to;
  int32_t snapshot_live;
  uint32_t reserved5;
} pmlmig_migrate_options;
PMLMIG_API void pmlmig_migrate_options_init(pmlmig_migrate_options *options);

typedef struct pmlmig_migration_stats {
  size_t size;
  pmlmig_outcome outcome;
  uint32_t rounds;               /* rounds sent, round 0 and the final one included */
  double setup_time_ms;
  double total_time_ms;
  double downtime_ms;            /* source pause to target resumed (completed only) */
  double expected_downtime_ms;   /* at the switch-over decision */
  uint64_t pages;                /* pages sent: normal + zero */
  uint64_t zero_pages;           /* sent as a header only */
  uint64_t wire_bytes;
  double throughput_mbps;        /* megabits/s: wire bytes over the total time */
  int32_t verified;              /* the memory digests of both sides matched */
  uint32_t reserved;
  /* Since 0.3: */
  pmlmig_verify_verdict verify_verdict;
  uint32_t mismatched_chunks;    /* MISMATCH: chunks of guest memory that differ */
  uint64_t mismatched_bytes;     /* and their size */
  /* Since 0.5: */
  uint32_t throttle_steps;       /* dirty-limit or auto-converge steps taken */
  uint32_t throttle_max_pct;     /* auto-converge's highest throttle (0: none) */
  double dirty_limit_min_pages_per_s;  /* dirty-limit's lowest per-vCPU quota (0: none) */
  /* Since 0.6: post-copy (all 0 unless it was used). */
  int32_t postcopy_used;
  uint32_t postcopy_requests;    /* missing pages the guest touched on the target */
  uint64_t postcopy_owed_pages;  /* owed at the switch */
  double postcopy_latency_p50_ms; /* fault to page placed, at the target */
  double postcopy_latency_p99_ms;
  double postcopy_latency_max_ms;
  double postcopy_ms;            /* the target running to it holding every page */
  /* Since 0.7: */
  uint32_t postcopy_recoveries;  /* post-copy links broken and resumed */
  uint32_t reserved2;
  /* Since 0.10: */
  int32_t source_kept;           /* the target was a copy (a snapshot): completed, and the VM runs on here */
  /* Since 0.13 (was reserved3, always 0): failed or cancelled, and the resume
   * callback failed too, so the VM is paused here (last_error says both). */
  int32_t source_paused;
} pmlmig_migration_stats;
PMLMIG_API void pmlmig_migration_stats_init(pmlmig_migration_stats *stats);

/* A migration controller for one running VM: one migration at a time; once
 * one completed (or is in doubt) no other starts. The VM must outlive it. */
typedef struct pmlmig_source pmlmig_source;
PMLMIG_API int pmlmig_source_create(pmlmig_vm *vm, pmlmig_source **out);
/* Checks the options (nothing is connected yet: an unreachable target is
 * reported by pmlmig_source_wait), then starts the migration on a library
 * thread and returns. -EBUSY: one is running; -EINVAL: bad options, or the VM
 * has migrated or is in doubt (see last_error). Whatever the outcome, dirty
 * logging is off and the rings are empty once the migration has ended. */
PMLMIG_API int pmlmig_source_start(pmlmig_source *source, const pmlmig_migrate_options *options);
/* Blocks until the migration started last has ended; fills *stats (may be
 * NULL). Returns 0 when it completed; -ECANCELED when it was cancelled;
 * -ENOTRECOVERABLE when it is in doubt; when it failed, -EHOSTUNREACH (the
 * receiver unreachable or gone: nothing listens, the connection broke, it
 * shut down) or -EIO (anything else), the message in last_error; -ENOENT
 * when none was started; -EDEADLK (since 0.13; it used to hang) when called
 * from a callback on the migration's own thread.
 * Another thread may call pmlmig_source_destroy meanwhile: this returns
 * (-ECANCELED) before the handle is freed. */
PMLMIG_API int pmlmig_source_wait(pmlmig_source *source, pmlmig_migration_stats *stats);
/* From any thread: the progress of the migration in flight, or of the last
 * one (phase DONE), and how the last one ended. */
PMLMIG_API int pmlmig_source_status(pmlmig_source *source, pmlmig_progress *progress, pmlmig_outcome *last);
/* From any thread: stops the migration in flight; the VM runs on here.
 * -ENOENT when none is in flight. Too late once the commit is under way. */
PMLMIG_API int pmlmig_source_cancel(pmlmig_source *source);
PMLMIG_API const char *pmlmig_source_last_error(const pmlmig_source *source);
/* Cancels a migration in flight and waits for it, and for the threads in
 * pmlmig_source_wait to return; no call may start on the handle once this has
 * begun. */
PMLMIG_API void pmlmig_source_destroy(pmlmig_source *source);

/* ---- Target: receiving a VM --------------------------------------------- */

/* The memory the source announced, for the factory. */
typedef struct pmlmig_region_layout {
  uint32_t slot;
  uint32_t reserved;
  uint64_t gpa;
  uint64_t size;
} pmlmig_region_layout;

/* Builds the embedder's VM for an incoming migration: memory zeroed, laid out
 * exactly as `layout`, `vcpus` vCPUs created but not running; wraps it with
 * pmlmig_vm_create (ops->release frees it) and stores it in *out. Returns 0
 * or a negative errno to refuse (the message through pmlmig_set_error).
 * Runs on the receiver's control thread. */
typedef int (*pmlmig_vm_factory)(void *user, const void *description, size_t description_length,
                                 uint32_t vcpus, const pmlmig_region_layout *layout, uint32_t region_count,
                                 pmlmig_vm **out);
/* Since 0.8: builds the VM for a same-host handover (listen "unix:PATH") over
 * the source's own memory: `regions` give each slot's gpa and size, and in
 * memfd / memfd_offset the file that holds it (host is NULL). The fds are
 * valid during the call only: map them (MAP_SHARED) or dup them. Never write
 * that memory before the VM resumes (until then the source may resume on
 * it). Wrap the VM with pmlmig_vm_create, its regions naming the memfd (a
 * dup is fine: the library checks that it is the same file, at the same
 * offset). Runs on the receiver's thread. */
typedef int (*pmlmig_vm_factory_shared)(void *user, const void *description, size_t description_length,
                                        uint32_t vcpus, const pmlmig_region *regions, uint32_t region_count,
                                        pmlmig_vm **out);
/* Optional check of the restored VM before it resumes (state loaded, vCPUs
 * not running), when the source asked for verification and the memory digest
 * matched: 0 accepts, a negative errno refuses the migration. */
typedef int (*pmlmig_vm_check)(void *user, pmlmig_vm *vm);
/* For a callback that fails (a factory or check that refuses, a vm_ops
 * callback): the message the migration's error will carry. */
PMLMIG_API void pmlmig_set_error(const char *message);

typedef struct pmlmig_receive_options {
  size_t size;                    /* pmlmig_receive_options_init sets it and every default */
  const char *listen;             /* "host:port"; port 0 picks one (pmlmig_receiver_port); required;
                                     since 0.8 also "unix:PATH" (see shared_factory) */
  pmlmig_vm_factory factory;      /* required for host:port */
  pmlmig_vm_check check;          /* optional */
  void *user;
  int32_t require_verify;         /* refuse a source that sends no memory digest; default 0 */
  int32_t allow_insecure;         /* allow a non-loopback listen without TLS or token; default 0 */
  uint64_t max_memory_bytes;      /* 0 (default): what the host has available */
  uint32_t max_vcpus;             /* default 1024 */
  uint32_t max_streams;           /* default 64 */
  uint32_t handshake_timeout_ms;  /* default 30000 */
  uint32_t idle_timeout_ms;       /* default 60000; 0 = none */
  uint32_t commit_timeout_ms;     /* default 30000 */
  uint32_t reserved;
  const char *tls_ca;
  const char *tls_cert;
  const char *tls_key;
  const char *token_file;
  /* Since 0.7: in post-copy, how long a VM whose link to the source broke runs
   * on, waiting for the source to resume, before it is discarded. Default
   * 600000 (10 min); 0 = discard at once (0.6). */
  uint32_t postcopy_recovery_ms;
  uint32_t reserved2;
  /* Since 0.8: with listen "unix:PATH" the receiver takes same-host handovers
   * (a socket of mode 0600; a source of another uid is refused) and builds
   * each VM with this factory; `factory` may then be NULL. TLS, tokens,
   * allow_insecure, max_memory_bytes and max_streams do not apply; the idle
   * timeout (between the setup and the final state) is at least 10 min. */
  pmlmig_vm_factory_shared shared_factory;
  /* Since 0.11: 1 (the default) places the first round of a migration of
   * several streams into the new VM's memory with userfaultfd (UFFDIO_COPY:
   * no page fault per page), in the regions that have a memfd; from the setup
   * until the first later round (or the final state) the receiver holds those
   * regions registered for missing faults (docs/EMBEDDING.md, "0.11.0").
   * 0: pages are copied through the mapping, as in 0.10. */
  int32_t uffd_fill;
  uint32_t reserved3;
} pmlmig_receive_options;
PMLMIG_API void pmlmig_receive_options_init(pmlmig_receive_options *options);

typedef struct pmlmig_receive_stats {
  size_t size;
  pmlmig_outcome outcome;        /* COMPLETED, FAILED or CANCELLED (the source aborted) */
  uint32_t rounds;
  uint64_t normal_pages;
  uint64_t zero_pages;
  uint64_t wire_bytes;
  double target_restore_ms;      /* Final received to VM ready */
  double target_resume_ms;       /* Commit received to vCPUs running */
  double downtime_ms;            /* as the target reckons it: source pause to resumed */
  int32_t verified;
  uint32_t reserved;
  /* Since 0.7: */
  int32_t postcopy;              /* the VM resumed before all its memory was here (the check was not called;
                                    every page had arrived when this returned) */
  uint32_t postcopy_recoveries;  /* post-copy links broken and resumed by the source */
  /* Since 0.11: */
  uint64_t uffd_filled_bytes;    /* of the first round, placed with userfaultfd (uffd_fill) */
} pmlmig_receive_stats;
PMLMIG_API void pmlmig_receive_stats_init(pmlmig_receive_stats *stats);

/* Listens; migrations are served one at a time on library threads. */
typedef struct pmlmig_receiver pmlmig_receiver;
PMLMIG_API int pmlmig_receiver_start(const pmlmig_receive_options *options, pmlmig_receiver **out);
PMLMIG_API int pmlmig_receiver_port(const pmlmig_receiver *receiver);
/* Waits up to timeout_ms (-1: forever) for the next migration to end; `vm`
 * must not be NULL (-EINVAL), `stats` may be.
 * 0: one completed; *vm is the resumed VM, now the caller's (destroy it with
 * pmlmig_vm_destroy); from then on the receiver refuses new migrations but
 * keeps answering the source's commit resolution, so keep it alive while the
 * VM runs. -ETIMEDOUT: nothing ended in time. -ESHUTDOWN (since 0.13; was
 * -ETIMEDOUT): another thread is destroying the receiver, which is freed
 * once this has returned. Any other negative errno: that attempt failed (its
 * VM was released) and the receiver waits for the next; *stats says how it
 * ended. */
PMLMIG_API int pmlmig_receiver_wait(pmlmig_receiver *receiver, int64_t timeout_ms, pmlmig_vm **vm,
                                    pmlmig_receive_stats *stats);
PMLMIG_API const char *pmlmig_receiver_last_error(const pmlmig_receiver *receiver);
/* Stops listening; a migration in progress fails. Threads in
 * pmlmig_receiver_wait return -ESHUTDOWN before the handle is freed; no call
 * may start on it once this has begun. */
PMLMIG_API void pmlmig_receiver_destroy(pmlmig_receiver *receiver);

/* ---- Restoring a snapshot (since 0.10) ------------------------------------ */

typedef struct pmlmig_restore_options {
  size_t size;                 /* pmlmig_restore_options_init sets it and every default */
  const char *path;            /* a snapshot file (pmlmig_migrate_options.snapshot_to); required */
  pmlmig_vm_factory factory;   /* builds the VM, as for a migration's target; required */
  void *user;
  int32_t lazy;                /* 0 (default), eager: every page is read and checked before the VM runs.
                                  1: the VM runs at once; a page the guest touches is read from the file
                                  then (userfaultfd), background readers fill the rest, and the digests
                                  are compared once all is in. Needs userfaultfd; a region in shared
                                  memory must name its memfd (private anonymous memory needs none). */
  uint32_t threads;            /* eager: reads in flight; lazy: background readers; default 8 */
} pmlmig_restore_options;
PMLMIG_API void pmlmig_restore_options_init(pmlmig_restore_options *options);

typedef struct pmlmig_restore_stats {
  size_t size;
  int32_t lazy;
  int32_t verified;            /* every chunk digest of the file matched the memory read from it */
  double open_ms;              /* the file opened and checked (header, layout, digests) */
  double build_ms;             /* the factory */
  double load_ms;              /* eager: memory read and checked; lazy: the faults armed */
  double running_ms;           /* from the start to the vCPUs running */
  double complete_ms;          /* from the start to every page in memory (0 while pages are missing) */
  uint64_t guest_bytes;
  uint64_t bytes_read;         /* page data read from the file */
  uint64_t faults;             /* lazy: pages a vCPU waited for */
  double latency_p50_ms;       /* lazy: a fault to its page placed */
  double latency_p99_ms;
  double latency_max_ms;
} pmlmig_restore_stats;
PMLMIG_API void pmlmig_restore_stats_init(pmlmig_restore_stats *stats);

/* A VM brought back from a snapshot file. Its functions are called from one
 * thread at a time. */
typedef struct pmlmig_restore pmlmig_restore;
/* Opens and checks the file, builds the VM with the factory, reads its memory
 * (eager) or arms the faults (lazy), loads the state and resumes the VM (its
 * resume callback); on the calling thread. 0: the VM runs, *out is the
 * restore, and the VM is the restore's until pmlmig_restore_wait hands it
 * over. On an error nothing runs and a VM already built is released:
 * -ENOENT no such file; -EINVAL not a snapshot, another format version, or a
 * VM without the snapshot's layout; -EBADMSG damage found (last_error names
 * the file, the field or the guest range); the factory's errno. */
PMLMIG_API int pmlmig_restore_start(const pmlmig_restore_options *options, pmlmig_restore **out);
/* Waits up to timeout_ms (-1: forever) for every page to be in memory (eager:
 * at once) and for the digests to be compared; `vm` must not be NULL.
 * 0: *vm is the running VM, now the caller's (pmlmig_vm_destroy).
 * -EBADMSG (lazy): every page is in but the file was damaged and the guest
 * has run on it (last_error names the ranges); *vm is handed over all the
 * same. -ETIMEDOUT: pages still missing; call again. Another negative errno:
 * reading the file failed (last_error); the VM stays the restore's, and a
 * lazy one's vCPUs may wait on pages that will not come: destroy the
 * restore, which lets them go. */
PMLMIG_API int pmlmig_restore_wait(pmlmig_restore *restore, int64_t timeout_ms, pmlmig_vm **vm,
                                   pmlmig_restore_stats *stats);
PMLMIG_API const char *pmlmig_restore_last_error(const pmlmig_restore *restore);
/* A VM not handed over yet is paused (a lazy one's missing pages read as
 * zero first, so no vCPU stays blocked on one) and released. Not while another
 * thread is in pmlmig_restore_wait on it. */
PMLMIG_API void pmlmig_restore_destroy(pmlmig_restore *restore);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* PMLMIG_PMLMIG_H_ */
