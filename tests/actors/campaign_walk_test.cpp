// Random campaign commands through the campaign registry (persist then apply, stash, snapshots
// every few events, passivation and recovery in between) against the same commands folded purely:
// after every step the actor answers as the fold does, holds the same state, and the budget
// invariant (spent + reserved <= funded <= budget) holds.

#include "actors/aggregates.hpp"

#include <gtest/gtest.h>

#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tests/actors/actor_testing.hpp"

namespace gpustream::actors {
namespace {

class campaign_walk_test : public testing::deterministic_fixture {
 protected:
  campaign_walk_test() { open_store(); }

  campaign_registry spawn_registry() {
    registry_options options;
    options.stream_prefix = "campaign-";
    options.persistence.clock_us = clock_.function();
    options.persistence.snapshot_every_events = 4;
    options.idle_max = std::chrono::seconds(60);
    options.idle_check_interval = std::chrono::seconds(10);
    return stop_at_teardown(system_.spawn(registry_behavior<domain::campaign>, store_, options));
  }

  testing::manual_clock clock_;
};

/// An accepted reservation: its id and the price it holds.
struct held_reservation {
  std::string id;
  std::int64_t price_micros = 0;
};

/// A random command; reservations get fresh ids (an id is never reused), and the commands that
/// name one pick among the latest few accepted, so that most of them find it still held.
/// Impressions are priced within the reservation's price three times in four (a uniform price
/// was over it half the time, and one seed in a few hundred recorded no impression at all).
domain::campaign::command random_command(std::mt19937_64& random, int step, std::int64_t now_us,
                                         const std::vector<held_reservation>& reserved) {
  const auto pick = [&]() -> held_reservation {
    if (reserved.empty()) return {"r0", 2'000};
    return reserved[reserved.size() - 1 - random() % std::min<std::size_t>(reserved.size(), 3)];
  };
  const auto reservation = [&] { return pick().id; };
  switch (random() % 9) {
    case 0:
      return domain::create_campaign{"c1", "Acme", "Rust", "Learn Rust", "https://acme.example",
                                     {"rust"}, {"programming"}, 2'000'000, 5'000'000, 2'000'000, 3};
    case 1:
      return domain::fund_campaign{static_cast<std::int64_t>(random() % 300'000) - 1'000};
    case 2:  // pause half as often as resume, so that the campaign mostly runs
      if (random() % 2) return domain::resume_campaign{};
      return domain::pause_campaign{"walk"};
    case 3:
      return domain::resume_campaign{};
    case 4:
    case 5:
      return domain::reserve_ad{"r" + std::to_string(step), "j" + std::to_string(step),
                                "u" + std::to_string(random() % 40),
                                static_cast<std::int64_t>(random() % 2'100),  // bid: 2,000 each
                                now_us + 1 + static_cast<std::int64_t>(random() % 300'000'000)};
    case 6: {
      const auto held = pick();
      const auto price = random() % 4 ? 1 + static_cast<std::int64_t>(random() % held.price_micros)
                                      : static_cast<std::int64_t>(random() % 2'100);
      return domain::record_impression{held.id, price};
    }
    case 7:
      return domain::release_ad_reservation{reservation(), "not served"};
    default:
      return random() % 2 ? domain::campaign::command{domain::expire_ad_reservations{}}
                          : domain::campaign::command{domain::click_ad{reservation()}};
  }
}

TEST_F(campaign_walk_test, the_actor_answers_and_holds_what_the_pure_fold_does) {
  const auto seed = testing::seed_from_environment();
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::mt19937_64 random(seed);
  auto registry = spawn_registry();
  domain::campaign::state model;
  int passivations = 0;
  std::vector<held_reservation> reserved;  ///< accepted reservations, oldest first
  std::map<std::size_t, int> appended_by_type;  ///< event type -> count, to see the walk went far
  for (int step = 0; step < 400; ++step) {
    if (random() % 25 == 0) {
      // Idle long enough to be passivated: the next command recovers from snapshot + tail.
      sched_.clock().advance_time(std::chrono::seconds(70));
      run();
      ++passivations;
    }
    *clock_.now_us += static_cast<std::int64_t>(random() % 40'000'000);
    const auto command = random_command(random, step, *clock_.now_us, reserved);
    const auto expected = domain::campaign::decide(model, command, *clock_.now_us);
    auto reply = ask<command_reply>(registry, std::string("c1"), command);
    ASSERT_EQ(reply.has_value(), expected.has_value())
        << "step " << step << ": " << (reply ? "" : describe(reply.error()))
        << (expected ? "" : expected.error().message);
    if (expected) {
      EXPECT_EQ(reply.value().events, expected.value()) << "step " << step;
      for (const auto& event : expected.value()) {
        ++appended_by_type[event.index()];
        if (const auto* r = std::get_if<events::ad_reserved>(&event)) reserved.push_back({r->reservation_id, r->price_micros});
        model = domain::campaign::evolve(std::move(model), event);
      }
    } else {
      EXPECT_EQ(domain_error_of(reply.error())->code, expected.error().code) << "step " << step;
    }
    auto state = ask<domain::campaign::state>(registry, std::string("c1"), state_atom::value);
    ASSERT_TRUE(state);
    ASSERT_EQ(state.value(), model) << "step " << step;
    const auto broken = domain::check(state.value());
    ASSERT_TRUE(broken.empty()) << "step " << step << ": " << broken.front();
  }
  EXPECT_GT(passivations, 0);
  for (const auto& type : {events::event{events::ad_reserved{}},
                           events::event{events::impression_recorded{}},
                           events::event{events::ad_reservation_released{}}}) {
    EXPECT_GT(appended_by_type[type.index()], 0)
        << events::type_name(events::type_of(type)) << " never happened: the walk is too shallow";
  }
}

}  // namespace
}  // namespace gpustream::actors
