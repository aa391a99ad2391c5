// Secrets and ids: their shape, their randomness, base64url against RFC 4648's vectors, SHA-256
// against FIPS 180-2's, digest comparison and the Bearer header.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "gateway/secrets.hpp"

namespace gpustream::gateway {
namespace {

bool is_base64url(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
  });
}

std::string base64url_of(std::string_view text) {
  std::vector<std::uint8_t> bytes(text.begin(), text.end());
  return base64url(bytes);
}

std::string hex(const events::sha256_digest& digest) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out;
  for (const auto b : digest) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

TEST(secrets, base64url_matches_rfc_4648_vectors_without_padding) {
  EXPECT_EQ(base64url_of(""), "");
  EXPECT_EQ(base64url_of("f"), "Zg");
  EXPECT_EQ(base64url_of("fo"), "Zm8");
  EXPECT_EQ(base64url_of("foo"), "Zm9v");
  EXPECT_EQ(base64url_of("foob"), "Zm9vYg");
  EXPECT_EQ(base64url_of("fooba"), "Zm9vYmE");
  EXPECT_EQ(base64url_of("foobar"), "Zm9vYmFy");
  // The two characters where base64url differs from base64 ('+' and '/').
  const std::vector<std::uint8_t> high{0xfb, 0xff, 0xbf};
  EXPECT_EQ(base64url(high), "-_-_");
}

TEST(secrets, api_keys_and_provider_tokens_have_their_prefix_and_43_random_characters) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    auto key = new_api_key();
    ASSERT_TRUE(key.has_value()) << key.error().message;
    ASSERT_EQ(key->size(), 4u + 43u);
    EXPECT_EQ(key->substr(0, 4), "gsk_");
    EXPECT_TRUE(is_base64url(key->substr(4))) << *key;
    EXPECT_TRUE(seen.insert(*key).second) << "a key repeated after " << i << " keys";
  }
  auto token = new_provider_token();
  ASSERT_TRUE(token.has_value());
  ASSERT_EQ(token->size(), 47u);
  EXPECT_EQ(token->substr(0, 4), "gsp_");
  EXPECT_TRUE(is_base64url(token->substr(4)));
}

TEST(secrets, secrets_use_every_base64url_character_position_evenly_enough) {
  // 256 random bits per secret: over 2000 secrets every one of the 64 characters must appear in
  // the body (a generator stuck on few values, or bytes truncated to 7 bits, would fail this).
  std::set<char> characters;
  for (int i = 0; i < 2000; ++i) {
    auto key = new_api_key();
    ASSERT_TRUE(key.has_value());
    // The last character carries only 4 random bits; the others carry 6.
    for (std::size_t c = 4; c + 1 < key->size(); ++c) characters.insert((*key)[c]);
  }
  EXPECT_EQ(characters.size(), 64u);
}

TEST(secrets, ids_are_a_prefix_and_lower_case_base32) {
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    auto id = new_id("u_");
    ASSERT_TRUE(id.has_value());
    ASSERT_EQ(id->size(), 2u + id_random_chars);
    EXPECT_EQ(id->substr(0, 2), "u_");
    for (const char c : id->substr(2)) {
      EXPECT_TRUE((c >= 'a' && c <= 'z') || (c >= '2' && c <= '7')) << *id;
    }
    EXPECT_TRUE(seen.insert(*id).second);
  }
  auto longer = new_id("x", 30);
  ASSERT_TRUE(longer.has_value());
  EXPECT_EQ(longer->size(), 31u);
}

TEST(secrets, sha256_matches_fips_180_2_vectors) {
  EXPECT_EQ(hex(sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(sha256("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(secrets, digests_compare_equal_only_when_every_byte_matches) {
  const auto a = sha256("gsk_first");
  auto b = a;
  EXPECT_TRUE(digests_equal(a, b));
  b[31] ^= 1;  // the last byte: a comparison that stops early would still have to reach it
  EXPECT_FALSE(digests_equal(a, b));
  b = a;
  b[0] ^= 0x80;
  EXPECT_FALSE(digests_equal(a, b));

  EXPECT_TRUE(secret_matches("gsk_first", a));
  EXPECT_FALSE(secret_matches("gsk_firsT", a));
  EXPECT_FALSE(secret_matches("", a));
}

TEST(secrets, bearer_token_reads_the_credential_of_a_bearer_header_only) {
  EXPECT_EQ(bearer_token("Bearer gsk_abc"), "gsk_abc");
  EXPECT_EQ(bearer_token("bearer   gsk_abc  "), "gsk_abc");
  EXPECT_EQ(bearer_token("BEARER x"), "x");
  EXPECT_EQ(bearer_token(""), "");
  EXPECT_EQ(bearer_token("Bearer"), "");
  EXPECT_EQ(bearer_token("Bearer "), "");
  EXPECT_EQ(bearer_token("Basic dXNlcjpwYXNz"), "");
  EXPECT_EQ(bearer_token("Bearergsk_abc"), "");
}

}  // namespace
TEST(derived_id, the_same_seed_gives_the_same_id_of_new_ids_form) {
  const auto id = derived_id("u_", "gpustream/admin/user/order-77");
  EXPECT_EQ(id, derived_id("u_", "gpustream/admin/user/order-77"));
  EXPECT_NE(id, derived_id("u_", "gpustream/admin/user/order-78"));
  ASSERT_EQ(id.size(), 2 + id_random_chars);
  EXPECT_EQ(id.substr(0, 2), "u_");
  EXPECT_EQ(id.find_first_not_of("abcdefghijklmnopqrstuvwxyz234567", 2), std::string::npos) << id;
}

}  // namespace gpustream::gateway
