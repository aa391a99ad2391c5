// app::replay_store and its formats on real stores: exact counts; damage named at its position; --verify's domain checks.
#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <map>
#include <span>

#include "actors/persistence.hpp"
#include "app/replay.hpp"
#include "domain/campaign.hpp"
#include "domain/job.hpp"
#include "domain/ledger.hpp"
#include "domain/user.hpp"
#include "events/codec.hpp"
#include "events/crc32c.hpp"
#include "tests/app/example_store.hpp"
#include "tests/events/event_examples.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app {
namespace {

using storage::testing::make_id;
using storage::testing::open_or_fail;
using storage::testing::raw_put;
using storage::testing::temp_dir;
using testing::delete_first_index_entry;
using testing::appended_contents;
using testing::flip_byte_of_record;
using testing::make_example_store;
using testing::named_counts;
using testing::text_counts;

/// The report must count exactly what was appended.
void expect_report_matches(const replay_report& report, const appended_contents& contents) {
  EXPECT_EQ(report.events, contents.events);
  EXPECT_EQ(report.streams, contents.streams.size());
  EXPECT_EQ(report.last_position, contents.last_position);
  EXPECT_EQ(report.events_per_type, contents.events_per_type);
}

TEST(replay_store, counts_every_appended_event_by_type_stream_and_position) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  for (std::size_t type = 0; type < contents.events_per_type.size(); ++type) {
    ASSERT_GE(contents.events_per_type[type], 1u) << "type " << type << " has no example in the store";
  }
  auto report = replay_store(dir.path());
  ASSERT_TRUE(report) << report.error().message;
  expect_report_matches(*report, contents);
  EXPECT_GT(report->seconds, 0.0);
}

TEST(replay_store, verify_checks_both_indexes_of_a_healthy_store) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path(), true);
  ASSERT_TRUE(report) << report.error().message;
  expect_report_matches(*report, contents);
  EXPECT_TRUE(report->indexes_verified);
  EXPECT_GE(report->index_runs, contents.streams.size());
  EXPECT_GE(report->index_appends, 1u);
  EXPECT_LE(report->index_appends, report->index_runs);
  EXPECT_NE(format_text(*report).find("indexes verified"), std::string::npos);
  // The ledger's appends claim its transfer and group ids, and they are all the keys there are.
  EXPECT_GT(report->ledger_keys_claimed, contents.events_per_type.at(events::type_of(events::event{events::transfer_recorded{}})));
  EXPECT_EQ(report->index_unique_keys, report->ledger_keys_claimed);
  const auto keys = std::to_string(report->index_unique_keys);
  EXPECT_NE(format_text(*report).find(", " + keys + " unique keys (" + keys + " of them the ledger's, each found claimed)"),
            std::string::npos)
      << format_text(*report);
}

TEST(replay_store, verify_finds_a_ledger_key_that_is_not_claimed) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  // Claimed keys sort first in the id index: this removes one of the ledger's.
  delete_first_index_entry(dir.path(), "dedup");
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  auto verified = replay_store(dir.path(), true);
  ASSERT_FALSE(verified);
  EXPECT_NE(verified.error().message.find("the ledger's key 'ledger/"), std::string::npos) << verified.error().message;
  EXPECT_NE(verified.error().message.find("is not claimed in the store's id index"), std::string::npos)
      << verified.error().message;
  EXPECT_GT(verified.error().position, 0u);
  EXPECT_EQ(verified.error().stream, "ledger");
}

TEST(replay_store, verify_does_not_ask_a_format_1_store_for_claims) {
  temp_dir dir;
  (void)make_example_store(dir.path(), testing::ledger_claims::none);
  raw_put(dir.path(), "default", "format_version", std::string("\0\0\0\0\0\0\0\x01", 8));
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path(), true);
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->ledger_keys_claimed, 0u);
  EXPECT_EQ(report->index_unique_keys, 0u);
}

TEST(replay_store, verify_finds_a_lost_index_entry_that_plain_replay_cannot_see) {
  for (const std::string family : {"dedup", "events"}) {
    SCOPED_TRACE(family);
    temp_dir dir;
    // Without claimed keys, the first entry of the id index ("dedup") is an append's.
    (void)make_example_store(dir.path(), testing::ledger_claims::none);
    delete_first_index_entry(dir.path(), family);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    auto plain = replay_store(dir.path(), false);
    EXPECT_TRUE(plain) << "the log itself is intact";
    auto verified = replay_store(dir.path(), true);
    ASSERT_FALSE(verified);
    EXPECT_FALSE(verified.error().message.empty());
  }
}

