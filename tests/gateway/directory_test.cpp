// The directory: built from the log, kept current by its subscription, read-your-writes through
// apply_committed (idempotent, gap-filling), bounded jobs and payouts, and equal to a directory
// rebuilt from the same log.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "actors/persistence.hpp"
#include "gateway/directory.hpp"
#include "gateway/secrets.hpp"
#include "storage/event_store.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;

/// Generous: only a broken directory comes near it.
constexpr auto wait_max = 30s;

using storage::testing::temp_dir;

class directory_test : public ::testing::Test {
 protected:
  directory_test() { open_store(); }

  void open_store(std::size_t read_events_max = storage::store_options{}.read_events_max) {
    store_.reset();
    storage::store_options options;
    options.mode = storage::durability::buffered;
    options.read_events_max = read_events_max;
    auto opened = storage::event_store::open(dir_.path(), options);
    GPUSTREAM_ENSURE(opened.has_value());
    store_ = std::move(*opened);
  }

  /// Appends `batch` to `stream` (after the events appended before) and returns the stream's
  /// version after it.
  std::uint64_t append(const std::string& stream, std::vector<events::event> batch) {
    auto& version = versions_[stream];
    auto result = store_->append({actors::make_stream_append(stream, version, batch)});
    EXPECT_TRUE(result.has_value()) << (result ? "" : result.error().message);
    version += batch.size();
    return version;
  }

  std::unique_ptr<directory> open_directory(directory_options options = {}) {
    auto opened = directory::open(store_, options);
    EXPECT_TRUE(opened.has_value()) << (opened ? "" : opened.error().message);
    return opened ? std::move(*opened) : nullptr;
  }

  /// Waits until `d` has applied everything appended so far.
  void catch_up(const directory& d) {
    ASSERT_TRUE(d.wait_for_position(store_->last_position(), wait_max))
        << "the directory is at " << d.position() << ", the log at " << store_->last_position();
  }

  // Event builders (only the fields the directory reads are interesting).
  void add_user(const std::string& id, events::user_tier tier = events::user_tier::free) {
    append("user-" + id, {events::user_created{id, "name of " + id, tier, 1}});
  }
  void add_key(const std::string& user_id, const std::string& key_id, const std::string& key) {
    append("user-" + user_id, {events::api_key_issued{user_id, key_id, sha256(key), "", 2}});
  }
  void add_provider(const std::string& id, const std::string& owner, const std::string& token) {
    append("provider-" + id, {events::provider_created{id, owner, "gpu of " + owner, sha256(token), 3}});
  }
  events::provider_scored scored(const std::string& id, std::int64_t total,
                                 events::provider_level level, std::int32_t success = 2) {
    return events::provider_scored{id, "job", 1, 1, success, total, level, 4};
  }
  void submit(const std::string& job_id, const std::string& user_id = "u") {
    append("job-" + job_id,
           {events::job_submitted{job_id, user_id, "llama", events::quality_tier::standard, 10, 20,
                                  0, false, "", 5},
            events::job_queued{job_id, 0, 1'000'000, 5}});
  }
  void finish(const std::string& job_id, bool failed) {
    if (failed) {
      append("job-" + job_id,
             {events::job_failed{job_id, events::failure_reason::no_provider, "none", 9}});
    } else {
      append("job-" + job_id, {events::job_cancelled{job_id, events::cancelled_by::client, 3, 9}});
    }
  }
  void transfer(const std::string& id, const std::string& debit, const std::string& credit,
                std::int64_t amount, events::transfer_kind kind, const std::string& group) {
    append("ledger", {events::transfer_recorded{id, debit, credit, amount, kind, "", group, 7}});
  }

  temp_dir dir_;
  std::shared_ptr<storage::event_store> store_;
  std::map<std::string, std::uint64_t> versions_;
};

std::vector<std::string> ids_of(const std::vector<job_entry>& jobs) {
  std::vector<std::string> out;
  for (const auto& j : jobs) out.push_back(j.job_id);
  return out;
}

