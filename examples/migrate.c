/*
 * migrate.c: the only file of minivmm that calls pmlmig, and only through
 * pmlmig/pmlmig.h. It hands pmlmig the VM (fds, memory, ring size, a
 * description), implements the callbacks on top of vm.c and state.c, and
 * runs the --send and --receive modes.
 *
 * The description (opaque to pmlmig, read by our factory on the target),
 * little-endian, 24 bytes, version 1:
 *   u32 magic       0x5344564d ("MVDS")
 *   u32 version     1
 *   u32 memory_mib  one memslot, slot 0 at gpa 0, this many MiB
 *   u32 vcpus       1..64
 *   u32 dirty_ring  1: the source ran with a dirty ring (the target uses one too
 *                   if its host has it; a ring is not guest-visible)
 *   u32 reserved    0
 * The factory refuses (with pmlmig_set_error) any other length, magic or
 * version, a vCPU count or memory layout that disagrees with what pmlmig
 * announces, and nonzero reserved fields.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pmlmig/pmlmig.h>

#include "minivmm.h"

#define MV_DESC_MAGIC 0x5344564du
#define MV_DESC_VERSION 1u
#define MV_DESC_SIZE 24u

/* ---- Description ------------------------------------------------------------ */

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static void describe(const mv_vm *vm, uint8_t out[MV_DESC_SIZE]) {
  memset(out, 0, MV_DESC_SIZE);
  put32(out + 0, MV_DESC_MAGIC);
  put32(out + 4, MV_DESC_VERSION);
  put32(out + 8, vm->options.memory_mib);
  put32(out + 12, vm->vcpu_count);
  put32(out + 16, vm->ring_entries != 0);
}

static int parse_description(const void *data, size_t length, uint32_t vcpus, const pmlmig_region_layout *layout,
                             uint32_t region_count, mv_vm_options *out, mv_error *err) {
  const uint8_t *p = data;
  if (length != MV_DESC_SIZE) {
    return mv_fail(err, -EINVAL, "description: %zu bytes, minivmm's has %u", length, MV_DESC_SIZE);
  }
  if (get32(p) != MV_DESC_MAGIC) return mv_fail(err, -EINVAL, "description: magic 0x%08x, not minivmm's", get32(p));
  if (get32(p + 4) != MV_DESC_VERSION) {
    return mv_fail(err, -EPROTONOSUPPORT, "description: version %u, this minivmm reads version %u", get32(p + 4),
                   MV_DESC_VERSION);
  }
  const uint32_t mib = get32(p + 8), desc_vcpus = get32(p + 12), ring = get32(p + 16), reserved = get32(p + 20);
  if (ring > 1 || reserved != 0) return mv_fail(err, -EINVAL, "description: bad dirty_ring %u / reserved %u", ring, reserved);
  if (mib < MV_MIN_MEMORY_MIB || mib > MV_MAX_MEMORY_MIB) {
    return mv_fail(err, -EINVAL, "description: %u MiB is outside %u..%u", mib, MV_MIN_MEMORY_MIB, MV_MAX_MEMORY_MIB);
  }
  if (desc_vcpus != vcpus || vcpus < 1 || vcpus > MV_MAX_VCPUS) {
    return mv_fail(err, -EINVAL, "description: %u vCPUs, but the migration announces %u (this VMM runs 1..%u)",
                   desc_vcpus, vcpus, MV_MAX_VCPUS);
  }
  if (region_count != 1 || layout[0].slot != 0 || layout[0].gpa != 0 || layout[0].size != (uint64_t)mib << 20) {
    return mv_fail(err, -EINVAL,
                   "memory layout: %u regions, the first slot %u gpa 0x%" PRIx64 " size 0x%" PRIx64
                   "; minivmm has one, slot 0 at gpa 0x0, %u MiB",
                   region_count, region_count ? layout[0].slot : 0, region_count ? layout[0].gpa : 0,
                   region_count ? layout[0].size : 0, mib);
  }
  out->memory_mib = mib;
  out->vcpus = vcpus;
  out->use_ring = (int)ring;
  return 0;
}

