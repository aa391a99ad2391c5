#include "gateway/secrets.hpp"

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <array>
#include <cctype>

namespace gpustream::gateway {

namespace {

/// Bytes one random_bytes call may ask for: far more than any secret or id needs, small enough
/// to live on the stack.
constexpr std::size_t random_request_bytes_max = 1024;

std::string openssl_failure(std::string_view what) {
  std::array<char, 256> text{};
  ERR_error_string_n(ERR_get_error(), text.data(), text.size());
  return std::string(what) + " failed: " + text.data() +
         "; the system's random number generator is unavailable";
}

expected<std::string, secret_error> prefixed_secret(std::string_view prefix) {
  auto bytes = random_bytes(secret_random_bytes);
  if (!bytes) return unexpected{bytes.error()};
  const auto* data = reinterpret_cast<const std::uint8_t*>(bytes->data());
  std::string secret(prefix);
  secret += base64url({data, bytes->size()});
  GPUSTREAM_ENSURE(secret.size() == prefix.size() + secret_body_chars);
  return secret;
}

}  // namespace

expected<std::string, secret_error> random_bytes(std::size_t count) {
  GPUSTREAM_ENSURE(count <= random_request_bytes_max);
  std::string out(count, '\0');
  if (count == 0) return out;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(count)) != 1) {
    return unexpected{secret_error{openssl_failure("RAND_bytes")}};
  }
  return out;
}

std::string base64url(std::span<const std::uint8_t> bytes) {
  static constexpr std::string_view alphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  out.reserve((bytes.size() * 4 + 2) / 3);
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const std::uint32_t v = (std::uint32_t{bytes[i]} << 16) | (std::uint32_t{bytes[i + 1]} << 8) |
                            bytes[i + 2];
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
    out += alphabet[v & 63];
  }
  const std::size_t left = bytes.size() - i;
  if (left == 1) {
    const std::uint32_t v = std::uint32_t{bytes[i]} << 16;
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
  } else if (left == 2) {
    const std::uint32_t v = (std::uint32_t{bytes[i]} << 16) | (std::uint32_t{bytes[i + 1]} << 8);
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
  }
  return out;
}

expected<std::string, secret_error> new_api_key() { return prefixed_secret(api_key_prefix); }

expected<std::string, secret_error> new_provider_token() {
  return prefixed_secret(provider_token_prefix);
}

/// `prefix` + one lower-case base32 character (a-z, 2-7) per byte, from its low 5 bits: 256 is a
/// multiple of 32, so uniform bytes give uniform characters.
std::string base32_id(std::string_view prefix, std::span<const std::uint8_t> bytes) {
  static constexpr std::string_view alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  std::string id(prefix);
  for (const std::uint8_t b : bytes) id += alphabet[b & 31];
  return id;
}

expected<std::string, secret_error> new_id(std::string_view prefix, std::size_t random_chars) {
  GPUSTREAM_ENSURE(random_chars <= id_random_chars_max);
  auto bytes = random_bytes(random_chars);
  if (!bytes) return unexpected{bytes.error()};
  return base32_id(prefix, std::span(reinterpret_cast<const std::uint8_t*>(bytes->data()), bytes->size()));
}

std::string derived_id(std::string_view prefix, std::string_view seed, std::size_t chars) {
  GPUSTREAM_ENSURE(chars <= events::sha256_digest{}.size());
  const auto digest = sha256(seed);
  return base32_id(prefix, std::span(digest).first(chars));
}

events::sha256_digest sha256(std::string_view text) noexcept {
  events::sha256_digest digest{};
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), digest.data());
  return digest;
}

bool digests_equal(const events::sha256_digest& a, const events::sha256_digest& b) noexcept {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

bool secret_matches(std::string_view presented,
                    const events::sha256_digest& expected_digest) noexcept {
  return digests_equal(sha256(presented), expected_digest);
}

std::string_view bearer_token(std::string_view authorization) noexcept {
  constexpr std::string_view scheme = "bearer";
  while (!authorization.empty() && authorization.front() == ' ') authorization.remove_prefix(1);
  if (authorization.size() <= scheme.size()) return {};
  for (std::size_t i = 0; i < scheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(authorization[i])) != scheme[i]) return {};
  }
  if (authorization[scheme.size()] != ' ') return {};
  authorization.remove_prefix(scheme.size());
  while (!authorization.empty() && authorization.front() == ' ') authorization.remove_prefix(1);
  while (!authorization.empty() && authorization.back() == ' ') authorization.remove_suffix(1);
  return authorization;
}

}  // namespace gpustream::gateway
