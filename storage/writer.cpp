// The append path: the writer thread (validation, idempotency, optimistic concurrency, one
// WriteBatch per group), the syncer thread (group fsync, acknowledgements) and recovery after a
// failed write.
#include <algorithm>
#include <array>
#include <future>

#include "storage/event_store_impl.hpp"
#include "storage/keys.hpp"

namespace gpustream::storage {
namespace {

/// Whether two appends are the same: same streams, and the same events (id, type and payload) in
/// the same order.
bool same_append(const std::vector<stream_append>& a, const std::vector<stream_append>& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end(), [](const auto& x, const auto& y) {
    return x.stream == y.stream &&
           std::equal(x.events.begin(), x.events.end(), y.events.begin(), y.events.end(),
                      [](const auto& e, const auto& f) {
                        return e.id == f.id && e.type == f.type && e.payload == f.payload;
                      });
  });
}

/// Set while this thread runs acknowledgement callbacks: appends they send wake the writer once,
/// after the last callback, so that they form one group instead of a first group of whichever
/// were queued when the writer woke and a second of the stragglers.
thread_local bool answering = false;

error reused_id(const events::event_id& id) {
  return make_error(errc::event_id_conflict,
                    "event id " + id.to_string() +
                        " already begins another append (different streams, event ids, types or "
                        "payloads, or count); "
                        "retry an append only whole and unchanged, and give new appends new ids");
}

/// What an append holds in memory until it is answered, for append_queue_bytes_max.
std::size_t queued_bytes_of(const std::vector<stream_append>& request) {
  constexpr std::size_t per_append = 128, per_stream = 64, per_event = 64, per_key = 32;
  std::size_t bytes = per_append;
  for (const auto& s : request) {
    bytes += per_stream + s.stream.size();
    for (const auto& e : s.events) bytes += per_event + e.payload.size();
    for (const auto& key : s.unique_keys) bytes += per_key + key.size();
  }
  return bytes;
}

}  // namespace

void event_store::impl::append_async(std::vector<stream_append> request, append_callback done) {
  std::size_t count = 0;
  for (const auto& s : request) count += s.events.size();
  const std::size_t bytes = queued_bytes_of(request);
  {
    std::unique_lock lock(queue_mutex_);
    if (stopping_ || options_.read_only) {
      lock.unlock();
      done(unexpected{make_error(errc::closed, options_.read_only
                                                   ? "the event store was opened read-only"
                                                   : "the event store is shutting down")});
      return;
    }
    if (count > options_.append_events_max || count > options_.append_queue_events_max) {
      lock.unlock();  // can never fit: not a reason to retry
      done(unexpected{make_error(
          errc::invalid_argument,
          "append of " + std::to_string(count) + " events exceeds append_events_max " +
              std::to_string(options_.append_events_max) + " or append_queue_events_max " +
              std::to_string(options_.append_queue_events_max))});
      return;
    }
    if (bytes > options_.append_queue_bytes_max) {
      lock.unlock();  // can never fit: not a reason to retry
      done(unexpected{make_error(errc::invalid_argument, "append of " + std::to_string(bytes) +
                                                             " bytes exceeds append_queue_bytes_max " +
                                                             std::to_string(options_.append_queue_bytes_max))});
      return;
    }
    if (queued_events_ + count > options_.append_queue_events_max ||
        queued_bytes_ + bytes > options_.append_queue_bytes_max) {
      lock.unlock();
      done(unexpected{make_error(
          errc::overloaded, "the store is full of unacknowledged appends (append_queue_events_max " +
                                std::to_string(options_.append_queue_events_max) + " events, append_queue_bytes_max " +
                                std::to_string(options_.append_queue_bytes_max) + " bytes); retry later")});
      return;
    }
    queued_events_ += count;
    queued_bytes_ += bytes;
    queue_.push_back(pending_append{std::move(request), std::move(done), count, bytes, {}});
    queued_appends_.fetch_add(1);
  }
  if (!answering) queue_cv_.notify_one();
}

