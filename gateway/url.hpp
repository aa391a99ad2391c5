#pragma once
/// Decoding the parts of a request target.

#include <string>
#include <string_view>

namespace gpustream::gateway {

/// The value of a hex digit, or -1.
[[nodiscard]] constexpr int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

enum class plus_sign { kept, space };

/// `text` with each %XX replaced by its byte (a '%' not followed by two hex digits is kept). A
/// query string's '+' is a space (plus_sign::space); a path segment's is a plus (the default):
/// SDKs percent-encode a model id such as "meta-llama/Llama-3.1-8B" as one segment.
[[nodiscard]] inline std::string percent_decode(std::string_view text, plus_sign plus = plus_sign::kept) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '+' && plus == plus_sign::space) {
      out += ' ';
    } else if (text[i] == '%' && i + 2 < text.size() && hex_value(text[i + 1]) >= 0 &&
               hex_value(text[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2]));
      i += 2;
    } else {
      out += text[i];
    }
  }
  return out;
}

}  // namespace gpustream::gateway
