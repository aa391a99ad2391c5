#include "storage/event_store.hpp"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/filter_policy.h>
#include <rocksdb/slice_transform.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "events/crc32c.hpp"
#include "storage/fault_file_system.hpp"
#include "storage/keys.hpp"
#include "storage/log_read_ahead.hpp"

namespace gpustream::storage {

const char* to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::wrong_expected_version: return "wrong_expected_version";
    case errc::event_id_conflict: return "event_id_conflict";
    case errc::corruption: return "corruption";
    case errc::io_error: return "io_error";
    case errc::no_space: return "no_space";
    case errc::incompatible_format: return "incompatible_format";
    case errc::overloaded: return "overloaded";
    case errc::closed: return "closed";
  }
  return "unknown";
}

namespace {

enum column : std::size_t {
  cf_default,
  cf_global,
  cf_events,
  cf_dedup,
  cf_checkpoints,
  cf_projections,
  cf_snapshots,
  cf_count,
};

constexpr const char* column_names[cf_count] = {
    "default", "global", "events", "dedup", "checkpoints",
    "projections", "snapshots"};

error make_error(errc code, std::string message) { return error{code, std::move(message)}; }

/// Scans expected to visit at least this many records read RocksDB on a second thread; shorter
/// ones are not worth a thread.
constexpr std::uint64_t scan_read_ahead_events_min = 4096;

/// Translates a RocksDB status at the border of storage/.
error translate(const rocksdb::Status& status, std::string_view what) {
  std::string message = std::string(what) + ": " + status.ToString();
  if (status.IsNoSpace()) return make_error(errc::no_space, std::move(message));
  if (status.IsCorruption()) return make_error(errc::corruption, std::move(message));
  return make_error(errc::io_error, std::move(message));
}

std::int64_t system_clock_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

rocksdb::Slice slice(std::string_view s) { return {s.data(), s.size()}; }

std::span<const std::byte> bytes_of(const rocksdb::Slice& s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

/// An open RocksDB with its column family handles.
struct database {
  std::unique_ptr<rocksdb::DB> db;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;  // indexed by `column`

  rocksdb::ColumnFamilyHandle* cf(column c) const { return handles[c]; }

  ~database() {
    if (!db) return;
    for (auto* handle : all_handles) (void)db->DestroyColumnFamilyHandle(handle);
    // Close flushes nothing we rely on: every acknowledged append is already in the WAL.
    (void)db->Close();  // best effort at shutdown; errors here lose nothing acknowledged
  }

  std::vector<rocksdb::ColumnFamilyHandle*> all_handles;  // includes unknown families
};

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
    return {};
  }
  if (!status.ok()) return unexpected{translate(status, "reading the store format version")};
  if (value.size() != 8) {
    return unexpected{make_error(errc::corruption, "store format version in " + directory.string() +
                                                       " is not 8 bytes")};
  }
  const auto found = keys::load_be64(value);
  if (found != store_format_version) {
    const char* advice = found > store_format_version
                             ? "; it was written by a newer gpustream: run that version or newer"
                             : "; it was written by an older gpustream and needs a migration";
    return unexpected{make_error(
        errc::incompatible_format,
        "data directory " + directory.string() + " has store format version " +
            std::to_string(found) + ", but this gpustream reads and writes format version " +
            std::to_string(store_format_version) + advice)};
  }
  return {};
}

expected<std::unique_ptr<database>, error> open_database(const std::filesystem::path& directory,
                                                         rocksdb::Env* env, bool read_only) {
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
    return unexpected{translate(status, "opening the event store in " + directory.string())};
  }
  d->db.reset(raw);
  d->handles.assign(d->all_handles.begin(), d->all_handles.begin() + cf_count);
  if (auto checked = check_format(*d, directory, read_only); !checked) return unexpected{checked.error()};
  return d;
}

/// Global position of the last event in the log (0 when empty).
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

/// Decodes a stored record and checks that it is the one its key says it is.
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

/// Whether two appends are the same: same streams, same event ids in the same order.
bool same_append(const std::vector<stream_append>& a, const std::vector<stream_append>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const auto& x, const auto& y) {
    return x.stream == y.stream &&
           std::equal(x.events.begin(), x.events.end(), y.events.begin(), y.events.end(),
                      [](const auto& e, const auto& f) { return e.id == f.id; });
  });
}

error reused_id(const events::event_id& id) {
  return make_error(errc::event_id_conflict,
                    "event id " + id.to_string() +
                        " already begins another append (different streams, events or count); "
                        "retry an append only whole and unchanged, and give new appends new ids");
}

struct id_hash {
  std::size_t operator()(const events::event_id& id) const noexcept {
    return static_cast<std::size_t>(id.high * 0x9E3779B97F4A7C15ull ^ id.low);
  }
};

/// One item of the writer's queue: an append, or a task (a projection commit or snapshot save)
/// that must write through the writer so that failures and recovery are handled in one place.
struct pending_append {
  std::vector<stream_append> request;
  event_store::append_callback done;
  std::size_t event_count = 0;
  /// Set for a task: runs on the writer thread with the outcome of recovery (if one was needed).
  std::function<void(expected<void, error>)> task;
};

}  // namespace

class event_store::impl {
 public:
  impl(std::filesystem::path directory, store_options options)
      : directory_(std::move(directory)), options_(std::move(options)) {
    if (!options_.clock_us) options_.clock_us = system_clock_us;
    if (options_.faults) {
      env_ = rocksdb::NewCompositeEnv(
          make_fault_file_system(rocksdb::FileSystem::Default(), options_.faults));
    }
  }

  ~impl() {
    {
      std::lock_guard lock(queue_mutex_);
      stopping_ = true;
    }
    queue_cv_.notify_all();
    if (writer_.joinable()) writer_.join();  // the writer commits what is queued before it stops
    {
      std::lock_guard lock(sync_mutex_);
      sync_stopping_ = true;
    }
    sync_cv_.notify_all();
    if (syncer_.joinable()) syncer_.join();
  }

