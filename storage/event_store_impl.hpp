#pragma once
/// Internal to storage/: the event store's state and threads, shared by event_store.cpp (opening,
/// reads, the public face), writer.cpp (appends, group commit, the syncer) and verify_indexes.cpp.

#include <rocksdb/write_batch.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "storage/database.hpp"
#include "storage/event_store.hpp"
#include "storage/fault_file_system.hpp"
#include "storage/wal_file_system.hpp"

namespace gpustream::storage {

inline std::int64_t system_clock_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// Lets the head cache be searched with a string_view, without building a std::string.
struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

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
  std::size_t queued_bytes = 0;  ///< what it counts against append_queue_bytes_max
  /// Set for a task: runs on the writer thread with the outcome of recovery (if one was needed).
  std::function<void(expected<void, error>)> task;
};

class event_store::impl {
 public:
  impl(std::filesystem::path directory, store_options options)
      : directory_(std::move(directory)), options_(std::move(options)) {
    if (!options_.clock_us) options_.clock_us = system_clock_us;
    auto files = rocksdb::FileSystem::Default();
    if (options_.faults) files = make_fault_file_system(std::move(files), options_.faults);
    wal_progress_->flushed = [this] { return wal_flushed(); };
    env_ = rocksdb::NewCompositeEnv(make_wal_file_system(std::move(files), wal_progress_));
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
    db_.reset();  // closes RocksDB while the members its log hook (wal_flushed) reads still exist
  }

