// The event store against raw RocksDB, same value sizes and batch sizes, measured in one run.
// Prints each figure, then the ratios and the goals. See docs/performance.md.
#include <benchmark/benchmark.h>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <cstdio>
#include <filesystem>
#include <map>
#include <thread>
#include <unistd.h>

#include "events/codec.hpp"
#include "events/event.hpp"
#include "storage/event_store.hpp"

namespace {

using namespace gpustream;

constexpr std::size_t batch_events = 1000;
constexpr std::size_t replay_events = 1'000'000;
constexpr int sync_appenders = 64;
constexpr int sync_appends_each = 150;

/// A fresh directory, removed at scope exit.
struct scratch_dir {
  std::filesystem::path path;
  explicit scratch_dir(const std::string& name)
      : path(std::filesystem::temp_directory_path() /
             ("gpustream-bench-" + std::to_string(::getpid()) + "-" + name)) {
    std::filesystem::remove_all(path);
  }
  ~scratch_dir() { std::filesystem::remove_all(path); }
};

/// A realistic ledger event; its encoded payload is the value size for both sides.
std::string sample_payload(std::uint64_t n) {
  events::transfer_recorded t;
  t.transfer_id = "tr-" + std::to_string(n);
  t.debit_account = "user-" + std::to_string(n % 9973);
  t.credit_account = "provider-" + std::to_string(n % 613);
  t.amount_micros = static_cast<std::int64_t>(1000 + n % 5000);
  t.kind = events::transfer_kind::usage;
  t.reference = "job-" + std::to_string(n);
  t.linked_group_id = "grp-" + std::to_string(n / 3);
  t.recorded_at_us = 1'700'000'000'000'000 + static_cast<std::int64_t>(n);
  return events::encode_payload(events::event{t});
}

const std::uint16_t sample_type = events::type_of(events::event{events::transfer_recorded{}});

std::unique_ptr<rocksdb::DB> open_raw(const std::filesystem::path& dir) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.max_background_jobs = 2;
  rocksdb::DB* raw = nullptr;
  const auto status = rocksdb::DB::Open(options, dir.string(), &raw);
  if (!status.ok()) {
    std::fprintf(stderr, "raw open failed: %s\n", status.ToString().c_str());
    std::abort();
  }
  return std::unique_ptr<rocksdb::DB>(raw);
}

std::unique_ptr<storage::event_store> open_store(const std::filesystem::path& dir, storage::durability mode) {
  storage::store_options options;
  options.mode = mode;
  auto store = storage::event_store::open(dir, options);
  if (!store) {
    std::fprintf(stderr, "store open failed: %s\n", store.error().message.c_str());
    std::abort();
  }
  return std::move(store).value();
}

std::string be64(std::uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>(v >> (56 - 8 * i));
  return out;
}

std::vector<storage::stream_append> batch_request(std::uint64_t first, std::size_t count,
                                                  const std::string& payload) {
  storage::stream_append append{"ledger", storage::any_version, {}};
  append.events.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    append.events.push_back({events::event_id{1, first + i}, sample_type, payload});
  }
  return {std::move(append)};
}

/// Writes back every file's dirty pages before a benchmark that measures fsyncs: earlier
/// benchmarks leave hundreds of MB to write back (the buffered ones write ~1 GB), and that
/// writeback would otherwise slow the first seconds of fsyncs here, depending on the order.
void settle_disk() { ::sync(); }

void set_rate(benchmark::State& state, double events) {
  state.counters["events_per_s"] = benchmark::Counter(events, benchmark::Counter::kIsRate);
}

/// Raw RocksDB: batches of `batch` puts of payload-sized values under increasing keys.
void raw_batches(benchmark::State& state, const char* name, std::size_t batch, bool sync) {
  scratch_dir dir(name);
  auto db = open_raw(dir.path);
  const auto payload = sample_payload(1);
  rocksdb::WriteOptions write;
  write.sync = sync;
  if (sync) settle_disk();
  std::uint64_t key = 0;
  for (auto _ : state) {
    rocksdb::WriteBatch puts;
    for (std::size_t i = 0; i < batch; ++i) puts.Put(be64(++key), payload);
    if (!db->Write(write, &puts).ok()) std::abort();
  }
  set_rate(state, static_cast<double>(key));
}

// ---- buffered appends in batches of 1,000 ----

void raw_batch1000_wal_no_fsync(benchmark::State& state) { raw_batches(state, "raw-buffered", batch_events, false); }
BENCHMARK(raw_batch1000_wal_no_fsync)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

