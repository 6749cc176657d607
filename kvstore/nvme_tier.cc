#include "kvstore/nvme_tier.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "codec/crc32c.h"
#include "kvstore/aligned_buffer.h"
#include "kvstore/codec_summary.h"

namespace kvcache::kvstore {
namespace {

// Access times reach the index once this many chunks were read, at the
// first read this long after the last batch, and at shutdown. An index write
// in every read, under the tier's lock, cost 4-14% of read throughput on
// 64-256 KiB chunks (docs/BENCHMARKS.md).
constexpr size_t kAccessBatch = 1024;
constexpr absl::Duration kAccessBatchInterval = absl::Seconds(1);

std::string KeyPrefix(absl::string_view key) {
  return absl::BytesToHexString(key.substr(0, 8));
}

int64_t ToUnixMillisOrZero(absl::Time t) {
  return t == absl::InfinitePast() ? 0 : absl::ToUnixMillis(t);
}

absl::Time FromUnixMillisOrPast(int64_t ms) {
  return ms == 0 ? absl::InfinitePast() : absl::FromUnixMillis(ms);
}

}  // namespace

NvmeTier::NvmeTier(const NvmeTierOptions& options, Clock clock)
    : options_(options),
      clock_(clock ? std::move(clock) : Clock([] { return absl::Now(); })),
      allocator_(std::make_unique<ExtentAllocator>(options.slab_count,
                                                   options.slab_bytes)),
      order_(options.quotas) {}

NvmeTier::~NvmeTier() {
  {
    absl::ReleasableMutexLock lock(&mu_);
    SaveAccessTimes(lock);
  }
  {
    // Leases in the map free into the allocator; release them first.
    absl::MutexLock lock(&mu_);
    entries_.clear();
  }
  for (int fd : slab_fds_) close(fd);
}

absl::StatusOr<std::unique_ptr<NvmeTier>> NvmeTier::Open(
    const NvmeTierOptions& options, Clock clock) {
  if (options.data_dir.empty()) {
    return absl::InvalidArgumentError("nvme_tier.data_dir is empty");
  }
  if (options.slab_bytes == 0 || options.slab_bytes % kBlockBytes != 0 ||
      options.slab_count == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("nvme_tier.slab_bytes must be a positive multiple of ",
                     kBlockBytes, " and slab_count > 0"));
  }
  std::error_code error;
  std::filesystem::create_directories(options.data_dir, error);
  if (error) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create nvme_tier.data_dir ", options.data_dir,
                     ": ", error.message()));
  }
  std::unique_ptr<NvmeTier> tier(new NvmeTier(options, std::move(clock)));
  if (absl::Status s = tier->OpenSlabs(); !s.ok()) return s;
  tier->io_ = options.file_io;
  if (tier->io_ == nullptr) {
    UringOptions uring;
    uring.queue_depth = std::max<uint32_t>(1, options.queue_depth);
    absl::StatusOr<std::unique_ptr<UringFileIo>> io =
        UringFileIo::Create(uring);
    if (!io.ok()) return io.status();
    tier->own_io_ = std::move(*io);
    tier->io_ = tier->own_io_.get();
  }
  absl::StatusOr<std::unique_ptr<ChunkIndex>> index =
      ChunkIndex::Open(options.data_dir + "/index");
  if (!index.ok()) return index.status();
  tier->index_ = std::move(*index);
  if (absl::Status s = tier->LoadIndex(); !s.ok()) return s;
  return tier;
}

absl::Status NvmeTier::OpenSlabs() {
  for (uint32_t i = 0; i < options_.slab_count; ++i) {
    const std::string path =
        absl::StrFormat("%s/slab-%03d", options_.data_dir, i);
    const int fd =
        open(path.c_str(), O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EINVAL) {
      return absl::FailedPreconditionError(absl::StrCat(
          "nvme_tier.data_dir ", options_.data_dir,
          " does not support O_DIRECT (tmpfs or a network filesystem?); put "
          "it on a local disk filesystem such as ext4 or xfs"));
    }
    if (fd < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot open slab ", path, ": ", std::strerror(errno)));
    }
    slab_fds_.push_back(fd);
    // Reserve the blocks now, so running out of disk shows at start-up and
    // not as a failed write later.
    const int rc = posix_fallocate(fd, 0, options_.slab_bytes);
    if (rc == ENOSPC) {
      return absl::ResourceExhaustedError(
          absl::StrCat("no disk space to preallocate slab ", path, " of ",
                       options_.slab_bytes,
                       " bytes; lower nvme_tier.slab_bytes or slab_count"));
    }
    if (rc != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot preallocate slab ", path, ": ", std::strerror(rc)));
    }
  }
  return absl::OkStatus();
}

