// find_line_break: the first CR or LF at or after a position, or npos; the same answers as
// std::string_view::find_first_of("\r\n"), which it replaces on streaming paths. utf8_prefix: a cut
// that never splits a character.
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

TEST(utf8_prefix, never_ends_inside_a_character) {
  using namespace std::string_view_literals;
  EXPECT_EQ(utf8_prefix("abc"sv, 5), "abc");
  EXPECT_EQ(utf8_prefix("abc"sv, 2), "ab");
  const std::string_view word = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";  // a, é (2 bytes), € (3), 😀 (4)
  EXPECT_EQ(utf8_prefix(word, 1), "a");
  EXPECT_EQ(utf8_prefix(word, 2), "a");                 // inside é
  EXPECT_EQ(utf8_prefix(word, 3), "a\xC3\xA9");
  EXPECT_EQ(utf8_prefix(word, 4), "a\xC3\xA9");         // inside €
  EXPECT_EQ(utf8_prefix(word, 5), "a\xC3\xA9");
  EXPECT_EQ(utf8_prefix(word, 6), "a\xC3\xA9\xE2\x82\xAC");
  for (std::size_t max = 7; max < 10; ++max) {
    EXPECT_EQ(utf8_prefix(word, max), "a\xC3\xA9\xE2\x82\xAC") << max;  // inside 😀
  }
  EXPECT_EQ(utf8_prefix(word, 10), word);
  EXPECT_EQ(utf8_prefix(word, 0), "");
}

TEST(valid_utf8, takes_well_formed_text_and_refuses_the_rest) {
  EXPECT_TRUE(valid_utf8(""));
  EXPECT_TRUE(valid_utf8("a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80"));
  EXPECT_FALSE(valid_utf8("caf\xE9")) << "Latin-1";
  EXPECT_FALSE(valid_utf8("\xC3")) << "cut";
  EXPECT_FALSE(valid_utf8("\xED\xA0\x80")) << "a surrogate";
  EXPECT_FALSE(valid_utf8("\xC0\xAF")) << "overlong";
  EXPECT_FALSE(valid_utf8("\xF4\x90\x80\x80")) << "above U+10FFFF";
}

TEST(valid_name, takes_utf8_without_control_characters) {
  EXPECT_TRUE(valid_name("qwen2.5:7b instruct \xC3\xA9"));
  EXPECT_TRUE(valid_name(""));
  for (const std::string bad : {"a\nb", "a\rb", "a\tb", "\x1b[2J", "a\x7f", "caf\xE9"}) EXPECT_FALSE(valid_name(bad)) << bad;
  EXPECT_FALSE(valid_name(std::string("a\0b", 3)));
  EXPECT_FALSE(has_control_character("caf\xE9")) << "not UTF-8, but no control character";
  EXPECT_TRUE(has_control_character("a\x7f"));
}

TEST(controls_replaced, puts_a_space_for_each_control_character_only) {
  EXPECT_EQ(controls_replaced("a\nb\r\x1b\x7f\xC3\xA9"), "a b   \xC3\xA9");
  EXPECT_EQ(controls_replaced(std::string("\0", 1)), " ");
}

}  // namespace
}  // namespace gpustream
