// app::replay_store and its formats on real stores: exact counts; damage named at its position.
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <map>

#include "app/replay.hpp"
#include "events/codec.hpp"
#include "tests/app/example_store.hpp"
#include "tests/events/event_examples.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app {
namespace {

using storage::testing::make_id;
using storage::testing::open_or_fail;
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
}

TEST(replay_store, verify_finds_a_lost_index_entry_that_plain_replay_cannot_see) {
  for (const std::string family : {"dedup", "events"}) {
    SCOPED_TRACE(family);
    temp_dir dir;
    (void)make_example_store(dir.path());
    delete_first_index_entry(dir.path(), family);
    ASSERT_FALSE(::testing::Test::HasFatalFailure());
    auto plain = replay_store(dir.path(), false);
    EXPECT_TRUE(plain) << "the log itself is intact";
    auto verified = replay_store(dir.path(), true);
    ASSERT_FALSE(verified);
    EXPECT_FALSE(verified.error().message.empty());
  }
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

}  // namespace
}  // namespace gpustream::app
