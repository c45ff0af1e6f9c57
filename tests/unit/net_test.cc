// Socket helpers: telling a connection that reached a listener from one that reached itself, and
// finding the other end of a local connection.
#include "common/net.h"

#include <unistd.h>

#include <cerrno>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <string>
#include <sys/socket.h>
#include <sys/stat.h>

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

// The other end of a local connection is found with its owner and inode, for a plain IPv4
// connection and for one accepted by a dual-stack IPv6 listener (that end is an IPv4-mapped
// address listed in tcp6, while the connecting IPv4 socket is listed in tcp).
TEST(Net, TheOtherEndOfALocalConnectionIsFoundByItsInode) {
  for (const char* listen_host : {"127.0.0.1", "::"}) {
    SCOPED_TRACE(listen_host);
    auto addr = resolve(listen_host, 0);
    ASSERT_TRUE(addr.isOk());
    auto listener = listenTcp(&addr.value(), 4);
    if (!listener.isOk() && std::string(listen_host) == "::") {
      GTEST_SKIP() << "no IPv6 here: " << listener.status().toString();
    }
    ASSERT_TRUE(listener.isOk()) << listener.status().toString();
    auto target = resolve("127.0.0.1", addr->port());
    ASSERT_TRUE(target.isOk());
    Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::connect(client.get(), target->raw(), target->len), 0) << errnoString(errno);
    Fd accepted(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
    ASSERT_TRUE(accepted.valid()) << errnoString(errno);
    struct stat client_stat {};
    struct stat accepted_stat {};
    ASSERT_EQ(fstat(client.get(), &client_stat), 0);
    ASSERT_EQ(fstat(accepted.get(), &accepted_stat), 0);
    auto from_accepted = localPeerSocket(accepted.get());
    ASSERT_TRUE(from_accepted.isOk()) << from_accepted.status().toString();
    EXPECT_EQ(from_accepted->inode, client_stat.st_ino);
    EXPECT_EQ(from_accepted->uid, ::geteuid());
    auto from_client = localPeerSocket(client.get());
    ASSERT_TRUE(from_client.isOk()) << from_client.status().toString();
    EXPECT_EQ(from_client->inode, accepted_stat.st_ino);
  }
}

}  // namespace
}  // namespace tcpx::net
