/*
 * main.c: minivmm's command line and its local mode.
 *
 *   minivmm --run SECONDS     run the guest here, pause it at random moments,
 *                             check every page each time (no migration)
 *   minivmm --send HOST:PORT  run the guest, then migrate it live (migrate.c)
 *   minivmm --receive HOST:PORT   receive one VM, check it, run it (migrate.c)
 *   minivmm --snapshot FILE   run the guest, write a snapshot of it (migrate.c)
 *   minivmm --restore FILE    bring a snapshot back, run it, check it (migrate.c)
 *
 * Exit status: 0 success, 1 failure (a bad page, a KVM error, a failed
 * migration), 2 a bad command line, 3 a migration in doubt.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "minivmm.h"

static const char kUsage[] =
    "usage: minivmm --run SECONDS [--memory MIB] [--vcpus N] [--no-ring] [--pauses N] [--reload] [--seed N]\n"
    "       minivmm --send HOST:PORT [--after MS] [--memory MIB] [--vcpus N] [--no-ring] [--streams N] [--verify]\n"
    "               [--postcopy now|auto] [--auto-converge] [--downtime-limit MS]\n"
    "       minivmm --send unix:PATH --local [--after MS] [--memory MIB] [--vcpus N] [--verify]\n"
    "       minivmm --receive HOST:PORT|unix:PATH [--run-after SECONDS]\n"
    "       minivmm --snapshot FILE [--live] [--after MS] [--memory MIB] [--vcpus N] [--no-ring]\n"
    "       minivmm --restore FILE [--lazy] [--run-after SECONDS]\n"
    "\n"
    "A tiny KVM VMM whose guest stamps a counter into every page of its memory,\n"
    "embedding pmlmig through its C ABI to migrate that guest live.\n"
    "\n"
    "  --run SECONDS        run locally; kick and pause at random moments and check every page each time\n"
    "  --pauses N           --run: random pause/check/resume cycles (default 10)\n"
    "  --reload             --run: at the end, save the state, load it into a fresh VM with a\n"
    "                       copy of the memory, check it, run it and check again\n"
    "  --seed N             --run: seed of the pause times (default: the clock)\n"
    "  --send HOST:PORT     run the guest, then migrate it live to a minivmm --receive there\n"
    "  --after MS           --send: let the guest write this long first (default 500)\n"
    "  --streams N          --send: parallel data connections, 1..64 (default 1)\n"
    "  --verify             --send: the target compares a digest of all memory\n"
    "  --postcopy now|auto  --send: post-copy: the VM resumes on the target at once (now) or once\n"
    "                       pre-copy stalls (auto), and its missing pages follow while it runs\n"
    "  --auto-converge      --send: if the guest dirties too fast, throttle its vCPUs (pmlmig holds them\n"
    "                       out of KVM_RUN through pmlmig_vm_throttle_ns)\n"
    "  --downtime-limit MS  --send: the longest pause the switch may take (default pmlmig's, 300)\n"
    "  --local              --send unix:PATH: same-host handover: the receiver maps this VM's memory\n"
    "                       itself (no page copied); only the vCPU state moves\n"
    "  --receive HOST:PORT  accept one migration (port 0 picks one; the port is printed);\n"
    "                       unix:PATH: accept one same-host handover\n"
    "  --snapshot FILE      run the guest, write a snapshot of it to FILE, check that it runs on here\n"
    "  --live               --snapshot: pre-copy rounds into the file while the guest runs (else paused)\n"
    "  --restore FILE       bring a snapshot back here, run it and check it\n"
    "  --lazy               --restore: run at once; pages are read from FILE as the guest touches them\n"
    "  --run-after SECONDS  --receive, --restore: run the VM this long, then check it (default 2)\n"
    "  --memory MIB         guest RAM in MiB, 1..3072 (default 64)\n"
    "  --vcpus N            vCPUs, 1..64, one thread each (default 2)\n"
    "  --no-ring            no dirty ring: pmlmig tracks with the dirty bitmap\n"
    "  --help               this text\n"
    "\n"
    "Exit status: 0 success, 1 failure, 2 bad usage, 3 migration in doubt.\n";

void mv_sleep_ms(uint64_t ms) {
  struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

double mv_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(stderr, "minivmm: %s (see minivmm --help)\n", line);
  return 2;
}

/* An unsigned decimal in [min, max]; 0 or a usage error. */
static int parse_u32(const char *flag, const char *text, uint32_t min, uint32_t max, uint32_t *out) {
  char *end;
  errno = 0;
  const unsigned long long v = strtoull(text, &end, 10);
  if (text[0] == '\0' || text[0] == '-' || *end != '\0' || errno != 0 || v < min || v > max) {
    char range[64];
    snprintf(range, sizeof range, "%u..%u", min, max);
    fprintf(stderr, "minivmm: %s: '%s' is not a whole number in %s\n", flag, text, range);
    return 2;
  }
  *out = (uint32_t)v;
  return 0;
}

