#pragma once
/// Text scans used on hot paths (every streamed token passes through them), and a UTF-8-safe cut.

#include <cstddef>
#include <string_view>

namespace gpustream {

/// The position of the first '\r' or '\n' in `text` at or after `from`, or npos. One pass over the
/// bytes: std::string_view::find_first_of with a two-character set calls memchr once per byte.
[[nodiscard]] constexpr std::size_t find_line_break(std::string_view text, std::size_t from = 0) noexcept {
  for (std::size_t i = from; i < text.size(); ++i) {
    if (text[i] == '\n' || text[i] == '\r') return i;
  }
  return std::string_view::npos;
}

/// The longest prefix of `text` of at most `max_bytes` bytes that does not end inside a UTF-8
/// sequence: a cut falls back to the start of the character it would split. (A peer that checks
/// UTF-8, as WebSocket close reasons must be, would refuse the whole text otherwise.)
[[nodiscard]] constexpr std::string_view utf8_prefix(std::string_view text, std::size_t max_bytes) noexcept {
  if (text.size() <= max_bytes) return text;
  std::size_t cut = max_bytes;
  // Continuation bytes are 10xxxxxx; a sequence is at most 4 bytes, so 3 steps back at most.
  for (int steps = 0; cut > 0 && steps < 3 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80; ++steps) --cut;
  return text.substr(0, cut);
}

}  // namespace gpustream