TEST_F(directory_test, a_log_with_a_gap_is_refused_at_open_instead_of_read_without_what_it_lost) {
  add_user("u1");
  add_key("u1", "k1", "gsk_one");
  add_user("u2");
  store_.reset();
  storage::testing::delete_first_entry(dir_.path(), "global");  // position 1: u1's creation
  open_store();
  auto opened = directory::open(store_);
  ASSERT_FALSE(opened);
  EXPECT_EQ(opened.error().code, storage::errc::corruption);
  EXPECT_NE(opened.error().message.find("gap after position 0"), std::string::npos) << opened.error().message;
}

TEST_F(directory_test, builds_users_and_keys_from_the_log_and_follows_later_events) {
  add_user("a");
  add_key("a", "k1", "gsk_first");
  add_key("a", "k2", "gsk_second");
  add_user("b", events::user_tier::premium);
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->position(), store_->last_position());

  EXPECT_EQ(d->user_by_api_key("gsk_first"), (user_entry{"a", events::user_tier::free}));
  EXPECT_EQ(d->user_by_api_key("gsk_second"), (user_entry{"a", events::user_tier::free}));
  EXPECT_FALSE(d->user_by_api_key("gsk_third").has_value());
  EXPECT_FALSE(d->user_by_api_key("").has_value());
  EXPECT_EQ(d->user("b"), (user_entry{"b", events::user_tier::premium}));
  EXPECT_FALSE(d->user("c").has_value());

  // Later events arrive through the subscription.
  append("user-a", {events::api_key_revoked{"a", "k1", "leaked", 5},
                    events::user_tier_changed{"a", events::user_tier::premium, 6}});
  catch_up(*d);
  EXPECT_FALSE(d->user_by_api_key("gsk_first").has_value()) << "a revoked key must fail";
  EXPECT_EQ(d->user_by_api_key("gsk_second"), (user_entry{"a", events::user_tier::premium}));
  const auto counts = d->counts();
  EXPECT_EQ(counts.users, 2u);
  EXPECT_EQ(counts.active_api_keys, 1u);
}

TEST_F(directory_test, follows_providers_their_score_and_their_money) {
  add_user("owner");
  add_provider("p1", "owner", "gsp_one");
  add_provider("p2", "owner", "gsp_two");
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->contribution_score("owner"), 0);
  EXPECT_EQ(d->contribution_score("nobody"), 0);

  const events::model_offer model{"llama", 8192, "Q4_K_M", 100, 200, 4};
  append("provider-p1",
         {events::provider_connected{"p1", {}, events::backend_kind::openai, "http://x/v1", "1", 10},
          events::models_advertised{"p1", {model}, 11}, scored("p1", 120, events::provider_level::silver),
          scored("p1", 115, events::provider_level::silver, -5),
          events::achievement_unlocked{"p1", events::achievement_kind::hour_of_uptime, 12}});
  append("provider-p2", {scored("p2", 40, events::provider_level::bronze)});
  transfer("job-j/usage", "user-owner", "provider-p1", 1000, events::transfer_kind::usage, "job-j");
  transfer("job-j/fee", "provider-p1", "platform", 100, events::transfer_kind::platform_fee, "job-j");
  transfer("payout-x/request", "provider-p1", "payouts_in_flight", 500,
           events::transfer_kind::payout, "payout-x/request");
  transfer("payout-x/fail", "payouts_in_flight", "provider-p1", 200, events::transfer_kind::payout,
           "payout-x/fail");
  catch_up(*d);

  const auto p1 = d->provider_by_token("gsp_one");
  ASSERT_TRUE(p1.has_value());
  EXPECT_EQ(p1->provider_id, "p1");
  EXPECT_EQ(p1->owner_user_id, "owner");
  EXPECT_TRUE(p1->online);
  EXPECT_EQ(p1->score, 115);
  EXPECT_EQ(p1->level, events::provider_level::silver);
  EXPECT_EQ(p1->jobs_succeeded, 1u);
  EXPECT_EQ(p1->jobs_failed, 1u);
  EXPECT_EQ(p1->achievements, std::vector{events::achievement_kind::hour_of_uptime});
  EXPECT_EQ(p1->models, std::vector{model});
  EXPECT_EQ(p1->balance_micros, 1000 - 100 - 500 + 200);
  EXPECT_EQ(p1->earned_micros, 900);
  EXPECT_EQ(p1->paid_out_micros, 300);
  EXPECT_FALSE(d->provider_by_token("gsp_three").has_value());
  EXPECT_EQ(d->contribution_score("owner"), 115) << "the best of the owner's providers";
  EXPECT_EQ(d->counts().providers_online, 1u);

  append("provider-p1", {events::provider_disconnected{"p1", events::disconnect_reason::going_offline,
                                                       "", 20}});
  catch_up(*d);
  EXPECT_FALSE(d->provider("p1")->online);
  EXPECT_TRUE(d->provider("p1")->models.empty());
  EXPECT_EQ(d->providers(10).size(), 2u);
  EXPECT_EQ(d->providers(1).size(), 1u);
}