  expected<void, error> start() {
    auto opened = open_database(directory_, env(), options_.read_only);
    if (!opened) return unexpected{opened.error()};
    db_ = std::move(opened).value();
    auto last = read_last_position(*db_);
    if (!last) return unexpected{last.error()};
    last_position_.store(*last);
    next_position_ = *last + 1;
    synced_ = *last;
    if (!options_.read_only) writer_ = std::thread([this] { writer_loop(); });
    if (!options_.read_only && options_.mode == durability::sync) {
      syncer_ = std::thread([this] { syncer_loop(); });
    }
    return {};
  }

  const store_options& options() const noexcept { return options_; }
  std::uint64_t last_position() const noexcept { return last_position_.load(); }

  std::uint64_t wait_for_append(std::uint64_t position, std::chrono::milliseconds wait_max) const {
    std::unique_lock lock(position_mutex_);
    position_cv_.wait_for(lock, wait_max, [&] { return last_position_.load() > position; });
    return last_position_.load();
  }

  void append_async(std::vector<stream_append> request, append_callback done);
  /// Runs `write` on the writer thread and returns its result; a failed write makes the writer
  /// reopen the database before its next write, as for appends.
  expected<void, error> run_on_writer(const std::function<rocksdb::Status()>& write,
                                      std::string_view what);

  expected<std::vector<events::record>, error> read_stream(std::string_view stream,
                                                           std::uint64_t from, std::uint64_t to,
                                                           std::size_t max) const;
  expected<std::uint64_t, error> scan(std::uint64_t from, std::size_t max, const visitor& visit) const;
  expected<std::uint64_t, error> stream_version(std::string_view stream) const;
  expected<event_store::index_report, error> verify_indexes() const;

  expected<void, error> save_snapshot(std::string_view stream, std::uint64_t version,
                                      std::string_view state);
  expected<std::optional<snapshot>, error> load_snapshot(std::string_view stream) const;
  expected<void, error> commit_projection(std::string_view name, std::uint64_t expected_checkpoint,
                                          std::uint64_t new_checkpoint,
                                          std::span<const projection_write> writes);
  expected<std::uint64_t, error> projection_checkpoint(std::string_view name) const;
  expected<std::optional<std::string>, error> read_projection(std::string_view name,
                                                              std::string_view key) const;

 private:
  /// What the writer decided for one append of a group.
  struct staged {
    std::optional<expected<append_result, error>> outcome;  // known without writing
    append_result result;                                     // valid when it must be written
    std::optional<std::size_t> same_as;                       // an in-group retry of that append
  };

  /// Per-group scratch state; committed to the writer's caches only if the batch is written.
  struct group_state {
    rocksdb::WriteBatch batch;
    std::unordered_map<std::string, std::uint64_t> heads;
    std::unordered_map<events::event_id, std::size_t, id_hash> appends;  // first id -> index in group
    // What the id index holds for each append's first event id, looked up for the whole group at
    // once (an empty request is looked up under a nil id and refused by validation).
    std::vector<rocksdb::PinnableSlice> stored;
    std::vector<rocksdb::Status> stored_status;
    std::string encoded;  // one record at a time, reused
    std::uint64_t next_position = 0;
  };

  /// A committed group waiting for the syncer: its answers, given once the log is durable through
  /// `durable_through`.
  struct written_group {
    std::vector<pending_append> items;
    std::vector<expected<append_result, error>> outcomes;
    std::uint64_t durable_through = 0;
  };

  std::vector<pending_append> take_group();
  void writer_loop();
  void syncer_loop();
  void publish(std::uint64_t position);
  void set_writer_idle(bool idle);
  void lookup_first_ids(const std::vector<pending_append>& group, group_state& state);
  void deliver(written_group& group, const expected<void, error>& durable);
  void commit_group(std::vector<pending_append>& group);
  expected<void, error> recover_if_needed();
  staged stage(const std::vector<stream_append>& request, std::size_t index, group_state& group,
               const std::vector<pending_append>& pending);
  expected<void, error> validate(const std::vector<stream_append>& request) const;
  expected<std::uint64_t, error> head_of(const std::string& stream, const group_state& group);
  expected<append_result, error> stored_result(const std::vector<stream_append>& request,
                                               std::uint64_t first_position, std::uint64_t count);
  rocksdb::WriteOptions write_options() const {
    rocksdb::WriteOptions write;
    write.sync = options_.mode == durability::sync;
    return write;
  }
  expected<std::uint64_t, error> read_checkpoint(database& d, std::string_view name) const;
  rocksdb::Env* env() const { return env_ ? env_.get() : rocksdb::Env::Default(); }

  std::filesystem::path directory_;
  store_options options_;
  std::unique_ptr<rocksdb::Env> env_;  // set when faults are injected

  // The database; readers hold the lock shared, the writer exclusively only to reopen it after a
  // failed write (so that the store's view equals what reached the disk).
  mutable std::shared_mutex db_mutex_;
  std::unique_ptr<database> db_;

  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<pending_append> queue_;
  std::size_t queued_events_ = 0;
  bool stopping_ = false;
  std::thread writer_;

  // The syncer (sync mode only): fsyncs the WAL behind the writer and answers its groups.
  std::mutex sync_mutex_;
  std::condition_variable sync_cv_;
  std::condition_variable sync_idle_cv_;
  std::deque<written_group> sync_queue_;
  std::size_t sync_in_flight_ = 0;  // groups queued or being synced
  bool sync_stopping_ = false;
  std::atomic<bool> sync_failed_{false};  // set by the syncer, read by the writer
  bool writer_idle_ = false;              // the writer waits for appends (under sync_mutex_)
  std::uint64_t synced_ = 0;

 public:
  std::atomic<std::uint64_t> stat_groups_{0};
  std::atomic<std::uint64_t> stat_grouped_appends_{0};
  std::atomic<std::uint64_t> stat_group_events_max_{0};
  std::atomic<std::uint64_t> stat_syncs_{0};

 private:  // the log is durable through here; syncer's, or the writer's while idle
  std::thread syncer_;

  std::atomic<std::uint64_t> last_position_{0};
  mutable std::mutex position_mutex_;
  mutable std::condition_variable position_cv_;

  // Writer thread only.
  std::uint64_t next_position_ = 1;
  std::unordered_map<std::string, std::uint64_t> heads_;
  bool reopen_needed_ = false;
};

