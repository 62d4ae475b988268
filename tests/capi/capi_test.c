/* The C ABI from C (C11), without KVM: versions and features, option
 * defaults, sized structs, every refusal with its errno and message, and a
 * migration between a source and a receiver in this process whose VMs are
 * plain memory. Round 0 really travels (the receiver's factory builds the VM,
 * the pages land in it); the first collection then fails, because a VM
 * without a KVM fd has no dirty log. That failure is the point: the source VM
 * is resumed, the receiver's VM is released, and both sides say why.
 * The live migration of a real KVM guest through this ABI is
 * tests/tools/embed_test.sh (examples/). */
#define _GNU_SOURCE 1 /* MAP_ANONYMOUS and memfd_create under -std=c11 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pmlmig/pmlmig.h"

static int failures = 0;

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond)) {                                                      \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                       \
    }                                                                   \
  } while (0)
#define CHECK_ERR(expr, err, text)                                                                        \
  do {                                                                                                    \
    int rc_ = (expr);                                                                                     \
    if (rc_ != (err) || strstr(pmlmig_last_error(), (text)) == NULL) {                                    \
      fprintf(stderr, "%s:%d: %s returned %d (want %d), message \"%s\" (want \"%s\")\n", __FILE__, __LINE__, \
              #expr, rc_, (err), pmlmig_last_error(), (text));                                            \
      ++failures;                                                                                         \
    }                                                                                                     \
  } while (0)

#define PAGES 64
#define MEM_BYTES (PAGES * 4096u)

/* A VM that is plain memory. */
typedef struct fake_vm {
  unsigned char *mem;
  int pauses, resumes, logging, released;
  int fail_logging; /* set_dirty_logging(on) fails with -EPERM */
  int from_factory; /* built by the receiver's factory (on the heap) */
  int memfd;        /* > 0: mem is this memfd, mapped shared */
} fake_vm;

static int op_pause(void *o) { ((fake_vm *)o)->pauses++; return 0; }
static int op_resume(void *o) { ((fake_vm *)o)->resumes++; return 0; }
static int op_kick(void *o) { (void)o; return 0; }
static int op_logging(void *o, int on) {
  fake_vm *v = o;
  if (on && v->fail_logging) {
    pmlmig_set_error("the test VMM refuses dirty logging");
    return -EPERM;
  }
  v->logging = on;
  return 0;
}
static int op_save(void *o, pmlmig_buffer *out) { (void)o; return pmlmig_buffer_append(out, "state", 5); }
static int op_load(void *o, const void *d, size_t n) { (void)o; return n == 5 && memcmp(d, "state", 5) == 0 ? 0 : -EINVAL; }
static fake_vm *g_released_target; /* the receiver's VM, after release */
static void op_release(void *o) {
  fake_vm *v = o;
  v->released = 1;
  munmap(v->mem, MEM_BYTES);
  if (v->memfd > 0) close(v->memfd);
  if (v->from_factory) g_released_target = v;
}

static int g_null_releases;
static void count_null_release(void *o) {
  if (o == NULL) g_null_releases++;
}

static pmlmig_vm_ops ops(int with_release) {
  pmlmig_vm_ops o;
  pmlmig_vm_ops_init(&o);
  o.pause = op_pause;
  o.resume = op_resume;
  o.kick_all = op_kick;
  o.set_dirty_logging = op_logging;
  o.save_state = op_save;
  o.load_state = op_load;
  if (with_release) o.release = op_release;
  return o;
}

static int g_fd = -1;

static int make_vm(fake_vm *v, const char *description, pmlmig_vm **out) {
  pmlmig_region r;
  memset(&r, 0, sizeof r);
  r.gpa = 0;
  r.size = MEM_BYTES;
  r.host = v->mem;
  r.memfd = v->memfd > 0 ? v->memfd : -1;
  pmlmig_vm_config c;
  pmlmig_vm_config_init(&c);
  c.vm_fd = -1;
  c.vcpu_count = 1;
  c.vcpu_fds = &g_fd;
  c.region_count = 1;
  c.regions = &r;
  c.description = description;
  c.description_length = description ? strlen(description) : 0;
  pmlmig_vm_ops o = ops(1);
  return pmlmig_vm_create(&c, &o, v, out);
}

/* A source over the fake VM `v`, whose memory is mapped here (the caller
 * fills it, or not, before starting): *vm is the VM, to destroy after the
 * source. */
static pmlmig_source *fake_source(fake_vm *v, const char *description, pmlmig_vm **vm) {
  v->mem = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(v->mem != MAP_FAILED);
  *vm = NULL;
  CHECK(make_vm(v, description, vm) == 0);
  pmlmig_source *s = NULL;
  CHECK(pmlmig_source_create(*vm, &s) == 0);
  return s;
}

static int g_factory_calls;
static char g_factory_description[64];
static int factory(void *user, const void *d, size_t n, uint32_t vcpus, const pmlmig_region_layout *layout,
                   uint32_t count, pmlmig_vm **out) {
  (void)user;
  g_factory_calls++;
  if (n >= sizeof g_factory_description || vcpus != 1 || count != 1 || layout[0].size != MEM_BYTES) {
    pmlmig_set_error("unexpected layout");
    return -EINVAL;
  }
  memcpy(g_factory_description, d, n);
  g_factory_description[n] = '\0';
  fake_vm *v = calloc(1, sizeof *v);
  v->from_factory = 1;
  v->memfd = memfd_create("capi-test-target", MFD_CLOEXEC); /* as a VMM's guest memory is */
  if (v->memfd <= 0 || ftruncate(v->memfd, MEM_BYTES) != 0) return -errno;
  v->mem = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, v->memfd, 0);
  return make_vm(v, NULL, out);
}