void store_batch1000_buffered(benchmark::State& state) {
  scratch_dir dir("store-buffered");
  auto store = open_store(dir.path, storage::durability::buffered);
  const auto payload = sample_payload(1);
  std::uint64_t next = 1;
  for (auto _ : state) {
    state.PauseTiming();  // building the request is the caller's work, not the store's
    auto request = batch_request(next, batch_events, payload);
    state.ResumeTiming();
    auto result = store->append(std::move(request));
    if (!result) std::abort();
    next += batch_events;
  }
  set_rate(state, static_cast<double>(next - 1));
}
BENCHMARK(store_batch1000_buffered)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

// ---- durable appends ----

void raw_batch1000_fsync(benchmark::State& state) { raw_batches(state, "raw-sync-batch", batch_events, true); }
BENCHMARK(raw_batch1000_fsync)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);

void raw_single_fsync(benchmark::State& state) { raw_batches(state, "raw-sync-single", 1, true); }
BENCHMARK(raw_single_fsync)->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(1.0);

std::unique_ptr<storage::event_store> open_sync_store(const std::filesystem::path& dir,
                                                     std::int64_t group_commit_wait_us) {
  storage::store_options options;
  options.mode = storage::durability::sync;
  options.group_commit_wait_max = std::chrono::microseconds(group_commit_wait_us);
  auto store = storage::event_store::open(dir, options);
  if (!store) std::abort();
  return std::move(store).value();
}

/// One event for appender `t`'s own stream.
std::vector<storage::stream_append> single_event(int t, events::event_id id, const std::string& payload) {
  return {storage::stream_append{"provider-" + std::to_string(t), storage::any_version,
                                 {{id, sample_type, payload}}}};
}

double micros_since(std::chrono::steady_clock::time_point started) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - started).count();
}

void report_latencies(benchmark::State& state, std::vector<double>& latencies_us) {
  std::sort(latencies_us.begin(), latencies_us.end());
  state.counters["ack_p50_us"] = latencies_us[latencies_us.size() / 2];
  state.counters["ack_p99_us"] = latencies_us[latencies_us.size() * 99 / 100];
}

/// 64 threads, each appending single events to its own stream and blocking until the append is
/// acknowledged (after fsync). Argument: group_commit_wait_max in µs.
void store_sync_64_threads(benchmark::State& state) {
  scratch_dir dir("store-sync-threads");
  auto store = open_sync_store(dir.path, state.range(0));
  settle_disk();
  const auto payload = sample_payload(1);
  std::atomic<std::uint64_t> next{1};
  std::uint64_t appended = 0;
  std::vector<double> latencies_us;
  for (auto _ : state) {
    std::vector<std::thread> threads;
    std::vector<std::vector<double>> per_thread(sync_appenders);
    for (int t = 0; t < sync_appenders; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < sync_appends_each; ++i) {
          const auto started = std::chrono::steady_clock::now();
          auto result = store->append(single_event(t, events::event_id{2, next.fetch_add(1)}, payload));
          if (!result) std::abort();
          per_thread[static_cast<std::size_t>(t)].push_back(micros_since(started));
        }
      });
    }
    for (auto& t : threads) t.join();
    appended += sync_appenders * sync_appends_each;
    for (auto& v : per_thread) latencies_us.insert(latencies_us.end(), v.begin(), v.end());
  }
  set_rate(state, static_cast<double>(appended));
  report_latencies(state, latencies_us);
  state.counters["events_per_fsync"] =
      static_cast<double>(appended) / static_cast<double>(std::max<std::uint64_t>(1, store->stats().syncs));
}
BENCHMARK(store_sync_64_threads)->ArgName("wait_us")->Arg(0)->Arg(1000)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// 64 appenders as the actors will be: each has one append in flight and sends the next from its
/// completion callback (no thread per appender). Argument: group_commit_wait_max in µs.
void store_sync_64_async(benchmark::State& state) {
  scratch_dir dir("store-sync-async");
  auto store = open_sync_store(dir.path, state.range(0));
  settle_disk();
  const auto payload = sample_payload(1);
  std::uint64_t appended = 0;
  std::vector<double> latencies_us;
  std::atomic<std::uint64_t> next_id{1};  // the first sends race with early callbacks
  for (auto _ : state) {
    std::mutex mutex;
    std::condition_variable all_done;
    int running = sync_appenders;
    std::vector<int> remaining(sync_appenders, sync_appends_each);
    std::function<void(int)> send = [&](int t) {
      const auto started = std::chrono::steady_clock::now();
      store->append_async(single_event(t, events::event_id{4, next_id++}, payload), [&, t, started](auto result) {
        if (!result) std::abort();
        latencies_us.push_back(micros_since(started));
        if (--remaining[static_cast<std::size_t>(t)] > 0) return send(t);
        std::lock_guard lock(mutex);
        if (--running == 0) all_done.notify_one();
      });
    };
    {
      // Callbacks run on the store's syncer thread, one at a time; only `running` is shared.
      std::unique_lock lock(mutex);
      for (int t = 0; t < sync_appenders; ++t) send(t);
      all_done.wait(lock, [&] { return running == 0; });
    }
    appended += sync_appenders * sync_appends_each;
  }
  set_rate(state, static_cast<double>(appended));
  report_latencies(state, latencies_us);
  state.counters["events_per_fsync"] =
      static_cast<double>(appended) / static_cast<double>(std::max<std::uint64_t>(1, store->stats().syncs));
}
BENCHMARK(store_sync_64_async)->ArgName("wait_us")->Arg(0)->Arg(1000)
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// One appender waiting for each fsync: the latency floor of a lone `sync` append.
void store_sync_single_appender(benchmark::State& state) {
  scratch_dir dir("store-sync-single");
  auto store = open_store(dir.path, storage::durability::sync);
  settle_disk();
  const auto payload = sample_payload(1);
  std::uint64_t next = 1;
  for (auto _ : state) {
    auto result = store->append(batch_request(next++, 1, payload));
    if (!result) std::abort();
  }
  set_rate(state, static_cast<double>(next - 1));
}
BENCHMARK(store_sync_single_appender)->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(1.0);

