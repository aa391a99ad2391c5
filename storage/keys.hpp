#pragma once
/// Internal to storage/: how keys and small values are laid out in the column families.
///
///   global       big-endian position               -> encoded record (events/record.hpp)
///   events       stream ‖ 0x00 ‖ big-endian first version -> big-endian first position ‖ count
///                (one entry per run: the consecutive events one append gave one stream)
///   dedup        id of an append's first event (16 bytes, big-endian)
///                                                  -> big-endian first position ‖ event count
///   checkpoints  projection name                   -> big-endian position
///   projections  projection name ‖ 0x00 ‖ key      -> value
///   snapshots    stream                            -> big-endian version ‖ state ‖ CRC32C (LE)
///   default      "format_version"                  -> big-endian uint32
///
/// Big-endian numbers sort bytewise in numeric order, so RocksDB's default comparator iterates
/// positions and versions in order. Stream ids never contain 0x00, so a stream's keys are contiguous.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "events/event_id.hpp"

namespace gpustream::storage::keys {

inline void append_be64(std::string& out, std::uint64_t v) {
  for (int shift = 56; shift >= 0; shift -= 8) out.push_back(static_cast<char>((v >> shift) & 0xFFu));
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

inline std::string stream_key(std::string_view stream, std::uint64_t version) {
  std::string out;
  out.reserve(stream.size() + 9);
  out.append(stream);
  out.push_back('\0');
  append_be64(out, version);
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

inline std::string run_value(std::uint64_t first_position, std::uint64_t count) {
  std::string out;
  out.reserve(16);
  append_be64(out, first_position);
  append_be64(out, count);
  return out;
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

inline std::string dedup_key(const events::event_id& id) {
  std::string out;
  out.reserve(16);
  append_be64(out, id.high);
  append_be64(out, id.low);
  return out;
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
