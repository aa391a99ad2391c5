#pragma once
/// Helpers shared by the storage tests: temporary store directories and event builders.

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "storage/event_store.hpp"

namespace gpustream::storage::testing {

/// A fresh directory under the system temp dir, removed when this goes out of scope.
class temp_dir {
 public:
  temp_dir();
  ~temp_dir();
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

/// An id unique within a test run: `tag` in the high half, `n` in the low half.
[[nodiscard]] events::event_id make_id(std::uint64_t tag, std::uint64_t n);

/// An event whose payload is `text` (the store treats payloads as opaque bytes).
[[nodiscard]] new_event make_event(events::event_id id, std::string text, std::uint16_t type = 1);

/// A one-stream append of `count` events with ids make_id(tag, first..first+count-1).
[[nodiscard]] std::vector<stream_append> one_stream(std::string stream, std::uint64_t expected,
                                                    std::uint64_t tag, std::uint64_t first,
                                                    std::size_t count);

/// Damage done on purpose, through RocksDB directly (close the event_store first), with every
/// column family of the store opened. `extra_family` is created too when not empty: what a newer
/// format might add. Each fails the current test if the store cannot be opened or has no such key.
void raw_put(const std::filesystem::path& dir, const std::string& family, const std::string& key,
             const std::string& value, const std::string& extra_family = "");
void flip_stored_byte(const std::filesystem::path& dir, const std::string& family,
                      const std::string& key, std::size_t offset);
/// Flips a byte of the record at global position `position` (offset taken modulo its size).
void flip_byte_of_record(const std::filesystem::path& dir, std::uint64_t position, std::size_t offset);
/// Deletes the first key of `family` (e.g. "dedup", "events"): damage only index checks can see.
void delete_first_entry(const std::filesystem::path& dir, const std::string& family);
/// Deletes the last key of `family` (e.g. "global": the log's last record, its indexes kept).
void delete_last_entry(const std::filesystem::path& dir, const std::string& family);

/// Bytes of table-file blocks that RocksDB read (from disk or the OS cache, before the block
/// cache) while `work` ran on this thread.
[[nodiscard]] std::uint64_t block_bytes_read_by(const std::function<void()>& work);

/// Opens a store or fails the current test with the store's message.
[[nodiscard]] std::unique_ptr<event_store> open_or_fail(const std::filesystem::path& dir,
                                                        store_options options = {});

}  // namespace gpustream::storage::testing
