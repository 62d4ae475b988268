/*
 * vm.c: minivmm's KVM VM. One memfd of guest RAM in memslot 0 at gpa 0, the
 * dirty ring (if asked for and offered) enabled before any vCPU exists, and
 * one thread per vCPU running KVM_RUN.
 *
 * vCPU control, and why it has no race:
 *   - vm->lock guards the wanted state (run / pause / quit), every vCPU's
 *     in_run / parked / dead / exits, and every write of run->immediate_exit.
 *   - A vCPU thread clears immediate_exit and sets in_run under the lock, then
 *     unlocks and enters KVM_RUN. A controller that wants it out sets
 *     immediate_exit = 1 under the lock and sends SIGUSR1 (a no-op handler
 *     installed without SA_RESTART). Either the controller came first, and the
 *     thread sees the new wanted state before entering; or it came after, and
 *     then KVM_RUN either has not started (it sees immediate_exit and returns
 *     EINTR at once) or is running the guest (the signal makes it return EINTR).
 *   - KVM_RUN's return bumps `exits` under the lock; kick_all waits on it.
 *   - This guest makes no exits of its own: a vCPU leaves KVM_RUN only when
 *     kicked, on a dirty-ring-full exit, or on an error.
 * Nothing here calls pmlmig: the ring-full exit goes to a handler that
 * migrate.c installs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "minivmm.h"

#define MV_KICK_SIGNAL SIGUSR1
#define MV_TSS_ADDR 0xfffbd000ul /* three pages KVM_SET_TSS_ADDR reserves, above guest RAM */

int mv_fail_errno(mv_error *err, int errnum, const char *fmt, ...) {
  char what[384];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  snprintf(err->msg, sizeof err->msg, "%s: %s", what, strerror(errnum));
  return -errnum;
}

int mv_fail(mv_error *err, int code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  va_end(ap);
  return code;
}

static void kick_handler(int sig) { (void)sig; }

static int kick_handler_error;
static void install_kick_handler(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = kick_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
  if (sigaction(MV_KICK_SIGNAL, &sa, NULL) != 0) kick_handler_error = errno;
}

/* ---- vCPU threads ---------------------------------------------------------- */

/* Lock held. Makes a vCPU that is in (or about to enter) KVM_RUN leave it. */
static void kick_locked(mv_vcpu *v) {
  if (!v->in_run) return;
  v->run->immediate_exit = 1;
  pthread_kill(v->thread, MV_KICK_SIGNAL);
}

/* Lock held. Records the first vCPU failure and stops this vCPU. */
static void vcpu_die_locked(mv_vcpu *v, const mv_error *e) {
  mv_vm *vm = v->vm;
  if (!vm->vcpu_failed) {
    vm->vcpu_failed = 1;
    vm->vcpu_error = *e;
  }
  v->dead = 1;
  pthread_cond_broadcast(&vm->cond);
}

static const char *exit_name(uint32_t reason) {
  switch (reason) {
    case KVM_EXIT_IO: return "IO";
    case KVM_EXIT_HLT: return "HLT";
    case KVM_EXIT_MMIO: return "MMIO";
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN (triple fault)";
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "SYSTEM_EVENT";
    default: return "unexpected";
  }
}

