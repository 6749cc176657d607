// main() of the GPU test binaries that start a kvcached: they take the
// daemon's path as --kvcached=PATH (tests/gpu/run.sh passes it).
#include <gtest/gtest.h>

#include "tests/testing/fetch_fixture.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  kvcache::testing::FetchFixture::ReadDaemonFlag(argc, argv);
  return RUN_ALL_TESTS();
}