void event_store::impl::append_async(std::vector<stream_append> request, append_callback done) {
  std::size_t count = 0;
  for (const auto& s : request) count += s.events.size();
  {
    std::unique_lock lock(queue_mutex_);
    if (stopping_ || options_.read_only) {
      lock.unlock();
      done(unexpected{make_error(errc::closed, options_.read_only
                                                   ? "the event store was opened read-only"
                                                   : "the event store is shutting down")});
      return;
    }
    if (queued_events_ + count > options_.append_queue_events_max) {
      lock.unlock();
      done(unexpected{make_error(
          errc::overloaded, "the store's append queue is full (append_queue_events_max " +
                                std::to_string(options_.append_queue_events_max) +
                                " events waiting); retry later")});
      return;
    }
    queued_events_ += count;
    queue_.push_back(pending_append{std::move(request), std::move(done), count, {}});
  }
  queue_cv_.notify_one();
}

expected<void, error> event_store::impl::run_on_writer(const std::function<rocksdb::Status()>& write,
                                                      std::string_view what) {
  std::promise<expected<void, error>> promise;
  pending_append item;
  item.task = [&](expected<void, error> ready) {
    if (!ready) return promise.set_value(std::move(ready));
    std::shared_lock lock(db_mutex_);
    const auto status = write();
    if (status.ok()) return promise.set_value({});
    reopen_needed_ = true;
    promise.set_value(unexpected{translate(status, what)});
  };
  {
    std::unique_lock lock(queue_mutex_);
    if (stopping_ || options_.read_only) {
      return unexpected{make_error(errc::closed, options_.read_only
                                                     ? "the event store was opened read-only"
                                                     : "the event store is shutting down")};
    }
    queue_.push_back(std::move(item));
  }
  queue_cv_.notify_one();
  return promise.get_future().get();
}