static int parse_seconds(const char *flag, const char *text, double max, double *out) {
  char *end;
  errno = 0;
  const double v = strtod(text, &end);
  if (text[0] == '\0' || *end != '\0' || errno != 0 || !(v >= 0) || v > max) {
    fprintf(stderr, "minivmm: %s: '%s' is not a number of seconds in 0..%g\n", flag, text, max);
    return 2;
  }
  *out = v;
  return 0;
}

/* HOST:PORT with a port in 0..65535 (0 only where allow_zero). */
static int check_address(const char *flag, const char *text, int allow_zero) {
  if (strncmp(text, "unix:", 5) == 0) {
    if (text[5] == '\0') return usage_error("%s: unix: needs a PATH", flag);
    return 0;
  }
  const char *colon = strrchr(text, ':');
  uint32_t port;
  if (colon == NULL || colon == text) return usage_error("%s: '%s' is not HOST:PORT", flag, text);
  if (parse_u32(flag, colon + 1, allow_zero ? 0 : 1, 65535, &port) != 0) return 2;
  return 0;
}

/* ---- --run ----------------------------------------------------------------- */

typedef struct run_args {
  double seconds;
  mv_vm_options vm;
  uint32_t pauses;
  int reload;
  uint64_t seed;
} run_args;

static uint64_t next_random(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

/* Paused: check every page and that no vCPU went backwards from *last (then
 * updates it). Records the boundaries seen. */
static int check_paused(mv_vm *vm, uint64_t *last, uint32_t *seen, struct kvm_regs *regs, mv_check_result *res,
                        mv_error *err) {
  int rc = mv_check_vm(vm, regs, res, err);
  if (rc < 0) return rc;
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    const uint64_t p = mv_progress(vm->memory_bytes, vm->vcpu_count, i, &regs[i]);
    if (p < last[i]) {
      return mv_fail(err, -EBADMSG, "vcpu %u went backwards: %" PRIu64 " pages stored, %" PRIu64 " before", i, p,
                     last[i]);
    }
    last[i] = p;
    const int b = mv_guest_boundary(regs[i].rip);
    if (b >= 0 && seen != NULL) seen[b]++;
  }
  return 0;
}

/* Paused `vm`: save its state, load it with a copy of its memory into a fresh
 * VM, check that, run it for a while and check it again. */
static int reload_check(mv_vm *vm, const run_args *args, mv_error *err) {
  const size_t size = mv_state_size(vm->vcpu_count);
  uint8_t *state = malloc(size);
  if (state == NULL) return mv_fail_errno(err, ENOMEM, "allocating %zu bytes of vCPU state", size);
  size_t length = 0;
  mv_vm *fresh = NULL;
  struct kvm_regs before[MV_MAX_VCPUS], after[MV_MAX_VCPUS];
  uint64_t last[MV_MAX_VCPUS];
  mv_check_result res;
  int rc = mv_state_save(vm, state, size, &length, err);
  if (rc == 0) rc = mv_vm_create(&args->vm, &fresh, err);
  if (rc == 0) {
    memcpy(fresh->mem, vm->mem, vm->memory_bytes);
    rc = mv_state_load(fresh, state, length, err);
  }
  if (rc == 0) rc = mv_vm_get_regs(vm, before, err);
  if (rc == 0) {
    memset(last, 0, sizeof last);
    rc = check_paused(fresh, last, NULL, after, &res, err);
  }
  if (rc == 0 && memcmp(before, after, vm->vcpu_count * sizeof before[0]) != 0) {
    rc = mv_fail(err, -EBADMSG, "reload: the fresh VM's registers differ from the saved ones");
  }
  if (rc == 0) {
    printf("reload: state of %zu bytes loaded into a fresh VM: all %" PRIu64 " of %" PRIu64 " pages good\n", length,
           res.pages_checked, fresh->memory_bytes / MV_PAGE_SIZE);
    rc = mv_vm_resume(fresh, err);
  }
  if (rc == 0) {
    mv_sleep_ms(500);
    rc = mv_vm_pause(fresh, err);
  }
  if (rc == 0) rc = mv_vm_vcpu_status(fresh, err);
  if (rc == 0) rc = check_paused(fresh, last, NULL, after, &res, err);
  if (rc == 0) {
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
      const uint64_t p0 = mv_progress(vm->memory_bytes, vm->vcpu_count, i, &before[i]);
      const uint64_t p1 = mv_progress(vm->memory_bytes, vm->vcpu_count, i, &after[i]);
      if (p1 <= p0) rc = mv_fail(err, -EBADMSG, "reload: vcpu %u did not advance (%" PRIu64 " pages stored)", i, p1);
    }
  }
  if (rc == 0) {
    printf("reload: ran 0.5 s more: all %" PRIu64 " of %" PRIu64 " pages good, every vCPU advanced\n",
           res.pages_checked, fresh->memory_bytes / MV_PAGE_SIZE);
    mv_print_positions("", fresh, after);
  }
  mv_vm_free(fresh);
  free(state);
  return rc;
}

