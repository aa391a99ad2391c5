#pragma once
/// The envelope of a stored event and its byte encoding: a Cap'n Proto `Record` message followed by
/// the CRC32C of those bytes. The payload inside stays encoded; events/codec.hpp turns it into an event.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/decode_error.hpp"
#include "events/event_id.hpp"

namespace gpustream::events {

struct record {
  std::string stream;               ///< aggregate stream id, e.g. "user-42"
  std::uint64_t version = 0;        ///< position within the stream, gapless from 1
  std::uint64_t position = 0;       ///< global position, gapless from 1
  event_id id;                      ///< idempotency key
  std::int64_t recorded_at_us = 0;  ///< microseconds since the Unix epoch
  std::uint16_t type = 0;           ///< the payload's event type number
  std::string payload;              ///< an encoded event (events/codec.hpp)

  bool operator==(const record&) const = default;
};

/// A decoded record that borrows its stream id and payload from the bytes it was decoded from (or
/// from the caller's scratch buffer when those were not 8-byte aligned): the replay path, which
/// must not allocate per event. Valid while those bytes and the scratch buffer are unchanged.
struct record_view {
  std::string_view stream;
  std::uint64_t version = 0;
  std::uint64_t position = 0;
  event_id id;
  std::int64_t recorded_at_us = 0;
  std::uint16_t type = 0;
  std::span<const std::byte> payload;

  /// An owning copy.
  [[nodiscard]] record to_record() const {
    return record{std::string(stream), version, position, id, recorded_at_us, type,
                  std::string(reinterpret_cast<const char*>(payload.data()), payload.size())};
  }
};

/// Size of the CRC32C trailer after the Cap'n Proto bytes.
inline constexpr std::size_t record_crc_bytes = 4;
/// Largest encoded record decode_record accepts; a stored record is bounded by the store's payload
/// limit, so anything larger is corruption.
inline constexpr std::size_t record_bytes_max = 16u << 20;

/// Cap'n Proto words of the one segment encode_record builds for a record whose stream id and
/// payload have these sizes: the record's fields and pointers (16 words) and the two blobs, the
/// stream id with its NUL.
[[nodiscard]] constexpr std::size_t record_segment_words(std::size_t stream_bytes,
                                                         std::size_t payload_bytes) noexcept {
  return 16 + (stream_bytes + 8) / 8 + (payload_bytes + 7) / 8;
}

/// Most bytes encode_record writes for such a record: the segment table (one word), the segment
/// and the CRC. The store refuses limits under which this could exceed record_bytes_max.
[[nodiscard]] constexpr std::size_t encoded_record_bytes_max(std::size_t stream_bytes,
                                                             std::size_t payload_bytes) noexcept {
  return (1 + record_segment_words(stream_bytes, payload_bytes)) * 8 + record_crc_bytes;
}

/// Encodes `r` as Cap'n Proto words followed by their CRC32C (little-endian).
[[nodiscard]] std::string encode_record(const record& r);

/// The same into `out`, replacing its contents and reusing its capacity: the append path, which
/// encodes every event without allocating.
void encode_record_into(const record_view& r, std::string& out);

/// Checks the CRC, then decodes. Input need not be 8-byte aligned. A CRC mismatch is reported with
/// the stored and computed values; the caller adds where the bytes came from.
[[nodiscard]] expected<record, decode_error> decode_record(std::span<const std::byte> bytes);

/// Like decode_record, without copying: the view borrows from `bytes`, or from `scratch` (which it
/// resizes) when `bytes` is not 8-byte aligned.
[[nodiscard]] expected<record_view, decode_error> decode_record_view(
    std::span<const std::byte> bytes, std::vector<std::uint64_t>& scratch);

}  // namespace gpustream::events