TEST(replay_store, verify_finds_a_snapshot_of_a_stream_the_log_holds_no_event_of) {
  temp_dir dir;
  (void)make_example_store(dir.path(), testing::ledger_claims::none);
  // A well-formed snapshot (version 3, its CRC32C right) of a user the log never created.
  std::string body(8, '\0');
  body[7] = 3;
  body += "state";
  const auto crc = events::crc32c(std::as_bytes(std::span(body.data(), body.size())));
  std::string value = body;
  for (int i = 0; i < 4; ++i) value += static_cast<char>((crc >> (8 * i)) & 0xff);
  raw_put(dir.path(), "snapshots", "user-ghost", value);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  auto verified = replay_store(dir.path(), true);
  ASSERT_FALSE(verified);
  EXPECT_EQ(verified.error().stream, "user-ghost");
  EXPECT_NE(verified.error().message.find("holds no event of it"), std::string::npos) << verified.error().message;
}

TEST(replay_store, an_empty_store_replays_to_zero) {
  temp_dir dir;
  ASSERT_TRUE(open_or_fail(dir.path()));
  auto report = replay_store(dir.path());
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->events, 0u);
  EXPECT_EQ(report->streams, 0u);
  EXPECT_EQ(report->last_position, 0u);
  EXPECT_EQ(report->events_per_type, std::vector<std::uint64_t>(events::event_type_count, 0));
}

TEST(replay_format, json_parses_and_carries_the_same_numbers) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path());
  ASSERT_TRUE(report) << report.error().message;

  boost::system::error_code ec;
  const auto parsed = boost::json::parse(format_json(*report), ec);
  ASSERT_FALSE(ec) << ec.message();
  ASSERT_TRUE(parsed.is_object());
  const auto& json = parsed.as_object();
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("events")), contents.events);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("streams")), contents.streams.size());
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("last_position")), contents.last_position);
  EXPECT_TRUE(json.at("seconds").is_double());
  EXPECT_TRUE(json.at("events_per_second").is_double());
  std::map<std::string, std::uint64_t> per_type;
  for (const auto& [name, count] : json.at("events_per_type").as_object()) {
    per_type.emplace(name, boost::json::value_to<std::uint64_t>(count));
  }
  EXPECT_EQ(per_type, named_counts(contents.events_per_type));
}

TEST(replay_format, text_names_each_type_present_with_its_count_and_the_totals) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path());
  ASSERT_TRUE(report) << report.error().message;
  const auto text = format_text(*report);
  EXPECT_EQ(text_counts(text), named_counts(contents.events_per_type)) << text;
  const auto totals = "events " + std::to_string(contents.events) + ", streams " +
                      std::to_string(contents.streams.size()) + ", last position " +
                      std::to_string(contents.last_position) + ",";
  EXPECT_NE(text.find(totals), std::string::npos) << text;
}

TEST(replay_format, types_absent_from_the_log_are_not_listed) {
  replay_report report;
  report.events_per_type.assign(events::event_type_count, 0);
  report.events_per_type[3] = 2;   // user_tier_changed
  report.events_per_type[27] = 5;  // transfer_recorded
  report.events = 7;
  report.streams = 2;
  report.last_position = 7;
  const std::map<std::string, std::uint64_t> expected{{"user_tier_changed", 2}, {"transfer_recorded", 5}};
  EXPECT_EQ(text_counts(format_text(report)), expected);
  const auto json = boost::json::parse(format_json(report)).as_object();
  EXPECT_EQ(json.at("events_per_type").as_object().size(), 2u);
}

TEST(replay_store, a_flipped_byte_fails_the_replay_at_that_position) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  constexpr std::uint64_t damaged = 17;
  ASSERT_LT(damaged, contents.last_position);
  ASSERT_NO_FATAL_FAILURE(flip_byte_of_record(dir.path(), damaged, 30));
  auto report = replay_store(dir.path());
  ASSERT_FALSE(report) << "replay accepted a record with a flipped byte";
  EXPECT_EQ(report.error().position, damaged) << report.error().message;
  EXPECT_NE(report.error().message.find("position 17"), std::string::npos) << report.error().message;
  EXPECT_NE(report.error().message.find("CRC32C"), std::string::npos) << report.error().message;
}

