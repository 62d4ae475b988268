#include "buffer_pool.h"

namespace pmlmig::transport {

std::shared_ptr<BufferPool> BufferPool::Create(size_t buffer_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(buffer_bytes));
}

BufferPool::~BufferPool() {
  for (uint8_t* b : free_) delete[] b;
}

uint8_t* BufferPool::Get() {
  {
    std::lock_guard lock(mu_);
    if (!free_.empty()) {
      uint8_t* b = free_.back();
      free_.pop_back();
      return b;
    }
  }
  return new uint8_t[size_];
}

void BufferPool::Put(uint8_t* buf) {
  std::lock_guard lock(mu_);
  free_.push_back(buf);
}

BufferPool::Loan BufferPool::Lend(uint8_t* buf) {
  return Loan{&BufferPool::Release, new Ref{shared_from_this(), buf}};
}

void BufferPool::Release(void* p) {
  Ref* ref = static_cast<Ref*>(p);
  ref->pool->Put(ref->buf);
  delete ref;  // may drop the last reference to the pool
}

size_t BufferPool::free_count() const {
  std::lock_guard lock(mu_);
  return free_.size();
}

}  // namespace pmlmig::transport