static int refusing_factory(void *user, const void *d, size_t n, uint32_t vcpus, const pmlmig_region_layout *layout,
                            uint32_t count, pmlmig_vm **out) {
  (void)user, (void)d, (void)n, (void)vcpus, (void)layout, (void)count, (void)out;
  pmlmig_set_error("this test receiver takes no VM");
  return -EPERM;
}

static pmlmig_receiver *start_receiver(pmlmig_vm_factory f) {
  pmlmig_receive_options ro;
  pmlmig_receive_options_init(&ro);
  ro.listen = "127.0.0.1:0";
  ro.factory = f;
  pmlmig_receiver *r = NULL;
  CHECK(pmlmig_receiver_start(&ro, &r) == 0);
  CHECK(r != NULL && pmlmig_receiver_port(r) > 0);
  return r;
}

static void test_versions_and_defaults(void) {
  CHECK(pmlmig_version() == PMLMIG_VERSION);
  CHECK(strcmp(pmlmig_version_string(), "0.13.0") == 0);
  CHECK(pmlmig_abi_version() == PMLMIG_ABI_VERSION);
  CHECK(pmlmig_wire_version() == PMLMIG_WIRE_VERSION);
  CHECK((pmlmig_features() & PMLMIG_FEATURE_MIGRATION) != 0);
  CHECK((pmlmig_features() & PMLMIG_FEATURE_MARK_DIRTY) != 0);
  CHECK((pmlmig_features() & PMLMIG_FEATURE_HANDOVER) != 0);
  CHECK((pmlmig_features() & PMLMIG_FEATURE_SNAPSHOT) != 0);
  CHECK(strcmp(pmlmig_outcome_name(PMLMIG_OUTCOME_IN_DOUBT), "in-doubt") == 0);

  pmlmig_migrate_options o;
  memset(&o, 0xff, sizeof o);
  pmlmig_migrate_options_init(&o);
  CHECK(o.size == sizeof o && o.target == NULL && o.streams >= 2 && o.streams <= 8 && o.downtime_limit_ms == 300 &&
        o.max_rounds == 50 && o.timeout_ms == 0 && o.verify == 0 && o.tracker == PMLMIG_TRACKER_AUTO &&
        o.policy == NULL && o.on_progress == NULL && o.converge == PMLMIG_CONVERGE_NONE && o.stall_rounds == 5 &&
        o.dirty_limit_pages_per_s == 0 && o.postcopy_recovery_ms == 300000);
  pmlmig_receive_options ro;
  pmlmig_receive_options_init(&ro);
  CHECK(ro.size == sizeof ro && ro.max_vcpus == 1024 && ro.max_streams == 64 && ro.handshake_timeout_ms == 30000 &&
        ro.idle_timeout_ms == 60000 && ro.commit_timeout_ms == 30000 && ro.factory == NULL &&
        ro.postcopy_recovery_ms == 600000 && ro.uffd_fill == 1);
}

