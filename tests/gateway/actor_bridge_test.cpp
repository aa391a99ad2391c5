// Tests actor_bridge::ask_all: every request made once, in order, never more than in_flight_max
// unanswered at once, and the count of those that succeeded.

#include <gtest/gtest.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <vector>

#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {
namespace {

/// Answers an int with itself, or with an error when it is odd and `fail_odd` is set.
caf::behavior echo(caf::event_based_actor*, bool fail_odd) {
  return {[fail_odd](int value) -> caf::result<int> {
    if (fail_odd && value % 2 == 1) return caf::make_error(caf::sec::unexpected_message);
    return value;
  }};
}

/// What one ask_all saw: the order requests were made in, and the most unanswered at once. Only
/// the one bridge actor that runs the requests touches it.
struct ask_log {
  std::vector<int> asked;
  std::size_t in_flight = 0;
  std::size_t in_flight_most = 0;
};

std::size_t ask_echo(actor_bridge& bridge, const caf::actor& responder, std::size_t count, std::size_t in_flight_max,
                     ask_log& log) {
  return bridge.ask_all(count, in_flight_max, [&log, responder](caf::event_based_actor* self, std::size_t i, auto done) {
    log.asked.push_back(static_cast<int>(i));
    log.in_flight_most = std::max(log.in_flight_most, ++log.in_flight);
    self->request(responder, std::chrono::seconds(10), static_cast<int>(i))
        .then(
            [&log, done](int) {
              --log.in_flight;
              done(true);
            },
            [&log, done](caf::error&) {
              --log.in_flight;
              done(false);
            });
  });
}

struct bridge_world {
  caf::actor_system_config config;
  caf::actor_system system{config};
  actor_bridge bridge{system};
};

TEST(actor_bridge_ask_all, makes_every_request_once_in_order_with_at_most_in_flight_max_unanswered) {
  bridge_world world;
  const auto responder = world.system.spawn(echo, false);
  ask_log log;
  EXPECT_EQ(ask_echo(world.bridge, responder, 1'000, 8, log), 1'000u);
  std::vector<int> in_order(1'000);
  for (int i = 0; i < 1'000; ++i) in_order[static_cast<std::size_t>(i)] = i;
  EXPECT_EQ(log.asked, in_order);
  // The first eight go out together, before any answer can arrive at the asking actor.
  EXPECT_EQ(log.in_flight_most, 8u);
  EXPECT_EQ(log.in_flight, 0u);
  caf::anon_send_exit(responder, caf::exit_reason::user_shutdown);
}

TEST(actor_bridge_ask_all, counts_the_requests_that_succeeded_and_takes_zero_requests_and_a_zero_bound) {
  bridge_world world;
  const auto responder = world.system.spawn(echo, true);
  ask_log log;
  EXPECT_EQ(ask_echo(world.bridge, responder, 11, 4, log), 6u) << "0, 2, 4, 6, 8 and 10 succeed";
  ask_log none;
  EXPECT_EQ(ask_echo(world.bridge, responder, 0, 4, none), 0u);
  EXPECT_TRUE(none.asked.empty());
  ask_log one_at_a_time;
  EXPECT_EQ(ask_echo(world.bridge, responder, 5, 0, one_at_a_time), 3u) << "a bound of 0 is taken as 1";
  EXPECT_EQ(one_at_a_time.in_flight_most, 1u);
  caf::anon_send_exit(responder, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace gpustream::gateway
