#pragma once
/// The event store: an append-only log of events on RocksDB. Streams are aggregates with gapless
/// versions from 1; every event also has a gapless global position giving the log a total order.
/// One writer thread commits appends in groups (one WriteBatch, one fsync in `sync` mode), checks
/// expected versions, and makes appends idempotent by event id. Readers run concurrently.
///
/// RocksDB stays behind this header: nothing here includes it.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/event_id.hpp"
#include "events/record.hpp"
#include "storage/error.hpp"

namespace gpustream::storage {

class fault_injector;

/// The on-disk format this build writes. Bump only with a migration (event_store::open runs them).
///   1: the log and its indexes.
///   2: also every key an append claims (stream_append::unique_keys), for the whole log: a format 1
///      store holds appends written before any were claimed (store_options::format_1_claims).
inline constexpr std::uint32_t store_format_version = 2;
/// The oldest format this build reads (as it is, read-only) and upgrades (for writing).
inline constexpr std::uint32_t store_format_version_min = 1;

class event_store;

/// A key an append claims (stream_append::unique_keys) and a global position of the append that
/// claims it: an append stores where its events begin; an upgrade, the event that claims the key.
struct claimed_key {
  std::string key;
  std::uint64_t position = 0;
};
/// Takes claims a chunk at a time (bounding what a caller holds) and returns how many of them it
/// took. A key already claimed at an earlier position keeps that claim and is not counted: a
/// format 1 log may hold one transfer id applied twice, which the claims exist to prevent from
/// then on. Fails when the store cannot write them or a claim is invalid (an empty or too long
/// key, a position the log does not hold).
using claim_sink = std::function<expected<std::size_t, error>(std::span<const claimed_key>)>;
/// Reads an open store and passes to `sink` every key its appends would claim had they been
/// written today.
using claim_source = std::function<expected<void, error>(const event_store&, const claim_sink& sink)>;

enum class durability {
  sync,      ///< an append is acknowledged only after its WAL bytes are fsynced
  buffered,  ///< written to the WAL without fsync: survives a process crash, not a power loss
};

struct store_options {
  /// Default: sync.
  durability mode = durability::sync;
  /// Group commit, `sync` mode: the writer commits every append queued when it is free as one
  /// WriteBatch, and a syncer thread fsyncs the log behind it, one fsync for every batch written
  /// meanwhile (starting as soon as a batch's log record is written, while RocksDB still indexes
  /// the batch in memory). Before an fsync the syncer lets the writer finish the appends it is
  /// writing, so that one fsync acknowledges them too, but waits no longer than this (0: never
  /// waits). Default: 1 ms.
  std::chrono::microseconds group_commit_wait_max{1000};
  /// `sync` mode, under load: fsyncs are spaced by at least this much on average, so that each
  /// acknowledges the appends of a few milliseconds and the disk sees hundreds of fsyncs a second
  /// rather than one per group. `sync_burst` fsyncs may follow one another at once (a quiet store
  /// fsyncs at once, and the few appends of one request do not wait); beyond that an fsync waits
  /// until this long after the one before. Acknowledgements then wait up to this long more; what
  /// an acknowledgement promises does not change. What it saves and costs through the gateway is
  /// measured in docs/performance.md ("Fourth session"). 0: every fsync at once. Default: 3 ms.
  std::chrono::microseconds sync_interval{3000};
  /// fsyncs allowed back to back before `sync_interval` applies; at least 1. Default: 4.
  std::uint32_t sync_burst = 4;
  /// Most events committed in one group (one WriteBatch). Default: 8192.
  std::size_t group_commit_events_max = 8192;
  /// Most events accepted but not yet answered (queued, being written, or waiting for the fsync);
  /// beyond it appends fail with `overloaded`. Default: 65536.
  std::size_t append_queue_events_max = 65536;
  /// Most bytes those appends may hold meanwhile (their payloads, stream ids and unique keys, and
  /// a small fixed cost per append, stream, event and key); beyond it appends fail with
  /// `overloaded`, and one larger than it alone with `invalid_argument`, also when within
  /// append_events_max and payload_bytes_max. Default: 256 MiB.
  std::size_t append_queue_bytes_max = 256u << 20;
  /// Most events in one append call. Default: 4096.
  std::size_t append_events_max = 4096;
  /// Largest encoded payload of one event, bytes. Its record, with stream_id_bytes_max, must fit
  /// events::record_bytes_max (16 MiB): open refuses a limit that lets a record be written that
  /// could not be read back. Default: 1 MiB.
  std::size_t payload_bytes_max = 1u << 20;
  /// Longest unique key an append may claim, bytes (stream_append::unique_keys). Default: 512.
  std::size_t unique_key_bytes_max = 512;
  /// Most unique keys one append may claim, all its streams together. Default: 8192.
  std::size_t unique_keys_per_append_max = 8192;
  /// Longest stream id, bytes (printable ASCII, no spaces). Default: 200.
  std::size_t stream_id_bytes_max = 200;
  /// Most records one read returns, whatever the caller asks; at least 1. Default: 65536.
  std::size_t read_events_max = 65536;
  /// Most stream heads the writer caches; the cache is dropped when it would grow past this.
  /// Default: 1,000,000.
  std::size_t head_cache_streams_max = 1'000'000;
  /// Most bytes of memtables, all column families together: the appends RocksDB holds in memory
  /// (they are in the write-ahead log too) until it writes them to a table file. Past it the
  /// largest memtable is written out, so that `serve`'s memory does not grow with the log by up to
  /// 64 MiB for each of the six column families (RocksDB's own bound; 0 leaves only that). Default:
  /// 128 MiB.
  std::size_t memtable_bytes_max = 128u << 20;
  /// Source of `recorded_at_us`. Default: the system clock.
  std::function<std::int64_t()> clock_us;
  /// Open for reading only (replay, analytics): no appends, no lock on the directory, so it works
  /// beside a running `serve`. The store must exist. Default: false.
  bool read_only = false;
  /// Upgrades a store of format 1 opened for writing, whose appends claimed no keys: open calls it,
  /// writes what it passes on as claimed, then the current format version (synced), and only then
  /// returns. After a failure the next open runs the upgrade again from the start (claims are
  /// idempotent), unless the version's write reached the disk anyway: it comes after the claims.
  /// Unset: such a store is refused with incompatible_format. A read-only open reads a format 1
  /// store as it is. Default: unset (`gpustream serve` sets the ledger's claims).
  claim_source format_1_claims;
  /// Test hook: fail the underlying files' writes or syncs. Default: none.
  std::shared_ptr<fault_injector> faults;
};

/// `expected_version` values besides an exact version.
inline constexpr std::uint64_t any_version = ~std::uint64_t{0};
/// The stream must not exist yet (version 0 means "no events").
inline constexpr std::uint64_t no_stream = 0;

/// One event to append: its id (idempotency key), type number and encoded payload.
struct new_event {
  events::event_id id;
  std::uint16_t type = 0;
  std::string payload;
};

/// Events for one stream, appended only if the stream is at `expected_version` (or any_version).
struct stream_append {
  std::string stream;
  std::uint64_t expected_version = any_version;
  std::vector<new_event> events;
  /// Keys this append claims for good, across the whole store (e.g. "ledger/transfer/<id>"): an
  /// append naming a key that an earlier one claimed is refused with key_taken and writes nothing.
  /// A retry of the same append (its first event's id) is answered as before and claims nothing.
  std::vector<std::string> unique_keys{};
};

/// Where one stream's events of an append landed.
struct stream_result {
  std::string stream;
  std::uint64_t first_version = 0;
  std::uint64_t last_version = 0;
  bool operator==(const stream_result&) const = default;
};

/// The outcome of an append: all its events, across all its streams, have consecutive global
/// positions. An idempotent retry returns exactly the first result.
struct append_result {
  std::uint64_t first_position = 0;
  std::uint64_t last_position = 0;
  std::vector<stream_result> streams;  ///< in request order
  bool operator==(const append_result&) const = default;
};

struct snapshot {
  std::uint64_t version = 0;  ///< the stream version the state includes
  std::string state;          ///< the aggregate's own encoding of its state
};

/// One key written by a projection together with its checkpoint.
struct projection_write {
  std::string key;
  std::string value;
  bool erase = false;  ///< delete `key` instead of writing it
};

/// A catch-up subscription: yields every event after a starting position, in order, with no gap and
/// no duplicate between history and live appends. Owned by the caller; must not outlive the store.
class subscription {
 public:
  /// Returns the next events (at most `max`, never more than read_events_max). When none is
  /// available, waits up to `wait_max` for an append; an empty result means none arrived.
  [[nodiscard]] expected<std::vector<events::record>, error> next(std::size_t max,
                                                                  std::chrono::milliseconds wait_max);
  /// Global position of the last event returned (the starting position before any).
  [[nodiscard]] std::uint64_t position() const noexcept { return position_; }

