// Tests the user aggregate: creation, API keys, tiers, idempotent deposits and the free daily quota.

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "domain/user.hpp"

namespace gpustream::domain {
namespace {

constexpr std::int64_t day_us = 86'400'000'000;
constexpr std::int64_t t0 = 1'700'000'000'000'000;  // an instant in 2023, mid-day UTC

events::sha256_digest digest(std::uint8_t fill) {
  events::sha256_digest d{};
  d.fill(fill);
  return d;
}

/// Decides `c` against `s` and, when accepted, folds the events into `s`.
decision run(user_state& s, const user::command& c, std::int64_t now_us, const user_options& o = {}) {
  auto d = user::decide(s, c, now_us, o);
  if (d)
    for (const auto& e : *d) s = user::evolve(std::move(s), e);
  return d;
}

user_state created(events::user_tier tier = events::user_tier::free) {
  user_state s;
  EXPECT_TRUE(run(s, create_user{"u1", "Ada", tier}, t0));
  return s;
}

TEST(user, create_emits_user_created_and_repeating_it_is_idempotent) {
  user_state s;
  auto d = run(s, create_user{"u1", "Ada", events::user_tier::premium}, t0);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(std::get<events::user_created>(d->front()),
            (events::user_created{"u1", "Ada", events::user_tier::premium, t0}));
  EXPECT_TRUE(s.created);
  EXPECT_EQ(s.tier, events::user_tier::premium);
  auto again = run(s, create_user{"u1", "Ada", events::user_tier::premium}, t0 + 5);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->empty());
  auto other = user::decide(s, create_user{"u1", "Bob", events::user_tier::premium}, t0);
  ASSERT_FALSE(other);
  EXPECT_EQ(other.error().code, errc::already_exists);
}

TEST(user, create_validates_ids_and_lengths) {
  user_options o;
  o.id_length_max = 4;
  o.text_length_max = 3;
  user_state s;
  EXPECT_EQ(user::decide(s, create_user{"", "A", {}}, t0, o).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, create_user{"12345", "A", {}}, t0, o).error().code, errc::invalid_argument);
  EXPECT_TRUE(user::decide(s, create_user{"1234", "Abc", {}}, t0, o));
  auto long_name = user::decide(s, create_user{"1234", "Abcd", {}}, t0, o);
  ASSERT_FALSE(long_name);
  EXPECT_NE(long_name.error().message.find("at most 3"), std::string::npos) << long_name.error().message;
}

TEST(user, commands_before_creation_are_not_found) {
  user_state s;
  EXPECT_EQ(user::decide(s, change_user_tier{events::user_tier::premium}, t0).error().code, errc::not_found);
  EXPECT_EQ(user::decide(s, credit_user{"d1", 5}, t0).error().code, errc::not_found);
  EXPECT_EQ(admit_free_job(s, 10, 0, t0, {}).error().code, errc::not_found);
}

TEST(user, issues_and_revokes_keys_storing_only_the_digest) {
  auto s = created();
  auto d = run(s, issue_api_key{"k1", digest(7), "laptop"}, t0);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(std::get<events::api_key_issued>(d->front()).key_hash, digest(7));
  EXPECT_EQ(s.api_keys.at("k1").key_hash, std::vector<std::uint8_t>(32, 7));
  EXPECT_EQ(active_key_id(s, digest(7)), "k1");
  EXPECT_TRUE(run(s, issue_api_key{"k1", digest(7), "laptop"}, t0 + 1)->empty()) << "same key again: no events";

  auto revoked = run(s, revoke_api_key{"k1", "leaked"}, t0 + 2);
  ASSERT_TRUE(revoked);
  EXPECT_EQ(revoked->size(), 1u);
  EXPECT_TRUE(s.api_keys.at("k1").revoked);
  EXPECT_EQ(active_key_id(s, digest(7)), "");
  EXPECT_TRUE(run(s, revoke_api_key{"k1", "leaked"}, t0 + 3)->empty()) << "revoking twice: no events";
  EXPECT_EQ(user::decide(s, issue_api_key{"k1", digest(7), "laptop"}, t0).error().code, errc::invalid_state);
  EXPECT_EQ(user::decide(s, revoke_api_key{"nope", ""}, t0).error().code, errc::not_found);
}

TEST(user, refuses_reused_key_ids_digests_and_zero_digests) {
  auto s = created();
  ASSERT_TRUE(run(s, issue_api_key{"k1", digest(1), "a"}, t0));
  EXPECT_EQ(user::decide(s, issue_api_key{"k1", digest(2), "a"}, t0).error().code, errc::already_exists);
  EXPECT_EQ(user::decide(s, issue_api_key{"k2", digest(1), "b"}, t0).error().code, errc::already_exists);
  EXPECT_EQ(user::decide(s, issue_api_key{"k3", digest(0), "c"}, t0).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, issue_api_key{"", digest(3), "c"}, t0).error().code, errc::invalid_argument);
}

