#include "populate_ahead.h"

#include <sys/mman.h>

#include <algorithm>

namespace pmlmig::transport {

PopulateAhead::PopulateAhead(const engine::SlotTable& memory, uint32_t threads, uint64_t lookahead_bytes)
    : memory_(memory), lookahead_(lookahead_bytes) {
  size_t chunks = 0;
  for (const engine::MemorySlot& s : memory_.slots()) {
    first_chunk_.push_back(chunks);
    chunks += (s.size + kChunkBytes - 1) / kChunkBytes;
  }
  claimed_ = std::make_unique<std::atomic<bool>[]>(chunks);
  for (size_t i = 0; i < chunks; ++i) claimed_[i].store(false, std::memory_order_relaxed);
  for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
}

void PopulateAhead::Ahead(uint64_t gpa, uint64_t bytes) {
  if (stopped_.load(std::memory_order_relaxed)) return;
  const std::span<const engine::MemorySlot> slots = memory_.slots();  // sorted by gpa
  // The slot holding gpa; when gpa is a slot's end, the next slot up (data
  // goes out in guest-physical order).
  const engine::MemorySlot* found = memory_.FindByGpa(gpa);
  if (found == nullptr && gpa > 0) {
    found = memory_.FindByGpa(gpa - 1);
    if (found != nullptr) found = found + 1 < slots.data() + slots.size() ? found + 1 : nullptr;
  }
  if (found == nullptr) return;
  const size_t i = static_cast<size_t>(found - slots.data());
  const engine::MemorySlot& s = slots[i];
  const uint64_t from = std::max(gpa, s.gpa) - s.gpa;
  const uint64_t to = std::min(s.size, from + std::min(lookahead_, std::max(kChunkBytes, 4 * bytes)));
  std::vector<Chunk> fresh;
  for (uint64_t c = from / kChunkBytes; c * kChunkBytes < to; ++c) {
    if (claimed_[first_chunk_[i] + c].exchange(true, std::memory_order_relaxed)) continue;
    const uint64_t off = c * kChunkBytes;
    fresh.push_back({s.host + off, std::min(kChunkBytes, s.size - off)});
  }
  if (fresh.empty()) return;
  {
    std::lock_guard lock(mu_);
    if (stop_) return;
    queue_.insert(queue_.end(), fresh.begin(), fresh.end());
  }
  cv_.notify_all();
}

void PopulateAhead::Stop() {
  stopped_.store(true, std::memory_order_relaxed);
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    queue_.clear();
  }
  cv_.notify_all();
  std::lock_guard join(join_mu_);
  for (std::thread& t : workers_) {
    if (t.joinable()) t.join();
  }
}

void PopulateAhead::Work() {
  for (;;) {
    Chunk c;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      c = queue_.front();
      queue_.pop_front();
    }
    // Best effort: a kernel without MADV_POPULATE_WRITE (before 5.14)
    // refuses it, and the streams fault the pages in themselves.
    if (::madvise(c.host, c.len, MADV_POPULATE_WRITE) == 0) {
      populated_.fetch_add(c.len, std::memory_order_relaxed);
    } else {
      stopped_.store(true, std::memory_order_relaxed);
    }
  }
}

}  // namespace pmlmig::transport