absl::Status NvmeTier::LoadIndex() {
  struct Loaded {
    std::string key;
    IndexRecord record;
  };
  std::vector<Loaded> loaded;
  std::vector<std::string> dropped;
  absl::Status scan = index_->ForEach(
      [&](absl::string_view key, const absl::StatusOr<IndexRecord>& record) {
        if (!record.ok()) {
          std::fprintf(
              stderr, "kvcached: nvme tier: dropping chunk %s...: %s\n",
              KeyPrefix(key).c_str(), record.status().ToString().c_str());
          dropped.emplace_back(key);
          return;
        }
        loaded.push_back(Loaded{std::string(key), *record});
      });
  if (!scan.ok()) return scan;
  // Rebuild recency from the recorded access times, oldest first.
  std::sort(loaded.begin(), loaded.end(), [](const Loaded& a, const Loaded& b) {
    return a.record.last_access_unix_ms < b.record.last_access_unix_ms;
  });
  absl::MutexLock lock(&mu_);
  for (Loaded& chunk : loaded) {
    if (absl::Status s = allocator_->Claim(chunk.record.extent); !s.ok()) {
      std::fprintf(stderr, "kvcached: nvme tier: dropping chunk %s...: %s\n",
                   KeyPrefix(chunk.key).c_str(), s.ToString().c_str());
      dropped.push_back(std::move(chunk.key));
      continue;
    }
    Entry entry;
    entry.extent = Lease(chunk.record.extent);
    entry.size_bytes = chunk.record.size_bytes;
    entry.crc32c = chunk.record.crc32c;
    entry.pin_expiry = FromUnixMillisOrPast(chunk.record.pin_expiry_unix_ms);
    entry.last_access = absl::FromUnixMillis(chunk.record.last_access_unix_ms);
    entry.parent_key = std::move(chunk.record.parent_key);
    entry.codec = chunk.record.codec;
    entry.owner = std::move(chunk.record.owner);
    links_.Add(chunk.key, entry.parent_key);
    entry.place = order_.Add(chunk.key, entry.owner, entry.size_bytes);
    stored_bytes_ += entry.size_bytes;
    entries_.emplace(std::move(chunk.key), std::move(entry));
  }
  corrupt_chunks_ += dropped.size();
  std::fprintf(stderr,
               "kvcached: nvme tier: %s holds %zu chunks (%llu bytes); "
               "dropped %zu bad index records\n",
               options_.data_dir.c_str(), entries_.size(),
               static_cast<unsigned long long>(stored_bytes_), dropped.size());
  return DeleteRecords(dropped);
}

NvmeTier::ExtentLease NvmeTier::Lease(const Extent& extent) {
  ExtentAllocator* allocator = allocator_.get();
  return ExtentLease(new Extent(extent), [allocator](const Extent* e) {
    allocator->Free(*e);
    delete e;
  });
}

bool NvmeTier::IsPinned(const Entry& entry) const {
  return entry.pin_expiry > clock_();
}

ChunkRef NvmeTier::RefOf(const Entry& entry) const {
  ChunkRef ref;
  ref.size_bytes = entry.size_bytes;
  ref.crc32c = entry.crc32c;
  ref.pinned = IsPinned(entry);
  ref.pin_expiry = ref.pinned ? entry.pin_expiry : absl::InfinitePast();
  ref.parent_key = entry.parent_key;
  ref.codec = entry.codec;
  ref.owner = entry.owner;
  return ref;
}

IndexRecord NvmeTier::RecordOf(const Entry& entry) const {
  IndexRecord record;
  record.extent = *entry.extent;
  record.size_bytes = entry.size_bytes;
  record.crc32c = entry.crc32c;
  record.last_access_unix_ms = absl::ToUnixMillis(entry.last_access);
  record.pin_expiry_unix_ms = ToUnixMillisOrZero(entry.pin_expiry);
  record.parent_key = entry.parent_key;
  record.codec = entry.codec;
  record.owner = entry.owner;
  return record;
}

NvmeTier::ExtentLease NvmeTier::Unlink(EntryMap::iterator it) {
  ExtentLease extent = std::move(it->second.extent);
  links_.Remove(it->first, it->second.parent_key);
  stored_bytes_ -= it->second.size_bytes;
  order_.Remove(it->second.place, it->second.size_bytes);
  entries_.erase(it);
  return extent;
}

