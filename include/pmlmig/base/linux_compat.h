// Kernel interfaces newer than the uapi headers this project builds against.
//
// Debian 12 ships Linux 6.1 uapi headers; asynchronous userfaultfd write
// protection (UFFD_FEATURE_WP_ASYNC) and the PAGEMAP_SCAN ioctl arrived in
// 6.7. The values below are the upstream uapi ones (ABI-stable); each is
// defined only when the installed headers lack it, so a build against newer
// headers uses the system definitions unchanged. In base/ so that the
// userspace tracker (engine/) and capability probing (vmm/) share one copy.
#pragma once

#include <linux/fs.h>
#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cerrno>

namespace pmlmig {
// ioctl(2), retried while a signal interrupts it (userfaultfd's ioctls can be).
inline int IoctlNoEintr(int fd, unsigned long request, void* arg) {
  int r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  return r;
}
}  // namespace pmlmig

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

// PAGEMAP_SCAN (Linux 6.7): an ioctl on /proc/<pid>/pagemap that walks a
// virtual range, reports runs of pages matching category masks into an
// array of page_region, and with PM_SCAN_WP_MATCHING write-protects (uffd-wp)
// every page it reports, under the page-table lock, in the same walk.
#ifndef PAGEMAP_SCAN
struct page_region {
  __u64 start;       // first byte of a run of pages with equal categories
  __u64 end;         // one past its last byte
  __u64 categories;  // PAGE_IS_* of the run, masked by return_mask
};

struct pm_scan_arg {
  __u64 size;                 // sizeof(struct pm_scan_arg); the kernel checks it
  __u64 flags;                // PM_SCAN_*
  __u64 start;                // range to walk, page aligned
  __u64 end;
  __u64 walk_end;             // out: where the walk stopped (== end when complete)
  __u64 vec;                  // struct page_region* output array
  __u64 vec_len;              // its capacity, in regions
  __u64 max_pages;            // stop after this many pages; 0: no limit
  __u64 category_inverted;    // categories to test for absence
  __u64 category_mask;        // all of these must match
  __u64 category_anyof_mask;  // at least one of these must match
  __u64 return_mask;          // categories reported in page_region
};

#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

namespace pmlmig::engine::linux_compat {

// /proc/<pid>/pagemap: one little-endian u64 per virtual page, at byte
// offset (address / page size) * 8 (Documentation/admin-guide/mm/pagemap.rst).
constexpr unsigned kPagemapEntryBytes = 8;
constexpr unsigned kPagemapSoftDirtyBit = 55;  // written since the last clear_refs "4"
constexpr unsigned kPagemapPresentBit = 63;

// Written to /proc/<pid>/clear_refs: clear the soft-dirty bits of every page
// of the process (all mappings, not only the tracked ones).
constexpr char kClearRefsSoftDirty[] = "4";

}  // namespace pmlmig::engine::linux_compat