std::vector<pending_append> event_store::impl::take_group() {
  std::vector<pending_append> group;
  std::unique_lock lock(queue_mutex_);
  if (queue_.empty() && !stopping_) {
    set_writer_idle(true);  // lets the syncer fsync now rather than wait for this thread
    queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    set_writer_idle(false);
  }
  if (!queue_.empty() && queue_.front().task) {  // a task runs alone
    group.push_back(std::move(queue_.front()));
    queue_.pop_front();
    return group;
  }
  std::size_t events = 0;
  while (!queue_.empty() && !queue_.front().task &&
         (group.empty() || events + queue_.front().event_count <= options_.group_commit_events_max)) {
    events += queue_.front().event_count;
    queued_events_ -= queue_.front().event_count;
    group.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  return group;
}

void event_store::impl::set_writer_idle(bool idle) {
  {
    std::lock_guard lock(sync_mutex_);
    writer_idle_ = idle;
  }
  if (idle) sync_cv_.notify_all();
}

void event_store::impl::writer_loop() {
  for (;;) {
    auto group = take_group();
    if (group.empty()) return;  // stopping, and nothing left to commit
    if (group.front().task) {
      group.front().task(recover_if_needed());
      continue;
    }
    commit_group(group);
  }
}

expected<void, error> event_store::impl::recover_if_needed() {
  if (sync_failed_.exchange(false)) reopen_needed_ = true;
  if (!reopen_needed_) return {};
  {
    // Reopen only once every group already written has been answered.
    std::unique_lock idle(sync_mutex_);
    sync_idle_cv_.wait(idle, [&] { return sync_in_flight_ == 0; });
  }
  std::unique_lock lock(db_mutex_);
  db_.reset();
  auto opened = open_database(directory_, env(), false);
  if (!opened) return unexpected{opened.error()};
  db_ = std::move(opened).value();
  auto last = read_last_position(*db_);
  if (!last) return unexpected{last.error()};
  // A failed write may still have reached the WAL; reopening replayed it, so continue from there.
  heads_.clear();
  next_position_ = *last + 1;
  last_position_.store(*last);
  synced_ = *last;  // the syncer is idle; recovery flushed the replayed WAL into synced tables
  reopen_needed_ = false;
  sync_failed_.store(false);
  return {};
}

void event_store::impl::commit_group(std::vector<pending_append>& group) {
  std::size_t group_events = 0;
  for (const auto& item : group) group_events += item.event_count;
  stat_groups_.fetch_add(1, std::memory_order_relaxed);
  stat_grouped_appends_.fetch_add(group.size(), std::memory_order_relaxed);
  if (group_events > stat_group_events_max_.load(std::memory_order_relaxed)) {
    stat_group_events_max_.store(group_events, std::memory_order_relaxed);  // only this thread writes
  }
  std::vector<staged> decisions;
  decisions.reserve(group.size());
  group_state state;
  auto recovered = recover_if_needed();
  bool written = false;
  if (recovered) {
    state.next_position = next_position_;
    lookup_first_ids(group, state);
    for (std::size_t i = 0; i < group.size(); ++i) {
      decisions.push_back(stage(group[i].request, i, state, group));
    }
    if (state.batch.Count() > 0) {
      // In `sync` mode the WAL is fsynced by the syncer thread, so that this thread can prepare the
      // next group meanwhile; readers see nothing before last_position_ says it is acknowledged.
      rocksdb::WriteOptions write;
      write.sync = false;
      std::shared_lock lock(db_mutex_);
      const auto status = db_->db->Write(write, &state.batch);
      if (status.ok()) {
        written = true;
      } else {
        recovered = unexpected{translate(status, "appending to the event store")};
        reopen_needed_ = true;
      }
    }
  }
  if (written) {
    if (heads_.size() + state.heads.size() > options_.head_cache_streams_max) heads_.clear();
    for (auto& [stream, head] : state.heads) heads_[stream] = head;
    next_position_ = state.next_position;
  }
  std::vector<expected<append_result, error>> outcomes;
  outcomes.reserve(group.size());
  for (std::size_t i = 0; i < group.size(); ++i) {
    if (!recovered) {
      outcomes.push_back(unexpected{recovered.error()});
    } else if (decisions[i].same_as) {
      outcomes.push_back(outcomes[*decisions[i].same_as]);
    } else if (decisions[i].outcome) {
      outcomes.push_back(std::move(*decisions[i].outcome));
    } else {
      outcomes.push_back(std::move(decisions[i].result));
    }
  }
  // Acknowledge what this group answers (new events, and retries of earlier appends) once the log
  // is durable through the last position any of its answers names.
  std::uint64_t durable_through = 0;
  for (const auto& outcome : outcomes) {
    if (outcome) durable_through = std::max(durable_through, outcome->last_position);
  }
  written_group done{std::move(group), std::move(outcomes), durable_through};
  if (options_.mode == durability::sync) {
    {
      std::lock_guard lock(sync_mutex_);
      sync_queue_.push_back(std::move(done));
      ++sync_in_flight_;
    }
    sync_cv_.notify_one();
    return;
  }
  publish(done.durable_through);
  deliver(done, {});
}

void event_store::impl::lookup_first_ids(const std::vector<pending_append>& group, group_state& state) {
  std::vector<std::string> id_keys;
  id_keys.reserve(group.size());
  for (const auto& item : group) {
    const auto& r = item.request;
    const bool has_event = !r.empty() && !r.front().events.empty();
    id_keys.push_back(keys::dedup_key(has_event ? r.front().events.front().id : events::event_id{}));
  }
  const std::vector<rocksdb::Slice> slices(id_keys.begin(), id_keys.end());
  state.stored = std::vector<rocksdb::PinnableSlice>(slices.size());
  state.stored_status.assign(slices.size(), rocksdb::Status());
  std::shared_lock lock(db_mutex_);
  db_->db->MultiGet(rocksdb::ReadOptions(), db_->cf(cf_dedup), slices.size(), slices.data(),
                    state.stored.data(), state.stored_status.data());
}

void event_store::impl::publish(std::uint64_t position) {
  {
    std::lock_guard lock(position_mutex_);
    if (position <= last_position_.load()) return;
    last_position_.store(position);
  }
  position_cv_.notify_all();
}

void event_store::impl::deliver(written_group& group, const expected<void, error>& durable) {
  for (std::size_t i = 0; i < group.items.size(); ++i) {
    auto& outcome = group.outcomes[i];
    if (!durable && outcome) outcome = unexpected{durable.error()};  // not acknowledged after all
    group.items[i].done(std::move(outcome));
  }
}

void event_store::impl::syncer_loop() {
  for (;;) {
    std::deque<written_group> batch;
    {
      std::unique_lock lock(sync_mutex_);
      sync_cv_.wait(lock, [&] { return sync_stopping_ || !sync_queue_.empty(); });
      if (sync_queue_.empty()) return;  // stopping, and everything delivered
      // Group commit: while the writer is still writing appends that arrived before now, wait for
      // them (at most group_commit_wait_max), so that one fsync acknowledges them all.
      const auto deadline = std::chrono::steady_clock::now() + options_.group_commit_wait_max;
      for (;;) {
        std::move(sync_queue_.begin(), sync_queue_.end(), std::back_inserter(batch));
        sync_queue_.clear();
        if (writer_idle_ || sync_stopping_) break;
        if (!sync_cv_.wait_until(lock, deadline, [&] {
              return writer_idle_ || sync_stopping_ || !sync_queue_.empty();
            })) {
          break;
        }
      }
    }
    // One fsync makes every group written so far durable.
    std::uint64_t through = 0;
    for (const auto& g : batch) through = std::max(through, g.durable_through);
    expected<void, error> durable;
    if (through > synced_) {
      std::shared_lock lock(db_mutex_);
      const auto status = db_->db->SyncWAL();
      stat_syncs_.fetch_add(1, std::memory_order_relaxed);
      if (status.ok()) {
        synced_ = through;
      } else {
        durable = unexpected{translate(status, "syncing the event log")};
        sync_failed_.store(true);
      }
    }
    if (durable) publish(synced_);
    for (auto& g : batch) deliver(g, durable);
    {
      std::lock_guard lock(sync_mutex_);
      sync_in_flight_ -= batch.size();
    }
    sync_idle_cv_.notify_all();
  }
}

expected<void, error> event_store::impl::validate(const std::vector<stream_append>& request) const {
  if (request.empty()) return unexpected{make_error(errc::invalid_argument, "append has no streams")};
  std::size_t count = 0;
  std::unordered_set<std::string_view> streams;
  std::vector<events::event_id> ids;
  for (const auto& s : request) {
    if (!valid_name(s.stream, options_.stream_id_bytes_max)) {
      return unexpected{make_error(errc::invalid_argument,
                                   "stream id '" + s.stream.substr(0, 64) +
                                       "' must be 1 to " + std::to_string(options_.stream_id_bytes_max) +
                                       " printable ASCII characters without spaces")};
    }
    if (!streams.insert(s.stream).second) {
      return unexpected{make_error(errc::invalid_argument,
                                   "stream " + s.stream + " appears twice in one append")};
    }
    if (s.events.empty()) {
      return unexpected{make_error(errc::invalid_argument, "append to " + s.stream + " has no events")};
    }
    for (const auto& e : s.events) {
      if (e.id.is_nil()) {
        return unexpected{make_error(errc::invalid_argument, "event id must not be all zero")};
      }
      ids.push_back(e.id);
      if (e.payload.size() > options_.payload_bytes_max) {
        return unexpected{make_error(errc::invalid_argument,
                                     "event payload of " + std::to_string(e.payload.size()) +
                                         " bytes exceeds payload_bytes_max " +
                                         std::to_string(options_.payload_bytes_max))};
      }
    }
    count += s.events.size();
  }
  std::sort(ids.begin(), ids.end());
  if (auto twice = std::adjacent_find(ids.begin(), ids.end()); twice != ids.end()) {
    return unexpected{make_error(errc::invalid_argument,
                                 "event id " + twice->to_string() + " appears twice in one append")};
  }
  if (count > options_.append_events_max) {
    return unexpected{make_error(errc::invalid_argument,
                                 "append of " + std::to_string(count) +
                                     " events exceeds append_events_max " +
                                     std::to_string(options_.append_events_max))};
  }
  return {};
}

expected<std::uint64_t, error> event_store::impl::head_of(const std::string& stream,
                                                         const group_state& group) {
  if (auto it = group.heads.find(stream); it != group.heads.end()) return it->second;
  if (auto it = heads_.find(stream); it != heads_.end()) return it->second;
  std::shared_lock lock(db_mutex_);
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_events)));
  it->SeekForPrev(slice(keys::stream_key(stream, ~std::uint64_t{0})));
  if (!it->status().ok()) return unexpected{translate(it->status(), "reading the head of " + stream)};
  if (!it->Valid() || !keys::belongs(stream, it->key().ToStringView())) return std::uint64_t{0};
  const auto run = keys::parse_run(stream, it->key().ToStringView(), it->value().ToStringView());
  if (!run) return unexpected{corrupt_index(stream)};
  return run->last_version();
}

