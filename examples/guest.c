/*
 * guest.c: minivmm's guest and the checker that proves its memory.
 *
 * The guest runs in 32-bit protected mode, flat segments, no paging, no
 * interrupts (set up through KVM_SET_SREGS / KVM_SET_REGS; the GDT in memory
 * only mirrors what the segment registers hold). Every vCPU runs the same
 * 33-byte program at MV_CODE_GPA over its own share [ESI, EDI) of the data
 * pages, with
 *   EAX = seq (starts at 1)      ECX = cursor, the gpa of the page to store
 *   EBX = its stats record       ESI / EDI = its share's first / end gpa
 * and loops forever: for seq = 1, 2, ...: for each page of the share, store
 * the page number at +4 and seq at +0; keep seq and the cursor in the stats
 * record too.
 *
 * Every data page is pre-filled by the host: +0 seq 0, +4 its page number
 * (gpa >> 12), +8..4095 a pattern derived from the page number (fill_page).
 * The page-number store writes the value the page already holds, so the one
 * word of the page that ever changes is +0, and exactly one instruction (L3)
 * changes it. That makes the whole of guest memory a function of the
 * registers at every instruction boundary, which is where KVM stops a vCPU:
 *
 *   boundary  pages of the share holding seq = EAX    the rest hold   stats {seq, cursor}
 *   L4        [ESI, ECX]  (L3 stored, ECX not moved)  EAX - 1         {EAX, ECX}
 *   L9        all of them (pass done, EAX not bumped) -               {EAX, EDI}
 *   any other [ESI, ECX)                              EAX - 1         {EAX, ECX}, except
 *                                                     L5: cursor ECX - 4096; L10: seq EAX - 1;
 *                                                     L10, L11: cursor EDI
 * and ECX is a page of the share at L0..L4, in (ESI, EDI] at L5..L7, EDI at
 * L8, ESI at L9..L12. The header pages (GDT, program, stats, TSS) hold
 * exactly what the host wrote, the stats records as in the table. So the
 * checker catches a page that is wrong and also one that is stale: a page
 * migrated from an older round holds a smaller seq than the registers demand.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include "minivmm.h"

/* ---- The program ----------------------------------------------------------- */

/* Offsets of the instruction boundaries L0..L12 from MV_CODE_GPA. */
static const uint8_t kBoundary[MV_GUEST_BOUNDARIES] = {0, 2, 5, 8, 10, 16, 19, 21, 23, 25, 26, 28, 31};
enum { L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12 };

static const uint8_t kProgram[] = {
    /* L0  +0  */ 0x89, 0xca,                         /* mov edx, ecx                             */
    /* L1  +2  */ 0xc1, 0xea, 0x0c,                   /* shr edx, 12        ; page number         */
    /* L2  +5  */ 0x89, 0x51, 0x04,                   /* mov [ecx+4], edx   ; = what the page holds */
    /* L3  +8  */ 0x89, 0x01,                         /* mov [ecx], eax     ; seq: the one change   */
    /* L4  +10 */ 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, /* add ecx, 4096                            */
    /* L5  +16 */ 0x89, 0x4b, 0x04,                   /* mov [ebx+4], ecx   ; stats.cursor          */
    /* L6  +19 */ 0x39, 0xf9,                         /* cmp ecx, edi                             */
    /* L7  +21 */ 0x72, 0xe9,                         /* jb L0              ; -23                 */
    /* L8  +23 */ 0x89, 0xf1,                         /* mov ecx, esi       ; pass done           */
    /* L9  +25 */ 0x40,                               /* inc eax                                  */
    /* L10 +26 */ 0x89, 0x03,                         /* mov [ebx], eax     ; stats.seq             */
    /* L11 +28 */ 0x89, 0x4b, 0x04,                   /* mov [ebx+4], ecx   ; stats.cursor          */
    /* L12 +31 */ 0xeb, 0xdf,                         /* jmp L0             ; -33                 */
};
_Static_assert(sizeof kProgram == 33, "the boundary table assumes a 33-byte program");

/* GDT: null, flat 32-bit code (0x08), flat data (0x10), busy 32-bit TSS at
 * MV_TSS_GPA (0x18). Must agree with the segments boot_sregs sets. */
