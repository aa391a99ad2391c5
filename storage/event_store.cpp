#include "storage/event_store.hpp"

#include <algorithm>
#include <future>
#include <map>
#include <utility>

#include "base/ensure.hpp"
#include "events/crc32c.hpp"
#include "storage/event_store_impl.hpp"
#include "storage/keys.hpp"
#include "storage/log_read_ahead.hpp"

namespace gpustream::storage {

expected<std::shared_lock<std::shared_timed_mutex>, error> event_store::impl::read_lock() const {
  std::shared_lock lock(db_mutex_);
  // sync_failed_ first: the writer sets reopen_needed_ before it clears sync_failed_ (see
  // recover_if_needed), so one of the two is seen set until the reopen is done.
  const bool failed = sync_failed_.load();
  if (db_ && !failed && !reopen_needed_.load()) return lock;
  lock.unlock();
  if (options_.read_only) return unexpected{make_error(errc::io_error, "the store is closed")};
  // The writer reopens first (a failed write the WAL holds becomes part of the log): a read before
  // would show a log that lacks it, and the next append would contradict what was read.
  auto reopened = const_cast<impl*>(this)->run_on_writer([] { return rocksdb::Status::OK(); },
                                                         "reopening the event store");
  if (!reopened) return unexpected{reopened.error()};
  lock.lock();
  if (!db_) return unexpected{make_error(errc::io_error, "the store could not reopen after a disk failure")};
  return lock;
}

namespace {

/// Scans expected to visit at least this many records read RocksDB on a second thread; shorter
/// ones are not worth a thread.
constexpr std::uint64_t scan_read_ahead_events_min = 4096;

}  // namespace

expected<std::vector<events::record>, error> event_store::impl::read_stream(
    std::string_view stream, std::uint64_t from, std::uint64_t to, std::size_t max) const {
  std::vector<events::record> out;
  max = std::min(max, options_.read_events_max);
  if (from > to || max == 0) return out;
  from = std::max<std::uint64_t>(from, 1);
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
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
    // A stream's versions are gapless from 1, so the i-th record read is version from + i.
    if (const std::uint64_t version = from + i; r->stream != stream || r->version != version) {
      return unexpected{make_error(errc::corruption, "index of stream " + std::string(stream) + " version " +
                                                         std::to_string(version) + " points at " + describe(*r))};
    }
    out.push_back(r->to_record());
  }
  return out;
}