/* ---- The VM as pmlmig sees it --------------------------------------------- */

/* The opaque pointer pmlmig hands to every callback. It also keeps alive what
 * pmlmig_vm_config points at, for as long as the pmlmig_vm exists (the header
 * says pmlmig copies the config; this way nothing depends on how deeply). */
typedef struct embedded_vm {
  mv_vm *vm;
  int owned_by_pmlmig; /* target: pmlmig_vm_destroy frees it through release */
  int32_t vcpu_fds[MV_MAX_VCPUS];
  pmlmig_region region;
  uint8_t description[MV_DESC_SIZE];
  /* Target: the vCPUs' registers as load_state restored them (post-copy
   * resumes without calling the check, which records them otherwise). */
  struct kvm_regs loaded[MV_MAX_VCPUS];
} embedded_vm;

static mv_vm *vm_of(void *opaque) { return ((embedded_vm *)opaque)->vm; }

/* ---- Callbacks ---------------------------------------------------------- */

/* A failing callback: the message on stderr and, in case pmlmig reports it,
 * through pmlmig_set_error. */
static int callback_failed(const char *what, int rc, const mv_error *err) {
  fprintf(stderr, "minivmm: %s: %s\n", what, err->msg);
  pmlmig_set_error(err->msg);
  return rc;
}

static int op_pause(void *opaque) {
  mv_error err;
  const int rc = mv_vm_pause(vm_of(opaque), &err);
  return rc < 0 ? callback_failed("pause", rc, &err) : 0;
}

static int op_resume(void *opaque) {
  mv_error err;
  const int rc = mv_vm_resume(vm_of(opaque), &err);
  return rc < 0 ? callback_failed("resume", rc, &err) : 0;
}

static int op_kick_all(void *opaque) {
  mv_error err;
  const int rc = mv_vm_kick_all(vm_of(opaque), &err);
  return rc < 0 ? callback_failed("kick_all", rc, &err) : 0;
}

static int op_set_dirty_logging(void *opaque, int on) {
  mv_error err;
  const int rc = mv_vm_set_dirty_logging(vm_of(opaque), on, &err);
  return rc < 0 ? callback_failed("set_dirty_logging", rc, &err) : 0;
}

static int op_save_state(void *opaque, pmlmig_buffer *out) {
  mv_vm *vm = vm_of(opaque);
  mv_error err;
  const size_t size = mv_state_size(vm->vcpu_count);
  uint8_t *buf = malloc(size);
  if (buf == NULL) return callback_failed("save_state", mv_fail_errno(&err, ENOMEM, "allocating %zu bytes", size), &err);
  size_t length = 0;
  int rc = mv_state_save(vm, buf, size, &length, &err);
  if (rc == 0 && (rc = pmlmig_buffer_append(out, buf, length)) < 0) {
    mv_fail(&err, rc, "pmlmig_buffer_append (%zu bytes of vCPU state): %s", length, pmlmig_last_error());
  }
  free(buf);
  return rc < 0 ? callback_failed("save_state", rc, &err) : 0;
}

static int op_load_state(void *opaque, const void *data, size_t length) {
  mv_error err;
  embedded_vm *e = opaque;
  int rc = mv_state_load(e->vm, data, length, &err);
  if (rc == 0) rc = mv_vm_get_regs(e->vm, e->loaded, &err);
  return rc < 0 ? callback_failed("load_state", rc, &err) : 0;
}

/* pmlmig_vm_destroy ends here. On the target a VM our factory built belongs to
 * pmlmig until pmlmig_receiver_wait hands it over, and is freed here too. */
static void op_release(void *opaque) {
  embedded_vm *e = opaque;
  if (e->owned_by_pmlmig) mv_vm_free(e->vm);
  free(e);
}

static int on_ring_full(void *ctx, uint32_t vcpu) { return pmlmig_vm_dirty_ring_full(ctx, vcpu); }
static uint64_t on_throttle(void *ctx, uint32_t vcpu) { return pmlmig_vm_throttle_ns(ctx, vcpu); }
static void op_kick_vcpu(void *opaque, uint32_t vcpu) { mv_vm_kick_vcpu(vm_of(opaque), vcpu); }

