#include "storage/wal_file_system.hpp"

#include "storage/wrapping_file_system.hpp"

#include <string>
#include <utility>

namespace gpustream::storage {
namespace {

/// RocksDB names its write-ahead logs NNNNNN.log (its info log is "LOG", without the suffix).
bool is_wal(const std::string& name) { return name.size() > 4 && name.ends_with(".log"); }

class wal_file final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  wal_file(std::unique_ptr<rocksdb::FSWritableFile> file, std::shared_ptr<wal_progress> progress)
      : FSWritableFileOwnerWrapper(std::move(file)), progress_(std::move(progress)) {}

  // Every way of adding bytes is counted, so that the count never understates what an fsync must
  // cover (RocksDB appends to logs with Append; the positioned forms are for direct I/O).
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* dbg) override {
    return counted(FSWritableFileOwnerWrapper::Append(data, options, dbg), data.size());
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           const rocksdb::DataVerificationInfo& info,
                           rocksdb::IODebugContext* dbg) override {
    return counted(FSWritableFileOwnerWrapper::Append(data, options, info, dbg), data.size());
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, std::uint64_t offset,
                                     const rocksdb::IOOptions& options,
                                     rocksdb::IODebugContext* dbg) override {
    return counted(FSWritableFileOwnerWrapper::PositionedAppend(data, offset, options, dbg), data.size());
  }
  rocksdb::IOStatus PositionedAppend(const rocksdb::Slice& data, std::uint64_t offset,
                                     const rocksdb::IOOptions& options,
                                     const rocksdb::DataVerificationInfo& info,
                                     rocksdb::IODebugContext* dbg) override {
    return counted(FSWritableFileOwnerWrapper::PositionedAppend(data, offset, options, info, dbg),
                   data.size());
  }
  rocksdb::IOStatus Flush(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    auto status = FSWritableFileOwnerWrapper::Flush(options, dbg);
    if (status.ok() && progress_->flushed && progress_->flushed()) {
      // The fsync starts on another thread a little later (a thread wake-up costs tens of
      // microseconds on a virtual machine): starting the writeback here lets the disk begin
      // meanwhile. Only a hint (sync_file_range); durability still comes from the fsync.
      (void)FSWritableFileOwnerWrapper::RangeSync(writeback_from_, file_bytes_ - writeback_from_, options, dbg);
      writeback_from_ = file_bytes_ - file_bytes_ % page_bytes;  // the last page fills up later
    }
    return status;
  }

 private:
  rocksdb::IOStatus counted(rocksdb::IOStatus status, std::size_t bytes) {
    // Counted even when the append failed: some of it may have reached the file, and an
    // overstated count only asks for a later fsync.
    progress_->bytes.fetch_add(bytes);
    file_bytes_ += bytes;
    return status;
  }

  static constexpr std::uint64_t page_bytes = 4096;
  std::shared_ptr<wal_progress> progress_;
  std::uint64_t file_bytes_ = 0;      // appended to this file (RocksDB writes a log from one thread)
  std::uint64_t writeback_from_ = 0;  // bytes before this were handed to writeback already
};

class wal_file_system final : public wrapping_file_system {
 public:
  wal_file_system(std::shared_ptr<rocksdb::FileSystem> base, std::shared_ptr<wal_progress> progress)
      : wrapping_file_system(std::move(base)), progress_(std::move(progress)) {}

  const char* Name() const override { return "gpustream_wal_file_system"; }

 private:
  void wrap(const std::string& name, std::unique_ptr<rocksdb::FSWritableFile>& file) override {
    if (is_wal(name)) file = std::make_unique<wal_file>(std::move(file), progress_);
  }

  std::shared_ptr<wal_progress> progress_;
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> make_wal_file_system(std::shared_ptr<rocksdb::FileSystem> base,
                                                          std::shared_ptr<wal_progress> progress) {
  return std::make_shared<wal_file_system>(std::move(base), std::move(progress));
}

}  // namespace gpustream::storage