TEST(user, active_key_limit_counts_only_unrevoked_keys) {
  user_options o;
  o.active_api_keys_max = 2;
  auto s = created();
  ASSERT_TRUE(run(s, issue_api_key{"k1", digest(1), ""}, t0, o));
  ASSERT_TRUE(run(s, issue_api_key{"k2", digest(2), ""}, t0, o));
  auto third = user::decide(s, issue_api_key{"k3", digest(3), ""}, t0, o);
  ASSERT_FALSE(third);
  EXPECT_EQ(third.error().code, errc::limit_exceeded);
  EXPECT_NE(third.error().message.find("2 active keys"), std::string::npos) << third.error().message;
  ASSERT_TRUE(run(s, revoke_api_key{"k1", ""}, t0, o));
  EXPECT_TRUE(run(s, issue_api_key{"k3", digest(3), ""}, t0, o));
}

TEST(user, replacing_keys_revokes_every_active_one_and_issues_the_new_one_in_one_decision) {
  user_options o;
  o.active_api_keys_max = 2;
  auto s = created();
  ASSERT_TRUE(run(s, issue_api_key{"k1", digest(1), ""}, t0, o));
  ASSERT_TRUE(run(s, issue_api_key{"k2", digest(2), ""}, t0, o));
  ASSERT_TRUE(run(s, revoke_api_key{"k2", "lost"}, t0, o));
  ASSERT_TRUE(run(s, issue_api_key{"k3", digest(3), ""}, t0, o));  // two active: the limit
  auto d = run(s, replace_api_keys{"k4", digest(4), "issued by the admin API", "leaked"}, t0 + 1, o);
  ASSERT_TRUE(d) << d.error().message << " (the limit counts the keys it revokes)";
  ASSERT_EQ(d->size(), 3u);
  EXPECT_EQ(std::get<events::api_key_revoked>((*d)[0]), (events::api_key_revoked{"u1", "k1", "leaked", t0 + 1}));
  EXPECT_EQ(std::get<events::api_key_revoked>((*d)[1]).key_id, "k3");
  EXPECT_EQ(std::get<events::api_key_issued>((*d)[2]).key_id, "k4");
  EXPECT_EQ(s.api_keys.at("k2").revoke_reason, "lost") << "a key revoked before keeps its reason";
  EXPECT_EQ(active_key_id(s, digest(1)), "");
  EXPECT_EQ(active_key_id(s, digest(4)), "k4");
  EXPECT_TRUE(run(s, replace_api_keys{"k4", digest(4), "issued by the admin API", "leaked"}, t0 + 2, o)->empty())
      << "the same replacement again: no events";
  // A key issued since is revoked by a repeated replacement, which keeps its own key.
  ASSERT_TRUE(run(s, issue_api_key{"k5", digest(5), ""}, t0 + 3, o));
  auto again = run(s, replace_api_keys{"k4", digest(4), "issued by the admin API", "leaked"}, t0 + 4, o);
  ASSERT_TRUE(again);
  ASSERT_EQ(again->size(), 1u);
  EXPECT_EQ(std::get<events::api_key_revoked>(again->front()).key_id, "k5");
  // Limited to its own label: the others' holder is refused, and nothing is revoked.
  auto own = run(s, replace_api_keys{"k6", digest(6), "issued with the user", "retried", true}, t0 + 5, o);
  ASSERT_FALSE(own);
  EXPECT_EQ(own.error().code, errc::invalid_state);
  EXPECT_NE(own.error().message.find("\"k4\" labelled \"issued by the admin API\""), std::string::npos) << own.error().message;
  EXPECT_EQ(active_key_id(s, digest(4)), "k4");
  ASSERT_TRUE(run(s, replace_api_keys{"k7", digest(7), "issued by the admin API", "retried", true}, t0 + 6, o));
  EXPECT_EQ(active_key_id(s, digest(4)), "") << "a key of its own label is revoked";
  EXPECT_EQ(active_key_id(s, digest(7)), "k7");
  // The new key's checks are issue_api_key's.
  EXPECT_EQ(user::decide(s, replace_api_keys{"k1", digest(9), "", ""}, t0, o).error().code, errc::invalid_state);
  EXPECT_EQ(user::decide(s, replace_api_keys{"k9", digest(1), "", ""}, t0, o).error().code, errc::already_exists);
  EXPECT_EQ(user::decide(s, replace_api_keys{"k9", digest(0), "", ""}, t0, o).error().code, errc::invalid_argument);
}

