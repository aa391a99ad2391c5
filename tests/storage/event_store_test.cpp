// The event store's guarantees, one test (or a few) per guarantee of ARCHITECTURE.md "The event log".
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <future>
#include <random>
#include <set>
#include <thread>

#include "storage/event_store.hpp"
#include "storage/fault_injector.hpp"
#include "store_testing.hpp"

namespace gpustream::storage {
namespace {

using namespace std::chrono_literals;
using testing::block_bytes_read_by;
using testing::flip_byte_of_record;
using testing::flip_stored_byte;
using testing::make_event;
using testing::make_id;
using testing::one_stream;
using testing::open_or_fail;
using testing::raw_put;
using testing::temp_dir;

store_options buffered() {
  store_options options;
  options.mode = durability::buffered;
  return options;
}

/// `sync` options whose files consult `faults`.
store_options with_faults(std::shared_ptr<fault_injector> faults) {
  store_options options;
  options.faults = std::move(faults);
  return options;
}

std::vector<events::record> read_everything(const event_store& store) {
  auto all = store.read_all(1, 1'000'000);
  EXPECT_TRUE(all.has_value()) << (all ? "" : all.error().message);
  return all ? std::move(all).value() : std::vector<events::record>{};
}

// ---- appends, versions, positions ----

TEST(event_store, append_assigns_gapless_versions_and_positions) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  auto first = store->append(one_stream("user-1", no_stream, 1, 1, 3));
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_EQ(first->first_position, 1u);
  EXPECT_EQ(first->last_position, 3u);
  EXPECT_EQ(first->streams, (std::vector<stream_result>{{"user-1", 1, 3}}));
  auto second = store->append(one_stream("user-2", no_stream, 1, 4, 2));
  ASSERT_TRUE(second);
  auto third = store->append(one_stream("user-1", 3, 1, 6, 1));
  ASSERT_TRUE(third) << third.error().message;
  EXPECT_EQ(third->streams.front().first_version, 4u);
  EXPECT_EQ(third->first_position, 6u);

  const auto all = read_everything(*store);
  ASSERT_EQ(all.size(), 6u);
  for (std::size_t i = 0; i < all.size(); ++i) EXPECT_EQ(all[i].position, i + 1);
  EXPECT_EQ(all[5].stream, "user-1");
  EXPECT_EQ(all[5].version, 4u);
  EXPECT_EQ(all[5].payload, "payload-6");
  EXPECT_EQ(store->last_position(), 6u);
  EXPECT_EQ(*store->stream_version("user-1"), 4u);
}

TEST(event_store, records_carry_id_type_and_recorded_at_from_the_clock) {
  temp_dir dir;
  store_options options = buffered();
  options.clock_us = [] { return std::int64_t{1'700'000'000'000'000}; };
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  std::vector<stream_append> request{{"job-9", no_stream, {make_event(make_id(7, 7), "x", 42)}}};
  ASSERT_TRUE(store->append(request));
  const auto all = read_everything(*store);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].id, make_id(7, 7));
  EXPECT_EQ(all[0].type, 42);
  EXPECT_EQ(all[0].recorded_at_us, 1'700'000'000'000'000);
}

TEST(event_store, events_survive_reopening) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("ledger", no_stream, 1, 1, 5)));
  }
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  EXPECT_EQ(store->last_position(), 5u);
  auto next = store->append(one_stream("ledger", 5, 1, 6, 1));
  ASSERT_TRUE(next) << next.error().message;
  EXPECT_EQ(next->first_position, 6u);
  EXPECT_EQ(next->streams.front().first_version, 6u);
}

// ---- atomic multi-event, multi-stream appends ----

TEST(event_store, multi_stream_append_is_one_contiguous_unit) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("job-1", no_stream, 1, 1, 1)));
  std::vector<stream_append> request{
      {"job-1", 1, {make_event(make_id(2, 1), "completed")}},
      {"ledger", no_stream, {make_event(make_id(2, 2), "t1"), make_event(make_id(2, 3), "t2")}}};
  auto result = store->append(request);
  ASSERT_TRUE(result) << result.error().message;
  EXPECT_EQ(result->first_position, 2u);
  EXPECT_EQ(result->last_position, 4u);
  EXPECT_EQ(result->streams,
            (std::vector<stream_result>{{"job-1", 2, 2}, {"ledger", 1, 2}}));
}

TEST(event_store, multi_stream_append_with_one_wrong_version_writes_nothing) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("job-1", no_stream, 1, 1, 1)));
  std::vector<stream_append> request{
      {"ledger", no_stream, {make_event(make_id(2, 1), "t1")}},
      {"job-1", 7, {make_event(make_id(2, 2), "completed")}}};
  auto result = store->append(request);
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, errc::wrong_expected_version);
  EXPECT_NE(result.error().message.find("job-1 is at version 1"), std::string::npos)
      << result.error().message;
  EXPECT_EQ(*store->stream_version("ledger"), 0u);
  EXPECT_EQ(store->last_position(), 1u);
}

TEST(event_store, a_failed_append_in_a_group_does_not_affect_the_others) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());  // sync: concurrent appends share a group
  ASSERT_TRUE(store);
  std::vector<std::promise<expected<append_result, error>>> done(3);
  store->append_async(one_stream("a", no_stream, 1, 1, 2),
                      [&](auto r) { done[0].set_value(std::move(r)); });
  store->append_async(one_stream("a", no_stream, 1, 3, 1),  // loses: "a" exists by then
                      [&](auto r) { done[1].set_value(std::move(r)); });
  store->append_async(one_stream("b", no_stream, 1, 4, 1),
                      [&](auto r) { done[2].set_value(std::move(r)); });
  auto r0 = done[0].get_future().get();
  auto r1 = done[1].get_future().get();
  auto r2 = done[2].get_future().get();
  ASSERT_TRUE(r0);
  ASSERT_FALSE(r1);
  EXPECT_EQ(r1.error().code, errc::wrong_expected_version);
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->first_position, 3u);
  EXPECT_EQ(read_everything(*store).size(), 3u);
}

// ---- optimistic concurrency ----

TEST(event_store, two_writers_with_the_same_expected_version_exactly_one_wins) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  constexpr int rounds = 100;
  std::uint64_t version = 0;
  for (int round = 0; round < rounds; ++round) {
    std::barrier start(2);
    auto writer = [&](std::uint64_t tag) {
      start.arrive_and_wait();
      return store->append(one_stream("provider-1", version, tag, static_cast<std::uint64_t>(round), 1));
    };
    auto a = std::async(std::launch::async, writer, 100);
    auto b = std::async(std::launch::async, writer, 200);
    auto ra = a.get();
    auto rb = b.get();
    ASSERT_NE(ra.has_value(), rb.has_value()) << "round " << round;
    const auto& loser = ra ? rb : ra;
    EXPECT_EQ(loser.error().code, errc::wrong_expected_version);
    ++version;
    ASSERT_EQ(*store->stream_version("provider-1"), version);
  }
}

TEST(event_store, no_stream_rejects_an_existing_stream_and_any_version_accepts_it) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 1)));
  auto again = store->append(one_stream("s", no_stream, 1, 2, 1));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, errc::wrong_expected_version);
  EXPECT_TRUE(store->append(one_stream("s", any_version, 1, 3, 1)));
  EXPECT_EQ(*store->stream_version("s"), 2u);
}

// ---- idempotency ----

TEST(event_store, retrying_an_append_returns_the_first_result_and_writes_nothing) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  const auto request = one_stream("job-5", no_stream, 9, 1, 3);
  auto first = store->append(request);
  ASSERT_TRUE(first);
  ASSERT_TRUE(store->append(one_stream("job-6", no_stream, 9, 10, 2)));
  for (int i = 0; i < 3; ++i) {
    auto retry = store->append(request);
    ASSERT_TRUE(retry) << retry.error().message;
    EXPECT_EQ(*retry, *first);
  }
  EXPECT_EQ(store->last_position(), 5u);
}

TEST(event_store, retry_after_reopen_returns_the_first_result) {
  temp_dir dir;
  const auto request = one_stream("job-5", no_stream, 9, 1, 2);
  append_result first;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    first = store->append(request).value();
  }
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  auto retry = store->append(request);
  ASSERT_TRUE(retry);
  EXPECT_EQ(*retry, first);
}

using append_outcome = expected<append_result, error>;

/// Sends the two appends `make(attempt)` returns back to back and hands their outcomes and the
/// last position before them to `check`. Two appends sent so usually share a group: repeats
/// (at most 50 times) until they did, so that the in-group path is the one checked.
template <class Make, class Check>
void until_two_share_a_group(event_store& store, Make make, Check check) {
  for (std::uint64_t attempt = 0; attempt < 50; ++attempt) {
    auto [first, second] = make(attempt);
    const auto groups_before = store.stats().groups;
    const auto last_before = store.last_position();
    std::promise<append_outcome> a, b;
    store.append_async(std::move(first), [&](auto r) { a.set_value(std::move(r)); });
    store.append_async(std::move(second), [&](auto r) { b.set_value(std::move(r)); });
    auto ra = a.get_future().get();
    auto rb = b.get_future().get();
    check(ra, rb, last_before);
    if (::testing::Test::HasFatalFailure() || store.stats().groups == groups_before + 1) return;
  }
  ADD_FAILURE() << "the two appends never shared a group in 50 attempts";
}

TEST(event_store, concurrent_duplicates_in_one_group_get_the_same_result) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  until_two_share_a_group(
      *store,
      [](std::uint64_t attempt) {
        const auto request = one_stream("job-" + std::to_string(attempt), no_stream, 3, attempt * 10, 2);
        return std::pair{request, request};
      },
      [&](const append_outcome& ra, const append_outcome& rb, std::uint64_t last_before) {
        ASSERT_TRUE(ra);
        ASSERT_TRUE(rb) << rb.error().message;
        EXPECT_EQ(*ra, *rb);
        EXPECT_EQ(store->last_position(), last_before + 2);  // written once
      });
}

