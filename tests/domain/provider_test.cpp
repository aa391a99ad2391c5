// The provider aggregate: registration, connections, offers, scoring, achievements and suspension.
#include "domain/provider.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <limits>

namespace gpustream::domain {
namespace {

using events::achievement_kind;
using events::provider_level;

constexpr std::int64_t t0 = 1'700'000'000'000'000;
constexpr std::int64_t second_us = 1'000'000;
constexpr std::int64_t hour_us = 3'600 * second_us;

/// A provider and the events it has decided so far.
struct harness {
  provider::state state;
  std::vector<events::event> log;

  decision run(const provider::command& command, std::int64_t now_us,
               const provider_options& options = {}) {
    auto result = provider::decide(state, command, now_us, options);
    if (result) {
      for (const auto& e : *result) {
        state = provider::evolve(std::move(state), e);
        log.push_back(e);
      }
    }
    return result;
  }

  void ok(const provider::command& command, std::int64_t now_us,
          const provider_options& options = {}) {
    const auto result = run(command, now_us, options);
    ASSERT_TRUE(result.has_value()) << result.error().message;
  }
};

events::sha256_digest digest(std::uint8_t fill) {
  events::sha256_digest d{};
  d.fill(fill);
  return d;
}

events::model_offer offer(std::string name, std::uint32_t concurrency = 4) {
  return {std::move(name), 8'192, "Q4_K_M", 100'000, 300'000, concurrency};
}

harness online_provider() {
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  h.ok(provider::connect{{{"RTX 4090", 24ull << 30, 8, 9}}, events::backend_kind::openai,
                         "http://127.0.0.1:1234/v1", "0.1.0"},
       t0);
  h.ok(provider::advertise{{offer("llama-3.1-8b")}}, t0);
  return h;
}

/// A clean job: 600 prompt tokens, 200 completion tokens at 100 tok/s.
provider::record_job_outcome good_job(std::string id) {
  return {std::move(id), job_fault::none, {600, 200, 200, 300'000, 2'300'000, 200, 800}};
}

template <class E>
std::vector<E> of_type(const std::vector<events::event>& events) {
  std::vector<E> found;
  for (const auto& e : events) {
    if (const auto* x = std::get_if<E>(&e)) found.push_back(*x);
  }
  return found;
}

TEST(provider, create_records_the_token_hash_and_starts_at_bronze) {
  harness h;
  const auto result = h.run(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  ASSERT_TRUE(result.has_value());
  ASSERT_EQ(result->size(), 1u);
  const auto& created = std::get<events::provider_created>(result->front());
  EXPECT_EQ(created.token_hash, digest(7));
  EXPECT_EQ(created.created_at_us, t0);
  EXPECT_TRUE(h.state.exists);
  EXPECT_EQ(h.state.level, provider_level::bronze);
  EXPECT_EQ(h.state.token_hash.size(), 32u);
}

TEST(provider, create_is_idempotent_and_refuses_a_different_registration) {
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  const auto again = h.run(provider::create{"p1", "u1", "rig", digest(7)}, t0 + 1);
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->empty());
  const auto other = h.run(provider::create{"p1", "u1", "rig", digest(8)}, t0 + 1);
  ASSERT_FALSE(other.has_value());
  EXPECT_EQ(other.error().code, errc::already_exists);
  const auto nameless = harness{}.run(provider::create{"", "u1", "rig", digest(7)}, t0);
  ASSERT_FALSE(nameless.has_value());
  EXPECT_EQ(nameless.error().code, errc::invalid_argument);
}

TEST(provider, a_replaced_token_is_recorded_once_and_keeps_everything_else) {
  auto h = online_provider();
  const auto before = h.state;
  h.ok(provider::replace_token{digest(9)}, t0 + second_us);
  ASSERT_EQ(h.log.size(), 4u);
  EXPECT_EQ(std::get<events::provider_token_replaced>(h.log.back()),
            (events::provider_token_replaced{"p1", digest(9), t0 + second_us}));
  EXPECT_EQ(h.state.token_hash, std::vector<std::uint8_t>(32, 9));
  auto expected = before;
  expected.token_hash = h.state.token_hash;
  EXPECT_EQ(h.state, expected) << "online, offers and score stay";
  const auto again = h.run(provider::replace_token{digest(9)}, t0 + 2 * second_us);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->empty()) << "the same token again changes nothing";
  harness none;
  const auto missing = none.run(provider::replace_token{digest(9)}, t0);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, errc::not_found);
}

TEST(provider, commands_before_create_are_not_found) {
  harness h;
  const auto result = h.run(provider::connect{}, t0);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, errc::not_found);
}

TEST(provider, a_second_connect_replaces_the_first_link) {
  auto h = online_provider();
  h.log.clear();
  h.ok(provider::connect{}, t0 + 10 * second_us);
  ASSERT_EQ(h.log.size(), 2u);
  const auto& gone = std::get<events::provider_disconnected>(h.log[0]);
  EXPECT_EQ(gone.reason, events::disconnect_reason::replaced);
  EXPECT_TRUE(std::holds_alternative<events::provider_connected>(h.log[1]));
  EXPECT_TRUE(h.state.online);
  EXPECT_EQ(h.state.connected_at_us, t0 + 10 * second_us);
  EXPECT_EQ(h.state.online_us_total, 10 * second_us);
  EXPECT_TRUE(h.state.offers.empty()) << "a new link advertises its models again";
}

TEST(provider, advertising_needs_a_connection_and_valid_offers) {
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  const auto offline = h.run(provider::advertise{{offer("m")}}, t0);
  ASSERT_FALSE(offline.has_value());
  EXPECT_EQ(offline.error().code, errc::invalid_state);

  h.ok(provider::connect{}, t0);
  const auto twice = h.run(provider::advertise{{offer("m"), offer("m")}}, t0);
  ASSERT_FALSE(twice.has_value());
  EXPECT_EQ(twice.error().code, errc::invalid_argument);
  const auto idle = h.run(provider::advertise{{offer("m", 0)}}, t0);
  ASSERT_FALSE(idle.has_value());
  EXPECT_EQ(idle.error().code, errc::invalid_argument);
  auto negative = offer("m");
  negative.output_price_micros_per_mtok = -1;
  EXPECT_EQ(h.run(provider::advertise{{negative}}, t0).error().code, errc::invalid_argument);

  h.ok(provider::advertise{{offer("m")}}, t0);
  EXPECT_EQ(h.state.offers.size(), 1u);
  const auto same = h.run(provider::advertise{{offer("m")}}, t0 + 1);
  ASSERT_TRUE(same.has_value());
  EXPECT_TRUE(same->empty()) << "the same offers again change nothing";
}

TEST(provider, models_advertised_max_is_a_limit) {
  const provider_options options;
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  h.ok(provider::connect{}, t0);
  std::vector<events::model_offer> models;
  for (std::uint32_t i = 0; i < options.models_advertised_max; ++i) {
    models.push_back(offer("m" + std::to_string(i)));
  }
  h.ok(provider::advertise{models}, t0);
  models.push_back(offer("one-too-many"));
  const auto result = h.run(provider::advertise{models}, t0);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, errc::limit_exceeded);
  EXPECT_NE(result.error().message.find("65"), std::string::npos) << result.error().message;
}

TEST(provider, offer_concurrency_max_is_a_limit) {
  const provider_options options;
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  h.ok(provider::connect{}, t0);
  h.ok(provider::advertise{{offer("m", options.offer_concurrency_max)}}, t0);
  const auto result = h.run(provider::advertise{{offer("m", options.offer_concurrency_max + 1)}}, t0);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, errc::limit_exceeded);
}

