#pragma once
/// Internal to storage/: the RocksDB database under the event store (column families, opening,
/// format check) and small helpers shared by the store's source files. RocksDB types appear here
/// and nowhere outside storage/.

#include <rocksdb/db.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/record.hpp"
#include "storage/error.hpp"

namespace gpustream::storage {

/// The column families; keys.hpp says what each holds.
enum column : std::size_t {
  cf_default,
  cf_global,
  cf_events,
  cf_dedup,
  cf_checkpoints,
  cf_projections,
  cf_snapshots,
  cf_count,
};

inline constexpr const char* column_names[cf_count] = {
    "default", "global", "events", "dedup", "checkpoints",
    "projections", "snapshots"};

inline error make_error(errc code, std::string message) { return error{code, std::move(message)}; }

/// Translates a RocksDB status at the border of storage/: `what` says what was being done.
[[nodiscard]] error translate(const rocksdb::Status& status, std::string_view what);

inline rocksdb::Slice slice(std::string_view s) { return {s.data(), s.size()}; }
template <std::size_t n>
rocksdb::Slice slice(const std::array<char, n>& bytes) {
  return {bytes.data(), n};
}

inline std::span<const std::byte> bytes_of(const rocksdb::Slice& s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

/// An open RocksDB with its column family handles.
struct database {
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;  // indexed by `column`
  /// The format the directory holds (store_format_version_min to store_format_version).
  std::uint32_t format_version = 0;

  rocksdb::ColumnFamilyHandle* cf(column c) const { return handles[c]; }

  ~database() {
    if (!db) return;
    for (auto* handle : all_handles) (void)db->DestroyColumnFamilyHandle(handle);
    // Close flushes nothing we rely on: every acknowledged append is already in the WAL.
    (void)db->Close();  // best effort at shutdown; errors here lose nothing acknowledged
  }

  std::vector<rocksdb::ColumnFamilyHandle*> all_handles;  // includes unknown families
};

/// Opens (creating unless read-only) the database in `directory` with every column family,
/// refusing a directory of other files and a store of a format this build neither reads nor
/// upgrades (database::format_version says which it holds). The memtables of
/// all column families together hold at most `memtable_bytes_max` (0: RocksDB's per-family bound).
[[nodiscard]] expected<std::unique_ptr<database>, error> open_database(
    const std::filesystem::path& directory, rocksdb::Env* env, bool read_only, std::size_t memtable_bytes_max);

/// Global position of the last event in the log (0 when empty).
[[nodiscard]] expected<std::uint64_t, error> read_last_position(database& d);

/// At most the first 200 bytes of a caller's key, unprintable bytes as '?', for messages.
inline std::string printable(std::string_view key) {
  std::string out(key.substr(0, 200));
  for (auto& c : out) {
    if (c < ' ' || c >= 0x7F) c = '?';
  }
  if (key.size() > 200) out += "...";
  return out;
}

/// Stream ids and projection names: 1 to bytes_max printable ASCII characters, no spaces.
[[nodiscard]] bool valid_name(std::string_view name, std::size_t bytes_max);

/// Decodes a stored record and checks that it is the one its key says it is.
[[nodiscard]] expected<events::record_view, error> decode_stored(
    std::span<const std::byte> value, std::uint64_t position, std::vector<std::uint64_t>& scratch);
[[nodiscard]] expected<events::record_view, error> decode_stored(
    const rocksdb::Slice& value, std::uint64_t position, std::vector<std::uint64_t>& scratch);

[[nodiscard]] error corrupt_index(std::string_view stream);

/// "stream S version V (position P)", for messages.
[[nodiscard]] std::string describe(const events::record_view& r);

}  // namespace gpustream::storage