expected<std::uint64_t, error> event_store::impl::scan(std::uint64_t from, std::size_t max,
                                                      const visitor& visit) const {
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
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
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
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

expected<void, error> event_store::impl::delete_snapshot(std::string_view stream) {
  return run_on_writer([&] { return db_->db->Delete(write_options(), db_->cf(cf_snapshots), slice(stream)); },
                       "deleting a snapshot");
}

expected<std::optional<snapshot>, error> event_store::impl::load_snapshot(std::string_view stream) const {
  std::string value;
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
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

expected<void, error> event_store::impl::for_each_snapshot_stream(
    const std::function<bool(std::string_view)>& visit) const {
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
  std::unique_ptr<rocksdb::Iterator> it(db_->db->NewIterator(rocksdb::ReadOptions(), db_->cf(cf_snapshots)));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    if (!visit(it->key().ToStringView())) return {};
  }
  if (!it->status().ok()) return unexpected{translate(it->status(), "listing snapshots")};
  return {};
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
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
  return read_checkpoint(*db_, name);
}

expected<std::optional<std::string>, error> event_store::impl::read_projection(
    std::string_view name, std::string_view key) const {
  std::string value;
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
  const auto status = db_->db->Get(rocksdb::ReadOptions(), db_->cf(cf_projections),
                                   slice(keys::projection_key(name, key)), &value);
  if (status.IsNotFound()) return std::optional<std::string>{};
  if (!status.ok()) return unexpected{translate(status, "reading projection " + std::string(name))};
  return std::optional<std::string>{std::move(value)};
}

expected<void, error> event_store::impl::upgrade(const event_store& store) {
  // Only open calls this, before anyone else has the store.
  if (options_.read_only || format_version() == store_format_version) return {};
  GPUSTREAM_ENSURE(format_version() == 1);  // the only older format check_format lets through
  // The source is called here only; dropping it lets go of whatever it captured.
  const auto source = std::exchange(options_.format_1_claims, nullptr);
  if (!source) {
    return unexpected{make_error(
        errc::incompatible_format,
        "data directory " + directory_.string() + " has store format version 1, written before " +
            "appends claimed keys; this gpustream writes format version " +
            std::to_string(store_format_version) +
            ": open it with `gpustream serve`, which upgrades it, or read-only")};
  }
  auto upgraded = upgrade_from_1(store, source);
  if (upgraded) {
    format_version_.store(store_format_version);
    return upgraded;
  }
  return unexpected{make_error(
      upgraded.error().code,
      "upgrading the event store in " + directory_.string() + " from format 1 to " +
          std::to_string(store_format_version) + ": " + upgraded.error().message +
          " (the log is unchanged and the upgrade runs again at the next open, unless its last write "
          "reached the disk anyway; `gpustream replay --data " + directory_.string() +
          " --verify` reads the store as it is)")};
}

expected<void, error> event_store::impl::upgrade_from_1(const event_store& store, const claim_source& source) {
  const std::uint64_t last = last_position();
  const auto claim = [&](std::span<const claimed_key> claims) -> expected<std::size_t, error> {
    for (const auto& c : claims) {
      if (auto valid = validate_unique_key(c.key); !valid) return unexpected{valid.error()};
      if (c.position == 0 || c.position > last) {
        return unexpected{make_error(errc::invalid_argument,
                                     "unique key '" + printable(c.key) + "' claimed at position " +
                                         std::to_string(c.position) + ", but the log holds 1 to " +
                                         std::to_string(last))};
      }
    }
    // Each key's earliest claim holds, whether it came in this chunk, an earlier chunk or an
    // earlier run of the upgrade (which claimed the same positions).
    std::map<std::string, std::uint64_t> earliest;  // stored key -> position, for this chunk
    for (const auto& c : claims) {
      auto [it, added] = earliest.try_emplace(keys::unique_key(c.key), c.position);
      if (!added) it->second = std::min(it->second, c.position);
    }
    std::size_t taken = 0;
    auto written = run_on_writer(
        [&] {
          std::vector<rocksdb::Slice> stored;
          stored.reserve(earliest.size());
          for (const auto& entry : earliest) stored.push_back(slice(entry.first));
          std::vector<rocksdb::PinnableSlice> values(stored.size());
          std::vector<rocksdb::Status> statuses(stored.size());
          db_->db->MultiGet(rocksdb::ReadOptions(), db_->cf(cf_dedup), stored.size(), stored.data(),
                            values.data(), statuses.data());
          rocksdb::WriteBatch batch;
          std::size_t i = 0;
          for (const auto& [key, position] : earliest) {
            const auto& status = statuses[i];
            const auto& value = values[i++];
            if (status.ok() && value.size() != 8) {
              return rocksdb::Status::Corruption("the id index holds a claim of " + std::to_string(value.size()) +
                                                 " bytes for key '" +
                                                 printable(std::string_view(key).substr(keys::unique_key_prefix.size())) + "'");
            }
            if (!status.ok() && !status.IsNotFound()) return status;
            if (status.ok() && keys::load_be64(value.ToStringView()) < position) continue;
            const auto bytes = keys::be64_bytes(position);
            batch.Put(db_->cf(cf_dedup), slice(key), slice(bytes));
            ++taken;
          }
          return db_->db->Write(rocksdb::WriteOptions(), &batch);  // synced with the version below
        },
        "claiming keys");
    if (!written) return unexpected{written.error()};
    return taken;
  };
  if (auto claimed = source(store, claim); !claimed) return claimed;
  return run_on_writer(
      [&] {
        rocksdb::WriteOptions synced;  // also syncs the claims' log records before it
        synced.sync = true;
        return db_->db->Put(synced, db_->cf(cf_default), slice(keys::format_version_key),
                            slice(keys::be64(store_format_version)));
      },
      "writing the new format version");
}

expected<std::vector<bool>, error> event_store::impl::claimed(std::span<const std::string> keys) const {
  if (keys.size() > options_.read_events_max) {
    return unexpected{make_error(errc::invalid_argument,
                                 "asked whether " + std::to_string(keys.size()) +
                                     " keys are claimed, more than read_events_max " +
                                     std::to_string(options_.read_events_max))};
  }
  std::vector<std::string> stored;
  stored.reserve(keys.size());
  for (const auto& key : keys) stored.push_back(keys::unique_key(key));
  std::vector<rocksdb::Slice> slices;
  slices.reserve(stored.size());
  for (const auto& key : stored) slices.push_back(slice(key));
  std::vector<rocksdb::PinnableSlice> values(slices.size());
  std::vector<rocksdb::Status> statuses(slices.size());
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
  db_->db->MultiGet(rocksdb::ReadOptions(), db_->cf(cf_dedup), slices.size(), slices.data(), values.data(),
                    statuses.data());
  std::vector<bool> out(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (!statuses[i].ok() && !statuses[i].IsNotFound()) {
      return unexpected{translate(statuses[i], "reading the claimed keys")};
    }
    out[i] = statuses[i].ok();
  }
  return out;
}

// ---- event_store: the public face forwards to impl ----

expected<std::unique_ptr<event_store>, error> event_store::open(const std::filesystem::path& directory,
                                                                store_options options) {
  if (options.sync_burst == 0) {
    return unexpected{make_error(errc::invalid_argument, "sync_burst must be at least 1 (fsyncs allowed back to back)")};
  }
  if (options.sync_interval.count() < 0) {
    return unexpected{make_error(errc::invalid_argument, "sync_interval must not be negative (0: every fsync at once)")};
  }
  if (options.read_events_max == 0) {
    return unexpected{make_error(errc::invalid_argument, "read_events_max must be at least 1 (records one read returns)")};
  }
  // Each limit alone first: near SIZE_MAX the sum would wrap round to a small number.
  if (options.payload_bytes_max > events::record_bytes_max || options.stream_id_bytes_max > events::record_bytes_max ||
      events::encoded_record_bytes_max(options.stream_id_bytes_max, options.payload_bytes_max) >
          events::record_bytes_max) {
    return unexpected{make_error(
        errc::invalid_argument,
        "payload_bytes_max " + std::to_string(options.payload_bytes_max) + " with stream_id_bytes_max " +
            std::to_string(options.stream_id_bytes_max) + " allows records of more than the " +
            std::to_string(events::record_bytes_max) + " bytes a record read back may have; lower payload_bytes_max")};
  }
  auto state = std::make_unique<impl>(directory, std::move(options));
  if (auto started = state->start(); !started) return unexpected{started.error()};
  std::unique_ptr<event_store> store(new event_store(std::move(state)));
  if (auto upgraded = store->impl_->upgrade(*store); !upgraded) return unexpected{upgraded.error()};
  return store;
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

expected<std::vector<bool>, error> event_store::claimed(std::span<const std::string> keys) const {
  return impl_->claimed(keys);
}

std::uint32_t event_store::format_version() const noexcept { return impl_->format_version(); }

std::uint64_t event_store::last_position() const noexcept { return impl_->last_position(); }

std::uint64_t event_store::wait_for_append(std::uint64_t position,
                                           std::chrono::milliseconds wait_max) const {
  return impl_->wait_for_append(position, wait_max);
}

expected<void, error> event_store::delete_snapshot(std::string_view stream) { return impl_->delete_snapshot(stream); }

expected<void, error> event_store::save_snapshot(std::string_view stream, std::uint64_t version,
                                                 std::string_view state) {
  return impl_->save_snapshot(stream, version, state);
}

expected<std::optional<snapshot>, error> event_store::load_snapshot(std::string_view stream) const {
  return impl_->load_snapshot(stream);
}

expected<void, error> event_store::for_each_snapshot_stream(const std::function<bool(std::string_view)>& visit) const {
  return impl_->for_each_snapshot_stream(visit);
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
          impl_->stat_group_events_max_.load(), impl_->stat_syncs_.load(),
          impl_->stat_written_events_.load(std::memory_order_acquire),
          impl_->stat_cached_heads_.load(std::memory_order_relaxed)};
}

// ---- subscription ----

expected<std::vector<events::record>, error> subscription::next(std::size_t max,
                                                                std::chrono::milliseconds wait_max) {
  if (store_->last_position() <= position_) store_->wait_for_append(position_, wait_max);
  auto batch = store_->read_all(position_ + 1, max);
  if (!batch) return unexpected{batch.error()};
  if (!batch->empty()) {
    // The log is gapless: a read from position_ + 1 must start there and stay contiguous. A gap
    // is damage on disk (an operating error), which the follower reports rather than dies of.
    if (batch->front().position != position_ + 1 || batch->back().position != position_ + batch->size()) {
      return unexpected{make_error(errc::corruption,
                                   "the log has a gap after position " + std::to_string(position_) +
                                       ": a read from there gave positions " +
                                       std::to_string(batch->front().position) + ".." +
                                       std::to_string(batch->back().position))};
    }
    position_ = batch->back().position;
  }
  return batch;
}

}  // namespace gpustream::storage