/* Wraps vm for pmlmig. owned_by_pmlmig: pmlmig_vm_destroy frees vm too (the
 * target's factory); otherwise the caller frees vm after pmlmig_vm_destroy.
 * On success the vCPUs' ring-full exits go to pmlmig. On failure vm is the
 * caller's still. */
static int wrap_vm(mv_vm *vm, int owned_by_pmlmig, pmlmig_vm **out, mv_error *err) {
  embedded_vm *e = calloc(1, sizeof *e);
  if (e == NULL) return mv_fail_errno(err, ENOMEM, "allocating the pmlmig view of the VM");
  e->vm = vm;
  e->owned_by_pmlmig = owned_by_pmlmig;
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) e->vcpu_fds[i] = vm->vcpus[i].fd;
  e->region.slot = 0;
  e->region.gpa = 0;
  e->region.size = vm->memory_bytes;
  e->region.host = vm->mem;
  e->region.memfd = vm->mem_fd;
  e->region.memfd_offset = 0;
  describe(vm, e->description);

  pmlmig_vm_config config;
  pmlmig_vm_config_init(&config);
  config.vm_fd = vm->vm_fd;
  config.vcpu_count = vm->vcpu_count;
  config.vcpu_fds = e->vcpu_fds;
  config.dirty_ring_entries = vm->ring_entries;
  config.region_count = 1;
  config.regions = &e->region;
  config.description = e->description;
  config.description_length = sizeof e->description;
  pmlmig_vm_ops ops;
  memset(&ops, 0, sizeof ops);
  ops.size = sizeof ops;
  ops.pause = op_pause;
  ops.resume = op_resume;
  ops.kick_all = op_kick_all;
  ops.set_dirty_logging = op_set_dirty_logging;
  ops.save_state = op_save_state;
  ops.load_state = op_load_state;
  ops.release = op_release;
  ops.kick_vcpu = op_kick_vcpu;
  const int rc = pmlmig_vm_create(&config, &ops, e, out);
  if (rc < 0) {
    free(e);
    return mv_fail(err, rc, "pmlmig_vm_create: %s", pmlmig_last_error());
  }
  mv_vm_set_ring_full_handler(vm, on_ring_full, *out);
  /* Only a source is throttled (dirty-limit, auto-converge); the handler goes
   * before pmlmig_vm_destroy, like the ring-full one. */
  if (!owned_by_pmlmig) mv_vm_set_throttle_handler(vm, on_throttle, *out);
  return 0;
}

/* ---- Shared reporting -------------------------------------------------------- */

static int check_library(void) {
  if (pmlmig_abi_version() != PMLMIG_ABI_VERSION) {
    fprintf(stderr, "minivmm: libpmlmig has ABI %u, this minivmm was built for ABI %u\n", pmlmig_abi_version(),
            PMLMIG_ABI_VERSION);
    return -1;
  }
  if ((pmlmig_features() & PMLMIG_FEATURE_MIGRATION) == 0) {
    fprintf(stderr, "minivmm: libpmlmig %s was built without its migration transport\n", pmlmig_version_string());
    return -1;
  }
  fprintf(stderr, "minivmm: libpmlmig %s (ABI %u, wire %u)\n", pmlmig_version_string(), pmlmig_abi_version(),
          pmlmig_wire_version());
  return 0;
}

/* Paused: every vCPU got further than `before`. */
static int check_advanced(const mv_vm *vm, const struct kvm_regs *before, const struct kvm_regs *after,
                          mv_error *err) {
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    const uint64_t p0 = mv_progress(vm->memory_bytes, vm->vcpu_count, i, &before[i]);
    const uint64_t p1 = mv_progress(vm->memory_bytes, vm->vcpu_count, i, &after[i]);
    if (p1 <= p0) {
      return mv_fail(err, -EBADMSG, "vcpu %u did not advance: %" PRIu64 " pages stored, %" PRIu64 " before", i, p1,
                     p0);
    }
  }
  return 0;
}