static int run_local(const run_args *args) {
  mv_error err;
  mv_vm *vm = NULL;
  int rc = mv_vm_create(&args->vm, &vm, &err);
  if (rc == 0) rc = mv_guest_prepare(vm, &err);
  if (rc < 0) {
    fprintf(stderr, "minivmm: %s\n", err.msg);
    mv_vm_free(vm);
    return 1;
  }
  printf("minivmm: %u MiB, %u vCPUs, %s\n", args->vm.memory_mib, args->vm.vcpus,
         vm->ring_entries ? "dirty ring" : "no dirty ring");

  uint64_t rnd = args->seed | 1;
  uint64_t last[MV_MAX_VCPUS] = {0};
  uint32_t seen[MV_GUEST_BOUNDARIES] = {0};
  struct kvm_regs regs[MV_MAX_VCPUS];
  mv_check_result res;
  memset(&res, 0, sizeof res);
  const double start = mv_now_ms();
  const double total_ms = args->seconds * 1e3;
  uint32_t checks = 0;
  rc = mv_vm_resume(vm, &err);
  /* Pause i lands at a random moment of the i-th of `pauses` equal slices. */
  for (uint32_t i = 0; rc == 0 && i <= args->pauses; ++i) {
    const double slice = total_ms / (args->pauses + 1);
    double at = slice * i + (i == args->pauses ? slice : (double)(next_random(&rnd) % 1000000) / 1e6 * slice);
    const double now = mv_now_ms() - start;
    if (at > now) mv_sleep_ms((uint64_t)(at - now));
    rc = mv_vm_kick_all(vm, &err); /* what pmlmig's harvester does; must return while the guest runs */
    if (rc == 0) rc = mv_vm_pause(vm, &err);
    if (rc == 0) rc = mv_vm_vcpu_status(vm, &err);
    if (rc == 0) rc = check_paused(vm, last, seen, regs, &res, &err);
    if (rc == 0) checks++;
    if (rc == 0 && i < args->pauses) rc = mv_vm_resume(vm, &err);
  }
  if (rc < 0) {
    fprintf(stderr, "minivmm: after %u good checks: %s\n", checks, err.msg);
    mv_vm_free(vm);
    return 1;
  }
  int distinct = 0;
  for (int b = 0; b < MV_GUEST_BOUNDARIES; ++b) distinct += seen[b] != 0;
  printf("run: %.1f s, %u checks: all %" PRIu64 " of %" PRIu64 " pages good each time; pause points seen %d of %d\n",
         (mv_now_ms() - start) / 1e3, checks, res.pages_checked, vm->memory_bytes / MV_PAGE_SIZE, distinct,
         MV_GUEST_BOUNDARIES);
  printf("  vCPU stops per instruction boundary:");
  for (int b = 0; b < MV_GUEST_BOUNDARIES; ++b) printf(" L%d %u", b, seen[b]);
  printf("\n");
  mv_print_positions("", vm, regs);
  if (args->reload && (rc = reload_check(vm, args, &err)) < 0) fprintf(stderr, "minivmm: %s\n", err.msg);
  mv_vm_free(vm);
  return rc < 0 ? 1 : 0;
}

/* ---- Command line ---------------------------------------------------------- */

