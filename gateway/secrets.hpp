#pragma once
/// Secrets the gateway hands out (API keys, provider link tokens) and the ids it makes up: random
/// bytes from OpenSSL's RAND_bytes, encoded as unpadded base64url (secrets) or lower-case base32
/// (ids). A secret is shown to its owner once; only its SHA-256 digest is stored or compared, and
/// comparisons of digests take constant time. Nothing here logs, and callers must never log a
/// secret either (log its key id or the owner's id instead).
///
/// OpenSSL stays behind this header.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "base/expected.hpp"
#include "events/event.hpp"

namespace gpustream::gateway {

/// Random bytes in every secret: 32 (256 bits), which base64url writes as 43 characters.
inline constexpr std::size_t secret_random_bytes = 32;
/// Characters of a secret after its prefix.
inline constexpr std::size_t secret_body_chars = 43;
/// Prefix of a user's API key: `gsk_` + 43 base64url characters.
inline constexpr std::string_view api_key_prefix = "gsk_";
/// Prefix of a provider's link token: `gsp_` + 43 base64url characters.
inline constexpr std::string_view provider_token_prefix = "gsp_";
/// Random characters of an id made by new_id (5 bits each: 60 bits). Default length of ids.
inline constexpr std::size_t id_random_chars = 12;
/// Most random characters new_id accepts (bounds the random bytes drawn). 64.
inline constexpr std::size_t id_random_chars_max = 64;

/// Why a secret could not be made: the system's random number generator failed (OpenSSL's error
/// text in `message`). Operating error: the caller answers 503 and logs the message.
struct secret_error {
  std::string message;
};

/// `count` cryptographically secure random bytes (count <= 1024).
[[nodiscard]] expected<std::string, secret_error> random_bytes(std::size_t count);

/// Unpadded base64url (RFC 4648 §5) of `bytes`.
[[nodiscard]] std::string base64url(std::span<const std::uint8_t> bytes);

/// A new API key: `gsk_` + 43 base64url characters (256 random bits).
[[nodiscard]] expected<std::string, secret_error> new_api_key();

/// A new provider link token: `gsp_` + 43 base64url characters (256 random bits).
[[nodiscard]] expected<std::string, secret_error> new_provider_token();

/// A short random id: `prefix` + `random_chars` lower-case base32 characters (a-z, 2-7), e.g.
/// "u_k3q7x2m4a9bc" for users. 12 characters give 60 bits: collisions are negligible for any
/// population this platform will see, and the aggregates refuse a duplicate create anyway.
[[nodiscard]] expected<std::string, secret_error> new_id(std::string_view prefix,
                                                          std::size_t random_chars = id_random_chars);

/// An id of new_id's form made from `seed` rather than at random: the same seed gives the same id
/// (e.g. a retried request's Idempotency-Key). `prefix` + `chars` base32 characters of SHA-256(seed).
[[nodiscard]] std::string derived_id(std::string_view prefix, std::string_view seed,
                                     std::size_t chars = id_random_chars);

/// The SHA-256 digest of `text` (libcrypto), the form in which secrets are stored.
[[nodiscard]] events::sha256_digest sha256(std::string_view text) noexcept;

/// Whether two digests are equal, in time independent of where they differ.
[[nodiscard]] bool digests_equal(const events::sha256_digest& a,
                                 const events::sha256_digest& b) noexcept;

/// Whether `presented` is the secret whose digest is `expected_digest`: hashes it, then compares
/// the digests in constant time.
[[nodiscard]] bool secret_matches(std::string_view presented,
                                  const events::sha256_digest& expected_digest) noexcept;

/// The token of an `Authorization: Bearer <token>` header value ("" when the value is not a
/// Bearer credential). The scheme is case-insensitive; surrounding spaces are dropped.
[[nodiscard]] std::string_view bearer_token(std::string_view authorization) noexcept;

}  // namespace gpustream::gateway
