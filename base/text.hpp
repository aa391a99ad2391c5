#pragma once
/// Text scans used on hot paths (every streamed token passes through them).

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

}  // namespace gpustream