static void test_vm_refusals(void) {
  pmlmig_vm *vm = (pmlmig_vm *)1;
  CHECK_ERR(pmlmig_vm_create(NULL, NULL, NULL, &vm), -EINVAL, "pmlmig_vm_config: NULL");
  CHECK(vm == NULL);
  fake_vm v = {0};
  v.mem = mmap(NULL, MEM_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  pmlmig_region r[2];
  memset(r, 0, sizeof r);
  r[0].size = MEM_BYTES, r[0].host = v.mem, r[0].memfd = -1;
  r[1] = r[0];
  r[1].slot = 1, r[1].gpa = MEM_BYTES / 2; /* overlaps slot 0 */
  pmlmig_vm_config c;
  pmlmig_vm_config_init(&c);
  c.vcpu_count = 1, c.vcpu_fds = &g_fd, c.region_count = 2, c.regions = r;
  pmlmig_vm_ops o = ops(1);
  CHECK_ERR(pmlmig_vm_create(&c, &o, &v, &vm), -EINVAL, "region 1");
  CHECK(v.released == 0); /* a VM never created is never released */
  r[1].slot = 0, r[1].gpa = MEM_BYTES; /* no overlap, but slot 0 again: it would replace region 0 */
  CHECK_ERR(pmlmig_vm_create(&c, &o, &v, &vm), -EINVAL, "regions 0 and 1 both have slot id 0");
  pmlmig_vm_ops missing = ops(1);
  missing.kick_all = NULL;
  c.region_count = 1;
  CHECK_ERR(pmlmig_vm_create(&c, &missing, &v, &vm), -EINVAL, "are required");
  c.dirty_ring_entries = 3000;
  CHECK_ERR(pmlmig_vm_create(&c, &o, &v, &vm), -EINVAL, "not a power of two");
  c.dirty_ring_entries = 0;
  /* An older caller's shorter config (size covers only the fields up to
   * regions): the description is then empty, not garbage. */
  c.description = "ignored";
  c.description_length = 7;
  c.size = offsetof(pmlmig_vm_config, description);
  CHECK(pmlmig_vm_create(&c, &o, &v, &vm) == 0);
  CHECK(pmlmig_vm_opaque(vm) == &v);
  CHECK_ERR(pmlmig_vm_dirty_ring_full(vm, 0), -ENOENT, "no migration tracks");
  CHECK_ERR(pmlmig_vm_dirty_ring_full(vm, 7), -EINVAL, "vcpu 7");
  CHECK(strstr(pmlmig_vm_last_error(vm), "vcpu 7") != NULL);
  CHECK(pmlmig_vm_mark_dirty(vm, 4096, 8192) == 0);
  CHECK_ERR(pmlmig_vm_mark_dirty(vm, MEM_BYTES - 4096, 8192), -EINVAL, "outside every memory slot");
  pmlmig_vm_destroy(vm);
  CHECK(v.released == 1);
  pmlmig_vm_destroy(NULL);
  /* release is called for a NULL opaque too. */
  g_null_releases = 0;
  o.release = count_null_release;
  CHECK(pmlmig_vm_create(&c, &o, NULL, &vm) == 0);
  pmlmig_vm_destroy(vm);
  CHECK(g_null_releases == 1);
  munmap(v.mem, MEM_BYTES);
}

static void test_source_refusals(void) {
  fake_vm v = {0};
  pmlmig_vm *vm;
  pmlmig_source *s = fake_source(&v, "d", &vm);
  CHECK_ERR(pmlmig_source_wait(s, NULL), -ENOENT, "no migration was started");
  CHECK_ERR(pmlmig_source_cancel(s), -ENOENT, "no migration in progress");
  pmlmig_migrate_options o;
  pmlmig_migrate_options_init(&o);
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "target is empty");
  CHECK(strstr(pmlmig_source_last_error(s), "target is empty") != NULL);
  o.target = "127.0.0.1:1";
  o.compression = (pmlmig_compression)9;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "unknown compression 9");
  o.compression = PMLMIG_COMPRESSION_NONE;
  o.streams = 0;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "streams");
  o.streams = 1;
  o.tracker = PMLMIG_TRACKER_RING;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "without a dirty ring");
  o.tracker = (pmlmig_tracker)7;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "unknown tracker 7");
  o.tracker = PMLMIG_TRACKER_AUTO;
  o.converge = (pmlmig_converge)9;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "unknown converge 9");
  o.converge = PMLMIG_CONVERGE_DIRTY_LIMIT;
  o.dirty_limit_pages_per_s = -1;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "finite rate");
  o.converge = PMLMIG_CONVERGE_NONE;
  o.dirty_limit_pages_per_s = 1000;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "converge is not PMLMIG_CONVERGE_DIRTY_LIMIT");
  o.dirty_limit_pages_per_s = 0;
  /* The fake VM has no ring (so no per-vCPU rates) and no kick_vcpu. */
  o.converge = PMLMIG_CONVERGE_DIRTY_LIMIT;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "the dirty ring does");
  o.converge = PMLMIG_CONVERGE_AUTO;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "cannot hold its vCPUs");
  o.converge = PMLMIG_CONVERGE_NONE;
  CHECK(o.postcopy == PMLMIG_POSTCOPY_OFF);
  o.postcopy = (pmlmig_postcopy)7;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "unknown postcopy 7");
  o.postcopy = PMLMIG_POSTCOPY_OFF;
  /* A same-host handover needs unix:PATH and copies nothing, so nothing to compress or throttle. */
  o.local = 1;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "is not unix:PATH");
  o.target = "unix:/nonexistent/pmlmig.sock";
  o.compression = PMLMIG_COMPRESSION_LZ4;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "do not apply");
  o.compression = PMLMIG_COMPRESSION_NONE;
  o.converge = PMLMIG_CONVERGE_AUTO;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "converge and postcopy must be off");
  o.converge = PMLMIG_CONVERGE_NONE;
  o.local = 0;
  o.target = "unix:/nonexistent/pmlmig.sock";
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "only a same-host handover");
  o.target = "127.0.0.1:1";
  CHECK(strcmp(pmlmig_outcome_name(PMLMIG_OUTCOME_POSTCOPY_FAILED), "postcopy-failed") == 0);
  CHECK(pmlmig_vm_throttle_ns(vm, 0) == 0 && pmlmig_vm_throttle_ns(vm, 99) == 0 && pmlmig_vm_throttle_ns(NULL, 0) == 0);
  o.token_file = "/nonexistent/token";
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "token file /nonexistent/token");
  o.token_file = NULL;
  /* Snapshots: a file, none of a network migration's options. */
  CHECK(o.snapshot_to == NULL && o.snapshot_live == 0);
  o.snapshot_live = 1;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "snapshot_live must be 0, or 1 with a snapshot_to file");
  o.snapshot_to = "/tmp/capi_test.snap";
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "set target or snapshot_to, not both");
  o.target = NULL;
  o.compression = PMLMIG_COMPRESSION_LZ4;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "a snapshot goes to a file");
  o.compression = PMLMIG_COMPRESSION_NONE;
  o.verify = PMLMIG_VERIFY_BEFORE_COMMIT;
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "verification do not apply");
  o.verify = PMLMIG_VERIFY_OFF;
  o.snapshot_to = NULL;
  o.snapshot_live = 0;
  o.target = "127.0.0.1:1";
  o.size = 4; /* smaller than the size field itself */
  CHECK_ERR(pmlmig_source_start(s, &o), -EINVAL, "size is 4");
  pmlmig_progress p;
  memset(&p, 0, sizeof p);
  p.size = sizeof p;
  pmlmig_outcome last = PMLMIG_OUTCOME_FAILED;
  CHECK(pmlmig_source_status(s, &p, &last) == 0);
  CHECK(last == PMLMIG_OUTCOME_NONE && p.phase == PMLMIG_PHASE_SETUP);
  pmlmig_source_destroy(s);
  pmlmig_vm_destroy(vm);
  CHECK(v.pauses == 0 && v.resumes == 0);
}