TEST_F(directory_test, lists_jobs_newest_first_by_state_with_their_money) {
  for (const auto* id : {"j1", "j2", "j3", "j4"}) submit(id);
  append("job-j2", {events::job_assigned{"j2", "p", 1, 6}, events::job_started{"j2", "p", 7},
                    events::job_completed{"j2", "p", 10, 15, 15, 1, 2, 8}});
  finish("j3", true);
  transfer("job-j2/usage", "user-u", "provider-p", 300, events::transfer_kind::usage, "job-j2");
  transfer("job-j2/fee", "provider-p", "platform", 30, events::transfer_kind::platform_fee, "job-j2");
  auto d = open_directory();
  ASSERT_NE(d, nullptr);

  EXPECT_EQ(ids_of(d->jobs(std::nullopt, 10)), (std::vector<std::string>{"j4", "j3", "j2", "j1"}));
  EXPECT_EQ(ids_of(d->jobs(std::nullopt, 2)), (std::vector<std::string>{"j4", "j3"}));
  EXPECT_EQ(ids_of(d->jobs(domain::job_status::queued, 10)), (std::vector<std::string>{"j4", "j1"}));
  EXPECT_EQ(ids_of(d->jobs(domain::job_status::failed, 10)), (std::vector<std::string>{"j3"}));
  EXPECT_TRUE(d->jobs(domain::job_status::streaming, 10).empty());

  const auto j2 = d->job("j2");
  ASSERT_TRUE(j2.has_value());
  EXPECT_EQ(j2->status, domain::job_status::completed);
  EXPECT_EQ(j2->provider_id, "p");
  EXPECT_EQ(j2->completion_tokens, 15u);
  EXPECT_EQ(j2->gross_micros, 300);
  EXPECT_EQ(j2->platform_fee_micros, 30);
  EXPECT_EQ(j2->finished_at_us, 8);
  EXPECT_EQ(d->job("j3")->failure, events::failure_reason::no_provider);
}

TEST_F(directory_test, forgets_the_job_that_finished_longest_ago_first_then_the_oldest) {
  auto d = open_directory({.jobs_max = 4});
  ASSERT_NE(d, nullptr);
  for (const auto* id : {"j1", "j2", "j3", "j4"}) submit(id);
  // j3 finishes before j2, although j2 is older: finishing order decides.
  finish("j3", true);
  finish("j2", false);
  submit("j5");
  catch_up(*d);
  EXPECT_FALSE(d->job("j3").has_value());
  EXPECT_TRUE(d->job("j2").has_value());
  EXPECT_EQ(d->counts().jobs, 4u);

  submit("j6");
  catch_up(*d);
  EXPECT_FALSE(d->job("j2").has_value());
  // No finished job is left: the oldest job goes.
  submit("j7");
  catch_up(*d);
  EXPECT_FALSE(d->job("j1").has_value());
  EXPECT_EQ(ids_of(d->jobs(std::nullopt, 10)), (std::vector<std::string>{"j7", "j6", "j5", "j4"}));
  EXPECT_EQ(d->counts().jobs_forgotten, 3u);
  EXPECT_EQ(d->counts().jobs, 4u);

  // Events of a forgotten job change nothing.
  finish("j1", true);
  catch_up(*d);
  EXPECT_FALSE(d->job("j1").has_value());
  EXPECT_EQ(d->counts().jobs, 4u);
}

