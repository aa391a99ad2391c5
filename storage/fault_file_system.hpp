#pragma once
/// Internal to storage/: a RocksDB FileSystem that fails writes and syncs when a fault_injector says
/// so. Included only by event_store.cpp.

#include <rocksdb/file_system.h>

#include <memory>

#include "storage/fault_injector.hpp"

namespace gpustream::storage {

/// Wraps `base`; every writable file it opens consults `faults` on Append, Sync, Fsync and RangeSync.
[[nodiscard]] std::shared_ptr<rocksdb::FileSystem> make_fault_file_system(
    std::shared_ptr<rocksdb::FileSystem> base, std::shared_ptr<fault_injector> faults);

}  // namespace gpustream::storage
