// BufferPool: the sender's payload buffers, all of one size, reused from
// batch to batch. A data stream builds a batch's payload straight into a
// pooled buffer and lends it to gRPC (a slice made from Lend's release
// function and argument), which holds it until its bytes are on the socket,
// possibly after the write op completed and on any thread; the release
// gives it back. Every outstanding loan keeps the pool alive, so the pool is
// always held by a shared_ptr.
//
// Thread-safety: Get, Put and a loan's release from any thread; mu_ guards
// the free list only. Knows nothing of gRPC (tests/transport/
// transport_parts_test.cc runs it under ThreadSanitizer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace pmlmig::transport {

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // A buffer lent out: call release(arg) exactly once to give it back
  // (the shape of grpc::Slice's destroy callback and user data).
  struct Loan {
    void (*release)(void*);
    void* arg;
  };

  static std::shared_ptr<BufferPool> Create(size_t buffer_bytes);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  size_t size() const { return size_; }
  // A free buffer of size() bytes, or a new one.
  uint8_t* Get();
  // Gives back a buffer that was never lent.
  void Put(uint8_t* buf);
  // Lends `buf` (from Get) out; its release puts it back.
  Loan Lend(uint8_t* buf);
  // Buffers waiting in the free list (for tests).
  size_t free_count() const;

 private:
  explicit BufferPool(size_t size) : size_(size) {}
  struct Ref {
    std::shared_ptr<BufferPool> pool;
    uint8_t* buf;
  };
  static void Release(void* ref);

  const size_t size_;
  mutable std::mutex mu_;
  std::vector<uint8_t*> free_;  // guarded by mu_; owned
};

}  // namespace pmlmig::transport
