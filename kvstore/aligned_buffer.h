// A heap buffer aligned for O_DIRECT I/O: its address and size are multiples
// of kBlockBytes, as the kernel requires for direct reads and writes.
//
// Not thread-safe; owned by one request at a time.
#ifndef KVCACHE_KVSTORE_ALIGNED_BUFFER_H_
#define KVCACHE_KVSTORE_ALIGNED_BUFFER_H_

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "kvstore/extent_allocator.h"

namespace kvcache::kvstore {

class AlignedBuffer {
 public:
  // At least `bytes` bytes, rounded up to whole blocks. Throws std::bad_alloc
  // like any other allocation if memory is exhausted.
  explicit AlignedBuffer(uint64_t bytes) : size_(RoundUpToBlock(bytes)) {
    void* memory = nullptr;
    if (posix_memalign(&memory, kBlockBytes, size_) != 0) {
      throw std::bad_alloc();
    }
    data_.reset(static_cast<char*>(memory));
  }

  char* data() { return data_.get(); }
  const char* data() const { return data_.get(); }
  uint64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  uint64_t size_;
  std::unique_ptr<char, Free> data_;
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_ALIGNED_BUFFER_H_
