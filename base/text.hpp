#pragma once
/// Text scans used on hot paths (every streamed token passes through them), a UTF-8-safe cut, and
/// UTF-8 checks and repair for text from outside.

#include <cstddef>
#include <string>
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

/// Whether `text` is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates, nothing above
/// U+10FFFF). Text that ends up in JSON answers or WebSocket frames must be.
[[nodiscard]] bool valid_utf8(std::string_view text) noexcept;

/// Whether `text` holds a control character (C0, DEL).
[[nodiscard]] bool has_control_character(std::string_view text) noexcept;

/// Whether `text` is a name a peer may give (a model, a GPU, a version): well-formed UTF-8 without
/// control characters (C0, DEL). A line break in one would forge lines in a log that quotes it.
[[nodiscard]] bool valid_name(std::string_view text) noexcept;

/// `text` with each control character (C0, DEL) replaced by a space: a peer's words (a close
/// reason, a GPU's name) before a log line quotes them.
[[nodiscard]] std::string controls_replaced(std::string_view text);

/// `text` with each byte that starts no well-formed UTF-8 sequence replaced by U+FFFD, as text from
/// outside (a backend's Latin-1 error message, a request path, a cut inside a character) must be
/// before it goes into JSON or a frame.
[[nodiscard]] std::string utf8_repaired(std::string_view text);

}  // namespace gpustream