TEST(user, tier_changes_and_same_tier_is_no_event) {
  auto s = created();
  EXPECT_TRUE(run(s, change_user_tier{events::user_tier::free}, t0)->empty());
  auto d = run(s, change_user_tier{events::user_tier::premium}, t0 + 1);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::user_tier_changed>(d->front()).tier, events::user_tier::premium);
  EXPECT_EQ(s.tier, events::user_tier::premium);
}

TEST(user, deposit_id_is_the_idempotency_key) {
  auto s = created();
  auto first = run(s, credit_user{"dep-1", 5'000'000}, t0);
  ASSERT_TRUE(first);
  EXPECT_EQ(first->size(), 1u);
  auto twice = run(s, credit_user{"dep-1", 5'000'000}, t0 + 1);
  ASSERT_TRUE(twice);
  EXPECT_TRUE(twice->empty());
  auto other_amount = user::decide(s, credit_user{"dep-1", 6'000'000}, t0 + 2);
  ASSERT_FALSE(other_amount);
  EXPECT_EQ(other_amount.error().code, errc::already_exists);
  EXPECT_NE(other_amount.error().message.find("5000000"), std::string::npos);
  EXPECT_NE(other_amount.error().message.find("6000000"), std::string::npos);
}

TEST(user, deposit_amount_must_be_positive_and_within_the_limit) {
  user_options o;
  o.deposit_micros_max = 100;
  auto s = created();
  EXPECT_EQ(user::decide(s, credit_user{"d", 0}, t0, o).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, credit_user{"d", -5}, t0, o).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, credit_user{"d", 101}, t0, o).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, credit_user{"", 10}, t0, o).error().code, errc::invalid_argument);
  EXPECT_TRUE(user::decide(s, credit_user{"d", 100}, t0, o));
}

TEST(user, free_quota_admits_up_to_the_limit_and_names_the_numbers) {
  user_options o;
  o.free_tokens_per_day = 1'000;
  auto s = created();
  ASSERT_TRUE(run(s, record_free_usage{"j1", 600}, t0, o));
  EXPECT_TRUE(admit_free_job(s, 400, 0, t0 + 1, o));
  auto refused = admit_free_job(s, 401, 0, t0 + 1, o);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::quota_exceeded);
  for (const char* number : {"600", "401", "1000"})
    EXPECT_NE(refused.error().message.find(number), std::string::npos) << refused.error().message;
  EXPECT_EQ(free_tokens_left(s, t0, o), 400);
  EXPECT_EQ(admit_free_job(s, 0, 0, t0, o).error().code, errc::invalid_argument);
  // Jobs in progress hold what they may still use: 600 used + 300 held leaves room for 100.
  EXPECT_TRUE(admit_free_job(s, 100, 300, t0 + 1, o));
  auto held = admit_free_job(s, 101, 300, t0 + 1, o);
  ASSERT_FALSE(held);
  EXPECT_EQ(held.error().code, errc::quota_exceeded);
  EXPECT_NE(held.error().message.find("600 tokens used today + 300 held by jobs in progress + 101 requested"),
            std::string::npos)
      << held.error().message;
}

