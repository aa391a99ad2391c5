#pragma once
/// A RocksDB file system that hands every writable file it opens (new, reopened or reused) to the
/// subclass, which may wrap it: the base of the WAL progress file system and the fault-injecting
/// one. Storage-internal (it includes RocksDB).

#include <rocksdb/file_system.h>

#include <memory>
#include <string>

namespace gpustream::storage {

class wrapping_file_system : public rocksdb::FileSystemWrapper {
 public:
  using FileSystemWrapper::FileSystemWrapper;

  rocksdb::IOStatus NewWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override {
    return wrapped(target()->NewWritableFile(name, options, result, dbg), name, result);
  }
  rocksdb::IOStatus ReopenWritableFile(const std::string& name, const rocksdb::FileOptions& options,
                                       std::unique_ptr<rocksdb::FSWritableFile>* result,
                                       rocksdb::IODebugContext* dbg) override {
    return wrapped(target()->ReopenWritableFile(name, options, result, dbg), name, result);
  }
  rocksdb::IOStatus ReuseWritableFile(const std::string& name, const std::string& old_name,
                                      const rocksdb::FileOptions& options,
                                      std::unique_ptr<rocksdb::FSWritableFile>* result,
                                      rocksdb::IODebugContext* dbg) override {
    return wrapped(target()->ReuseWritableFile(name, old_name, options, result, dbg), name, result);
  }

 protected:
  /// Called with each writable file opened as `name`; may replace `file` with a wrapper of it.
  virtual void wrap(const std::string& name, std::unique_ptr<rocksdb::FSWritableFile>& file) = 0;

 private:
  rocksdb::IOStatus wrapped(rocksdb::IOStatus status, const std::string& name,
                            std::unique_ptr<rocksdb::FSWritableFile>* result) {
    if (status.ok()) wrap(name, *result);
    return status;
  }
};

}  // namespace gpustream::storage