/* Lets a paused-or-running VM run for ms, pauses it and checks every page and
 * that every vCPU moved on from `before`. */
static int run_and_check(mv_vm *vm, const struct kvm_regs *before, uint64_t ms, struct kvm_regs *after,
                         mv_check_result *res, mv_error *err) {
  int rc = mv_vm_resume(vm, err);
  if (rc == 0) {
    mv_sleep_ms(ms);
    rc = mv_vm_pause(vm, err);
  }
  if (rc == 0) rc = mv_vm_vcpu_status(vm, err);
  if (rc == 0) rc = mv_check_vm(vm, after, res, err);
  if (rc == 0) rc = check_advanced(vm, before, after, err);
  return rc;
}

static const char *phase_name(pmlmig_phase phase) {
  switch (phase) {
    case PMLMIG_PHASE_SETUP: return "setup";
    case PMLMIG_PHASE_ROUND: return "round";
    case PMLMIG_PHASE_STOP_AND_COPY: return "stop-and-copy";
    case PMLMIG_PHASE_COMMIT: return "commit";
    case PMLMIG_PHASE_DONE: return "done";
    case PMLMIG_PHASE_POSTCOPY: return "postcopy";
  }
  return "?";
}

static void on_progress(void *user, const pmlmig_progress *p) {
  (void)user;
  fprintf(stderr,
          "migrate: %-13s round %u: %" PRIu64 " pages left, %.0f Mbit/s, expected downtime %.1f ms, %.1f MB sent, "
          "%.0f ms\n",
          phase_name(p->phase), p->round, p->remaining_pages, p->bandwidth_mbps, p->expected_downtime_ms,
          (double)p->wire_bytes / 1e6, p->elapsed_ms);
}

/* ---- --send ------------------------------------------------------------------ */

static void print_migration_stats(const pmlmig_migration_stats *s) {
  printf("migration: %s after %.1f ms (setup %.1f ms), %u rounds, downtime %.1f ms (expected %.1f ms), "
         "%" PRIu64 " pages (%" PRIu64 " zero), %.1f MB on the wire, %.0f Mbit/s, verified %s\n",
         pmlmig_outcome_name(s->outcome), s->total_time_ms, s->setup_time_ms, s->rounds, s->downtime_ms,
         s->expected_downtime_ms, s->pages, s->zero_pages, (double)s->wire_bytes / 1e6, s->throughput_mbps,
         s->verified ? "yes" : "no");
  if (s->postcopy_used) {
    printf("migration: post-copy: %" PRIu64 " pages owed at the switch, %u requests (latency p50 %.2f ms, p99 %.2f "
           "ms), %.1f ms until the target held every page, %u link recoveries\n",
           s->postcopy_owed_pages, s->postcopy_requests, s->postcopy_latency_p50_ms, s->postcopy_latency_p99_ms,
           s->postcopy_ms, s->postcopy_recoveries);
  }
  if (s->throttle_steps > 0) printf("migration: throttled in %u steps, at most %u%%\n", s->throttle_steps, s->throttle_max_pct);
}

/* After a failed or cancelled migration: the VM must still be running here. */
static int show_still_running(mv_vm *vm) {
  mv_error err;
  mv_check_result res;
  struct kvm_regs before[MV_MAX_VCPUS], after[MV_MAX_VCPUS];
  int rc = mv_vm_pause(vm, &err);
  if (rc == 0) rc = mv_vm_vcpu_status(vm, &err);
  if (rc == 0) rc = mv_check_vm(vm, before, &res, &err);
  if (rc == 0) rc = run_and_check(vm, before, 200, after, &res, &err);
  if (rc < 0) {
    printf("source: the VM was kept, but it is not well: %s\n", err.msg);
    return rc;
  }
  printf("source: the VM was kept and runs on here: all %" PRIu64 " of %" PRIu64
         " pages good, every vCPU advanced\n",
         res.pages_checked, vm->memory_bytes / MV_PAGE_SIZE);
  return 0;
}