TEST_F(directory_test, keeps_each_jobs_bill_until_its_ledger_group_appears_also_for_a_forgotten_job) {
  auto bill = [](const std::string& job_id, std::int64_t amount) {
    return events::ledger_bill{"job-" + job_id,
                               {{"job-" + job_id + "/free_tier_subsidy", "subsidy", "provider-p1", amount,
                                 events::transfer_kind::free_tier_subsidy, job_id}}};
  };
  auto cancel_with = [&](const std::string& job_id, events::ledger_bill b) {
    append("job-" + job_id, {events::job_cancelled{job_id, events::cancelled_by::client, 3, 9, std::move(b)}});
  };
  // Before the directory opens: j1 settled, j2 not (a stop between the two appends), j3 owes nothing.
  submit("j1");
  cancel_with("j1", bill("j1", 100));
  transfer("job-j1/free_tier_subsidy", "subsidy", "provider-p1", 100, events::transfer_kind::free_tier_subsidy, "job-j1");
  submit("j2");
  cancel_with("j2", bill("j2", 200));
  submit("j3");
  finish("j3", false);
  auto d = open_directory({.jobs_max = 1});
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->unsettled_bills(10), (std::vector<unsettled_bill>{{"j2", bill("j2", 200)}}));
  EXPECT_EQ(d->counts().unsettled_bills, 1u);
  EXPECT_FALSE(d->job("j2").has_value()) << "forgotten (jobs_max 1), its bill kept";

  // While following: a new bill, then the groups of both.
  submit("j4");
  cancel_with("j4", bill("j4", 400));
  catch_up(*d);
  EXPECT_EQ(d->unsettled_bills(10).size(), 2u);
  EXPECT_EQ(d->unsettled_bills(1).size(), 1u) << "at most max";
  transfer("job-j2/free_tier_subsidy", "subsidy", "provider-p1", 200, events::transfer_kind::free_tier_subsidy, "job-j2");
  transfer("job-j4/free_tier_subsidy", "subsidy", "provider-p1", 400, events::transfer_kind::free_tier_subsidy, "job-j4");
  catch_up(*d);
  EXPECT_TRUE(d->unsettled_bills(10).empty());
  EXPECT_EQ(d->counts().unsettled_bills, 0u);
}

TEST_F(directory_test, keeps_each_free_ends_tokens_until_its_usage_appears_on_the_users_stream) {
  add_user("u");
  auto cancel_counting = [&](const std::string& job_id, std::uint32_t free_tokens) {
    append("job-" + job_id, {events::job_cancelled{job_id, events::cancelled_by::client, 3, 9, {}, free_tokens}});
  };
  auto used = [&](const std::string& job_id, std::uint32_t tokens) {
    append("user-u", {events::free_tokens_used{"u", job_id, tokens, 10}});
  };
  // Before the directory opens: j1's usage recorded, j2's not (a stop between the two appends),
  // j3 counts nothing (premium, or an end that settled nothing).
  submit("j1");
  cancel_counting("j1", 13);
  used("j1", 13);
  submit("j2");
  cancel_counting("j2", 13);
  submit("j3");
  finish("j3", false);
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->unrecorded_free_usage(10), (std::vector<unrecorded_usage>{{"j2", "u", 13, 9}}));
  EXPECT_EQ(d->counts().unrecorded_free_usage, 1u);

  // While following: another end, then both usages.
  submit("j4");
  cancel_counting("j4", 13);
  catch_up(*d);
  EXPECT_EQ(d->unrecorded_free_usage(10).size(), 2u);
  EXPECT_EQ(d->unrecorded_free_usage(1).size(), 1u) << "at most max";
  used("j2", 13);
  used("j4", 13);
  catch_up(*d);
  EXPECT_TRUE(d->unrecorded_free_usage(10).empty());
  EXPECT_EQ(d->counts().unrecorded_free_usage, 0u);
  EXPECT_TRUE(d->contents().unrecorded_free_usage.empty());
}