TEST(provider, context_length_tokens_max_is_a_limit) {
  // The gateway checks prompts against the largest window online for a model: one absurd claim
  // would let every oversized prompt through to the providers.
  const provider_options options;
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  h.ok(provider::connect{}, t0);
  auto windowed = [](std::uint32_t tokens) {
    auto o = offer("m");
    o.context_length_tokens = tokens;
    return o;
  };
  h.ok(provider::advertise{{windowed(options.context_length_tokens_max)}}, t0);
  const auto result = h.run(provider::advertise{{windowed(options.context_length_tokens_max + 1)}}, t0);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, errc::limit_exceeded);
  EXPECT_NE(result.error().message.find("16777217 tokens"), std::string::npos) << result.error().message;
}

TEST(provider, price_micros_per_mtok_max_is_a_limit) {
  const provider_options options;
  const std::int64_t max = options.price_micros_per_mtok_max;
  harness h;
  h.ok(provider::create{"p1", "u1", "rig", digest(7)}, t0);
  h.ok(provider::connect{}, t0);
  auto priced = [](std::int64_t in, std::int64_t out) {
    auto o = offer("m", 4);
    o.input_price_micros_per_mtok = in;
    o.output_price_micros_per_mtok = out;
    return o;
  };
  h.ok(provider::advertise{{priced(max, max)}}, t0);
  for (const auto& over : {priced(max + 1, 0), priced(0, max + 1),
                           priced(std::numeric_limits<std::int64_t>::max(), 1)}) {
    const auto result = h.run(provider::advertise{{over}}, t0);
    ASSERT_FALSE(result.has_value());
    EXPECT_EQ(result.error().code, errc::limit_exceeded);
    EXPECT_NE(result.error().message.find("at most 1000000000"), std::string::npos) << result.error().message;
  }
}