TEST(event_store, reusing_an_appends_first_id_for_anything_else_is_a_conflict) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("a", no_stream, 1, 1, 2)));  // ids (1,1) (1,2)
  auto code = [&](std::vector<stream_append> request) {
    auto result = store->append(std::move(request));
    return result ? std::optional<errc>{} : std::optional<errc>{result.error().code};
  };
  EXPECT_EQ(code(one_stream("a", any_version, 1, 1, 3)), errc::event_id_conflict);  // more events
  EXPECT_EQ(code(one_stream("a", any_version, 1, 1, 1)), errc::event_id_conflict);  // fewer events
  EXPECT_EQ(code(one_stream("b", any_version, 1, 1, 2)), errc::event_id_conflict);  // another stream
  EXPECT_EQ(code({{"a", any_version, {make_event(make_id(1, 1), "x"), make_event(make_id(9, 9), "y")}}}),
            errc::event_id_conflict);  // same first id, another second event
  // The same ids with other events: what an actor appends when it decided on a stale view of its
  // stream, since it derives ids from the stream and the version.
  EXPECT_EQ(code({{"a", any_version, {make_event(make_id(1, 1), "payload-1"), make_event(make_id(1, 2), "other")}}}),
            errc::event_id_conflict);  // another payload
  EXPECT_EQ(code({{"a", any_version, {make_event(make_id(1, 1), "payload-1", 2), make_event(make_id(1, 2), "payload-2")}}}),
            errc::event_id_conflict);  // another type
  EXPECT_EQ(store->last_position(), 2u);
  auto whole = store->append(one_stream("a", no_stream, 1, 1, 2));  // the true retry still works
  ASSERT_TRUE(whole) << whole.error().message;
  EXPECT_EQ(whole->last_position, 2u);
}

TEST(event_store, a_concurrent_duplicate_with_other_events_is_refused) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  std::promise<expected<append_result, error>> a, b;
  // Whether the writer takes both in one group (the second is compared with the first before
  // either is written) or one after the other (with what the first wrote), the second is refused.
  store->append_async(one_stream("s", no_stream, 4, 1, 1), [&](auto r) { a.set_value(std::move(r)); });
  store->append_async({{"s", any_version, {make_event(make_id(4, 1), "other")}}},
                      [&](auto r) { b.set_value(std::move(r)); });
  auto ra = a.get_future().get();
  auto rb = b.get_future().get();
  ASSERT_TRUE(ra);
  ASSERT_FALSE(rb);
  EXPECT_EQ(rb.error().code, errc::event_id_conflict);
  EXPECT_EQ(store->last_position(), 1u);
}

TEST(event_store, after_a_failed_fsync_the_idle_writer_reopens_the_store_without_waiting_for_an_append) {
  // The failed append's bytes reached the WAL; reopening replays them, and reads (subscriptions,
  // actors recovering) see the log as it is. A writer asleep when the fsync failed used to wait
  // for the next append before reopening, and readers saw the log without that write meanwhile.
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  std::uint64_t last = 0;
  for (std::uint64_t round = 1; round <= 10; ++round) {
    ASSERT_TRUE(store->append(one_stream("s", any_version, round, 1, 1)));
    ++last;
    // Only the log's fsyncs fail: a reopen that runs before the fault is lifted fails soundly
    // (and is tried again) instead of writing its own tables on a failing disk.
    faults->set_fail_log_syncs(true);
    auto failed = store->append(one_stream("s", any_version, round, 2, 1));
    faults->set_fail_log_syncs(false);
    ASSERT_FALSE(failed);
    EXPECT_EQ(failed.error().code, errc::io_error);
    ++last;
    ASSERT_EQ(store->wait_for_append(last - 1, std::chrono::seconds(20)), last) << "round " << round;
  }
}

TEST(event_store, no_read_shows_the_log_without_a_failed_write_that_the_reopen_will_replay) {
  // An actor whose append failed stops; the next one recovers from the log. Read before the
  // store has reopened, the log lacked the failed write that the reopen then replays from the
  // WAL, and the new actor decided on a version the log was about to contradict.
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 1)));
  faults->set_fail_sync(true);  // every fsync fails: the reopen too, until it is lifted
  ASSERT_FALSE(store->append(one_stream("s", 1, 2, 1, 1)));
  const auto during = store->read_stream("s", 1, 10, 10);
  ASSERT_FALSE(during) << "read " << during->size() << " events of a log the failed write may still join";
  EXPECT_EQ(during.error().code, errc::io_error) << during.error().message;
  EXPECT_FALSE(store->stream_version("s")) << "the version of a log the failed write may still join";
  faults->set_fail_sync(false);
  const auto after = store->read_stream("s", 1, 10, 10);
  ASSERT_TRUE(after) << after.error().message;
  EXPECT_EQ(after->size(), 2u) << "the failed write reached the WAL, and the reopen replayed it";
  const auto version = store->stream_version("s");
  ASSERT_TRUE(version) << version.error().message;
  EXPECT_EQ(*version, 2u);
}

TEST(event_store, a_write_failing_while_an_append_waits_for_its_fsync_fails_that_append_and_the_store_goes_on) {
  // After a failed write RocksDB refuses (with this build's assertions: aborts on) any fsync of
  // that log: the append waiting for its fsync must get the failure instead, and the store reopen.
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  store_options options = with_faults(faults);
  options.sync_interval = 300ms;  // one fsync at once, then one per 300 ms: the next append waits
  options.sync_burst = 1;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 1)));
  std::promise<expected<append_result, error>> waiting;
  store->append_async(one_stream("t", no_stream, 1, 2, 1), [&](auto r) { waiting.set_value(std::move(r)); });
  const auto syncs_before = store->stats().syncs;
  faults->set_fail_log_syncs(true);
  const auto snapshot = store->save_snapshot("s", 1, "state");  // a synced write of its own
  faults->set_fail_log_syncs(false);
  ASSERT_FALSE(snapshot);
  EXPECT_EQ(snapshot.error().code, errc::io_error);
  auto answer = waiting.get_future();
  ASSERT_EQ(answer.wait_for(10s), std::future_status::ready);
  const auto waited = answer.get();
  ASSERT_FALSE(waited) << "acknowledged without an fsync of its log";
  EXPECT_EQ(waited.error().code, errc::io_error) << waited.error().message;
  EXPECT_EQ(store->stats().syncs, syncs_before) << "no fsync of the log after its failed write";
  // The store reopens and takes appends again.
  const auto after = store->append(one_stream("u", no_stream, 1, 3, 1));
  ASSERT_TRUE(after) << after.error().message;
  EXPECT_EQ(store->read_stream("u", 1, 1, 10)->size(), 1u);
}

TEST(event_store, a_conflicting_concurrent_duplicate_is_refused) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  std::promise<expected<append_result, error>> a, b;
  store->append_async(one_stream("s", no_stream, 4, 1, 2), [&](auto r) { a.set_value(std::move(r)); });
  store->append_async(one_stream("s", any_version, 4, 1, 3), [&](auto r) { b.set_value(std::move(r)); });
  auto ra = a.get_future().get();
  auto rb = b.get_future().get();
  ASSERT_TRUE(ra);
  ASSERT_FALSE(rb);
  EXPECT_EQ(rb.error().code, errc::event_id_conflict);
  EXPECT_EQ(store->last_position(), 2u);
}

// ---- bounded ordered reads (the Akka journal TCK cases) ----

class tck_reads : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = open_or_fail(dir_.path(), buffered());
    ASSERT_TRUE(store_);
    ASSERT_TRUE(store_->append(one_stream("p-1", no_stream, 1, 1, 5)));
    ASSERT_TRUE(store_->append(one_stream("p-2", no_stream, 1, 6, 2)));
  }
  std::vector<std::uint64_t> versions(std::uint64_t from, std::uint64_t to, std::size_t max) {
    auto read = store_->read_stream("p-1", from, to, max);
    EXPECT_TRUE(read.has_value());
    std::vector<std::uint64_t> out;
    for (const auto& r : *read) out.push_back(r.version);
    return out;
  }
  temp_dir dir_;
  std::unique_ptr<event_store> store_;
};

using v = std::vector<std::uint64_t>;

TEST_F(tck_reads, replay_all_messages) { EXPECT_EQ(versions(1, any_version, 100), (v{1, 2, 3, 4, 5})); }
TEST_F(tck_reads, replay_messages_using_a_lower_bound) { EXPECT_EQ(versions(3, any_version, 100), (v{3, 4, 5})); }
TEST_F(tck_reads, replay_messages_using_an_upper_bound) { EXPECT_EQ(versions(1, 3, 100), (v{1, 2, 3})); }
TEST_F(tck_reads, replay_messages_using_a_count_limit) { EXPECT_EQ(versions(1, any_version, 3), (v{1, 2, 3})); }
TEST_F(tck_reads, replay_messages_using_lower_and_upper_bound) { EXPECT_EQ(versions(2, 3, 100), (v{2, 3})); }
TEST_F(tck_reads, replay_messages_using_bounds_and_count_limit) { EXPECT_EQ(versions(2, 5, 2), (v{2, 3})); }
TEST_F(tck_reads, replay_a_single_message_if_lower_equals_upper) { EXPECT_EQ(versions(2, 2, 100), (v{2})); }
TEST_F(tck_reads, not_replay_messages_if_count_limit_is_zero) { EXPECT_EQ(versions(1, any_version, 0), v{}); }
TEST_F(tck_reads, not_replay_messages_if_lower_is_greater_than_upper) { EXPECT_EQ(versions(3, 2, 100), v{}); }
TEST_F(tck_reads, not_replay_messages_if_lower_is_greater_than_highest) { EXPECT_EQ(versions(6, any_version, 100), v{}); }
TEST_F(tck_reads, upper_beyond_highest_stops_at_highest) { EXPECT_EQ(versions(4, 50, 100), (v{4, 5})); }