static int shared_factory(void *user, const void *description, size_t description_length, uint32_t vcpus,
                          const pmlmig_region *regions, uint32_t region_count, pmlmig_vm **out) {
  (void)user, (void)description, (void)description_length, (void)vcpus, (void)regions, (void)region_count;
  *out = NULL;
  pmlmig_set_error("this test takes no handover");
  return -EINVAL;
}

static void test_receiver_refusals(void) {
  pmlmig_receive_options ro;
  pmlmig_receive_options_init(&ro);
  pmlmig_receiver *r = (pmlmig_receiver *)1;
  CHECK_ERR(pmlmig_receiver_start(&ro, &r), -EINVAL, "listen is empty");
  CHECK(r == NULL);
  ro.listen = "127.0.0.1:0";
  CHECK_ERR(pmlmig_receiver_start(&ro, &r), -EINVAL, "factory is NULL");
  ro.factory = factory;
  ro.max_streams = 65;
  CHECK_ERR(pmlmig_receiver_start(&ro, &r), -EINVAL, "max_streams");
  ro.max_streams = 64;
  ro.listen = "10.1.2.3:7400"; /* not loopback, no TLS, no token */
  CHECK(pmlmig_receiver_start(&ro, &r) < 0);
  CHECK(strlen(pmlmig_last_error()) > 0);
  /* unix:PATH takes same-host handovers, built by shared_factory. */
  char path[64];
  snprintf(path, sizeof path, "unix:/tmp/pmlmig-capi-%d.sock", (int)getpid());
  ro.listen = path;
  CHECK_ERR(pmlmig_receiver_start(&ro, &r), -EINVAL, "shared_factory is NULL");
  ro.shared_factory = shared_factory;
  ro.token_file = "/nonexistent/token";
  CHECK_ERR(pmlmig_receiver_start(&ro, &r), -EINVAL, "do not apply to a unix:PATH receiver");
  ro.token_file = NULL;
  CHECK(pmlmig_receiver_start(&ro, &r) == 0);
  CHECK(pmlmig_receiver_port(r) == 0);
  struct stat st;
  CHECK(stat(path + 5, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 0777) == 0600);
  pmlmig_vm *none = (pmlmig_vm *)1;
  CHECK(pmlmig_receiver_wait(r, 10, &none, NULL) == -ETIMEDOUT && none == NULL);
  pmlmig_receiver_destroy(r);
  CHECK(stat(path + 5, &st) != 0); /* the socket goes with the receiver */
  r = start_receiver(factory);
  pmlmig_vm *got = (pmlmig_vm *)1;
  CHECK(pmlmig_receiver_wait(r, 10, &got, NULL) == -ETIMEDOUT);
  CHECK(got == NULL);
  CHECK(pmlmig_receiver_wait(r, 10, NULL, NULL) == -EINVAL);
  CHECK(strstr(pmlmig_receiver_last_error(r), "vm is NULL") != NULL);
  pmlmig_receiver_destroy(r);
  pmlmig_receiver_destroy(NULL);
}

