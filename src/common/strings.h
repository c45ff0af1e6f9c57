// String helpers: printf-style formatting into std::string, hex, and bounded number parsing.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tcpx {

std::string strfmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Lower-case hex of a byte string, and back (nullopt on odd length or a non-hex digit).
std::string toHex(std::string_view bytes);
std::optional<std::string> fromHex(std::string_view hex);

// Parses an unsigned integer with an optional binary suffix (k, m, g: 1024-based) and checks
// that it lies in [min, max]. nullopt on any junk, overflow or out-of-range value.
std::optional<uint64_t> parseSize(std::string_view text, uint64_t min, uint64_t max);

// "512 KiB", "64 MiB", "12 B": for tables and messages.
std::string formatBytes(uint64_t bytes);

// Splits on `sep`, dropping empty items ("a,,b" -> {"a", "b"}).
std::vector<std::string> split(std::string_view text, char sep);

// strerror_r into a std::string ("Connection refused (errno 111)").
std::string errnoString(int err);

}  // namespace tcpx
