// A FileIo over a real one that can lose power, to test what a crash leaves
// on disk. It remembers every block written to each file since that file's
// last Sync, with the block's bytes as of that sync. CutPower() then tears
// each such block the way a device losing its volatile write cache may: the
// block keeps its new bytes, goes back to its old ones, or turns to garbage,
// at random. From then on every call fails with EIO, as on a dead device.
// The files themselves are real, so a tier reopened over them with a fresh
// FileIo sees exactly what survived.
//
// Writes and syncs are counted, and CutPowerAt(n) cuts the power during the
// n-th: that operation reaches the disk, then the power goes before it
// returns, so its caller sees it fail. For a write, what it wrote is torn
// with the rest; a sync is done (its writes stay).
//
// Offsets and lengths must be multiples of kBlockBytes, as for O_DIRECT.
// Thread-safe; calls are serialised, so the order in which writes and syncs
// reach the disk is the order they were called in.
#ifndef KVCACHE_KVSTORE_POWER_LOSS_FILE_IO_H_
#define KVCACHE_KVSTORE_POWER_LOSS_FILE_IO_H_

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "kvstore/file_io.h"

namespace kvcache::kvstore {

// What a power cut did to the blocks that were not synced.
struct TornBlocks {
  uint64_t kept = 0;      // the new bytes made it
  uint64_t reverted = 0;  // back to the bytes of the last sync
  uint64_t garbled = 0;   // neither
};

class PowerLossFileIo : public FileIo {
 public:
  // `disk` does the real I/O and must outlive this; `seed` picks how blocks
  // are torn.
  PowerLossFileIo(FileIo& disk, uint32_t seed) : disk_(disk), rng_(seed) {}

  absl::Status Read(
      int fd, uint64_t offset, char* buffer, uint64_t length,
      absl::FunctionRef<void(absl::string_view)> on_read) override;
  absl::Status Write(int fd, uint64_t offset, const char* buffer,
                     uint64_t length) override;
  absl::Status Sync(int fd) override;

  // Cuts the power during the `operation`-th write or sync, counting from 1
  // since this was made; 0 (the default): only when CutPower is called.
  void CutPowerAt(uint64_t operation);

  // Cuts the power now, if it is still on, tearing every unsynced block;
  // returns what the cut (now or earlier) did. An error means the disk
  // failed to take the torn blocks, so the simulation cannot be trusted.
  absl::StatusOr<TornBlocks> CutPower();

  bool powered() const;
  // Writes and syncs called so far, the failed ones included.
  uint64_t operations() const;

 private:
  // A block of a file: (fd, offset).
  using Block = std::pair<int, uint64_t>;

  void CutPowerLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts an operation; true if the power is to be cut in it.
  bool CountOperation() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  FileIo& disk_;
  mutable absl::Mutex mu_;
  std::mt19937 rng_ ABSL_GUARDED_BY(mu_);
  bool powered_ ABSL_GUARDED_BY(mu_) = true;
  uint64_t operations_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t cut_at_ ABSL_GUARDED_BY(mu_) = 0;
  // Blocks written since their file's last sync, with their bytes as of
  // that sync. Ordered, so that one seed always tears the same way.
  std::map<Block, std::string> unsynced_ ABSL_GUARDED_BY(mu_);
  TornBlocks torn_ ABSL_GUARDED_BY(mu_);
  absl::Status cut_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcache::kvstore

#endif  // KVCACHE_KVSTORE_POWER_LOSS_FILE_IO_H_