TEST_F(tck_reads, unknown_stream_is_empty_at_version_zero) {
  auto read = store_->read_stream("nobody", 1, any_version, 100);
  ASSERT_TRUE(read);
  EXPECT_TRUE(read->empty());
  EXPECT_EQ(*store_->stream_version("nobody"), 0u);
  EXPECT_EQ(*store_->stream_version("p-"), 0u);  // a prefix of a real stream is another stream
}

TEST_F(tck_reads, read_all_is_bounded_and_ordered) {
  auto read = store_->read_all(3, 4);
  ASSERT_TRUE(read);
  ASSERT_EQ(read->size(), 4u);
  EXPECT_EQ(read->front().position, 3u);
  EXPECT_EQ(read->back().position, 6u);
  EXPECT_TRUE(store_->read_all(100, 10)->empty());
  EXPECT_TRUE(store_->read_all(1, 0)->empty());
}

// ---- limits ----

/// `request` claiming `keys` (on its first stream).
std::vector<stream_append> claiming(std::vector<stream_append> request, std::vector<std::string> keys) {
  request.front().unique_keys = std::move(keys);
  return request;
}

TEST(event_store_unique_keys, a_claimed_key_is_refused_to_every_later_append_even_after_reopening) {
  temp_dir dir;
  const auto first = claiming(one_stream("ledger", no_stream, 1, 1, 2), {"t/1", "g/1"});
  append_result first_result;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    auto a = store->append(first);
    ASSERT_TRUE(a) << a.error().message;
    first_result = *a;
    auto taken = store->append(claiming(one_stream("other", no_stream, 2, 1, 1), {"t/9", "g/1"}));
    ASSERT_FALSE(taken);
    EXPECT_EQ(taken.error().code, errc::key_taken);
    EXPECT_NE(taken.error().message.find("'g/1'"), std::string::npos) << taken.error().message;
    EXPECT_NE(taken.error().message.find("position 1"), std::string::npos) << taken.error().message;
    EXPECT_EQ(store->last_position(), 2u) << "the refused append wrote nothing";
    // Its other key was not claimed by the refusal.
    ASSERT_TRUE(store->append(claiming(one_stream("other", no_stream, 3, 1, 1), {"t/9"})));
    // The same append again is a retry: answered as the first time, not refused for its own keys.
    auto retry = store->append(first);
    ASSERT_TRUE(retry) << retry.error().message;
    EXPECT_EQ(*retry, first_result);
  }
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  auto after_reopen = store->append(claiming(one_stream("ledger", any_version, 4, 1, 1), {"t/1"}));
  ASSERT_FALSE(after_reopen);
  EXPECT_EQ(after_reopen.error().code, errc::key_taken);
  EXPECT_EQ(store->last_position(), 3u);
  auto report = store->verify_indexes();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->unique_keys, 3u);
  EXPECT_EQ(report->appends, 2u);
}

TEST(event_store_unique_keys, claimed_says_which_keys_are_taken_at_most_read_events_max_at_a_time) {
  temp_dir dir;
  store_options options = buffered();
  options.read_events_max = 2;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  EXPECT_EQ(store->format_version(), store_format_version);
  ASSERT_TRUE(store->append(claiming(one_stream("ledger", no_stream, 1, 1, 1), {"t/1", "g/1"})));
  const std::vector<std::string> asked{"g/1", "t/2"};
  auto answer = store->claimed(asked);
  ASSERT_TRUE(answer) << answer.error().message;
  EXPECT_EQ(*answer, (std::vector<bool>{true, false}));
  const std::vector<std::string> too_many{"t/1", "g/1", "t/2"};
  auto refused = store->claimed(too_many);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::invalid_argument);
  EXPECT_NE(refused.error().message.find("read_events_max 2"), std::string::npos) << refused.error().message;
}

TEST(event_store_unique_keys, of_two_appends_claiming_one_key_in_one_group_only_the_first_is_written) {
  temp_dir dir;
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  until_two_share_a_group(
      *store,
      [](std::uint64_t attempt) {
        const std::string key = "k/" + std::to_string(attempt);
        return std::pair{claiming(one_stream("a" + std::to_string(attempt), no_stream, 5, attempt * 10 + 1, 1), {key}),
                         claiming(one_stream("b" + std::to_string(attempt), no_stream, 6, attempt * 10 + 1, 1), {key})};
      },
      [&](const append_outcome& ra, const append_outcome& rb, std::uint64_t last_before) {
        ASSERT_TRUE(ra) << ra.error().message;
        ASSERT_FALSE(rb);
        EXPECT_EQ(rb.error().code, errc::key_taken);
        EXPECT_EQ(store->last_position(), last_before + 1);
      });
}

TEST(event_store_limits, unique_keys_are_bounded_in_size_and_number_and_distinct) {
  temp_dir dir;
  store_options options = buffered();
  options.unique_key_bytes_max = 4;
  options.unique_keys_per_append_max = 2;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  auto code = [&](std::vector<std::string> keys) {
    auto result = store->append(claiming(one_stream("s", any_version, 1, 1, 1), std::move(keys)));
    return result ? std::optional<errc>{} : std::optional<errc>{result.error().code};
  };
  EXPECT_EQ(code({"abcde"}), errc::invalid_argument);           // unique_key_bytes_max
  EXPECT_EQ(code({""}), errc::invalid_argument);                // empty
  EXPECT_EQ(code({"a", "b", "c"}), errc::invalid_argument);     // unique_keys_per_append_max
  EXPECT_EQ(code({"a", "a"}), errc::invalid_argument);          // one key twice
  EXPECT_EQ(store->last_position(), 0u);
  EXPECT_EQ(code({"abcd", "b"}), std::nullopt);  // at the limits: accepted
}

TEST(event_store_limits, every_named_limit_is_enforced) {
  temp_dir dir;
  store_options options = buffered();
  options.payload_bytes_max = 16;
  options.append_events_max = 3;
  options.stream_id_bytes_max = 8;
  options.read_events_max = 2;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  auto code = [&](std::vector<stream_append> r) {
    auto result = store->append(std::move(r));
    return result ? std::optional<errc>{} : std::optional<errc>{result.error().code};
  };
  EXPECT_EQ(code({{"s", any_version, {make_event(make_id(1, 1), std::string(17, 'x'))}}}),
            errc::invalid_argument);  // payload_bytes_max
  EXPECT_EQ(code(one_stream("s", any_version, 1, 1, 4)), errc::invalid_argument);  // append_events_max
  EXPECT_EQ(code(one_stream("123456789", any_version, 1, 1, 1)), errc::invalid_argument);  // stream_id_bytes_max
  EXPECT_EQ(code(one_stream("has space", any_version, 1, 1, 1)), errc::invalid_argument);
  EXPECT_EQ(code(one_stream("", any_version, 1, 1, 1)), errc::invalid_argument);
  EXPECT_EQ(code({{"s", any_version, {make_event(make_id(0, 0), "nil id")}}}), errc::invalid_argument);
  EXPECT_EQ(code({{"s", any_version, {make_event(make_id(1, 1), "a"), make_event(make_id(1, 1), "b")}}}),
            errc::invalid_argument);  // one id twice
  EXPECT_EQ(code({}), errc::invalid_argument);
  EXPECT_EQ(code({{"s", any_version, {}}}), errc::invalid_argument);
  EXPECT_EQ(store->last_position(), 0u);  // nothing rejected was written

  EXPECT_EQ(code(one_stream("s", no_stream, 1, 1, 3)), std::nullopt);  // at the limits: accepted
  EXPECT_EQ(store->read_all(1, 100)->size(), 2u);                      // read_events_max
  EXPECT_EQ(store->read_stream("s", 1, any_version, 100)->size(), 2u);
}

TEST(event_store_limits, unacknowledged_appends_beyond_the_queue_limit_answer_overloaded) {
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  store_options options = with_faults(faults);
  options.append_queue_events_max = 4;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  std::promise<expected<append_result, error>> first;
  {
    const auto held = faults->hold_syncs_in_scope();  // a stuck disk holds the first append
    store->append_async(one_stream("s", no_stream, 1, 1, 3), [&](auto r) { first.set_value(std::move(r)); });
    auto second = store->append(one_stream("t", no_stream, 1, 10, 2));  // 3 + 2 > 4
    ASSERT_FALSE(second);
    EXPECT_EQ(second.error().code, errc::overloaded);
    auto too_big = store->append(one_stream("u", no_stream, 1, 20, 5));  // can never fit
    ASSERT_FALSE(too_big);
    EXPECT_EQ(too_big.error().code, errc::invalid_argument);
  }
  ASSERT_TRUE(first.get_future().get());
  EXPECT_TRUE(store->append(one_stream("t", no_stream, 1, 10, 2)));  // room again
}

