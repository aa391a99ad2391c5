#pragma once
/// Internal to storage/: reads a stretch of the log on a second thread, a bounded number of batches
/// ahead of the thread that decodes it, so that a replay uses two cores: one iterating RocksDB, one
/// checking CRCs and decoding. Included only by event_store.cpp.

#include <rocksdb/iterator.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "storage/error.hpp"

namespace gpustream::storage {

class log_read_ahead {
 public:
  /// Records copied out of RocksDB, each starting on an 8-byte boundary so that Cap'n Proto can
  /// read it in place.
  struct batch {
    struct entry {
      std::uint64_t position = 0;
      std::size_t first_word = 0;
      std::size_t bytes = 0;
    };
    std::vector<std::uint64_t> words;
    std::vector<entry> entries;
    std::optional<error> failure;  ///< reading stopped here with this error

    [[nodiscard]] std::span<const std::byte> bytes_of(const entry& e) const {
      return std::as_bytes(std::span(words)).subspan(e.first_word * sizeof(std::uint64_t), e.bytes);
    }
  };

  /// Most records in one batch. Default: 1024.
  static constexpr std::size_t batch_records_max = 1024;
  /// Most batches read but not yet taken: bounds the memory a scan holds. Default: 4.
  static constexpr std::size_t batches_ahead_max = 4;

  /// Starts reading at the iterator's current position, at most `max` records. The iterator must
  /// stay valid (its database open) until this is destroyed.
  log_read_ahead(std::unique_ptr<rocksdb::Iterator> iterator, std::uint64_t max);
  /// Stops the reader (even mid-range) and joins it.
  ~log_read_ahead();
  log_read_ahead(const log_read_ahead&) = delete;
  log_read_ahead& operator=(const log_read_ahead&) = delete;

  /// The next batch, waiting for it; nullptr after the last one.
  [[nodiscard]] std::unique_ptr<batch> next();
  /// Hands a consumed batch back for reuse.
  void recycle(std::unique_ptr<batch> used);

 private:
  void read();
  [[nodiscard]] std::unique_ptr<batch> fresh_batch();

  std::unique_ptr<rocksdb::Iterator> iterator_;
  const std::uint64_t max_;
  std::mutex mutex_;
  std::condition_variable ready_;  // a batch was queued or reading ended
  std::condition_variable space_;  // a batch was taken, or the consumer stopped
  std::deque<std::unique_ptr<batch>> queue_;
  std::vector<std::unique_ptr<batch>> spare_;
  bool done_ = false;      // the reader queued its last batch
  bool stopped_ = false;   // the consumer wants no more
  std::thread reader_;
};

}  // namespace gpustream::storage