/* Runs one migration of the running vm; returns the exit status. */
static int migrate(mv_vm *vm, pmlmig_source *source, const mv_send_args *args) {
  pmlmig_migrate_options options;
  pmlmig_migrate_options_init(&options);
  if (args->snapshot) {
    options.snapshot_to = args->target;
    options.snapshot_live = args->live;
  } else {
    options.target = args->target;
  }
  options.local = args->local;
  options.streams = args->streams;
  options.verify = args->verify;
  options.postcopy = args->postcopy == 'n'   ? PMLMIG_POSTCOPY_NOW
                     : args->postcopy == 'a' ? PMLMIG_POSTCOPY_AUTO
                                             : PMLMIG_POSTCOPY_OFF;
  if (args->auto_converge) options.converge = PMLMIG_CONVERGE_AUTO;
  if (args->downtime_limit_ms > 0) options.downtime_limit_ms = args->downtime_limit_ms;
  options.on_progress = on_progress;
  pmlmig_migration_stats stats;
  pmlmig_migration_stats_init(&stats);
  if (pmlmig_source_start(source, &options) < 0) {
    /* Nothing touched the VM: it runs on. */
    fprintf(stderr, "minivmm: migration to %s did not start: %s\n", args->target, pmlmig_source_last_error(source));
    show_still_running(vm);
    return 1;
  }
  pmlmig_source_wait(source, &stats);
  print_migration_stats(&stats);
  mv_error err;
  switch (stats.outcome) {
    case PMLMIG_OUTCOME_COMPLETED: {
      if (args->snapshot) { /* a copy was made: the VM must run on here */
        if (!stats.source_kept) {
          printf("source: the snapshot completed, but pmlmig does not say the VM runs on here\n");
          return 1;
        }
        printf("source: snapshot written to %s (%s)\n", args->target, args->live ? "live" : "paused while written");
        return show_still_running(vm) < 0 ? 1 : 0;
      }
      if (args->local) {  /* the memory is the target's now: not even read here again */
        printf("source: handed over; the VM runs on the target over the same memory; stopped here\n");
        return 0;
      }
      /* Paused by pmlmig for good: check what we sent, then stop it here. */
      mv_check_result res;
      struct kvm_regs regs[MV_MAX_VCPUS];
      if (mv_check_vm(vm, regs, &res, &err) < 0) {
        printf("source: completed, but the final state here fails the check: %s\n", err.msg);
        return 1;
      }
      printf("source: completed; final state: all %" PRIu64 " of %" PRIu64 " pages good, memory digest 0x%016" PRIx64
             "\n",
             res.pages_checked, vm->memory_bytes / MV_PAGE_SIZE, mv_memory_digest(vm->mem, vm->memory_bytes));
      mv_print_positions("source:", vm, regs);
      printf("source: the VM runs on the target; stopped here\n");
      return 0;
    }
    case PMLMIG_OUTCOME_IN_DOUBT:
      fprintf(stderr, "minivmm: migration to %s in doubt: %s\n", args->target, pmlmig_source_last_error(source));
      printf("source: in doubt: the VM stays paused here and is not resumed (the target may run it)\n");
      return 3;
    case PMLMIG_OUTCOME_POSTCOPY_FAILED:
      fprintf(stderr, "minivmm: migration to %s failed in post-copy: %s\n", args->target,
              pmlmig_source_last_error(source));
      printf("source: post-copy failed: the VM stays paused here as of the switch (its run on the target is lost)\n");
      return 5;
    case PMLMIG_OUTCOME_CANCELLED:
      fprintf(stderr, "minivmm: migration to %s cancelled: %s\n", args->target, pmlmig_source_last_error(source));
      show_still_running(vm);
      return 1;
    default:
      fprintf(stderr, "minivmm: migration to %s failed: %s\n", args->target, pmlmig_source_last_error(source));
      show_still_running(vm);
      return 1;
  }
}

