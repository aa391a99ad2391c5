// Tests the job aggregate: the lifecycle, its validation, idempotent repeats, deadlines, attempts and check().

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "domain/job.hpp"

namespace gpustream::domain {
namespace {

constexpr std::int64_t t0 = 1'700'000'000'000'000;
constexpr std::int64_t second_us = 1'000'000;

decision run(job_state& s, const job::command& c, std::int64_t now_us, const job_options& o = {}) {
  auto d = job::decide(s, c, now_us, o);
  if (d)
    for (const auto& e : *d) s = job::evolve(std::move(s), e);
  return d;
}

submit_job a_submission() {
  return submit_job{"j1", "u1", "llama", events::quality_tier::standard, 100, 200, 5'000, false, "conv"};
}

job_state submitted() {
  job_state s;
  EXPECT_TRUE(run(s, a_submission(), t0));
  return s;
}

job_state queued() {
  auto s = submitted();
  EXPECT_TRUE(run(s, queue_job{3, t0 + 60 * second_us}, t0));
  return s;
}

job_state streaming() {
  auto s = queued();
  EXPECT_TRUE(run(s, assign_job{"p1"}, t0 + second_us));
  EXPECT_TRUE(run(s, start_job{"p1"}, t0 + 2 * second_us));
  return s;
}

void expect_refused(const decision& d, errc code, const std::string& words) {
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error().code, code) << d.error().message;
  EXPECT_NE(d.error().message.find(words), std::string::npos) << d.error().message;
}

TEST(job, full_lifecycle_emits_each_event_and_completion_times) {
  auto s = streaming();
  EXPECT_EQ(s.status, job_status::streaming);
  EXPECT_EQ(s.attempt, 1u);
  auto d = run(s, complete_job{"p1", 150, 151}, t0 + 10 * second_us);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(std::get<events::job_completed>(d->front()),
            (events::job_completed{"j1", "p1", 100, 150, 151, 2 * second_us, 10 * second_us, t0 + 10 * second_us, {}, 0,
                                   100}));
  EXPECT_EQ(s.status, job_status::completed);
  EXPECT_TRUE(is_terminal(s.status));
  EXPECT_TRUE(check(s).empty());
}

TEST(job, an_end_records_the_bill_it_is_given) {
  const events::ledger_bill bill{"job-j1",
                                 {{"job-j1/usage", "user-u1", "provider-p1", 900, events::transfer_kind::usage, "j1"}}};
  auto completing = streaming();
  auto completed = run(completing, complete_job{"p1", 150, 151, bill}, t0 + 10 * second_us);
  ASSERT_TRUE(completed);
  ASSERT_EQ(completed->size(), 1u);
  EXPECT_EQ(std::get<events::job_completed>(completed->front()).bill, bill);

  auto cancelling = streaming();
  auto cancelled = run(cancelling, cancel_job{events::cancelled_by::client, 20, bill}, t0 + 10 * second_us);
  ASSERT_TRUE(cancelled);
  ASSERT_EQ(cancelled->size(), 1u);
  EXPECT_EQ(std::get<events::job_cancelled>(cancelled->front()).bill, bill);
}

TEST(job, an_end_records_its_free_tokens_which_are_its_prompt_and_completion) {
  auto completing = streaming();
  auto completed = run(completing, complete_job{"p1", 150, 151, {}, 250}, t0 + 10 * second_us);
  ASSERT_TRUE(completed);
  EXPECT_EQ(std::get<events::job_completed>(completed->front()).free_tokens, 250u);

  auto cancelling = streaming();
  auto cancelled = run(cancelling, cancel_job{events::cancelled_by::client, 20, {}, 120}, t0 + 10 * second_us);
  ASSERT_TRUE(cancelled);
  EXPECT_EQ(std::get<events::job_cancelled>(cancelled->front()).free_tokens, 120u);

  auto other = streaming();
  expect_refused(job::decide(other, complete_job{"p1", 150, 151, {}, 249}, t0 + 10 * second_us),
                 errc::invalid_argument, "used 250 free tokens (prompt and completion), not 249");
  expect_refused(job::decide(other, cancel_job{events::cancelled_by::client, 20, {}, 250}, t0 + 10 * second_us),
                 errc::invalid_argument, "used 120 free tokens");
}

TEST(job, a_completion_bills_the_backends_count_of_the_prompt_when_below_the_estimate) {
  // The submission estimated 100 prompt tokens; the backend counted 80.
  auto completing = streaming();
  auto completed = run(completing, complete_job{"p1", 150, 151, {}, 230, 80}, t0 + 10 * second_us);
  ASSERT_TRUE(completed);
  const auto& end = std::get<events::job_completed>(completed->front());
  EXPECT_EQ(end.prompt_tokens, 100u) << "the estimate stays as submitted";
  EXPECT_EQ(end.prompt_tokens_billed, 80u);
  EXPECT_EQ(completing.prompt_tokens_billed, 80u);
  EXPECT_TRUE(check(completing).empty());

  auto other = streaming();
  expect_refused(job::decide(other, complete_job{"p1", 150, 151, {}, 250, 80}, t0 + 10 * second_us),
                 errc::invalid_argument, "used 230 free tokens");
  expect_refused(job::decide(other, complete_job{"p1", 150, 151, {}, 0, 101}, t0 + 10 * second_us),
                 errc::invalid_argument, "prompt_tokens_billed is 101");
  // None given: the estimate.
  auto defaulted = run(other, complete_job{"p1", 150, 151}, t0 + 10 * second_us);
  ASSERT_TRUE(defaulted);
  EXPECT_EQ(std::get<events::job_completed>(defaulted->front()).prompt_tokens_billed, 100u);
  EXPECT_EQ(other.prompt_tokens_billed, 100u);

  // An end recorded before the field (0) billed the estimate.
  auto old = streaming();
  auto old_end = std::get<events::job_completed>(completed->front());
  old_end.prompt_tokens_billed = 0;
  old_end.free_tokens = 0;
  old = job::evolve(old, old_end);
  EXPECT_EQ(old.status, job_status::completed);
  EXPECT_EQ(old.prompt_tokens_billed, 100u);
}

TEST(job, a_premium_end_counts_no_free_tokens) {
  auto submission = a_submission();
  submission.premium = true;
  job_state s;
  ASSERT_TRUE(run(s, submission, t0));
  ASSERT_TRUE(run(s, queue_job{3, t0 + 60 * second_us}, t0));
  ASSERT_TRUE(run(s, assign_job{"p1"}, t0 + second_us));
  ASSERT_TRUE(run(s, start_job{"p1"}, t0 + 2 * second_us));
  expect_refused(job::decide(s, complete_job{"p1", 150, 151, {}, 250}, t0 + 10 * second_us), errc::invalid_argument,
                 "is premium: it counts no free tokens, not 250");
  auto completed = run(s, complete_job{"p1", 150, 151}, t0 + 10 * second_us);
  ASSERT_TRUE(completed);
  EXPECT_EQ(std::get<events::job_completed>(completed->front()).free_tokens, 0u);
}

TEST(job, submit_validates_ids_tokens_and_price) {
  job_options o;
  o.id_length_max = 8;
  o.model_name_length_max = 12;
  o.prompt_tokens_max = 1'000;
  o.max_tokens_max = 500;
  o.max_price_micros_max = 10'000;
  job_state s;
  auto with = [&](auto change) {
    auto c = a_submission();
    change(c);
    return job::decide(s, c, t0, o);
  };
  EXPECT_TRUE(with([](submit_job&) {}));
  expect_refused(with([](submit_job& c) { c.job_id.clear(); }), errc::invalid_argument, "job id is empty");
  expect_refused(with([](submit_job& c) { c.user_id.clear(); }), errc::invalid_argument, "user id");
  expect_refused(with([](submit_job& c) { c.model.clear(); }), errc::invalid_argument, "model");
  expect_refused(with([](submit_job& c) { c.job_id = "123456789"; }), errc::invalid_argument, "at most 8");
  expect_refused(with([](submit_job& c) { c.conversation_id = "123456789"; }), errc::invalid_argument, "conversation");
  EXPECT_TRUE(with([](submit_job& c) { c.model = "llama-3.1-8b"; })) << "a model name has its own bound";
  expect_refused(with([](submit_job& c) { c.model = "llama-3.1-70b"; }), errc::invalid_argument, "at most 12");
  expect_refused(with([](submit_job& c) { c.prompt_tokens = 0; }), errc::invalid_argument, "prompt_tokens is 0");
  expect_refused(with([](submit_job& c) { c.prompt_tokens = 1'001; }), errc::invalid_argument, "1 .. 1000");
  EXPECT_TRUE(with([](submit_job& c) { c.prompt_tokens = 1'000; }));
  expect_refused(with([](submit_job& c) { c.max_tokens = 0; }), errc::invalid_argument, "max_tokens is 0");
  expect_refused(with([](submit_job& c) { c.max_tokens = 501; }), errc::invalid_argument, "1 .. 500");
  EXPECT_TRUE(with([](submit_job& c) { c.max_tokens = 500; }));
  expect_refused(with([](submit_job& c) { c.max_price_micros = -1; }), errc::invalid_argument, "max_price_micros");
  expect_refused(with([](submit_job& c) { c.max_price_micros = 10'001; }), errc::invalid_argument, "0 .. 10000");
  EXPECT_TRUE(with([](submit_job& c) { c.max_price_micros = 0; }));
}

TEST(job, submit_is_idempotent_and_refuses_other_content) {
  auto s = queued();
  auto again = run(s, a_submission(), t0 + 1);
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->empty());
  auto other = a_submission();
  other.max_tokens = 201;
  expect_refused(job::decide(s, other, t0), errc::already_exists, "j1");
}

TEST(job, commands_before_submission_are_not_found) {
  job_state s;
  expect_refused(job::decide(s, queue_job{0, t0 + 1}, t0), errc::not_found, "submit it first");
  expect_refused(job::decide(s, expire_job{}, t0), errc::not_found, "submit it first");
}

TEST(job, transitions_out_of_order_are_refused_naming_the_state) {
  auto s = submitted();
  expect_refused(job::decide(s, assign_job{"p1"}, t0), errc::invalid_state, "is submitted");
  expect_refused(job::decide(s, start_job{"p1"}, t0), errc::invalid_state, "is submitted");
  expect_refused(job::decide(s, complete_job{"p1", 1, 1}, t0), errc::invalid_state, "is submitted");
  expect_refused(job::decide(s, reassign_job{"p1", {}, 0}, t0), errc::invalid_state, "is submitted");
  s = queued();
  expect_refused(job::decide(s, start_job{"p1"}, t0), errc::invalid_state, "is queued");
  ASSERT_TRUE(run(s, assign_job{"p1"}, t0 + 1));
  expect_refused(job::decide(s, complete_job{"p1", 1, 1}, t0), errc::invalid_state, "is assigned on provider \"p1\"");
  expect_refused(job::decide(s, start_job{"p2"}, t0), errc::invalid_state, "\"p2\"");
  expect_refused(job::decide(s, queue_job{0, t0 + second_us}, t0), errc::invalid_state, "is assigned");
}

TEST(job, repeating_the_command_of_the_current_state_emits_nothing) {
  auto s = queued();
  EXPECT_TRUE(run(s, queue_job{3, t0 + 60 * second_us}, t0 + 1)->empty());
  ASSERT_EQ(run(s, assign_job{"p1"}, t0 + 2)->size(), 1u);
  EXPECT_TRUE(run(s, assign_job{"p1"}, t0 + 3)->empty());
  expect_refused(job::decide(s, assign_job{"p2"}, t0 + 3), errc::invalid_state, "is assigned");
  ASSERT_EQ(run(s, start_job{"p1"}, t0 + 4)->size(), 1u);
  EXPECT_TRUE(run(s, start_job{"p1"}, t0 + 5)->empty());
  ASSERT_EQ(run(s, reassign_job{"p1", events::reassign_reason::provider_stalled, 7}, t0 + 6)->size(), 1u);
  EXPECT_TRUE(run(s, reassign_job{"p1", events::reassign_reason::provider_stalled, 7}, t0 + 7)->empty());
  ASSERT_EQ(run(s, assign_job{"p2"}, t0 + 8)->size(), 1u);
  ASSERT_EQ(run(s, start_job{"p2"}, t0 + 9)->size(), 1u);
  ASSERT_EQ(run(s, complete_job{"p2", 20, 20}, t0 + 10)->size(), 1u);
  EXPECT_TRUE(run(s, complete_job{"p2", 20, 20}, t0 + 11)->empty());
  expect_refused(job::decide(s, complete_job{"p2", 21, 21}, t0), errc::invalid_state, "is completed");
}

TEST(job, queue_deadline_must_be_ahead_and_within_the_limit) {
  job_options o;
  o.queue_wait_us_max = 10 * second_us;
  auto s = submitted();
  expect_refused(job::decide(s, queue_job{0, t0}, t0, o), errc::invalid_argument, "must lie after now");
  expect_refused(job::decide(s, queue_job{0, t0 + 10 * second_us + 1}, t0, o), errc::invalid_argument, "10000000");
  EXPECT_TRUE(job::decide(s, queue_job{0, t0 + 10 * second_us}, t0, o));
}

TEST(job, requeue_changes_priority_and_deadline) {
  auto s = queued();
  auto d = run(s, queue_job{9, t0 + 90 * second_us}, t0 + second_us);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(s.priority, 9);
  EXPECT_EQ(s.deadline_at_us, t0 + 90 * second_us);
}

TEST(job, a_provider_chosen_before_the_deadline_is_recorded_after_it) {
  auto s = queued();
  const std::int64_t deadline = s.deadline_at_us;
  expect_refused(job::decide(s, assign_job{"p1", deadline}, deadline - 1), errc::invalid_state, "past its deadline");
  auto d = run(s, assign_job{"p1", deadline - 1}, deadline + 5);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(s.status, job_status::assigned);
  EXPECT_EQ(std::get<events::job_assigned>(d->front()).assigned_at_us, deadline + 5) << "recorded when decided";
}

TEST(job, queued_job_past_its_deadline_cannot_be_assigned_and_expires) {
  auto s = queued();
  const std::int64_t deadline = s.deadline_at_us;
  EXPECT_TRUE(run(s, expire_job{}, deadline - 1)->empty()) << "deadline still ahead";
  expect_refused(job::decide(s, assign_job{"p1"}, deadline), errc::invalid_state, "past its deadline");
  auto d = run(s, expire_job{}, deadline);
  ASSERT_TRUE(d);
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(std::get<events::job_failed>(d->front()).reason, events::failure_reason::deadline_exceeded);
  EXPECT_EQ(s.status, job_status::failed);
  EXPECT_TRUE(run(s, expire_job{}, deadline + 1)->empty()) << "the timer firing again changes nothing";
}

TEST(job, expire_does_nothing_once_the_job_has_a_provider) {
  auto s = streaming();
  EXPECT_TRUE(run(s, expire_job{}, s.deadline_at_us + 1)->empty());
  EXPECT_EQ(s.status, job_status::streaming);
}

TEST(job, fail_for_deadline_needs_a_queued_job_past_its_deadline) {
  auto s = queued();
  const fail_job late{events::failure_reason::deadline_exceeded, "late"};
  expect_refused(job::decide(s, late, s.deadline_at_us - 1), errc::invalid_state, "until its deadline");
  EXPECT_TRUE(job::decide(s, late, s.deadline_at_us));
  s = streaming();
  expect_refused(job::decide(s, late, s.deadline_at_us + 1), errc::invalid_state, "is streaming");
}

TEST(job, a_job_that_cannot_be_served_fails_with_its_reason) {
  auto s = submitted();
  auto d = run(s, fail_job{events::failure_reason::no_provider, "no provider serves llama at standard"}, t0 + 1);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::job_failed>(d->front()),
            (events::job_failed{"j1", events::failure_reason::no_provider, "no provider serves llama at standard",
                                t0 + 1}));
  EXPECT_TRUE(run(s, fail_job{events::failure_reason::no_provider, "again"}, t0 + 2)->empty());
  expect_refused(job::decide(s, fail_job{events::failure_reason::internal, ""}, t0), errc::invalid_state, "is failed");
  expect_refused(job::decide(s, cancel_job{}, t0), errc::invalid_state, "is failed");
  EXPECT_TRUE(check(s).empty());
}

TEST(job, failure_message_length_is_limited) {
  job_options o;
  o.message_length_max = 4;
  auto s = submitted();
  expect_refused(job::decide(s, fail_job{events::failure_reason::internal, "12345"}, t0, o), errc::invalid_argument,
                 "at most 4");
  EXPECT_TRUE(job::decide(s, fail_job{events::failure_reason::internal, "1234"}, t0, o));
}

TEST(job, reassignment_keeps_tokens_and_counts_attempts) {
  auto s = streaming();
  auto d = run(s, reassign_job{"p1", events::reassign_reason::provider_lost, 40}, t0 + 3 * second_us);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::job_reassigned>(d->front()),
            (events::job_reassigned{"j1", "p1", events::reassign_reason::provider_lost, 40, t0 + 3 * second_us}));
  EXPECT_EQ(s.status, job_status::queued);
  EXPECT_EQ(s.tokens_so_far, 40u);
  EXPECT_TRUE(s.provider_id.empty());
  auto assigned = run(s, assign_job{"p2"}, t0 + 4 * second_us);
  ASSERT_TRUE(assigned);
  EXPECT_EQ(std::get<events::job_assigned>(assigned->front()).attempt, 2u);
  EXPECT_EQ(s.providers_tried, (std::vector<std::string>{"p1", "p2"}));
  expect_refused(job::decide(s, reassign_job{"p2", {}, 41}, t0), errc::invalid_argument, "40 .. 40");
  EXPECT_TRUE(run(s, reassign_job{"p2", {}, 40}, t0 + 5 * second_us));
  EXPECT_EQ(s.first_token_at_us, t0 + 2 * second_us) << "the first token of the job stays the first";
  EXPECT_TRUE(check(s).empty());
}

TEST(job, reassignment_tokens_lie_between_those_kept_and_max_tokens) {
  auto s = streaming();
  ASSERT_TRUE(run(s, reassign_job{"p1", {}, 40}, t0 + 3 * second_us));
  ASSERT_TRUE(run(s, assign_job{"p2"}, t0 + 4 * second_us));
  ASSERT_TRUE(run(s, start_job{"p2"}, t0 + 5 * second_us));
  expect_refused(job::decide(s, reassign_job{"p2", {}, 39}, t0), errc::invalid_argument, "40 .. 200");
  expect_refused(job::decide(s, reassign_job{"p2", {}, 201}, t0), errc::invalid_argument, "40 .. 200");
  expect_refused(job::decide(s, reassign_job{"p9", {}, 50}, t0), errc::invalid_state, "\"p9\"");
  EXPECT_TRUE(job::decide(s, reassign_job{"p2", {}, 200}, t0));
}

TEST(job, attempts_are_limited) {
  job_options o;
  o.attempts_max = 2;
  auto s = queued();
  ASSERT_TRUE(run(s, assign_job{"p1"}, t0 + 1, o));
  ASSERT_TRUE(run(s, reassign_job{"p1", {}, 0}, t0 + 2, o));
  ASSERT_TRUE(run(s, assign_job{"p2"}, t0 + 3, o));
  ASSERT_TRUE(run(s, reassign_job{"p2", {}, 0}, t0 + 4, o));
  expect_refused(job::decide(s, assign_job{"p3"}, t0 + 5, o), errc::limit_exceeded, "2 attempts");
  EXPECT_TRUE(run(s, fail_job{events::failure_reason::all_providers_failed, ""}, t0 + 5, o));
  EXPECT_TRUE(check(s).empty());
}

TEST(job, offers_declined_untried_spend_no_attempt_up_to_declines_max) {
  // A provider whose slots are full declines the offer without trying it: the job waits for
  // another, and its attempts stay for real failures.
  job_options o;
  o.attempts_max = 2;
  o.declines_max = 3;
  auto s = queued();
  const auto declined = events::reassign_reason::provider_declined;
  std::int64_t t = t0;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(run(s, assign_job{"p1"}, ++t, o));
    ASSERT_TRUE(run(s, reassign_job{"p1", declined, 0}, ++t, o));
  }
  EXPECT_EQ(s.declines, 3u);
  EXPECT_EQ(s.attempt, 3u);
  expect_refused(job::decide(s, assign_job{"p2"}, ++t, o), errc::limit_exceeded, "declined 3 times");
  o.declines_max = 32;
  ASSERT_TRUE(run(s, assign_job{"p2"}, ++t, o)) << "three declines, no attempt spent";
  ASSERT_TRUE(run(s, start_job{"p2"}, ++t, o));
  expect_refused(job::decide(s, reassign_job{"p2", declined, 0}, ++t, o), errc::invalid_argument,
                 "declined untried, before its answer starts");
  ASSERT_TRUE(run(s, reassign_job{"p2", events::reassign_reason::provider_lost, 0}, ++t, o));
  ASSERT_TRUE(run(s, assign_job{"p3"}, ++t, o));
  ASSERT_TRUE(run(s, reassign_job{"p3", events::reassign_reason::provider_error, 0}, ++t, o));
  expect_refused(job::decide(s, assign_job{"p4"}, ++t, o), errc::limit_exceeded, "2 attempts");
  EXPECT_TRUE(check(s).empty());
}

TEST(job, completion_tokens_include_the_kept_prefix_and_stay_within_max_tokens) {
  auto s = streaming();
  ASSERT_TRUE(run(s, reassign_job{"p1", {}, 40}, t0 + 3 * second_us));
  ASSERT_TRUE(run(s, assign_job{"p2"}, t0 + 4 * second_us));
  ASSERT_TRUE(run(s, start_job{"p2"}, t0 + 5 * second_us));
  expect_refused(job::decide(s, complete_job{"p2", 39, 39}, t0), errc::invalid_argument, "completion_tokens is 39");
  expect_refused(job::decide(s, complete_job{"p2", 201, 201}, t0), errc::invalid_argument, "40 .. 200");
  expect_refused(job::decide(s, complete_job{"p1", 50, 50}, t0), errc::invalid_state, "\"p1\"");
  EXPECT_TRUE(job::decide(s, complete_job{"p2", 40, 45}, t0));
}

TEST(job, cancel_bills_the_tokens_produced_and_is_final) {
  auto s = streaming();
  auto d = run(s, cancel_job{events::cancelled_by::client, 33}, t0 + 4 * second_us);
  ASSERT_TRUE(d);
  EXPECT_EQ(std::get<events::job_cancelled>(d->front()),
            (events::job_cancelled{"j1", events::cancelled_by::client, 33, t0 + 4 * second_us}));
  EXPECT_EQ(s.completion_tokens, 33u);
  EXPECT_TRUE(run(s, cancel_job{events::cancelled_by::client, 33}, t0 + 5 * second_us)->empty());
  expect_refused(job::decide(s, cancel_job{events::cancelled_by::platform, 33}, t0), errc::invalid_state,
                 "is cancelled");
  expect_refused(job::decide(s, complete_job{"p1", 33, 33}, t0), errc::invalid_state, "is cancelled");
  expect_refused(job::decide(s, queue_job{0, t0 + 10 * second_us}, t0), errc::invalid_state, "is cancelled");
  EXPECT_TRUE(check(s).empty());
}

TEST(job, cancel_tokens_lie_between_those_kept_and_max_tokens) {
  auto s = queued();
  expect_refused(job::decide(s, cancel_job{{}, 201}, t0), errc::invalid_argument, "0 .. 200");
  EXPECT_TRUE(job::decide(s, cancel_job{{}, 0}, t0));
}

TEST(job, evolve_ignores_other_jobs_and_events_that_break_the_lifecycle) {
  auto s = queued();
  const auto before = s;
  s = job::evolve(s, events::job_assigned{"j2", "p1", 1, t0});
  s = job::evolve(s, events::job_completed{"j1", "p1", 1, 1, 1, 0, 0, t0});
  s = job::evolve(s, events::job_assigned{"j1", "p1", 5, t0});
  s = job::evolve(s, events::job_submitted{"j1", "u2", "m", {}, 1, 1, 0, false, "", t0});
  s = job::evolve(s, events::impression_recorded{"i", "c", "j1", "u1", 5, t0});
  EXPECT_EQ(s, before);
}

TEST(job, check_reports_broken_invariants) {
  auto s = streaming();
  ASSERT_TRUE(check(s).empty());
  auto no_provider = s;
  no_provider.provider_id.clear();
  EXPECT_FALSE(check(no_provider).empty());
  auto lost_attempt = s;
  lost_attempt.providers_tried.clear();
  EXPECT_FALSE(check(lost_attempt).empty());
  auto too_many_tokens = s;
  too_many_tokens.tokens_so_far = s.max_tokens + 1;
  EXPECT_FALSE(check(too_many_tokens).empty());
  auto queued_without_deadline = queued();
  queued_without_deadline.deadline_at_us = 0;
  EXPECT_FALSE(check(queued_without_deadline).empty());
  auto completed_without_first_token = s;
  completed_without_first_token.status = job_status::completed;
  completed_without_first_token.first_token_at_us = 0;
  EXPECT_FALSE(check(completed_without_first_token).empty());
  auto unknown = s;
  unknown.status = static_cast<job_status>(42);
  EXPECT_FALSE(check(unknown).empty());
}

std::uint64_t seed_from_environment() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  return std::random_device{}();
}

job::command random_command(std::mt19937_64& rng, const job_state& s) {
  const std::string providers[] = {"p1", "p2", "p3"};
  const auto provider = providers[rng() % 3];
  const auto tokens = static_cast<std::uint32_t>(s.tokens_so_far + rng() % 30);
  // Weighted towards progress so that walks reach every status; failing and cancelling end a walk.
  switch (rng() % 16) {
    case 0: return a_submission();
    case 1: case 2: return queue_job{static_cast<std::int32_t>(rng() % 5), 0};  // the caller sets the deadline
    case 3: case 4: case 5: return assign_job{provider};
    case 6: case 7: case 8: return start_job{s.provider_id.empty() ? provider : s.provider_id};
    case 9: case 10:
      return reassign_job{s.provider_id, {}, s.status == job_status::streaming ? tokens : s.tokens_so_far};
    case 11: case 12: case 13: return complete_job{s.provider_id, tokens, tokens};
    case 14:
      if (rng() % 2 == 0) return fail_job{static_cast<events::failure_reason>(rng() % 7), "f"};
      return cancel_job{{}, tokens};
    default: return expire_job{};
  }
}

// Random command sequences: every state reached passes check(), terminal states never change and
// replaying the accepted events from scratch gives the same state.
TEST(job, random_walks_keep_the_invariants) {
  const auto seed = seed_from_environment();
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "job random walks: GPUSTREAM_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  std::set<job_status> reached;
  for (int walk = 0; walk < 200; ++walk) {
    job_state s;
    std::vector<events::event> log;
    std::int64_t now = t0;
    for (int step = 0; step < 40; ++step) {
      now += static_cast<std::int64_t>(rng() % (20 * second_us));
      auto c = random_command(rng, s);
      if (auto* q = std::get_if<queue_job>(&c))
        q->deadline_at_us = now + 1 + static_cast<std::int64_t>(rng() % (30 * second_us));
      const auto before = s;
      auto d = run(s, c, now);
      if (!d) {
        ASSERT_EQ(s, before);
        continue;
      }
      if (is_terminal(before.status)) {
        ASSERT_TRUE(d->empty()) << "walk " << walk << " step " << step;
      }
      log.insert(log.end(), d->begin(), d->end());
      reached.insert(s.status);
      const auto broken = check(s);
      ASSERT_TRUE(broken.empty()) << "walk " << walk << " step " << step << ": " << broken.front();
    }
    job_state replayed;
    for (const auto& e : log) replayed = job::evolve(std::move(replayed), e);
    ASSERT_EQ(replayed, s) << "walk " << walk;
  }
  EXPECT_EQ(reached.size(), 7u) << "the walks should reach every status after none";
}

}  // namespace
}  // namespace gpustream::domain