TEST(event_store_limits, unacknowledged_appends_beyond_the_queue_bytes_answer_overloaded) {
  // A few events may hold megabytes (payloads up to 1 MiB each, thousands of claimed keys): the
  // queue is bounded in bytes too, not only in events.
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  store_options options = with_faults(faults);
  options.append_queue_bytes_max = 64 * 1024;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  const auto one_big = [](std::string stream, std::uint64_t tag, std::size_t bytes) {
    return std::vector<stream_append>{{std::move(stream), no_stream, {make_event(make_id(tag, 1), std::string(bytes, 'x'))}}};
  };
  std::promise<expected<append_result, error>> first;
  {
    const auto held = faults->hold_syncs_in_scope();  // a stuck disk holds the first append
    store->append_async(one_big("s", 1, 40'000), [&](auto r) { first.set_value(std::move(r)); });
    auto second = store->append(one_big("t", 2, 40'000));  // 80 KB > 64 KiB
    ASSERT_FALSE(second);
    EXPECT_EQ(second.error().code, errc::overloaded);
    EXPECT_NE(second.error().message.find("append_queue_bytes_max"), std::string::npos) << second.error().message;
    auto too_big = store->append(one_big("u", 3, 70'000));  // can never fit
    ASSERT_FALSE(too_big);
    EXPECT_EQ(too_big.error().code, errc::invalid_argument);
    auto many_keys = one_stream("v", no_stream, 4, 1, 1);  // one event, 8,000 keys: 8,000 x 48 bytes
    for (int k = 0; k < 8'000; ++k) many_keys.front().unique_keys.push_back("key/" + std::string(12, 'k') + std::to_string(k));
    auto keyed = store->append(std::move(many_keys));
    ASSERT_FALSE(keyed);
    EXPECT_EQ(keyed.error().code, errc::invalid_argument);
  }
  ASSERT_TRUE(first.get_future().get());
  EXPECT_TRUE(store->append(one_big("t", 2, 40'000)));  // room again
}

TEST(event_store, readers_see_nothing_that_is_not_acknowledged) {
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 2)));
  std::promise<expected<append_result, error>> pending;
  {
    const auto held = faults->hold_syncs_in_scope();  // written, then waiting for its fsync
    store->append_async(one_stream("s", 2, 1, 3, 3), [&](auto r) { pending.set_value(std::move(r)); });
    store->append_async(one_stream("t", no_stream, 1, 10, 1), [](auto) {});
    // Wait until both are in RocksDB (written, visible to a raw reader) but not yet fsynced.
    for (int spins = 0; store->stats().written_events < 6 && spins < 10'000'000; ++spins) std::this_thread::yield();
    ASSERT_EQ(store->stats().written_events, 6u);
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(store->last_position(), 2u);
      EXPECT_EQ(read_everything(*store).size(), 2u);
      EXPECT_EQ(store->read_stream("s", 1, any_version, 100)->size(), 2u);
      EXPECT_EQ(*store->stream_version("s"), 2u);
      EXPECT_EQ(*store->stream_version("t"), 0u);
    }
  }
  ASSERT_TRUE(pending.get_future().get());
  EXPECT_EQ(*store->stream_version("s"), 5u);
}

TEST(event_store_limits, no_group_holds_more_than_group_commit_events_max) {
  temp_dir dir;
  store_options options;  // sync: a burst of appends is grouped
  options.group_commit_events_max = 3;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  constexpr int appends = 60;
  std::vector<std::promise<expected<append_result, error>>> done(appends);
  for (int i = 0; i < appends; ++i) {
    store->append_async(one_stream("s-" + std::to_string(i % 7), any_version, 1, static_cast<std::uint64_t>(i), 1),
                        [&done, i](auto r) { done[static_cast<std::size_t>(i)].set_value(std::move(r)); });
  }
  for (auto& d : done) ASSERT_TRUE(d.get_future().get());
  const auto stats = store->stats();
  EXPECT_EQ(stats.grouped_appends, static_cast<std::uint64_t>(appends));
  EXPECT_LE(stats.group_events_max, 3u);
  EXPECT_GE(stats.groups, static_cast<std::uint64_t>(appends / 3));
  // An append larger than the limit still goes through, alone in its group.
  ASSERT_TRUE(store->append(one_stream("big", no_stream, 2, 1, 5)));
  EXPECT_EQ(store->stats().group_events_max, 5u);
}

TEST(event_store_limits, a_tiny_head_cache_still_gives_correct_versions) {
  temp_dir dir;
  store_options options = buffered();
  options.head_cache_streams_max = 2;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  std::map<std::string, std::uint64_t> versions;
  for (std::uint64_t i = 0; i < 50; ++i) {
    const auto stream = "s-" + std::to_string(i % 5);
    auto r = store->append(one_stream(stream, versions[stream], 3, i, 1));  // exact expected version
    ASSERT_TRUE(r) << r.error().message;
    versions[stream] += 1;
    EXPECT_EQ(r->streams.front().last_version, versions[stream]);
    EXPECT_LE(store->stats().cached_heads, 2u) << "after append " << i;
  }
  for (const auto& [stream, version] : versions) EXPECT_EQ(*store->stream_version(stream), version);
  // The same appends with room for every stream's head keep all five.
  temp_dir roomy_dir;
  auto roomy = open_or_fail(roomy_dir.path(), buffered());
  ASSERT_TRUE(roomy);
  for (std::uint64_t i = 0; i < 5; ++i) ASSERT_TRUE(roomy->append(one_stream("s-" + std::to_string(i), no_stream, 3, i, 1)));
  EXPECT_EQ(roomy->stats().cached_heads, 5u);
}

// ---- catch-up subscriptions ----

TEST(event_store_subscription, no_gap_and_no_duplicate_while_appends_run) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("history", no_stream, 1, 1, 500)));  // history before it starts
  constexpr int writers = 4, appends_each = 300;
  std::vector<std::thread> threads;
  for (int w = 0; w < writers; ++w) {
    threads.emplace_back([&, w] {
      for (int i = 0; i < appends_each; ++i) {
        auto r = store->append(one_stream("w-" + std::to_string(w), any_version, 10 + w, i * 4, 1 + i % 3));
        ASSERT_TRUE(r) << r.error().message;
      }
    });
  }
  std::size_t expected_total = 500;
  for (int i = 0; i < appends_each; ++i) expected_total += writers * (1 + i % 3);

  auto subscription = store->subscribe(0);
  std::vector<events::record> seen;
  while (seen.size() < expected_total) {
    auto batch = subscription.next(97, 5000ms);
    ASSERT_TRUE(batch) << batch.error().message;
    ASSERT_FALSE(batch->empty()) << "no event for 5 s after " << seen.size();
    for (auto& r : *batch) seen.push_back(std::move(r));
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(seen.size(), expected_total);
  for (std::size_t i = 0; i < seen.size(); ++i) ASSERT_EQ(seen[i].position, i + 1);
  EXPECT_EQ(seen, read_everything(*store));
  auto after = subscription.next(10, 10ms);  // caught up: nothing more
  ASSERT_TRUE(after);
  EXPECT_TRUE(after->empty());
}

TEST(event_store_subscription, a_gap_in_the_log_is_reported_as_corruption_not_a_crash) {
  // Damage on disk is an operating error: the directory's follower logs it and retries.
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path(), buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 3)));
  }
  testing::delete_first_entry(dir.path(), "global");  // position 1
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  auto subscription = store->subscribe(0);
  auto batch = subscription.next(10, std::chrono::milliseconds(0));
  ASSERT_FALSE(batch);
  EXPECT_EQ(batch.error().code, errc::corruption);
  EXPECT_NE(batch.error().message.find("gap after position 0"), std::string::npos) << batch.error().message;
}

TEST(event_store_subscription, starts_after_the_given_position) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 10)));
  auto subscription = store->subscribe(7);
  auto batch = subscription.next(100, 0ms);
  ASSERT_TRUE(batch);
  ASSERT_EQ(batch->size(), 3u);
  EXPECT_EQ(batch->front().position, 8u);
  EXPECT_EQ(subscription.position(), 10u);
}

// ---- snapshots ----

/// A small fold standing in for an aggregate: counts events and sums payload sizes.
struct tally {
  std::uint64_t version = 0;
  std::uint64_t events = 0;
  std::uint64_t bytes = 0;
  std::string last;
  bool operator==(const tally&) const = default;
  void apply(const events::record& r) {
    version = r.version;
    events += 1;
    bytes += r.payload.size();
    last = r.payload;
  }
  std::string encode() const {
    return std::to_string(version) + " " + std::to_string(events) + " " + std::to_string(bytes) + " " + last;
  }
  static tally decode(const std::string& s) {
    tally t;
    std::istringstream in(s);
    in >> t.version >> t.events >> t.bytes >> t.last;
    return t;
  }
};

tally fold(const event_store& store, std::string_view stream, tally start) {
  auto tail = store.read_stream(stream, start.version + 1, any_version, 100000);
  EXPECT_TRUE(tail.has_value());
  for (const auto& r : *tail) start.apply(r);
  return start;
}

TEST(event_store_snapshot, snapshot_plus_tail_equals_full_replay) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  std::mt19937_64 rng(20261123);
  std::uint64_t n = 1;
  for (int round = 0; round < 20; ++round) {
    const std::size_t count = 1 + rng() % 7;
    ASSERT_TRUE(store->append(one_stream("acct", any_version, 1, n, count)));
    n += count;
    if (round % 6 == 5) {
      const auto state = fold(*store, "acct", {});
      ASSERT_TRUE(store->save_snapshot("acct", state.version, state.encode()));
    }
  }
  const auto full = fold(*store, "acct", {});
  auto saved = store->load_snapshot("acct");
  ASSERT_TRUE(saved);
  ASSERT_TRUE(saved->has_value());
  EXPECT_LT((*saved)->version, full.version);  // the tail is not empty
  const auto from_snapshot = fold(*store, "acct", tally::decode((*saved)->state));
  EXPECT_EQ(from_snapshot, full);
}