/// Appends the example store, then `bad` into stream "user-mallory", then one valid event after it;
/// returns the bad event's global position.
std::uint64_t store_with_bad_event(const std::filesystem::path& dir, storage::new_event bad) {
  auto store = open_or_fail(dir);
  if (!store) return 0;
  (void)testing::fill_with_examples(*store);  // counts are not the point here
  auto appended = store->append({{"user-mallory", storage::no_stream, {std::move(bad)}}});
  EXPECT_TRUE(appended) << (appended ? "" : appended.error().message);
  if (!appended) return 0;
  const auto valid = events::encode_payload(events::event_examples()[4]);
  auto after = store->append({{"user-ada", storage::any_version, {{make_id(0xbad, 2), 4, valid}}}});
  EXPECT_TRUE(after) << (after ? "" : after.error().message);
  return appended->first_position;
}

/// Appends `bad` after good events and checks that replay stops there, naming its position.
void expect_replay_fails_at(storage::new_event bad, const std::string& why) {
  temp_dir dir;
  const auto position = store_with_bad_event(dir.path(), std::move(bad));
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path());
  ASSERT_FALSE(report) << "replay accepted " << why;
  EXPECT_EQ(report.error().position, position) << report.error().message;
  EXPECT_NE(report.error().message.find("does not decode"), std::string::npos) << report.error().message;
  EXPECT_NE(report.error().message.find("user-mallory"), std::string::npos) << report.error().message;
}

TEST(replay_store, a_payload_that_is_not_capnp_fails_at_its_position) {
  expect_replay_fails_at({make_id(0xbad, 1), 3, "not capnp"}, "a payload that is not Cap'n Proto");
}

TEST(replay_store, a_payload_of_another_type_than_declared_fails_at_its_position) {
  // A valid user_credited (type 4) payload declared as user_tier_changed (type 3).
  expect_replay_fails_at({make_id(0xbad, 1), 3, events::encode_payload(events::event_examples()[4])},
                         "a payload whose union tag differs from its type");
}

TEST(replay_store, an_unknown_type_number_fails_at_its_position) {
  expect_replay_fails_at({make_id(0xbad, 1), 999, events::encode_payload(events::event_examples()[4])},
                         "an event type this build does not know");
}

TEST(replay_store, a_missing_directory_is_no_event_store_and_is_not_created) {
  temp_dir dir;
  const auto missing = dir.path() / "never-served";
  auto report = replay_store(missing);
  ASSERT_FALSE(report);
  EXPECT_EQ(report.error().position, 0u);
  EXPECT_NE(report.error().message.find("no event store"), std::string::npos) << report.error().message;
  EXPECT_NE(report.error().message.find(missing.string()), std::string::npos) << report.error().message;
  EXPECT_FALSE(std::filesystem::exists(missing)) << "a read-only replay created the directory";
}

TEST(replay_store, an_empty_directory_is_no_event_store) {
  temp_dir dir;
  auto report = replay_store(dir.path());
  ASSERT_FALSE(report);
  EXPECT_NE(report.error().message.find("no event store"), std::string::npos) << report.error().message;
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "a read-only replay wrote into the directory";
}

TEST(replay_store, works_while_a_writer_holds_the_store_open) {
  temp_dir dir;
  auto writer = open_or_fail(dir.path());
  ASSERT_TRUE(writer);
  auto contents = testing::fill_with_examples(*writer);
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto first = replay_store(dir.path());
  ASSERT_TRUE(first) << first.error().message;
  expect_report_matches(*first, contents);

  // Appends made after one replay are seen by the next, with the writer still open.
  const auto payload = events::encode_payload(events::event_examples()[4]);
  auto appended = writer->append({{"user-ada", storage::any_version, {{make_id(0x5ec, 1), 4, payload}}}});
  ASSERT_TRUE(appended) << appended.error().message;
  contents.events += 1;
  contents.events_per_type[4] += 1;
  contents.last_position = appended->last_position;
  auto second = replay_store(dir.path());
  ASSERT_TRUE(second) << second.error().message;
  expect_report_matches(*second, contents);
}