 private:
  friend class event_store;
  subscription(event_store& store, std::uint64_t after) : store_(&store), position_(after) {}
  event_store* store_;
  std::uint64_t position_;
};

class event_store {
 public:
  /// Opens (creating if needed) the store in `directory`, upgrading an older format for writing
  /// (store_options::format_1_claims). Fails with incompatible_format, naming both versions, if the
  /// directory was written by a newer format version or by an older one it cannot upgrade, and
  /// with invalid_argument if it holds something that is not an event store.
  [[nodiscard]] static expected<std::unique_ptr<event_store>, error> open(
      const std::filesystem::path& directory, store_options options = {});

  ~event_store();
  event_store(const event_store&) = delete;
  event_store& operator=(const event_store&) = delete;

  /// Appends atomically: every event of every stream, or none. Blocks until acknowledged (after
  /// fsync in `sync` mode). An append is known by the id of its first event: retrying it whole
  /// (same streams, same ids in the same order) returns the first result and writes nothing;
  /// reusing that id for anything else is an event_id_conflict. Ids of later events in an append
  /// are stored but not indexed, so callers must derive ids from their commands (unique per append).
  [[nodiscard]] expected<append_result, error> append(std::vector<stream_append> request);

  using append_callback = std::function<void(expected<append_result, error>)>;
  /// Like append, but returns at once. `done` runs once the outcome is known: on the store's own
  /// thread (the syncer in `sync` mode, the writer in `buffered` mode), or at once on the calling
  /// thread when the append is refused before it is queued (closed, too large, overloaded). It
  /// must be quick; it may send another append_async, but must not wait on the store.
  void append_async(std::vector<stream_append> request, append_callback done);