// ---- replay of 1,000,000 events ----

/// Raw: one iterator over 1 M values of the same size, touching each value's bytes.
void raw_scan_1m(benchmark::State& state) {
  scratch_dir dir("raw-scan");
  {
    auto db = open_raw(dir.path);
    const auto payload = sample_payload(1);
    for (std::uint64_t key = 0; key < replay_events;) {
      rocksdb::WriteBatch batch;
      for (std::size_t i = 0; i < batch_events; ++i) batch.Put(be64(++key), payload);
      if (!db->Write(rocksdb::WriteOptions(), &batch).ok()) std::abort();
    }
  }
  auto db = open_raw(dir.path);
  std::uint64_t total = 0;
  for (auto _ : state) {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    std::uint64_t count = 0, bytes = 0;
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      bytes += static_cast<unsigned char>(it->value()[it->value().size() - 1]);
      ++count;
    }
    if (count != replay_events) std::abort();
    benchmark::DoNotOptimize(bytes);
    total += count;
  }
  set_rate(state, static_cast<double>(total));
}
BENCHMARK(raw_scan_1m)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// One store of 1 M ledger events, written once and shared by the replay benchmarks.
const std::filesystem::path& replay_store_dir() {
  static scratch_dir dir("store-replay");
  static const bool written = [] {
    {
      auto store = open_store(dir.path, storage::durability::buffered);
      for (std::uint64_t n = 1; n <= replay_events; n += batch_events) {
        storage::stream_append append{"ledger", storage::any_version, {}};
        for (std::size_t i = 0; i < batch_events; ++i) {
          append.events.push_back({events::event_id{3, n + i}, sample_type, sample_payload(n + i)});
        }
        if (!store->append({std::move(append)})) std::abort();
      }
    }
    open_store(dir.path, storage::durability::buffered);  // reopening flushes the WAL into tables
    return true;
  }();
  (void)written;
  return dir.path;
}