event_store::impl::staged event_store::impl::stage(const std::vector<stream_append>& request,
                                                   std::size_t index, group_state& group,
                                                   const std::vector<pending_append>& pending) {
  staged decision;
  auto fail = [&](error e) {
    decision.outcome = unexpected{std::move(e)};
    return decision;
  };
  if (auto valid = validate(request); !valid) return fail(valid.error());

  // Idempotency: an append is known by the id of its first event. A retry (the same ids, streams
  // and counts) is answered as the first attempt was; anything else reusing that id is a conflict.
  const auto& first_id = request.front().events.front().id;
  if (auto it = group.appends.find(first_id); it != group.appends.end()) {
    if (!same_append(pending[it->second].request, request)) return fail(reused_id(first_id));
    decision.same_as = it->second;
    return decision;
  }
  const auto& found = group.stored_status[index];
  const auto stored = group.stored[index].ToStringView();
  if (found.ok()) {
    if (stored.size() != 16) return fail(make_error(errc::corruption, "id index entry is not 16 bytes"));
    decision.outcome = stored_result(request, keys::load_be64(stored), keys::load_be64(std::string_view(stored).substr(8)));
    return decision;
  }
  if (!found.IsNotFound()) return fail(translate(found, "checking the append's id"));

  // Optimistic concurrency, then stage the events.
  for (const auto& s : request) {
    auto head = head_of(s.stream, group);
    if (!head) return fail(head.error());
    if (s.expected_version != any_version && s.expected_version != *head) {
      return fail(make_error(errc::wrong_expected_version,
                             "stream " + s.stream + " is at version " + std::to_string(*head) +
                                 ", but the append expected version " +
                                 std::to_string(s.expected_version)));
    }
  }
  const std::int64_t now = options_.clock_us();
  decision.result.first_position = group.next_position;
  for (const auto& s : request) {
    std::uint64_t version = *head_of(s.stream, group);
    stream_result where{s.stream, version + 1, version + s.events.size()};
    group.batch.Put(db_->cf(cf_events), slice(keys::stream_key(s.stream, version + 1)),
                    slice(keys::run_value(group.next_position, s.events.size())));
    for (const auto& e : s.events) {
      ++version;
      const std::uint64_t position = group.next_position++;
      const events::record_view r{s.stream, version, position, e.id, now, e.type,
                                  std::as_bytes(std::span(e.payload))};
      events::encode_record_into(r, group.encoded);
      group.batch.Put(db_->cf(cf_global), slice(keys::be64(position)), slice(group.encoded));
    }
    group.heads[s.stream] = version;
    decision.result.streams.push_back(std::move(where));
  }
  decision.result.last_position = group.next_position - 1;
  const auto count = decision.result.last_position - decision.result.first_position + 1;
  group.batch.Put(db_->cf(cf_dedup), slice(keys::dedup_key(first_id)),
                  slice(keys::run_value(decision.result.first_position, count)));
  group.appends.emplace(first_id, index);
  return decision;
}

expected<append_result, error> event_store::impl::stored_result(const std::vector<stream_append>& request,
                                                              std::uint64_t first_position,
                                                              std::uint64_t count) {
  const auto& first_id = request.front().events.front().id;
  std::size_t requested = 0;
  for (const auto& s : request) requested += s.events.size();
  if (requested != count) return unexpected{reused_id(first_id)};
  append_result result{first_position, first_position + count - 1, {}};
  std::shared_lock lock(db_mutex_);
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_global)));
  it->Seek(slice(keys::be64(first_position)));
  std::vector<std::uint64_t> scratch;
  std::uint64_t position = first_position;
  for (const auto& s : request) {
    stream_result where{s.stream, 0, 0};
    for (const auto& e : s.events) {
      if (!it->Valid() || it->key().ToStringView() != keys::be64(position)) {
        if (!it->status().ok()) return unexpected{translate(it->status(), "reading an earlier append")};
        return unexpected{make_error(errc::corruption, "id index points at missing position " +
                                                           std::to_string(position))};
      }
      auto r = decode_stored(it->value(), position, scratch);
      if (!r) return unexpected{r.error()};
      if (r->id != e.id || r->stream != s.stream) return unexpected{reused_id(first_id)};
      if (where.first_version == 0) where.first_version = r->version;
      where.last_version = r->version;
      it->Next();
      ++position;
    }
    result.streams.push_back(std::move(where));
  }
  return result;
}