  /// Events of `stream` with from_version <= version <= to_version, at most `max`, in order.
  /// An unknown stream, from > to, or max == 0 give an empty result.
  [[nodiscard]] expected<std::vector<events::record>, error> read_stream(
      std::string_view stream, std::uint64_t from_version, std::uint64_t to_version,
      std::size_t max) const;

  /// Events with global position >= from_position, at most `max`, in global order.
  [[nodiscard]] expected<std::vector<events::record>, error> read_all(std::uint64_t from_position,
                                                                       std::size_t max) const;

  using visitor = std::function<expected<void, error>(const events::record_view&)>;
  /// Calls `visit` for every event from `from_position` on, in order, without copying: the replay
  /// path. A view is valid only during its call. Stops at the first error (including one `visit`
  /// returns) and otherwise returns the number of events visited.
  [[nodiscard]] expected<std::uint64_t, error> scan(std::uint64_t from_position,
                                                    const visitor& visit) const;

  /// What verify_indexes checked.
  struct index_report {
    std::uint64_t events = 0;   ///< records in the log
    std::uint64_t streams = 0;  ///< streams in the stream index
    std::uint64_t runs = 0;     ///< stream index entries, together covering every record once
    std::uint64_t appends = 0;  ///< id index entries, together covering every record once
    std::uint64_t unique_keys = 0;  ///< keys claimed, each naming a recorded position
  };
  /// Checks that the stream index and the append id index agree with the log: every record is
  /// reachable from its stream and version and belongs to exactly one append, which is found
  /// through its first event's id; every claimed unique key names a recorded position.
  /// The first disagreement is reported as corruption. Reads everything: for `replay --verify`.
  [[nodiscard]] expected<index_report, error> verify_indexes() const;