int mv_send(const mv_send_args *args) {
  if (check_library() != 0) return 1;
  mv_error err;
  mv_vm *vm = NULL;
  int rc = mv_vm_create(&args->vm, &vm, &err);
  if (rc == 0) rc = mv_guest_prepare(vm, &err);
  if (rc == 0) rc = mv_vm_resume(vm, &err);
  if (rc < 0) {
    fprintf(stderr, "minivmm: %s\n", err.msg);
    mv_vm_free(vm);
    return 1;
  }
  printf("source: %u MiB, %u vCPUs, %s; running %u ms before %s %s\n", args->vm.memory_mib, args->vm.vcpus,
         vm->ring_entries ? "dirty ring" : "dirty bitmap", args->after_ms,
         args->snapshot ? "a snapshot to" : "migrating to", args->target);
  mv_sleep_ms(args->after_ms);

  pmlmig_vm *pm = NULL;
  pmlmig_source *source = NULL;
  int status = 1;
  rc = mv_vm_vcpu_status(vm, &err);
  if (rc == 0) rc = wrap_vm(vm, 0, &pm, &err);
  if (rc == 0 && (rc = pmlmig_source_create(pm, &source)) < 0) {
    mv_fail(&err, rc, "pmlmig_source_create: %s", pmlmig_last_error());
  }
  if (rc < 0) {
    fprintf(stderr, "minivmm: %s\n", err.msg);
  } else {
    status = migrate(vm, source, args);
  }
  /* Stop the vCPUs first: nothing may call into pmlmig_vm once it is gone. */
  mv_vm_pause(vm, &err);
  mv_vm_set_ring_full_handler(vm, NULL, NULL);
  mv_vm_set_throttle_handler(vm, NULL, NULL);
  if (source != NULL) pmlmig_source_destroy(source);
  if (pm != NULL) pmlmig_vm_destroy(pm); /* release frees only the view */
  mv_vm_free(vm);
  return status;
}

/* ---- --receive --------------------------------------------------------------- */

typedef struct receive_ctx {
  /* Written by the factory and check on pmlmig's control thread; read by the
   * main thread after pmlmig_receiver_wait returned. */
  int checked;
  struct kvm_regs restored[MV_MAX_VCPUS];
} receive_ctx;

/* Builds the VM a migration (memfd < 0) or a handover (the source's memfd)
 * announces. */
static int build(receive_ctx *ctx, const void *description, size_t description_length, uint32_t vcpus,
                 const pmlmig_region_layout *layout, uint32_t region_count, int memfd, pmlmig_vm **out) {
  mv_error err;
  mv_vm_options options;
  mv_vm *vm = NULL;
  ctx->checked = 0;
  int rc = parse_description(description, description_length, vcpus, layout, region_count, &options, &err);
  options.adopt_memfd_valid = memfd >= 0;
  options.adopt_memfd = memfd;
  if (rc == 0) rc = mv_vm_create(&options, &vm, &err);
  if (rc == 0 && (rc = wrap_vm(vm, 1, out, &err)) < 0) mv_vm_free(vm);
  if (rc < 0) {
    fprintf(stderr, "minivmm: refusing the migration: %s\n", err.msg);
    pmlmig_set_error(err.msg);
    return rc;
  }
  printf("receive: building a VM of %u MiB, %u vCPUs, %s%s\n", options.memory_mib, options.vcpus,
         vm->ring_entries ? "dirty ring" : "no dirty ring", memfd >= 0 ? ", over the memory handed over" : "");
  return 0;
}

static int factory(void *user, const void *description, size_t description_length, uint32_t vcpus,
                   const pmlmig_region_layout *layout, uint32_t region_count, pmlmig_vm **out) {
  return build(user, description, description_length, vcpus, layout, region_count, -1, out);
}

/* A same-host handover: the one region's memfd is the source's guest RAM. */
static int shared_factory(void *user, const void *description, size_t description_length, uint32_t vcpus,
                          const pmlmig_region *regions, uint32_t region_count, pmlmig_vm **out) {
  if (region_count != 1 || regions[0].memfd < 0 || regions[0].memfd_offset != 0) {
    pmlmig_set_error("minivmm takes one memory region at offset 0 of its memfd");
    return -EINVAL;
  }
  const pmlmig_region_layout layout = {regions[0].slot, 0, regions[0].gpa, regions[0].size};
  return build(user, description, description_length, vcpus, &layout, 1, regions[0].memfd, out);
}