expected<std::vector<events::record>, error> event_store::impl::read_stream(
    std::string_view stream, std::uint64_t from, std::uint64_t to, std::size_t max) const {
  std::vector<events::record> out;
  max = std::min(max, options_.read_events_max);
  if (from > to || max == 0) return out;
  from = std::max<std::uint64_t>(from, 1);
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  const std::uint64_t acknowledged = last_position_.load();
  // Positions of the wanted versions, from the runs that hold them.
  std::vector<std::uint64_t> positions;
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_events)));
  const auto from_key = keys::stream_key(stream, from);
  it->SeekForPrev(slice(from_key));  // the run that may contain `from`
  if (!it->Valid() || !keys::belongs(stream, it->key().ToStringView())) it->Seek(slice(from_key));
  for (; it->Valid() && positions.size() < max; it->Next()) {
    const auto key = it->key().ToStringView();
    if (!keys::belongs(stream, key)) break;
    const auto run = keys::parse_run(stream, key, it->value().ToStringView());
    if (!run) return unexpected{corrupt_index(stream)};
    if (run->first_version > to || run->last_position() > acknowledged) break;
    const auto last = std::min(to, run->last_version());
    for (auto v = std::max(from, run->first_version); v <= last && positions.size() < max; ++v) {
      positions.push_back(run->position_of(v));
    }
  }
  if (!it->status().ok()) return unexpected{translate(it->status(), "reading stream")};
  // A run is contiguous in the global order too: read it with one iterator.
  out.reserve(positions.size());
  std::vector<std::uint64_t> scratch;
  std::unique_ptr<rocksdb::Iterator> global(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_global)));
  for (std::size_t i = 0; i < positions.size(); ++i) {
    if (i == 0 || positions[i] != positions[i - 1] + 1) global->Seek(slice(keys::be64(positions[i])));
    else global->Next();
    if (!global->Valid() || global->key().size() != 8 ||
        keys::load_be64(global->key().ToStringView()) != positions[i]) {
      if (!global->status().ok()) return unexpected{translate(global->status(), "reading stream")};
      return unexpected{make_error(errc::corruption, "index of stream " + std::string(stream) +
                                                         " points at missing position " +
                                                         std::to_string(positions[i]))};
    }
    auto r = decode_stored(global->value(), positions[i], scratch);
    if (!r) return unexpected{r.error()};
    if (r->stream != stream) {
      return unexpected{make_error(errc::corruption, "index of stream " + std::string(stream) +
                                                         " points at " + describe(*r))};
    }
    out.push_back(r->to_record());
  }
  return out;
}

expected<std::uint64_t, error> event_store::impl::scan(std::uint64_t from, std::size_t max,
                                                      const visitor& visit) const {
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  from = std::max<std::uint64_t>(from, 1);
  const auto acknowledged = last_position_.load();
  const auto first_key = keys::be64(from);
  const auto end_key = keys::be64(acknowledged + 1);
  rocksdb::Slice upper(end_key);
  rocksdb::ReadOptions read;
  read.iterate_upper_bound = &upper;
  read.readahead_size = 2u << 20;
  read.fill_cache = false;  // a scan reads each block once: keep the cache for point reads
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(read, db_->cf(cf_global)));
  it->Seek(slice(first_key));
  const std::uint64_t expected_count = acknowledged >= from ? std::min<std::uint64_t>(max, acknowledged - from + 1) : 0;
  std::uint64_t visited = 0;
  std::vector<std::uint64_t> scratch;
  if (expected_count < scan_read_ahead_events_min) {
    for (; it->Valid() && visited < max; it->Next()) {
      if (it->key().size() != 8) {
        return unexpected{make_error(errc::corruption, "global index key is not 8 bytes")};
      }
      auto r = decode_stored(it->value(), keys::load_be64(it->key().ToStringView()), scratch);
      if (!r) return unexpected{r.error()};
      if (auto v = visit(*r); !v) return unexpected{v.error()};
      ++visited;
    }
    if (!it->status().ok()) return unexpected{translate(it->status(), "scanning the log")};
    return visited;
  }
  // A long scan: RocksDB is read on a second thread while this one checks, decodes and visits.
  log_read_ahead ahead(std::move(it), max);
  while (auto batch = ahead.next()) {
    for (const auto& entry : batch->entries) {
      auto r = decode_stored(batch->bytes_of(entry), entry.position, scratch);
      if (!r) return unexpected{r.error()};
      if (auto v = visit(*r); !v) return unexpected{v.error()};
      ++visited;
    }
    if (batch->failure) return unexpected{*batch->failure};
    ahead.recycle(std::move(batch));
  }
  return visited;
}

expected<std::uint64_t, error> event_store::impl::stream_version(std::string_view stream) const {
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_events)));
  const auto acknowledged = last_position_.load();
  for (it->SeekForPrev(slice(keys::stream_key(stream, ~std::uint64_t{0}))); it->Valid(); it->Prev()) {
    const auto key = it->key().ToStringView();
    if (!keys::belongs(stream, key)) break;
    const auto run = keys::parse_run(stream, key, it->value().ToStringView());
    if (!run) return unexpected{corrupt_index(stream)};
    // Skip a run whose append is being written right now but is not yet acknowledged.
    if (run->last_position() <= acknowledged) return run->last_version();
  }
  if (!it->status().ok()) return unexpected{translate(it->status(), "reading a stream version")};
  return std::uint64_t{0};
}

expected<void, error> event_store::impl::save_snapshot(std::string_view stream, std::uint64_t version,
                                                       std::string_view state) {
  auto head = stream_version(stream);
  if (!head) return unexpected{head.error()};
  if (version == 0 || version > *head) {
    return unexpected{make_error(errc::invalid_argument,
                                 "snapshot of " + std::string(stream) + " at version " +
                                     std::to_string(version) + " but the stream is at version " +
                                     std::to_string(*head))};
  }
  std::string value = keys::be64(version);
  value.append(state);
  const auto crc = events::crc32c(std::as_bytes(std::span(value.data(), value.size())));
  for (int i = 0; i < 4; ++i) value.push_back(static_cast<char>((crc >> (8 * i)) & 0xFFu));
  return run_on_writer(
      [&] { return db_->db->Put(write_options(), db_->cf(cf_snapshots), slice(stream), slice(value)); },
      "saving a snapshot");
}

expected<std::optional<snapshot>, error> event_store::impl::load_snapshot(std::string_view stream) const {
  std::string value;
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  const auto status = db_->db->Get(rocksdb::ReadOptions(), db_->cf(cf_snapshots), slice(stream), &value);
  if (status.IsNotFound()) return std::optional<snapshot>{};
  if (!status.ok()) return unexpected{translate(status, "loading a snapshot")};
  if (value.size() < 12) {
    return unexpected{make_error(errc::corruption, "snapshot of " + std::string(stream) + " is truncated")};
  }
  const std::string_view body(value.data(), value.size() - 4);
  std::uint32_t stored = 0;
  for (int i = 3; i >= 0; --i) {
    stored = (stored << 8) | static_cast<unsigned char>(value[value.size() - 4 + static_cast<std::size_t>(i)]);
  }
  if (events::crc32c(std::as_bytes(std::span(body.data(), body.size()))) != stored) {
    return unexpected{make_error(errc::corruption,
                                 "snapshot of " + std::string(stream) + " failed its CRC32C check")};
  }
  return std::optional<snapshot>{snapshot{keys::load_be64(body), std::string(body.substr(8))}};
}