enum {
  OPT_RUN = 256,
  OPT_SEND,
  OPT_RECEIVE,
  OPT_AFTER,
  OPT_MEMORY,
  OPT_VCPUS,
  OPT_NO_RING,
  OPT_STREAMS,
  OPT_VERIFY,
  OPT_RUN_AFTER,
  OPT_PAUSES,
  OPT_RELOAD,
  OPT_SEED,
  OPT_POSTCOPY,
  OPT_AUTO_CONVERGE,
  OPT_DOWNTIME_LIMIT,
  OPT_LOCAL,
  OPT_SNAPSHOT,
  OPT_LIVE,
  OPT_RESTORE,
  OPT_LAZY,
  OPT_HELP
};

int main(int argc, char **argv) {
  static const struct option options[] = {
      {"run", required_argument, NULL, OPT_RUN},       {"send", required_argument, NULL, OPT_SEND},
      {"receive", required_argument, NULL, OPT_RECEIVE}, {"after", required_argument, NULL, OPT_AFTER},
      {"memory", required_argument, NULL, OPT_MEMORY}, {"vcpus", required_argument, NULL, OPT_VCPUS},
      {"no-ring", no_argument, NULL, OPT_NO_RING},     {"streams", required_argument, NULL, OPT_STREAMS},
      {"verify", no_argument, NULL, OPT_VERIFY},       {"run-after", required_argument, NULL, OPT_RUN_AFTER},
      {"pauses", required_argument, NULL, OPT_PAUSES}, {"reload", no_argument, NULL, OPT_RELOAD},
      {"seed", required_argument, NULL, OPT_SEED},     {"postcopy", required_argument, NULL, OPT_POSTCOPY},
      {"auto-converge", no_argument, NULL, OPT_AUTO_CONVERGE},
      {"downtime-limit", required_argument, NULL, OPT_DOWNTIME_LIMIT},
      {"local", no_argument, NULL, OPT_LOCAL},
      {"snapshot", required_argument, NULL, OPT_SNAPSHOT}, {"live", no_argument, NULL, OPT_LIVE},
      {"restore", required_argument, NULL, OPT_RESTORE}, {"lazy", no_argument, NULL, OPT_LAZY},
      {"help", no_argument, NULL, OPT_HELP},
      {NULL, 0, NULL, 0}};
  /* Which mode each option belongs to: r(un), s(end), v (receive), p (snapshot), l (restore). */
  static const char *const modes_of[] = {
      [OPT_AFTER - OPT_RUN] = "sp",  [OPT_MEMORY - OPT_RUN] = "rsp", [OPT_VCPUS - OPT_RUN] = "rsp",
      [OPT_NO_RING - OPT_RUN] = "rsp", [OPT_STREAMS - OPT_RUN] = "s", [OPT_VERIFY - OPT_RUN] = "s",
      [OPT_RUN_AFTER - OPT_RUN] = "vl", [OPT_PAUSES - OPT_RUN] = "r", [OPT_RELOAD - OPT_RUN] = "r",
      [OPT_SEED - OPT_RUN] = "r", [OPT_POSTCOPY - OPT_RUN] = "s", [OPT_AUTO_CONVERGE - OPT_RUN] = "s",
      [OPT_DOWNTIME_LIMIT - OPT_RUN] = "s", [OPT_LOCAL - OPT_RUN] = "s", [OPT_LIVE - OPT_RUN] = "p",
      [OPT_LAZY - OPT_RUN] = "l", [OPT_SNAPSHOT - OPT_RUN] = "p", [OPT_RESTORE - OPT_RUN] = "l"};

  char mode = 0;
  const char *address = NULL;
  run_args run = {1.0, {64, 2, 1, 0, 0}, 10, 0, 0};
  mv_send_args send = {NULL, 500, {64, 2, 1, 0, 0}, 1, 0, 0, 0, 0, 0, 0, 0};
  mv_receive_args receive = {NULL, 2.0, 0};
  int used[OPT_HELP - OPT_RUN + 1] = {0};
  int have_seed = 0;
  uint32_t u;

  opterr = 0;
  int c;
  while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
    if (c == '?') {
      if (optopt >= OPT_RUN) return usage_error("option %s needs a value", argv[optind - 1]);
      return usage_error("unknown option '%s'", argv[optind - 1]);
    }
    if (c == OPT_HELP) {
      fputs(kUsage, stdout);
      return 0;
    }
    used[c - OPT_RUN] = 1;
    switch (c) {
      case OPT_RUN:
      case OPT_SEND:
      case OPT_RECEIVE:
      case OPT_SNAPSHOT:
      case OPT_RESTORE: {
        const char m = c == OPT_RUN ? 'r' : c == OPT_SEND ? 's' : c == OPT_RECEIVE ? 'v' : c == OPT_SNAPSHOT ? 'p' : 'l';
        if (mode != 0) return usage_error("choose one of --run, --send, --receive, --snapshot and --restore");
        mode = m;
        if (c == OPT_RUN) {
          if (parse_seconds("--run", optarg, 86400, &run.seconds) != 0) return 2;
        } else if (c == OPT_SNAPSHOT || c == OPT_RESTORE) {
          if (optarg[0] == '\0') return usage_error("--%s needs a FILE", c == OPT_SNAPSHOT ? "snapshot" : "restore");
          address = optarg;
        } else {
          address = optarg;
          if (check_address(c == OPT_SEND ? "--send" : "--receive", optarg, c == OPT_RECEIVE) != 0) return 2;
        }
        break;
      }
      case OPT_AFTER:
        if (parse_u32("--after", optarg, 0, 3600000, &send.after_ms) != 0) return 2;
        break;
      case OPT_MEMORY:
        if (parse_u32("--memory", optarg, MV_MIN_MEMORY_MIB, MV_MAX_MEMORY_MIB, &u) != 0) return 2;
        run.vm.memory_mib = send.vm.memory_mib = u;
        break;
      case OPT_VCPUS:
        if (parse_u32("--vcpus", optarg, 1, MV_MAX_VCPUS, &u) != 0) return 2;
        run.vm.vcpus = send.vm.vcpus = u;
        break;
      case OPT_NO_RING: run.vm.use_ring = send.vm.use_ring = 0; break;
      case OPT_STREAMS:
        if (parse_u32("--streams", optarg, 1, 64, &send.streams) != 0) return 2;
        break;
      case OPT_VERIFY: send.verify = 1; break;
      case OPT_POSTCOPY:
        if (strcmp(optarg, "now") == 0) {
          send.postcopy = 'n';
        } else if (strcmp(optarg, "auto") == 0) {
          send.postcopy = 'a';
        } else {
          return usage_error("--postcopy: '%s' is neither now nor auto", optarg);
        }
        break;
      case OPT_AUTO_CONVERGE: send.auto_converge = 1; break;
      case OPT_LOCAL: send.local = 1; break;
      case OPT_LIVE: send.live = 1; break;
      case OPT_LAZY: receive.lazy = 1; break;
      case OPT_DOWNTIME_LIMIT:
        if (parse_u32("--downtime-limit", optarg, 1, 3600000, &send.downtime_limit_ms) != 0) return 2;
        break;
      case OPT_RUN_AFTER:
        if (parse_seconds("--run-after", optarg, 86400, &receive.run_after_s) != 0) return 2;
        break;
      case OPT_PAUSES:
        if (parse_u32("--pauses", optarg, 0, 1000000, &run.pauses) != 0) return 2;
        break;
      case OPT_RELOAD: run.reload = 1; break;
      case OPT_SEED:
        if (parse_u32("--seed", optarg, 0, UINT32_MAX, &u) != 0) return 2;
        run.seed = u;
        have_seed = 1;
        break;
      default: return usage_error("unknown option '%s'", argv[optind - 1]);
    }
  }
  if (optind < argc) return usage_error("unexpected argument '%s'", argv[optind]);
  if (mode == 0) return usage_error("choose one of --run, --send, --receive, --snapshot and --restore");
  for (int o = OPT_AFTER; o < OPT_HELP; ++o) {
    if (used[o - OPT_RUN] && strchr(modes_of[o - OPT_RUN], mode) == NULL) {
      const char *name = mode == 'r'   ? "--run"
                         : mode == 's' ? "--send"
                         : mode == 'v' ? "--receive"
                         : mode == 'p' ? "--snapshot"
                                       : "--restore";
      return usage_error("--%s does not apply to %s", options[o - OPT_RUN].name, name);
    }
  }

  setvbuf(stdout, NULL, _IOLBF, 0);
  switch (mode) {
    case 'r':
      if (!have_seed) run.seed = (uint64_t)(mv_now_ms() * 1000.0) ^ 0x5bd1e995u;
      return run_local(&run);
    case 's':
      if (send.local != (strncmp(address, "unix:", 5) == 0)) {
        return usage_error(send.local ? "--local needs --send unix:PATH" : "--send unix:PATH needs --local");
      }
      send.target = address;
      return mv_send(&send);
    case 'p':
      send.snapshot = 1;
      send.target = address;
      return mv_send(&send);
    case 'l':
      receive.listen = address; /* the file */
      return mv_restore(&receive);
    default:
      receive.listen = address;
      return mv_receive(&receive);
  }
}
