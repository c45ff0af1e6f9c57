// Socket helpers: telling a connection that reached a listener from one that reached itself.
#include "common/net.h"

#include <cerrno>
#include <gtest/gtest.h>
#include <netinet/in.h>

#include "common/strings.h"

namespace tcpx::net {
namespace {

// A socket bound to 127.0.0.1 on an ephemeral port, not listening.
Fd boundSocket(SockAddr* addr) {
  Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  auto any = resolve("127.0.0.1", 0);
  EXPECT_TRUE(any.isOk());
  *addr = any.value();
  EXPECT_EQ(::bind(fd.get(), addr->raw(), addr->len), 0) << errnoString(errno);
  socklen_t len = sizeof(addr->storage);
  EXPECT_EQ(getsockname(fd.get(), addr->raw(), &len), 0);
  addr->len = len;
  return fd;
}

// Connecting a socket to its own address is the TCP simultaneous open that a connect to a dead
// port of this host becomes when the kernel picks that port as the source: it succeeds, and the
// helper must see it for what it is.
TEST(Net, AConnectionToItselfIsToldApartFromOneToAListener) {
  SockAddr self;
  Fd looped = boundSocket(&self);
  ASSERT_EQ(::connect(looped.get(), self.raw(), self.len), 0) << errnoString(errno);
  EXPECT_TRUE(isConnectedToItself(looped.get()));
  const char byte = 'x';
  ASSERT_EQ(::send(looped.get(), &byte, 1, 0), 1);
  char back = 0;
  ASSERT_EQ(::recv(looped.get(), &back, 1, 0), 1);  // what it sends comes back
  EXPECT_EQ(back, 'x');

  auto loopback = resolve("127.0.0.1", 0);
  ASSERT_TRUE(loopback.isOk());
  SockAddr where = loopback.value();
  auto listener = listenTcp(&where, 4);
  ASSERT_TRUE(listener.isOk()) << listener.status().toString();
  Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_EQ(::connect(client.get(), where.raw(), where.len), 0) << errnoString(errno);
  EXPECT_FALSE(isConnectedToItself(client.get()));
  Fd accepted(::accept(listener->get(), nullptr, nullptr));
  ASSERT_TRUE(accepted.valid());
  EXPECT_FALSE(isConnectedToItself(accepted.get()));

  Fd unconnected(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_FALSE(isConnectedToItself(unconnected.get()));
}

}  // namespace
}  // namespace tcpx::net