/// Raw: one iterator over the store's own log column family (the same bytes the store reads).
void raw_scan_store_log_1m(benchmark::State& state) {
  const auto& dir = replay_store_dir();
  rocksdb::DBOptions options;
  std::vector<std::string> names;
  if (!rocksdb::DB::ListColumnFamilies(options, dir.string(), &names).ok()) std::abort();
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  for (const auto& name : names) families.emplace_back(name, rocksdb::ColumnFamilyOptions());
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  if (!rocksdb::DB::OpenForReadOnly(options, dir.string(), families, &handles, &raw).ok()) std::abort();
  std::unique_ptr<rocksdb::DB> db(raw);
  rocksdb::ColumnFamilyHandle* global = nullptr;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (names[i] == "global") global = handles[i];
  }
  std::uint64_t total = 0;
  for (auto _ : state) {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions(), global));
    std::uint64_t count = 0, bytes = 0;
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      bytes += static_cast<unsigned char>(it->value()[it->value().size() - 1]);
      ++count;
    }
    if (count != replay_events) std::abort();
    benchmark::DoNotOptimize(bytes);
    total += count;
  }
  for (auto* h : handles) (void)db->DestroyColumnFamilyHandle(h);
  set_rate(state, static_cast<double>(total));
}
BENCHMARK(raw_scan_store_log_1m)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// Store: read + CRC + envelope decode (the event payload stays encoded).
void store_scan_records_1m(benchmark::State& state) {
  storage::store_options options;
  options.read_only = true;
  auto store = storage::event_store::open(replay_store_dir(), options);
  if (!store) std::abort();
  std::uint64_t total = 0;
  for (auto _ : state) {
    std::uint64_t bytes = 0;
    auto scanned = (*store)->scan(1, [&](const events::record_view& r) -> expected<void, storage::error> {
      bytes += r.payload.size();
      return {};
    });
    if (!scanned || *scanned != replay_events) std::abort();
    benchmark::DoNotOptimize(bytes);
    total += *scanned;
  }
  set_rate(state, static_cast<double>(total));
}
BENCHMARK(store_scan_records_1m)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// Store: read + CRC + envelope decode + payload decode into the event variant: a full replay.
void store_replay_1m(benchmark::State& state) {
  storage::store_options options;
  options.read_only = true;
  auto opened = storage::event_store::open(replay_store_dir(), options);
  if (!opened) std::abort();
  auto& store = *opened;
  std::uint64_t total = 0;
  for (auto _ : state) {
    std::int64_t amount = 0;
    auto scanned = store->scan(1, [&](const events::record_view& r) -> expected<void, storage::error> {
      auto e = events::decode_payload(r.type, r.payload);
      if (!e) return unexpected{storage::error{storage::errc::corruption, e.error().message}};
      amount += std::get<events::transfer_recorded>(*e).amount_micros;
      return {};
    });
    if (!scanned || *scanned != replay_events) std::abort();
    benchmark::DoNotOptimize(amount);
    total += *scanned;
  }
  set_rate(state, static_cast<double>(total));
}
BENCHMARK(store_replay_1m)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

/// Prints every run as usual, then the ratios against the raw baselines and the goals.
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const auto& run : runs) {
      auto it = run.counters.find("events_per_s");
      if (it == run.counters.end()) continue;
      // With --benchmark_repetitions, the median of the repetitions stands for the benchmark.
      const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
      if (median || (run.run_type == Run::RT_Iteration && run.repetitions <= 1)) {
        rates_[run.run_name.str()] = it->second.value;
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    std::printf("\nsummary (events/s, medians when repeated; goals from the foundation issue)\n");
    line("buffered batch 1000: store / raw WAL", "store_batch1000_buffered", "raw_batch1000_wal_no_fsync", 0.5);
    absolute("sync, 64 async appenders (default: wait up to 1 ms)", "store_sync_64_async/wait_us:1000", 100000);
    absolute("sync, 64 async appenders (no wait)", "store_sync_64_async/wait_us:0", 100000);
    absolute("sync, 64 blocking threads (default: wait up to 1 ms)", "store_sync_64_threads/wait_us:1000", 100000);
    absolute("sync, 64 blocking threads (no wait)", "store_sync_64_threads/wait_us:0", 100000);
    line("sync 64 async: store / raw fsync per event", "store_sync_64_async/wait_us:1000", "raw_single_fsync", 0);
    line("replay 1M (read+CRC+decode) / raw iterator scan", "store_replay_1m", "raw_scan_1m", 0.4);
    line("replay 1M / raw scan of the store's own log", "store_replay_1m", "raw_scan_store_log_1m", 0);
    line("scan records 1M (read+CRC+envelope) / raw scan", "store_scan_records_1m", "raw_scan_1m", 0);
    absolute("replay 1M (read+CRC+decode)", "store_replay_1m", 2'000'000);
  }

 private:
  double rate(const std::string& prefix) const {
    for (const auto& [name, value] : rates_) {
      if (name.rfind(prefix, 0) == 0) return value;
    }
    return 0;
  }
  void line(const char* what, const char* store, const char* raw, double goal) {
    const double s = rate(store), r = rate(raw);
    if (s == 0 || r == 0) return;  // filtered out of this run
    std::printf("  %-55s %10.0f / %10.0f = %.2fx", what, s, r, s / r);
    if (goal > 0) std::printf("  (goal >= %.1fx: %s)", goal, s / r >= goal ? "met" : "NOT met");
    std::printf("\n");
  }
  void absolute(const char* what, const char* name, double goal) {
    const double s = rate(name);
    if (s == 0) return;
    std::printf("  %-55s %10.0f  (goal >= %.0f: %s)\n", what, s, goal, s >= goal ? "met" : "NOT met");
  }
  std::map<std::string, double> rates_;
};

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
}