expected<std::uint64_t, error> event_store::impl::read_checkpoint(database& d,
                                                                  std::string_view name) const {
  std::string value;
  const auto status = d.db->Get(rocksdb::ReadOptions(), d.cf(cf_checkpoints), slice(name), &value);
  if (status.IsNotFound()) return std::uint64_t{0};
  if (!status.ok()) return unexpected{translate(status, "reading a projection checkpoint")};
  if (value.size() != 8) {
    return unexpected{make_error(errc::corruption, "checkpoint of " + std::string(name) + " is not 8 bytes")};
  }
  return keys::load_be64(value);
}

expected<void, error> event_store::impl::commit_projection(std::string_view name,
                                                           std::uint64_t expected_checkpoint,
                                                           std::uint64_t new_checkpoint,
                                                           std::span<const projection_write> writes) {
  if (!valid_name(name, options_.stream_id_bytes_max)) {
    return unexpected{make_error(errc::invalid_argument, "projection name '" + std::string(name) +
                                                             "' must be printable ASCII without spaces")};
  }
  if (new_checkpoint < expected_checkpoint || new_checkpoint > last_position()) {
    return unexpected{make_error(errc::invalid_argument,
                                 "projection checkpoint must move forward within the log: from " +
                                     std::to_string(expected_checkpoint) + " to " +
                                     std::to_string(new_checkpoint) + ", last position " +
                                     std::to_string(last_position()))};
  }
  // The writer runs commits one at a time, so checking the checkpoint and writing are one step.
  std::optional<error> refused;
  auto committed = run_on_writer(
      [&] {
        auto current = read_checkpoint(*db_, name);
        if (!current || *current != expected_checkpoint) {
          refused = current ? make_error(errc::wrong_expected_version,
                                         "projection " + std::string(name) + " is at checkpoint " +
                                             std::to_string(*current) + ", not " +
                                             std::to_string(expected_checkpoint))
                            : current.error();
          return rocksdb::Status::OK();
        }
        rocksdb::WriteBatch batch;
        for (const auto& w : writes) {
          const auto key = keys::projection_key(name, w.key);
          if (w.erase) batch.Delete(db_->cf(cf_projections), slice(key));
          else batch.Put(db_->cf(cf_projections), slice(key), slice(w.value));
        }
        batch.Put(db_->cf(cf_checkpoints), slice(name), slice(keys::be64(new_checkpoint)));
        return db_->db->Write(write_options(), &batch);
      },
      "committing projection " + std::string(name));
  if (!committed) return committed;
  if (refused) return unexpected{std::move(*refused)};
  return {};
}

expected<std::uint64_t, error> event_store::impl::projection_checkpoint(std::string_view name) const {
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  return read_checkpoint(*db_, name);
}

expected<std::optional<std::string>, error> event_store::impl::read_projection(
    std::string_view name, std::string_view key) const {
  std::string value;
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  const auto status = db_->db->Get(rocksdb::ReadOptions(), db_->cf(cf_projections),
                                   slice(keys::projection_key(name, key)), &value);
  if (status.IsNotFound()) return std::optional<std::string>{};
  if (!status.ok()) return unexpected{translate(status, "reading projection " + std::string(name))};
  return std::optional<std::string>{std::move(value)};
}

namespace {

/// A fingerprint of (stream, version), to match index entries against records without keeping
/// every stream id in memory.
std::uint64_t fingerprint(std::string_view stream, std::uint64_t version) {
  return std::hash<std::string_view>{}(stream) * 0x9E3779B97F4A7C15ull ^ (version + 0x632BE59BD9B4E019ull);
}

}  // namespace

expected<event_store::index_report, error> event_store::impl::verify_indexes() const {
  std::shared_lock lock(db_mutex_);
  if (!db_) return unexpected{make_error(errc::io_error, "the store is reopening after a disk failure")};
  const auto last = last_position_.load();
  event_store::index_report report;
  std::vector<std::uint64_t> fingerprints(last + 1, 0);     // of (stream, version), by position
  std::vector<events::event_id> ids(last + 1);               // by position
  std::vector<bool> covered(last + 1, false);
  auto broken = [](std::string message) { return unexpected{make_error(errc::corruption, std::move(message))}; };

  // Every record: remember what it is.
  std::vector<std::uint64_t> scratch;
  std::unique_ptr<rocksdb::Iterator> global(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_global)));
  for (global->SeekToFirst(); global->Valid(); global->Next()) {
    if (global->key().size() != 8) return broken("global index key is not 8 bytes");
    const auto position = keys::load_be64(global->key().ToStringView());
    if (position == 0 || position > last) {
      return broken("record at position " + std::to_string(position) + " lies beyond the last position " +
                    std::to_string(last));
    }
    auto r = decode_stored(global->value(), position, scratch);
    if (!r) return unexpected{r.error()};
    fingerprints[position] = fingerprint(r->stream, r->version);
    ids[position] = r->id;
    ++report.events;
  }
  if (!global->status().ok()) return unexpected{translate(global->status(), "verifying the log")};

  // Every stream index run: versions contiguous from 1, pointing at exactly those records.
  std::unique_ptr<rocksdb::Iterator> index(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_events)));
  std::string stream;
  std::uint64_t next_version = 1;
  for (index->SeekToFirst(); index->Valid(); index->Next()) {
    const auto key = index->key().ToStringView();
    const auto zero = key.find('\0');
    if (zero == std::string_view::npos || key.size() != zero + 9) return broken("stream index key is malformed");
    if (key.substr(0, zero) != stream) {
      stream = std::string(key.substr(0, zero));
      next_version = 1;
      ++report.streams;
    }
    const auto run = keys::parse_run(stream, key, index->value().ToStringView());
    if (!run) return unexpected{corrupt_index(stream)};
    if (run->first_version != next_version || run->count == 0) {
      return broken("stream " + stream + " index jumps to version " + std::to_string(run->first_version) +
                    " where version " + std::to_string(next_version) + " was due");
    }
    for (auto v = run->first_version; v <= run->last_version(); ++v) {
      const auto position = run->position_of(v);
      if (position > last || covered[position] || fingerprints[position] != fingerprint(stream, v)) {
        return broken("stream " + stream + " version " + std::to_string(v) + " is indexed at position " +
                      std::to_string(position) + ", which holds another record");
      }
      covered[position] = true;
    }
    next_version = run->last_version() + 1;
    ++report.runs;
  }
  if (!index->status().ok()) return unexpected{translate(index->status(), "verifying the stream index")};
  for (std::uint64_t p = 1; p <= last; ++p) {
    if (!covered[p]) return broken("the record at position " + std::to_string(p) + " is in no stream index");
  }

  // Every append is known by its first event's id, and the appends cover every record once.
  std::fill(covered.begin(), covered.end(), false);
  std::unique_ptr<rocksdb::Iterator> appends(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_dedup)));
  for (appends->SeekToFirst(); appends->Valid(); appends->Next()) {
    const auto key = appends->key().ToStringView();
    const auto value = appends->value().ToStringView();
    if (key.size() != 16 || value.size() != 16) return broken("id index entry is malformed");
    const events::event_id id{keys::load_be64(key), keys::load_be64(key.substr(8))};
    const auto first = keys::load_be64(value), count = keys::load_be64(value.substr(8));
    if (first == 0 || count == 0 || first + count - 1 > last || ids[first] != id) {
      return broken("id index entry of " + id.to_string() + " does not point at its first event");
    }
    for (auto p = first; p < first + count; ++p) {
      if (covered[p]) return broken("position " + std::to_string(p) + " belongs to two appends");
      covered[p] = true;
    }
    ++report.appends;
  }
  if (!appends->status().ok()) return unexpected{translate(appends->status(), "verifying the id index")};
  for (std::uint64_t p = 1; p <= last; ++p) {
    if (!covered[p]) return broken("the record at position " + std::to_string(p) + " belongs to no append");
  }
  return report;
}