uint64_t NvmeTier::TakeVictim(const std::string& key, bool leaves_only,
                              std::vector<std::string>* victims,
                              std::vector<ExtentLease>* freed) {
  auto it = entries_.find(key);
  if (IsPinned(it->second) || (leaves_only && links_.Extended(it->first))) {
    return 0;
  }
  const uint64_t length = it->second.extent->length;
  victims->push_back(it->first);
  freed->push_back(Unlink(it));
  return length;
}

absl::StatusOr<bool> NvmeTier::DropVictims(
    absl::Span<const std::string> victims) {
  if (victims.empty()) return false;
  // The records go before the extents can be reused: the callers let go of
  // them only after this returns.
  if (absl::Status s = DeleteRecords(victims); !s.ok()) return s;
  evictions_ += victims.size();
  return true;
}

absl::StatusOr<bool> NvmeTier::EvictFor(uint64_t bytes,
                                        absl::string_view owner) {
  std::vector<std::string> victims;
  std::vector<ExtentLease> freed;
  absl::MutexLock lock(&mu_);
  uint64_t reclaimed = 0;
  order_.OfferForRoom(owner, [&](const std::string& key, bool leaves_only) {
    reclaimed += TakeVictim(key, leaves_only, &victims, &freed);
    return reclaimed < bytes;
  });
  return DropVictims(victims);
}

uint64_t NvmeTier::OverQuota(absl::string_view owner, uint64_t size,
                             absl::string_view key) const {
  auto old = entries_.find(key);
  const bool replaces_own = old != entries_.end() && old->second.owner == owner;
  return order_.OverQuota(owner, size,
                          replaces_own ? old->second.size_bytes : 0);
}

absl::Status NvmeTier::EvictToQuota(absl::string_view owner, uint64_t size,
                                    absl::string_view key) {
  std::vector<std::string> victims;
  std::vector<ExtentLease> freed;
  absl::MutexLock lock(&mu_);
  if (OverQuota(owner, size, key) == 0) return absl::OkStatus();
  const uint64_t quota = order_.quota(owner);
  uint64_t pinned = 0;
  // Every chunk is offered twice (leaves first, then all): count it once.
  order_.OfferOwn(owner, [&](const std::string& held, bool leaves_only) {
    const Entry& entry = entries_.find(held)->second;
    if (!leaves_only && held != key && IsPinned(entry)) {
      pinned += entry.size_bytes;
    }
    return true;
  });
  if (pinned + size > quota) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant ", owner, "'s chunk of ", size,
        " bytes does not fit its nvme_quota_bytes of ", quota,
        " bytes in the NVMe tier: ",
        size > quota ? "it is larger than the quota"
                     : absl::StrCat(pinned,
                                    " bytes of its chunks are pinned; "
                                    "unpin sessions"),
        " or raise access.tenants.nvme_quota_bytes"));
  }
  order_.OfferOwn(owner, [&](const std::string& held, bool leaves_only) {
    TakeVictim(held, leaves_only, &victims, &freed);
    return OverQuota(owner, size, key) > 0;
  });
  return DropVictims(victims).status();
}

absl::StatusOr<NvmeTier::ExtentLease> NvmeTier::MakeRoom(
    uint64_t bytes, absl::string_view owner) {
  const uint64_t length = RoundUpToBlock(bytes);
  if (length > options_.slab_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "chunk of ", bytes, " bytes is larger than an NVMe slab (",
        options_.slab_bytes, " bytes); raise nvme_tier.slab_bytes"));
  }
  while (true) {
    absl::StatusOr<Extent> extent = allocator_->Allocate(length);
    if (extent.ok()) return Lease(*extent);
    // Evict for the missing bytes; if fragmentation still leaves no run long
    // enough, the next round evicts more.
    const uint64_t free_bytes =
        allocator_->capacity_bytes() - allocator_->used_bytes();
    absl::StatusOr<bool> evicted = EvictFor(
        length > free_bytes ? length - free_bytes : kBlockBytes, owner);
    if (!evicted.ok()) return evicted.status();
    if (!*evicted) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "NVMe tier full: no room for a chunk of ", bytes, " bytes; ",
          allocator_->used_bytes(), " of ", allocator_->capacity_bytes(),
          " bytes are pinned, being read, or other tenants' within their "
          "quotas; unpin sessions or add NVMe "
          "slabs (nvme_tier.slab_count)"));
    }
  }
}