static const uint64_t kGdt[4] = {
    0,
    0x00cf9b000000ffffull,
    0x00cf93000000ffffull,
    0x00008b0000000067ull | ((uint64_t)MV_TSS_GPA << 16),
};
_Static_assert(MV_TSS_GPA < 0x1000000u, "the TSS descriptor above holds base bits 0..23 only");

typedef struct mv_stats_record {
  uint32_t seq;
  uint32_t cursor;
  uint32_t reserved[2];
} mv_stats_record;
_Static_assert(sizeof(mv_stats_record) == 16, "stats records are 16 bytes");
_Static_assert(MV_MAX_VCPUS * sizeof(mv_stats_record) <= MV_PAGE_SIZE, "stats fit one page");

int mv_guest_boundary(uint64_t rip) {
  if (rip < MV_CODE_GPA) return -1;
  for (int i = 0; i < MV_GUEST_BOUNDARIES; ++i) {
    if (rip - MV_CODE_GPA == kBoundary[i]) return i;
  }
  return -1;
}

/* ---- Layout ---------------------------------------------------------------- */

int mv_layout_share(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, mv_share *share, mv_error *err) {
  const uint64_t first = MV_DATA_GPA / MV_PAGE_SIZE;
  const uint64_t pages = memory_bytes > MV_DATA_GPA ? (memory_bytes - MV_DATA_GPA) / MV_PAGE_SIZE : 0;
  if (vcpus == 0 || pages < vcpus) {
    return mv_fail(err, -EINVAL, "%" PRIu64 " MiB leaves %" PRIu64 " data pages, fewer than %u vCPUs",
                   memory_bytes >> 20, pages, vcpus);
  }
  share->first = (uint32_t)(first + pages * id / vcpus);
  share->count = (uint32_t)(pages * (id + 1) / vcpus - pages * id / vcpus);
  return 0;
}

/* ---- Page contents --------------------------------------------------------- */

static uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* Bytes 8..4095 of data page `pn`: 511 words of xorshift64 seeded by the page
 * number, incompressible and different on every page. */
static void fill_page(uint32_t pn, uint64_t words[511]) {
  uint64_t x = splitmix64(pn) | 1;
  for (int i = 0; i < 511; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    words[i] = x;
  }
}

static void boot_regs(uint32_t id, const mv_share *share, struct kvm_regs *regs) {
  memset(regs, 0, sizeof *regs);
  regs->rax = 1;
  regs->rbx = MV_STATS_GPA + id * sizeof(mv_stats_record);
  regs->rcx = regs->rsi = (uint64_t)share->first * MV_PAGE_SIZE;
  regs->rdi = (uint64_t)(share->first + share->count) * MV_PAGE_SIZE;
  regs->rip = MV_CODE_GPA;
  regs->rflags = 2; /* the reserved bit; IF clear */
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, uint8_t type) {
  memset(s, 0, sizeof *s);
  s->base = 0;
  s->limit = 0xffffffffu;
  s->selector = selector;
  s->type = type;
  s->present = 1;
  s->dpl = 0;
  s->db = 1; /* 32-bit */
  s->s = 1;
  s->l = 0;
  s->g = 1;
}

static void boot_sregs(struct kvm_sregs *sregs) {
  flat_segment(&sregs->cs, 0x08, 11); /* execute/read, accessed */
  flat_segment(&sregs->ds, 0x10, 3);  /* read/write, accessed */
  sregs->es = sregs->fs = sregs->gs = sregs->ss = sregs->ds;
  memset(&sregs->tr, 0, sizeof sregs->tr);
  sregs->tr.base = MV_TSS_GPA;
  sregs->tr.limit = 0x67;
  sregs->tr.selector = 0x18;
  sregs->tr.type = 11; /* busy 32-bit TSS */
  sregs->tr.present = 1;
  memset(&sregs->ldt, 0, sizeof sregs->ldt);
  sregs->ldt.type = 2;
  sregs->ldt.present = 1;
  sregs->ldt.unusable = 1;
  sregs->gdt.base = MV_GDT_GPA;
  sregs->gdt.limit = sizeof kGdt - 1;
  sregs->idt.base = 0;
  sregs->idt.limit = 0; /* no IDT: any exception is a triple fault, a SHUTDOWN exit */
  sregs->cr0 = 0x11;    /* PE | ET */
  sregs->cr2 = sregs->cr3 = sregs->cr4 = 0;
  sregs->efer = 0;
}