  /// Whether each of `keys` has been claimed (stream_append::unique_keys, or a format upgrade), in
  /// order: for `replay --verify`. More than read_events_max keys is invalid_argument.
  [[nodiscard]] expected<std::vector<bool>, error> claimed(std::span<const std::string> keys) const;

  /// The format of the directory: store_format_version, or an older one opened read-only.
  [[nodiscard]] std::uint32_t format_version() const noexcept;

  /// The stream's current version; 0 for a stream with no events.
  [[nodiscard]] expected<std::uint64_t, error> stream_version(std::string_view stream) const;

  /// Global position of the last acknowledged event; 0 for an empty store.
  [[nodiscard]] std::uint64_t last_position() const noexcept;

  /// Waits until last_position() > position or `wait_max` passes; returns last_position().
  std::uint64_t wait_for_append(std::uint64_t position, std::chrono::milliseconds wait_max) const;

  /// A catch-up subscription to every event with global position > after_position.
  [[nodiscard]] subscription subscribe(std::uint64_t after_position) { return {*this, after_position}; }

  /// Stores `state` as the snapshot of `stream` at `version` (which must exist). Snapshots are only
  /// an optimisation: state from snapshot + tail must equal state from a full replay.
  [[nodiscard]] expected<void, error> save_snapshot(std::string_view stream, std::uint64_t version,
                                                    std::string_view state);
  /// Deletes the snapshot of `stream`, if any: one found ahead of the log, which a later save
  /// would replace only once the stream grew past it.
  [[nodiscard]] expected<void, error> delete_snapshot(std::string_view stream);
  /// The latest snapshot of `stream`, if any. A corrupt snapshot is reported, never returned.
  [[nodiscard]] expected<std::optional<snapshot>, error> load_snapshot(std::string_view stream) const;
  /// Calls `visit` with the name of every stream that has a snapshot, in key order, until it
  /// returns false (for a verifier: a snapshot of a stream the log lacks).
  [[nodiscard]] expected<void, error> for_each_snapshot_stream(const std::function<bool(std::string_view)>& visit) const;

  /// Writes a projection's output and its new checkpoint in one atomic batch, only if the stored
  /// checkpoint still equals `expected_checkpoint` (so output is applied exactly once).
  [[nodiscard]] expected<void, error> commit_projection(std::string_view name,
                                                        std::uint64_t expected_checkpoint,
                                                        std::uint64_t new_checkpoint,
                                                        std::span<const projection_write> writes);
  /// The projection's checkpoint: global position of the last event it applied (0 = none).
  [[nodiscard]] expected<std::uint64_t, error> projection_checkpoint(std::string_view name) const;
  /// One key of a projection's output.
  [[nodiscard]] expected<std::optional<std::string>, error> read_projection(
      std::string_view name, std::string_view key) const;

  /// Counters since open, for metrics and tests.
  struct statistics {
    std::uint64_t groups = 0;             ///< append groups the writer committed
    std::uint64_t grouped_appends = 0;    ///< appends in those groups
    std::uint64_t group_events_max = 0;   ///< most events in one group
    std::uint64_t syncs = 0;              ///< WAL fsyncs by the syncer (`sync` mode)
    std::uint64_t written_events = 0;     ///< events written to the log, acknowledged or not yet
    std::uint64_t cached_heads = 0;       ///< streams whose head the writer holds (head_cache_streams_max)
  };
  [[nodiscard]] statistics stats() const noexcept;

  [[nodiscard]] const store_options& options() const noexcept;

  class impl;

 private:
  explicit event_store(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace gpustream::storage