TEST(event_store_snapshot, a_snapshot_beyond_the_stream_is_refused_and_none_is_empty) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("acct", no_stream, 1, 1, 2)));
  auto beyond = store->save_snapshot("acct", 3, "x");
  ASSERT_FALSE(beyond);
  EXPECT_EQ(beyond.error().code, errc::invalid_argument);
  auto none = store->load_snapshot("other");
  ASSERT_TRUE(none);
  EXPECT_FALSE(none->has_value());
}

TEST(event_store_snapshot, looking_for_a_snapshot_that_does_not_exist_reads_no_large_snapshot) {
  // Most actors have no snapshot; one large snapshot (the ledger's grows with the ledger) must not
  // be read to find that out. Random bytes, from a fixed seed, so that compression cannot shrink it.
  constexpr std::size_t big_bytes = 4u << 20;
  std::mt19937_64 rng(20261203);
  std::string big(big_bytes, '\0');
  for (auto& c : big) c = static_cast<char>(rng());
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path(), buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("ledger", no_stream, 1, 1, 1)));
    ASSERT_TRUE(store->save_snapshot("ledger", 1, big));
  }
  auto store = open_or_fail(dir.path());  // reopening writes the recovered memtables to table files
  ASSERT_TRUE(store);
  const auto read = block_bytes_read_by([&] {
    for (const char* stream : {"job-1", "job-2", "user-1", "provider-1", "m", "zzz"}) {
      auto none = store->load_snapshot(stream);
      ASSERT_TRUE(none) << stream;
      EXPECT_FALSE(none->has_value()) << stream;
    }
  });
  EXPECT_LT(read, 64u * 1024) << "six misses read " << read << " bytes of blocks";
  auto loaded = store->load_snapshot("ledger");
  ASSERT_TRUE(loaded);
  ASSERT_TRUE(loaded->has_value());
  EXPECT_EQ((*loaded)->state, big);
}

// ---- memory ----

TEST(event_store_memory, memtables_past_memtable_bytes_max_are_written_to_table_files) {
  // 8 MiB of events against a 1 MiB bound: RocksDB must write memtables out while the store is
  // open (without the bound each column family holds 64 MiB before it does).
  temp_dir dir;
  store_options options = buffered();
  options.memtable_bytes_max = 1u << 20;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  const std::string payload(4096, 'p');
  std::uint64_t n = 1;
  for (int append = 0; append < 20; ++append) {
    std::vector<new_event> events;
    for (int i = 0; i < 100; ++i) events.push_back(make_event(make_id(3, n++), payload));
    std::vector<stream_append> request{{"s-" + std::to_string(append), no_stream, std::move(events)}};
    ASSERT_TRUE(store->append(std::move(request)));
  }
  auto table_files = [&] {
    std::size_t count = 0;
    for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
      count += entry.path().extension() == ".sst" ? 1 : 0;
    }
    return count;
  };
  // Flushes run in the background: wait for one, with a deadline.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (table_files() == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(10ms);
  EXPECT_GT(table_files(), 0u) << "no memtable was written out within 10 s";
  auto all = store->read_all(1, 100000);
  ASSERT_TRUE(all);
  EXPECT_EQ(all->size(), 2000u) << "every event still reads back";
}

// ---- projections: output and checkpoint in one batch ----

TEST(event_store_projection, output_and_checkpoint_commit_together_exactly_once) {
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("a", no_stream, 1, 1, 3)));
  ASSERT_TRUE(store->append(one_stream("b", no_stream, 1, 4, 2)));

  // A projection counting events per stream, run in chunks of 2 from its checkpoint.
  auto run_once = [&]() -> expected<void, error> {
    auto checkpoint = store->projection_checkpoint("per-stream");
    if (!checkpoint) return unexpected{checkpoint.error()};
    auto batch = store->read_all(*checkpoint + 1, 2);
    if (!batch || batch->empty()) return {};
    std::map<std::string, int> counts;
    for (const auto& r : *batch) {
      if (!counts.count(r.stream)) {
        auto stored = store->read_projection("per-stream", r.stream);
        counts[r.stream] = *stored ? std::stoi(**stored) : 0;
      }
      counts[r.stream] += 1;
    }
    std::vector<projection_write> writes;
    for (const auto& [stream, count] : counts) writes.push_back({stream, std::to_string(count)});
    return store->commit_projection("per-stream", *checkpoint, batch->back().position, writes);
  };
  // Exactly once: the stored output always equals the counts of the log up to the checkpoint.
  auto check_consistent = [&] {
    const auto checkpoint = *store->projection_checkpoint("per-stream");
    std::map<std::string, int> truth;
    const auto log = store->read_all(1, checkpoint);
    for (const auto& r : log.value()) truth[r.stream] += 1;
    for (const std::string stream : {"a", "b"}) {
      const auto stored = *store->read_projection("per-stream", stream);
      EXPECT_EQ(stored ? std::stoi(*stored) : 0, truth[stream]) << stream << " at " << checkpoint;
    }
    return checkpoint;
  };
  ASSERT_TRUE(run_once());  // positions 1..2
  EXPECT_EQ(check_consistent(), 2u);
  faults->set_fail_sync(true);
  auto failed = run_once();  // positions 3..4: not acknowledged
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, errc::io_error);
  faults->set_fail_sync(false);
  // A failed fsync leaves the commit's fate open (its bytes may have reached the WAL): after the
  // store reopens, it is either wholly there or wholly absent, and a runner resumes from there.
  for (int i = 0; i < 8 && check_consistent() < 5; ++i) {
    auto resumed = run_once();
    ASSERT_TRUE(resumed || resumed.error().code == errc::wrong_expected_version)
        << resumed.error().message;
  }
  EXPECT_EQ(check_consistent(), 5u);
  EXPECT_EQ(**store->read_projection("per-stream", "a"), "3");
  EXPECT_EQ(**store->read_projection("per-stream", "b"), "2");
}

TEST(event_store_projection, a_stale_checkpoint_is_refused) {
  temp_dir dir;
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("a", no_stream, 1, 1, 3)));
  const std::vector<projection_write> writes{{"k", "v"}};
  ASSERT_TRUE(store->commit_projection("p", 0, 2, writes));
  auto stale = store->commit_projection("p", 0, 3, writes);  // a second runner that read 0
  ASSERT_FALSE(stale);
  EXPECT_EQ(stale.error().code, errc::wrong_expected_version);
  auto beyond = store->commit_projection("p", 2, 9, writes);
  ASSERT_FALSE(beyond);
  EXPECT_EQ(beyond.error().code, errc::invalid_argument);
  EXPECT_EQ(*store->projection_checkpoint("p"), 2u);
}

// ---- corruption is detected and located ----

TEST(event_store_corruption, a_damaged_snapshot_is_reported_not_returned) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("acct", no_stream, 1, 1, 3)));
    ASSERT_TRUE(store->save_snapshot("acct", 3, "state of three events"));
  }
  flip_stored_byte(dir.path(), "snapshots", "acct", 12);
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  auto loaded = store->load_snapshot("acct");
  ASSERT_FALSE(loaded);
  EXPECT_EQ(loaded.error().code, errc::corruption);
  EXPECT_NE(loaded.error().message.find("acct"), std::string::npos) << loaded.error().message;
}

TEST(event_store_corruption, a_flipped_byte_is_reported_with_its_position) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 5)));
  }
  flip_byte_of_record(dir.path(), 4, 30);
  auto store = open_or_fail(dir.path());
  ASSERT_TRUE(store);
  auto head = store->read_all(1, 3);
  ASSERT_TRUE(head);  // records before the damage still read
  EXPECT_EQ(head->size(), 3u);
  auto all = store->read_all(1, 100);
  ASSERT_FALSE(all);
  EXPECT_EQ(all.error().code, errc::corruption);
  EXPECT_NE(all.error().message.find("position 4"), std::string::npos) << all.error().message;
  EXPECT_NE(all.error().message.find("CRC32C"), std::string::npos) << all.error().message;
  auto by_stream = store->read_stream("s", 1, any_version, 100);
  ASSERT_FALSE(by_stream);
  EXPECT_EQ(by_stream.error().code, errc::corruption);
}

// ---- long scans: read ahead on a second thread ----

/// A store with `count` events in appends of 500, across two streams.
std::unique_ptr<event_store> long_store(const temp_dir& dir, std::uint64_t count) {
  auto store = open_or_fail(dir.path(), buffered());
  if (!store) return nullptr;
  for (std::uint64_t n = 1; n <= count; n += 500) {
    auto r = store->append(one_stream(n % 1000 == 1 ? "even" : "odd", any_version, 1, n, 500));
    EXPECT_TRUE(r.has_value());
  }
  return store;
}