static void *vcpu_thread(void *arg) {
  mv_vcpu *v = arg;
  mv_vm *vm = v->vm;
  mv_error e;

  pthread_mutex_lock(&vm->lock);
  for (;;) {
    if (vm->want == MV_WANT_PAUSE) {
      v->parked = 1;
      pthread_cond_broadcast(&vm->cond);
      while (vm->want == MV_WANT_PAUSE) pthread_cond_wait(&vm->cond, &vm->lock);
      v->parked = 0;
      pthread_cond_broadcast(&vm->cond);
    }
    if (vm->want == MV_WANT_QUIT) break;
    if (vm->throttle != NULL) {
      /* A migration's throttle holds this vCPU out of guest mode a while: at
       * most 10 ms at a time, and a pause or quit (which broadcast cond)
       * ends the wait. */
      const mv_throttle_fn fn = vm->throttle;
      void *ctx = vm->throttle_ctx;
      pthread_mutex_unlock(&vm->lock);
      uint64_t hold = fn(ctx, v->id);
      pthread_mutex_lock(&vm->lock);
      /* A pause or quit asked while the lock was free found this vCPU out of
       * KVM_RUN, so its kick did nothing: look again before entering, or the
       * vCPU would run on until its next exit while the pauser waits. */
      if (vm->want != MV_WANT_RUN) continue;
      if (hold > 0) {
        if (hold > 10000000ull) hold = 10000000ull;
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += (long)hold;
        if (until.tv_nsec >= 1000000000l) {
          until.tv_sec += 1;
          until.tv_nsec -= 1000000000l;
        }
        pthread_cond_timedwait(&vm->cond, &vm->lock, &until);
        continue;
      }
    }

    v->run->immediate_exit = 0;
    v->in_run = 1;
    pthread_mutex_unlock(&vm->lock);
    const int r = ioctl(v->fd, KVM_RUN, 0);
    const int run_errno = errno;
    pthread_mutex_lock(&vm->lock);
    v->in_run = 0;
    v->exits++;
    pthread_cond_broadcast(&vm->cond);

    if (r < 0) {
      if (run_errno == EINTR || run_errno == EAGAIN) continue; /* kicked */
      mv_fail_errno(&e, run_errno, "KVM_RUN (vcpu %u)", v->id);
      vcpu_die_locked(v, &e);
      break;
    }
    const uint32_t reason = v->run->exit_reason;
    if (reason == KVM_EXIT_INTR) continue;
    if (reason == KVM_EXIT_DIRTY_RING_FULL) {
      const mv_ring_full_fn fn = vm->ring_full;
      void *ctx = vm->ring_full_ctx;
      if (fn == NULL) {
        mv_fail(&e, -EIO, "vcpu %u: dirty ring full, but nothing harvests it", v->id);
        vcpu_die_locked(v, &e);
        break;
      }
      pthread_mutex_unlock(&vm->lock);
      const int rc = fn(ctx, v->id); /* may block until the ring has room */
      pthread_mutex_lock(&vm->lock);
      if (rc < 0) {
        mv_fail(&e, rc, "vcpu %u: dirty ring full and the harvester refused: %s", v->id, strerror(-rc));
        vcpu_die_locked(v, &e);
        break;
      }
      continue;
    }
    if (reason == KVM_EXIT_FAIL_ENTRY) {
      mv_fail(&e, -EIO, "vcpu %u: KVM_RUN exit FAIL_ENTRY (hardware entry failure reason 0x%llx)", v->id,
              (unsigned long long)v->run->fail_entry.hardware_entry_failure_reason);
    } else if (reason == KVM_EXIT_INTERNAL_ERROR) {
      mv_fail(&e, -EIO, "vcpu %u: KVM_RUN exit INTERNAL_ERROR (suberror %u)", v->id, v->run->internal.suberror);
    } else {
      mv_fail(&e, -EIO, "vcpu %u: KVM_RUN exit %s (reason %u)", v->id, exit_name(reason), reason);
    }
    vcpu_die_locked(v, &e);
    break;
  }
  pthread_cond_broadcast(&vm->cond);
  pthread_mutex_unlock(&vm->lock);
  return NULL;
}

/* ---- Creation and teardown ------------------------------------------------- */

static int enable_dirty_ring(mv_vm *vm, mv_error *err) {
  static const uint32_t caps[] = {KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING};
  static const char *const names[] = {"KVM_CAP_DIRTY_LOG_RING_ACQ_REL", "KVM_CAP_DIRTY_LOG_RING"};
  for (size_t i = 0; i < 2; ++i) {
    const int max_bytes = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, caps[i]);
    if (max_bytes <= 0) continue;
    uint32_t entries = MV_RING_ENTRIES_WANTED;
    while (entries > (uint32_t)max_bytes / sizeof(struct kvm_dirty_gfn)) entries >>= 1;
    if (entries < MV_RING_ENTRIES_MIN) {
      fprintf(stderr, "minivmm: %s holds at most %d bytes (under %u entries); using the dirty bitmap\n", names[i],
              max_bytes, MV_RING_ENTRIES_MIN);
      return 0;
    }
    struct kvm_enable_cap cap;
    memset(&cap, 0, sizeof cap);
    cap.cap = caps[i];
    cap.args[0] = (uint64_t)entries * sizeof(struct kvm_dirty_gfn);
    if (ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap) != 0) {
      return mv_fail_errno(err, errno, "KVM_ENABLE_CAP %s (vm, %u entries)", names[i], entries);
    }
    vm->ring_entries = entries;
    vm->ring_cap = caps[i];
    return 0;
  }
  fprintf(stderr, "minivmm: this host's KVM has no dirty ring; using the dirty bitmap\n");
  return 0;
}

