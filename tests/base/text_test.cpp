// find_line_break: the first CR or LF at or after a position, or npos; the same answers as
// std::string_view::find_first_of("\r\n"), which it replaces on streaming paths.
#include "base/text.hpp"

#include <gtest/gtest.h>

#include <string>
#include <string_view>
#include <vector>

namespace gpustream {
namespace {

TEST(find_line_break, finds_cr_or_lf_from_a_position_like_find_first_of) {
  const std::vector<std::string_view> texts = {"", "no break", "a\nb", "a\r\nb", "\r", "\n\n", "tail\r",
                                               std::string_view("nul\0\nx", 6)};
  for (const auto text : texts) {
    for (std::size_t from = 0; from <= text.size() + 1; ++from) {
      EXPECT_EQ(find_line_break(text, from), text.find_first_of("\r\n", from))
          << "text \"" << std::string(text) << "\" from " << from;
    }
  }
  static_assert(find_line_break("ab\ncd") == 2);
}

}  // namespace
}  // namespace gpustream
