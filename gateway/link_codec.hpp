#pragma once
/// The provider link's codec: a link::frame to and from the bytes of one Cap'n Proto `Frame`
/// message (gateway/link.capnp), unpacked, as a flat array of whole 8-byte words. One WebSocket
/// binary message carries exactly one frame.
///
/// This header includes no Cap'n Proto header, so that callers do not pay for it.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "gateway/link_frames.hpp"

namespace gpustream::gateway::link {

/// Encodes `f` as a single Cap'n Proto message (segment table included). Encodes whatever it is
/// given: call validate() first where a frame's fields come from outside (a backend's text).
[[nodiscard]] std::vector<std::uint8_t> encode(const frame& f);

/// Decodes one frame written by encode. Input need not be 8-byte aligned (unaligned input is copied
/// once). Checks, in order: size against frame_bytes_max (too_large); Cap'n Proto structure and the
/// traversal limit (malformed); the union tag (unknown_frame); list sizes and string lengths
/// (over_limit); enumerants, UTF-8 and non-empty job ids (invalid_field). Never throws for bad input.
[[nodiscard]] expected<frame, decode_error> decode(std::span<const std::uint8_t> bytes,
                                                   const codec_limits& limits);

/// The field checks decode applies after parsing (string lengths, list sizes, UTF-8, non-empty job
/// ids), for a frame built in memory. The agent uses it before sending what a backend gave it.
[[nodiscard]] expected<void, decode_error> validate(const frame& f, const codec_limits& limits);

}  // namespace gpustream::gateway::link
