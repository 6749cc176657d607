#include "client/profile_store.h"

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace kvcache {
namespace {

// A key from the key space's tenant and model and a purpose, with no
// token ids: it can never equal a prompt chunk's key.
ChunkKey SpaceKey(const KeySpace& space, absl::string_view purpose) {
  std::string material;
  for (absl::string_view part : {absl::string_view("kvcache model profile"),
                                 absl::string_view(space.name_space),
                                 absl::string_view(space.model_id), purpose}) {
    absl::StrAppend(&material, part.size(), ":", part, ";");
  }
  return ContentKey(material);
}

absl::string_view IdBytes(const codec::ProfileId& id) {
  return absl::string_view(reinterpret_cast<const char*>(id.data()), id.size());
}

}  // namespace

ChunkKey ProfileKey(const KeySpace& space, const codec::ProfileId& id) {
  return SpaceKey(space, absl::StrCat("id ", codec::ProfileIdHex(id)));
}

ChunkKey CurrentProfileKey(const KeySpace& space) {
  return SpaceKey(space, "current");
}

absl::Status ProfileStore::Publish(const codec::ModelProfile& profile) {
  const std::string bytes = codec::SerializeProfile(profile);
  // The profile before the pointer to it, so a reader that finds the
  // pointer finds the profile.
  if (absl::Status st = store_->Put({{ProfileKey(space_, profile.id), bytes}});
      !st.ok()) {
    return st;
  }
  PutOptions replace;
  replace.replace = true;
  return store_->Put({{CurrentProfileKey(space_), IdBytes(profile.id)}},
                     replace);
}

absl::StatusOr<std::shared_ptr<const codec::ModelProfile>>
ProfileStore::Current() {
  const ChunkKey key = CurrentProfileKey(space_);
  absl::StatusOr<std::vector<FetchedChunk>> got = store_->Get({key});
  if (!got.ok()) return got.status();
  const std::string& bytes = got->front().bytes;
  codec::ProfileId id;
  if (bytes.size() != id.size()) {
    return absl::DataLossError(
        absl::StrCat("the current profile of ", space_.model_id, " is ",
                     bytes.size(), " bytes, not a profile id"));
  }
  std::copy(bytes.begin(), bytes.end(), id.begin());
  return Get(id);
}

absl::StatusOr<std::shared_ptr<const codec::ModelProfile>> ProfileStore::Get(
    const codec::ProfileId& id) {
  {
    absl::MutexLock lock(&mu_);
    if (auto it = cache_.find(id); it != cache_.end()) return it->second;
  }
  absl::StatusOr<std::vector<FetchedChunk>> got =
      store_->Get({ProfileKey(space_, id)});
  if (absl::IsNotFound(got.status())) {
    return absl::NotFoundError(absl::StrCat(
        "model profile ", codec::ProfileIdHex(id), " is not in kvcache"));
  }
  if (!got.ok()) return got.status();
  absl::StatusOr<codec::ModelProfile> profile =
      codec::ParseProfile(got->front().bytes);
  if (!profile.ok()) return profile.status();
  // The key names the content: anything else under it is damage.
  if (profile->id != id) {
    return absl::DataLossError(
        absl::StrCat("kvcache holds profile ", codec::ProfileIdHex(profile->id),
                     " under the key of ", codec::ProfileIdHex(id)));
  }
  auto shared =
      std::make_shared<const codec::ModelProfile>(*std::move(profile));
  absl::MutexLock lock(&mu_);
  return cache_.emplace(id, std::move(shared)).first->second;
}

}  // namespace kvcache