// ---- --verify: the domain ----------------------------------------------------------------------

TEST(replay_verify, rebuilds_every_aggregate_of_a_sound_store_and_counts_them) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path(), true);
  ASSERT_TRUE(report) << report.error().message;
  expect_report_matches(*report, contents);
  ASSERT_TRUE(report->domain_verified);
  const auto& a = report->aggregates;
  EXPECT_EQ(a.events, contents.events);
  EXPECT_EQ(a.users, 2u);      // ada, bob
  EXPECT_EQ(a.providers, 1u);  // 17
  EXPECT_EQ(a.jobs, 3u);
  EXPECT_EQ(a.jobs_by_status[static_cast<std::size_t>(domain::job_status::completed)], 1u);
  EXPECT_EQ(a.jobs_by_status[static_cast<std::size_t>(domain::job_status::failed)], 1u);
  EXPECT_EQ(a.jobs_by_status[static_cast<std::size_t>(domain::job_status::cancelled)], 1u);
  EXPECT_EQ(a.campaigns, 1u);
  EXPECT_EQ(a.payouts, 2u);
  EXPECT_EQ(a.payouts_settled, 1u);
  EXPECT_EQ(a.payouts_failed, 1u);
  EXPECT_EQ(a.ledger_transfers, 9u);
  EXPECT_EQ(a.ledger_groups, 8u);
  EXPECT_EQ(a.ledger_accounts, 6u);  // external, user-ada, provider-17, platform, campaign-1, payouts_in_flight
  EXPECT_EQ(report->snapshots_compared, 0u);

  const auto text = format_text(*report);
  EXPECT_NE(text.find("domain verified: 2 users, 1 providers, 3 jobs, 1 campaigns, 2 payouts"), std::string::npos)
      << text;
  EXPECT_NE(text.find("completed 1 failed 1 cancelled 1"), std::string::npos) << text;
  EXPECT_NE(text.find("ledger: 9 transfers in 8 groups over 6 accounts"), std::string::npos) << text;
  EXPECT_EQ(text_counts(text), named_counts(contents.events_per_type)) << "the aggregates follow the table";

  const auto json = boost::json::parse(format_json(*report)).as_object();
  EXPECT_TRUE(json.at("domain_verified").as_bool());
  const auto& aggregates = json.at("aggregates").as_object();
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(aggregates.at("users")), 2u);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(aggregates.at("jobs_by_status").at("cancelled")), 1u);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(aggregates.at("payouts_by_status").at("settled")), 1u);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(aggregates.at("ledger_transfers")), 9u);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("snapshots_compared")), 0u);
}

TEST(replay_verify, the_plain_replay_does_not_rebuild_the_domain) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  auto report = replay_store(dir.path(), false);
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_FALSE(report->domain_verified);
  EXPECT_EQ(report->aggregates, domain::verify_counts{});
  EXPECT_EQ(format_text(*report).find("domain verified"), std::string::npos);
  EXPECT_FALSE(boost::json::parse(format_json(*report)).as_object().contains("aggregates"));
}

/// Fills a store with the examples, then appends `events` to `stream` in one append; returns the
/// global position of the first of them.
std::uint64_t append_after_examples(const std::filesystem::path& dir, const std::string& stream,
                                    const std::vector<events::event>& events) {
  auto store = open_or_fail(dir);
  if (!store) return 0;
  (void)testing::fill_with_examples(*store);
  storage::stream_append append{stream, storage::any_version, {}};
  std::uint64_t n = 0;
  for (const auto& event : events) {
    append.events.push_back({make_id(0x7e5, ++n), events::type_of(event), events::encode_payload(event)});
  }
  auto appended = store->append({std::move(append)});
  EXPECT_TRUE(appended) << (appended ? "" : appended.error().message);
  return appended ? appended->first_position : 0;
}