TEST(event_store_long_scan, sees_every_record_once_in_order) {
  temp_dir dir;
  auto store = long_store(dir, 12'000);  // well over the read-ahead threshold, several batches
  ASSERT_TRUE(store);
  std::uint64_t next = 1;
  auto visited = store->scan(1, [&](const events::record_view& r) -> expected<void, error> {
    EXPECT_EQ(r.position, next);
    const std::string payload(reinterpret_cast<const char*>(r.payload.data()), r.payload.size());
    EXPECT_EQ(payload, "payload-" + std::to_string(next));
    ++next;
    return {};
  });
  ASSERT_TRUE(visited) << visited.error().message;
  EXPECT_EQ(*visited, 12'000u);
  auto tail = store->scan(7'001, [](const events::record_view&) -> expected<void, error> { return {}; });
  ASSERT_TRUE(tail);
  EXPECT_EQ(*tail, 5'000u);
}

TEST(event_store_long_scan, a_visitor_error_stops_it_at_once) {
  temp_dir dir;
  auto store = long_store(dir, 10'000);
  ASSERT_TRUE(store);
  std::uint64_t seen = 0;
  auto visited = store->scan(1, [&](const events::record_view& r) -> expected<void, error> {
    ++seen;
    if (r.position == 4'321) return unexpected{error{errc::invalid_argument, "stop here"}};
    return {};
  });
  ASSERT_FALSE(visited);
  EXPECT_EQ(visited.error().message, "stop here");
  EXPECT_EQ(seen, 4'321u);
}

TEST(event_store_long_scan, corruption_is_reported_with_its_position) {
  temp_dir dir;
  {
    auto store = long_store(dir, 10'000);
    ASSERT_TRUE(store);
  }
  flip_byte_of_record(dir.path(), 6'789, 40);
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  auto visited = store->scan(1, [](const events::record_view&) -> expected<void, error> { return {}; });
  ASSERT_FALSE(visited);
  EXPECT_EQ(visited.error().code, errc::corruption);
  EXPECT_NE(visited.error().message.find("position 6789"), std::string::npos) << visited.error().message;
}

TEST(event_store_long_scan, a_visitor_may_commit_while_the_store_recovers_from_a_disk_failure) {
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  for (std::uint64_t n = 1; n <= 6'000; n += 1'000) ASSERT_TRUE(store->append(one_stream("s", any_version, 1, n, 1'000)));
  faults->set_fail_sync(true);
  ASSERT_FALSE(store->append(one_stream("s", any_version, 2, 1, 1)));  // the store must reopen
  faults->set_fail_sync(false);
  // A projection that checkpoints from inside a long scan: the reopen waits for the scan, the
  // commit waits for the writer. Neither may wait forever.
  int commits_ok = 0, commits_refused = 0;
  std::uint64_t checkpoint = 0;
  auto scanned = store->scan(1, [&](const events::record_view& r) -> expected<void, error> {
    if (r.position % 2'000 != 0) return {};
    auto committed = store->commit_projection("p", checkpoint, r.position, {});
    if (committed) {
      checkpoint = r.position;
      ++commits_ok;
    } else {
      EXPECT_EQ(committed.error().code, errc::io_error) << committed.error().message;
      ++commits_refused;
    }
    return {};
  });
  ASSERT_TRUE(scanned) << scanned.error().message;
  // The failed append reached the WAL: a reopen before the scan (the writer reopens as soon as
  // the fsync fails) makes it part of the log; one waiting for the scan does so after it.
  EXPECT_TRUE(*scanned == 6'000u || *scanned == 6'001u) << *scanned;
  EXPECT_EQ(commits_ok + commits_refused, 3);
  auto after = store->commit_projection("p", checkpoint, 6'000, {});  // recovered by now
  EXPECT_TRUE(after) << after.error().message;
}

// ---- format versions ----

TEST(event_store_format, a_newer_format_is_refused_naming_both_versions) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
  }
  raw_put(dir.path(), "default", "format_version", std::string("\0\0\0\0\0\0\0\x03", 8), "from_the_future");
  ASSERT_FALSE(HasFailure());
  auto store = event_store::open(dir.path());
  ASSERT_FALSE(store);
  EXPECT_EQ(store.error().code, errc::incompatible_format);
  EXPECT_NE(store.error().message.find("format version 3"), std::string::npos) << store.error().message;
  EXPECT_NE(store.error().message.find("format version 2"), std::string::npos) << store.error().message;
  EXPECT_NE(store.error().message.find("newer gpustream"), std::string::npos) << store.error().message;
}

/// A store as a format 1 build left it: three events on stream "s", no key claimed.
void write_format_1_store(const std::filesystem::path& dir) {
  {
    auto store = open_or_fail(dir, buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 3)));
  }
  raw_put(dir, "default", "format_version", std::string("\0\0\0\0\0\0\0\x01", 8));
}

/// Options whose format 1 upgrade passes on `chunks` one after the other, then `last` (success by
/// default); `calls` counts the upgrade's runs.
store_options upgrading(std::vector<std::vector<claimed_key>> chunks, std::shared_ptr<int> calls,
                        expected<void, error> last = {}) {
  store_options options = buffered();
  options.format_1_claims = [chunks = std::move(chunks), calls, last](const event_store& store,
                                                                      const claim_sink& claim) {
    ++*calls;
    EXPECT_EQ(store.last_position(), 3u) << "the source reads the store being upgraded";
    for (const auto& chunk : chunks) {
      auto taken = claim(chunk);
      if (!taken) return expected<void, error>{unexpected{taken.error()}};
      EXPECT_EQ(*taken, chunk.size()) << "no key named twice";
    }
    return last;
  };
  return options;
}

/// Whether an append to a new stream claiming `key` is refused because it is taken.
bool key_is_taken(event_store& store, const std::string& key, std::uint64_t tag) {
  auto result = store.append(claiming(one_stream("probe-" + std::to_string(tag), no_stream, tag, 1, 1), {key}));
  if (result) return false;
  EXPECT_EQ(result.error().code, errc::key_taken) << result.error().message;
  return true;
}

TEST(event_store_format, a_format_1_store_opened_for_writing_is_upgraded_claiming_what_its_source_names) {
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto calls = std::make_shared<int>(0);
  {
    auto store = open_or_fail(dir.path(), upgrading({{{"t/1", 1}, {"g/1", 1}}, {{"t/3", 3}}}, calls));
    ASSERT_TRUE(store);
    EXPECT_EQ(*calls, 1);
    EXPECT_EQ(store->format_version(), 2u);
    EXPECT_EQ(read_everything(*store).size(), 3u) << "the log is as it was";
    EXPECT_TRUE(key_is_taken(*store, "t/1", 10));
    EXPECT_TRUE(key_is_taken(*store, "g/1", 11));
    EXPECT_TRUE(key_is_taken(*store, "t/3", 12));
    EXPECT_FALSE(key_is_taken(*store, "t/2", 13)) << "only what the source named is claimed";
    EXPECT_EQ(store->last_position(), 4u);
  }
  // Now of the current format: opened again, the upgrade does not run, and the claims hold.
  auto store = open_or_fail(dir.path(), upgrading({}, calls));
  ASSERT_TRUE(store);
  EXPECT_EQ(*calls, 1);
  EXPECT_TRUE(key_is_taken(*store, "t/1", 14));
  EXPECT_TRUE(key_is_taken(*store, "t/2", 15));
  auto report = store->verify_indexes();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->unique_keys, 4u);
  EXPECT_EQ(report->events, 4u);
}

TEST(event_store_verify, an_id_index_entry_whose_run_wraps_around_is_not_read_out_of_bounds) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path(), buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 3)));
  }
  auto be64 = [](std::uint64_t v) {
    std::string out(8, '\0');
    for (int i = 7; i >= 0; --i, v >>= 8) out[static_cast<std::size_t>(i)] = static_cast<char>(v & 0xff);
    return out;
  };
  // First position 103, past the log's 3, and a count that brings first + count - 1 round to 2:
  // a wrapped sum passed for an acknowledged run, whose first id was then read past the end.
  raw_put(dir.path(), "dedup", std::string(16, '\x7f'), be64(103) + be64(~std::uint64_t{0} - 99));
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  auto report = store->verify_indexes();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->appends, 1u) << "the entry past the log is not one of its appends";
}

TEST(event_store_verify, a_stream_index_that_maps_a_version_to_another_versions_record_is_corruption) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path(), buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 3)));
  }
  // The run at version 1 now says versions 1 and 2 are at positions 2 and 3: records of the
  // same stream, but versions 2 and 3. A reader folding them would see version 1 twice over.
  std::string key("s");
  key.push_back('\0');
  key.append(std::string("\0\0\0\0\0\0\0\x01", 8));
  raw_put(dir.path(), "events", key, std::string("\0\0\0\0\0\0\0\x02\0\0\0\0\0\0\0\x02", 16));
  auto store = open_or_fail(dir.path(), buffered());
  ASSERT_TRUE(store);
  auto read = store->read_stream("s", 1, 3, 10);
  ASSERT_FALSE(read) << "read " << read->size() << " records";
  EXPECT_EQ(read.error().code, errc::corruption);
  EXPECT_NE(read.error().message.find("version 1"), std::string::npos) << read.error().message;
}

TEST(event_store_verify, a_read_only_store_whose_last_record_is_lost_fails_on_the_indexes_that_still_name_it) {
  // replay --verify reads a store opened read-only: nothing is being appended there, so an index
  // entry past its last record is damage (a live store would write the stream's next version
  // after a gap, and the key stays claimed for an event that is gone).
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path(), buffered());
    ASSERT_TRUE(store);
    ASSERT_TRUE(store->append(one_stream("a", no_stream, 1, 1, 4)));
    ASSERT_TRUE(store->append(claiming(one_stream("b", no_stream, 2, 1, 1), {"ledger/transfer/T5"})));
  }
  testing::delete_last_entry(dir.path(), "global");  // position 5; its index entries and claim stay
  store_options read_only;
  read_only.read_only = true;
  auto reader = open_or_fail(dir.path(), read_only);
  ASSERT_TRUE(reader);
  EXPECT_EQ(reader->last_position(), 4u);
  auto report = reader->verify_indexes();
  ASSERT_FALSE(report) << "passed with " << report->events << " events";
  EXPECT_EQ(report.error().code, errc::corruption);
  EXPECT_NE(report.error().message.find("past the log's last record 4"), std::string::npos) << report.error().message;
}

/// The position of the append that claims `key`, as a refused append names it.
std::string claim_position(event_store& store, const std::string& key, std::uint64_t tag) {
  auto result = store.append(claiming(one_stream("probe-" + std::to_string(tag), no_stream, tag, 1, 1), {key}));
  if (result) return "not claimed";
  const auto& message = result.error().message;
  const auto at = message.find("at position ");
  if (at == std::string::npos) return message;
  return message.substr(at + 12, message.find(')', at) - at - 12);
}