TEST(provider, disconnect_closes_the_session_once) {
  auto h = online_provider();
  h.ok(provider::disconnect{events::disconnect_reason::heartbeat_missed, "3 missed"}, t0 + 5 * second_us);
  EXPECT_FALSE(h.state.online);
  EXPECT_TRUE(h.state.offers.empty());
  EXPECT_EQ(h.state.online_us_total, 5 * second_us);
  const auto again = h.run(provider::disconnect{}, t0 + 6 * second_us);
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->empty());
}

TEST(provider, a_clean_job_is_scored_for_speed_complexity_and_success) {
  auto h = online_provider();
  h.log.clear();
  h.ok(good_job("j1"), t0 + second_us);
  const auto scored = of_type<events::provider_scored>(h.log);
  ASSERT_EQ(scored.size(), 1u);
  EXPECT_EQ(scored[0].job_id, "j1");
  EXPECT_EQ(scored[0].speed_points, 5);
  EXPECT_EQ(scored[0].complexity_points, 1);
  EXPECT_EQ(scored[0].success_points, 3);
  EXPECT_EQ(scored[0].total_score, 9);
  EXPECT_EQ(scored[0].level, provider_level::bronze);
  EXPECT_TRUE(of_type<events::suspicion_recorded>(h.log).empty());
  EXPECT_EQ(h.state.score, 9);
  EXPECT_EQ(h.state.jobs_succeeded, 1u);
}

TEST(provider, score_crossing_a_band_raises_the_level) {
  auto h = online_provider();
  for (int i = 0; i < 11; ++i) h.ok(good_job("j" + std::to_string(i)), t0 + second_us);
  EXPECT_EQ(h.state.score, 99);
  EXPECT_EQ(h.state.level, provider_level::bronze);
  h.ok(good_job("j11"), t0 + second_us);
  EXPECT_EQ(h.state.score, 108);
  EXPECT_EQ(h.state.level, provider_level::silver);
  EXPECT_EQ(of_type<events::provider_scored>(h.log).back().level, provider_level::silver);
}

TEST(provider, platform_client_request_and_declined_faults_never_count_against_the_provider) {
  auto h = online_provider();
  for (int i = 0; i < 3; ++i) h.ok(good_job("j" + std::to_string(i)), t0);
  const auto before = h.state;
  for (auto fault : {job_fault::platform, job_fault::client, job_fault::request, job_fault::declined}) {
    // Even with numbers that would otherwise be suspect.
    const auto result = h.run(provider::record_job_outcome{"x", fault, {10, 500, 9, 0, 1}}, t0);
    ASSERT_TRUE(result.has_value());
    EXPECT_TRUE(result->empty());
  }
  EXPECT_EQ(h.state, before);
}

TEST(provider, a_provider_fault_costs_points_counts_an_abort_and_breaks_the_streak) {
  auto h = online_provider();
  for (int i = 0; i < 3; ++i) h.ok(good_job("j" + std::to_string(i)), t0);
  h.log.clear();
  h.ok(provider::record_job_outcome{"bad", job_fault::provider, {}}, t0 + second_us);
  const auto scored = of_type<events::provider_scored>(h.log);
  ASSERT_EQ(scored.size(), 1u);
  EXPECT_EQ(scored[0].success_points, -5);
  EXPECT_EQ(scored[0].total_score, 27 - 5);
  const auto suspicion = of_type<events::suspicion_recorded>(h.log);
  ASSERT_EQ(suspicion.size(), 1u);
  EXPECT_EQ(suspicion[0].kind, events::suspicion_kind::aborted);
  EXPECT_EQ(suspicion[0].counters.aborted_jobs, 1u);
  EXPECT_EQ(h.state.successes_in_a_row, 0u);
  EXPECT_EQ(h.state.jobs_failed, 1u);
}