/* Round 0 of a real migration into the receiver's factory-built VM, then the
 * failure at the first collection (no KVM fd): what each side then holds. */
static void test_failed_migration(int refuse) {
  g_factory_calls = 0;
  g_released_target = NULL;
  pmlmig_receiver *r = start_receiver(refuse ? refusing_factory : factory);
  char target[64];
  snprintf(target, sizeof target, "127.0.0.1:%d", pmlmig_receiver_port(r));

  fake_vm v = {0};
  pmlmig_vm *vm;
  pmlmig_source *s = fake_source(&v, "fake-vm-1", &vm);
  for (unsigned i = 0; i < MEM_BYTES; ++i) v.mem[i] = (unsigned char)(i * 7 + 1);
  pmlmig_migrate_options o;
  pmlmig_migrate_options_init(&o);
  o.target = target;
  o.tracker = PMLMIG_TRACKER_BITMAP;
  CHECK(pmlmig_source_start(s, &o) == 0);
  /* A caller compiled against an older, shorter stats struct: only its
   * bytes are written. */
  struct {
    pmlmig_migration_stats st;
    unsigned char canary[16];
  } out;
  memset(&out, 0xab, sizeof out);
  out.st.size = offsetof(pmlmig_migration_stats, zero_pages);
  const int rc = pmlmig_source_wait(s, &out.st);
  CHECK(rc == -EIO);
  CHECK(out.st.size == offsetof(pmlmig_migration_stats, zero_pages));
  CHECK(out.st.outcome == PMLMIG_OUTCOME_FAILED);
  const unsigned char *tail = (const unsigned char *)&out.st.zero_pages;
  CHECK(tail[0] == 0xab && out.canary[0] == 0xab);
  const char *why = pmlmig_source_last_error(s);
  if (refuse) {
    CHECK(strstr(why, "this test receiver takes no VM") != NULL);
    CHECK(v.logging == 0);
  } else {
    CHECK(strstr(why, "collect") != NULL);
    CHECK(out.st.pages >= PAGES); /* round 0 went out */
  }
  CHECK(v.resumes == 1 && v.pauses == 0 && v.logging == 0);

  pmlmig_receive_stats rs;
  pmlmig_receive_stats_init(&rs);
  pmlmig_vm *got = (pmlmig_vm *)1;
  const int wrc = pmlmig_receiver_wait(r, 10000, &got, &rs);
  CHECK(wrc < 0 && wrc != -ETIMEDOUT && got == NULL);
  CHECK(rs.outcome == PMLMIG_OUTCOME_FAILED || rs.outcome == PMLMIG_OUTCOME_CANCELLED);
  if (refuse) {
    CHECK(g_factory_calls == 0 || g_released_target == NULL);
  } else {
    CHECK(g_factory_calls == 1);
    CHECK(strcmp(g_factory_description, "fake-vm-1") == 0);
    CHECK(rs.normal_pages >= PAGES);
    /* Two streams (the default) into the factory's memfd: round 0 placed with userfaultfd. */
    CHECK(rs.uffd_filled_bytes == MEM_BYTES);
    if (rs.uffd_filled_bytes != MEM_BYTES) fprintf(stderr, "uffd_filled_bytes %llu\n", (unsigned long long)rs.uffd_filled_bytes);
    CHECK(g_released_target != NULL && g_released_target->released == 1); /* the receiver released its VM */
    free(g_released_target);
  }
  pmlmig_source_destroy(s);
  pmlmig_vm_destroy(vm);
  pmlmig_receiver_destroy(r);
}

