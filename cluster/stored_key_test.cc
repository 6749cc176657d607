#include "cluster/stored_key.h"

#include "gtest/gtest.h"

namespace kvcache::cluster {
namespace {

const std::string kKey(32, 'k');

TEST(StoredKeyTest, NoNamespaceKeepsTheKey) {
  EXPECT_EQ(StoredKey("", kKey), kKey);
}

TEST(StoredKeyTest, NamespacesSeparateEqualKeys) {
  const std::string a = StoredKey("tenant/a", kKey);
  const std::string b = StoredKey("tenant/b", kKey);
  EXPECT_EQ(a.size(), 32u);
  EXPECT_NE(a, b);
  EXPECT_NE(a, kKey);
  EXPECT_EQ(a, StoredKey("tenant/a", kKey));
}

TEST(StoredKeyTest, NamespaceAndKeyCannotTradeBytes) {
  // The same bytes split differently between namespace and key.
  EXPECT_NE(StoredKey("tenant/ab", std::string(32, 'c')),
            StoredKey("tenant/a", "b" + std::string(31, 'c')));
}

}  // namespace
}  // namespace kvcache::cluster
