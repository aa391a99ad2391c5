#pragma once
/// The payload codec: an `event` to and from the bytes of a Cap'n Proto `Event` message
/// (events/schema/events.capnp). The envelope around those bytes lives in events/record.hpp.
///
/// This header includes no Cap'n Proto header, so that callers do not pay for it.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "base/expected.hpp"
#include "events/decode_error.hpp"
#include "events/event.hpp"

namespace gpustream::events {

/// Most 8-byte words decode_payload lets Cap'n Proto traverse in one payload (2 Mi words = 16 MiB,
/// the size of the largest record the store accepts). The bytes may come from outside (a file, a
/// peer), and a crafted message can point many times at the same words; this bounds the work.
inline constexpr std::uint64_t payload_traversal_words_max = std::uint64_t{2} << 20;

/// Encodes `e` as a Cap'n Proto flat array (whole 8-byte words) whose root is `Event`, with the
/// union tag set to type_of(e).
[[nodiscard]] std::string encode_payload(const event& e);

/// Decodes a payload written by encode_payload. `type` is the envelope's type number; it must equal
/// the union tag (else decode_errc::type_mismatch). Input need not be 8-byte aligned: aligned input
/// is read in place, unaligned input is copied once. A type number this build does not know is
/// decode_errc::unknown_type; bytes that are not a valid `Event` (truncated, garbage, over
/// payload_traversal_words_max, an enumerant or digest this build does not know) are
/// decode_errc::malformed. Never throws for bad input.
[[nodiscard]] expected<event, decode_error> decode_payload(event_type type,
                                                           std::span<const std::byte> bytes);

}  // namespace gpustream::events
