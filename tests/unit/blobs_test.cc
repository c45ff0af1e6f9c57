// Connection-info and memory-descriptor blobs: round trip, and clear errors for anything else.
#include "control/blobs.h"

#include <gtest/gtest.h>

namespace tcpx::control {
namespace {

TEST(Blobs, ConnectionInfoRoundTrips) {
  ConnInfo info{std::string(16, '\x01'), "node", "10.0.0.2", 4242, "socket", "boot-id"};
  auto d = decodeConnInfo(encodeConnInfo(info));
  ASSERT_TRUE(d.isOk()) << d.status().toString();
  EXPECT_EQ(d->uuid, info.uuid);
  EXPECT_EQ(d->name, "node");
  EXPECT_EQ(d->host, "10.0.0.2");
  EXPECT_EQ(d->port, 4242);
  EXPECT_EQ(d->transport, "socket");
  EXPECT_EQ(d->host_id, "boot-id");
}

TEST(Blobs, GarbageTruncatedOrForeignConnectionInfoIsInvalidArgument) {
  const std::string good = encodeConnInfo({std::string(16, 'u'), "n", "h", 1, "socket", "b"});
  EXPECT_EQ(decodeConnInfo("").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(decodeConnInfo("hello world, not a blob").status().code(),
            StatusCode::kInvalidArgument);
  for (size_t n = 0; n < good.size(); ++n) {
    EXPECT_EQ(decodeConnInfo(good.substr(0, n)).status().code(), StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(decodeConnInfo(good + "x").status().code(), StatusCode::kInvalidArgument);
  std::string other_version = good;
  other_version[4] = 9;
  const auto st = decodeConnInfo(other_version).status();
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("incompatible"), std::string::npos);
}

TEST(Blobs, MemoryDescriptorRoundTripsAndRejectsMalformedInput) {
  MemoryDescriptor m{std::string(16, 'o'), 99, 0x7f0000001000, 1 << 20, MemoryKind::kHost, -1};
  const std::string blob = encodeMemoryDescriptor(m);
  auto d = decodeMemoryDescriptor(blob);
  ASSERT_TRUE(d.isOk());
  EXPECT_EQ(d->id, 99u);
  EXPECT_EQ(d->base_addr, 0x7f0000001000u);
  EXPECT_EQ(d->length, 1u << 20);
  EXPECT_EQ(d->device, -1);
  for (size_t n = 0; n < blob.size(); ++n) {
    EXPECT_FALSE(decodeMemoryDescriptor(blob.substr(0, n)).isOk());
  }
  m.id = 0;
  EXPECT_FALSE(decodeMemoryDescriptor(encodeMemoryDescriptor(m)).isOk());
  m.id = 1;
  m.kind = static_cast<MemoryKind>(7);
  EXPECT_FALSE(decodeMemoryDescriptor(encodeMemoryDescriptor(m)).isOk());
}

}  // namespace
}  // namespace tcpx::control
