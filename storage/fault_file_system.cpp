#include "storage/fault_file_system.hpp"

#include <string>
#include <thread>
#include <utility>

namespace gpustream::storage {
namespace {

class faulty_file final : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  faulty_file(std::unique_ptr<rocksdb::FSWritableFile> file, std::shared_ptr<fault_injector> faults)
      : FSWritableFileOwnerWrapper(std::move(file)), faults_(std::move(faults)) {}

  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->no_space()) return rocksdb::IOStatus::NoSpace("injected: no space left on device");
    return FSWritableFileOwnerWrapper::Append(data, options, dbg);
  }
  rocksdb::IOStatus Append(const rocksdb::Slice& data, const rocksdb::IOOptions& options,
                           const rocksdb::DataVerificationInfo& info,
                           rocksdb::IODebugContext* dbg) override {
    if (faults_->no_space()) return rocksdb::IOStatus::NoSpace("injected: no space left on device");
    return FSWritableFileOwnerWrapper::Append(data, options, info, dbg);
  }
  rocksdb::IOStatus Sync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    slow_down();
    if (faults_->fail_sync()) return rocksdb::IOStatus::IOError("injected: fsync failed");
    return FSWritableFileOwnerWrapper::Sync(options, dbg);
  }
  rocksdb::IOStatus Fsync(const rocksdb::IOOptions& options, rocksdb::IODebugContext* dbg) override {
    slow_down();
    if (faults_->fail_sync()) return rocksdb::IOStatus::IOError("injected: fsync failed");
    return FSWritableFileOwnerWrapper::Fsync(options, dbg);
  }
  rocksdb::IOStatus RangeSync(std::uint64_t offset, std::uint64_t bytes,
                              const rocksdb::IOOptions& options,
                              rocksdb::IODebugContext* dbg) override {
    if (faults_->fail_sync()) return rocksdb::IOStatus::IOError("injected: fsync failed");
    return FSWritableFileOwnerWrapper::RangeSync(offset, bytes, options, dbg);
  }

 private:
  void slow_down() const {
    if (const auto delay = faults_->sync_delay(); delay.count() > 0) std::this_thread::sleep_for(delay);
  }

  std::shared_ptr<fault_injector> faults_;
};

class fault_file_system final : public rocksdb::FileSystemWrapper {
 public:
  fault_file_system(std::shared_ptr<rocksdb::FileSystem> base, std::shared_ptr<fault_injector> faults)
      : FileSystemWrapper(std::move(base)), faults_(std::move(faults)) {}

  const char* Name() const override { return "gpustream_fault_file_system"; }

  rocksdb::IOStatus NewWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override {
    return wrap(target()->NewWritableFile(name, options, result, dbg), result);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                                       std::unique_ptr<rocksdb::FSWritableFile>* result,
                                       rocksdb::IODebugContext* dbg) override {
    return wrap(target()->ReopenWritableFile(name, options, result, dbg), result);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& name, const std::string& old_name,
                                      const rocksdb::FileOptions& options,
                                      std::unique_ptr<rocksdb::FSWritableFile>* result,
                                      rocksdb::IODebugContext* dbg) override {
    return wrap(target()->ReuseWritableFile(name, old_name, options, result, dbg), result);
  }

 private:
  rocksdb::IOStatus wrap(rocksdb::IOStatus status, std::unique_ptr<rocksdb::FSWritableFile>* result) {
    if (status.ok()) *result = std::make_unique<faulty_file>(std::move(*result), faults_);
    return status;
  }

  std::shared_ptr<fault_injector> faults_;
};

}  // namespace

std::shared_ptr<rocksdb::FileSystem> make_fault_file_system(std::shared_ptr<rocksdb::FileSystem> base,
                                                            std::shared_ptr<fault_injector> faults) {
  return std::make_shared<fault_file_system>(std::move(base), std::move(faults));
}

}  // namespace gpustream::storage