absl::Status NvmeTier::WriteDurably(const Extent& extent,
                                    absl::string_view bytes) {
  AlignedBuffer buffer(extent.length);
  std::memcpy(buffer.data(), bytes.data(), bytes.size());
  // Zero the tail of the last block so no stale heap bytes reach the disk.
  std::memset(buffer.data() + bytes.size(), 0, extent.length - bytes.size());
  const int fd = slab_fds_[extent.slab];
  if (absl::Status s =
          io_->Write(fd, extent.offset, buffer.data(), extent.length);
      !s.ok()) {
    return s;
  }
  // O_DIRECT bypasses the page cache but not the device's cache, and the
  // first write into preallocated blocks changes file metadata.
  if (absl::Status s = io_->Sync(fd); !s.ok()) {
    return absl::Status(s.code(),
                        absl::StrFormat("%s of %s/slab-%03d", s.message(),
                                        options_.data_dir, extent.slab));
  }
  return absl::OkStatus();
}

absl::Status NvmeTier::Put(absl::string_view key, absl::string_view bytes,
                           uint32_t crc32c, absl::Time pin_expiry,
                           absl::string_view parent_key,
                           absl::string_view owner) {
  if (absl::Status s = EvictToQuota(owner, bytes.size(), key); !s.ok()) {
    return s;
  }
  absl::StatusOr<ExtentLease> extent = MakeRoom(bytes.size(), owner);
  if (!extent.ok()) return extent.status();
  if (absl::Status s = WriteDurably(**extent, bytes); !s.ok()) return s;

  Entry entry;
  entry.extent = std::move(*extent);
  entry.size_bytes = bytes.size();
  entry.crc32c = crc32c;
  entry.last_access = clock_();
  entry.parent_key = std::string(parent_key);
  entry.codec = SummarizeChunk(bytes);
  entry.owner = std::string(owner);
  ExtentLease replaced;
  absl::MutexLock lock(&mu_);
  auto old = entries_.find(key);
  // A replacement keeps a live pin: the session still owns the key.
  if (old != entries_.end() && IsPinned(old->second)) {
    entry.pin_expiry = old->second.pin_expiry;
  }
  entry.pin_expiry = std::max(entry.pin_expiry, pin_expiry);
  // The map changes only once the record is durable, so a failed write
  // leaves the old chunk in place in both.
  if (absl::Status s = WriteRecord(key, entry); !s.ok()) return s;
  if (old != entries_.end()) replaced = Unlink(old);
  links_.Add(key, entry.parent_key);
  std::string stored_key(key);
  entry.place = order_.Add(stored_key, entry.owner, entry.size_bytes);
  stored_bytes_ += entry.size_bytes;
  entries_.emplace(std::move(stored_key), std::move(entry));
  return absl::OkStatus();
}

void NvmeTier::DropCorrupt(absl::string_view key, const ExtentLease& extent,
                           absl::string_view why) {
  std::fprintf(stderr,
               "kvcached: nvme tier: chunk %s... at slab %u offset %llu is "
               "damaged (%s); dropped\n",
               KeyPrefix(key).c_str(), extent->slab,
               static_cast<unsigned long long>(extent->offset),
               std::string(why).c_str());
  absl::MutexLock lock(&mu_);
  ++corrupt_chunks_;
  auto it = entries_.find(key);
  // Only if the key still names the damaged copy, not a newer Put.
  if (it == entries_.end() || it->second.extent != extent) return;
  Unlink(it);
  const std::string keys[] = {std::string(key)};
  if (absl::Status s = DeleteRecords(keys); !s.ok()) {
    std::fprintf(stderr, "kvcached: nvme tier: %s\n", s.ToString().c_str());
  }
}

