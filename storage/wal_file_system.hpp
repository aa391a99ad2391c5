#pragma once
/// Internal to storage/: a RocksDB FileSystem that tells the store how far RocksDB has written its
/// write-ahead log. The syncer uses it to start an fsync as soon as a group's log record has been
/// handed to the operating system, while RocksDB still inserts that group into its memtables:
/// the fsync and the memtable inserts then overlap instead of following each other.

#include <rocksdb/file_system.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

namespace gpustream::storage {

struct wal_progress {
  /// Bytes appended to write-ahead log files since the store opened. Every byte counted before
  /// an fsync of the log begins is durable once that fsync succeeds.
  std::atomic<std::uint64_t> bytes{0};
  /// Runs on the writing thread each time RocksDB has flushed its buffered log bytes to a log
  /// file (at the end of every logged write); returns whether an fsync of the log will follow, in
  /// which case the file starts writing those bytes back at once. Set before the database opens.
  std::function<bool()> flushed;
};

/// Wraps `base`: write-ahead log files (RocksDB's "*.log") report to `progress`; other files are
/// untouched.
[[nodiscard]] std::shared_ptr<rocksdb::FileSystem> make_wal_file_system(
    std::shared_ptr<rocksdb::FileSystem> base, std::shared_ptr<wal_progress> progress);

}  // namespace gpustream::storage