static int check(void *user, pmlmig_vm *pm) {
  receive_ctx *ctx = user;
  mv_vm *vm = vm_of(pmlmig_vm_opaque(pm));
  mv_error err;
  mv_check_result res;
  if (mv_check_vm(vm, ctx->restored, &res, &err) < 0) {
    fprintf(stderr, "minivmm: refusing the restored VM: %s\n", err.msg);
    pmlmig_set_error(err.msg);
    return -EBADMSG;
  }
  printf("receive: check before resume: all %" PRIu64 " of %" PRIu64 " pages good, memory digest 0x%016" PRIx64 "\n",
         res.pages_checked, vm->memory_bytes / MV_PAGE_SIZE, mv_memory_digest(vm->mem, vm->memory_bytes));
  mv_print_positions("receive:", vm, ctx->restored);
  ctx->checked = 1;
  return 0;
}

static void print_receive_stats(const pmlmig_receive_stats *s) {
  printf("receive: %s: %u rounds, %" PRIu64 " pages (%" PRIu64 " zero), %.1f MB, restore %.1f ms, resume %.1f ms, "
         "downtime %.1f ms, verified %s, %.1f MB placed with userfaultfd\n",
         pmlmig_outcome_name(s->outcome), s->rounds, s->normal_pages + s->zero_pages, s->zero_pages,
         (double)s->wire_bytes / 1e6, s->target_restore_ms, s->target_resume_ms, s->downtime_ms,
         s->verified ? "yes" : "no", (double)s->uffd_filled_bytes / 1e6);
}

/* The VM pmlmig resumed here, its vCPUs loaded at `restored`: let it run for
 * run_after_s, pause it, check every page again and that every vCPU moved on. */
static int run_and_recheck(mv_vm *vm, const struct kvm_regs *restored, double run_after_s, const char *point) {
  mv_error err;
  mv_check_result res;
  struct kvm_regs after[MV_MAX_VCPUS];
  mv_sleep_ms((uint64_t)(run_after_s * 1e3));
  int rc = mv_vm_pause(vm, &err);
  if (rc == 0) rc = mv_vm_vcpu_status(vm, &err);
  if (rc == 0) rc = mv_check_vm(vm, after, &res, &err);
  if (rc == 0) rc = check_advanced(vm, restored, after, &err);
  if (rc < 0) {
    fprintf(stderr, "minivmm: after running %.1f s here: %s\n", run_after_s, err.msg);
    return 1;
  }
  printf("receive: after running %.1f s here: all %" PRIu64 " of %" PRIu64
         " pages good, every vCPU advanced past the %s\n",
         run_after_s, res.pages_checked, vm->memory_bytes / MV_PAGE_SIZE, point);
  mv_print_positions("receive:", vm, after);
  return 0;
}

/* The VM a migration brought here. After post-copy pmlmig resumed it without
 * the check (its memory was not all here yet); every page has arrived by
 * now, and the vCPUs must have moved on from where load_state put them. */
static int run_received(const embedded_vm *e, const receive_ctx *ctx, const pmlmig_receive_stats *stats,
                        const mv_receive_args *args) {
  if (!ctx->checked && !stats->postcopy) {
    fprintf(stderr, "minivmm: pmlmig resumed the VM without calling the check\n");
    return 1;
  }
  if (ctx->checked && stats->postcopy) {
    fprintf(stderr, "minivmm: pmlmig called the check before a post-copy resume (memory not all here)\n");
    return 1;
  }
  if (stats->postcopy) {
    printf("receive: post-copy: resumed before all memory was here (%u link recoveries)\n",
           stats->postcopy_recoveries);
  }
  return run_and_recheck(e->vm, stats->postcopy ? e->loaded : ctx->restored, args->run_after_s, "migration point");
}