  expected<void, error> start() {
    auto opened = open_database(directory_, env(), options_.read_only, options_.memtable_bytes_max);
    if (!opened) return unexpected{opened.error()};
    db_ = std::move(opened).value();
    format_version_.store(db_->format_version);
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

  /// Brings a store of an older format to store_format_version (store_options::format_1_claims);
  /// nothing to do for a current or read-only store. `store` is the store this impl serves.
  expected<void, error> upgrade(const event_store& store);
  /// upgrade's work for format 1: what `source` names claimed, then the version written, synced.
  expected<void, error> upgrade_from_1(const event_store& store, const claim_source& source);

  expected<std::vector<events::record>, error> read_stream(std::string_view stream,
                                                           std::uint64_t from, std::uint64_t to,
                                                           std::size_t max) const;
  expected<std::uint64_t, error> scan(std::uint64_t from, std::size_t max, const visitor& visit) const;
  expected<std::uint64_t, error> stream_version(std::string_view stream) const;
  expected<event_store::index_report, error> verify_indexes() const;
  expected<std::vector<bool>, error> claimed(std::span<const std::string> keys) const;
  std::uint32_t format_version() const noexcept { return format_version_.load(); }

  expected<void, error> delete_snapshot(std::string_view stream);
  expected<void, error> save_snapshot(std::string_view stream, std::uint64_t version,
                                      std::string_view state);
  expected<std::optional<snapshot>, error> load_snapshot(std::string_view stream) const;
  expected<void, error> for_each_snapshot_stream(const std::function<bool(std::string_view)>& visit) const;
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
  /// Keys that are string_views point into the group's requests, which outlive it.
  struct group_state {
    rocksdb::WriteBatch batch;
    std::unordered_map<std::string_view, std::uint64_t> heads;
    std::unordered_map<events::event_id, std::size_t, id_hash> appends;  // first id -> index in group
    // What the id index holds for each append's first event id (the first group.size() entries),
    // then for each unique key the appends claim, looked up for the whole group at once (an empty
    // request is looked up under a nil id and refused by validation).
    std::vector<rocksdb::PinnableSlice> stored;
    std::vector<rocksdb::Status> stored_status;
    // Reused for every append of the group, so that staging one allocates (almost) nothing.
    std::string encoded;                   // one record
    std::string stream_key;                // one `events` key
    std::vector<std::string_view> streams;  // validate: the append's streams
    std::vector<events::event_id> ids;      // validate: the append's event ids
    std::vector<std::string_view> keys;     // validate: the append's unique keys, sorted
    std::unordered_map<std::string_view, std::uint64_t> claimed;  // keys claimed earlier in the group
    // What the store holds for the group's unique keys, looked up at once: only the taken ones.
    // Keyed by the claiming request's own key string.
    std::unordered_map<std::string_view, expected<std::uint64_t, error>> taken;
    std::uint64_t next_position = 0;
  };

  /// A committed group waiting for the syncer: its answers, given once the log is durable through
  /// `durable_through`, which it is once an fsync that began after `wal_bytes` succeeded.
  struct written_group {
    std::vector<pending_append> items;
    std::vector<expected<append_result, error>> outcomes;
    std::uint64_t durable_through = 0;
    std::uint64_t wal_bytes = 0;  // wal_progress::bytes once the group was written
  };

  /// Locks the database for reading. If a failed write left it closed, first asks the writer to
  /// reopen it (the writer recovers before it runs any task), so reads come back with the disk.
  expected<std::shared_lock<std::shared_timed_mutex>, error> read_lock() const;

  /// Longest the writer waits for running reads (a long scan) before a reopen; it then answers
  /// the waiting appends with io_error and tries again later, rather than wait on a reader that
  /// may itself be waiting for the writer (a scan visitor committing a projection).
  static constexpr std::chrono::milliseconds reopen_lock_wait_max{100};
  /// How often the writer retries a failed reopen when no append asks for one.
  static constexpr std::chrono::milliseconds reopen_retry_interval{100};

  std::vector<pending_append> take_group();
  bool stopping() {
    std::lock_guard lock(queue_mutex_);
    return stopping_;
  }
  void writer_loop();
  void syncer_loop();
  void publish(std::uint64_t position);
  void set_writer_staging(bool staging);
  bool wal_flushed();
  bool must_sync() const;
  /// On the writer thread, around each write of its own (an append group, a task's write): the
  /// syncer runs no fsync while one is under way. When it failed (`failure`), the log may lack
  /// what it wrote, and RocksDB refuses any later fsync of it (Debian's build, with assertions,
  /// aborts on one): as after a failed fsync, the appends waiting for one get the failure, no
  /// fsync runs, and the writer reopens the store.
  void begin_write();
  void end_write(const error* failure);
  bool durable(const written_group& group) const;
  void sync_wal(std::unique_lock<std::mutex>& lock);
  /// Looks up, in one read of the id index, each append's first event id (state.stored) and every
  /// unique key the appends claim (the taken ones into state.taken).
  void lookup_group(const std::vector<pending_append>& group, group_state& state);
  void deliver(written_group& group, const expected<void, error>& durable);
  void commit_group(std::vector<pending_append>& group);
  expected<void, error> recover_if_needed();
  staged stage(const std::vector<stream_append>& request, std::size_t index, group_state& group,
               const std::vector<pending_append>& pending);
  expected<void, error> validate(const std::vector<stream_append>& request, group_state& group) const;
  /// The append's unique keys are within the limits and distinct (into group.keys, sorted).
  /// One key an append (or an upgrade) claims: 1 to unique_key_bytes_max bytes.
  expected<void, error> validate_unique_key(std::string_view key) const;
  expected<void, error> validate_unique_keys(const std::vector<stream_append>& request,
                                             group_state& group) const;
  /// None of group.keys was claimed before, in the store or earlier in the group (key_taken).
  expected<void, error> check_keys_free(group_state& group) const;
  expected<std::uint64_t, error> head_of(std::string_view stream, const group_state& group);
  expected<append_result, error> stored_result(const std::vector<stream_append>& request,
                                               std::uint64_t first_position, std::uint64_t count);
  rocksdb::WriteOptions write_options() const {
    rocksdb::WriteOptions write;
    write.sync = options_.mode == durability::sync;
    return write;
  }
  expected<std::uint64_t, error> read_checkpoint(database& d, std::string_view name) const;
  rocksdb::Env* env() const { return env_.get(); }

  std::filesystem::path directory_;
  std::atomic<std::uint32_t> format_version_{0};  ///< the directory's, once open (or upgraded)
  store_options options_;
  std::shared_ptr<wal_progress> wal_progress_ = std::make_shared<wal_progress>();
  std::unique_ptr<rocksdb::Env> env_;  // RocksDB's files, seen through wal_progress_ (and faults)

  // The database; readers hold the lock shared, the writer exclusively only to reopen it after a
  // failed write (so that the store's view equals what reached the disk).
  mutable std::shared_timed_mutex db_mutex_;
  std::unique_ptr<database> db_;

  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<pending_append> queue_;
  std::atomic<std::size_t> queued_appends_{0};  // appends in queue_, read by the syncer
  std::size_t queued_events_ = 0;
  std::size_t queued_bytes_ = 0;  ///< under queue_mutex_, as queued_events_
  bool stopping_ = false;
  std::thread writer_;

  // The syncer (sync mode only): fsyncs the WAL behind the writer and answers its groups. The
  // writer announces each group's log record as soon as RocksDB has written it (wal_flushed), so
  // that the fsync overlaps the group's memtable inserts; the group itself follows when its write
  // returns. Everything below is under sync_mutex_ unless atomic.
  std::mutex sync_mutex_;
  std::condition_variable sync_cv_;
  std::condition_variable sync_idle_cv_;
  std::deque<written_group> sync_queue_;
  std::size_t sync_in_flight_ = 0;  // groups queued or being answered
  bool sync_stopping_ = false;
  std::atomic<bool> sync_failed_{false};  // set by the syncer (or end_write), read by the writer and readers
  std::size_t writes_running_ = 0;        // the writer's writes under way (see begin_write)
  bool sync_waits_for_writes_ = false;    // the syncer waits for writes_running_ to reach 0
  std::atomic<bool> announce_wal_{false};  // the writer is writing an append group (sync mode)
  // When the next fsync would be due if fsyncs went exactly one per sync_interval (syncer only).
  std::chrono::steady_clock::time_point next_sync_due_{};
  bool wal_announced_ = false;  // a group's log record was written since the last fsync began
  bool writer_staging_ = false;  // the writer took appends whose log record is not written yet
  std::uint64_t durable_wal_bytes_ = 0;  // the fsyncs so far cover wal_progress bytes up to here
  std::optional<error> sync_error_;      // a failed fsync or write, until the writer has reopened the store
  // The log is durable through this position. Written by the syncer, or by the writer while no
  // group is in flight (recovery), so the syncer may read it without the lock.
  std::uint64_t synced_ = 0;

 public:
  std::atomic<std::uint64_t> stat_groups_{0};
  std::atomic<std::uint64_t> stat_grouped_appends_{0};
  std::atomic<std::uint64_t> stat_group_events_max_{0};
  std::atomic<std::uint64_t> stat_syncs_{0};
  std::atomic<std::uint64_t> stat_written_events_{0};
  std::atomic<std::uint64_t> stat_cached_heads_{0};

 private:
  std::thread syncer_;

  std::atomic<std::uint64_t> last_position_{0};
  mutable std::mutex position_mutex_;
  mutable std::condition_variable position_cv_;
  /// The store must reopen (a write or an fsync failed). Only the writer thread sets and clears
  /// it; readers that see it (or sync_failed_) go through the writer first (read_lock): the
  /// failed write may be in the WAL, which the reopen replays, and an actor recovering from the
  /// log without it would decide on a past that the log is about to contradict.
  std::atomic<bool> reopen_needed_{false};

  // Writer thread only.
  std::uint64_t next_position_ = 1;
  std::unordered_map<std::string, std::uint64_t, string_hash, std::equal_to<>> heads_;
};

}  // namespace gpustream::storage
