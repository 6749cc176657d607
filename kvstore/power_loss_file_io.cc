#include "kvstore/power_loss_file_io.h"

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kvstore/aligned_buffer.h"

namespace kvcache::kvstore {
namespace {

absl::Status Dead() { return absl::ErrnoToStatus(EIO, "power cut"); }

absl::Status Misaligned(uint64_t offset, uint64_t length) {
  return absl::InvalidArgumentError(
      absl::StrCat("offset ", offset, " and length ", length,
                   " must be multiples of ", kBlockBytes));
}

}  // namespace

absl::Status PowerLossFileIo::Read(
    int fd, uint64_t offset, char* buffer, uint64_t length,
    absl::FunctionRef<void(absl::string_view)> on_read) {
  absl::MutexLock lock(&mu_);
  if (!powered_) return Dead();
  return disk_.Read(fd, offset, buffer, length, on_read);
}

absl::Status PowerLossFileIo::Write(int fd, uint64_t offset, const char* buffer,
                                    uint64_t length) {
  absl::MutexLock lock(&mu_);
  if (!powered_) return Dead();
  if (offset % kBlockBytes != 0 || length % kBlockBytes != 0) {
    return Misaligned(offset, length);
  }
  // The bytes as of the last sync, for the blocks not written since.
  AlignedBuffer old(length);
  if (absl::Status s =
          disk_.Read(fd, offset, old.data(), length, [](absl::string_view) {});
      !s.ok()) {
    return s;
  }
  for (uint64_t at = 0; at < length; at += kBlockBytes) {
    unsynced_.try_emplace(Block{fd, offset + at}, old.data() + at, kBlockBytes);
  }
  absl::Status written = disk_.Write(fd, offset, buffer, length);
  if (CountOperation()) {
    CutPowerLocked();
    return Dead();
  }
  return written;
}

absl::Status PowerLossFileIo::Sync(int fd) {
  absl::MutexLock lock(&mu_);
  if (!powered_) return Dead();
  absl::Status synced = disk_.Sync(fd);
  if (synced.ok()) {
    unsynced_.erase(unsynced_.lower_bound(Block{fd, 0}),
                    unsynced_.lower_bound(Block{fd + 1, 0}));
  }
  if (CountOperation()) {
    CutPowerLocked();
    return Dead();
  }
  return synced;
}

void PowerLossFileIo::CutPowerAt(uint64_t operation) {
  absl::MutexLock lock(&mu_);
  cut_at_ = operation;
}

absl::StatusOr<TornBlocks> PowerLossFileIo::CutPower() {
  absl::MutexLock lock(&mu_);
  if (powered_) CutPowerLocked();
  if (!cut_status_.ok()) return cut_status_;
  return torn_;
}

bool PowerLossFileIo::powered() const {
  absl::MutexLock lock(&mu_);
  return powered_;
}

uint64_t PowerLossFileIo::operations() const {
  absl::MutexLock lock(&mu_);
  return operations_;
}

bool PowerLossFileIo::CountOperation() { return ++operations_ == cut_at_; }

void PowerLossFileIo::CutPowerLocked() {
  powered_ = false;
  AlignedBuffer block(kBlockBytes);
  for (const auto& [where, old_bytes] : unsynced_) {
    const auto [fd, offset] = where;
    switch (rng_() % 3) {
      case 0:
        ++torn_.kept;
        continue;
      case 1:
        ++torn_.reverted;
        std::memcpy(block.data(), old_bytes.data(), kBlockBytes);
        break;
      default:
        ++torn_.garbled;
        for (uint64_t i = 0; i < kBlockBytes; ++i) {
          block.data()[i] = static_cast<char>(rng_());
        }
    }
    cut_status_.Update(disk_.Write(fd, offset, block.data(), kBlockBytes));
  }
  unsynced_.clear();
}

}  // namespace kvcache::kvstore
