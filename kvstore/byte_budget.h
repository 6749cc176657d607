// A fixed allowance of bytes shared by many holders (Put streams buffering
// chunks): a holder reserves what it needs before allocating it, and gets a
// refusal instead of memory when the allowance is spent.
//
// Thread-safe.
#ifndef KVCACHE_KVSTORE_BYTE_BUDGET_H_
#define KVCACHE_KVSTORE_BYTE_BUDGET_H_

#include <atomic>
#include <cstdint>
#include <utility>

namespace kvcache::kvstore {

class ByteBudget {
 public:
  // Bytes held from a budget until destroyed or moved from.
  class Reservation {
   public:
    Reservation() = default;
    Reservation(Reservation&& other) noexcept
        : budget_(std::exchange(other.budget_, nullptr)),
          bytes_(std::exchange(other.bytes_, 0)) {}
    Reservation& operator=(Reservation&& other) noexcept {
      if (this != &other) {
        Reset();
        budget_ = std::exchange(other.budget_, nullptr);
        bytes_ = std::exchange(other.bytes_, 0);
      }
      return *this;
    }
    ~Reservation() { Reset(); }

    explicit operator bool() const { return budget_ != nullptr; }
    uint64_t bytes() const { return bytes_; }
    void Reset() {
      if (budget_ != nullptr) budget_->used_.fetch_sub(bytes_);
      budget_ = nullptr;
      bytes_ = 0;
    }

   private:
    friend class ByteBudget;
    Reservation(ByteBudget* budget, uint64_t bytes)
        : budget_(budget), bytes_(bytes) {}
    ByteBudget* budget_ = nullptr;
    uint64_t bytes_ = 0;
  };

  explicit ByteBudget(uint64_t capacity) : capacity_(capacity) {}
  ByteBudget(const ByteBudget&) = delete;
  ByteBudget& operator=(const ByteBudget&) = delete;

  // `bytes` out of the budget, or an empty reservation if they do not fit.
  Reservation TryReserve(uint64_t bytes) {
    uint64_t used = used_.load();
    do {
      if (bytes > capacity_ - used) return {};
    } while (!used_.compare_exchange_weak(used, used + bytes));
    return Reservation(this, bytes);
  }

  uint64_t capacity() const { return capacity_; }
  uint64_t used() const { return used_.load(); }

 private:
  const uint64_t capacity_;
  std::atomic<uint64_t> used_{0};
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_BYTE_BUDGET_H_
