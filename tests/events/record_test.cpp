// The envelope of a stored event: CRC32C, encoding both ways, what is refused, and event ids.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "events/crc32c.hpp"
#include "events/record.hpp"

namespace gpustream::events {
namespace {

std::span<const std::byte> bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

record sample() {
  return record{"ledger", 7, 42, event_id{0x0123456789abcdefull, 0xfedcba9876543210ull},
                1'700'000'000'123'456, 27, std::string("payload \0 with a zero", 21)};
}

TEST(crc32c, matches_the_standard_check_value_on_both_paths) {
  const std::string check = "123456789";  // the CRC-32C check value is 0xE3069283
  EXPECT_EQ(crc32c(bytes(check)), 0xE3069283u);
  EXPECT_EQ(crc32c_portable(bytes(check)), 0xE3069283u);
  EXPECT_EQ(crc32c(bytes("")), 0u);
}

TEST(crc32c, both_paths_agree_on_every_length_and_when_extended) {
  const std::uint64_t seed = 20261123;
  std::printf("crc32c seed: %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::string data(300, '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  for (std::size_t length = 0; length <= data.size(); ++length) {
    const auto part = bytes(data).first(length);
    ASSERT_EQ(crc32c(part), crc32c_portable(part)) << "length " << length;
    const auto split = length / 3;
    ASSERT_EQ(crc32c(part.subspan(split), crc32c(part.first(split))), crc32c(part)) << "length " << length;
  }
}

TEST(record, encodes_and_decodes_every_field_owning_and_as_a_view) {
  const auto r = sample();
  const auto encoded = encode_record(r);
  EXPECT_EQ((encoded.size() - record_crc_bytes) % 8, 0u);
  auto decoded = decode_record(bytes(encoded));
  ASSERT_TRUE(decoded) << decoded.error().message;
  EXPECT_EQ(*decoded, r);
  std::vector<std::uint64_t> scratch;
  auto view = decode_record_view(bytes(encoded), scratch);
  ASSERT_TRUE(view);
  EXPECT_EQ(view->to_record(), r);
  std::string reused = "left over from an earlier record";
  encode_record_into(*view, reused);
  EXPECT_EQ(reused, encoded);
}

TEST(record, decodes_the_same_from_an_unaligned_copy) {
  const auto encoded = encode_record(sample());
  std::vector<char> shifted(encoded.size() + 1);
  std::memcpy(shifted.data() + 1, encoded.data(), encoded.size());
  std::vector<std::uint64_t> scratch;
  auto view = decode_record_view(std::as_bytes(std::span(shifted)).subspan(1), scratch);
  ASSERT_TRUE(view) << view.error().message;
  EXPECT_EQ(view->to_record(), sample());
}

TEST(record, every_flipped_byte_is_a_crc_mismatch_never_garbage) {
  const auto encoded = encode_record(sample());
  for (std::size_t i = 0; i < encoded.size(); ++i) {
    auto damaged = encoded;
    damaged[i] = static_cast<char>(damaged[i] ^ 0x01);
    auto decoded = decode_record(bytes(damaged));
    ASSERT_FALSE(decoded) << "byte " << i;
    EXPECT_EQ(decoded.error().code, decode_errc::crc_mismatch) << "byte " << i;
    EXPECT_NE(decoded.error().message.find("CRC32C"), std::string::npos);
  }
}

TEST(record, wrong_sizes_are_malformed) {
  const auto encoded = encode_record(sample());
  for (const std::size_t size : {std::size_t{0}, std::size_t{4}, std::size_t{11}, encoded.size() - 1}) {
    auto decoded = decode_record(bytes(encoded).first(size));
    ASSERT_FALSE(decoded) << size;
    EXPECT_EQ(decoded.error().code, decode_errc::malformed) << size;
  }
  const std::string huge(record_bytes_max + 12, '\0');  // whole words plus a CRC, but over the limit
  auto decoded = decode_record(bytes(huge));
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, decode_errc::malformed);
  EXPECT_NE(decoded.error().message.find("record_bytes_max"), std::string::npos);
}

TEST(record, words_with_a_valid_crc_that_are_not_a_message_are_malformed) {
  std::string junk(64, '\xff');
  const auto crc = crc32c(bytes(junk));
  for (int i = 0; i < 4; ++i) junk.push_back(static_cast<char>((crc >> (8 * i)) & 0xFFu));
  auto decoded = decode_record(bytes(junk));
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, decode_errc::malformed);
}

TEST(event_id, prints_as_32_hex_digits_high_half_first_and_knows_nil) {
  EXPECT_EQ((event_id{0x0123456789abcdefull, 0xfedcba9876543210ull}.to_string()),
            "0123456789abcdeffedcba9876543210");
  EXPECT_EQ(event_id{}.to_string(), std::string(32, '0'));
  EXPECT_TRUE(event_id{}.is_nil());
  EXPECT_FALSE((event_id{0, 1}.is_nil()));
  EXPECT_LT((event_id{0, 5}), (event_id{1, 0}));
}

}  // namespace
}  // namespace gpustream::events
