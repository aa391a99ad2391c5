#include "store_testing.hpp"

#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/perf_context.h>
#include <rocksdb/perf_level.h>

#include <functional>

#include <atomic>
#include <random>
#include <unistd.h>

namespace gpustream::storage::testing {

temp_dir::temp_dir() {
  static std::atomic<int> counter{0};
  path_ = std::filesystem::temp_directory_path() /
          ("gpustream-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

temp_dir::~temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);  // best effort: a leftover temp dir harms nothing
}

events::event_id make_id(std::uint64_t tag, std::uint64_t n) { return {tag, n}; }

new_event make_event(events::event_id id, std::string text, std::uint16_t type) {
  return new_event{id, type, std::move(text)};
}

std::vector<stream_append> one_stream(std::string stream, std::uint64_t expected, std::uint64_t tag,
                                      std::uint64_t first, std::size_t count) {
  stream_append append{std::move(stream), expected, {}};
  for (std::size_t i = 0; i < count; ++i) {
    const auto n = first + i;
    append.events.push_back(make_event(make_id(tag, n), "payload-" + std::to_string(n)));
  }
  return {std::move(append)};
}

namespace {

/// The store's RocksDB opened directly with every column family; `work` gets the database and a
/// lookup of families by name.
void with_raw_store(const std::filesystem::path& dir, const std::string& extra_family,
                    const std::function<void(rocksdb::DB&, const std::function<rocksdb::ColumnFamilyHandle*(
                                                                 const std::string&)>&)>& work) {
  rocksdb::DBOptions options;
  options.create_missing_column_families = true;
  std::vector<std::string> names;
  ASSERT_TRUE(rocksdb::DB::ListColumnFamilies(options, dir.string(), &names).ok()) << dir;
  if (!extra_family.empty()) names.push_back(extra_family);
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const auto& name : names) families.emplace_back(name, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(options, dir.string(), families, &handles, &raw).ok()) << dir;
  std::unique_ptr<rocksdb::DB> db(raw);
  work(*db, [&](const std::string& family) -> rocksdb::ColumnFamilyHandle* {
    for (std::size_t i = 0; i < names.size(); ++i) {
      if (names[i] == family) return handles[i];
    }
    ADD_FAILURE() << "no column family " << family << " in " << dir;
    return nullptr;
  });
  for (auto* handle : handles) EXPECT_TRUE(db->DestroyColumnFamilyHandle(handle).ok());
  EXPECT_TRUE(db->Close().ok());
}

std::string be64_key(std::uint64_t v) {
  std::string key(8, '\0');
  for (std::size_t i = 0; i < 8; ++i) key[i] = static_cast<char>(v >> (56 - 8 * i));
  return key;
}

}  // namespace

void raw_put(const std::filesystem::path& dir, const std::string& family, const std::string& key,
             const std::string& value, const std::string& extra_family) {
  with_raw_store(dir, extra_family, [&](rocksdb::DB& db, const auto& cf) {
    if (auto* handle = cf(family)) {
      EXPECT_TRUE(db.Put(rocksdb::WriteOptions(), handle, key, value).ok());
    }
  });
}

void flip_stored_byte(const std::filesystem::path& dir, const std::string& family,
                      const std::string& key, std::size_t offset) {
  with_raw_store(dir, "", [&](rocksdb::DB& db, const auto& cf) {
    auto* handle = cf(family);
    if (!handle) return;
    std::string value;
    ASSERT_TRUE(db.Get(rocksdb::ReadOptions(), handle, key, &value).ok()) << "no key in " << family;
    ASSERT_FALSE(value.empty());
    offset %= value.size();
    value[offset] = static_cast<char>(value[offset] ^ 0x10);
    ASSERT_TRUE(db.Put(rocksdb::WriteOptions(), handle, key, value).ok());
  });
}

void flip_byte_of_record(const std::filesystem::path& dir, std::uint64_t position, std::size_t offset) {
  flip_stored_byte(dir, "global", be64_key(position), offset);
}

namespace {

void delete_entry(const std::filesystem::path& dir, const std::string& family, bool last) {
  with_raw_store(dir, "", [&](rocksdb::DB& db, const auto& cf) {
    auto* handle = cf(family);
    if (!handle) return;
    std::unique_ptr<rocksdb::Iterator> it(db.NewIterator(rocksdb::ReadOptions(), handle));
    if (last) {
      it->SeekToLast();
    } else {
      it->SeekToFirst();
    }
    ASSERT_TRUE(it->Valid()) << family << " is empty";
    ASSERT_TRUE(db.Delete(rocksdb::WriteOptions(), handle, it->key()).ok());
  });
}

}  // namespace

void delete_first_entry(const std::filesystem::path& dir, const std::string& family) {
  delete_entry(dir, family, false);
}

void delete_last_entry(const std::filesystem::path& dir, const std::string& family) {
  delete_entry(dir, family, true);
}

std::unique_ptr<event_store> open_or_fail(const std::filesystem::path& dir, store_options options) {
  auto store = event_store::open(dir, std::move(options));
  if (!store) {
    ADD_FAILURE() << "cannot open store: " << store.error().message;
    return nullptr;
  }
  return std::move(store).value();
}

std::uint64_t block_bytes_read_by(const std::function<void()>& work) {
  const auto level = rocksdb::GetPerfLevel();
  rocksdb::SetPerfLevel(rocksdb::PerfLevel::kEnableCount);
  rocksdb::get_perf_context()->Reset();
  work();
  const std::uint64_t bytes = rocksdb::get_perf_context()->block_read_byte;
  rocksdb::SetPerfLevel(level);
  return bytes;
}

}  // namespace gpustream::storage::testing