/// Replays with --verify, expecting `invariant` broken at `stream`, `version` and `position`, with
/// each of `words` in the message; the plain replay of the same store passes.
void expect_verify_fails(const std::filesystem::path& dir, const std::string& invariant, const std::string& stream,
                         std::uint64_t version, std::uint64_t position, const std::vector<std::string>& words) {
  auto plain = replay_store(dir, false);
  EXPECT_TRUE(plain) << "the log itself is intact: " << plain.error().message;
  auto verified = replay_store(dir, true);
  ASSERT_FALSE(verified) << "--verify accepted a store that breaks " << invariant;
  const auto& problem = verified.error();
  EXPECT_EQ(problem.invariant, invariant) << problem.message;
  EXPECT_EQ(problem.stream, stream) << problem.message;
  EXPECT_EQ(problem.version, version) << problem.message;
  EXPECT_EQ(problem.position, position) << problem.message;
  EXPECT_NE(problem.message.find("invariant " + invariant + " violated in stream \"" + stream + "\""),
            std::string::npos)
      << problem.message;
  for (const auto& word : words) EXPECT_NE(problem.message.find(word), std::string::npos) << word << " in: " << problem.message;
}

events::transfer_recorded a_transfer(std::string id, std::string debit, std::string credit, std::int64_t amount,
                                     events::transfer_kind kind) {
  return {id, std::move(debit), std::move(credit), amount, kind, "test", id, 1'700'000'001'000'000};
}

TEST(replay_verify, an_overdrawn_user_is_named_with_the_balance) {
  temp_dir dir;
  // Ada deposited 25 USD and spent 4,000 micro-USD of it.
  const auto position = append_after_examples(
      dir.path(), "ledger", {a_transfer("job-9/usage", "user-ada", "provider-17", 30'000'000, events::transfer_kind::usage)});
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "ledger", "ledger", 10, position,
                      {"user-ada", "-5004000 micro-USD", "never go negative"});
}

TEST(replay_verify, a_transfer_id_applied_twice_is_named) {
  temp_dir dir;
  auto again = a_transfer("job-1/usage", "user-ada", "provider-17", 4'000, events::transfer_kind::usage);
  again.linked_group_id = "job-1-again";
  const auto position = append_after_examples(dir.path(), "ledger", {again});
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "ledger", "ledger", 10, position, {"\"job-1/usage\"", "applied twice"});
}

