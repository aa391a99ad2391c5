#pragma once
/// Internal to storage/: how keys and small values are laid out in the column families.
///
///   global       big-endian position               -> encoded record (events/record.hpp)
///   events       stream ‖ 0x00 ‖ big-endian first version -> big-endian first position ‖ count
///                (one entry per run: the consecutive events one append gave one stream)
///   dedup        id of an append's first event (16 bytes, big-endian)
///                                                  -> big-endian first position ‖ event count
///                also: 16 zero bytes ‖ a unique key an append claimed
///                                                  -> big-endian position of the claiming stream's
///                                                     first event (event ids are never all zero,
///                                                     so the two kinds cannot meet)
///   checkpoints  projection name                   -> big-endian position
///   projections  projection name ‖ 0x00 ‖ key      -> value
///   snapshots    stream                            -> big-endian version ‖ state ‖ CRC32C (LE)
///   default      "format_version"                  -> big-endian uint32
///
/// Big-endian numbers sort bytewise in numeric order, so RocksDB's default comparator iterates
/// positions and versions in order. Stream ids never contain 0x00, so a stream's keys are contiguous.

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "events/event_id.hpp"

namespace gpustream::storage::keys {

/// Writes `v` big-endian into 8 bytes at `out`.
inline void store_be64(char* out, std::uint64_t v) {
  if constexpr (std::endian::native == std::endian::little) v = __builtin_bswap64(v);
  std::memcpy(out, &v, sizeof v);
}

inline void append_be64(std::string& out, std::uint64_t v) {
  char bytes[8];
  store_be64(bytes, v);
  out.append(bytes, sizeof bytes);
}

inline std::string be64(std::uint64_t v) {
  std::string out;
  out.reserve(8);
  append_be64(out, v);
  return out;
}

/// Reads a big-endian uint64 from the first 8 bytes of `bytes` (which must have them).
inline std::uint64_t load_be64(std::string_view bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  return v;
}

/// One big-endian number in place: the log's key on the append path.
inline std::array<char, 8> be64_bytes(std::uint64_t v) {
  std::array<char, 8> out;
  store_be64(out.data(), v);
  return out;
}

/// Two big-endian numbers: the 16-byte keys and values of the append path, built without
/// allocating (a std::string of 16 bytes would not fit its inline buffer).
using be128 = std::array<char, 16>;

inline be128 be64_pair(std::uint64_t first, std::uint64_t second) {
  be128 out;
  store_be64(out.data(), first);
  store_be64(out.data() + 8, second);
  return out;
}

/// Replaces `out` with the `events` key of `stream` at `version` (reusing its buffer).
inline void assign_stream_key(std::string& out, std::string_view stream, std::uint64_t version) {
  out.assign(stream);
  out.push_back('\0');
  append_be64(out, version);
}

inline std::string stream_key(std::string_view stream, std::uint64_t version) {
  std::string out;
  out.reserve(stream.size() + 9);
  assign_stream_key(out, stream, version);
  return out;
}

/// One entry of the `events` index: versions first_version .. first_version + count - 1 of a
/// stream are at global positions first_position .. first_position + count - 1.
struct stream_run {
  std::uint64_t first_version = 0;
  std::uint64_t first_position = 0;
  std::uint64_t count = 0;

  [[nodiscard]] std::uint64_t last_version() const { return first_version + count - 1; }
  [[nodiscard]] std::uint64_t last_position() const { return first_position + count - 1; }
  [[nodiscard]] std::uint64_t position_of(std::uint64_t version) const {
    return first_position + (version - first_version);
  }
};

inline be128 run_value(std::uint64_t first_position, std::uint64_t count) {
  return be64_pair(first_position, count);
}

/// Whether an `events` key is one of `stream`'s.
inline bool belongs(std::string_view stream, std::string_view key) {
  return key.size() == stream.size() + 9 && key.substr(0, stream.size()) == stream &&
         key[stream.size()] == '\0';
}

/// Reads an `events` entry whose key belongs to `stream`; nullopt if the value is malformed.
inline std::optional<stream_run> parse_run(std::string_view stream, std::string_view key,
                                           std::string_view value) {
  if (value.size() != 16) return std::nullopt;
  return stream_run{load_be64(key.substr(stream.size() + 1)), load_be64(value), load_be64(value.substr(8))};
}

inline be128 dedup_key(const events::event_id& id) { return be64_pair(id.high, id.low); }

/// What precedes a claimed unique key in `dedup`: 16 zero bytes, which no event id is.
inline constexpr std::string_view unique_key_prefix{"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", 16};

/// The `dedup` key of a claimed unique key.
inline std::string unique_key(std::string_view key) {
  std::string out(unique_key_prefix);
  out.append(key);
  return out;
}

/// Whether a `dedup` key is a claimed unique key (else it is an append's first event id).
inline bool is_unique_key(std::string_view stored) {
  return stored.size() > unique_key_prefix.size() && stored.starts_with(unique_key_prefix);
}

inline std::string projection_key(std::string_view name, std::string_view key) {
  std::string out;
  out.reserve(name.size() + 1 + key.size());
  out.append(name);
  out.push_back('\0');
  out.append(key);
  return out;
}

inline constexpr std::string_view format_version_key = "format_version";

}  // namespace gpustream::storage::keys
