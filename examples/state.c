/*
 * state.c: the vCPU state minivmm's save_state / load_state carry (opaque to
 * pmlmig). Little-endian, fixed-size fields, version 1:
 *
 *   header, 32 bytes
 *     u32 magic         0x5453564d ("MVST")
 *     u32 version       1
 *     u32 vcpu_count    1..64; must equal the loading VM's
 *     u32 record_size   464 (the record below)
 *     u64 memory_bytes  must equal the loading VM's
 *     u32 guest         1: the program of guest.c (its layout and registers)
 *     u32 reserved      0
 *   vcpu_count records, 464 bytes each
 *     u32 id            0, 1, ... in order
 *     u32 reserved      0
 *     struct kvm_regs   144 bytes, as KVM_GET_REGS fills it
 *     struct kvm_sregs  312 bytes, as KVM_GET_SREGS fills it
 *
 * That is the guest's whole architectural state: it takes no interrupts, uses
 * no FPU, MSRs or devices, and the VM has no irqchip. Load rejects (with the
 * reason) a wrong length, magic, version, guest, record size, vCPU count or
 * memory size, ids out of order and nonzero reserved fields, and applies
 * nothing unless every check passed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <string.h>
#include <sys/ioctl.h>

#include "minivmm.h"

#define MV_STATE_MAGIC 0x5453564du
#define MV_STATE_VERSION 1u
#define MV_STATE_GUEST 1u
#define MV_STATE_HEADER_SIZE 32u
#define MV_STATE_RECORD_SIZE (8u + 144u + 312u)

_Static_assert(sizeof(struct kvm_regs) == 144, "struct kvm_regs is part of the state format");
_Static_assert(sizeof(struct kvm_sregs) == 312, "struct kvm_sregs is part of the state format");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the format is little-endian, as x86 is");

size_t mv_state_size(uint32_t vcpus) { return MV_STATE_HEADER_SIZE + (size_t)vcpus * MV_STATE_RECORD_SIZE; }

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static uint64_t get64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

int mv_state_save(mv_vm *vm, void *buf, size_t capacity, size_t *length, mv_error *err) {
  const size_t need = mv_state_size(vm->vcpu_count);
  if (capacity < need) return mv_fail(err, -ENOSPC, "vCPU state: %zu bytes needed, %zu given", need, capacity);
  uint8_t *p = buf;
  memset(p, 0, need);
  put32(p + 0, MV_STATE_MAGIC);
  put32(p + 4, MV_STATE_VERSION);
  put32(p + 8, vm->vcpu_count);
  put32(p + 12, MV_STATE_RECORD_SIZE);
  put64(p + 16, vm->memory_bytes);
  put32(p + 24, MV_STATE_GUEST);
  for (uint32_t i = 0; i < vm->vcpu_count; ++i) {
    uint8_t *r = p + MV_STATE_HEADER_SIZE + (size_t)i * MV_STATE_RECORD_SIZE;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    if (ioctl(vm->vcpus[i].fd, KVM_GET_REGS, &regs) != 0) return mv_fail_errno(err, errno, "KVM_GET_REGS (vcpu %u)", i);
    if (ioctl(vm->vcpus[i].fd, KVM_GET_SREGS, &sregs) != 0) {
      return mv_fail_errno(err, errno, "KVM_GET_SREGS (vcpu %u)", i);
    }
    put32(r + 0, i);
    memcpy(r + 8, &regs, sizeof regs);
    memcpy(r + 8 + sizeof regs, &sregs, sizeof sregs);
  }
  *length = need;
  return 0;
}

int mv_state_load(mv_vm *vm, const void *buf, size_t length, mv_error *err) {
  const uint8_t *p = buf;
  if (length < MV_STATE_HEADER_SIZE) {
    return mv_fail(err, -EINVAL, "vCPU state: %zu bytes, shorter than its %u-byte header", length,
                   MV_STATE_HEADER_SIZE);
  }
  const uint32_t magic = get32(p), version = get32(p + 4), vcpus = get32(p + 8), record = get32(p + 12);
  const uint64_t memory = get64(p + 16);
  const uint32_t guest = get32(p + 24), reserved = get32(p + 28);
  if (magic != MV_STATE_MAGIC) {
    return mv_fail(err, -EINVAL, "vCPU state: magic 0x%08x, expected 0x%08x (not minivmm state)", magic,
                   MV_STATE_MAGIC);
  }
  if (version != MV_STATE_VERSION) {
    return mv_fail(err, -EPROTONOSUPPORT, "vCPU state: version %u, this minivmm reads version %u", version,
                   MV_STATE_VERSION);
  }
  if (guest != MV_STATE_GUEST || reserved != 0) {
    return mv_fail(err, -EINVAL, "vCPU state: guest %u reserved %u, expected guest %u reserved 0", guest, reserved,
                   MV_STATE_GUEST);
  }
  if (record != MV_STATE_RECORD_SIZE) {
    return mv_fail(err, -EINVAL, "vCPU state: record size %u, expected %u", record, MV_STATE_RECORD_SIZE);
  }
  if (vcpus != vm->vcpu_count) {
    return mv_fail(err, -EINVAL, "vCPU state: %u vCPUs, this VM has %u", vcpus, vm->vcpu_count);
  }
  if (memory != vm->memory_bytes) {
    return mv_fail(err, -EINVAL, "vCPU state: for %" PRIu64 " bytes of memory, this VM has %" PRIu64, memory,
                   vm->memory_bytes);
  }
  if (length != mv_state_size(vcpus)) {
    return mv_fail(err, -EINVAL, "vCPU state: %zu bytes, %u vCPUs need exactly %zu", length, vcpus,
                   mv_state_size(vcpus));
  }
  for (uint32_t i = 0; i < vcpus; ++i) {
    const uint8_t *r = p + MV_STATE_HEADER_SIZE + (size_t)i * MV_STATE_RECORD_SIZE;
    if (get32(r) != i || get32(r + 4) != 0) {
      return mv_fail(err, -EINVAL, "vCPU state: record %u has id %u reserved %u, expected id %u reserved 0", i,
                     get32(r), get32(r + 4), i);
    }
  }
  for (uint32_t i = 0; i < vcpus; ++i) {
    const uint8_t *r = p + MV_STATE_HEADER_SIZE + (size_t)i * MV_STATE_RECORD_SIZE;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    memcpy(&regs, r + 8, sizeof regs);
    memcpy(&sregs, r + 8 + sizeof regs, sizeof sregs);
    /* sregs first: KVM_SET_SREGS can change how KVM reads the registers' mode. */
    if (ioctl(vm->vcpus[i].fd, KVM_SET_SREGS, &sregs) != 0) {
      return mv_fail_errno(err, errno, "KVM_SET_SREGS (vcpu %u)", i);
    }
    if (ioctl(vm->vcpus[i].fd, KVM_SET_REGS, &regs) != 0) return mv_fail_errno(err, errno, "KVM_SET_REGS (vcpu %u)", i);
  }
  return 0;
}