static void test_callback_failure(void) {
  pmlmig_receiver *r = start_receiver(factory);
  char target[64];
  snprintf(target, sizeof target, "127.0.0.1:%d", pmlmig_receiver_port(r));
  fake_vm v = {0};
  v.fail_logging = 1;
  pmlmig_vm *vm;
  pmlmig_source *s = fake_source(&v, "fake-vm-2", &vm);
  pmlmig_migrate_options o;
  pmlmig_migrate_options_init(&o);
  o.target = target;
  CHECK(pmlmig_source_start(s, &o) == 0);
  CHECK(pmlmig_source_wait(s, NULL) == -EIO);
  CHECK(strstr(pmlmig_source_last_error(s), "set_dirty_logging callback") != NULL);
  CHECK(strstr(pmlmig_source_last_error(s), "the test VMM refuses dirty logging") != NULL);
  CHECK(v.resumes == 1);
  pmlmig_source_destroy(s);
  pmlmig_vm_destroy(vm);
  pmlmig_receiver_destroy(r);
  free(g_released_target); /* the receiver's VM of this failed attempt, if its factory ran */
  g_released_target = NULL;
}

/* A port that refuses connections: a receiver's, once it is gone. */
static int closed_port(void) {
  pmlmig_receiver *r = start_receiver(factory);
  const int port = pmlmig_receiver_port(r);
  pmlmig_receiver_destroy(r);
  return port;
}

/* A TCP port that accepts connections (the kernel's backlog) and never
 * answers: a migration to it stays in its setup for seconds. */
static int silent_listener(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 8) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0);
  *port = ntohs(a.sin_port);
  return fd;
}

typedef struct waiter {
  pmlmig_source *source;
  pmlmig_receiver *receiver;
  int rc;
} waiter;
static void *wait_source(void *arg) {
  waiter *w = arg;
  w->rc = pmlmig_source_wait(w->source, NULL);
  return NULL;
}
static void *wait_receiver(void *arg) {
  waiter *w = arg;
  pmlmig_vm *vm = NULL;
  w->rc = pmlmig_receiver_wait(w->receiver, -1, &vm, NULL);
  return NULL;
}
static int g_wait_in_callback = 1; /* what pmlmig_source_wait returned inside on_progress */
static void wait_in_callback(void *user, const pmlmig_progress *p) {
  (void)p;
  if (g_wait_in_callback == 1) g_wait_in_callback = pmlmig_source_wait(user, NULL);
}

static void *read_errors(void *arg) {
  size_t total = 0;
  for (int i = 0; i < 20000; ++i) total += strlen(pmlmig_source_last_error(arg));
  return (void *)total;
}

/* What pmlmig_source_wait says of an unreachable receiver; destroying a
 * source or a receiver while another thread waits on it; a handle's
 * message read while another thread replaces it (AddressSanitizer, in the
 * test command's first stage, finds a message freed under its reader). */