TEST(user, quota_resets_on_the_next_utc_day) {
  user_options o;
  o.free_tokens_per_day = 1'000;
  auto s = created();
  const std::int64_t midnight = (t0 / day_us + 1) * day_us;
  ASSERT_TRUE(run(s, record_free_usage{"j1", 1'000}, midnight - 1, o));
  EXPECT_EQ(admit_free_job(s, 1, 0, midnight - 1, o).error().code, errc::quota_exceeded);
  EXPECT_TRUE(admit_free_job(s, 1'000, 0, midnight, o));
  ASSERT_TRUE(run(s, record_free_usage{"j2", 10}, midnight, o));
  EXPECT_EQ(s.free_tokens_today, 10);
  EXPECT_EQ(free_tokens_left(s, midnight, o), 990);
}

TEST(user, usage_over_the_quota_is_still_recorded_and_blocks_further_jobs) {
  user_options o;
  o.free_tokens_per_day = 100;
  auto s = created();
  ASSERT_TRUE(run(s, record_free_usage{"j1", 150}, t0, o));
  EXPECT_EQ(s.free_tokens_today, 150);
  EXPECT_EQ(free_tokens_left(s, t0, o), 0);
  EXPECT_EQ(admit_free_job(s, 1, 0, t0, o).error().code, errc::quota_exceeded);
}

TEST(user, usage_is_recorded_once_per_job) {
  auto s = created();
  auto d = run(s, record_free_usage{"j1", 50}, t0);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::free_tokens_used>(d->front()), (events::free_tokens_used{"u1", "j1", 50, t0}));
  EXPECT_TRUE(run(s, record_free_usage{"j1", 50}, t0 + 1)->empty());
  EXPECT_EQ(user::decide(s, record_free_usage{"j1", 51}, t0 + 1).error().code, errc::already_exists);
  EXPECT_EQ(s.free_tokens_today, 50);
}

TEST(user, usage_recorded_late_counts_against_the_day_the_job_ended) {
  user_options o;
  o.free_tokens_per_day = 1'000;
  auto s = created();
  const std::int64_t midnight = (t0 / day_us + 1) * day_us;
  // A job that ended before midnight, its usage recorded after it (serve's start after a stop).
  auto d = run(s, record_free_usage{"j1", 700, midnight - 5}, midnight + 10, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::free_tokens_used>(d->front()), (events::free_tokens_used{"u1", "j1", 700, midnight - 5}));
  EXPECT_EQ(free_tokens_left(s, midnight + 10, o), 1'000) << "the new day starts from zero";
  EXPECT_TRUE(run(s, record_free_usage{"j1", 700, midnight - 5}, midnight + 20, o)->empty()) << "once per job";
  // One from today counts today.
  ASSERT_TRUE(run(s, record_free_usage{"j2", 100, midnight + 1}, midnight + 30, o));
  EXPECT_EQ(free_tokens_left(s, midnight + 30, o), 900);
}

TEST(user, usage_cannot_be_recorded_in_the_future) {
  auto s = created();
  const auto refused = user::decide(s, record_free_usage{"j1", 10, t0 + 1}, t0);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::invalid_argument);
  EXPECT_NE(refused.error().message.find("outside 0 .. now"), std::string::npos) << refused.error().message;
  EXPECT_EQ(user::decide(s, record_free_usage{"j1", 10, -1}, t0).error().code, errc::invalid_argument);
}

TEST(user, usage_per_job_is_limited) {
  user_options o;
  o.job_tokens_max = 10;
  auto s = created();
  EXPECT_EQ(user::decide(s, record_free_usage{"j", 0}, t0, o).error().code, errc::invalid_argument);
  EXPECT_EQ(user::decide(s, record_free_usage{"j", 11}, t0, o).error().code, errc::invalid_argument);
  EXPECT_TRUE(user::decide(s, record_free_usage{"j", 10}, t0, o));
}

TEST(user, usage_memory_keeps_today_and_yesterday_only) {
  auto s = created();
  ASSERT_TRUE(run(s, record_free_usage{"d0", 1}, t0));
  ASSERT_TRUE(run(s, record_free_usage{"d1", 1}, t0 + day_us));
  EXPECT_EQ(s.recent_usage.size(), 2u);
  ASSERT_TRUE(run(s, record_free_usage{"d2", 1}, t0 + 2 * day_us));
  EXPECT_EQ(s.recent_usage.size(), 2u);
  EXPECT_FALSE(s.recent_usage.contains("d0"));
}

TEST(user, premium_users_have_no_quota) {
  user_options o;
  o.free_tokens_per_day = 10;
  auto s = created(events::user_tier::premium);
  EXPECT_TRUE(admit_free_job(s, 1'000'000, 0, t0, o));
}

TEST(user, evolve_ignores_events_of_other_users_and_aggregates) {
  auto s = created();
  const auto before = s;
  s = user::evolve(s, events::user_credited{"u2", "d", 5, t0});
  s = user::evolve(s, events::api_key_issued{"u2", "k", digest(1), "", t0});
  s = user::evolve(s, events::job_queued{"j", 1, t0, t0});
  s = user::evolve(s, events::user_created{"u3", "Eve", events::user_tier::premium, t0});
  EXPECT_EQ(s, before);
}

/// Counts the fields an inspector is shown, to prove inspect compiles and lists every field.
struct field_counter {
  std::size_t fields = 0;
  template <class... Ts>
  bool operator()(Ts&...) {
    fields += sizeof...(Ts);
    return true;
  }
};

TEST(user, inspect_lists_every_field) {
  user_state s;
  field_counter f;
  EXPECT_TRUE(inspect(f, s));
  EXPECT_EQ(f.fields, 10u);
  api_key_state k;
  field_counter g;
  EXPECT_TRUE(inspect(g, k));
  EXPECT_EQ(g.fields, 6u);
}

}  // namespace
}  // namespace gpustream::domain