TEST(provider, aborted_jobs_max_suspends_and_a_suspended_provider_cannot_connect) {
  const provider_options options;
  auto h = online_provider();
  for (std::uint32_t i = 1; i < options.scoring.aborted_jobs_max; ++i) {
    h.ok(provider::record_job_outcome{"a" + std::to_string(i), job_fault::provider, {}}, t0);
  }
  EXPECT_TRUE(of_type<events::provider_suspended>(h.log).empty());
  const std::int64_t now = t0 + second_us;
  h.ok(provider::record_job_outcome{"last", job_fault::provider, {}}, now);
  const auto suspended = of_type<events::provider_suspended>(h.log);
  ASSERT_EQ(suspended.size(), 1u);
  EXPECT_EQ(suspended[0].counters.aborted_jobs, options.scoring.aborted_jobs_max);
  EXPECT_EQ(suspended[0].suspended_at_us, now);
  EXPECT_EQ(suspended[0].suspended_until_at_us, now + options.scoring.suspension_us);
  EXPECT_NE(suspended[0].reason.find("aborted"), std::string::npos);
  EXPECT_EQ(h.state.counters, provider::suspicion{}) << "counters restart after a suspension";
  EXPECT_TRUE(is_suspended(h.state, now));

  h.ok(provider::disconnect{}, now);
  const auto refused = h.run(provider::connect{}, now + hour_us);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::suspended);
  EXPECT_NE(refused.error().message.find("82800 s"), std::string::npos) << refused.error().message;
  h.ok(provider::connect{}, now + options.scoring.suspension_us);
  EXPECT_TRUE(h.state.online);
}

TEST(provider, jobs_of_its_own_owner_earn_no_points_nor_achievements_and_are_still_checked) {
  // An owner sending work to their own GPU must not buy their way up the levels (and with them
  // queue priority); a cheat on their own jobs is still a cheat.
  auto h = online_provider();  // owned by u1
  h.log.clear();
  auto own = good_job("own");
  own.requested_by = "u1";
  for (int i = 0; i < 12; ++i) h.ok(own, t0 + second_us);
  EXPECT_TRUE(of_type<events::provider_scored>(h.log).empty());
  EXPECT_TRUE(of_type<events::achievement_unlocked>(h.log).empty()) << "ten fast jobs, none of them counted";
  EXPECT_EQ(h.state.score, 0);
  auto made_up = own;  // 500 tokens in 0.1 s
  made_up.measure = {100, 500, 500, 10, 100'010, 500, 2'000};
  h.ok(made_up, t0 + second_us);
  EXPECT_EQ(of_type<events::suspicion_recorded>(h.log).size(), 1u);
  // Another user's job is scored as ever.
  auto theirs = good_job("theirs");
  theirs.requested_by = "u2";
  h.ok(theirs, t0 + second_us);
  EXPECT_EQ(of_type<events::provider_scored>(h.log).size(), 1u);
  EXPECT_EQ(h.state.score, 9);
}

TEST(provider, unreasonably_fast_jobs_max_suspends_and_such_jobs_earn_no_speed_points) {
  const provider_options options;
  auto h = online_provider();
  // 500 tokens in 0.1 s: 5,000 tok/s.
  const provider::record_job_outcome too_fast{"f", job_fault::none, {100, 500, 500, 10, 100'010, 500, 2'000}};
  for (std::uint32_t i = 0; i < options.scoring.unreasonably_fast_jobs_max; ++i) {
    h.ok(too_fast, t0);
  }
  for (const auto& scored : of_type<events::provider_scored>(h.log)) {
    EXPECT_EQ(scored.speed_points, 0);
  }
  EXPECT_EQ(h.state.fast_jobs, 0u);
  const auto suspicion = of_type<events::suspicion_recorded>(h.log);
  ASSERT_EQ(suspicion.size(), options.scoring.unreasonably_fast_jobs_max);
  EXPECT_EQ(suspicion.back().counters.unreasonably_fast_jobs,
            options.scoring.unreasonably_fast_jobs_max);
  EXPECT_EQ(of_type<events::provider_suspended>(h.log).size(), 1u);
}