expected<void, error> event_store::impl::run_on_writer(const std::function<rocksdb::Status()>& write,
                                                      std::string_view what) {
  std::promise<expected<void, error>> promise;
  pending_append item;
  item.task = [&](expected<void, error> ready) {
    if (!ready) return promise.set_value(std::move(ready));
    std::shared_lock lock(db_mutex_);
    begin_write();
    const auto status = write();
    if (status.ok()) {
      end_write(nullptr);
      return promise.set_value({});
    }
    auto failure = translate(status, what);
    end_write(&failure);
    promise.set_value(unexpected{std::move(failure)});
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
    set_writer_staging(false);  // lets the syncer fsync now rather than wait for this thread
    // A failed fsync wakes the writer too (see syncer_loop): it reopens the store at once.
    const auto woken = [&] { return stopping_ || !queue_.empty() || sync_failed_.load(); };
    if (reopen_needed_ || sync_failed_.load()) {
      // After a disk failure, retry the reopen now and then even without appends, so that reads
      // come back by themselves once the disk does.
      queue_cv_.wait_for(lock, reopen_retry_interval, woken);
    } else {
      queue_cv_.wait(lock, woken);
    }
  }
  if (!queue_.empty() && queue_.front().task) {  // a task runs alone
    group.push_back(std::move(queue_.front()));
    queue_.pop_front();
  } else {
    std::size_t events = 0;
    while (!queue_.empty() && !queue_.front().task &&
           (group.empty() || events + queue_.front().event_count <= options_.group_commit_events_max)) {
      events += queue_.front().event_count;
      group.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    queued_appends_.fetch_sub(group.size());
  }
  set_writer_staging(!group.empty() && !group.front().task);
  return group;
}

void event_store::impl::set_writer_staging(bool staging) {
  {
    std::lock_guard lock(sync_mutex_);
    writer_staging_ = staging;
  }
  if (!staging) sync_cv_.notify_one();
}

bool event_store::impl::wal_flushed() {
  // Runs inside the writer's db->Write: the group's log record is with the operating system and
  // RocksDB goes on to insert it into the memtables. Nothing here may call into RocksDB.
  if (!announce_wal_.load()) return false;
  {
    std::lock_guard lock(sync_mutex_);
    wal_announced_ = true;
    writer_staging_ = false;
  }
  sync_cv_.notify_one();
  return true;
}

void event_store::impl::writer_loop() {
  for (;;) {
    auto group = take_group();
    if (group.empty()) {
      if (stopping()) return;  // and nothing left to commit
      (void)recover_if_needed();  // a timed retry; a failure is reported to the next append
      continue;
    }
    if (group.front().task) {
      group.front().task(recover_if_needed());
      continue;
    }
    commit_group(group);
  }
}

expected<void, error> event_store::impl::recover_if_needed() {
  // Set before sync_failed_ is cleared, so that a reader always sees one of them until the reopen.
  if (sync_failed_.load()) {
    reopen_needed_.store(true);
    sync_failed_.store(false);
  }
  if (!reopen_needed_.load()) return {};
  {
    // Reopen only once every group already written has been answered.
    std::unique_lock idle(sync_mutex_);
    sync_idle_cv_.wait(idle, [&] { return sync_in_flight_ == 0; });
  }
  std::unique_lock lock(db_mutex_, std::defer_lock);
  if (!lock.try_lock_for(reopen_lock_wait_max)) {
    return unexpected{make_error(errc::io_error,
                                 "the store is recovering from a disk failure and waits for running "
                                 "reads to finish; retry unchanged")};
  }
  db_.reset();
  auto opened = open_database(directory_, env(), false, options_.memtable_bytes_max);
  if (!opened) return unexpected{opened.error()};
  db_ = std::move(opened).value();
  auto last = read_last_position(*db_);
  if (!last) return unexpected{last.error()};
  // A failed write may still have reached the WAL; reopening replayed it, so continue from there.
  heads_.clear();
  stat_cached_heads_.store(0, std::memory_order_relaxed);
  next_position_ = *last + 1;
  {
    std::lock_guard position_lock(position_mutex_);
    last_position_.store(*last);
  }
  position_cv_.notify_all();
  {
    // The syncer is idle; recovery flushed the replayed WAL into synced tables, so everything
    // written so far is durable, and a failed fsync no longer taints what follows.
    std::lock_guard sync_lock(sync_mutex_);
    synced_ = *last;
    durable_wal_bytes_ = wal_progress_->bytes.load();
    sync_error_.reset();
  }
  reopen_needed_.store(false);
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
  state.heads.reserve(group.size());
  state.appends.reserve(group.size());
  auto recovered = recover_if_needed();
  bool written = false;
  std::optional<error> write_failure;
  if (recovered) {
    state.next_position = next_position_;
    lookup_group(group, state);
    for (std::size_t i = 0; i < group.size(); ++i) {
      decisions.push_back(stage(group[i].request, i, state, group));
    }
    if (state.batch.Count() > 0) {
      // In `sync` mode the WAL is fsynced by the syncer thread, so that this thread can prepare the
      // next group meanwhile; readers see nothing before last_position_ says it is acknowledged.
      rocksdb::WriteOptions write;
      write.sync = false;
      std::shared_lock lock(db_mutex_);
      announce_wal_.store(options_.mode == durability::sync);  // see wal_flushed
      begin_write();
      const auto status = db_->db->Write(write, &state.batch);
      announce_wal_.store(false);
      if (status.ok()) {
        end_write(nullptr);
        written = true;
        stat_written_events_.fetch_add(state.next_position - next_position_, std::memory_order_release);
      } else {
        write_failure = translate(status, "appending to the event store");
        end_write(&*write_failure);
      }
    }
  }
  if (written) {
    if (heads_.size() + state.heads.size() > options_.head_cache_streams_max) heads_.clear();
    for (const auto& [stream, head] : state.heads) {
      if (auto it = heads_.find(stream); it != heads_.end()) {
        it->second = head;
      } else {
        heads_.emplace(std::string(stream), head);
      }
    }
    stat_cached_heads_.store(heads_.size(), std::memory_order_relaxed);
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
      outcomes.push_back(std::move(*decisions[i].outcome));  // decided without writing
    } else if (write_failure) {
      outcomes.push_back(unexpected{*write_failure});
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
  // Every byte of this group's log record was handed over before Write returned.
  written_group done{std::move(group), std::move(outcomes), durable_through, wal_progress_->bytes.load()};
  if (options_.mode == durability::sync) {
    {
      std::lock_guard lock(sync_mutex_);
      sync_queue_.push_back(std::move(done));
      ++sync_in_flight_;
      writer_staging_ = false;  // also when nothing was written (and wal_flushed did not run)
    }
    sync_cv_.notify_one();
    return;
  }
  publish(done.durable_through);
  deliver(done, {});
}

void event_store::impl::lookup_group(const std::vector<pending_append>& group, group_state& state) {
  // One MultiGet for both: the first event id of each append (state.stored[i] for append i), then
  // every unique key the appends claim.
  std::vector<keys::be128> id_keys;
  id_keys.reserve(group.size());
  std::vector<std::string_view> claimed;  // as the requests name them
  std::vector<std::string> unique_keys;   // as the id index stores them
  for (const auto& item : group) {
    const auto& r = item.request;
    const bool has_event = !r.empty() && !r.front().events.empty();
    id_keys.push_back(keys::dedup_key(has_event ? r.front().events.front().id : events::event_id{}));
    for (const auto& s : r) {
      for (const auto& key : s.unique_keys) {
        claimed.push_back(key);
        unique_keys.push_back(keys::unique_key(key));
      }
    }
  }
  std::vector<rocksdb::Slice> slices;
  slices.reserve(id_keys.size() + unique_keys.size());
  for (const auto& key : id_keys) slices.push_back(slice(key));
  for (const auto& key : unique_keys) slices.push_back(slice(key));
  state.stored = std::vector<rocksdb::PinnableSlice>(slices.size());
  state.stored_status.assign(slices.size(), rocksdb::Status());
  {
    std::shared_lock lock(db_mutex_);
    db_->db->MultiGet(rocksdb::ReadOptions(), db_->cf(cf_dedup), slices.size(), slices.data(),
                      state.stored.data(), state.stored_status.data());
  }
  state.taken.clear();
  for (std::size_t i = 0; i < claimed.size(); ++i) {
    const auto& status = state.stored_status[group.size() + i];
    if (status.IsNotFound()) continue;
    const auto value = state.stored[group.size() + i].ToStringView();
    auto& entry = state.taken[claimed[i]];
    if (!status.ok()) {
      entry = unexpected{translate(status, "checking the append's unique keys")};
    } else if (value.size() != 8) {
      entry = unexpected{make_error(errc::corruption, "unique key entry is not 8 bytes")};
    } else {
      entry = keys::load_be64(value);
    }
  }
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
  std::size_t events = 0, bytes = 0;
  for (const auto& item : group.items) {
    events += item.event_count;
    bytes += item.queued_bytes;
  }
  {
    // Appends count against append_queue_events_max and _bytes_max until they are answered, so
    // that a stalled disk pushes back on producers instead of piling up requests in memory.
    std::lock_guard lock(queue_mutex_);
    queued_events_ -= events;
    queued_bytes_ -= bytes;
  }
  for (std::size_t i = 0; i < group.items.size(); ++i) {
    auto& outcome = group.outcomes[i];
    // A failed fsync fails only the answers that needed it; earlier appends stay acknowledged.
    if (!durable && outcome && outcome->last_position > synced_) outcome = unexpected{durable.error()};
    group.items[i].done(std::move(outcome));
  }
}

bool event_store::impl::durable(const written_group& group) const {
  return group.durable_through <= synced_ || group.wal_bytes <= durable_wal_bytes_;
}

void event_store::impl::begin_write() {
  std::lock_guard lock(sync_mutex_);
  ++writes_running_;
}

void event_store::impl::end_write(const error* failure) {
  if (failure) reopen_needed_.store(true);
  bool wake = failure != nullptr;
  {
    std::lock_guard lock(sync_mutex_);
    --writes_running_;
    if (failure) {
      if (!sync_error_) sync_error_ = *failure;
      sync_failed_.store(true);
    }
    // Only a syncer waiting for this write is woken: a wake-up per write would cost the syncer a
    // context switch per append group for nothing.
    wake = wake || (writes_running_ == 0 && sync_waits_for_writes_);
  }
  if (wake) sync_cv_.notify_all();
}

bool event_store::impl::must_sync() const {
  if (sync_error_) return false;  // nothing more is acknowledged until the writer has reopened
  return wal_announced_ || (!sync_queue_.empty() && !durable(sync_queue_.front()));
}

void event_store::impl::sync_wal(std::unique_lock<std::mutex>& lock) {
  // Spacing (generic cell rate algorithm): sync_burst fsyncs may start at once, then one per
  // sync_interval. The appends written while this waits are acknowledged by this fsync too.
  if (options_.sync_interval.count() > 0) {
    const auto earliest = next_sync_due_ - options_.sync_interval * (options_.sync_burst - 1);
    sync_cv_.wait_until(lock, earliest, [&] { return sync_stopping_ || sync_error_.has_value(); });
    next_sync_due_ = std::max(next_sync_due_, std::chrono::steady_clock::now()) + options_.sync_interval;
  }
  // Group commit: while appends that arrived before now are queued or being staged, wait for
  // their log records (at most group_commit_wait_max), so that one fsync covers them too. Only
  // the writer makes this predicate true (it takes the queue, then announces), and it notifies.
  const auto deadline = std::chrono::steady_clock::now() + options_.group_commit_wait_max;
  sync_cv_.wait_until(lock, deadline, [&] {
    return sync_stopping_ || (!writer_staging_ && queued_appends_.load() == 0);
  });
  // A write under way may yet fail, after which RocksDB refuses an fsync of its log: wait for it.
  sync_waits_for_writes_ = true;
  sync_cv_.wait(lock, [&] { return sync_stopping_ || writes_running_ == 0; });
  sync_waits_for_writes_ = false;
  wal_announced_ = false;
  if (sync_error_) return;  // a write failed meanwhile: no fsync of that log (see end_write)
  const std::uint64_t covered = wal_progress_->bytes.load();  // all handed over before the fsync
  lock.unlock();
  rocksdb::Status status;
  {
    std::shared_lock db_lock(db_mutex_);
    status = db_ ? db_->db->SyncWAL() : rocksdb::Status::IOError("the store is closed");
  }
  stat_syncs_.fetch_add(1, std::memory_order_relaxed);
  lock.lock();
  if (status.ok()) {
    durable_wal_bytes_ = std::max(durable_wal_bytes_, covered);
  } else {
    // After a failed fsync the kernel may have dropped the unsynced pages: nothing written before
    // the writer reopens the store is acknowledged, whatever later fsyncs say.
    sync_error_ = translate(status, "syncing the event log");
    sync_failed_.store(true);
  }
}

void event_store::impl::syncer_loop() {
  std::unique_lock lock(sync_mutex_);
  for (;;) {
    sync_cv_.wait(lock, [&] { return sync_stopping_ || wal_announced_ || !sync_queue_.empty(); });
    if (sync_stopping_ && sync_queue_.empty()) return;  // the writer has stopped: nothing follows
    if (must_sync()) sync_wal(lock);
    if (sync_error_) wal_announced_ = false;  // no fsync until the writer has reopened the store
    // Groups leave in order (each one's log record follows the previous one's): durable ones
    // with their answers, others with the fsync's failure.
    std::vector<written_group> ready;
    std::vector<expected<void, error>> durability;
    while (!sync_queue_.empty() && (durable(sync_queue_.front()) || sync_error_)) {
      auto& group = sync_queue_.front();
      if (durable(group)) {
        synced_ = std::max(synced_, group.durable_through);
        durability.emplace_back();
      } else {
        durability.emplace_back(unexpected{*sync_error_});
      }
      ready.push_back(std::move(group));
      sync_queue_.pop_front();
    }
    if (ready.empty()) continue;  // synced ahead of a group still being written: wait for it
    lock.unlock();
    publish(synced_);
    answering = true;
    for (std::size_t i = 0; i < ready.size(); ++i) deliver(ready[i], durability[i]);
    answering = false;
    if (sync_failed_.load()) {
      // The writer may have gone to sleep before the fsync failed, with nothing to append: it
      // must wake to reopen the store, or reads stay behind until the next append. Taking its
      // lock orders this wake-up after its check of sync_failed_.
      std::lock_guard queue(queue_mutex_);
    }
    queue_cv_.notify_one();  // for the appends the callbacks sent
    lock.lock();
    sync_in_flight_ -= ready.size();
    sync_idle_cv_.notify_all();
  }
}

expected<void, error> event_store::impl::validate(const std::vector<stream_append>& request,
                                                  group_state& group) const {
  if (request.empty()) return unexpected{make_error(errc::invalid_argument, "append has no streams")};
  auto& streams = group.streams;
  auto& ids = group.ids;
  streams.clear();
  ids.clear();
  for (const auto& s : request) {
    if (!valid_name(s.stream, options_.stream_id_bytes_max)) {
      return unexpected{make_error(errc::invalid_argument,
                                   "stream id '" + s.stream.substr(0, 64) +
                                       "' must be 1 to " + std::to_string(options_.stream_id_bytes_max) +
                                       " printable ASCII characters without spaces")};
    }
    streams.push_back(s.stream);
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
  }
  if (auto keys = validate_unique_keys(request, group); !keys) return keys;
  std::sort(streams.begin(), streams.end());
  if (auto twice = std::adjacent_find(streams.begin(), streams.end()); twice != streams.end()) {
    return unexpected{make_error(errc::invalid_argument,
                                 "stream " + std::string(*twice) + " appears twice in one append")};
  }
  std::sort(ids.begin(), ids.end());
  if (auto twice = std::adjacent_find(ids.begin(), ids.end()); twice != ids.end()) {
    return unexpected{make_error(errc::invalid_argument,
                                 "event id " + twice->to_string() + " appears twice in one append")};
  }
  return {};  // the event count was checked against the limits before the append was queued
}

expected<void, error> event_store::impl::validate_unique_key(std::string_view key) const {
  if (!key.empty() && key.size() <= options_.unique_key_bytes_max) return {};
  return unexpected{make_error(errc::invalid_argument,
                               "unique key '" + printable(key) + "' of " + std::to_string(key.size()) +
                                   " bytes: a key must be 1 to " + std::to_string(options_.unique_key_bytes_max) +
                                   " bytes (unique_key_bytes_max)")};
}

expected<void, error> event_store::impl::validate_unique_keys(const std::vector<stream_append>& request,
                                                              group_state& group) const {
  auto& keys = group.keys;
  keys.clear();
  for (const auto& s : request) {
    for (const auto& key : s.unique_keys) {
      if (auto valid = validate_unique_key(key); !valid) return valid;
      keys.push_back(key);
    }
  }
  if (keys.size() > options_.unique_keys_per_append_max) {
    return unexpected{make_error(errc::invalid_argument,
                                 "append claims " + std::to_string(keys.size()) +
                                     " unique keys, more than unique_keys_per_append_max " +
                                     std::to_string(options_.unique_keys_per_append_max))};
  }
  std::sort(keys.begin(), keys.end());
  if (auto twice = std::adjacent_find(keys.begin(), keys.end()); twice != keys.end()) {
    return unexpected{make_error(errc::invalid_argument,
                                 "unique key '" + printable(*twice) + "' is claimed twice in one append")};
  }
  return {};
}

expected<void, error> event_store::impl::check_keys_free(group_state& group) const {
  for (const auto key : group.keys) {
    std::uint64_t position = 0;
    if (auto claimed = group.claimed.find(key); claimed != group.claimed.end()) {
      position = claimed->second;
    } else if (auto taken = group.taken.find(key); taken != group.taken.end()) {
      if (!taken->second) return unexpected{taken->second.error()};
      position = *taken->second;
    } else {
      continue;
    }
    return unexpected{make_error(errc::key_taken,
                                 "unique key '" + printable(key) +
                                     "' was claimed by an earlier append (its events begin at position " +
                                     std::to_string(position) + "); a key is claimed only once")};
  }
  return {};
}

expected<std::uint64_t, error> event_store::impl::head_of(std::string_view stream,
                                                         const group_state& group) {
  if (auto it = group.heads.find(stream); it != group.heads.end()) return it->second;
  if (auto it = heads_.find(stream); it != heads_.end()) return it->second;
  std::shared_lock lock(db_mutex_);
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_events)));
  it->SeekForPrev(slice(keys::stream_key(stream, ~std::uint64_t{0})));
  if (!it->status().ok()) {
    return unexpected{translate(it->status(), "reading the head of " + std::string(stream))};
  }
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
  if (auto valid = validate(request, group); !valid) return fail(valid.error());

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
  std::vector<std::uint64_t> heads;
  heads.reserve(request.size());
  for (const auto& s : request) {
    auto head = head_of(s.stream, group);
    if (!head) return fail(head.error());
    heads.push_back(*head);
    if (s.expected_version != any_version && s.expected_version != *head) {
      return fail(make_error(errc::wrong_expected_version,
                             "stream " + s.stream + " is at version " + std::to_string(*head) +
                                 ", but the append expected version " +
                                 std::to_string(s.expected_version)));
    }
  }
  if (auto free = check_keys_free(group); !free) return fail(free.error());
  const std::int64_t now = options_.clock_us();
  decision.result.first_position = group.next_position;
  for (std::size_t k = 0; k < request.size(); ++k) {
    const auto& s = request[k];
    std::uint64_t version = heads[k];
    stream_result where{s.stream, version + 1, version + s.events.size()};
    keys::assign_stream_key(group.stream_key, s.stream, version + 1);
    group.batch.Put(db_->cf(cf_events), slice(group.stream_key),
                    slice(keys::run_value(group.next_position, s.events.size())));
    const auto position_bytes = keys::be64_bytes(group.next_position);
    for (const auto& key : s.unique_keys) {
      const std::array<rocksdb::Slice, 2> parts{slice(keys::unique_key_prefix), slice(key)};
      const rocksdb::Slice value = slice(position_bytes);
      group.batch.Put(db_->cf(cf_dedup), rocksdb::SliceParts(parts.data(), 2), rocksdb::SliceParts(&value, 1));
      group.claimed.emplace(key, group.next_position);
    }
    for (const auto& e : s.events) {
      ++version;
      const std::uint64_t position = group.next_position++;
      const events::record_view r{s.stream, version, position, e.id, now, e.type,
                                  std::as_bytes(std::span(e.payload))};
      events::encode_record_into(r, group.encoded);
      group.batch.Put(db_->cf(cf_global), slice(keys::be64_bytes(position)), slice(group.encoded));
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
      // Ids alone do not make a retry: an actor derives its events' ids from their stream and
      // version, so an append it decided on a stale view of its stream (the log holds a write
      // whose fsync failed) has the ids of what the log holds, with other events.
      if (r->id != e.id || r->stream != s.stream || r->type != e.type ||
          !std::ranges::equal(r->payload, std::as_bytes(std::span(e.payload)))) {
        return unexpected{reused_id(first_id)};
      }
      if (where.first_version == 0) where.first_version = r->version;
      where.last_version = r->version;
      it->Next();
      ++position;
    }
    result.streams.push_back(std::move(where));
  }
  return result;
}

}  // namespace gpustream::storage