/* Guest RAM: a new memfd, or (a handover's target) the source's, dup'ed. */
static int open_memory(mv_vm *vm, mv_error *err) {
  if (vm->options.adopt_memfd_valid) {
    struct stat st;
    if (fstat(vm->options.adopt_memfd, &st) != 0) return mv_fail_errno(err, errno, "fstat (the memfd handed over)");
    if ((uint64_t)st.st_size < vm->memory_bytes) {
      return mv_fail(err, -EINVAL, "the memfd handed over holds %lld bytes, the VM needs %u MiB", (long long)st.st_size,
                     vm->options.memory_mib);
    }
    vm->mem_fd = fcntl(vm->options.adopt_memfd, F_DUPFD_CLOEXEC, 0);
    if (vm->mem_fd < 0) return mv_fail_errno(err, errno, "dup (the memfd handed over)");
    return 0;
  }
  vm->mem_fd = memfd_create("minivmm-ram", MFD_CLOEXEC);
  if (vm->mem_fd < 0) return mv_fail_errno(err, errno, "memfd_create (guest RAM)");
  if (ftruncate(vm->mem_fd, (off_t)vm->memory_bytes) != 0) {
    return mv_fail_errno(err, errno, "ftruncate (guest RAM memfd, %u MiB)", vm->options.memory_mib);
  }
  return 0;
}

static int create_memory(mv_vm *vm, mv_error *err) {
  const int rc = open_memory(vm, err);
  if (rc < 0) return rc;
  void *p = mmap(NULL, vm->memory_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vm->mem_fd, 0);
  if (p == MAP_FAILED) return mv_fail_errno(err, errno, "mmap (guest RAM memfd, %u MiB)", vm->options.memory_mib);
  vm->mem = p;
  struct kvm_userspace_memory_region region;
  memset(&region, 0, sizeof region);
  region.slot = 0;
  region.guest_phys_addr = 0;
  region.memory_size = vm->memory_bytes;
  region.userspace_addr = (uint64_t)(uintptr_t)vm->mem;
  if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) != 0) {
    return mv_fail_errno(err, errno, "KVM_SET_USER_MEMORY_REGION slot 0 (gpa 0x0, %u MiB)", vm->options.memory_mib);
  }
  return 0;
}

static int create_vcpus(mv_vm *vm, mv_error *err) {
  const int mmap_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (mmap_size < 0) return mv_fail_errno(err, errno, "KVM_GET_VCPU_MMAP_SIZE (/dev/kvm)");
  if ((size_t)mmap_size < sizeof(struct kvm_run)) {
    return mv_fail(err, -EINVAL, "KVM_GET_VCPU_MMAP_SIZE (/dev/kvm): %d bytes, less than struct kvm_run", mmap_size);
  }
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    mv_vcpu *v = &vm->vcpus[i];
    v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, (unsigned long)i);
    if (v->fd < 0) return mv_fail_errno(err, errno, "KVM_CREATE_VCPU (vcpu %u)", i);
    void *p = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (p == MAP_FAILED) return mv_fail_errno(err, errno, "mmap (vcpu %u kvm_run, %d bytes)", i, mmap_size);
    v->run = p;
    v->run_size = (size_t)mmap_size;
  }
  return 0;
}

static int start_threads(mv_vm *vm, mv_error *err) {
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    mv_vcpu *v = &vm->vcpus[i];
    const int rc = pthread_create(&v->thread, NULL, vcpu_thread, v);
    if (rc != 0) return mv_fail_errno(err, rc, "pthread_create (vcpu %u)", i);
    v->thread_started = 1;
  }
  /* Wait until each thread parked, so pause/resume start from a known state. */
  pthread_mutex_lock(&vm->lock);
  for (;;) {
    uint32_t parked = 0;
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) parked += (uint32_t)vm->vcpus[i].parked;
    if (parked == vm->vcpu_count) break;
    pthread_cond_wait(&vm->cond, &vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

/* Opens KVM and builds the VM in order; whatever it built, mv_vm_free undoes. */
static int build_vm(mv_vm *vm, mv_error *err) {
  vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (vm->kvm_fd < 0) return mv_fail_errno(err, errno, "open (/dev/kvm)");
  const int api = ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0);
  if (api != KVM_API_VERSION) {
    return mv_fail(err, -ENOTSUP, "KVM_GET_API_VERSION (/dev/kvm): %d, this VMM speaks %d", api, KVM_API_VERSION);
  }
  vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0ul);
  if (vm->vm_fd < 0) return mv_fail_errno(err, errno, "KVM_CREATE_VM (/dev/kvm)");
  const int max_vcpus = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
  if (max_vcpus > 0 && vm->vcpu_count > (uint32_t)max_vcpus) {
    return mv_fail(err, -EINVAL, "vcpu count %u exceeds this host's KVM limit of %d", vm->vcpu_count, max_vcpus);
  }
  if (ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_TSS_ADDR) > 0 &&
      ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, MV_TSS_ADDR) != 0) {
    return mv_fail_errno(err, errno, "KVM_SET_TSS_ADDR (vm, 0x%lx)", MV_TSS_ADDR);
  }
  int rc;
  if (vm->options.use_ring && (rc = enable_dirty_ring(vm, err)) < 0) return rc; /* before any vCPU */
  if ((rc = create_memory(vm, err)) < 0) return rc;
  if ((rc = create_vcpus(vm, err)) < 0) return rc;
  return start_threads(vm, err);
}

