// A plaintext channel on a TCP connection of its own, for tests of what a
// node does per connection (stream limits, lease owners, hostile clients):
// channels with equal arguments would otherwise share one connection.
#ifndef KVCACHE_TESTS_TESTING_OWN_CONNECTION_H_
#define KVCACHE_TESTS_TESTING_OWN_CONNECTION_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

namespace kvcache::testing {

inline std::shared_ptr<grpc::Channel> OwnConnection(
    const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(),
                                   args);
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TESTING_OWN_CONNECTION_H_