TEST(replay_verify, a_campaign_reserving_beyond_its_funding_is_named_with_the_amounts) {
  temp_dir dir;
  // Campaign 1 was funded 2,500 and spent 2,250: a reservation of 2,500 more passes its funding.
  const auto position = append_after_examples(
      dir.path(), "campaign-1",
      {events::ad_reserved{"imp-99", "1", "job-9", "bob", 2'500, 1'700'000'001'000'000, 1'700'000'002'000'000}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "campaign_budget", "campaign-1", 14, position,
                      {"spent 2250 micro-USD", "reserved 2500 micro-USD", "funded 2500 micro-USD"});
}

TEST(replay_verify, a_job_event_after_its_end_is_named) {
  temp_dir dir;
  const auto position = append_after_examples(
      dir.path(), "job-3", {events::job_failed{"3", events::failure_reason::internal, "late", 1'700'000'001'000'000}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "job_lifecycle", "job-3", 4, position, {"job_failed", "cancelled"});
}

TEST(replay_verify, an_event_in_a_stream_of_another_kind_is_named) {
  temp_dir dir;
  const auto position = append_after_examples(
      dir.path(), "user-bob", {events::payout_failed{"bob", "not a user event", 1'700'000'001'000'000}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "stream_kind", "user-bob", 4, position, {"payout_failed", "payout stream"});
}

// ---- --verify: snapshots ---------------------------------------------------------------------

/// The state of aggregate A rebuilt from the first `version` events of `stream` in `store`.
template <class A>
typename A::state rebuilt(const storage::event_store& store, const std::string& stream, std::uint64_t version) {
  typename A::state state{};
  auto records = store.read_stream(stream, 1, version, 1'000);
  EXPECT_TRUE(records) << (records ? "" : records.error().message);
  if (!records) return state;
  EXPECT_EQ(records->size(), version);
  for (const auto& r : *records) {
    auto event = events::decode_payload(r.type, std::as_bytes(std::span(r.payload.data(), r.payload.size())));
    EXPECT_TRUE(event);
    if (event) state = A::evolve(std::move(state), *event);
  }
  return state;
}

/// An actor system for encoding snapshots, as the actors do.
struct snapshot_writer {
  caf::actor_system_config config;
  caf::actor_system system{config};

  template <class A>
  void save(storage::event_store& store, const std::string& stream, std::uint64_t version,
            typename A::state state, std::uint32_t format = A::snapshot_version) {
    auto saved = store.save_snapshot(stream, version, actors::encode_snapshot(system, format, state));
    EXPECT_TRUE(saved) << (saved ? "" : saved.error().message);
  }
};

TEST(replay_verify, snapshots_equal_to_the_log_are_counted_and_other_versions_skipped) {
  temp_dir dir;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    (void)testing::fill_with_examples(*store);
    snapshot_writer writer;
    writer.save<domain::user>(*store, "user-ada", 2, rebuilt<domain::user>(*store, "user-ada", 2));
    writer.save<domain::job>(*store, "job-2", 6, rebuilt<domain::job>(*store, "job-2", 6));  // at its end
    writer.save<domain::campaign>(*store, "campaign-1", 5, rebuilt<domain::campaign>(*store, "campaign-1", 5));
    writer.save<domain::ledger>(*store, "ledger", 4, rebuilt<domain::ledger>(*store, "ledger", 4));
    // Written by a build whose user state had another shape: not comparable, so skipped.
    writer.save<domain::user>(*store, "user-bob", 1, domain::user_state{}, domain::user::snapshot_version + 1);
  }
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto report = replay_store(dir.path(), true);
  ASSERT_TRUE(report) << report.error().message;
  EXPECT_EQ(report->snapshots_compared, 4u);
  EXPECT_EQ(report->snapshots_skipped, 1u);
  EXPECT_NE(format_text(*report).find("snapshots: 4 equal to the log, 1 skipped"), std::string::npos)
      << format_text(*report);
}

TEST(replay_verify, a_snapshot_that_disagrees_with_the_log_is_named_with_its_version) {
  temp_dir dir;
  std::uint64_t position = 0;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    (void)testing::fill_with_examples(*store);
    auto live = rebuilt<domain::user>(*store, "user-ada", 3);
    live.display_name = "Ada, as the live actor wrongly held her";  // the third field inspect lists
    snapshot_writer{}.save<domain::user>(*store, "user-ada", 3, live);
    auto records = store->read_stream("user-ada", 3, 3, 1);
    ASSERT_TRUE(records && records->size() == 1u);
    position = records->front().position;
  }
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "live_state", "user-ada", 3, position,
                      {"differs from the state rebuilt from the log", "field 3 of 10"});
}

TEST(replay_verify, a_ledger_snapshot_that_disagrees_with_the_log_is_named) {
  temp_dir dir;
  std::uint64_t position = 0;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    (void)testing::fill_with_examples(*store);
    auto live = rebuilt<domain::ledger>(*store, "ledger", 3);
    live.balances_micros["user-ada"] += 1;  // a balance the transfers do not explain
    live.balances_micros["platform"] -= 1;
    snapshot_writer{}.save<domain::ledger>(*store, "ledger", 3, live);
    auto records = store->read_stream("ledger", 3, 3, 1);
    ASSERT_TRUE(records && records->size() == 1u);
    position = records->front().position;
  }
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "live_state", "ledger", 3, position, {"field 1 of 8"});
}

TEST(replay_verify, a_snapshot_that_does_not_decode_is_named) {
  temp_dir dir;
  std::uint64_t position = 0;
  {
    auto store = open_or_fail(dir.path());
    ASSERT_TRUE(store);
    (void)testing::fill_with_examples(*store);
    snapshot_writer writer;
    // The right snapshot_version, then bytes that are no job state.
    std::uint32_t not_a_state = 7;
    auto bytes = actors::encode_snapshot(writer.system, domain::job::snapshot_version, not_a_state);
    bytes += "not a job";
    ASSERT_TRUE(store->save_snapshot("job-1", 2, bytes));
    auto records = store->read_stream("job-1", 2, 2, 1);
    ASSERT_TRUE(records && records->size() == 1u);
    position = records->front().position;
  }
  ASSERT_FALSE(::testing::Test::HasFailure());
  expect_verify_fails(dir.path(), "live_state", "job-1", 2, position, {"does not decode"});
}

}  // namespace
}  // namespace gpustream::app