int mv_vm_create(const mv_vm_options *options, mv_vm **out, mv_error *err) {
  *out = NULL;
  if (options->memory_mib < MV_MIN_MEMORY_MIB || options->memory_mib > MV_MAX_MEMORY_MIB) {
    return mv_fail(err, -EINVAL, "memory %u MiB is outside %u..%u MiB", options->memory_mib, MV_MIN_MEMORY_MIB,
                   MV_MAX_MEMORY_MIB);
  }
  if (options->vcpus < 1 || options->vcpus > MV_MAX_VCPUS) {
    return mv_fail(err, -EINVAL, "vcpu count %u is outside 1..%u", options->vcpus, MV_MAX_VCPUS);
  }
  mv_share share;
  int rc = mv_layout_share((uint64_t)options->memory_mib << 20, options->vcpus, 0, &share, err);
  if (rc < 0) return rc;

  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, install_kick_handler);
  if (kick_handler_error != 0) return mv_fail_errno(err, kick_handler_error, "sigaction (SIGUSR1, the vCPU kick)");

  mv_vm *vm = calloc(1, sizeof *vm);
  if (vm == NULL) return mv_fail_errno(err, ENOMEM, "allocating the VM");
  vm->options = *options;
  vm->memory_bytes = (uint64_t)options->memory_mib << 20;
  vm->kvm_fd = vm->vm_fd = vm->mem_fd = -1;
  vm->vcpu_count = options->vcpus;
  vm->want = MV_WANT_PAUSE;
  vm->vcpus = calloc(options->vcpus, sizeof *vm->vcpus);
  if (vm->vcpus == NULL) {
    free(vm);
    return mv_fail_errno(err, ENOMEM, "allocating %u vCPUs", options->vcpus);
  }
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    vm->vcpus[i].vm = vm;
    vm->vcpus[i].id = i;
    vm->vcpus[i].fd = -1;
  }
  if (pthread_mutex_init(&vm->lock, NULL) != 0) {
    free(vm->vcpus);
    free(vm);
    return mv_fail(err, -ENOMEM, "pthread_mutex_init (VM)");
  }
  if (pthread_cond_init(&vm->cond, NULL) != 0) {
    pthread_mutex_destroy(&vm->lock);
    free(vm->vcpus);
    free(vm);
    return mv_fail(err, -ENOMEM, "pthread_cond_init (VM)");
  }
  vm->sync_ready = 1;

  /* From here mv_vm_free undoes whatever part was built. */
  if ((rc = build_vm(vm, err)) < 0) {
    mv_vm_free(vm);
    return rc;
  }
  *out = vm;
  return 0;
}

void mv_vm_free(mv_vm *vm) {
  if (vm == NULL) return;
  if (vm->sync_ready) {
    pthread_mutex_lock(&vm->lock);
    vm->want = MV_WANT_QUIT;
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
      if (vm->vcpus[i].thread_started) kick_locked(&vm->vcpus[i]);
    }
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
  }
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    mv_vcpu *v = &vm->vcpus[i];
    if (v->thread_started) pthread_join(v->thread, NULL);
    if (v->run != NULL) munmap(v->run, v->run_size);
    if (v->fd >= 0) close(v->fd);
  }
  if (vm->mem != NULL) munmap(vm->mem, vm->memory_bytes);
  if (vm->mem_fd >= 0) close(vm->mem_fd);
  if (vm->vm_fd >= 0) close(vm->vm_fd);
  if (vm->kvm_fd >= 0) close(vm->kvm_fd);
  if (vm->sync_ready) {
    pthread_cond_destroy(&vm->cond);
    pthread_mutex_destroy(&vm->lock);
  }
  free(vm->vcpus);
  free(vm);
}

/* ---- Control --------------------------------------------------------------- */

/* Lock held. */
static int first_dead_locked(const mv_vm *vm) {
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    if (vm->vcpus[i].dead) return (int)i;
  }
  return -1;
}