int mv_guest_prepare(mv_vm *vm, mv_error *err) {
  uint8_t *mem = vm->mem;
  memcpy(mem + MV_GDT_GPA, kGdt, sizeof kGdt);
  memcpy(mem + MV_CODE_GPA, kProgram, sizeof kProgram);
  for (uint32_t id = 0; id < vm->vcpu_count; ++id) {
    mv_share share;
    int rc = mv_layout_share(vm->memory_bytes, vm->vcpu_count, id, &share, err);
    if (rc < 0) return rc;
    mv_stats_record rec = {1, share.first * MV_PAGE_SIZE, {0, 0}};
    memcpy(mem + MV_STATS_GPA + id * sizeof rec, &rec, sizeof rec);
  }
  const uint32_t end_page = (uint32_t)(vm->memory_bytes / MV_PAGE_SIZE);
  for (uint32_t pn = MV_DATA_GPA / MV_PAGE_SIZE; pn < end_page; ++pn) {
    uint8_t *page = mem + (uint64_t)pn * MV_PAGE_SIZE;
    const uint32_t head[2] = {0, pn};
    uint64_t fill[511];
    fill_page(pn, fill);
    memcpy(page, head, sizeof head);
    memcpy(page + 8, fill, sizeof fill);
  }

  for (uint32_t id = 0; id < vm->vcpu_count; ++id) {
    const int fd = vm->vcpus[id].fd;
    struct kvm_sregs sregs;
    if (ioctl(fd, KVM_GET_SREGS, &sregs) != 0) return mv_fail_errno(err, errno, "KVM_GET_SREGS (vcpu %u)", id);
    boot_sregs(&sregs);
    if (ioctl(fd, KVM_SET_SREGS, &sregs) != 0) return mv_fail_errno(err, errno, "KVM_SET_SREGS (vcpu %u)", id);
    mv_share share;
    int rc = mv_layout_share(vm->memory_bytes, vm->vcpu_count, id, &share, err);
    if (rc < 0) return rc;
    struct kvm_regs regs;
    boot_regs(id, &share, &regs);
    if (ioctl(fd, KVM_SET_REGS, &regs) != 0) return mv_fail_errno(err, errno, "KVM_SET_REGS (vcpu %u)", id);
  }
  return 0;
}

/* ---- The checker ----------------------------------------------------------- */

/* What one vCPU's registers say its pages and stats record must hold. */
typedef struct expectation {
  uint32_t seq;      /* EAX */
  uint32_t written;  /* pages [first, first + written) of the share hold seq, the rest seq - 1 */
  mv_stats_record stats;
} expectation;