int mv_receive(const mv_receive_args *args) {
  if (check_library() != 0) return 1;
  receive_ctx *ctx = calloc(1, sizeof *ctx);
  if (ctx == NULL) {
    fprintf(stderr, "minivmm: out of memory\n");
    return 1;
  }
  pmlmig_receive_options options;
  pmlmig_receive_options_init(&options);
  options.listen = args->listen;
  options.factory = factory;
  options.shared_factory = shared_factory; /* listen unix:PATH: same-host handovers */
  options.check = check;
  options.user = ctx;
  pmlmig_receiver *receiver = NULL;
  int rc = pmlmig_receiver_start(&options, &receiver);
  if (rc < 0) {
    fprintf(stderr, "minivmm: listening on %s: %s\n", args->listen, pmlmig_last_error());
    free(ctx);
    return 1;
  }
  if (strncmp(args->listen, "unix:", 5) == 0) {
    printf("receive: listening on %s (same-host handovers)\n", args->listen);
  } else {
    const char *colon = strrchr(args->listen, ':');
    printf("receive: listening on %.*s:%d\n", (int)(colon - args->listen), args->listen,
           pmlmig_receiver_port(receiver));
  }

  pmlmig_vm *pm = NULL;
  pmlmig_receive_stats stats;
  pmlmig_receive_stats_init(&stats);
  rc = pmlmig_receiver_wait(receiver, -1, &pm, &stats);
  int status = 1;
  if (rc < 0) {
    print_receive_stats(&stats);
    fprintf(stderr, "minivmm: the migration failed here: %s\n", pmlmig_receiver_last_error(receiver));
  } else {
    print_receive_stats(&stats);
    status = run_received(pmlmig_vm_opaque(pm), ctx, &stats, args);
    pmlmig_vm_destroy(pm); /* release: mv_vm_free */
  }
  pmlmig_receiver_destroy(receiver);
  free(ctx);
  return status;
}

/* ---- --restore --------------------------------------------------------------- */

int mv_restore(const mv_receive_args *args) {
  if (check_library() != 0) return 1;
  if ((pmlmig_features() & PMLMIG_FEATURE_SNAPSHOT) == 0) {
    fprintf(stderr, "minivmm: libpmlmig %s cannot restore snapshots\n", pmlmig_version_string());
    return 1;
  }
  receive_ctx ctx;
  memset(&ctx, 0, sizeof ctx);
  pmlmig_restore_options options;
  pmlmig_restore_options_init(&options);
  options.path = args->listen;
  options.factory = factory; /* the same as a migration's target */
  options.user = &ctx;
  options.lazy = args->lazy;
  const double start = mv_now_ms();
  pmlmig_restore *restore = NULL;
  if (pmlmig_restore_start(&options, &restore) < 0) {
    fprintf(stderr, "minivmm: restoring %s: %s\n", args->listen, pmlmig_last_error());
    return 1;
  }
  const double running = mv_now_ms() - start;
  pmlmig_vm *pm = NULL;
  pmlmig_restore_stats stats;
  pmlmig_restore_stats_init(&stats);
  const int rc = pmlmig_restore_wait(restore, -1, &pm, &stats);
  int status = 1;
  if (rc < 0) {
    fprintf(stderr, "minivmm: restoring %s: %s\n", args->listen, pmlmig_restore_last_error(restore));
  } else {
    printf("restore: %s, %s: running after %.1f ms (pmlmig: %.1f ms), all memory in after %.1f ms, %" PRIu64
           " MB read, %" PRIu64 " faults (p99 %.2f ms), digests %s\n",
           args->listen, stats.lazy ? "lazy" : "eager", running, stats.running_ms, stats.complete_ms,
           stats.bytes_read / 1000000, stats.faults, stats.latency_p99_ms, stats.verified ? "match" : "NOT checked");
    const embedded_vm *e = pmlmig_vm_opaque(pm);
    status = stats.verified ? run_and_recheck(e->vm, e->loaded, args->run_after_s, "snapshot point") : 1;
  }
  if (pm != NULL) pmlmig_vm_destroy(pm); /* release: mv_vm_free */
  pmlmig_restore_destroy(restore);
  return status;
}