TEST(event_store_format, a_key_named_again_keeps_its_earliest_claim_and_is_not_counted_again) {
  // A format 1 ledger may have applied one transfer id twice (what the claims prevent from now
  // on): its later uses, in the same chunk or a later one, leave the first claim as it is.
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  const std::vector<std::vector<claimed_key>> chunks{{{"t/1", 1}, {"g/1", 1}, {"t/1", 2}},
                                                     {{"t/1", 3}, {"t/3", 3}}};
  std::vector<std::size_t> taken;
  store_options options = buffered();
  options.format_1_claims = [&](const event_store&, const claim_sink& claim) -> expected<void, error> {
    for (const auto& chunk : chunks) {
      auto n = claim(chunk);
      if (!n) return unexpected{n.error()};
      taken.push_back(*n);
    }
    return {};
  };
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  EXPECT_EQ(taken, (std::vector<std::size_t>{2, 1})) << "t/1 is claimed once, at position 1";
  EXPECT_EQ(claim_position(*store, "t/1", 10), "1");
  EXPECT_EQ(claim_position(*store, "g/1", 11), "1");
  EXPECT_EQ(claim_position(*store, "t/3", 12), "3");
  auto report = store->verify_indexes();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->unique_keys, 3u);
}

TEST(event_store_format, an_upgrade_run_again_takes_the_claims_an_earlier_run_wrote) {
  // The first run writes its first chunk and fails; the second names the same keys at the same
  // positions and counts every one of them as its own.
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto calls = std::make_shared<int>(0);
  ASSERT_FALSE(event_store::open(dir.path(), upgrading({{{"t/1", 1}, {"t/2", 2}}}, calls,
                                                       unexpected{error{errc::corruption, "garbage"}})));
  auto store = open_or_fail(dir.path(), upgrading({{{"t/1", 1}, {"t/2", 2}}, {{"t/3", 3}}}, calls));
  ASSERT_TRUE(store);
  EXPECT_EQ(*calls, 2);
  EXPECT_EQ(claim_position(*store, "t/2", 10), "2");
}

TEST(event_store_format, a_format_1_store_is_refused_for_writing_without_an_upgrade_but_read_as_it_is) {
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto refused = event_store::open(dir.path(), buffered());
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::incompatible_format);
  EXPECT_NE(refused.error().message.find("format version 1"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("gpustream serve"), std::string::npos) << refused.error().message;
  store_options read_only;
  read_only.read_only = true;
  auto reader = open_or_fail(dir.path(), read_only);
  ASSERT_TRUE(reader);
  EXPECT_EQ(reader->format_version(), 1u);
  EXPECT_EQ(read_everything(*reader).size(), 3u);
  auto report = reader->verify_indexes();
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->unique_keys, 0u);
}

TEST(event_store_format, a_failed_upgrade_leaves_format_1_and_runs_again_from_the_start_at_the_next_open) {
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto calls = std::make_shared<int>(0);
  auto failed = event_store::open(
      dir.path(), upgrading({{{"t/1", 1}}}, calls, unexpected{error{errc::corruption, "ledger event 2 is garbage"}}));
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, errc::corruption);
  const auto& message = failed.error().message;
  EXPECT_NE(message.find("upgrading the event store in " + dir.path().string() + " from format 1 to 2: "
                         "ledger event 2 is garbage"), std::string::npos) << message;
  EXPECT_NE(message.find("runs again at the next open"), std::string::npos) << message;
  EXPECT_NE(message.find("replay --data " + dir.path().string() + " --verify"), std::string::npos) << message;
  auto still_format_1 = event_store::open(dir.path(), buffered());
  ASSERT_FALSE(still_format_1);
  EXPECT_EQ(still_format_1.error().code, errc::incompatible_format);
  auto store = open_or_fail(dir.path(), upgrading({{{"t/1", 1}, {"t/2", 2}}}, calls));
  ASSERT_TRUE(store);
  EXPECT_EQ(*calls, 2);
  EXPECT_TRUE(key_is_taken(*store, "t/2", 20));
}

TEST(event_store_format, an_upgrade_whose_version_write_fails_is_whole_or_runs_again_at_the_next_open) {
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto faults = std::make_shared<fault_injector>();
  auto calls = std::make_shared<int>(0);
  auto options = upgrading({{{"t/1", 1}}}, calls);
  options.faults = faults;
  auto claims = options.format_1_claims;
  options.format_1_claims = [&](const event_store& store, const claim_sink& claim) {
    faults->set_fail_sync(true);  // the version's synced write fails
    return claims(store, claim);
  };
  auto failed = event_store::open(dir.path(), options);
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().code, errc::io_error);
  EXPECT_NE(failed.error().message.find("writing the new format version"), std::string::npos) << failed.error().message;
  faults->set_fail_sync(false);
  // The version's log record may have reached the file although its fsync failed; recovered,
  // it comes after the claims' records, so the upgrade is then whole. Otherwise it runs again.
  auto store = open_or_fail(dir.path(), upgrading({{{"t/1", 1}}}, calls));
  ASSERT_TRUE(store);
  EXPECT_GE(*calls, 1);
  EXPECT_LE(*calls, 2);
  EXPECT_TRUE(key_is_taken(*store, "t/1", 30));
}

TEST(event_store_format, a_format_older_than_this_build_upgrades_is_refused_naming_the_oldest_it_does) {
  temp_dir dir;
  write_format_1_store(dir.path());
  raw_put(dir.path(), "default", "format_version", std::string(8, '\0'));
  ASSERT_FALSE(HasFailure());
  auto store = event_store::open(dir.path(), upgrading({}, std::make_shared<int>(0)));
  ASSERT_FALSE(store);
  EXPECT_EQ(store.error().code, errc::incompatible_format);
  EXPECT_NE(store.error().message.find("format version 0"), std::string::npos) << store.error().message;
  EXPECT_NE(store.error().message.find("upgrades format 1 and newer"), std::string::npos) << store.error().message;
}

TEST(event_store_format, an_upgrade_claim_must_name_a_valid_key_and_a_recorded_position) {
  temp_dir dir;
  write_format_1_store(dir.path());
  ASSERT_FALSE(HasFailure());
  auto calls = std::make_shared<int>(0);
  const auto refusal = [&](claimed_key bad) {
    auto options = upgrading({{bad}}, calls);
    options.unique_key_bytes_max = 8;
    auto store = event_store::open(dir.path(), options);
    return store ? std::string("accepted") : store.error().message;
  };
  EXPECT_NE(refusal({"t/1", 0}).find("position 0, but the log holds 1 to 3"), std::string::npos) << refusal({"t/1", 0});
  EXPECT_NE(refusal({"t/1", 4}).find("position 4"), std::string::npos) << refusal({"t/1", 4});
  EXPECT_NE(refusal({"", 1}).find("0 bytes"), std::string::npos) << refusal({"", 1});
  EXPECT_NE(refusal({"123456789", 1}).find("9 bytes"), std::string::npos) << refusal({"123456789", 1});
  EXPECT_EQ(refusal({"12345678", 3}), "accepted");  // at the limits
}

TEST(event_store_format, a_directory_of_other_files_is_refused) {
  temp_dir dir;
  { std::ofstream(dir.path() / "notes.txt") << "not a store"; }
  auto store = event_store::open(dir.path());
  ASSERT_FALSE(store);
  EXPECT_EQ(store.error().code, errc::invalid_argument);
  EXPECT_TRUE(std::filesystem::exists(dir.path() / "notes.txt"));
}

TEST(event_store_format, read_only_needs_an_existing_store_and_refuses_appends) {
  temp_dir dir;
  store_options read_only;
  read_only.read_only = true;
  auto missing = event_store::open(dir.path() / "none", read_only);
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("no event store"), std::string::npos);
  auto writer = open_or_fail(dir.path());
  ASSERT_TRUE(writer);
  ASSERT_TRUE(writer->append(one_stream("s", no_stream, 1, 1, 2)));
  auto reader = open_or_fail(dir.path(), read_only);  // beside the writer, no lock conflict
  ASSERT_TRUE(reader);
  EXPECT_EQ(reader->read_all(1, 10)->size(), 2u);
  auto refused = reader->append(one_stream("s", any_version, 1, 3, 1));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::closed);
}

// ---- acknowledgements follow the fsyncs that cover them ----

/// What a power cut would leave of `from` in `to`: each file cut to the bytes its fsyncs covered
/// (`durable_bytes`, by file name); files never fsynced, or since renamed, are left out.
void copy_durable(const std::filesystem::path& from, const std::filesystem::path& to,
                  const std::map<std::string, std::uint64_t>& durable_bytes) {
  std::filesystem::create_directories(to);
  for (const auto& [name, bytes] : durable_bytes) {
    if (!std::filesystem::exists(from / name)) continue;
    std::ifstream in(from / name, std::ios::binary);
    std::string content(bytes, '\0');
    in.read(content.data(), static_cast<std::streamsize>(bytes));
    EXPECT_EQ(in.gcount(), static_cast<std::streamsize>(bytes)) << name << " is shorter than its fsyncs";
    std::ofstream(to / name, std::ios::binary).write(content.data(), in.gcount());
  }
}