TEST(provider, suspicions_far_apart_count_from_zero_again_and_close_ones_still_suspend) {
  // A rare burst of pieces among thousands of honest answers (a loaded node or network) must not
  // add up to a suspension over a provider's lifetime; a cheat job after job still does.
  provider_options options;
  options.scoring.suspicion_window_jobs = 50;
  auto h = online_provider();
  const provider::record_job_outcome too_fast{"f", job_fault::none, {100, 500, 500, 10, 100'010, 500, 2'000}};
  for (std::uint32_t round = 0; round < 2 * options.scoring.unreasonably_fast_jobs_max; ++round) {
    h.ok(too_fast, t0, options);
    for (int i = 0; i < 50; ++i) h.ok(good_job("g" + std::to_string(i)), t0, options);
  }
  for (const auto& suspicion : of_type<events::suspicion_recorded>(h.log)) {
    EXPECT_EQ(suspicion.counters.unreasonably_fast_jobs, 1u) << "each one far from the last";
  }
  EXPECT_TRUE(of_type<events::provider_suspended>(h.log).empty());
  // Close together (49 jobs apart): they count up and suspend.
  for (std::uint32_t i = 0; i < options.scoring.unreasonably_fast_jobs_max; ++i) {
    h.ok(too_fast, t0, options);
    for (int j = 0; j < 48; ++j) h.ok(good_job("c" + std::to_string(j)), t0, options);
  }
  EXPECT_EQ(of_type<events::provider_suspended>(h.log).size(), 1u);
  // Replaying the log gives the same state (what evolve derives from the events).
  provider::state replayed;
  for (const auto& e : h.log) replayed = provider::evolve(std::move(replayed), e);
  EXPECT_EQ(replayed.jobs_at_suspicion, h.state.jobs_at_suspicion);
}

TEST(provider, a_backend_that_reports_no_usage_or_several_tokens_per_piece_raises_no_suspicion) {
  auto h = online_provider();
  auto silent = good_job("silent");
  silent.measure.provider_reported_tokens = 0;
  auto merged = good_job("merged");
  merged.measure.provider_reported_tokens = 600;  // 200 pieces of 800 bytes
  for (int i = 0; i < 10; ++i) {
    h.ok(silent, t0);
    h.ok(merged, t0);
  }
  EXPECT_TRUE(of_type<events::suspicion_recorded>(h.log).empty());
  EXPECT_TRUE(of_type<events::provider_suspended>(h.log).empty());
}

TEST(provider, token_count_mismatches_max_suspends) {
  const provider_options options;
  auto h = online_provider();
  auto lying = good_job("lie");
  lying.measure.provider_reported_tokens = 150;  // we counted 200 pieces: split to be paid more
  for (std::uint32_t i = 1; i < options.scoring.token_count_mismatches_max; ++i) h.ok(lying, t0);
  EXPECT_TRUE(of_type<events::provider_suspended>(h.log).empty());
  EXPECT_EQ(h.state.counters.token_count_mismatches, options.scoring.token_count_mismatches_max - 1);
  h.ok(lying, t0);
  const auto suspended = of_type<events::provider_suspended>(h.log);
  ASSERT_EQ(suspended.size(), 1u);
  EXPECT_EQ(suspended[0].counters.token_count_mismatches, options.scoring.token_count_mismatches_max);
}

TEST(provider, a_job_counts_as_fast_from_fast_job_speed_points_min) {
  // Counted while replaying provider_scored: the constant decides what the log means.
  auto h = online_provider();
  const auto scored = [&](std::int32_t speed_points) {
    events::provider_scored e;
    e.provider_id = h.state.provider_id;
    e.job_id = "j" + std::to_string(speed_points);
    e.speed_points = speed_points;
    h.state = provider::evolve(std::move(h.state), e);
  };
  const auto before = h.state.fast_jobs;
  scored(fast_job_speed_points_min - 1);
  EXPECT_EQ(h.state.fast_jobs, before);
  scored(fast_job_speed_points_min);
  EXPECT_EQ(h.state.fast_jobs, before + 1);
}

TEST(provider, achievements_unlock_once_at_their_thresholds) {
  auto h = online_provider();
  const auto unlocked = [&](achievement_kind kind) { return h.state.achievements.contains(kind); };
  for (int i = 1; i <= 9; ++i) h.ok(good_job("j" + std::to_string(i)), t0);
  EXPECT_FALSE(unlocked(achievement_kind::ten_fast_jobs));
  h.ok(good_job("j10"), t0);
  EXPECT_TRUE(unlocked(achievement_kind::ten_fast_jobs));
  for (int i = 11; i <= 49; ++i) h.ok(good_job("j" + std::to_string(i)), t0);
  EXPECT_FALSE(unlocked(achievement_kind::fifty_successes_in_a_row));
  h.ok(good_job("j50"), t0);
  EXPECT_TRUE(unlocked(achievement_kind::fifty_successes_in_a_row));
  for (int i = 51; i <= 99; ++i) h.ok(good_job("j" + std::to_string(i)), t0);
  EXPECT_FALSE(unlocked(achievement_kind::hundred_jobs));
  h.ok(good_job("j100"), t0);
  EXPECT_TRUE(unlocked(achievement_kind::hundred_jobs));
  h.ok(good_job("j101"), t0);
  EXPECT_EQ(of_type<events::achievement_unlocked>(h.log).size(), 3u) << "each unlocks once";
}