static void test_errors_and_threads(void) {
  fake_vm v = {0};
  pmlmig_vm *vm;
  pmlmig_source *s = fake_source(&v, "fake-vm-3", &vm);
  char target[64];
  snprintf(target, sizeof target, "127.0.0.1:%d", closed_port());
  pmlmig_migrate_options o;
  pmlmig_migrate_options_init(&o);
  o.target = target;
  o.tracker = PMLMIG_TRACKER_BITMAP;
  o.on_progress = wait_in_callback; /* a wait inside a callback is refused, not a deadlock */
  o.user = s;
  CHECK(pmlmig_source_start(s, &o) == 0);
  CHECK(pmlmig_source_wait(s, NULL) == -EHOSTUNREACH);
  CHECK(strstr(pmlmig_source_last_error(s), "nothing listens") != NULL);
  CHECK(v.resumes == 1);
  CHECK(g_wait_in_callback == -EDEADLK);
  o.on_progress = NULL;

  pthread_t reader;
  CHECK(pthread_create(&reader, NULL, read_errors, s) == 0);
  for (int i = 0; i < 20000; ++i) CHECK(pmlmig_source_cancel(s) == -ENOENT);
  CHECK(pthread_join(reader, NULL) == 0);

  /* Destroyed while a thread waits: the migration is cancelled, the waiter returns, then the handle goes. */
  int port = 0;
  const int silent = silent_listener(&port);
  snprintf(target, sizeof target, "127.0.0.1:%d", port);
  CHECK(pmlmig_source_start(s, &o) == 0);
  waiter w = {s, NULL, 1};
  pthread_t t;
  CHECK(pthread_create(&t, NULL, wait_source, &w) == 0);
  usleep(200 * 1000);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  pmlmig_source_destroy(s);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  /* The cancel ends the wait for a connection, well before its 5 s timeout. */
  const long destroy_ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
  CHECK(destroy_ms < 3000);
  if (destroy_ms >= 3000) fprintf(stderr, "pmlmig_source_destroy took %ld ms\n", destroy_ms);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(w.rc == -ECANCELED);
  if (w.rc != -ECANCELED) fprintf(stderr, "source_wait during destroy: %d\n", w.rc);
  close(silent);
  pmlmig_vm_destroy(vm);

  waiter rw = {NULL, start_receiver(factory), 1};
  CHECK(pthread_create(&t, NULL, wait_receiver, &rw) == 0);
  usleep(100 * 1000);
  pmlmig_receiver_destroy(rw.receiver);
  CHECK(pthread_join(t, NULL) == 0);
  CHECK(rw.rc == -ESHUTDOWN);
  if (rw.rc != -ESHUTDOWN) fprintf(stderr, "receiver_wait during destroy: %d\n", rw.rc);
}

/* Restores refused before anything is built. */
static void test_restore_refusals(void) {
  pmlmig_restore_options ro;
  memset(&ro, 0xff, sizeof ro);
  pmlmig_restore_options_init(&ro);
  CHECK(ro.size == sizeof ro && ro.path == NULL && ro.factory == NULL && ro.lazy == 0 && ro.threads == 8);
  pmlmig_restore *r = (pmlmig_restore *)&ro; /* must be reset to NULL on failure */
  CHECK_ERR(pmlmig_restore_start(NULL, &r), -EINVAL, "pmlmig_restore_options: NULL");
  CHECK(r == NULL);
  CHECK_ERR(pmlmig_restore_start(&ro, &r), -EINVAL, "path is empty");
  ro.path = "/nonexistent/capi_test.snap";
  CHECK_ERR(pmlmig_restore_start(&ro, &r), -EINVAL, "factory is NULL");
  ro.factory = factory;
  ro.lazy = 2;
  CHECK_ERR(pmlmig_restore_start(&ro, &r), -EINVAL, "lazy must be 0 or 1");
  ro.lazy = 0;
  ro.threads = 0;
  CHECK_ERR(pmlmig_restore_start(&ro, &r), -EINVAL, "threads 0 is outside 1..256");
  ro.threads = 8;
  g_factory_calls = 0;
  CHECK_ERR(pmlmig_restore_start(&ro, &r), -ENOENT, "/nonexistent/capi_test.snap");
  char foreign[] = "/tmp/capi_test_foreign_XXXXXX";
  const int fd = mkstemp(foreign);
  CHECK(fd >= 0 && write(fd, "not a snapshot", 14) == 14);
  close(fd);
  ro.path = foreign;
  CHECK(pmlmig_restore_start(&ro, &r) < 0 && r == NULL && strstr(pmlmig_last_error(), foreign) != NULL);
  CHECK(g_factory_calls == 0); /* refused before any VM was built */
  unlink(foreign);
  pmlmig_vm *got = NULL;
  CHECK_ERR(pmlmig_restore_wait(NULL, 0, &got, NULL), -EINVAL, "restore is NULL");
  pmlmig_restore_destroy(NULL);
  CHECK(strcmp(pmlmig_restore_last_error(NULL), "") == 0);
}

/* A paused snapshot of a plain-memory VM (no dirty log needed: every page
 * once, paused), then restores from it, eager and lazy, each VM's memory
 * equal to the source's; and one abandoned before it was waited for. */