TEST_F(directory_test, a_usage_applied_before_its_jobs_end_leaves_nothing_unrecorded) {
  // An admin write's gap fill of a user's stream can bring the user's usage before the
  // subscription reaches the job's end (the log holds the end first).
  auto d = open_directory({.usage_ahead_max = 2});
  ASSERT_NE(d, nullptr);
  add_user("u");
  catch_up(*d);
  const auto end_of = [](const std::string& job_id) {
    return std::vector<events::event>{
        events::job_submitted{job_id, "u", "llama", events::quality_tier::standard, 10, 20, 0, false, "", 5},
        events::job_queued{job_id, 0, 1'000'000, 5},
        events::job_cancelled{job_id, events::cancelled_by::client, 3, 9, {}, 13}};
  };
  std::uint64_t user_version = 1;
  for (const std::string job_id : {"j1", "j2", "j3"}) {
    const std::vector<events::event> used{events::free_tokens_used{"u", job_id, 13, 10}};
    d->apply_committed("user-u", ++user_version, used);
  }
  // j1's early usage is forgotten (at most 2 are kept): its end counts as unrecorded.
  for (const std::string job_id : {"j1", "j2", "j3"}) d->apply_committed("job-" + job_id, 3, end_of(job_id));
  EXPECT_EQ(d->unrecorded_free_usage(10), (std::vector<unrecorded_usage>{{"j1", "u", 13, 9}}));
  // The log brings the same events afterwards, in its own order: nothing changes.
  for (const std::string job_id : {"j1", "j2", "j3"}) append("job-" + job_id, end_of(job_id));
  for (const std::string job_id : {"j1", "j2", "j3"}) {
    append("user-u", {events::free_tokens_used{"u", job_id, 13, 10}});
  }
  catch_up(*d);
  EXPECT_EQ(d->counts().unrecorded_free_usage, 1u);
}

TEST_F(directory_test, apply_committed_works_at_once_and_the_log_does_not_apply_it_twice) {
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  const std::vector<events::event> created{
      events::user_created{"a", "", events::user_tier::free, 1},
      events::api_key_issued{"a", "k1", sha256("gsk_new"), "", 1}};
  d->apply_committed("user-a", 2, created);
  EXPECT_EQ(d->user_by_api_key("gsk_new"), (user_entry{"a", events::user_tier::free}))
      << "a key works once apply_committed returns, before the log has it";

  const std::vector<events::event> provider{events::provider_created{"p", "a", "gpu", sha256("gsp_t"), 1},
                                            scored("p", 50, events::provider_level::bronze)};
  d->apply_committed("provider-p", 2, provider);
  EXPECT_EQ(d->provider_by_token("gsp_t")->jobs_succeeded, 1u);

  // The same events arrive through the log afterwards (and once more through apply_committed):
  // nothing counts twice.
  append("user-a", created);
  append("provider-p", provider);
  catch_up(*d);
  d->apply_committed("provider-p", 2, provider);
  EXPECT_EQ(d->provider("p")->jobs_succeeded, 1u);
  EXPECT_EQ(d->counts().active_api_keys, 1u);

  // A revocation handed in is applied too; older events handed in again are skipped.
  const std::vector<events::event> revoked{events::api_key_revoked{"a", "k1", "", 3}};
  d->apply_committed("user-a", 3, revoked);
  EXPECT_FALSE(d->user_by_api_key("gsk_new").has_value());
  d->apply_committed("user-a", 2, created);
  EXPECT_FALSE(d->user_by_api_key("gsk_new").has_value()) << "an old event re-applied a revoked key";
}