// ---- event_store: the public face forwards to impl ----

expected<std::unique_ptr<event_store>, error> event_store::open(const std::filesystem::path& directory,
                                                                store_options options) {
  auto state = std::make_unique<impl>(directory, std::move(options));
  if (auto started = state->start(); !started) return unexpected{started.error()};
  return std::unique_ptr<event_store>(new event_store(std::move(state)));
}

event_store::event_store(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
event_store::~event_store() = default;

expected<append_result, error> event_store::append(std::vector<stream_append> request) {
  std::promise<expected<append_result, error>> promise;
  auto future = promise.get_future();
  impl_->append_async(std::move(request),
                      [&promise](expected<append_result, error> r) { promise.set_value(std::move(r)); });
  return future.get();
}

void event_store::append_async(std::vector<stream_append> request, append_callback done) {
  impl_->append_async(std::move(request), std::move(done));
}

expected<std::vector<events::record>, error> event_store::read_stream(std::string_view stream,
                                                                      std::uint64_t from_version,
                                                                      std::uint64_t to_version,
                                                                      std::size_t max) const {
  return impl_->read_stream(stream, from_version, to_version, max);
}

expected<std::vector<events::record>, error> event_store::read_all(std::uint64_t from_position,
                                                                   std::size_t max) const {
  std::vector<events::record> out;
  max = std::min(max, impl_->options().read_events_max);
  auto scanned = impl_->scan(from_position, max, [&](const events::record_view& r) -> expected<void, error> {
    out.push_back(r.to_record());
    return {};
  });
  if (!scanned) return unexpected{scanned.error()};
  return out;
}

expected<std::uint64_t, error> event_store::scan(std::uint64_t from_position,
                                                const visitor& visit) const {
  return impl_->scan(from_position, ~std::size_t{0}, visit);
}

expected<std::uint64_t, error> event_store::stream_version(std::string_view stream) const {
  return impl_->stream_version(stream);
}

expected<event_store::index_report, error> event_store::verify_indexes() const {
  return impl_->verify_indexes();
}

std::uint64_t event_store::last_position() const noexcept { return impl_->last_position(); }

std::uint64_t event_store::wait_for_append(std::uint64_t position,
                                           std::chrono::milliseconds wait_max) const {
  return impl_->wait_for_append(position, wait_max);
}

expected<void, error> event_store::save_snapshot(std::string_view stream, std::uint64_t version,
                                                 std::string_view state) {
  return impl_->save_snapshot(stream, version, state);
}

expected<std::optional<snapshot>, error> event_store::load_snapshot(std::string_view stream) const {
  return impl_->load_snapshot(stream);
}

expected<void, error> event_store::commit_projection(std::string_view name,
                                                     std::uint64_t expected_checkpoint,
                                                     std::uint64_t new_checkpoint,
                                                     std::span<const projection_write> writes) {
  return impl_->commit_projection(name, expected_checkpoint, new_checkpoint, writes);
}

expected<std::uint64_t, error> event_store::projection_checkpoint(std::string_view name) const {
  return impl_->projection_checkpoint(name);
}

expected<std::optional<std::string>, error> event_store::read_projection(std::string_view name,
                                                                         std::string_view key) const {
  return impl_->read_projection(name, key);
}

const store_options& event_store::options() const noexcept { return impl_->options(); }

event_store::statistics event_store::stats() const noexcept {
  return {impl_->stat_groups_.load(), impl_->stat_grouped_appends_.load(),
          impl_->stat_group_events_max_.load(), impl_->stat_syncs_.load()};
}

// ---- subscription ----

expected<std::vector<events::record>, error> subscription::next(std::size_t max,
                                                                std::chrono::milliseconds wait_max) {
  if (store_->last_position() <= position_) store_->wait_for_append(position_, wait_max);
  auto batch = store_->read_all(position_ + 1, max);
  if (!batch) return unexpected{batch.error()};
  if (!batch->empty()) {
    // The log is gapless: a read from position_ + 1 must start there and stay contiguous.
    GPUSTREAM_ENSURE(batch->front().position == position_ + 1);
    GPUSTREAM_ENSURE(batch->back().position == position_ + batch->size());
    position_ = batch->back().position;
  }
  return batch;
}

}  // namespace gpustream::storage
