// Model profiles (codec/profile.h) kept in kvcache beside the model's KV, so
// every worker of a model encodes with the same profile and any worker can
// decode a chunk whatever profile it names.
//
// A profile is stored as a chunk under ProfileKey(space, id), which its id
// (the SHA-256 of its content) names; a second chunk under
// CurrentProfileKey(space) holds the id of the profile the model's writers
// use now. Both keys are derived from the key space's namespace and model
// id, so tenants never share them. Fetched profiles are kept in memory, by
// id: they never change.
//
// Thread-safe.
#ifndef KVCACHE_CLIENT_PROFILE_STORE_H_
#define KVCACHE_CLIENT_PROFILE_STORE_H_

#include <map>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "client/chunk_key.h"
#include "client/chunk_store.h"
#include "codec/profile.h"

namespace kvcache {

ChunkKey ProfileKey(const KeySpace& space, const codec::ProfileId& id);
ChunkKey CurrentProfileKey(const KeySpace& space);

class ProfileStore {
 public:
  // `store` must outlive this object.
  ProfileStore(ChunkStore* store, KeySpace space)
      : store_(store), space_(std::move(space)) {}

  // Stores `profile` and makes it the model's current one.
  absl::Status Publish(const codec::ModelProfile& profile);

  // The model's current profile. NOT_FOUND if none was published (or it
  // was evicted).
  absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> Current();

  // The profile with this id, from memory or kvcache. NOT_FOUND if kvcache
  // does not hold it; DATA_LOSS if what it holds is not that profile.
  absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> Get(
      const codec::ProfileId& id);

 private:
  ChunkStore* store_;
  const KeySpace space_;
  absl::Mutex mu_;
  std::map<codec::ProfileId, std::shared_ptr<const codec::ModelProfile>> cache_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace kvcache

#endif  // KVCACHE_CLIENT_PROFILE_STORE_H_
