// The scheduler's job queue: validation, limits, order, slots, expiry, rejection; no job is ever stuck.
#include "domain/job_queue.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "domain/priority.hpp"

namespace gpustream::domain {
namespace {

using events::quality_tier;

constexpr std::int64_t t0 = 1'700'000'000'000'000;
constexpr std::int64_t second_us = 1'000'000;

void add_provider(selection_index& index, const std::string& id, const std::string& model,
                  std::uint32_t slots, std::int64_t score = 0) {
  ASSERT_TRUE(index.list({id, level_for_score(score), score, false, {{model, 100, 100, slots}}}));
}

queued_job job(std::string id, std::string model = "m", std::int32_t priority = 0,
               std::int64_t queued_at = t0, quality_tier quality = quality_tier::low) {
  return {std::move(id), std::move(model), quality, priority, queued_at, queued_at + 60 * second_us, "",
          ""};
}

std::vector<std::string> ids(const std::vector<assignment>& assigned) {
  std::vector<std::string> out;
  for (const auto& a : assigned) out.push_back(a.job.job_id);
  return out;
}

std::vector<std::string> ids(const std::vector<queued_job>& jobs) {
  std::vector<std::string> out;
  for (const auto& j : jobs) out.push_back(j.job_id);
  return out;
}

void expect_refused(const expected<void, error>& result, errc code) {
  ASSERT_FALSE(result.has_value());
  EXPECT_EQ(result.error().code, code) << result.error().message;
}

TEST(job_queue, malformed_jobs_are_refused) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue;
  expect_refused(queue.push(job(""), index, t0), errc::invalid_argument);
  expect_refused(queue.push(job("j", ""), index, t0), errc::invalid_argument);
  expect_refused(queue.push(job("j", "m", 0, t0 + 1), index, t0), errc::invalid_argument);
  expect_refused(queue.push(job("j", "m", -1), index, t0), errc::invalid_argument);
  expect_refused(queue.push(job("j", "m", job_queue_options{}.priority_ms_max + 1), index, t0),
                 errc::invalid_argument);
  auto late = job("j");
  late.deadline_at_us = t0;
  expect_refused(queue.push(late, index, t0), errc::invalid_argument);
  ASSERT_TRUE(queue.push(job("j"), index, t0));
  expect_refused(queue.push(job("j"), index, t0), errc::already_exists);
  EXPECT_EQ(queue.size(), 1u);
}

TEST(job_queue, deadline_us_max_is_a_limit) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue;
  auto far = job("far");
  far.deadline_at_us = t0 + job_queue_options{}.deadline_us_max;
  ASSERT_TRUE(queue.push(far, index, t0));
  auto too_far = job("too-far");
  too_far.deadline_at_us = t0 + job_queue_options{}.deadline_us_max + 1;
  expect_refused(queue.push(too_far, index, t0), errc::limit_exceeded);
}

TEST(job_queue, jobs_queued_max_is_a_limit) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue({.jobs_queued_max = 3});
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(queue.push(job(id), index, t0));
  const auto refused = queue.push(job("d"), index, t0);
  expect_refused(refused, errc::busy);
  EXPECT_NE(refused.error().message.find("3 jobs"), std::string::npos) << refused.error().message;
  EXPECT_TRUE(queue.remove("a"));
  EXPECT_TRUE(queue.push(job("d"), index, t0));
  auto back = job("e");
  back.returning = true;
  EXPECT_TRUE(queue.push(back, index, t0)) << "a job admitted before comes back past the limit";
  EXPECT_EQ(queue.size(), 4u);
}

TEST(job_queue, a_job_nobody_can_serve_is_rejected_at_once) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue;
  const auto unknown = queue.push(job("j", "other-model"), index, t0);
  expect_refused(unknown, errc::no_provider);
  EXPECT_NE(unknown.error().message.find("other-model"), std::string::npos);
  // A Bronze provider cannot serve the high tier.
  const auto high = queue.push(job("j", "m", 0, t0, quality_tier::high), index, t0);
  expect_refused(high, errc::no_provider);
  EXPECT_NE(high.error().message.find("tier high (needs a Silver provider or better)"),
            std::string::npos)
      << high.error().message;
  // Busy is not unservable: the job waits.
  ASSERT_TRUE(index.job_started("p"));
  EXPECT_TRUE(queue.push(job("j"), index, t0));
}