absl::StatusOr<ChunkRef> NvmeTier::Get(absl::string_view key) {
  ExtentLease extent;
  ChunkRef ref;
  {
    absl::ReleasableMutexLock lock(&mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) return absl::NotFoundError("chunk not on NVMe");
    Entry& entry = it->second;
    order_.Touch(entry.place);
    entry.last_access = clock_();
    extent = entry.extent;
    ref = RefOf(entry);
    unsaved_accesses_.insert_or_assign(key, RecordOf(entry));
    if (unsaved_accesses_.size() >= kAccessBatch ||
        entry.last_access - accesses_saved_at_ >= kAccessBatchInterval) {
      SaveAccessTimes(lock);
    }
  }
  auto buffer = std::make_shared<AlignedBuffer>(extent->length);
  // Checksummed piece by piece while the rest of the chunk is still being
  // read; the extent's last block is padding.
  uint32_t crc = 0;
  uint64_t checked = 0;
  absl::Status read =
      io_->Read(slab_fds_[extent->slab], extent->offset, buffer->data(),
                extent->length, [&](absl::string_view piece) {
                  piece = piece.substr(0, ref.size_bytes - checked);
                  crc = codec::Crc32cExtend(crc, piece.data(), piece.size());
                  checked += piece.size();
                });
  if (read.code() == absl::StatusCode::kDataLoss) {
    DropCorrupt(key, extent, read.message());
    return read;
  }
  if (!read.ok()) return read;
  if (crc != ref.crc32c) {
    const std::string why =
        absl::StrCat("CRC32C ", crc, " != recorded ", ref.crc32c);
    DropCorrupt(key, extent, why);
    return absl::DataLossError(
        absl::StrCat("chunk ", KeyPrefix(key), "... is damaged on NVMe (", why,
                     "); it was dropped, store it again"));
  }
  // The reader holds the read buffer itself: no copy.
  ref.data = std::shared_ptr<const char>(buffer, buffer->data());
  return ref;
}

absl::Status NvmeTier::WriteRecord(absl::string_view key, const Entry& entry) {
  unsaved_accesses_.erase(key);
  absl::MutexLock index_lock(&index_mu_);
  return index_->Put(key, RecordOf(entry), /*sync=*/true);
}

absl::Status NvmeTier::DeleteRecords(absl::Span<const std::string> keys) {
  for (const std::string& key : keys) unsaved_accesses_.erase(key);
  absl::MutexLock index_lock(&index_mu_);
  return index_->Delete(keys);
}

void NvmeTier::SaveAccessTimes(absl::ReleasableMutexLock& lock) {
  absl::flat_hash_map<std::string, IndexRecord> records;
  records.swap(unsaved_accesses_);
  accesses_saved_at_ = clock_();
  if (records.empty()) {
    lock.Release();
    return;
  }
  // Reads go on while the batch is written; index_mu_, taken before mu_ is
  // let go, keeps any later record of these keys from landing first.
  absl::MutexLock index_lock(&index_mu_);
  lock.Release();
  // Unsynced, and dropped on failure: a lost access time only blurs
  // recency after a restart, and must not fail reads.
  if (absl::Status s = index_->PutAll(records, /*sync=*/false); !s.ok()) {
    std::fprintf(stderr, "kvcached: nvme tier: access times not saved: %s\n",
                 s.ToString().c_str());
  }
}

absl::StatusOr<ChunkRef> NvmeTier::Peek(absl::string_view key) const {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not on NVMe");
  return RefOf(it->second);
}

bool NvmeTier::Contains(absl::string_view key) const {
  absl::MutexLock lock(&mu_);
  return entries_.contains(key);
}

absl::StatusOr<bool> NvmeTier::Delete(absl::string_view key) {
  ExtentLease freed;
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return false;
  freed = Unlink(it);
  const std::string keys[] = {std::string(key)};
  if (absl::Status s = DeleteRecords(keys); !s.ok()) return s;
  return true;
}

absl::StatusOr<absl::Time> NvmeTier::Pin(absl::string_view key,
                                         absl::Duration ttl) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not on NVMe");
  Entry& entry = it->second;
  const absl::Time until = clock_() + ttl;
  entry.pin_expiry =
      IsPinned(entry) ? std::max(entry.pin_expiry, until) : until;
  if (absl::Status s = WriteRecord(key, entry); !s.ok()) return s;
  return entry.pin_expiry;
}

absl::Status NvmeTier::Unpin(absl::string_view key) {
  absl::MutexLock lock(&mu_);
  auto it = entries_.find(key);
  if (it == entries_.end()) return absl::NotFoundError("chunk not on NVMe");
  it->second.pin_expiry = absl::InfinitePast();
  return WriteRecord(key, it->second);
}

std::vector<std::string> NvmeTier::Keys() const {
  absl::MutexLock lock(&mu_);
  return std::vector<std::string>(order_.all().begin(), order_.all().end());
}

TierUsage NvmeTier::Usage() const {
  absl::MutexLock lock(&mu_);
  TierUsage usage;
  usage.used_bytes = allocator_->used_bytes();
  usage.capacity_bytes = allocator_->capacity_bytes();
  usage.chunks = entries_.size();
  usage.evictions = evictions_;
  usage.corrupt_chunks = corrupt_chunks_;
  for (const auto& [key, entry] : entries_) {
    if (IsPinned(entry)) ++usage.pinned_chunks;
  }
  usage.owners = order_.Usage();
  return usage;
}

}  // namespace kvcache::kvstore