TEST_F(directory_test, apply_committed_reads_missing_earlier_events_from_the_log_first) {
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  // Versions 1 and 2 are in the log, and the subscription may or may not have applied them yet;
  // version 3 is handed in: once apply_committed returns, all three are applied, in order.
  for (int i = 0; i < 100; ++i) {
    const auto id = "a" + std::to_string(i);
    add_user(id);
    add_key(id, "k1", "gsk_old" + id);
    const std::vector<events::event> third{
        events::api_key_issued{id, "k2", sha256("gsk_new" + id), "", 3}};
    d->apply_committed("user-" + id, 3, third);
    ASSERT_TRUE(d->user_by_api_key("gsk_old" + id).has_value()) << i;
    ASSERT_TRUE(d->user_by_api_key("gsk_new" + id).has_value()) << i;
    append("user-" + id, third);
  }
  catch_up(*d);
  EXPECT_EQ(d->counts().active_api_keys, 200u);
  EXPECT_EQ(d->counts().users, 100u);
  std::cout << "events read to fill gaps: " << d->counts().events_filled << " of 200\n";
}

TEST_F(directory_test, apply_committed_fills_a_gap_longer_than_the_stores_read_events_max) {
  open_store(/*read_events_max=*/2);
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  // Versions 1 to 4 in the log, version 5 handed in: a gap of up to 4, read 2 at a time.
  for (int i = 0; i < 100; ++i) {
    const auto id = "a" + std::to_string(i);
    add_user(id);
    append("user-" + id, {events::api_key_issued{id, "k1", sha256("gsk_1" + id), "", 2},
                          events::api_key_issued{id, "k2", sha256("gsk_2" + id), "", 2},
                          events::api_key_issued{id, "k3", sha256("gsk_3" + id), "", 2}});
    const std::vector<events::event> fifth{events::api_key_issued{id, "k4", sha256("gsk_4" + id), "", 3}};
    d->apply_committed("user-" + id, 5, fifth);
    ASSERT_TRUE(d->user_by_api_key("gsk_3" + id).has_value()) << i;
    ASSERT_TRUE(d->user_by_api_key("gsk_4" + id).has_value()) << i;
    append("user-" + id, fifth);
  }
  catch_up(*d);
  EXPECT_EQ(d->counts().active_api_keys, 400u) << "no key was skipped";
  std::cout << "events read to fill gaps: " << d->counts().events_filled << " of 400\n";
}

TEST_F(directory_test, apply_committed_leaves_a_gap_longer_than_gap_events_max_to_the_subscription) {
  auto d = open_directory({.gap_events_max = 0});
  ASSERT_NE(d, nullptr);
  add_user("a");
  const std::vector<events::event> second{events::api_key_issued{"a", "k", sha256("gsk_a"), "", 2}};
  // Either the subscription has applied version 1 (and version 2 applies at once), or the gap is
  // left alone and nothing is applied out of order: a key never appears without its user.
  d->apply_committed("user-a", 2, second);
  EXPECT_EQ(d->user_by_api_key("gsk_a").has_value(), d->user("a").has_value());
  EXPECT_EQ(d->counts().events_filled, 0u);
  append("user-a", second);
  catch_up(*d);
  EXPECT_TRUE(d->user_by_api_key("gsk_a").has_value());
}