int mv_vm_pause(mv_vm *vm, mv_error *err) {
  (void)err;
  pthread_mutex_lock(&vm->lock);
  vm->want = MV_WANT_PAUSE;
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) kick_locked(&vm->vcpus[i]);
  /* (Stops waiting if another caller changed its mind meanwhile, so that
   * callers who break the one-at-a-time rule cannot deadlock.) */
  while (vm->want == MV_WANT_PAUSE) {
    uint32_t stopped = 0;
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) stopped += (uint32_t)(vm->vcpus[i].parked || vm->vcpus[i].dead);
    if (stopped == vm->vcpu_count) break;
    pthread_cond_wait(&vm->cond, &vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return 0; /* a dead vCPU is stopped too; mv_vm_resume reports it */
}

int mv_vm_resume(mv_vm *vm, mv_error *err) {
  pthread_mutex_lock(&vm->lock);
  const int dead = first_dead_locked(vm);
  if (dead >= 0) {
    const int rc = mv_fail(err, -EIO, "cannot resume: %s", vm->vcpu_error.msg);
    pthread_mutex_unlock(&vm->lock);
    return rc;
  }
  vm->want = MV_WANT_RUN;
  pthread_cond_broadcast(&vm->cond);
  while (vm->want == MV_WANT_RUN) {
    uint32_t parked = 0;
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) parked += (uint32_t)vm->vcpus[i].parked;
    if (parked == 0) break;
    pthread_cond_wait(&vm->cond, &vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

int mv_vm_kick_all(mv_vm *vm, mv_error *err) {
  (void)err;
  uint64_t target[MV_MAX_VCPUS];
  int waiting[MV_MAX_VCPUS];
  pthread_mutex_lock(&vm->lock);
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    mv_vcpu *v = &vm->vcpus[i];
    /* A vCPU outside KVM_RUN (parked, dead, or handling an exit, which may be
     * a ring-full wait on the very harvester that kicks) is out of guest mode
     * already. */
    waiting[i] = v->in_run;
    target[i] = v->exits + 1;
    kick_locked(v);
  }
  for (;;) {
    int pending = 0;
    for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
      if (waiting[i] && vm->vcpus[i].exits < target[i] && !vm->vcpus[i].dead) pending = 1;
    }
    if (!pending) break;
    pthread_cond_wait(&vm->cond, &vm->lock);
  }
  pthread_mutex_unlock(&vm->lock);
  return 0;
}

int mv_vm_set_dirty_logging(mv_vm *vm, int on, mv_error *err) {
  struct kvm_userspace_memory_region region;
  memset(&region, 0, sizeof region);
  region.slot = 0;
  region.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  region.guest_phys_addr = 0;
  region.memory_size = vm->memory_bytes;
  region.userspace_addr = (uint64_t)(uintptr_t)vm->mem;
  if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) != 0) {
    return mv_fail_errno(err, errno, "KVM_SET_USER_MEMORY_REGION slot 0 (gpa 0x0, %u MiB, dirty logging %s)",
                         vm->options.memory_mib, on ? "on" : "off");
  }
  return 0;
}

void mv_vm_set_throttle_handler(mv_vm *vm, mv_throttle_fn fn, void *ctx) {
  pthread_mutex_lock(&vm->lock);
  vm->throttle = fn;
  vm->throttle_ctx = ctx;
  pthread_mutex_unlock(&vm->lock);
}

void mv_vm_kick_vcpu(mv_vm *vm, uint32_t id) {
  if (id >= vm->vcpu_count) return;
  pthread_mutex_lock(&vm->lock);
  kick_locked(&vm->vcpus[id]);
  pthread_mutex_unlock(&vm->lock);
}

void mv_vm_set_ring_full_handler(mv_vm *vm, mv_ring_full_fn fn, void *ctx) {
  pthread_mutex_lock(&vm->lock);
  vm->ring_full = fn;
  vm->ring_full_ctx = ctx;
  pthread_mutex_unlock(&vm->lock);
}

int mv_vm_vcpu_status(mv_vm *vm, mv_error *err) {
  pthread_mutex_lock(&vm->lock);
  int rc = 0;
  if (vm->vcpu_failed) {
    *err = vm->vcpu_error;
    rc = -EIO;
  }
  pthread_mutex_unlock(&vm->lock);
  return rc;
}

int mv_vm_get_regs(mv_vm *vm, struct kvm_regs *regs, mv_error *err) {
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    if (ioctl(vm->vcpus[i].fd, KVM_GET_REGS, &regs[i]) != 0) {
      return mv_fail_errno(err, errno, "KVM_GET_REGS (vcpu %u)", i);
    }
  }
  return 0;
}