TEST(job_queue, jobs_are_assigned_by_priority_then_age) {
  selection_index index;
  add_provider(index, "p", "m", 4);
  job_queue queue;
  const auto gold = priority_for(false, contribution_tier::gold);
  const auto premium = priority_for(true, contribution_tier::unverified);
  ASSERT_TRUE(queue.push(job("old-free", "m", 0, t0), index, t0 + 2 * second_us));
  ASSERT_TRUE(queue.push(job("gold", "m", gold, t0 + second_us), index, t0 + 2 * second_us));
  ASSERT_TRUE(queue.push(job("premium", "m", premium, t0 + 2 * second_us), index, t0 + 2 * second_us));
  ASSERT_TRUE(queue.push(job("new-free", "m", 0, t0 + 2 * second_us), index, t0 + 2 * second_us));
  EXPECT_EQ(ids(queue.jobs_in_order()),
            (std::vector<std::string>{"premium", "gold", "old-free", "new-free"}));
  const auto assigned = queue.pop_assignable(index, {}, t0 + 3 * second_us);
  EXPECT_EQ(ids(assigned), (std::vector<std::string>{"premium", "gold", "old-free", "new-free"}));
  for (const auto& a : assigned) EXPECT_EQ(a.provider_id, "p");
  EXPECT_TRUE(queue.empty());
}

