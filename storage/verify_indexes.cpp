// event_store::verify_indexes: the stream index and the append id index against the log.
#include <algorithm>
#include <functional>

#include "storage/event_store_impl.hpp"
#include "storage/keys.hpp"

namespace gpustream::storage {

namespace {

/// A fingerprint of (stream, version), to match index entries against records without keeping
/// every stream id in memory.
std::uint64_t fingerprint(std::string_view stream, std::uint64_t version) {
  return std::hash<std::string_view>{}(stream) * 0x9E3779B97F4A7C15ull ^ (version + 0x632BE59BD9B4E019ull);
}

/// Whether `count` (> 0) positions from `first` reach past `last`, without the overflow of
/// first + count - 1 (a corrupt entry may hold any numbers, and a wrapped sum would pass for an
/// acknowledged run and be read out of bounds).
bool ends_after(std::uint64_t first, std::uint64_t count, std::uint64_t last) {
  return count - 1 > last || first > last - (count - 1);
}

}  // namespace

expected<event_store::index_report, error> event_store::impl::verify_indexes() const {
  auto lock = read_lock();
  if (!lock) return unexpected{lock.error()};
  // Everything acknowledged before the snapshot is in it; what a live store holds beyond `last`
  // is being appended right now, and is left out rather than reported. A read-only store's `last`
  // is its last record: an index entry beyond it names records the log lost.
  const auto last = last_position_.load();
  const bool appending = !options_.read_only;
  const rocksdb::Snapshot* snapshot = db_->db->GetSnapshot();
  const std::unique_ptr<const rocksdb::Snapshot, std::function<void(const rocksdb::Snapshot*)>> release(
      snapshot, [this](const rocksdb::Snapshot* s) { db_->db->ReleaseSnapshot(s); });
  rocksdb::ReadOptions read;
  read.snapshot = snapshot;
  event_store::index_report report;
  std::vector<std::uint64_t> fingerprints(last + 1, 0);     // of (stream, version), by position
  std::vector<events::event_id> ids(last + 1);               // by position
  std::vector<bool> covered(last + 1, false);
  auto broken = [](std::string message) { return unexpected{make_error(errc::corruption, std::move(message))}; };
  const auto beyond_the_log = [&](std::string what) {
    return broken(what + " names a position past the log's last record " + std::to_string(last) +
                  ": the log lost records its indexes hold");
  };

  // Every record: remember what it is.
  std::vector<std::uint64_t> scratch;
  std::unique_ptr<rocksdb::Iterator> global(db_->db->NewIterator(read, db_->cf(cf_global)));
  for (global->SeekToFirst(); global->Valid(); global->Next()) {
    if (global->key().size() != 8) return broken("global index key is not 8 bytes");
    const auto position = keys::load_be64(global->key().ToStringView());
    if (position == 0) return broken("a record is stored at position 0");
    if (position > last) break;  // not acknowledged yet
    auto r = decode_stored(global->value(), position, scratch);
    if (!r) return unexpected{r.error()};
    fingerprints[position] = fingerprint(r->stream, r->version);
    ids[position] = r->id;
    ++report.events;
  }
  if (!global->status().ok()) return unexpected{translate(global->status(), "verifying the log")};

  // Every stream index run: versions contiguous from 1, pointing at exactly those records.
  std::unique_ptr<rocksdb::Iterator> index(db_->db->NewIterator(read, db_->cf(cf_events)));
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
    if (run->count > 0 && ends_after(run->first_position, run->count, last)) {
      if (!appending) return beyond_the_log("stream " + stream + "'s index");
      continue;  // not acknowledged yet
    }
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
  std::unique_ptr<rocksdb::Iterator> appends(db_->db->NewIterator(read, db_->cf(cf_dedup)));
  for (appends->SeekToFirst(); appends->Valid(); appends->Next()) {
    const auto key = appends->key().ToStringView();
    const auto value = appends->value().ToStringView();
    if (keys::is_unique_key(key)) {
      if (value.size() != 8) return broken("unique key entry is malformed");
      const auto position = keys::load_be64(value);
      if (position > last) {
        if (!appending) return beyond_the_log("a unique key");
        continue;  // not acknowledged yet
      }
      if (position == 0) return broken("a unique key names position 0");
      ++report.unique_keys;
      continue;
    }
    if (key.size() != 16 || value.size() != 16) return broken("id index entry is malformed");
    const events::event_id id{keys::load_be64(key), keys::load_be64(key.substr(8))};
    const auto first = keys::load_be64(value), count = keys::load_be64(value.substr(8));
    if (first != 0 && count != 0 && ends_after(first, count, last)) {
      if (!appending) return beyond_the_log("the id index entry of " + id.to_string());
      continue;  // not acknowledged yet
    }
    if (first == 0 || count == 0 || ids[first] != id) {
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

}  // namespace gpustream::storage