TEST_F(directory_test, keeps_the_newest_payouts_of_each_provider) {
  auto d = open_directory({.payouts_per_provider_max = 2});
  ASSERT_NE(d, nullptr);
  for (int i = 1; i <= 3; ++i) {
    const auto id = "x" + std::to_string(i);
    append("payout-" + id, {events::payout_requested{id, "p", 100 * i, i == 3, 10 + i}});
  }
  append("payout-x3", {events::payout_settled{"x3", "bank-42", 20}});
  append("payout-x2", {events::payout_failed{"x2", "account closed", 21}});
  append("payout-x1", {events::payout_settled{"x1", "bank-41", 22}});  // forgotten already
  catch_up(*d);
  const auto payouts = d->payouts_of("p", 10);
  ASSERT_EQ(payouts.size(), 2u);
  EXPECT_EQ(payouts[0].payout_id, "x3");
  EXPECT_EQ(payouts[0].status, domain::payout_status::settled);
  EXPECT_EQ(payouts[0].external_reference, "bank-42");
  EXPECT_TRUE(payouts[0].automatic);
  EXPECT_EQ(payouts[1].payout_id, "x2");
  EXPECT_EQ(payouts[1].status, domain::payout_status::failed);
  EXPECT_EQ(payouts[1].failure_reason, "account closed");
  EXPECT_EQ(d->payouts_of("p", 1).size(), 1u);
  EXPECT_TRUE(d->payouts_of("q", 10).empty());
}

TEST_F(directory_test, skips_events_it_cannot_decode_and_carries_on) {
  storage::stream_append garbage{"user-a", 0, {{{7, 7}, 1, "not a capnp payload"}}};
  ASSERT_TRUE(store_->append({garbage}).has_value());
  versions_["user-a"] = 1;
  add_user("b");
  auto d = open_directory();
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->counts().events_skipped, 1u);
  EXPECT_TRUE(d->user("b").has_value());
}

TEST_F(directory_test, a_rebuilt_directory_equals_the_live_one_also_after_a_restart) {
  auto live = open_directory({.jobs_max = 3});
  ASSERT_NE(live, nullptr);
  add_user("a");
  add_key("a", "k1", "gsk_a");
  const std::vector<events::event> provider{events::provider_created{"p", "a", "gpu", sha256("gsp"), 1}};
  live->apply_committed("provider-p", 1, provider);
  append("provider-p", provider);
  append("provider-p", {scored("p", 10, events::provider_level::bronze)});
  for (const auto* id : {"j1", "j2", "j3", "j4"}) submit(id);
  finish("j2", false);
  submit("j5");
  transfer("t1", "external", "user-a", 1000, events::transfer_kind::deposit, "deposit-1");
  append("payout-x", {events::payout_requested{"x", "p", 5, false, 1}});
  append("campaign-c", {events::campaign_created{"c", "acme", "Ads", "text", "https://acme", {}, {},
                                                 1000, 100000, 10000, 1, 2}});
  catch_up(*live);
  const auto contents = live->contents();
  EXPECT_EQ(contents.users.size(), 1u);
  EXPECT_EQ(contents.jobs.size(), 3u);
  EXPECT_EQ(contents.campaigns.size(), 1u);
  const auto campaign = live->campaign("c");
  ASSERT_TRUE(campaign.has_value());
  EXPECT_EQ(campaign->url, "https://acme");  // where a click leads when the ad server cannot say
  EXPECT_FALSE(live->campaign("d").has_value());

  auto rebuilt = open_directory({.jobs_max = 3});
  ASSERT_NE(rebuilt, nullptr);
  EXPECT_EQ(rebuilt->contents(), contents);

  live.reset();
  rebuilt.reset();
  store_.reset();
  open_store();
  auto restarted = open_directory({.jobs_max = 3});
  ASSERT_NE(restarted, nullptr);
  EXPECT_EQ(restarted->contents(), contents);
}

TEST_F(directory_test, destruction_stops_the_subscription_promptly) {
  auto d = open_directory({.subscription_wait_max = 50ms});
  ASSERT_NE(d, nullptr);
  const auto start = std::chrono::steady_clock::now();
  d.reset();
  // The subscription waits at most 50 ms per step: far below this bound even on a loaded machine.
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

}  // namespace
}  // namespace gpustream::gateway
