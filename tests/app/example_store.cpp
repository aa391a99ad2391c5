#include "tests/app/example_store.hpp"

#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <utility>

#include "events/codec.hpp"
#include "tests/events/event_examples.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app::testing {
namespace {

/// The event types (indexes into event_examples()) one stream receives in one append.
struct stream_part {
  std::string stream;
  std::vector<events::event_type> types;
};

/// Each inner vector is one append. Types 12, 13, 14 and 27 appear twice; appends 2, 4 and 6 touch
/// several streams; user-ada, provider-17 and ledger are appended to more than once.
std::vector<std::vector<stream_part>> example_appends() {
  return {
      {{"user-ada", {0, 1, 2, 4}}},
      {{"user-bob", {3}}, {"provider-17", {5, 6, 7}}},
      {{"provider-17", {8, 9, 10, 11}}},
      {{"job-1", {12, 13, 14, 15, 16, 17, 18, 19}}, {"ledger", {27}}},
      {{"campaign-1", {20, 21, 22, 23, 24, 25, 26}}},
      {{"payout-1", {28, 29, 30}}, {"job-2", {12, 13, 14}}, {"ledger", {27}}},
  };
}

}  // namespace

appended_contents fill_with_examples(storage::event_store& store) {
  const auto examples = events::event_examples();
  auto appends = example_appends();
  // Types added to the catalog after this file was written still get replayed: one more append.
  std::set<events::event_type> covered;
  for (const auto& append : appends) {
    for (const auto& part : append) covered.insert(part.types.begin(), part.types.end());
  }
  std::vector<events::event_type> uncovered;
  for (events::event_type type = 0; type < examples.size(); ++type) {
    if (!covered.contains(type)) uncovered.push_back(type);
  }
  if (!uncovered.empty()) appends.push_back({{"other-1", uncovered}});

  appended_contents contents;
  contents.events_per_type.assign(events::event_type_count, 0);
  std::map<std::string, std::uint64_t> versions;
  std::uint64_t next_id = 1;
  for (const auto& append : appends) {
    std::vector<storage::stream_append> request;
    for (const auto& part : append) {
      storage::stream_append one{part.stream, versions[part.stream], {}};
      for (const auto type : part.types) {
        const auto& example = examples.at(type);
        EXPECT_EQ(events::type_of(example), type) << "event_examples() is not in type order";
        one.events.push_back(storage::new_event{storage::testing::make_id(0xa99, next_id++), type,
                                                events::encode_payload(example)});
        contents.events_per_type.at(type) += 1;
        contents.events += 1;
      }
      versions[part.stream] += part.types.size();
      contents.streams.insert(part.stream);
      request.push_back(std::move(one));
    }
    auto appended = store.append(std::move(request));
    if (!appended) {
      ADD_FAILURE() << "append failed: " << appended.error().message;
      return contents;
    }
    EXPECT_EQ(appended->first_position, contents.last_position + 1);
    contents.last_position = appended->last_position;
  }
  EXPECT_EQ(contents.last_position, contents.events);
  return contents;
}

appended_contents make_example_store(const std::filesystem::path& directory) {
  auto store = storage::testing::open_or_fail(directory);
  if (!store) return {};
  return fill_with_examples(*store);
}


std::map<std::string, std::uint64_t> named_counts(const std::vector<std::uint64_t>& per_type) {
  std::map<std::string, std::uint64_t> counts;
  for (std::size_t type = 0; type < per_type.size(); ++type) {
    if (per_type[type] == 0) continue;
    counts.emplace(events::type_name(static_cast<events::event_type>(type)), per_type[type]);
  }
  return counts;
}

std::map<std::string, std::uint64_t> text_counts(const std::string& text) {
  std::map<std::string, std::uint64_t> counts;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.starts_with("events ")) break;  // the summary line ends the table
    std::istringstream fields(line);
    std::string name;
    std::uint64_t count = 0;
    fields >> name >> count;
    EXPECT_FALSE(fields.fail()) << "not a \"type count\" line: " << line;
    EXPECT_TRUE(counts.emplace(name, count).second) << "type listed twice: " << name;
  }
  return counts;
}

}  // namespace gpustream::app::testing