TEST(event_store_durability, every_acknowledged_append_is_in_what_the_fsyncs_covered) {
  // The syncer starts an fsync as soon as a group's log record is written, before RocksDB has
  // inserted the group into its memtables; an append may still be answered only once an fsync
  // that began after its record was written has returned. Many appenders with one append in
  // flight each (as actors append) make groups of every size; at every 8th acknowledgement the
  // test copies what a power cut would leave at that moment, and each copy must hold the append.
  temp_dir dir, copies;
  auto faults = std::make_shared<fault_injector>();
  std::mutex durable_mutex;
  std::map<std::string, std::uint64_t> durable;  // by file name: what its fsyncs covered
  faults->set_sync_observer([&](const std::string& path, std::uint64_t bytes) {
    std::lock_guard lock(durable_mutex);
    auto& covered = durable[std::filesystem::path(path).filename().string()];
    covered = std::max(covered, bytes);
  });
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  constexpr int appenders = 16, appends_each = 25;
  // Touched only by the callbacks, which run one at a time on the store's syncer thread.
  std::vector<std::uint64_t> checked_last_positions;
  int acknowledged = 0, finished = 0;
  std::promise<void> all_done;
  std::function<void(int, int)> send = [&](int t, int k) {
    const auto count = static_cast<std::size_t>(1 + k % 3);
    const auto first_id = static_cast<std::uint64_t>(t * 1000 + k * 4);
    store->append_async(one_stream("s-" + std::to_string(t), any_version, 7, first_id, count),
                        [&, t, k](expected<append_result, error> r) {
                          EXPECT_TRUE(r) << r.error().message;
                          if (r && acknowledged++ % 8 == 0) {
                            std::map<std::string, std::uint64_t> now;
                            {
                              std::lock_guard lock(durable_mutex);
                              now = durable;
                            }
                            copy_durable(dir.path(),
                                         copies.path() / std::to_string(checked_last_positions.size()), now);
                            checked_last_positions.push_back(r->last_position);
                          }
                          if (k + 1 < appends_each) return send(t, k + 1);
                          if (++finished == appenders) all_done.set_value();
                        });
  };
  for (int t = 0; t < appenders; ++t) send(t, 0);
  ASSERT_EQ(all_done.get_future().wait_for(60s), std::future_status::ready);
  store.reset();
  EXPECT_EQ(acknowledged, appenders * appends_each);
  ASSERT_GE(checked_last_positions.size(), 40u);
  for (std::size_t i = 0; i < checked_last_positions.size(); ++i) {
    SCOPED_TRACE("copy " + std::to_string(i));
    auto copy = open_or_fail(copies.path() / std::to_string(i));
    ASSERT_TRUE(copy);
    EXPECT_GE(copy->last_position(), checked_last_positions[i]) << "an acknowledged append was not durable";
    auto record = copy->read_all(checked_last_positions[i], 1);
    ASSERT_TRUE(record) << record.error().message;
    ASSERT_EQ(record->size(), 1u);
    EXPECT_EQ(record->front().position, checked_last_positions[i]);
  }
}

TEST(event_store_durability, fsyncs_under_load_are_spaced_by_sync_interval_after_a_burst) {
  // sync_burst fsyncs start at once, then one per sync_interval: five appends, each waiting for
  // its acknowledgement (its own fsync), take at least three intervals.
  temp_dir dir;
  store_options options;
  options.sync_interval = 100ms;
  options.sync_burst = 2;
  auto store = open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  const auto syncs_before = store->stats().syncs;
  const auto started = std::chrono::steady_clock::now();
  for (std::uint64_t k = 0; k < 5; ++k) {
    ASSERT_TRUE(store->append(one_stream("s", k == 0 ? no_stream : k, 1, 1 + k, 1)));
  }
  const auto took = std::chrono::steady_clock::now() - started;
  EXPECT_EQ(store->stats().syncs - syncs_before, 5u) << "one fsync per append waited for";
  // The fifth fsync starts no earlier than three intervals after the first.
  EXPECT_GE(took, 3 * options.sync_interval) << "two at once, then one per interval";

  // Appends sent while an fsync waits its turn are acknowledged by that fsync.
  constexpr int waiting = 30;
  const auto syncs_between = store->stats().syncs;
  std::atomic<int> acknowledged{0};
  std::promise<void> all;
  for (int i = 0; i < waiting; ++i) {
    store->append_async(one_stream("w-" + std::to_string(i), no_stream, 2, 100 + static_cast<std::uint64_t>(i), 1),
                        [&](expected<append_result, error> r) {
                          EXPECT_TRUE(r) << r.error().message;
                          if (++acknowledged == waiting) all.set_value();
                        });
  }
  ASSERT_EQ(all.get_future().wait_for(10s), std::future_status::ready);
  EXPECT_LE(store->stats().syncs - syncs_between, 3u) << "the waiting appends shared their fsyncs";
}

TEST(event_store_limits, a_sync_burst_of_zero_is_refused_naming_the_option) {
  temp_dir dir;
  store_options options;
  options.sync_burst = 0;
  auto opened = event_store::open(dir.path(), options);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, errc::invalid_argument);
  EXPECT_NE(opened.error().message.find("sync_burst"), std::string::npos) << opened.error().message;
  options.sync_burst = 1;
  options.sync_interval = std::chrono::microseconds(-1);
  opened = event_store::open(dir.path(), options);
  ASSERT_FALSE(opened);
  EXPECT_NE(opened.error().message.find("sync_interval"), std::string::npos) << opened.error().message;
}

TEST(event_store_limits, a_read_limit_of_zero_is_refused_naming_the_option) {
  temp_dir dir;
  store_options options;
  options.read_events_max = 0;  // every read would return nothing, and a catch-up would never end
  auto opened = event_store::open(dir.path(), options);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, errc::invalid_argument);
  EXPECT_NE(opened.error().message.find("read_events_max"), std::string::npos) << opened.error().message;
}

TEST(event_store_limits, a_payload_limit_whose_records_could_not_be_read_back_is_refused) {
  temp_dir dir;
  store_options options;
  // Its record, with the envelope, is larger; and one near SIZE_MAX, whose sum would wrap round.
  for (const std::size_t payload_max : {events::record_bytes_max, ~std::size_t{0} - 8}) {
    options.payload_bytes_max = payload_max;
    auto opened = event_store::open(dir.path(), options);
    ASSERT_FALSE(opened) << payload_max;
    EXPECT_EQ(opened.error().code, errc::invalid_argument);
    EXPECT_NE(opened.error().message.find("payload_bytes_max"), std::string::npos) << opened.error().message;
  }
}

TEST(event_store_limits, the_largest_payload_limit_allowed_stores_and_reads_back_its_largest_event) {
  temp_dir dir;
  store_options options;
  options.mode = durability::buffered;
  options.stream_id_bytes_max = 16;
  // The largest payload whose record fits record_bytes_max: whole words less the envelope's.
  options.payload_bytes_max = (events::record_bytes_max - events::encoded_record_bytes_max(16, 0)) / 8 * 8;
  ASSERT_LE(events::encoded_record_bytes_max(16, options.payload_bytes_max), events::record_bytes_max);
  ASSERT_GT(events::encoded_record_bytes_max(16, options.payload_bytes_max + 1), events::record_bytes_max);
  auto opened = event_store::open(dir.path(), options);
  ASSERT_TRUE(opened) << opened.error().message;
  auto& store = **opened;
  const std::string stream(16, 's');
  std::string payload(options.payload_bytes_max, 'p');
  auto appended = store.append({{stream, no_stream, {make_event(make_id(1, 1), payload)}}});
  ASSERT_TRUE(appended) << appended.error().message;
  auto read = store.read_stream(stream, 1, 1, 1);
  ASSERT_TRUE(read) << read.error().message;
  ASSERT_EQ(read->size(), 1u);
  EXPECT_EQ(read->front().payload, payload);
}

// ---- durability faults through a RocksDB FileSystem wrapper ----

class event_store_faults : public ::testing::TestWithParam<int> {};

TEST_P(event_store_faults, a_failing_disk_acknowledges_nothing_and_recovers_when_lifted) {
  const bool no_space = GetParam() == 1;
  temp_dir dir;
  auto faults = std::make_shared<fault_injector>();
  auto store = open_or_fail(dir.path(), with_faults(faults));
  ASSERT_TRUE(store);
  ASSERT_TRUE(store->append(one_stream("s", no_stream, 1, 1, 2)));

  if (no_space) faults->set_no_space(true);
  else faults->set_fail_sync(true);
  const auto failing = one_stream("s", 2, 1, 3, 2);
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto result = store->append(failing);
    ASSERT_FALSE(result) << "attempt " << attempt;
    EXPECT_EQ(result.error().code, no_space ? errc::no_space : errc::io_error) << result.error().message;
  }
  EXPECT_EQ(store->last_position(), 2u);

  if (no_space) faults->set_no_space(false);
  else faults->set_fail_sync(false);
  // Reads come back without waiting for an append to trigger the reopen.
  auto version = store->stream_version("s");
  ASSERT_TRUE(version) << version.error().message;
  EXPECT_TRUE(*version == 2u || *version == 4u) << "the failed append is wholly absent or present";
  auto retried = store->append(failing);  // the same ids: either written now, or found written
  ASSERT_TRUE(retried) << retried.error().message;
  EXPECT_EQ(retried->streams.front().first_version, 3u);
  EXPECT_EQ(retried->first_position, 3u);
  auto more = store->append(one_stream("s", 4, 1, 5, 1));
  ASSERT_TRUE(more) << more.error().message;
  EXPECT_EQ(more->first_position, 5u);
  const auto all = read_everything(*store);
  ASSERT_EQ(all.size(), 5u);
  for (std::size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i].position, i + 1);
    EXPECT_EQ(all[i].version, i + 1);
  }
}

INSTANTIATE_TEST_SUITE_P(sync_and_enospc, event_store_faults, ::testing::Values(0, 1),
                         [](const auto& info) { return info.param == 0 ? "fsync_fails" : "disk_full"; });

}  // namespace
}  // namespace gpustream::storage