TEST(job_queue, a_pass_respects_concurrency_slots) {
  selection_index index;
  add_provider(index, "p", "m", 2);
  job_queue queue;
  for (const char* id : {"a", "b", "c", "d", "e"}) ASSERT_TRUE(queue.push(job(id), index, t0));
  EXPECT_EQ(ids(queue.pop_assignable(index, {}, t0)), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(index.find("p")->active_jobs, 2u);
  EXPECT_TRUE(queue.pop_assignable(index, {}, t0).empty());
  ASSERT_TRUE(index.job_finished("p"));
  EXPECT_EQ(ids(queue.pop_assignable(index, {}, t0)), (std::vector<std::string>{"c"}));
  EXPECT_EQ(queue.size(), 2u);
}

TEST(job_queue, a_blocked_job_does_not_hold_up_jobs_for_other_models_or_tiers) {
  selection_index index;
  add_provider(index, "busy-x", "x", 1);
  add_provider(index, "free-y", "y", 1);
  add_provider(index, "bronze", "m", 1);
  add_provider(index, "gold", "m", 1, 600);
  ASSERT_TRUE(index.job_started("busy-x"));
  ASSERT_TRUE(index.job_started("gold"));
  job_queue queue;
  ASSERT_TRUE(queue.push(job("x1", "x", 10'000), index, t0));
  ASSERT_TRUE(queue.push(job("ultra", "m", 10'000, t0, quality_tier::ultra), index, t0));
  ASSERT_TRUE(queue.push(job("x2", "x"), index, t0));
  ASSERT_TRUE(queue.push(job("y1", "y"), index, t0));
  ASSERT_TRUE(queue.push(job("low", "m"), index, t0));
  const auto assigned = queue.pop_assignable(index, {}, t0);
  ASSERT_EQ(ids(assigned), (std::vector<std::string>{"y1", "low"}));
  EXPECT_EQ(assigned[1].provider_id, "bronze") << "the Gold provider is busy";
  EXPECT_EQ(ids(queue.jobs_in_order()), (std::vector<std::string>{"x1", "ultra", "x2"}));
}

TEST(job_queue, expired_jobs_are_never_assigned_and_expire_at_their_deadline) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue;
  auto soon = job("soon", "m", 10'000);
  soon.deadline_at_us = t0 + second_us;
  ASSERT_TRUE(queue.push(soon, index, t0));
  ASSERT_TRUE(queue.push(job("later"), index, t0));
  EXPECT_EQ(queue.next_deadline_at_us(), t0 + second_us);
  EXPECT_EQ(ids(queue.pop_assignable(index, {}, t0 + second_us)), (std::vector<std::string>{"later"}));
  EXPECT_TRUE(queue.expire(t0 + second_us - 1).empty());
  EXPECT_EQ(ids(queue.expire(t0 + second_us)), (std::vector<std::string>{"soon"}));
  EXPECT_TRUE(queue.empty());
  EXPECT_EQ(queue.next_deadline_at_us(), 0);
}

TEST(job_queue, jobs_left_without_any_provider_are_taken_out) {
  selection_index index;
  add_provider(index, "px", "x", 1);
  add_provider(index, "py", "y", 1);
  ASSERT_TRUE(index.job_started("px"));
  ASSERT_TRUE(index.job_started("py"));
  job_queue queue;
  for (const char* id : {"x1", "x2"}) ASSERT_TRUE(queue.push(job(id, "x"), index, t0));
  ASSERT_TRUE(queue.push(job("y1", "y"), index, t0));
  EXPECT_TRUE(queue.take_unservable(index).empty());
  ASSERT_TRUE(index.unlist("px"));
  EXPECT_EQ(ids(queue.take_unservable(index)), (std::vector<std::string>{"x1", "x2"}));
  EXPECT_EQ(ids(queue.jobs_in_order()), (std::vector<std::string>{"y1"}));
}

TEST(job_queue, assignments_per_pass_max_is_a_limit) {
  selection_index index;
  add_provider(index, "p", "m", 10);
  job_queue queue({.assignments_per_pass_max = 3});
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(queue.push(job("j" + std::to_string(i)), index, t0));
  EXPECT_EQ(queue.pop_assignable(index, {}, t0).size(), 3u);
  EXPECT_EQ(queue.pop_assignable(index, {}, t0).size(), 2u);
}

TEST(job_queue, remove_takes_a_cancelled_job_out) {
  selection_index index;
  add_provider(index, "p", "m", 1);
  job_queue queue;
  ASSERT_TRUE(queue.push(job("a"), index, t0));
  EXPECT_TRUE(queue.contains("a"));
  EXPECT_TRUE(queue.remove("a"));
  EXPECT_FALSE(queue.remove("a"));
  EXPECT_FALSE(queue.contains("a"));
  EXPECT_TRUE(queue.pop_assignable(index, {}, t0).empty());
}

TEST(job_queue, a_sticky_job_goes_to_its_provider) {
  selection_index index;
  add_provider(index, "a", "m", 1);
  add_provider(index, "b", "m", 1);
  job_queue queue;
  auto sticky = job("s");
  sticky.preferred_provider_id = "b";
  ASSERT_TRUE(queue.push(sticky, index, t0));
  const auto assigned = queue.pop_assignable(index, {}, t0);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].provider_id, "b");
}

TEST(job_queue, a_job_avoids_the_provider_it_failed_on_unless_it_is_the_only_one) {
  selection_index index;
  add_provider(index, "a", "m", 1);
  add_provider(index, "b", "m", 1);
  job_queue queue;
  auto retried = job("r");
  retried.avoided_provider_id = "a";  // a would win the tie on id
  ASSERT_TRUE(queue.push(retried, index, t0));
  auto assigned = queue.pop_assignable(index, {}, t0);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].provider_id, "b");

  ASSERT_TRUE(index.unlist("b"));
  auto again = job("s");
  again.avoided_provider_id = "a";
  ASSERT_TRUE(queue.push(again, index, t0));
  assigned = queue.pop_assignable(index, {}, t0);
  ASSERT_EQ(assigned.size(), 1u) << "the only provider left takes it rather than none";
  EXPECT_EQ(assigned[0].provider_id, "a");
}

/// Providers a and b of model m, one slot each, b busy; and job "broken", whose answer broke off
/// on a (avoided strictly).
struct broken_off_on_a {
  broken_off_on_a() {
    add_provider(index, "a", "m", 1);
    add_provider(index, "b", "m", 1);
    b_started = index.job_started("b");
    broken.avoided_provider_id = "a";
    broken.avoided_strictly = true;
  }
  selection_index index;
  bool b_started = false;
  queued_job broken = job("broken");
};

TEST(job_queue, an_answer_that_broke_off_waits_for_another_provider_and_holds_up_no_other_job) {
  broken_off_on_a world;
  ASSERT_TRUE(world.b_started);
  auto& index = world.index;
  job_queue queue;
  // Same model and caps as `fresh`, queued first: without its own group it would stop the pass.
  ASSERT_TRUE(queue.push(world.broken, index, t0));
  ASSERT_TRUE(queue.push(job("fresh", "m", 0, t0 + 1), index, t0 + 1));
  auto assigned = queue.pop_assignable(index, {}, t0 + 1);
  ASSERT_EQ(ids(assigned), std::vector<std::string>{"fresh"}) << "broken waits for b, fresh takes a";
  EXPECT_EQ(assigned[0].provider_id, "a");
  ASSERT_TRUE(index.job_finished("b"));
  assigned = queue.pop_assignable(index, {}, t0 + 2);
  ASSERT_EQ(ids(assigned), std::vector<std::string>{"broken"});
  EXPECT_EQ(assigned[0].provider_id, "b");
}

TEST(job_queue, an_answer_that_broke_off_is_unservable_once_no_provider_may_take_work) {
  broken_off_on_a world;
  ASSERT_TRUE(world.b_started);
  auto& index = world.index;
  job_queue queue;
  ASSERT_TRUE(queue.push(world.broken, index, t0));
  ASSERT_TRUE(queue.push(job("fresh"), index, t0));
  ASSERT_TRUE(index.job_started("a"));  // both busy: both wait
  ASSERT_TRUE(index.report_load("b", {.load_percent = 100, .health_percent = 100, .draining = true}));
  EXPECT_TRUE(queue.take_unservable(index).empty()) << "a may take it back once it has room";
  // The provider it broke off on goes, and the other drains: nobody will take the answer on.
  ASSERT_TRUE(index.unlist("a"));
  EXPECT_EQ(ids(queue.take_unservable(index)), std::vector<std::string>{"broken"});
  EXPECT_EQ(ids(queue.jobs_in_order()), std::vector<std::string>{"fresh"}) << "a new job waits for b as before";
}

// ---------------------------------------------------------------------------------------------
// Property: every job leaves the queue exactly once (assigned before its deadline, expired at
// it, cancelled, or rejected as unservable); after every pass no waiting job has a provider that
// would take it; a group's jobs are assigned in queue order; slots are never overrun.

struct simulation {
  std::mt19937_64 rng;
  selection_index index;
  job_queue queue;
  std::int64_t now = t0;
  std::vector<std::string> models{"m0", "m1", "m2"};
  std::map<std::string, queued_job> pushed;                     // every job accepted
  std::map<std::string, std::string> outcome;                   // job -> how it left
  std::vector<std::pair<std::string, std::string>> running;     // (job, provider)
  std::uint64_t next_job = 0;
  std::map<std::string, std::uint64_t> arrival;                 // job -> push number

  explicit simulation(std::uint64_t seed) : rng(seed), queue({.jobs_queued_max = 200}) {}

  std::uint64_t below(std::uint64_t n) { return rng() % n; }

  /// A model's window as listed (0: unknown), or a job's need.
  std::uint32_t window() { return std::array<std::uint32_t, 4>{0, 2'000, 8'000, 50'000}[below(4)]; }

  void leave(const std::string& job_id, const std::string& how) {
    ASSERT_TRUE(pushed.contains(job_id)) << job_id;
    ASSERT_TRUE(outcome.emplace(job_id, how).second) << job_id << " left twice";
  }

  void change_providers() {
    const std::string id = "p" + std::to_string(below(12));
    switch (below(5)) {
      case 0: {
        std::vector<listed_offer> offers;
        for (const auto& m : models) {
          if (below(3) == 0) offers.push_back({m, 1, 1, 1 + static_cast<std::uint32_t>(below(3)), window()});
        }
        const auto score = static_cast<std::int64_t>(below(3) * 400);
        ASSERT_TRUE(index.list({id, level_for_score(score), score, below(12) == 0, offers}));
        break;
      }
      case 1:
        // Jobs running on a provider that goes away end with it.
        std::erase_if(running, [&](const auto& r) { return r.second == id; });
        (void)index.unlist(id);
        for (const auto& j : queue.take_unservable(index)) leave(j.job_id, "unservable");
        break;
      case 2:
        // Stopping (it takes nothing new), or its link lost while it stays listed.
        if (below(2) == 0) {
          (void)index.report_load(id, {static_cast<std::uint32_t>(below(100)), 90, true});
        } else {
          (void)index.mark_unreachable(id);
        }
        break;
      default:
        (void)index.report_load(id, {static_cast<std::uint32_t>(below(100)), 90});
        break;
    }
  }

  void push_job() {
    queued_job j;
    j.job_id = "j" + std::to_string(next_job++);
    j.model = models[below(models.size())];
    j.quality = static_cast<quality_tier>(below(4));
    j.priority = priority_for(below(2) == 0, static_cast<contribution_tier>(below(7)));
    j.queued_at_us = now - static_cast<std::int64_t>(below(3) * second_us);
    j.deadline_at_us = now + 1 + static_cast<std::int64_t>(below(30) * second_us);
    if (below(5) == 0) j.preferred_provider_id = "p" + std::to_string(below(12));
    if (below(4) == 0) {  // back from a failed attempt; half of them answers that broke off there
      j.avoided_provider_id = "p" + std::to_string(below(12));
      j.avoided_strictly = below(2) == 0;
    }
    j.context_tokens_min = window();
    if (queue.push(j, index, now)) {
      arrival[j.job_id] = next_job;
      pushed.emplace(j.job_id, j);
    }
  }

  void finish_some() {
    for (std::size_t n = below(4); n > 0 && !running.empty(); --n) {
      const auto at = below(running.size());
      ASSERT_TRUE(index.job_finished(running[at].second));
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(at));
    }
  }

  /// Whether provider `p` serves the job's model, tier and window (busy or not).
  bool serves(const online_provider& p, const queued_job& j) const {
    const auto level_min = index.options().quality_level_min[static_cast<std::size_t>(j.quality)];
    if (p.suspended || p.level < level_min) return false;
    return std::any_of(p.offers.begin(), p.offers.end(), [&](const online_offer& o) {
      return o.model_name == j.model && (o.context_length_tokens == 0 || o.context_length_tokens >= j.context_tokens_min);
    });
  }

  /// Whether a listed provider would take the job right now: one it does not avoid; or the one it
  /// avoids, loosely, or strictly when no other may take work later.
  bool someone_free_for(const queued_job& j) const {
    bool free_avoided = false;
    bool other_may_take = false;
    for (auto id : index.provider_ids()) {
      const auto* p = index.find(id);
      if (!serves(*p, j)) continue;
      const bool avoided = id == j.avoided_provider_id;
      if (!avoided && !p->draining && !p->unreachable) other_may_take = true;
      if (!accepts_work(*p, index.options())) continue;
      if (!avoided) return true;
      free_avoided = true;
    }
    return free_avoided && (!j.avoided_strictly || !other_may_take);
  }

  void pass() {
    const auto waiting_before = queue.jobs_in_order();
    const auto assigned = queue.pop_assignable(index, {selection_policy::qmesh, rng()}, now);
    std::set<std::string> taken;
    for (const auto& a : assigned) {
      ASSERT_GT(a.job.deadline_at_us, now) << a.job.job_id << " assigned after its deadline";
      leave(a.job.job_id, "assigned");
      running.emplace_back(a.job.job_id, a.provider_id);
      taken.insert(a.job.job_id);
    }
    // In one group, nobody is assigned while an earlier job of the group is left waiting.
    std::map<std::tuple<std::string, quality_tier, std::uint32_t, std::string>, bool> skipped;
    for (const auto& j : waiting_before) {
      if (j.deadline_at_us <= now) continue;
      auto& group_skipped =
          skipped[{j.model, j.quality, j.context_tokens_min, j.avoided_strictly ? j.avoided_provider_id : ""}];
      if (taken.contains(j.job_id)) {
        ASSERT_FALSE(group_skipped) << j.job_id << " overtook a job of its own group";
      } else {
        group_skipped = true;
      }
    }
    // An answer that broke off goes back where it broke only when no other provider may take it.
    for (const auto& a : assigned) {
      if (!a.job.avoided_strictly || a.provider_id != a.job.avoided_provider_id) continue;
      for (auto id : index.provider_ids()) {
        const auto* p = index.find(id);
        ASSERT_FALSE(id != a.provider_id && serves(*p, a.job) && !p->draining && !p->unreachable)
            << a.job.job_id << " went back to " << a.provider_id << " although " << id << " may take it";
      }
    }
    // A provider only receives jobs into free slots.
    for (const auto& a : assigned) {
      const auto* p = index.find(a.provider_id);
      ASSERT_NE(p, nullptr);
      ASSERT_LE(p->active_jobs, p->concurrency_max) << a.provider_id;
    }
    // Nothing stuck: every job still waiting has no provider that would take it now.
    for (const auto& j : queue.jobs_in_order()) {
      if (j.deadline_at_us <= now) continue;
      ASSERT_FALSE(someone_free_for(j)) << j.job_id << " waits although a provider is free";
    }
  }

  void expire() {
    for (const auto& j : queue.expire(now)) {
      ASSERT_LE(j.deadline_at_us, now);
      leave(j.job_id, "expired");
    }
  }

  void cancel_one() {
    const auto waiting = queue.jobs_in_order();
    if (waiting.empty()) return;
    const auto& j = waiting[below(waiting.size())];
    ASSERT_TRUE(queue.remove(j.job_id));
    leave(j.job_id, "cancelled");
  }
};

TEST(job_queue, no_job_is_ever_stuck) {
  std::uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("GPUSTREAM_SEED")) seed = std::strtoull(env, nullptr, 10);
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  simulation sim(seed);
  for (int step = 0; step < 4'000; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    switch (sim.below(10)) {
      case 0: case 1: ASSERT_NO_FATAL_FAILURE(sim.change_providers()); break;
      case 2: case 3: case 4: ASSERT_NO_FATAL_FAILURE(sim.push_job()); break;
      case 5: ASSERT_NO_FATAL_FAILURE(sim.finish_some()); break;
      case 6: ASSERT_NO_FATAL_FAILURE(sim.cancel_one()); break;
      default: break;
    }
    sim.now += static_cast<std::int64_t>(sim.below(500'000));
    ASSERT_NO_FATAL_FAILURE(sim.expire());
    ASSERT_NO_FATAL_FAILURE(sim.pass());
  }
  // Long after every deadline, the queue is empty and each job left it exactly once.
  sim.now += job_queue_options{}.deadline_us_max;
  ASSERT_NO_FATAL_FAILURE(sim.expire());
  EXPECT_TRUE(sim.queue.empty());
  EXPECT_EQ(sim.outcome.size(), sim.pushed.size());
  std::map<std::string, int> by_outcome;
  for (const auto& [job_id, how] : sim.outcome) ++by_outcome[how];
  std::cout << "jobs " << sim.pushed.size() << ": assigned " << by_outcome["assigned"]
            << ", expired " << by_outcome["expired"] << ", cancelled " << by_outcome["cancelled"]
            << ", unservable " << by_outcome["unservable"] << "\n";
  EXPECT_GT(by_outcome["assigned"], 0);
  EXPECT_GT(by_outcome["expired"], 0);
}

TEST(job_queue, a_capped_job_goes_only_to_a_provider_within_its_cap_and_holds_up_no_other_job) {
  selection_index index;
  // "dear" asks 1,000 micro-USD per million tokens in and out; "cheap" 100.
  ASSERT_TRUE(index.list({"dear", level_for_score(0), 0, false, {{"m", 1'000, 1'000, 4}}}));
  job_queue queue;
  auto capped = job("capped");
  capped.prompt_tokens = 600'000;
  capped.max_tokens = 400'000;
  const auto cheap_quote = quote_max_micros({100, 100}, quality_tier::low, 600'000, 400'000, pricing_options{});
  ASSERT_TRUE(cheap_quote);
  capped.cost_max_micros = *cheap_quote;
  // Only "dear" online: nobody can serve it within its cap.
  const auto refused = queue.push(capped, index, t0);
  expect_refused(refused, errc::no_provider);
  EXPECT_NE(refused.error().message.find("for at most " + std::to_string(*cheap_quote) + " micro-USD"), std::string::npos)
      << refused.error().message;

  // "cheap" online but busy: the capped job waits for it, and an uncapped one behind it takes "dear".
  ASSERT_TRUE(index.list({"cheap", level_for_score(0), 0, false, {{"m", 100, 100, 1}}}));
  ASSERT_TRUE(index.job_started("cheap"));
  ASSERT_TRUE(queue.push(capped, index, t0));
  ASSERT_TRUE(queue.push(job("plain", "m", 0, t0 + 1), index, t0 + 1));
  auto assigned = queue.pop_assignable(index, {}, t0 + 2);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].job.job_id, "plain");
  EXPECT_EQ(assigned[0].provider_id, "dear");
  ASSERT_TRUE(index.job_finished("cheap"));
  assigned = queue.pop_assignable(index, {}, t0 + 3);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].job.job_id, "capped");
  EXPECT_EQ(assigned[0].provider_id, "cheap");

  // The last provider within a queued job's cap goes: the job is taken out as unservable.
  auto second = capped;
  second.job_id = "capped-2";
  ASSERT_TRUE(queue.push(second, index, t0 + 4));
  ASSERT_TRUE(index.unlist("cheap"));
  EXPECT_EQ(ids(queue.take_unservable(index)), std::vector<std::string>{"capped-2"});
  EXPECT_TRUE(queue.empty());
}