/* 0, or -EBADMSG with the reason in why. */
static int expect(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, const struct kvm_regs *r, expectation *x,
                  char *why, size_t why_size) {
  mv_share share;
  mv_error e;
  if (mv_layout_share(memory_bytes, vcpus, id, &share, &e) < 0) {
    snprintf(why, why_size, "vcpu %u: %" PRIu64 " MiB have no share of pages for it", id, memory_bytes >> 20);
    return -EBADMSG;
  }
  const uint32_t esi = share.first * MV_PAGE_SIZE;
  const uint32_t edi = (share.first + share.count) * MV_PAGE_SIZE;
  const uint32_t ebx = MV_STATS_GPA + id * (uint32_t)sizeof(mv_stats_record);
  const uint32_t eax = (uint32_t)r->rax, ecx = (uint32_t)r->rcx;
  const int b = mv_guest_boundary(r->rip);
  if (b < 0) {
    snprintf(why, why_size, "vcpu %u: rip 0x%llx is not an instruction boundary of the guest program", id,
             (unsigned long long)r->rip);
    return -EBADMSG;
  }
  if ((uint32_t)r->rsi != esi || (uint32_t)r->rdi != edi || (uint32_t)r->rbx != ebx) {
    snprintf(why, why_size, "vcpu %u: esi/edi/ebx 0x%x/0x%x/0x%x, expected 0x%x/0x%x/0x%x", id, (uint32_t)r->rsi,
             (uint32_t)r->rdi, (uint32_t)r->rbx, esi, edi, ebx);
    return -EBADMSG;
  }
  int ecx_ok;
  if (b <= L4) {
    ecx_ok = ecx >= esi && ecx < edi;
  } else if (b <= L7) {
    ecx_ok = ecx > esi && ecx <= edi;
  } else if (b == L8) {
    ecx_ok = ecx == edi;
  } else {
    ecx_ok = ecx == esi;
  }
  if (!ecx_ok || ecx % MV_PAGE_SIZE != 0) {
    snprintf(why, why_size, "vcpu %u: ecx 0x%x does not fit rip 0x%llx (L%d) and the share 0x%x..0x%x", id, ecx,
             (unsigned long long)r->rip, b, esi, edi);
    return -EBADMSG;
  }
  x->seq = eax;
  x->written = (ecx - esi) / MV_PAGE_SIZE;
  if (b == L4) x->written += 1;
  if (b == L9) x->written = share.count;
  memset(&x->stats, 0, sizeof x->stats);
  x->stats.seq = b == L10 ? eax - 1 : eax;
  x->stats.cursor = ecx;
  if (b == L5) x->stats.cursor = ecx - MV_PAGE_SIZE;
  if (b == L9 || b == L10 || b == L11) x->stats.cursor = edi;
  return 0;
}

