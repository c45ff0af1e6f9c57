// Bounds-checked little-endian encoding for wire formats.
//
// ByteReader never reads past its input: any short read sets a sticky failure flag and returns
// zeros, so a parser can decode a whole structure and check ok() once at the end.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace tcpx {

class ByteWriter {
 public:
  explicit ByteWriter(std::vector<uint8_t>* out) : out_(out) {}

  void u8(uint8_t v) { out_->push_back(v); }
  void u16(uint16_t v) { put(v); }
  void u32(uint32_t v) { put(v); }
  void u64(uint64_t v) { put(v); }
  void bytes(const void* data, size_t len) {
    const auto* p = static_cast<const uint8_t*>(data);
    out_->insert(out_->end(), p, p + len);
  }
  // u32 length then the bytes.
  void str(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    bytes(s.data(), s.size());
  }
  [[nodiscard]] size_t size() const { return out_->size(); }
  // Overwrites a u32 written earlier (for length fields filled in after the body).
  void patchU32(size_t at, uint32_t v) { std::memcpy(out_->data() + at, &v, sizeof(v)); }

 private:
  template <typename T>
  void put(T v) {
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "wire format is little-endian");
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out_->insert(out_->end(), p, p + sizeof(T));
  }
  std::vector<uint8_t>* out_;
};

class ByteReader {
 public:
  ByteReader(const void* data, size_t len) : p_(static_cast<const uint8_t*>(data)), left_(len) {}
  explicit ByteReader(std::string_view s) : ByteReader(s.data(), s.size()) {}

  uint8_t u8() { return get<uint8_t>(); }
  uint16_t u16() { return get<uint16_t>(); }
  uint32_t u32() { return get<uint32_t>(); }
  uint64_t u64() { return get<uint64_t>(); }
  // A view of the next `len` bytes (empty and failed if fewer remain).
  std::string_view bytes(size_t len) {
    if (!ok_ || len > left_) {
      ok_ = false;
      return {};
    }
    std::string_view v(reinterpret_cast<const char*>(p_), len);
    p_ += len;
    left_ -= len;
    return v;
  }
  // A u32-length-prefixed string of at most `max_len` bytes.
  std::string_view str(size_t max_len) {
    const uint32_t len = u32();
    if (len > max_len) {
      ok_ = false;
      return {};
    }
    return bytes(len);
  }
  [[nodiscard]] bool ok() const { return ok_; }
  [[nodiscard]] size_t remaining() const { return left_; }
  // True when everything was consumed without a short read.
  [[nodiscard]] bool done() const { return ok_ && left_ == 0; }
  void fail() { ok_ = false; }

 private:
  template <typename T>
  T get() {
    T v{};
    if (!ok_ || left_ < sizeof(T)) {
      ok_ = false;
      return v;
    }
    std::memcpy(&v, p_, sizeof(T));
    p_ += sizeof(T);
    left_ -= sizeof(T);
    return v;
  }
  const uint8_t* p_;
  size_t left_;
  bool ok_ = true;
};

}  // namespace tcpx
