#include "storage/fault_file_system.hpp"

#include "storage/wrapping_file_system.hpp"

#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <utility>

namespace gpustream::storage {
namespace {

/// Durable lengths of the files synced so far, by path, so that a rename carries its source's.
class durable_lengths {
 public:
  void synced(const std::string& path, std::uint64_t bytes) {
    std::lock_guard lock(mutex_);
    lengths_[path] = bytes;
  }
  std::optional<std::uint64_t> renamed(const std::string& from, const std::string& to) {
    std::lock_guard lock(mutex_);
    auto it = lengths_.find(from);
    if (it == lengths_.end()) return std::nullopt;
    const auto bytes = it->second;
    lengths_.erase(it);
    lengths_[to] = bytes;
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::map<std::string, std::uint64_t> lengths_;
};

class faulty_file final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  faulty_file(std::unique_ptr<rocksdb::FSWritableFile> file, std::shared_ptr<fault_injector> faults,
              std::string path, std::shared_ptr<durable_lengths> lengths, std::uint64_t size)
      : FSWritableFileOwnerWrapper(std::move(file)),
        faults_(std::move(faults)),
        path_(std::move(path)),
        lengths_(std::move(lengths)),
        written_(size) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->no_space()) return rocksdb::IOStatus::NoSpace("injected: no space left on device");
    return appended(FSWritableFileOwnerWrapper::Append(data, options, dbg), data.size());
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           const rocksdb::DataVerificationInfo& info,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->no_space()) return rocksdb::IOStatus::NoSpace("injected: no space left on device");
    return appended(FSWritableFileOwnerWrapper::Append(data, options, info, dbg), data.size());
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    slow_down();
    if (faults_->fail_sync(path_)) return rocksdb::IOStatus::IOError("injected: fsync failed");
    const auto bytes = written_.load();  // what was appended before the sync began is durable after it
    return synced(FSWritableFileOwnerWrapper::Sync(options, dbg), bytes);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    slow_down();
    if (faults_->fail_sync(path_)) return rocksdb::IOStatus::IOError("injected: fsync failed");
    const auto bytes = written_.load();
    return synced(FSWritableFileOwnerWrapper::Fsync(options, dbg), bytes);
  }
  rocksdb::IOStatus RangeSync(std::uint64_t offset, std::uint64_t bytes,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override {
    if (faults_->fail_sync(path_)) return rocksdb::IOStatus::IOError("injected: fsync failed");
    return FSWritableFileOwnerWrapper::RangeSync(offset, bytes, options, dbg);
  }

 private:
  rocksdb::IOStatus appended(rocksdb::IOStatus status, std::size_t bytes) {
    if (status.ok()) written_.fetch_add(bytes);
    return status;
  }
  rocksdb::IOStatus synced(rocksdb::IOStatus status, std::uint64_t bytes) {
    if (status.ok() && faults_->observer()) {
      lengths_->synced(path_, bytes);
      faults_->observer()(path_, bytes);
    }
    return status;
  }
  void slow_down() const {
    if (const auto delay = faults_->sync_delay(); delay.count() > 0) std::this_thread::sleep_for(delay);
    faults_->wait_while_held();
  }

  std::shared_ptr<fault_injector> faults_;
  std::string path_;
  std::shared_ptr<durable_lengths> lengths_;
  std::atomic<std::uint64_t> written_{0};
};

class fault_file_system final : public wrapping_file_system {
 public:
  fault_file_system(std::shared_ptr<rocksdb::FileSystem> base, std::shared_ptr<fault_injector> faults)
      : wrapping_file_system(std::move(base)), faults_(std::move(faults)) {}

  const char* Name() const override { return "gpustream_fault_file_system"; }

  rocksdb::IOStatus RenameFile(const std::string& from, const std::string& to,
                               const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    auto status = target()->RenameFile(from, to, options, dbg);
    if (status.ok() && faults_->observer()) {
      if (auto bytes = lengths_->renamed(from, to)) faults_->observer()(to, *bytes);
    }
    return status;
  }

 private:
  void wrap(const std::string& name, std::unique_ptr<rocksdb::FSWritableFile>& file) override {
    std::uint64_t size = 0;  // a reopened file keeps what it had
    (void)target()->GetFileSize(name, rocksdb::IOOptions(), &size, nullptr);  // 0 if unknown
    file = std::make_unique<faulty_file>(std::move(file), faults_, name, lengths_, size);
  }

  std::shared_ptr<fault_injector> faults_;
  std::shared_ptr<durable_lengths> lengths_ = std::make_shared<durable_lengths>();
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> make_fault_file_system(std::shared_ptr<rocksdb::FileSystem> base,
                                                            std::shared_ptr<fault_injector> faults) {
  return std::make_shared<fault_file_system>(std::move(base), std::move(faults));
}

}  // namespace gpustream::storage