static void note_bad(mv_check_result *res, uint64_t gpa, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void note_bad(mv_check_result *res, uint64_t gpa, const char *fmt, ...) {
  if (res->bad_pages++ != 0) return;
  res->first_bad_gpa = gpa;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(res->first_bad, sizeof res->first_bad, fmt, ap);
  va_end(ap);
}

/* A header page must equal `want` (want_len bytes, then zeros). */
static void check_exact(const uint8_t *page, uint64_t gpa, const char *what, const void *want, size_t want_len,
                        mv_check_result *res) {
  const uint8_t *w = want;
  for (size_t i = 0; i < MV_PAGE_SIZE; ++i) {
    const uint8_t expected = i < want_len ? w[i] : 0;
    if (page[i] != expected) {
      note_bad(res, gpa, "gpa 0x%" PRIx64 " (%s) byte 0x%zx: expected 0x%02x, found 0x%02x", gpa, what, i, expected,
               page[i]);
      return;
    }
  }
}

int mv_check(const uint8_t *mem, uint64_t memory_bytes, uint32_t vcpus, const struct kvm_regs *regs,
             mv_check_result *res) {
  memset(res, 0, sizeof *res);
  if (vcpus == 0 || vcpus > MV_MAX_VCPUS || memory_bytes % MV_PAGE_SIZE != 0 || memory_bytes <= MV_DATA_GPA) {
    snprintf(res->first_bad, sizeof res->first_bad, "a layout of %u vCPUs and %" PRIu64 " bytes is not minivmm's",
             vcpus, memory_bytes);
    return -EBADMSG;
  }
  expectation x[MV_MAX_VCPUS];
  mv_stats_record stats[MV_MAX_VCPUS];
  for (uint32_t id = 0; id < vcpus; ++id) {
    if (expect(memory_bytes, vcpus, id, &regs[id], &x[id], res->first_bad, sizeof res->first_bad) < 0) {
      res->bad_pages = 1;
      return -EBADMSG;
    }
    stats[id] = x[id].stats;
  }

  check_exact(mem + MV_GDT_GPA, MV_GDT_GPA, "GDT", kGdt, sizeof kGdt, res);
  check_exact(mem + MV_CODE_GPA, MV_CODE_GPA, "program", kProgram, sizeof kProgram, res);
  check_exact(mem + MV_STATS_GPA, MV_STATS_GPA, "stats", stats, vcpus * sizeof stats[0], res);
  check_exact(mem + MV_TSS_GPA, MV_TSS_GPA, "TSS", NULL, 0, res);
  res->pages_checked = MV_DATA_GPA / MV_PAGE_SIZE;

  for (uint32_t id = 0; id < vcpus; ++id) {
    mv_share share;
    mv_error e;
    if (mv_layout_share(memory_bytes, vcpus, id, &share, &e) < 0) return -EBADMSG; /* checked by expect */
    for (uint32_t i = 0; i < share.count; ++i) {
      const uint32_t pn = share.first + i;
      const uint64_t gpa = (uint64_t)pn * MV_PAGE_SIZE;
      const uint8_t *page = mem + gpa;
      const uint32_t want_seq = i < x[id].written ? x[id].seq : x[id].seq - 1;
      uint32_t head[2];
      memcpy(head, page, sizeof head);
      res->pages_checked++;
      if (head[0] != want_seq || head[1] != pn) {
        note_bad(res, gpa, "gpa 0x%" PRIx64 " (vcpu %u page %u): expected seq %u page 0x%x, found seq %u page 0x%x%s",
                 gpa, id, i, want_seq, pn, head[0], head[1],
                 head[1] == pn && head[0] + 1 == want_seq ? " (stale: one pass behind)" : "");
        continue;
      }
      uint64_t fill[511];
      fill_page(pn, fill);
      if (memcmp(page + 8, fill, sizeof fill) != 0) {
        size_t off = 8;
        while (off < MV_PAGE_SIZE && page[off] == ((const uint8_t *)fill)[off - 8]) ++off;
        note_bad(res, gpa, "gpa 0x%" PRIx64 " (vcpu %u page %u) byte 0x%zx: expected 0x%02x, found 0x%02x", gpa, id,
                 i, off, ((const uint8_t *)fill)[off - 8], page[off]);
      }
    }
  }
  return res->bad_pages == 0 ? 0 : -EBADMSG;
}

int mv_check_vm(mv_vm *vm, struct kvm_regs *regs_out, mv_check_result *result, mv_error *err) {
  struct kvm_regs regs[MV_MAX_VCPUS];
  int rc = mv_vm_get_regs(vm, regs, err);
  if (rc < 0) return rc;
  if (regs_out != NULL) memcpy(regs_out, regs, vm->vcpu_count * sizeof regs[0]);
  rc = mv_check(vm->mem, vm->memory_bytes, vm->vcpu_count, regs, result);
  if (rc < 0) return mv_fail(err, rc, "%" PRIu64 " bad pages of %" PRIu64 ", first: %s", result->bad_pages,
                             result->pages_checked, result->first_bad);
  return 0;
}

uint64_t mv_progress(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, const struct kvm_regs *regs) {
  expectation x;
  char why[256];
  mv_share share;
  mv_error e;
  if (expect(memory_bytes, vcpus, id, regs, &x, why, sizeof why) < 0 ||
      mv_layout_share(memory_bytes, vcpus, id, &share, &e) < 0) {
    return 0;
  }
  return (uint64_t)(x.seq - 1) * share.count + x.written;
}

void mv_describe_position(uint64_t memory_bytes, uint32_t vcpus, uint32_t id, const struct kvm_regs *regs,
                          char *buf, size_t size) {
  const int b = mv_guest_boundary(regs->rip);
  snprintf(buf, size, "vcpu %u: seq %u cursor 0x%x at L%d, %" PRIu64 " pages stored", id, (uint32_t)regs->rax,
           (uint32_t)regs->rcx, b, mv_progress(memory_bytes, vcpus, id, regs));
}

void mv_print_positions(const char *prefix, const mv_vm *vm, const struct kvm_regs *regs) {
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    char line[160];
    mv_describe_position(vm->memory_bytes, vm->vcpu_count, i, &regs[i], line, sizeof line);
    printf("%s  %s\n", prefix, line);
  }
}

uint64_t mv_memory_digest(const uint8_t *mem, uint64_t memory_bytes) {
  uint64_t h = 0x6a09e667f3bcc908ull;
  for (uint64_t off = 0; off + 8 <= memory_bytes; off += 8) {
    uint64_t w;
    memcpy(&w, mem + off, sizeof w);
    h = (h ^ w) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return splitmix64(h ^ memory_bytes);
}