TEST(provider, a_provider_fault_restarts_the_streak_of_successes) {
  auto h = online_provider();
  for (int i = 0; i < 49; ++i) h.ok(good_job("a" + std::to_string(i)), t0);
  h.ok(provider::record_job_outcome{"bad", job_fault::provider, {}}, t0);
  for (int i = 0; i < 49; ++i) h.ok(good_job("b" + std::to_string(i)), t0);
  EXPECT_FALSE(h.state.achievements.contains(achievement_kind::fifty_successes_in_a_row));
  h.ok(good_job("b49"), t0);
  EXPECT_TRUE(h.state.achievements.contains(achievement_kind::fifty_successes_in_a_row));
}

TEST(provider, an_hour_of_one_connection_unlocks_uptime) {
  auto h = online_provider();
  h.ok(provider::check_uptime{}, t0 + hour_us - 1);
  EXPECT_FALSE(h.state.achievements.contains(achievement_kind::hour_of_uptime));
  h.ok(provider::check_uptime{}, t0 + hour_us);
  EXPECT_TRUE(h.state.achievements.contains(achievement_kind::hour_of_uptime));
  h.ok(provider::check_uptime{}, t0 + 2 * hour_us);
  EXPECT_EQ(of_type<events::achievement_unlocked>(h.log).size(), 1u);
}

TEST(provider, uptime_counts_one_connection_and_is_checked_at_disconnect) {
  auto h = online_provider();
  // Two half-hour sessions are not an hour of uptime.
  h.ok(provider::disconnect{}, t0 + hour_us / 2);
  h.ok(provider::connect{}, t0 + hour_us);
  h.ok(provider::check_uptime{}, t0 + hour_us + hour_us / 2);
  EXPECT_FALSE(h.state.achievements.contains(achievement_kind::hour_of_uptime));
  EXPECT_EQ(connected_for_us(h.state, t0 + hour_us + hour_us / 2), hour_us / 2);
  // A session that lasted an hour unlocks it when it ends, before the disconnect event.
  h.log.clear();
  h.ok(provider::disconnect{}, t0 + 2 * hour_us);
  ASSERT_EQ(h.log.size(), 2u);
  EXPECT_EQ(std::get<events::achievement_unlocked>(h.log[0]).achievement,
            achievement_kind::hour_of_uptime);
  EXPECT_TRUE(std::holds_alternative<events::provider_disconnected>(h.log[1]));
}

TEST(provider, impossible_timings_are_refused) {
  auto h = online_provider();
  const auto result =
      h.run(provider::record_job_outcome{"j", job_fault::none, {1, 1, 1, 500, 100}}, t0);
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, errc::invalid_argument);
  EXPECT_NE(result.error().message.find("500"), std::string::npos);
}

TEST(provider, evolve_ignores_events_of_another_provider) {
  auto h = online_provider();
  const auto before = h.state;
  auto state = provider::evolve(h.state, events::provider_scored{"p2", "j", 5, 3, 3, 5'000,
                                                                 provider_level::diamond, t0});
  state = provider::evolve(std::move(state), events::provider_disconnected{"p2", {}, "", t0});
  state = provider::evolve(std::move(state), events::job_failed{"j", {}, "", t0});
  EXPECT_EQ(state, before);
}

TEST(provider, replaying_the_log_rebuilds_the_state) {
  auto h = online_provider();
  for (int i = 0; i < 20; ++i) h.ok(good_job("j" + std::to_string(i)), t0 + i);
  h.ok(provider::record_job_outcome{"bad", job_fault::provider, {}}, t0 + 30);
  h.ok(provider::check_uptime{}, t0 + 2 * hour_us);
  h.ok(provider::disconnect{}, t0 + 3 * hour_us);
  provider::state replayed;
  for (const auto& e : h.log) replayed = provider::evolve(std::move(replayed), e);
  EXPECT_EQ(replayed, h.state);
}

}  // namespace
}  // namespace gpustream::domain
