#include "storage/database.hpp"

#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/slice_transform.h>
#include <rocksdb/table.h>

#include <algorithm>
#include <cstring>

#include "storage/event_store.hpp"
#include "storage/keys.hpp"

namespace gpustream::storage {
namespace {

/// The stream part of an `events` key (up to and including its 0x00): lets the memtable remember
/// where each stream's last insert went, so appends to many streams at once stay cheap.
class stream_prefix final : public rocksdb::SliceTransform {
 public:
  const char* Name() const override { return "gpustream.stream_prefix"; }
  rocksdb::Slice Transform(const rocksdb::Slice& key) const override {
    const auto* zero = static_cast<const char*>(std::memchr(key.data(), 0, key.size()));
    return {key.data(), static_cast<std::size_t>(zero - key.data()) + 1};
  }
  bool InDomain(const rocksdb::Slice& key) const override {
    return std::memchr(key.data(), 0, key.size()) != nullptr;
  }
};

rocksdb::ColumnFamilyOptions column_options(column c) {
  rocksdb::ColumnFamilyOptions options;
  if (c == cf_events) {
    options.memtable_insert_with_hint_prefix_extractor = std::make_shared<stream_prefix>();
  }
  if (c == cf_global) {
    // The log is mostly read in long sequential scans: larger blocks mean fewer block lookups.
    rocksdb::BlockBasedTableOptions table;
    table.block_size = 16 * 1024;
    options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  }
  if (c == cf_dedup) {
    // Every append group probes this for ids that almost never exist: bloom filters make misses
    // cheap, in SST files and in the memtable. (The stream index is only ever iterated.)
    rocksdb::BlockBasedTableOptions table;
    table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
    options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
    options.memtable_prefix_bloom_size_ratio = 0.05;
    options.memtable_whole_key_filtering = true;
  }
  if (c == cf_snapshots) {
    // Every aggregate actor asks for its snapshot when it starts, and most have none (a job's
    // stream is short). Without a filter, such a miss reads and decompresses the data block where
    // the key would be, and a large snapshot fills its block alone (the ledger's grows with the
    // ledger: tens of MB after 100,000 jobs, more than the block cache holds), so every new job
    // decompressed it once the snapshot had been flushed to a table file: 86 % of `serve`'s
    // time, and completions fell from about 900/s to 150/s. A bloom filter answers misses
    // without reading a block.
    rocksdb::BlockBasedTableOptions table;
    table.filter_policy.reset(rocksdb::NewBloomFilterPolicy(10));
    options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
    options.memtable_prefix_bloom_size_ratio = 0.05;
    options.memtable_whole_key_filtering = true;
  }
  return options;
}

bool directory_has_foreign_content(const std::filesystem::path& directory) {
  std::error_code ec;
  if (!std::filesystem::exists(directory, ec)) return false;
  if (std::filesystem::exists(directory / "CURRENT", ec)) return false;
  return !std::filesystem::is_empty(directory, ec);
}

expected<void, error> check_format(database& d, const std::filesystem::path& directory,
                                   bool read_only) {
  std::string value;
  const auto status = d.db->Get(rocksdb::ReadOptions(), d.cf(cf_default),
                                slice(keys::format_version_key), &value);
  if (status.IsNotFound() && read_only) {
    return unexpected{make_error(errc::incompatible_format,
                                 "data directory " + directory.string() +
                                     " has no store format version; it is not a gpustream event store")};
  }
  if (status.IsNotFound()) {
    std::unique_ptr<rocksdb::Iterator> it(d.db->NewIterator(rocksdb::ReadOptions(), d.cf(cf_global)));
    it->SeekToFirst();
    if (it->Valid()) {
      return unexpected{make_error(errc::incompatible_format,
                                   "data directory " + directory.string() +
                                       " holds events but no format version; it was not written "
                                       "by a gpustream event store")};
    }
    rocksdb::WriteOptions write;
    write.sync = true;
    const auto put = d.db->Put(write, d.cf(cf_default), slice(keys::format_version_key),
                               slice(keys::be64(store_format_version)));
    if (!put.ok()) return unexpected{translate(put, "writing the store format version")};
    d.format_version = store_format_version;
    return {};
  }
  if (!status.ok()) return unexpected{translate(status, "reading the store format version")};
  if (value.size() != 8) {
    return unexpected{make_error(errc::corruption, "store format version in " + directory.string() +
                                                       " is not 8 bytes")};
  }
  const auto found = keys::load_be64(value);
  if (found < store_format_version_min || found > store_format_version) {
    const std::string advice =
        found > store_format_version
            ? "; it was written by a newer gpustream: run that version or newer"
            : "; it was written by a gpustream too old for this one to upgrade (it upgrades format " +
                  std::to_string(store_format_version_min) + " and newer)";
    return unexpected{make_error(
        errc::incompatible_format,
        "data directory " + directory.string() + " has store format version " +
            std::to_string(found) + ", but this gpustream reads and writes format version " +
            std::to_string(store_format_version) + advice)};
  }
  d.format_version = static_cast<std::uint32_t>(found);
  return {};
}

}  // namespace

error translate(const rocksdb::Status& status, std::string_view what) {
  std::string message = std::string(what) + ": " + status.ToString();
  if (status.IsNoSpace()) return make_error(errc::no_space, std::move(message));
  if (status.IsCorruption()) return make_error(errc::corruption, std::move(message));
  return make_error(errc::io_error, std::move(message));
}

expected<std::unique_ptr<database>, error> open_database(const std::filesystem::path& directory,
                                                         rocksdb::Env* env, bool read_only,
                                                         std::size_t memtable_bytes_max) {
  std::error_code ec;
  if (read_only && !std::filesystem::exists(directory / "CURRENT", ec)) {
    return unexpected{make_error(errc::invalid_argument,
                                 "no event store in " + directory.string() +
                                     " (pass the --data directory that `gpustream serve` used)")};
  }
  if (directory_has_foreign_content(directory)) {
    return unexpected{make_error(errc::invalid_argument,
                                 "data directory " + directory.string() +
                                     " is not empty and holds no gpustream event store; "
                                     "choose an empty directory or an existing store")};
  }
  std::filesystem::create_directories(directory, ec);
  if (ec) {
    return unexpected{make_error(errc::io_error, "cannot create data directory " +
                                                     directory.string() + ": " + ec.message())};
  }
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.env = env;
  db_options.max_background_jobs = 2;
  // Flushes and compactions sync their files every MiB as they go rather than in one burst at the
  // end, which would queue the WAL fsyncs of acknowledged appends behind it.
  db_options.bytes_per_sync = 1u << 20;
  db_options.db_write_buffer_size = memtable_bytes_max;

  std::vector<std::string> existing;
  (void)rocksdb::DB::ListColumnFamilies(db_options, directory.string(), &existing);  // none if new
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  for (std::size_t c = 0; c < cf_count; ++c) {
    descriptors.emplace_back(column_names[c], column_options(static_cast<column>(c)));
  }
  for (const auto& name : existing) {  // families of a newer format must be opened to be seen
    const bool known = std::any_of(descriptors.begin(), descriptors.end(),
                                   [&](const auto& d) { return d.name == name; });
    if (!known) descriptors.emplace_back(name, rocksdb::ColumnFamilyOptions());
  }
  auto d = std::make_unique<database>();
  rocksdb::DB* raw = nullptr;
  const auto status =
      read_only ? rocksdb::DB::OpenForReadOnly(db_options, directory.string(), descriptors,
                                               &d->all_handles, &raw)
                : rocksdb::DB::Open(db_options, directory.string(), descriptors, &d->all_handles, &raw);
  if (!status.ok()) {
    // RocksDB says "While lock file: <dir>/LOCK: Resource temporarily unavailable".
    if (status.IsIOError() && status.ToString().find("lock file") != std::string::npos) {
      return unexpected{make_error(errc::io_error, "the event store in " + directory.string() +
                                                       " is in use by another process (another `gpustream "
                                                       "serve`?): stop it, or choose another --data")};
    }
    return unexpected{translate(status, "opening the event store in " + directory.string())};
  }
  d->db.reset(raw);
  d->handles.assign(d->all_handles.begin(), d->all_handles.begin() + cf_count);
  if (auto checked = check_format(*d, directory, read_only); !checked) return unexpected{checked.error()};
  return d;
}

expected<std::uint64_t, error> read_last_position(database& d) {
  std::unique_ptr<rocksdb::Iterator> it(d.db->NewIterator(rocksdb::ReadOptions(), d.cf(cf_global)));
  it->SeekToLast();
  if (!it->status().ok()) return unexpected{translate(it->status(), "finding the last position")};
  if (!it->Valid()) return std::uint64_t{0};
  if (it->key().size() != 8) {
    return unexpected{make_error(errc::corruption, "global index key is not 8 bytes")};
  }
  return keys::load_be64(std::string_view(it->key().data(), 8));
}

bool valid_name(std::string_view name, std::size_t bytes_max) {
  if (name.empty() || name.size() > bytes_max) return false;
  return std::all_of(name.begin(), name.end(), [](char c) { return c > ' ' && c < 0x7F; });
}

expected<events::record_view, error> decode_stored(std::span<const std::byte> value, std::uint64_t position,
                                                   std::vector<std::uint64_t>& scratch) {
  auto decoded = events::decode_record_view(value, scratch);
  if (!decoded) {
    return unexpected{make_error(errc::corruption, "record at global position " +
                                                       std::to_string(position) + ": " +
                                                       decoded.error().message)};
  }
  if (decoded->position != position) {
    return unexpected{make_error(errc::corruption,
                                 "record stored at global position " + std::to_string(position) +
                                     " says it is at position " + std::to_string(decoded->position))};
  }
  return *decoded;
}

expected<events::record_view, error> decode_stored(const rocksdb::Slice& value, std::uint64_t position,
                                                   std::vector<std::uint64_t>& scratch) {
  return decode_stored(bytes_of(value), position, scratch);
}

error corrupt_index(std::string_view stream) {
  return make_error(errc::corruption, "index entry of stream " + std::string(stream) + " is malformed");
}

std::string describe(const events::record_view& r) {
  return "stream " + std::string(r.stream) + " version " + std::to_string(r.version) +
         " (position " + std::to_string(r.position) + ")";
}

}  // namespace gpustream::storage