TEST(job_queue, a_job_goes_only_to_a_provider_whose_window_holds_its_prompt_and_max_tokens) {
  selection_index index;
  // "small" serves m with a 4,096-token window (LM Studio's default), "large" with 131,072, and
  // "unknown" says nothing of its window.
  ASSERT_TRUE(index.list({"small", level_for_score(0), 0, false, {{"m", 100, 100, 4, 4'096}}}));
  job_queue queue;
  auto wide = job("wide");
  wide.context_tokens_min = 100'000;
  const auto refused = queue.push(wide, index, t0);
  expect_refused(refused, errc::no_provider);
  EXPECT_NE(refused.error().message.find("with a context window of at least 100000 tokens"), std::string::npos)
      << refused.error().message;
  EXPECT_NE(refused.error().message.find("shorten the prompt or max_tokens"), std::string::npos) << refused.error().message;

  ASSERT_TRUE(index.list({"large", level_for_score(0), 0, false, {{"m", 900, 900, 4, 131'072}}}));
  ASSERT_TRUE(queue.push(wide, index, t0));
  auto narrow = job("narrow", "m", 0, t0 + 1);
  narrow.context_tokens_min = 4'096;  // just fits the small window
  ASSERT_TRUE(queue.push(narrow, index, t0 + 1));
  assign_options cheapest;
  cheapest.policy = selection_policy::cheapest;
  auto assigned = queue.pop_assignable(index, cheapest, t0 + 2);
  ASSERT_EQ(assigned.size(), 2u);
  EXPECT_EQ(assigned[0].job.job_id, "wide");
  EXPECT_EQ(assigned[0].provider_id, "large") << "the cheaper one's window is too small";
  EXPECT_EQ(assigned[1].provider_id, "small");

  // A window nobody listed is not checked; the last provider whose window may hold a queued job
  // going takes the job out as unservable.
  ASSERT_TRUE(index.list({"unknown", level_for_score(0), 0, false, {{"m", 100, 100, 4, 0}}}));
  auto huge = job("huge", "m", 0, t0 + 3);
  huge.context_tokens_min = 1'000'000;
  ASSERT_TRUE(queue.push(huge, index, t0 + 3));
  ASSERT_TRUE(index.unlist("unknown"));
  EXPECT_EQ(ids(queue.take_unservable(index)), std::vector<std::string>{"huge"});
}

TEST(job_queue, a_free_job_never_goes_to_a_provider_its_user_owns_and_holds_up_no_other_job) {
  selection_index index;
  provider_listing own{"own", level_for_score(0), 0, false, {{"m", 100, 100, 4}}};
  own.owner_user_id = "olga";
  ASSERT_TRUE(index.list(own));
  job_queue queue;
  auto olgas = job("olgas");
  olgas.owner_excluded = "olga";
  const auto refused = queue.push(olgas, index, t0);
  expect_refused(refused, errc::no_provider);
  EXPECT_NE(refused.error().message.find("owned by its user olga"), std::string::npos) << refused.error().message;
  EXPECT_NE(refused.error().message.find("use a premium key"), std::string::npos) << refused.error().message;

  // Another provider online but busy: olga's job waits for it in every policy, and another
  // user's job behind it takes olga's idle one.
  ASSERT_TRUE(index.list({"other", level_for_score(0), 0, false, {{"m", 100, 100, 1}}}));
  ASSERT_TRUE(index.job_started("other"));
  for (const auto policy : {selection_policy::qmesh, selection_policy::cheapest, selection_policy::fastest,
                            selection_policy::power_of_two}) {
    SCOPED_TRACE(to_string(policy));
    assign_options how;
    how.policy = policy;
    ASSERT_TRUE(queue.push(olgas, index, t0));
    ASSERT_TRUE(queue.push(job("bobs", "m", 0, t0 + 1), index, t0 + 1));
    auto assigned = queue.pop_assignable(index, how, t0 + 2);
    ASSERT_EQ(assigned.size(), 1u);
    EXPECT_EQ(assigned[0].job.job_id, "bobs");
    EXPECT_EQ(assigned[0].provider_id, "own");
    ASSERT_TRUE(index.job_finished("other"));
    assigned = queue.pop_assignable(index, how, t0 + 3);
    ASSERT_EQ(assigned.size(), 1u);
    EXPECT_EQ(assigned[0].job.job_id, "olgas");
    EXPECT_EQ(assigned[0].provider_id, "other");
    ASSERT_TRUE(index.job_finished("own"));
  }

  // The other provider leaving takes olga's queued job out as unservable.
  ASSERT_TRUE(index.job_finished("other"));
  ASSERT_TRUE(index.job_started("other"));
  ASSERT_TRUE(queue.push(olgas, index, t0 + 4));
  ASSERT_TRUE(index.unlist("other"));
  EXPECT_EQ(ids(queue.take_unservable(index)), std::vector<std::string>{"olgas"});
  // A job without the exclusion (a premium job of hers) may go to her own provider.
  olgas.owner_excluded.clear();
  ASSERT_TRUE(queue.push(olgas, index, t0 + 5));
  const auto assigned = queue.pop_assignable(index, {}, t0 + 6);
  ASSERT_EQ(assigned.size(), 1u);
  EXPECT_EQ(assigned[0].provider_id, "own");
}

}  // namespace
}  // namespace gpustream::domain