static void test_snapshot_round_trip(void) {
  char path[] = "/tmp/capi_test_snap_XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0);
  close(fd);
  unlink(path); /* the snapshot is created under a temporary name and renamed to this */
  fake_vm v = {0};
  pmlmig_vm *vm;
  pmlmig_source *s = fake_source(&v, "d", &vm);
  for (unsigned i = 0; i < PAGES; ++i) {
    if (i % 3 != 0) memset(v.mem + i * 4096u, (int)(i + 1), 4096); /* every third page stays zero */
  }
  pmlmig_migrate_options o;
  pmlmig_migrate_options_init(&o);
  o.snapshot_to = path;
  CHECK(pmlmig_source_start(s, &o) == 0);
  pmlmig_migration_stats st;
  pmlmig_migration_stats_init(&st);
  const int rc = pmlmig_source_wait(s, &st);
  CHECK(rc == 0);
  if (rc != 0) fprintf(stderr, "snapshot: %s\n", pmlmig_source_last_error(s));
  CHECK(st.outcome == PMLMIG_OUTCOME_COMPLETED && st.source_kept == 1);
  CHECK(v.pauses >= 1 && v.resumes == v.pauses); /* paused for the write, running again */
  unsigned char *expect = malloc(MEM_BYTES); /* the source's memory goes with its VM (op_release) */
  CHECK(expect != NULL);
  memcpy(expect, v.mem, MEM_BYTES);
  pmlmig_source_destroy(s);
  pmlmig_vm_destroy(vm);

  pmlmig_restore_options ro;
  pmlmig_restore_options_init(&ro);
  ro.path = path;
  ro.factory = factory;
  pmlmig_restore *r = NULL;
  CHECK(pmlmig_restore_start(&ro, &r) == 0 && r != NULL);
  pmlmig_vm *got = NULL;
  pmlmig_restore_stats rs;
  pmlmig_restore_stats_init(&rs);
  CHECK(pmlmig_restore_wait(r, 0, &got, &rs) == 0 && got != NULL);
  CHECK(rs.verified == 1 && rs.lazy == 0 && rs.guest_bytes == MEM_BYTES);
  CHECK(rs.bytes_read == (PAGES - (PAGES + 2) / 3) * 4096u); /* the zero pages are holes: not read */
  pmlmig_vm *again = NULL;
  CHECK_ERR(pmlmig_restore_wait(r, 0, &again, NULL), -EINVAL, "handed over already");
  CHECK(again == NULL);
  if (got != NULL) {
    fake_vm *t = pmlmig_vm_opaque(got);
    CHECK(memcmp(t->mem, expect, MEM_BYTES) == 0);
    CHECK(t->resumes == 1);
    pmlmig_vm_destroy(got);
    CHECK(g_released_target == t);
    free(t);
  }
  pmlmig_restore_destroy(r);

  ro.lazy = 1; /* private anonymous memory: owed pages are dropped, then fault in from the file */
  r = NULL;
  const int lazy_rc = pmlmig_restore_start(&ro, &r);
  if (lazy_rc < 0 && strstr(pmlmig_last_error(), "userfaultfd") != NULL) {
    printf("capi_test: lazy restore skipped: %s\n", pmlmig_last_error());
  } else {
    CHECK(lazy_rc == 0 && r != NULL);
    got = NULL;
    CHECK(r != NULL && pmlmig_restore_wait(r, INT64_MAX, &got, &rs) == 0 && got != NULL);
    CHECK(rs.verified == 1 && rs.lazy == 1);
    if (got != NULL) {
      fake_vm *t = pmlmig_vm_opaque(got);
      CHECK(memcmp(t->mem, expect, MEM_BYTES) == 0);
      pmlmig_vm_destroy(got);
      free(t);
    }
    pmlmig_restore_destroy(r);
  }

  ro.lazy = 0;
  g_released_target = NULL;
  CHECK(pmlmig_restore_start(&ro, &r) == 0);
  pmlmig_restore_destroy(r); /* not waited for: paused and released */
  CHECK(g_released_target != NULL && g_released_target->pauses >= 1);
  free(g_released_target);
  g_released_target = NULL;
  free(expect);
  unlink(path);
}

int main(void) {
  test_versions_and_defaults();
  test_vm_refusals();
  test_source_refusals();
  test_receiver_refusals();
  test_restore_refusals();
  test_snapshot_round_trip();
  test_failed_migration(0);
  test_failed_migration(1);
  test_callback_failure();
  test_errors_and_threads();
  if (failures != 0) {
    fprintf(stderr, "capi_test: %d checks failed\n", failures);
    return 1;
  }
  printf("capi_test: all checks passed\n");
  return 0;
}
