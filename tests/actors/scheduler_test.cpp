// The scheduler with the whole runtime under test_coordinator: a job's full lifecycle with its
// ledger group, immediate rejections (no provider, funds, quota), deadlines, failover when a
// provider goes away, cancellation, and a seeded random walk checking the invariants after every
// step and that no job is left stuck.

#include "actors/runtime.hpp"

#include <caf/send.hpp>

#include <gtest/gtest.h>

#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "domain/ledger.hpp"
#include "domain/selection.hpp"
#include "domain/verifier.hpp"
#include "events/codec.hpp"
#include "storage/fault_injector.hpp"
#include "tests/actors/actor_testing.hpp"

namespace gpustream::actors {
namespace {

/// Offers received by simulated provider sessions, by provider id.
using offer_log = std::map<std::string, std::vector<job_offer>>;

/// Cancels received by simulated provider sessions: job ids by provider id.
using cancel_log = std::map<std::string, std::vector<std::string>>;

provider_session::behavior_type session_behavior(provider_session::pointer,
                                                 std::shared_ptr<offer_log> log,
                                                 std::shared_ptr<cancel_log> cancels,
                                                 std::string provider_id) {
  return {
      [log, provider_id](offer_atom, const job_offer& offer) { (*log)[provider_id].push_back(offer); },
      [cancels, provider_id](cancel_atom, const std::string& job_id) {
        (*cancels)[provider_id].push_back(job_id);
      },
  };
}

class scheduler_test : public testing::deterministic_fixture {
 protected:
  scheduler_test() : scheduler_test(100'000) {}

  explicit scheduler_test(std::size_t jobs_live_max, storage::store_options store_options = buffered(),
                          std::size_t jobs_queued_max = domain::job_queue_options{}.jobs_queued_max) {
    auto store = storage::event_store::open(directory_.path(), std::move(store_options));
    EXPECT_TRUE(store) << store.error().message;
    runtime_options options;
    options.store.wait_for_each_append = true;
    options.persistence.clock_us = clock_.function();
    options.scheduler.queue_wait_max = std::chrono::seconds(30);
    options.scheduler.tick_interval = std::chrono::seconds(1);
    options.scheduler.users.free_tokens_per_day = 10'000;
    options.scheduler.jobs_live_max = jobs_live_max;
    options.scheduler.queue.jobs_queued_max = jobs_queued_max;
    rt_ = start_runtime(system_, std::move(store.value()), std::move(options));
    for (const caf::actor& a : {caf::actor_cast<caf::actor>(rt_.scheduler),
                                caf::actor_cast<caf::actor>(rt_.users),
                                caf::actor_cast<caf::actor>(rt_.providers),
                                caf::actor_cast<caf::actor>(rt_.jobs),
                                caf::actor_cast<caf::actor>(rt_.campaigns),
                                caf::actor_cast<caf::actor>(rt_.payouts),
                                caf::actor_cast<caf::actor>(rt_.ledger)}) {
      stop_at_teardown(a);
    }
    store_ = rt_.store;
    run();
  }

  static storage::store_options buffered() {
    storage::store_options options;
    options.mode = storage::durability::buffered;
    return options;
  }

  template <class Registry, class Command>
  void command(const Registry& registry, const std::string& id, Command c) {
    auto reply = ask<command_reply>(registry, id, std::move(c));
    ASSERT_TRUE(reply) << describe(reply.error());
  }

  /// p1 with one slot of llama-8b, premium alice, her j0 offered on that slot and j1 queued behind.
  void j0_on_p1s_one_slot_and_j1_queued() {
    bring_online("p1", "llama-8b", 1);
    create_user("alice", events::user_tier::premium, 50'000'000);
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "alice", true)));
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
    ASSERT_EQ(counts().queued, 1u);
  }

  /// Creates, connects and lists a provider serving `model` at `price` per Mtok (in and out).
  void bring_online(const std::string& id, const std::string& model, std::uint32_t slots,
                    std::int64_t price = 1'000'000) {
    bring_online(id, model, slots, price, price);
  }

  /// The same with its own input and output prices per Mtok.
  void bring_online(const std::string& id, const std::string& model, std::uint32_t slots, std::int64_t input_price,
                    std::int64_t output_price) {
    command(rt_.providers, id, domain::provider::command{domain::provider::create{
                                   id, "owner-" + id, "gpu box " + id, {}}});
    command(rt_.providers, id,
            domain::provider::command{domain::provider::connect{{}, events::backend_kind::openai,
                                                                "http://127.0.0.1:1234/v1", "t"}});
    command(rt_.providers, id,
            domain::provider::command{domain::provider::advertise{
                {events::model_offer{model, 8192, "Q4_K_M", input_price, output_price, slots}}}});
    link_again(id);
  }

  /// The provider's agent links (again): a new session, listed with the provider's current state.
  void link_again(const std::string& id) {
    auto state = ask<domain::provider::state>(rt_.providers, id, state_atom::value);
    ASSERT_TRUE(state);
    auto session = system_.spawn(session_behavior, offers_, cancels_, id);
    stop_at_teardown(session);
    sessions_[id] = session;
    self_->send(rt_.scheduler, online_atom::value,
                provider_online{domain::listing_for(state.value(), *clock_.now_us), session});
    run();
  }

  /// The provider's agent offers `models` now, over the link it has.
  void advertise_again(const std::string& id, std::vector<events::model_offer> models) {
    command(rt_.providers, id, domain::provider::command{domain::provider::advertise{std::move(models)}});
    auto state = ask<domain::provider::state>(rt_.providers, id, state_atom::value);
    ASSERT_TRUE(state);
    self_->send(rt_.scheduler, online_atom::value,
                provider_online{domain::listing_for(state.value(), *clock_.now_us), sessions_.at(id)});
    run();
  }

  void create_user(const std::string& id, events::user_tier tier, std::int64_t deposit_micros) {
    command(rt_.users, id, domain::user::command{domain::create_user{id, "User " + id, tier}});
    if (deposit_micros > 0) {
      auto deposit = ask<command_reply>(
          rt_.ledger, domain::ledger::command{domain::user_deposit("d-" + id, id, deposit_micros)});
      ASSERT_TRUE(deposit) << describe(deposit.error());
    }
  }

  std::map<std::string, provider_session> sessions_;  ///< each provider's latest link, by id

  /// p1 (1 USD per million tokens) and p2 (3 USD) online, dave's premium job j1 produced 100 tokens
  /// on the first it went to and was offered to the other; (first, second), empty when that failed.
  std::pair<std::string, std::string> j1_failed_over_after_100_tokens() {
    bring_online("p1", "llama-8b", 1);
    bring_online("p2", "llama-8b", 1, 3'000'000);
    create_user("dave", events::user_tier::premium, 50'000'000);
    if (!ask<job_accepted>(rt_.scheduler, request("j1", "dave", true))) return {};
    const std::string first = job("j1").provider_id;
    if (!ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), first)) return {};
    if (!ask<job_ended>(rt_.scheduler, job_failure{"j1", first, domain::job_fault::provider, 100, "dropped"})) return {};
    const std::string second = job("j1").provider_id;
    if (second == first) return {};
    return {first, second};
  }

  /// Providers p1 and p2 of one slot each, one of them running (started) job j0 of premium user
  /// dave; returns its id, empty when that failed.
  std::string two_providers_one_busy() {
    bring_online("p1", "llama-8b", 1);
    bring_online("p2", "llama-8b", 1);
    create_user("dave", events::user_tier::premium, 50'000'000);
    if (!ask<job_accepted>(rt_.scheduler, request("j0", "dave", true))) return {};
    const std::string busy = job("j0").provider_id;
    if (!ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), busy)) return {};
    return busy;
  }

  /// Job `id` starts on `provider_id` and completes there (10 tokens).
  void complete(const std::string& id, const std::string& provider_id) {
    ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, id, provider_id));
    ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{id, provider_id, 10, 10, 1000, 2'000'000, 10, 40}));
  }

  /// Dave's premium job j1, started on the provider other than `busy` (see two_providers_one_busy);
  /// returns that provider, empty when that failed.
  std::string start_j1_beside(const std::string& busy) {
    if (!ask<job_accepted>(rt_.scheduler, request("j1", "dave", true))) return {};
    const std::string other = job("j1").provider_id;
    if (other.empty() || other == busy) return {};
    if (!ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), other)) return {};
    return other;
  }

  /// j1 streams on one of two providers while the other, running j0 at `load_percent`, begins to
  /// drain (its agent stops: it finishes j0 and takes nothing new): returns the one j1 streams
  /// on, empty when that failed.
  std::string start_j1_beside_a_draining_other(std::uint32_t load_percent) {
    const std::string busy = two_providers_one_busy();
    const std::string streaming = busy.empty() ? std::string() : start_j1_beside(busy);
    if (streaming.empty()) return {};
    self_->send(rt_.scheduler, load_atom::value, busy,
                domain::load_report{.load_percent = load_percent, .health_percent = 100, .draining = true});
    run();
    return streaming;
  }

  /// j1 broke off after 5 tokens on one of two providers and went to the other once its slot
  /// freed: returns (the one it broke off on, the one it continues on), empty when that failed.
  std::pair<std::string, std::string> j1_continued_on_the_other() {
    const std::string busy = two_providers_one_busy();
    const std::string broken = busy.empty() ? std::string() : start_j1_beside(busy);
    if (broken.empty()) return {};
    if (!ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"})) return {};
    if (!ask<job_ended>(rt_.scheduler, job_result{"j0", busy, 10, 10, 1000, 2'000'000, 10, 40})) return {};
    run();
    if (job("j1").provider_id != busy) return {};
    return {broken, busy};
  }

  /// Three answers of 100 tokens in a millisecond each on `provider_id` (one of dave's premium
  /// jobs each): unreasonably fast, so it is suspended; when the suspension ends (0: it was not).
  std::int64_t suspend_by_fast_answers(const std::string& provider_id) {
    for (const std::string id : {"fast-1", "fast-2", "fast-3"}) {
      if (!ask<job_accepted>(rt_.scheduler, request(id, "dave", true))) return 0;
      if (!ask<std::uint64_t>(rt_.scheduler, started_atom::value, id, provider_id)) return 0;
      if (!ask<job_ended>(rt_.scheduler, job_result{id, provider_id, 100, 100, 1'000, 2'000, 100, 400})) return 0;
      run();
    }
    auto state = ask<domain::provider::state>(rt_.providers, provider_id, state_atom::value);
    if (!state || !domain::is_suspended(state.value(), *clock_.now_us)) return 0;
    return state.value().suspended_until_at_us;
  }

  /// Provider p1 (4 slots) online, suspended by dave's fast answers, then offline; when its
  /// suspension ends (0: it was not suspended).
  std::int64_t p1_suspended_and_offline() {
    bring_online("p1", "llama-8b", 4);
    create_user("dave", events::user_tier::premium, 50'000'000);
    const auto until = suspend_by_fast_answers("p1");
    self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
    run();
    return until;
  }

  /// At `until` (a suspension's end) the scheduler's tick lifts it: job `job_id` of dave goes to
  /// `provider_id`.
  void expect_served_again_at(std::int64_t until, const std::string& provider_id, const std::string& job_id) {
    *clock_.now_us = until;
    sched_.clock().advance_time(std::chrono::seconds(1));
    run();
    const std::size_t offered = (*offers_)[provider_id].size();
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request(job_id, "dave", true)));
    run();
    ASSERT_EQ((*offers_)[provider_id].size(), offered + 1);
    EXPECT_EQ((*offers_)[provider_id].back().job_id, job_id);
  }

  job_request request(const std::string& job_id, const std::string& user_id, bool premium,
                      const std::string& model = "llama-8b") {
    return job_request{.job_id = job_id,
                       .user_id = user_id,
                       .model = model,
                       .quality = events::quality_tier::standard,
                       .prompt_tokens = 1000,
                       .max_tokens = 500,
                       .max_price_micros = premium ? 10'000'000 : 0,
                       .premium = premium,
                       .conversation_id = {},
                       .contribution_score = 0};
  }

  domain::job_state job(const std::string& id) {
    auto state = ask<domain::job_state>(rt_.jobs, id, state_atom::value);
    EXPECT_TRUE(state);
    return state ? state.value() : domain::job_state{};
  }

  std::int64_t balance(const std::string& account) {
    auto balances = ask<ledger_aggregate::answer>(rt_.ledger, ledger_aggregate::query{.accounts = {account}});
    EXPECT_TRUE(balances);
    return balances ? balances.value().balances.at(account) : -1;
  }

  scheduler_counts counts() {
    auto c = ask<scheduler_counts>(rt_.scheduler, count_atom::value);
    EXPECT_TRUE(c);
    return c ? c.value() : scheduler_counts{};
  }

  /// Feeds the whole log (the store must be closed) to the domain verifier; fails the test with
  /// the first violation.
  std::unique_ptr<domain::domain_verifier> verify_log() {
    storage::store_options options;
    options.read_only = true;
    auto store = storage::event_store::open(directory_.path(), options);
    EXPECT_TRUE(store) << store.error().message;
    if (!store) return nullptr;
    auto verifier = std::make_unique<domain::domain_verifier>();
    std::string problem;
    auto scanned = store.value()->scan(1, [&](const events::record_view& r)
                                              -> expected<void, storage::error> {
      auto event = events::decode_payload(r.type, r.payload);
      if (!event) return unexpected{storage::error{storage::errc::corruption, event.error().message}};
      auto applied = verifier->apply(r.stream, r.version, r.position, event.value());
      if (!applied) {
        problem = domain::describe(applied.error());
        return unexpected{storage::error{storage::errc::corruption, problem}};
      }
      return {};
    });
    EXPECT_TRUE(scanned) << scanned.error().message;
    auto finished = verifier->finish();
    EXPECT_TRUE(finished) << domain::describe(finished.error());
    if (!scanned || !finished) return nullptr;
    verified_ = finished.value();
    return verifier;
  }

  /// The last event of job `id`'s stream (the store must be closed).
  events::event last_job_event(const std::string& id) {
    storage::store_options options;
    options.read_only = true;
    auto store = storage::event_store::open(directory_.path(), options);
    EXPECT_TRUE(store) << store.error().message;
    if (!store) return {};
    const std::string stream = "job-" + id;
    auto version = store.value()->stream_version(stream);
    EXPECT_TRUE(version && version.value() > 0) << stream;
    if (!version || version.value() == 0) return {};
    auto records = store.value()->read_stream(stream, version.value(), version.value(), 1);
    EXPECT_TRUE(records && records->size() == 1u) << stream;
    if (!records || records->size() != 1u) return {};
    const auto& r = records->front();
    auto event = events::decode_payload(r.type, {reinterpret_cast<const std::byte*>(r.payload.data()), r.payload.size()});
    EXPECT_TRUE(event) << event.error().message;
    return event ? event.value() : events::event{};
  }

  static domain::errc refusal_code(const caf::error& e) {
    auto d = domain_error_of(e);
    EXPECT_TRUE(d) << describe(e);
    return d ? d->code : domain::errc::invalid_argument;
  }

  testing::manual_clock clock_;
  domain::verify_counts verified_;  ///< what the last verify_log counted
  std::shared_ptr<offer_log> offers_ = std::make_shared<offer_log>();
  std::shared_ptr<cancel_log> cancels_ = std::make_shared<cancel_log>();
  runtime rt_;
};

TEST_F(scheduler_test, a_premium_job_runs_its_whole_lifecycle_and_settles_in_the_ledger) {
  bring_online("p1", "llama-8b", 2);
  create_user("alice", events::user_tier::premium, 50'000'000);
  auto accepted = ask<job_accepted>(rt_.scheduler, request("j1", "alice", true));
  ASSERT_TRUE(accepted) << describe(accepted.error());
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  EXPECT_EQ((*offers_)["p1"][0].job_id, "j1");
  EXPECT_EQ(job("j1").status, domain::job_status::assigned);

  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"),
                                 std::string("p1")));
  EXPECT_EQ(job("j1").status, domain::job_status::streaming);
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 400, 400, 200'000, 4'000'000, 400, 400 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  const auto job_actors = ask<std::size_t>(rt_.jobs, count_atom::value);
  ASSERT_TRUE(job_actors);
  EXPECT_EQ(job_actors.value(), 0u) << "the ended job's actor stops at once, not after idle_max";
  // 1000 prompt + 400 completion tokens at 1 USD per Mtok, standard tier (100%): 1400 micros.
  EXPECT_EQ(ended.value().gross_micros, 1400);
  EXPECT_EQ(ended.value().platform_fee_micros, 140);
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1400);
  EXPECT_EQ(balance("provider-p1"), 1400 - 140);
  EXPECT_EQ(balance("platform"), 140);
  auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
  ASSERT_TRUE(provider);
  EXPECT_EQ(provider.value().jobs_succeeded, 1u);
  const auto c = counts();
  EXPECT_EQ(c.queued + c.running, 0u);
  EXPECT_EQ(c.side_effects_failed, 0u);
}

TEST_F(scheduler_test, an_answer_counted_past_max_tokens_completes_and_is_billed_the_maximum) {
  bring_online("p1", "llama-8b", 2);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));  // max_tokens 500
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  // The relay counted 520 chunks (a backend that ignored max_tokens, or split tokens).
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 520, 500, 200'000, 4'000'000, 520, 520 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::completed);
  EXPECT_EQ(ended.value().gross_micros, 1500);  // 1000 prompt + 500, not 520
  EXPECT_EQ(ended.value().completion_tokens, 500u) << "the client's usage says what it is billed";
  EXPECT_EQ(ended.value().prompt_tokens, 1000u);
  EXPECT_EQ(job("j1").completion_tokens, 500u);
  EXPECT_TRUE((*cancels_)["p1"].empty()) << "the provider finished it";
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1500);
  // An answer the relay cut off while its provider still streamed: the same bill, and the
  // provider is told to stop.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j2"), std::string("p1")));
  job_result cut{"j2", "p1", 641, 0, 200'000, 4'000'000, 641, 641};
  cut.cut = true;
  auto cut_ended = ask<job_ended>(rt_.scheduler, cut);
  ASSERT_TRUE(cut_ended) << describe(cut_ended.error());
  EXPECT_EQ(cut_ended.value().status, domain::job_status::completed);
  EXPECT_EQ(cut_ended.value().gross_micros, 1500);
  run();
  EXPECT_EQ((*cancels_)["p1"], std::vector<std::string>{"j2"});
}

TEST_F(scheduler_test, a_job_no_provider_can_serve_is_rejected_at_once_and_recorded) {
  bring_online("p1", "llama-8b", 2);
  create_user("bob", events::user_tier::free, 0);
  auto refused = ask<job_accepted>(rt_.scheduler, request("j1", "bob", false, "mistral-7b"));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  const auto state = job("j1");
  EXPECT_EQ(state.status, domain::job_status::failed);
  EXPECT_EQ(state.failure, events::failure_reason::no_provider);
}

TEST_F(scheduler_test, a_tier_above_every_online_provider_level_is_rejected) {
  bring_online("p1", "llama-8b", 2);  // a new provider: Bronze, below ultra's Gold minimum
  create_user("bob", events::user_tier::free, 0);
  auto ultra = request("j1", "bob", false);
  ultra.quality = events::quality_tier::ultra;
  auto refused = ask<job_accepted>(rt_.scheduler, ultra);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)))
      << "standard (Bronze) is served";
}

TEST_F(scheduler_test, a_premium_job_beyond_the_balance_is_refused_before_it_runs) {
  bring_online("p1", "llama-8b", 2);
  create_user("carol", events::user_tier::premium, 1000);  // quote: 1500 tokens x 1 USD/Mtok
  auto refused = ask<job_accepted>(rt_.scheduler, request("j1", "carol", true));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::insufficient_funds);
  EXPECT_EQ(job("j1").failure, events::failure_reason::insufficient_funds);
  EXPECT_TRUE((*offers_)["p1"].empty());
  EXPECT_EQ(counts().users_holding, 0u) << "a refused job leaves no hold behind, not even an empty one";
}

TEST_F(scheduler_test, quotes_are_held_so_concurrent_premium_jobs_cannot_overspend) {
  bring_online("p1", "llama-8b", 4);
  create_user("dave", events::user_tier::premium, 2000);  // one quote of 1500 fits, two do not
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  auto second = ask<job_accepted>(rt_.scheduler, request("j2", "dave", true));
  ASSERT_FALSE(second);
  EXPECT_EQ(refusal_code(second.error()), domain::errc::insufficient_funds);
  EXPECT_EQ(counts().users_holding, 1u);
}

TEST_F(scheduler_test, a_max_price_below_every_online_providers_is_refused_at_once_and_one_above_is_kept) {
  // p1 asks 1 USD per million tokens, p2 3 USD.
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1, 3'000'000);
  create_user("dave", events::user_tier::premium, 50'000'000);
  auto low = request("j1", "dave", true);
  low.max_price_micros = 999'999;
  auto refused = ask<job_accepted>(rt_.scheduler, low);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  EXPECT_NE(describe(refused.error()).find("priced at most 999999 micro-USD per million tokens"), std::string::npos)
      << describe(refused.error());
  EXPECT_EQ(job("j1").failure, events::failure_reason::no_provider);
  // At 1 USD: only p1, and its quote (1,000 + 500 tokens at 1 USD per million) is all that is held.
  for (const std::string id : {"j2", "j3"}) {
    auto capped = request(id, "dave", true);
    capped.max_price_micros = 1'000'000;
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, capped)) << id;
  }
  EXPECT_EQ(job("j2").provider_id, "p1");
  EXPECT_EQ(job("j3").status, domain::job_status::queued) << "p2 is above its max price, though free";
  // A free user's job keeps to its max price too.
  create_user("erin", events::user_tier::free, 0);
  auto free_job = request("j4", "erin", false);
  free_job.max_price_micros = 1'000'000;
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, free_job));
  EXPECT_EQ(job("j4").status, domain::job_status::queued);
}

TEST_F(scheduler_test, a_free_job_goes_only_to_a_provider_priced_within_what_the_free_tier_pays) {
  const std::int64_t most = scheduler_options{}.free_tier_price_micros_per_mtok_max;
  bring_online("dear", "llama-8b", 1, most + 1);
  create_user("erin", events::user_tier::free, 0);
  auto refused = ask<job_accepted>(rt_.scheduler, request("j1", "erin", false));
  ASSERT_FALSE(refused) << "the platform would pay it out of the free tier's subsidy";
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  EXPECT_NE(describe(refused.error()).find("priced at most 10000000 micro-USD per million tokens (the most the free tier pays)"),
            std::string::npos)
      << describe(refused.error());
  create_user("dave", events::user_tier::premium, 50'000'000);
  auto premium = request("j2", "dave", true);
  premium.max_price_micros = 0;  // any price
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, premium)) << "a premium client pays it";
  EXPECT_EQ(job("j2").provider_id, "dear");
  bring_online("at-most", "llama-8b", 1, most);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "erin", false)));
  EXPECT_EQ(job("j3").provider_id, "at-most");
}

TEST_F(scheduler_test, a_job_goes_only_to_a_provider_whose_window_holds_it) {
  bring_online("p1", "llama-8b", 1);  // an 8,192-token window
  create_user("dave", events::user_tier::premium, 50'000'000);
  auto wide = request("j1", "dave", true);
  wide.context_tokens_min = 8'193;
  auto refused = ask<job_accepted>(rt_.scheduler, wide);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  EXPECT_NE(describe(refused.error()).find("with a context window of at least 8193 tokens"), std::string::npos)
      << describe(refused.error());
  auto fits = request("j2", "dave", true);
  fits.context_tokens_min = 8'192;
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, fits));
  EXPECT_EQ(job("j2").provider_id, "p1");
}

TEST_F(scheduler_test, a_job_continued_after_a_failover_needs_a_window_for_its_answer_so_far_too) {
  bring_online("wide", "llama-8b", 1);  // an 8,192-token window
  command(rt_.providers, "narrow", domain::provider::command{domain::provider::create{"narrow", "owner", "box", {}}});
  command(rt_.providers, "narrow",
          domain::provider::command{domain::provider::connect{{}, events::backend_kind::openai, "http://127.0.0.1:1234/v1", "t"}});
  command(rt_.providers, "narrow",
          domain::provider::command{domain::provider::advertise{
              {events::model_offer{"llama-8b", 1'200, "Q4_K_M", 1'000'000, 1'000'000, 1}}}});
  ASSERT_NO_FATAL_FAILURE(link_again("narrow"));
  create_user("dave", events::user_tier::premium, 50'000'000);
  // Both idle and alike: j0 goes to the smaller id, j1 to the other.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "dave", true)));
  ASSERT_EQ(job("j0").provider_id, "narrow");
  auto j1 = request("j1", "dave", true);
  j1.context_tokens_min = 1'001;  // its 1,000-token prompt, and no max_tokens of the client's
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, j1));
  ASSERT_EQ(job("j1").provider_id, "wide");
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("wide")));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), std::string("narrow")));
  auto freed = ask<job_ended>(rt_.scheduler, job_result{"j0", "narrow", 10, 10, 1'000, 2'000'000, 10, 40});
  ASSERT_TRUE(freed) << describe(freed.error());
  // 400 tokens in, "wide" fails: the continuation carries 1,400 tokens, past the narrow window.
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", "wide", domain::job_fault::provider, 400, "backend died"});
  ASSERT_TRUE(moved) << describe(moved.error());
  run();
  EXPECT_EQ(job("j1").provider_id, "wide") << "the narrow window, free and not the one it failed on, cannot hold it";
  EXPECT_EQ(job("j1").attempt, 2u);
}

TEST_F(scheduler_test, a_provider_online_after_admission_at_a_higher_price_does_not_get_the_job) {
  // j1's hold is its quote at the prices online when it came, 1,500 micros: a provider asking ten
  // times as much, online later, would bill it past what its user's balance holds for it.
  bring_online("p1", "llama-8b", 1);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "dave", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  ASSERT_EQ(job("j1").status, domain::job_status::queued) << "p1's one slot is j0's";
  bring_online("p2", "llama-8b", 1, 10'000'000);
  EXPECT_EQ(job("j1").status, domain::job_status::queued) << "p2 is above j1's hold";
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), std::string("p1")));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", "p1", 500, 500, 1000, 2'000'000, 500, 500 * 4}));
  ASSERT_EQ(job("j1").status, domain::job_status::assigned);
  EXPECT_EQ(job("j1").provider_id, "p1");
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 500, 500, 1000, 2'000'000, 500, 500 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().gross_micros, 1'500);
  // A job that came after p2 was online is quoted at p2's price and may go there.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "dave", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "dave", true)));
  EXPECT_EQ(job("j2").status, domain::job_status::assigned);
  EXPECT_EQ(job("j3").status, domain::job_status::assigned);
}

TEST_F(scheduler_test, a_job_of_the_providers_own_owner_earns_it_no_points) {
  bring_online("p1", "llama-8b", 4);
  create_user("owner-p1", events::user_tier::premium, 50'000'000);
  create_user("alice", events::user_tier::premium, 50'000'000);
  const auto score = [&] {
    auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
    EXPECT_TRUE(provider);
    return provider ? provider->score : -1;
  };
  for (const auto& [job, user] : {std::pair{"j1", "owner-p1"}, std::pair{"j2", "alice"}}) {
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request(job, user, true)));
    ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string(job), std::string("p1")));
    ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{job, "p1", 100, 100, 200'000, 2'200'000, 100, 400}));
    run();
    if (std::string(job) == "j1") {
      EXPECT_EQ(score(), 0) << "its owner's own job";
    }
  }
  EXPECT_GT(score(), 0) << "another user's job";
}

TEST_F(scheduler_test, a_free_job_never_goes_to_a_provider_its_user_owns) {
  // The subsidy pays for free jobs: a free user's job on their own GPU would pay them for nothing.
  bring_online("p1", "llama-8b", 4);
  create_user("owner-p1", events::user_tier::free, 0);
  auto refused = ask<job_accepted>(rt_.scheduler, request("j1", "owner-p1", false));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
  EXPECT_NE(describe(refused.error()).find("owned by its user owner-p1"), std::string::npos)
      << describe(refused.error());
  EXPECT_EQ(job("j1").failure, events::failure_reason::no_provider);

  // With another provider online, the job goes there although p1 (idle, first by id) is the
  // policy's choice for anyone else's job.
  bring_online("p2", "llama-8b", 4);
  create_user("erin", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "owner-p1", false)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "erin", false)));
  run();
  EXPECT_EQ(job("j2").provider_id, "p2");
  EXPECT_EQ(job("j3").provider_id, "p1");

  // Their provider lost, neither of olga's jobs moves to her own: the one begun (j2) broke off
  // with no other provider left, the other (j4) has none to go to.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j4", "owner-p1", false)));
  run();
  EXPECT_EQ(job("j4").provider_id, "p2");
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j2"), std::string("p2")));
  self_->send(rt_.scheduler, offline_atom::value, std::string("p2"));
  run();
  EXPECT_EQ(job("j2").status, domain::job_status::failed);
  EXPECT_EQ(job("j2").failure, events::failure_reason::all_providers_failed);
  EXPECT_EQ(job("j4").status, domain::job_status::failed);
  EXPECT_EQ(job("j4").failure, events::failure_reason::no_provider);
}

TEST_F(scheduler_test, a_free_user_over_the_daily_quota_is_refused) {
  bring_online("p1", "llama-8b", 8);
  create_user("erin", events::user_tier::free, 0);
  for (int i = 0; i < 6; ++i) {  // 6 x 1500 tokens of 10,000 admitted, then recorded as used
    const std::string id = "j" + std::to_string(i);
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request(id, "erin", false)));
    ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, id, std::string("p1")));
    ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{id, "p1", 500, 500, 1000, 2'000'000, 500, 500 * 4}));
  }
  auto refused = ask<job_accepted>(rt_.scheduler, request("j6", "erin", false));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::quota_exceeded);
  EXPECT_EQ(job("j6").failure, events::failure_reason::quota_exceeded);
  // Free jobs are paid by the subsidy: 6 x 1500 micros.
  EXPECT_EQ(balance("subsidy"), -9000);
}

TEST_F(scheduler_test, free_jobs_running_at_once_cannot_together_pass_the_daily_quota) {
  // Each job may use 1,500 tokens (prompt and max_tokens) of 10,000: six are admitted at once,
  // the seventh would pass the quota if they all used their maximum.
  bring_online("p1", "llama-8b", 8);
  create_user("erin", events::user_tier::free, 0);
  for (int i = 0; i < 6; ++i) ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j" + std::to_string(i), "erin", false)));
  auto refused = ask<job_accepted>(rt_.scheduler, request("j6", "erin", false));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::quota_exceeded);
  EXPECT_NE(describe(refused.error()).find("9000 held by jobs in progress"), std::string::npos)
      << describe(refused.error());
  // One ends having used 1,100 (1,000 prompt + 100): its hold of 1,500 gives way to that, and
  // 10,000 - 1,100 - 5 x 1,500 = 1,400 is not enough for another 1,500.
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), std::string("p1")));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", "p1", 100, 100, 1000, 2'000'000, 100, 100 * 4}));
  auto still = ask<job_accepted>(rt_.scheduler, request("j7", "erin", false));
  ASSERT_FALSE(still);
  EXPECT_NE(describe(still.error()).find("1100 tokens used today + 7500 held"), std::string::npos)
      << describe(still.error());
  // A job that ends with nothing used releases its hold: 10,000 - 1,100 - 4 x 1,500 = 2,900
  // admits one more.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 0}));
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j8", "erin", false)));
}

TEST_F(scheduler_test, a_queued_job_fails_at_its_deadline_rather_than_waiting_forever) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)));
  EXPECT_EQ(counts().queued, 1u) << "p1 has one slot: j2 waits";
  *clock_.now_us += 31'000'000;
  sched_.clock().advance_time(std::chrono::seconds(1));
  run();
  EXPECT_EQ(job("j2").status, domain::job_status::failed);
  EXPECT_EQ(job("j2").failure, events::failure_reason::deadline_exceeded);
  EXPECT_EQ(counts().queued, 0u);
}

TEST_F(scheduler_test, a_provider_lost_mid_job_hands_it_to_another_and_the_last_one_leaving_fails_the_queue) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  bring_online("p2", "llama-8b", 1);
  self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
  run();
  ASSERT_EQ((*offers_)["p2"].size(), 1u);
  EXPECT_EQ((*offers_)["p2"][0].attempt, 2u);
  EXPECT_EQ(job("j1").provider_id, "p2");

  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)));
  EXPECT_EQ(counts().queued, 1u);
  self_->send(rt_.scheduler, offline_atom::value, std::string("p2"));
  run();
  EXPECT_EQ(job("j2").failure, events::failure_reason::no_provider);
  EXPECT_EQ(job("j1").status, domain::job_status::failed) << "its only provider is gone";
  EXPECT_EQ(counts().queued + counts().running, 0u);
}

TEST_F(scheduler_test, a_provider_whose_link_is_lost_gets_no_new_job_and_its_unstarted_ones_move_on_before_it_goes_offline) {
  bring_online("p1", "llama-8b", 2);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));
  ASSERT_EQ((*offers_)["p1"].size(), 2u);
  // j1's answer is done (its result waits for its ad); j2's offer died with the link.
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  bring_online("p2", "llama-8b", 2);
  self_->send(rt_.scheduler, link_lost_atom::value, std::string("p1"));
  run();
  ASSERT_EQ((*offers_)["p2"].size(), 1u) << "j2 moves on without waiting for the offline notice";
  EXPECT_EQ((*offers_)["p2"][0].job_id, "j2");
  EXPECT_EQ((*offers_)["p2"][0].attempt, 2u);
  EXPECT_EQ(job("j1").provider_id, "p1") << "a started job waits for its result";
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true)));
  EXPECT_EQ((*offers_)["p1"].size(), 2u) << "no new job for a link that is gone";
  ASSERT_EQ((*offers_)["p2"].size(), 2u);
  EXPECT_EQ((*offers_)["p2"][1].job_id, "j3");
  // j1's result arrives, then the offline notice: j1 completes on p1 and nothing else moves.
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 100, 100, 1000, 5000, 100, 100 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::completed);
  self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  EXPECT_EQ((*offers_)["p2"].size(), 2u);
  EXPECT_EQ(counts().running, 2u);
}

TEST_F(scheduler_test, a_provider_linking_again_while_its_lost_link_waits_for_a_result_keeps_that_job_counted) {
  bring_online("p1", "llama-8b", 2);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  self_->send(rt_.scheduler, link_lost_atom::value, std::string("p1"));
  run();
  // The agent links again before j1's result arrives: p1 has one free slot of two, not two.
  ASSERT_NO_FATAL_FAILURE(link_again("p1"));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true)));
  ASSERT_EQ((*offers_)["p1"].size(), 2u) << "j2 takes the free slot; j3 waits for j1's";
  EXPECT_EQ((*offers_)["p1"][1].job_id, "j2");
  EXPECT_EQ(counts().queued, 1u);
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 100, 100, 1000, 5000, 100, 100 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  ASSERT_EQ((*offers_)["p1"].size(), 3u) << "j1's slot, freed, goes to j3";
  EXPECT_EQ((*offers_)["p1"][2].job_id, "j3");
}

TEST_F(scheduler_test, a_job_ending_as_its_provider_goes_offline_and_links_again_frees_no_slot_of_the_new_link) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string other = start_j1_beside(busy);
  ASSERT_FALSE(other.empty());
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "dave", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "dave", true)));
  EXPECT_EQ(counts().queued, 2u) << "both providers are full";
  // j1's result comes, and while its end is being recorded its provider's link drops and links
  // again: j2 takes the new link's one slot, and j1's end then frees none of it.
  auto state = ask<domain::provider::state>(rt_.providers, other, state_atom::value);
  ASSERT_TRUE(state);
  auto session = system_.spawn(session_behavior, offers_, cancels_, other);
  stop_at_teardown(session);
  self_->send(rt_.scheduler, job_result{"j1", other, 10, 10, 1'000, 2'000'000, 10, 40});
  self_->send(rt_.scheduler, offline_atom::value, other);
  self_->send(rt_.scheduler, online_atom::value, provider_online{domain::listing_for(state.value(), *clock_.now_us), session});
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  EXPECT_EQ(job("j2").provider_id, other);
  EXPECT_EQ(job("j3").status, domain::job_status::queued) << "the provider has one slot, j2's";
  EXPECT_EQ(counts().queued, 1u);
}

TEST_F(scheduler_test, a_provider_that_never_sends_a_first_token_loses_the_job_to_another) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  bring_online("p2", "llama-8b", 1);
  // 30 s, and 1 s to read the 1,000-token prompt.
  *clock_.now_us += 30'900'000;
  sched_.clock().advance_time(std::chrono::seconds(1));
  run();
  EXPECT_EQ(job("j1").provider_id, "p1") << "30.9 s is within first_token_wait_max and the prompt's reading";
  *clock_.now_us += 200'000;
  sched_.clock().advance_time(std::chrono::seconds(1));
  run();
  EXPECT_EQ(job("j1").provider_id, "p2");
  EXPECT_EQ(job("j1").attempt, 2u);
  ASSERT_EQ((*offers_)["p2"].size(), 1u);
  auto p1 = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
  ASSERT_TRUE(p1);
  EXPECT_EQ(p1.value().counters.aborted_jobs, 1u) << "the stall counts against p1";
}

TEST_F(scheduler_test, a_long_prompt_has_time_to_be_read_before_its_first_token_is_overdue) {
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("dave", events::user_tier::premium, 50'000'000);
  auto long_prompt = request("j1", "dave", true);
  long_prompt.prompt_tokens = 100'000;
  auto accepted = ask<job_accepted>(rt_.scheduler, long_prompt);
  ASSERT_TRUE(accepted) << describe(accepted.error());
  const std::string first = job("j1").provider_id;
  // Far past the 30 s a short prompt gets, within the 130 s this one does (30 s + 1 ms a token).
  *clock_.now_us += 129'000'000;
  sched_.clock().advance_time(std::chrono::seconds(1));
  run();
  EXPECT_EQ(job("j1").provider_id, first);
  EXPECT_EQ(job("j1").attempt, 1u);
  *clock_.now_us += 2'000'000;
  sched_.clock().advance_time(std::chrono::seconds(1));
  run();
  EXPECT_NE(job("j1").provider_id, first);
  EXPECT_EQ(job("j1").attempt, 2u);
}

TEST_F(scheduler_test, a_job_failing_before_its_first_token_on_every_attempt_fails_naming_attempts_not_providers) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  // Nothing produced: the one provider is asked again, up to the job's attempts.
  const auto attempts = domain::job_options{}.attempts_max;
  for (std::uint32_t i = 1; i < attempts; ++i) {
    auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::provider, 0, "refused"});
    ASSERT_TRUE(moved) << describe(moved.error());
    ASSERT_EQ(moved.value().status, domain::job_status::queued) << i;
  }
  auto ended = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::provider, 0, "refused"});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::failed);
  EXPECT_NE(ended.value().detail.find("every attempt failed (" + std::to_string(attempts) +
                                      " attempts, the last on provider p1)"),
            std::string::npos)
      << ended.value().detail;
  EXPECT_EQ(job("j1").failure, events::failure_reason::all_providers_failed);
}

TEST_F(scheduler_test, a_request_two_backends_refuse_fails_with_their_words_and_counts_against_neither) {
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  const std::string first = job("j1").provider_id;
  // One backend's 400 may be its own quirk: another provider is asked.
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", first, domain::job_fault::request, 0,
                                                         "backend http_status 400: unknown field"});
  ASSERT_TRUE(moved) << describe(moved.error());
  ASSERT_EQ(moved.value().status, domain::job_status::queued);
  run();
  const std::string second = job("j1").provider_id;
  ASSERT_NE(second, first);
  // A second refusal: the request is the client's to mend. Its words may be longer than a job's
  // record takes (the link carries 4 KiB): they are cut, not the end refused.
  auto ended = ask<job_ended>(rt_.scheduler, job_failure{"j1", second, domain::job_fault::request, 0,
                                                         "backend http_status 400: unknown field " +
                                                             std::string(1'200, 'x')});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::failed);
  EXPECT_LE(ended.value().detail.size(), domain::job_options{}.message_length_max);
  EXPECT_TRUE(ended.value().detail.ends_with("x …")) << ended.value().detail;
  EXPECT_EQ(ended.value().failure, events::failure_reason::upstream_error);
  EXPECT_NE(ended.value().detail.find("refused the request: backend http_status 400: unknown field"),
            std::string::npos)
      << ended.value().detail;
  EXPECT_EQ(job("j1").failure, events::failure_reason::upstream_error);
  EXPECT_EQ(job("j1").attempt, 2u);
  run();
  for (const char* id : {"p1", "p2"}) {
    auto provider = ask<domain::provider::state>(rt_.providers, std::string(id), state_atom::value);
    ASSERT_TRUE(provider);
    EXPECT_EQ(provider.value().counters.aborted_jobs, 0u) << id;
  }
}

TEST_F(scheduler_test, a_provider_linking_again_without_a_model_fails_the_jobs_queued_for_it_at_once) {
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "alice", true)));  // on p1's one slot
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));  // behind it
  ASSERT_EQ(counts().queued, 1u);
  // Its agent restarts serving another model, and links again (its new link takes over).
  command(rt_.providers, "p1",
          domain::provider::command{domain::provider::advertise{
              {events::model_offer{"other", 8192, "Q4_K_M", 1'000'000, 1'000'000, 1}}}});
  link_again("p1");
  EXPECT_EQ(counts().queued, 0u);
  EXPECT_EQ(job("j1").status, domain::job_status::failed);
  EXPECT_EQ(job("j1").failure, events::failure_reason::no_provider);
}

TEST_F(scheduler_test, the_slot_of_a_job_cancelled_before_its_answer_began_goes_to_the_next_job_at_once) {
  ASSERT_NO_FATAL_FAILURE(j0_on_p1s_one_slot_and_j1_queued());
  // Its client leaves before a first token: nothing billed, and no tick comes meanwhile.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j0", events::cancelled_by::client, 0}));
  run();
  EXPECT_EQ(counts().queued, 0u) << "j1 waited for the next tick";
  EXPECT_EQ(job("j1").provider_id, "p1");
}

TEST_F(scheduler_test, a_cancel_naming_a_provider_ends_only_a_job_running_there) {
  // The relay cancels a job a provider reports that nobody waits for; a provider reporting
  // another's job (a guessed id, or an attempt's before a failover) must not end it.
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  const std::string runs_on = job("j1").provider_id;
  const std::string other = runs_on == "p1" ? "p2" : "p1";
  auto refused = ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 0, other});
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::not_found);
  EXPECT_EQ(job("j1").status, domain::job_status::assigned);
  EXPECT_EQ(counts().running, 1u);
  EXPECT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 0, runs_on}))
      << "the provider it runs on may";
  EXPECT_EQ(job("j1").status, domain::job_status::cancelled);
}

TEST_F(scheduler_test, the_slot_of_a_failed_job_goes_to_the_next_job_at_once) {
  ASSERT_NO_FATAL_FAILURE(j0_on_p1s_one_slot_and_j1_queued());
  // The only backend refuses j0's request: it fails, and no tick comes meanwhile.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j0", "p1", domain::job_fault::request, 0, "bad request"}));
  run();
  EXPECT_EQ(job("j0").status, domain::job_status::failed);
  EXPECT_EQ(counts().queued, 0u) << "j1 waited for the next tick";
  EXPECT_EQ(job("j1").provider_id, "p1");
}

TEST_F(scheduler_test, the_slot_of_a_job_whose_answer_broke_off_with_no_provider_left_goes_to_the_next_job_at_once) {
  ASSERT_NO_FATAL_FAILURE(j0_on_p1s_one_slot_and_j1_queued());
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), std::string("p1")));
  // Its answer breaks off on p1, and no other provider may continue it: it fails (its slot was
  // freed before it was failed), and no tick comes meanwhile.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j0", "p1", domain::job_fault::provider, 5, "backend died"}));
  run();
  EXPECT_EQ(job("j0").status, domain::job_status::failed);
  EXPECT_EQ(counts().queued, 0u) << "j1 waited for the next tick";
  EXPECT_EQ(job("j1").provider_id, "p1");
}

TEST_F(scheduler_test, jobs_lost_with_a_providers_link_count_against_it_once_per_loss) {
  // Ten answers running when its link drops once: ten faults would suspend it (aborted_jobs_max).
  bring_online("p1", "llama-8b", 12);
  create_user("alice", events::user_tier::premium, 50'000'000);
  const auto aborted = [&] {
    auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
    EXPECT_TRUE(provider);
    return provider ? provider->counters.aborted_jobs : 0u;
  };
  const auto lose_link = [&](int from, int to) {
    for (int i = from; i < to; ++i) {
      const auto id = "j" + std::to_string(i);
      auto moved = ask<job_ended>(rt_.scheduler, job_failure{id, "p1", domain::job_fault::provider, 0, "link lost", true});
      ASSERT_TRUE(moved) << describe(moved.error());
    }
    run();
  };
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j" + std::to_string(i), "alice", true)));
  ASSERT_EQ(job("j9").provider_id, "p1");
  lose_link(0, 10);
  EXPECT_EQ(aborted(), 1u);
  auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
  ASSERT_TRUE(provider);
  EXPECT_FALSE(domain::is_suspended(provider.value(), *clock_.now_us)) << "one dropped link suspended its provider";
  // Its next link's loss is another fault; a job's own failure is one each.
  link_again("p1");
  ASSERT_EQ(job("j0").provider_id, "p1");
  lose_link(0, 2);
  EXPECT_EQ(aborted(), 2u);
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j5", "p1", domain::job_fault::provider, 0, "500"}));
  run();
  EXPECT_EQ(aborted(), 3u);
}

TEST_F(scheduler_test, a_provider_lost_while_a_refused_request_fails_counts_no_fault_against_it) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_EQ(job("j1").provider_id, "p1");
  // The link reports the backend's refusal and is lost right after: both come before the job's
  // end is recorded.
  auto ended = self_->request(rt_.scheduler, caf::infinite,
                              job_failure{"j1", "p1", domain::job_fault::request, 0, "backend http_status 400: bad"});
  self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
  run();
  auto answer = collect<job_ended>(ended);
  ASSERT_TRUE(answer) << describe(answer.error());
  EXPECT_EQ(answer.value().failure, events::failure_reason::upstream_error);
  EXPECT_EQ(job("j1").failure, events::failure_reason::upstream_error);
  auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
  ASSERT_TRUE(provider);
  EXPECT_EQ(provider.value().counters.aborted_jobs, 0u) << "the client's bad request is not the provider's fault";
}

TEST_F(scheduler_test, a_request_refused_again_by_the_same_backend_waits_for_another_one) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  const std::string refusing = job("j1").provider_id;
  ASSERT_NE(refusing, busy);
  // The other provider is busy: the job goes back to the one that refused, which refuses again.
  for (std::uint32_t attempt = 1; attempt <= 2; ++attempt) {
    auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", refusing, domain::job_fault::request, 0, "400"});
    ASSERT_TRUE(moved) << describe(moved.error());
    EXPECT_EQ(moved.value().status, domain::job_status::queued) << "one backend's word, twice, is still one";
    run();
    ASSERT_EQ(job("j1").provider_id, refusing) << attempt;
  }
  // Once the other provider is free, the job goes there; its refusal is the second backend's.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", busy, 10, 10, 1000, 2'000'000, 10, 40}));
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", refusing, domain::job_fault::request, 0, "400"});
  ASSERT_TRUE(moved) << describe(moved.error());
  run();
  ASSERT_EQ(job("j1").provider_id, busy);
  auto ended = ask<job_ended>(rt_.scheduler, job_failure{"j1", busy, domain::job_fault::request, 0, "400"});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::failed);
  EXPECT_EQ(ended.value().failure, events::failure_reason::upstream_error);
}

TEST_F(scheduler_test, a_request_refused_by_the_only_backend_of_its_model_fails_at_once) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  auto ended = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::request, 0,
                                                         "backend http_status 400: bad grammar"});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::failed);
  EXPECT_EQ(ended.value().failure, events::failure_reason::upstream_error);
  EXPECT_EQ(job("j1").attempt, 1u) << "the same backend is not asked again";
  EXPECT_EQ((*offers_)["p1"].size(), 1u);
}

TEST_F(scheduler_test, an_offer_the_provider_declines_goes_to_another_without_counting_against_it) {
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  const std::string first = job("j1").provider_id;
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", first, domain::job_fault::declined, 0,
                                                         "the provider is at capacity (1 jobs)"});
  ASSERT_TRUE(moved) << describe(moved.error());
  EXPECT_EQ(moved.value().status, domain::job_status::queued);
  run();
  EXPECT_NE(job("j1").provider_id, first);
  EXPECT_EQ(job("j1").attempt, 2u);
  auto provider = ask<domain::provider::state>(rt_.providers, first, state_atom::value);
  ASSERT_TRUE(provider);
  EXPECT_EQ(provider.value().counters.aborted_jobs, 0u);
  EXPECT_TRUE((*cancels_)[first].empty()) << "it never took the job: nothing to stop";
}

TEST_F(scheduler_test, a_provider_that_declined_gets_no_offer_until_it_has_news_while_the_job_waits_for_another) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  for (const std::string news : {"a heartbeat", "a job of the other one ending"}) {
    SCOPED_TRACE(news);
    const std::string job_id = news == "a heartbeat" ? "j1" : "j2";
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request(job_id, "dave", true)));
    const std::string declining = job(job_id).provider_id;
    ASSERT_NE(declining, busy);
    const std::size_t offered = (*offers_)[declining].size();
    auto moved = ask<job_ended>(rt_.scheduler, job_failure{job_id, declining, domain::job_fault::declined, 0,
                                                           "the provider is at capacity (1 jobs)"});
    ASSERT_TRUE(moved) << describe(moved.error());
    run();
    // The other provider is busy: the job waits rather than go straight back to the one that
    // declined it, spending its attempts there.
    EXPECT_EQ(job(job_id).status, domain::job_status::queued);
    EXPECT_EQ((*offers_)[declining].size(), offered);
    EXPECT_EQ(counts().queued, 1u);
    if (news == "a heartbeat") {
      self_->send(rt_.scheduler, load_atom::value, declining, domain::load_report{0, 100});
      run();
      ASSERT_EQ(job(job_id).provider_id, declining) << "its heartbeat says it has room again";
      EXPECT_EQ(job(job_id).attempt, 2u);
      ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, job_id, declining));
      ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{job_id, declining, 10, 10, 1000, 2'000'000, 10, 40}));
    } else {
      ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", busy, 10, 10, 1000, 2'000'000, 10, 40}));
      run();
      EXPECT_EQ(job(job_id).provider_id, busy) << "the first free slot";
      EXPECT_EQ(job(job_id).attempt, 2u);
    }
  }
}

TEST_F(scheduler_test, offers_declined_by_a_full_provider_spend_none_of_the_jobs_attempts) {
  // One provider, one slot, declining (its agent's slots are full of work another coordinator
  // or a probe gave it) more times than a job has attempts: each heartbeat offers the job again,
  // and when it takes the job at last, the job runs rather than fail "every attempt failed".
  bring_online("p1", "llama-8b", 1);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  const std::uint32_t declines = domain::job_options{}.attempts_max + 2;
  for (std::uint32_t i = 0; i < declines; ++i) {
    ASSERT_EQ(job("j1").provider_id, "p1") << "offer " << i + 1;
    auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::declined, 0,
                                                           "the provider is at capacity (1 jobs)"});
    ASSERT_TRUE(moved) << describe(moved.error());
    run();
    ASSERT_EQ(job("j1").status, domain::job_status::queued) << "offer " << i + 1;
    self_->send(rt_.scheduler, load_atom::value, std::string("p1"), domain::load_report{0, 100});
    run();
  }
  EXPECT_EQ(job("j1").attempt, declines + 1);
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  auto done = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 1000, 2'000'000, 10, 40});
  ASSERT_TRUE(done) << describe(done.error());
  EXPECT_EQ(done.value().status, domain::job_status::completed);
}

TEST_F(scheduler_test, an_answer_that_broke_off_waits_for_another_provider_rather_than_going_back_to_its_own) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string broken = start_j1_beside(busy);
  ASSERT_FALSE(broken.empty());
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"});
  ASSERT_TRUE(moved) << describe(moved.error());
  run();
  // Its slot is free at once, yet the answer it broke does not go back to it.
  EXPECT_EQ((*offers_)[broken].size(), 1u);
  EXPECT_EQ(job("j1").status, domain::job_status::queued);
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", busy, 10, 10, 1000, 2'000'000, 10, 40}));
  run();
  EXPECT_EQ(job("j1").provider_id, busy) << "it continues where a slot frees on another provider";
  EXPECT_EQ(job("j1").attempt, 2u);
  ASSERT_FALSE((*offers_)[busy].empty());
  EXPECT_EQ((*offers_)[busy].back().tokens_so_far, 5u);
}

TEST_F(scheduler_test, an_answer_that_broke_off_and_was_then_declined_still_does_not_go_back) {
  const auto [broken, busy] = j1_continued_on_the_other();
  ASSERT_FALSE(broken.empty());
  // The other provider declines it untried: j1 waits for it rather than go back where it broke.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", busy, domain::job_fault::declined, 5,
                                                        "the provider is at capacity (1 jobs)"}));
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::queued);
  EXPECT_EQ((*offers_)[broken].size(), 1u);
  self_->send(rt_.scheduler, load_atom::value, busy, domain::load_report{0, 100});
  run();
  EXPECT_EQ(job("j1").provider_id, busy);
  EXPECT_EQ(job("j1").attempt, 3u);
}

TEST_F(scheduler_test, an_answer_continued_on_the_last_provider_waits_when_that_one_declines_it) {
  const auto [broken, busy] = j1_continued_on_the_other();
  ASSERT_FALSE(broken.empty());
  // The provider it broke off on leaves; the one left declines the offer untried (it is full):
  // the answer did not break off there, and it may take it once it has room.
  self_->send(rt_.scheduler, offline_atom::value, broken);
  run();
  auto declined = ask<job_ended>(rt_.scheduler, job_failure{"j1", busy, domain::job_fault::declined, 5,
                                                            "the provider is at capacity (1 jobs)"});
  ASSERT_TRUE(declined) << describe(declined.error());
  EXPECT_EQ(declined.value().status, domain::job_status::queued) << declined.value().detail;
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::queued);
  self_->send(rt_.scheduler, load_atom::value, busy, domain::load_report{0, 100});
  run();
  EXPECT_EQ(job("j1").provider_id, busy);
  EXPECT_EQ(job("j1").attempt, 3u);
}

TEST_F(scheduler_test, an_answer_that_broke_off_does_not_wait_for_a_draining_provider) {
  const std::string broken = start_j1_beside_a_draining_other(0);
  ASSERT_FALSE(broken.empty());
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"}));
  run();
  EXPECT_EQ(job("j1").provider_id, broken) << "no other provider may take it: back rather than wait for nothing";
  EXPECT_EQ(job("j1").attempt, 2u);
}

TEST_F(scheduler_test, an_answer_waiting_for_the_only_other_provider_fails_once_that_one_drains) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string broken = start_j1_beside(busy);
  ASSERT_FALSE(broken.empty());
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"}));
  self_->send(rt_.scheduler, offline_atom::value, broken);
  run();
  ASSERT_EQ(job("j1").status, domain::job_status::queued) << "busy may take it on once j0 ends";
  // Its agent stops: it finishes j0 and takes nothing new, so the answer would wait for its drain.
  self_->send(rt_.scheduler, load_atom::value, busy,
              domain::load_report{.load_percent = 100, .health_percent = 100, .draining = true});
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::failed);
  EXPECT_EQ(job("j1").failure, events::failure_reason::all_providers_failed);
}

TEST_F(scheduler_test, an_answer_whose_provider_goes_offline_fails_at_once_when_the_only_other_provider_drains) {
  const std::string broken = start_j1_beside_a_draining_other(100);
  ASSERT_FALSE(broken.empty());
  // Its link is lost mid-answer, then its offline notice comes: nobody will take the answer on.
  self_->send(rt_.scheduler, link_lost_atom::value, broken);
  self_->send(rt_.scheduler, offline_atom::value, broken);
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::failed);
  EXPECT_EQ(job("j1").failure, events::failure_reason::all_providers_failed);
}

TEST_F(scheduler_test, an_answer_lost_with_its_providers_link_fails_at_once_when_the_only_other_provider_drains) {
  // The relay's order: the link's loss, the failures of its jobs, then the offline notice. The
  // failure must not count on the lost provider taking the answer back (it used to queue the
  // job, which then waited out the drain or its deadline).
  const std::string broken = start_j1_beside_a_draining_other(100);
  ASSERT_FALSE(broken.empty());
  self_->send(rt_.scheduler, link_lost_atom::value, broken);
  run();
  auto lost = ask<job_ended>(rt_.scheduler, job_failure{.job_id = "j1",
                                                        .provider_id = broken,
                                                        .fault = domain::job_fault::provider,
                                                        .tokens_so_far = 5,
                                                        .message = "the provider's link was lost",
                                                        .with_link = true});
  ASSERT_TRUE(lost) << describe(lost.error());
  EXPECT_EQ(lost.value().status, domain::job_status::failed) << lost.value().detail;
  run();
  EXPECT_EQ(job("j1").failure, events::failure_reason::all_providers_failed);
}

TEST_F(scheduler_test, an_answer_that_broke_off_goes_back_at_once_when_the_only_other_provider_leaves_idle) {
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 2);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "dave", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  ASSERT_EQ(job("j0").provider_id, "p1");
  ASSERT_EQ(job("j1").provider_id, "p2");
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p2")));
  // p1 declines j0, which goes to p2: p1 runs nothing and takes nothing until it has news.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j0", "p1", domain::job_fault::declined, 0,
                                                        "the provider is at capacity (1 jobs)"}));
  run();
  ASSERT_EQ(job("j0").provider_id, "p2");
  // j1 breaks off on p2 and waits for p1, which may take work later.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", "p2", domain::job_fault::provider, 5, "backend died"}));
  run();
  ASSERT_EQ(job("j1").status, domain::job_status::queued);
  // p1 goes, with no job of its own to requeue: j1 goes back to p2 now, not at the next tick.
  self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
  run();
  EXPECT_EQ(job("j1").provider_id, "p2");
  EXPECT_EQ(job("j1").attempt, 2u);
}

TEST_F(scheduler_test, an_answer_that_broke_off_goes_back_to_its_provider_when_no_other_can_take_it_any_more) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string broken = start_j1_beside(busy);
  ASSERT_FALSE(broken.empty());
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"}));
  run();
  ASSERT_EQ(job("j1").status, domain::job_status::queued);
  self_->send(rt_.scheduler, offline_atom::value, busy);
  run();
  EXPECT_EQ(job("j1").provider_id, broken) << "the other provider left: rather than fail, j1 goes back";
  EXPECT_EQ((*offers_)[broken].size(), 2u);
}

TEST_F(scheduler_test, a_job_given_a_provider_just_before_its_deadline_runs_though_recorded_after_it) {
  bring_online("p1", "llama-8b", 1);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "dave", true)));
  ASSERT_EQ(job("j2").status, domain::job_status::queued);
  const std::int64_t deadline = job("j2").deadline_at_us;
  command(rt_.providers, "p2", domain::provider::command{domain::provider::create{"p2", "owner-p2", "gpu box p2", {}}});
  command(rt_.providers, "p2",
          domain::provider::command{domain::provider::connect{{}, events::backend_kind::openai,
                                                              "http://127.0.0.1:1234/v1", "t"}});
  command(rt_.providers, "p2",
          domain::provider::command{domain::provider::advertise{
              {events::model_offer{"llama-8b", 8192, "Q4_K_M", 1'000'000, 1'000'000, 1}}}});
  auto state = ask<domain::provider::state>(rt_.providers, std::string("p2"), state_atom::value);
  ASSERT_TRUE(state);
  auto session = system_.spawn(session_behavior, offers_, cancels_, std::string("p2"));
  stop_at_teardown(session);
  run();
  // p2 links a microsecond before j2's deadline: the scheduler gives it j2 then, and the job's
  // actor records that a microsecond later, at the deadline.
  *clock_.now_us = deadline - 1;
  self_->send(rt_.scheduler, online_atom::value, provider_online{domain::listing_for(state.value(), *clock_.now_us), session});
  ASSERT_TRUE(sched_.try_run_once());
  *clock_.now_us = deadline;
  run();
  EXPECT_EQ(job("j2").status, domain::job_status::assigned);
  EXPECT_EQ(job("j2").provider_id, "p2");
  ASSERT_EQ((*offers_)["p2"].size(), 1u);
  EXPECT_TRUE((*cancels_)["p2"].empty()) << "the offer stands";
}

TEST_F(scheduler_test, a_conversation_returns_to_the_provider_its_last_answer_completed_on) {
  bring_online("p1", "llama-8b", 2);
  bring_online("p2", "llama-8b", 2);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "dave", true)));
  ASSERT_EQ(job("j0").provider_id, "p1") << "both idle: the tie goes to the smaller id";
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j0"), std::string("p1")));
  auto first_turn = request("j1", "dave", true);
  first_turn.conversation_id = "conv-1";
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, first_turn));
  ASSERT_EQ(job("j1").provider_id, "p2") << "the idle one";
  ASSERT_NO_FATAL_FAILURE(complete("j1", "p2"));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", "p1", 10, 10, 1000, 2'000'000, 10, 40}));
  // Both idle again: a job of no conversation goes to p1, the conversation's next turn to p2.
  auto next_turn = request("j2", "dave", true);
  next_turn.conversation_id = "conv-1";
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, next_turn));
  EXPECT_EQ(job("j2").provider_id, "p2") << "where its prompt cache is";
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "dave", true)));
  EXPECT_EQ(job("j3").provider_id, "p1");
  // Another user's conversation of the same id is not theirs: it goes where routing sends it.
  create_user("erin", events::user_tier::premium, 50'000'000);
  ASSERT_NO_FATAL_FAILURE(complete("j2", "p2"));
  ASSERT_NO_FATAL_FAILURE(complete("j3", "p1"));
  auto same_id = request("j4", "erin", true);
  same_id.conversation_id = "conv-1";
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, same_id));
  EXPECT_EQ(job("j4").provider_id, "p1") << "both idle: the tie goes to the smaller id";
}

TEST_F(scheduler_test, a_job_back_in_the_queue_keeps_its_place_before_jobs_that_came_after_it) {
  bring_online("p1", "llama-8b", 1);
  create_user("dave", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  *clock_.now_us += 10'000'000;
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "dave", true)));
  *clock_.now_us += 10'000'000;
  // p1 declines j1 untried, then has room again: j1, queued first, goes first.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::declined, 0,
                                                        "the provider is at capacity (1 jobs)"}));
  run();
  ASSERT_EQ(job("j1").status, domain::job_status::queued);
  self_->send(rt_.scheduler, load_atom::value, std::string("p1"), domain::load_report{0, 100});
  run();
  ASSERT_EQ((*offers_)["p1"].size(), 2u);
  EXPECT_EQ((*offers_)["p1"].back().job_id, "j1");
  EXPECT_EQ(job("j2").status, domain::job_status::queued);
}

TEST_F(scheduler_test, a_draining_provider_gets_no_offer_while_its_jobs_finish_and_the_job_waits_for_another) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string draining = busy == "p1" ? "p2" : "p1";
  domain::load_report stopping{.load_percent = 0, .health_percent = 100, .draining = true};
  self_->send(rt_.scheduler, load_atom::value, draining, stopping);
  run();
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  run();
  // Its agent would decline every offer, each costing the job an attempt: the job waits.
  EXPECT_EQ(job("j1").status, domain::job_status::queued);
  EXPECT_TRUE((*offers_)[draining].empty());
  // The busy one's slot frees: the job goes there, on its first attempt.
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j0", busy, 10, 10, 1000, 2'000'000, 10, 40}));
  run();
  EXPECT_EQ(job("j1").provider_id, busy);
  EXPECT_EQ(job("j1").attempt, 1u);
  EXPECT_TRUE((*offers_)[draining].empty());
}

TEST_F(scheduler_test, a_provider_suspended_while_linked_gets_no_new_job_until_its_suspension_ends) {
  bring_online("p1", "llama-8b", 4);
  create_user("dave", events::user_tier::premium, 50'000'000);
  // Its link stays up: the job running there when it is suspended finishes there.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("running", "dave", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("running"), std::string("p1")));
  const auto until = suspend_by_fast_answers("p1");
  ASSERT_GT(until, 0);
  const std::size_t offered = (*offers_)["p1"].size();
  auto refused = ask<job_accepted>(rt_.scheduler, request("j4", "dave", true));
  ASSERT_FALSE(refused) << "its only provider is suspended: refused at once rather than offered to it";
  EXPECT_EQ((*offers_)["p1"].size(), offered);
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"running", "p1", 10, 10, 1'000, 2'000'000, 10, 40}));
  ASSERT_NO_FATAL_FAILURE(expect_served_again_at(until, "p1", "j5"));
}

TEST_F(scheduler_test, a_provider_suspended_and_linked_again_before_its_suspension_ends_serves_again_once_it_does) {
  const auto until = p1_suspended_and_offline();
  ASSERT_GT(until, 0);
  // Its agent links again while it is suspended (the gateway refuses such a hello; the race of a
  // suspension recorded between a hello's checks and its listing ends the same way).
  ASSERT_NO_FATAL_FAILURE(link_again("p1"));
  ASSERT_FALSE(ask<job_accepted>(rt_.scheduler, request("j4", "dave", true))) << "still suspended";
  ASSERT_NO_FATAL_FAILURE(expect_served_again_at(until, "p1", "j5"));
}

TEST_F(scheduler_test, a_listing_read_while_suspended_but_listed_after_the_suspension_ended_takes_work) {
  const auto until = p1_suspended_and_offline();
  ASSERT_GT(until, 0);
  auto state = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
  ASSERT_TRUE(state);
  const auto listing = domain::listing_for(state.value(), *clock_.now_us);
  ASSERT_TRUE(listing.suspended);
  // The listing reaches the scheduler only after the suspension ended (a busy mailbox).
  *clock_.now_us = until;
  auto session = system_.spawn(session_behavior, offers_, cancels_, std::string("p1"));
  stop_at_teardown(session);
  self_->send(rt_.scheduler, online_atom::value, provider_online{listing, session});
  run();
  const std::size_t offered = (*offers_)["p1"].size();
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j5", "dave", true)));
  run();
  ASSERT_EQ((*offers_)["p1"].size(), offered + 1);
}

TEST_F(scheduler_test, a_completion_bills_the_prompt_as_the_backend_counted_it_never_above_the_estimate) {
  bring_online("p1", "llama-8b", 4);  // 1 USD per million tokens, in and out
  create_user("dave", events::user_tier::premium, 50'000'000);
  // Each job's prompt was estimated at 1,000 tokens; the backend counted 800, 1,200, nothing, or
  // less than a quarter of the estimate (a backend leaving out its cached tokens), which is no count.
  const std::vector<std::pair<std::uint32_t, std::uint32_t>> reported_billed{
      {800, 800}, {1'200, 1'000}, {0, 1'000}, {250, 250}, {249, 1'000}};
  for (std::size_t i = 0; i < reported_billed.size(); ++i) {
    const auto [reported, billed] = reported_billed[i];
    const std::string id = "j" + std::to_string(i);
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request(id, "dave", true)));
    ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, id, std::string("p1")));
    job_result result{id, "p1", 50, 50, 1000, 2'000'000, 50, 200};
    result.prompt_tokens_reported = reported;
    auto ended = ask<job_ended>(rt_.scheduler, result);
    ASSERT_TRUE(ended) << describe(ended.error());
    EXPECT_EQ(ended.value().gross_micros, billed + 50) << reported;
    EXPECT_EQ(ended.value().prompt_tokens, billed) << reported;
    EXPECT_EQ(job(id).prompt_tokens_billed, billed) << reported;
    EXPECT_EQ(job(id).prompt_tokens, 1'000u) << "the estimate stays as submitted";
  }
  // A free job counts the same prompt against the quota as it bills.
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("free", "bob", false)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("free"), std::string("p1")));
  job_result result{"free", "p1", 50, 50, 1000, 2'000'000, 50, 200};
  result.prompt_tokens_reported = 700;
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, result));
  const auto end = std::get<events::job_completed>(last_job_event("free"));
  EXPECT_EQ(end.prompt_tokens_billed, 700u);
  EXPECT_EQ(end.free_tokens, 700u + 50u);
  ASSERT_TRUE(verify_log());
  EXPECT_EQ(verified_.free_usage_unrecorded, 0u) << "bob's usage is recorded as the end counts it";
}

TEST_F(scheduler_test, an_answer_that_failed_over_pays_each_provider_its_own_tokens_at_its_own_price) {
  const auto [first, second] = j1_failed_over_after_100_tokens();
  ASSERT_FALSE(first.empty());
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), second));
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", second, 150, 150, 1000, 2'000'000, 150, 150 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  // The first provider's 100 tokens at its price; the second's prompt (1,000) and 50 tokens at its.
  const auto price = [&](const std::string& id) -> std::int64_t { return id == "p1" ? 1 : 3; };
  const std::int64_t first_gross = 100 * price(first);
  const std::int64_t second_gross = (1000 + 50) * price(second);
  EXPECT_EQ(ended.value().gross_micros, first_gross + second_gross);
  EXPECT_EQ(balance("user-dave"), 50'000'000 - first_gross - second_gross);
  EXPECT_EQ(balance("provider-" + first), first_gross - first_gross / 10);
  EXPECT_EQ(balance("provider-" + second), second_gross - second_gross / 10);
}

TEST_F(scheduler_test, a_cancel_after_a_failover_before_the_next_answer_began_pays_the_provider_that_produced) {
  const auto [first, second] = j1_failed_over_after_100_tokens();
  ASSERT_FALSE(first.empty());
  // Offered to the second, which has not sent a first token when the client leaves with 100.
  auto ended = ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 100});
  ASSERT_TRUE(ended) << describe(ended.error());
  const std::int64_t price = first == "p1" ? 1 : 3;
  const std::int64_t gross = (1000 + 100) * price;  // the prompt and the 100 tokens, at the first's price
  EXPECT_EQ(ended.value().gross_micros, gross);
  EXPECT_EQ(balance("user-dave"), 50'000'000 - gross);
  EXPECT_EQ(balance("provider-" + first), gross - gross / 10);
  EXPECT_EQ(balance("provider-" + second), 0) << "it never began the answer";
}

TEST_F(scheduler_test, a_cancel_that_overtakes_the_next_answers_start_pays_that_provider_its_tokens) {
  const auto [first, second] = j1_failed_over_after_100_tokens();
  ASSERT_FALSE(first.empty());
  // The client got 150 tokens, 50 of them from the second, whose `started` is still on its way.
  auto ended = ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 150});
  ASSERT_TRUE(ended) << describe(ended.error());
  const auto price = [&](const std::string& id) -> std::int64_t { return id == "p1" ? 1 : 3; };
  const std::int64_t first_gross = 100 * price(first);
  const std::int64_t second_gross = (1000 + 50) * price(second);
  EXPECT_EQ(ended.value().gross_micros, first_gross + second_gross);
  EXPECT_EQ(balance("provider-" + first), first_gross - first_gross / 10);
  EXPECT_EQ(balance("provider-" + second), second_gross - second_gross / 10);
}

TEST_F(scheduler_test, after_a_failover_the_rest_goes_only_to_a_provider_whose_quote_fits_what_is_left_of_the_hold) {
  // Alone at admission, p1 (1 USD per Mtok in, 3 out) sets the hold: 1,000 prompt + 500 tokens =
  // 2,500 micro-USD, all of dave's balance.
  bring_online("p1", "llama-8b", 1, 1'000'000, 3'000'000);
  create_user("dave", events::user_tier::premium, 2'500);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "dave", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  // Online since: p2 quotes the whole job at 1,400 (1.4 USD in, nothing out), p3 at 1,500 (1 and 1).
  bring_online("p2", "llama-8b", 1, 1'400'000, 0);
  bring_online("p3", "llama-8b", 1, 1'000'000, 1'000'000);
  // p1 produced 400 tokens (1,200) and dropped: 1,300 are left, for the prompt and 100 tokens.
  // p2 would bill 1,400 more (2,600 in all, past the hold); p3 bills 1,100.
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::provider, 400, "dropped"});
  ASSERT_TRUE(moved) << describe(moved.error());
  run();
  ASSERT_EQ(job("j1").provider_id, "p3");
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p3")));
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p3", 500, 500, 1000, 2'000'000, 500, 500 * 4});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().gross_micros, 1'200 + 1'100);
  EXPECT_EQ(balance("user-dave"), 2'500 - 2'300);
}

TEST_F(scheduler_test, an_answer_broken_off_continues_on_another_provider_never_on_the_same_one) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  // Alone, the provider the answer broke off on is not asked again: nothing is left.
  auto ended = ask<job_ended>(rt_.scheduler, job_failure{"j1", "p1", domain::job_fault::provider, 5, "dropped"});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::failed);
  EXPECT_NE(ended.value().detail.find("no other provider"), std::string::npos) << ended.value().detail;
  EXPECT_EQ((*offers_)["p1"].size(), 1u);
  EXPECT_EQ(job("j1").failure, events::failure_reason::all_providers_failed);

  // With another provider online, it goes there, with the tokens so far.
  bring_online("p2", "llama-8b", 1);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)));
  const std::string first = job("j2").provider_id;
  const std::string second = first == "p1" ? "p2" : "p1";
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j2"), first));
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j2", first, domain::job_fault::provider, 5, "dropped"});
  ASSERT_TRUE(moved) << describe(moved.error());
  EXPECT_EQ(moved.value().status, domain::job_status::queued);
  run();
  EXPECT_EQ(job("j2").provider_id, second);
  ASSERT_FALSE((*offers_)[second].empty());
  EXPECT_EQ((*offers_)[second].back().tokens_so_far, 5u);
  // The provider it failed on is told to stop it (the gateway fails a provider gone silent
  // mid-answer, which may still run it); declines and refusals need no such word.
  ASSERT_FALSE((*cancels_)["p1"].empty());
  EXPECT_EQ((*cancels_)["p1"].front(), "j1");
  ASSERT_FALSE((*cancels_)[first].empty());
  EXPECT_EQ((*cancels_)[first].back(), "j2");
}

TEST_F(scheduler_test, a_cancelled_job_bills_the_tokens_produced) {
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"),
                                 std::string("p1")));
  auto ended = ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 100});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::cancelled);
  EXPECT_EQ(ended.value().gross_micros, 1100);  // 1000 prompt + 100 produced
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1100);

  // Cancelled before its first token, a running job still bills its prompt.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j2"), std::string("p1")));
  auto early = ask<job_ended>(rt_.scheduler, job_cancel{"j2", events::cancelled_by::client, 0});
  ASSERT_TRUE(early) << describe(early.error());
  EXPECT_EQ(early.value().status, domain::job_status::cancelled);
  EXPECT_EQ(early.value().gross_micros, 1000);
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1100 - 1000);

  // Cancelled once assigned but before its provider started (the client left before the offer
  // reached it): no work was done, nothing is billed.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true)));
  ASSERT_EQ(job("j3").status, domain::job_status::assigned);
  auto unstarted = ask<job_ended>(rt_.scheduler, job_cancel{"j3", events::cancelled_by::client, 0});
  ASSERT_TRUE(unstarted) << describe(unstarted.error());
  EXPECT_EQ(unstarted.value().status, domain::job_status::cancelled);
  EXPECT_EQ(unstarted.value().gross_micros, 0);
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1100 - 1000);
  EXPECT_EQ(balance("provider-p1"), 900 + 990) << "nothing more for p1";
}

TEST_F(scheduler_test, a_jobs_end_records_the_bill_its_ledger_group_then_applies) {
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 400, 400, 1000, 2'000'000, 400, 400 * 4}));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j2"), std::string("p1")));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j2", events::cancelled_by::client, 30}));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true)));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j3", events::cancelled_by::client, 0}));
  auto transfers = ask<ledger_aggregate::answer>(rt_.ledger, ledger_aggregate::query{.transfer_prefix = "job-"});
  ASSERT_TRUE(transfers);
  close_store();

  // Each bill is exactly the group the ledger applied: its transfers, ids, accounts and amounts.
  auto expect_bill_applied = [&](const events::ledger_bill& bill, const std::string& group) {
    EXPECT_EQ(bill.group_id, group);
    std::size_t in_ledger = 0;
    for (const auto& [id, applied] : transfers.value().transfers) in_ledger += applied.group_id == group;
    EXPECT_EQ(bill.transfers.size(), in_ledger) << group;
    for (const auto& t : bill.transfers) {
      const auto applied = transfers.value().transfers.find(t.transfer_id);
      ASSERT_NE(applied, transfers.value().transfers.end()) << t.transfer_id;
      EXPECT_EQ(applied->second, (domain::ledger::applied_transfer{t.debit_account, t.credit_account,
                                                                   t.amount_micros, t.kind, t.reference, group}));
    }
  };
  const auto completed = std::get<events::job_completed>(last_job_event("j1"));
  ASSERT_EQ(completed.bill.transfers.size(), 2u) << "usage and platform fee";
  EXPECT_EQ(completed.bill.transfers[0].amount_micros, 1'400);  // 1,000 prompt + 400 tokens at 1 USD/Mtok
  expect_bill_applied(completed.bill, "job-j1");
  const auto cancelled = std::get<events::job_cancelled>(last_job_event("j2"));
  ASSERT_EQ(cancelled.bill.transfers.size(), 2u) << "free-tier subsidy and platform fee";
  EXPECT_EQ(cancelled.bill.transfers[0].kind, events::transfer_kind::free_tier_subsidy);
  expect_bill_applied(cancelled.bill, "job-j2");
  EXPECT_EQ(std::get<events::job_cancelled>(last_job_event("j3")).bill, events::ledger_bill{})
      << "a job cancelled before its provider started owes nothing";
  // The quota: what bob's end counts is his prompt and the tokens he got; premium ends count none.
  EXPECT_EQ(completed.free_tokens, 0u);
  EXPECT_EQ(cancelled.free_tokens, 1'000u + 30u);
  EXPECT_EQ(std::get<events::job_cancelled>(last_job_event("j3")).free_tokens, 0u);
  ASSERT_TRUE(verify_log());
  EXPECT_EQ(verified_.job_bills_unsettled, 0u);
  EXPECT_EQ(verified_.free_usage_unrecorded, 0u) << "bob's usage is recorded as his job's end counts it";
}

TEST_F(scheduler_test, a_job_cancelled_while_queued_after_a_failover_bills_the_tokens_its_client_got) {
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  // j0 takes one provider, j1 the other; j1 breaks off there after 5 tokens, and its provider
  // goes offline: j1 waits in the queue, the only other provider being busy.
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j0", "alice", true)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  const std::string first = job("j1").provider_id;
  ASSERT_NE(first, job("j0").provider_id);
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), first));
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", first, domain::job_fault::provider, 5, "dropped"});
  ASSERT_TRUE(moved) << describe(moved.error());
  self_->send(rt_.scheduler, offline_atom::value, first);
  run();
  ASSERT_EQ(job("j1").status, domain::job_status::queued);
  ASSERT_EQ(job("j1").tokens_so_far, 5u);
  const std::int64_t before = balance("user-alice");

  // The client walks away: the 5 tokens it got are recorded and billed to the provider that
  // produced them.
  auto ended = ask<job_ended>(rt_.scheduler, job_cancel{"j1", events::cancelled_by::client, 5});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended.value().status, domain::job_status::cancelled);
  EXPECT_EQ(ended.value().gross_micros, 1005);  // 1000 prompt + 5 produced
  EXPECT_EQ(job("j1").status, domain::job_status::cancelled);
  EXPECT_EQ(job("j1").completion_tokens, 5u);
  EXPECT_EQ(balance("user-alice"), before - 1005);
  EXPECT_GT(balance("provider-" + first), 0);
  EXPECT_EQ(counts().queued, 0u);
  EXPECT_EQ(counts().running, 1u) << "only j0 is left";
}

/// With `sync` durability and a store whose fsyncs can be made to fail.
class failing_store_scheduler_test : public scheduler_test {
 protected:
  failing_store_scheduler_test() : scheduler_test(100'000, with_faults(faults_)) {}

  static storage::store_options with_faults(const std::shared_ptr<storage::fault_injector>& faults) {
    storage::store_options options;
    options.mode = storage::durability::sync;
    options.faults = faults;
    return options;
  }

  // Static: the base class opens the store before this class's members exist.
  static inline std::shared_ptr<storage::fault_injector> faults_ = std::make_shared<storage::fault_injector>();
};

TEST_F(failing_store_scheduler_test, a_job_is_offered_while_it_is_recorded_and_withdrawn_if_that_fails) {
  faults_->set_fail_sync(false);
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  // The offer goes out before the job's submission is durable; the submission's fsync fails.
  faults_->set_fail_sync(true);
  auto refused = ask<job_accepted>(rt_.scheduler, request("j1", "alice", true));
  ASSERT_FALSE(refused);
  EXPECT_TRUE(storage_error_of(refused.error())) << describe(refused.error());
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  EXPECT_EQ((*offers_)["p1"][0].job_id, "j1");
  EXPECT_EQ((*cancels_)["p1"], std::vector<std::string>{"j1"}) << "the offer is withdrawn";
  EXPECT_EQ(counts().running, 0u);
  EXPECT_EQ(counts().queued, 0u);
  // The provider's only slot is free again: the next job runs there once the store works.
  faults_->set_fail_sync(false);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));
  ASSERT_EQ((*offers_)["p1"].size(), 2u);
  EXPECT_EQ((*offers_)["p1"][1].job_id, "j2");
  EXPECT_EQ(job("j2").status, domain::job_status::assigned);
}

TEST_F(failing_store_scheduler_test, a_job_whose_failover_cannot_be_recorded_is_reported_failed_to_its_watcher) {
  faults_->set_fail_sync(false);
  bring_online("p1", "llama-8b", 1);
  bring_online("p2", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  auto told = std::make_shared<std::vector<job_ended>>();
  auto watcher = system_.spawn([told](job_watcher::pointer) -> job_watcher::behavior_type {
    return {[told](const job_ended& ended) { told->push_back(ended); }};
  });
  stop_at_teardown(watcher);
  auto asked = request("j1", "alice", true);
  asked.watcher = watcher;
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, asked));
  const std::string first = job("j1").provider_id;
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), first));
  // The answer breaks off, and moving the job to the other provider cannot be recorded.
  faults_->set_fail_sync(true);
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", first, domain::job_fault::provider, 5, "dropped"});
  ASSERT_FALSE(moved);
  EXPECT_TRUE(storage_error_of(moved.error())) << describe(moved.error());
  run();
  ASSERT_EQ(told->size(), 1u) << "the client's side was never told, and would wait for ever";
  EXPECT_EQ(told->front().job_id, "j1");
  EXPECT_EQ(told->front().status, domain::job_status::failed);
  EXPECT_NE(told->front().detail.find("could not be recorded"), std::string::npos) << told->front().detail;
  EXPECT_EQ(counts().running + counts().queued, 0u);
  faults_->set_fail_sync(false);
}

/// With `sync` durability and a store whose fsyncs start failing right after the one that made the
/// next append durable (fail_after_next_sync).
class arming_store_scheduler_test : public scheduler_test {
 protected:
  explicit arming_store_scheduler_test(std::size_t jobs_live_max = 100'000)
      : scheduler_test(jobs_live_max, with_faults()) {}
  ~arming_store_scheduler_test() override { faults_->set_fail_sync(false); }

  static storage::store_options with_faults() {
    faults_ = std::make_shared<storage::fault_injector>();
    faults_->set_sync_observer([](const std::string& path, std::uint64_t) {
      if (path.ends_with(".log") && fail_after_next_sync_.exchange(false)) faults_->set_fail_sync(true);
    });
    storage::store_options options;
    options.mode = storage::durability::sync;
    options.faults = faults_;
    return options;
  }

  /// Provider p1 online with 4 slots of llama-8b, `user` created with `deposit_micros`, and its
  /// job j1 started on p1.
  void start_j1_on_p1(const std::string& user, events::user_tier tier, std::int64_t deposit_micros) {
    bring_online("p1", "llama-8b", 4);
    create_user(user, tier, deposit_micros);
    ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", user, tier == events::user_tier::premium)));
    ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  }

  /// j1 ends (1,000 prompt and 10 answer tokens): its end is recorded, its ledger group's fsync
  /// fails, and the bill waits for a retry.
  void end_j1_leaving_its_bill_unsettled() {
    fail_after_next_sync_ = true;
    auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40});
    faults_->set_fail_sync(false);
    ASSERT_TRUE(ended) << describe(ended.error());
    ASSERT_FALSE(ended->bill_unsettled.empty());
    ASSERT_EQ(counts().settlements_retrying, 1u);
  }

  /// j1's end (1,000 prompt and 10 answer tokens) is sent while `fault` is on (set true, then
  /// false): it fails, and j1's premium hold stays, so that alice (2,600) cannot start j2 (1,500).
  void end_j1_failing_while(const std::function<void(bool)>& fault) {
    fault(true);
    auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40});
    fault(false);
    ASSERT_FALSE(ended) << "the end's append failed";
    EXPECT_EQ(counts().settlements_retrying, 1u);
    EXPECT_EQ(counts().running, 0u);
    auto refused = ask<job_accepted>(rt_.scheduler, request("j2", "alice", true));
    ASSERT_FALSE(refused) << "j1's hold was released while its end may be recorded";
    EXPECT_EQ(refusal_code(refused.error()), domain::errc::insufficient_funds);
  }

  /// Lets the retry ticks offer the unsettled bills to the ledger again: after a second, then two,
  /// then four (a bill whose end's fate was open is read first, then offered).
  void retry_settlements() {
    std::int64_t wait_s = 1;
    for (int tries = 0; tries < 3 && counts().settlements_retrying > 0; ++tries, wait_s *= 2) {
      *clock_.now_us += wait_s * 1'000'000;
      sched_.clock().advance_time(std::chrono::seconds(wait_s));
      run();
    }
  }

  // Static: the base class opens the store before this class's members exist.
  static inline std::shared_ptr<storage::fault_injector> faults_;
  static inline std::atomic<bool> fail_after_next_sync_{false};
};

TEST_F(arming_store_scheduler_test, a_bill_the_store_fails_to_take_keeps_its_hold_and_is_recorded_by_a_later_tick) {
  // The job's end (with its bill) is recorded, its ledger group is not. Releasing the premium
  // hold then would let new jobs spend what the bill needs: the bill could be refused for good.
  // One job's hold (1000 prompt + 500 answer tokens at 1 USD per Mtok: 1500) fits, two do not.
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("alice", events::user_tier::premium, 2'600));
  fail_after_next_sync_ = true;  // the job's end is durable; the ledger group's fsync fails
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40});
  faults_->set_fail_sync(false);
  // The answer is the client's, as billed: an error would be retried by SDKs, and billed again.
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended->status, domain::job_status::completed);
  EXPECT_EQ(ended->gross_micros, 1'010);
  EXPECT_EQ(ended->completion_tokens, 10u);
  EXPECT_NE(ended->bill_unsettled.find("retried until the ledger takes it"), std::string::npos) << ended->bill_unsettled;
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  EXPECT_EQ(counts().settlements_retrying, 1u);
  // A failed fsync leaves the write's fate open: the ledger, started again from the log, may
  // already hold the group. Either way the hold stays until the ledger answers for it.
  const auto balance_now = balance("user-alice");
  EXPECT_TRUE(balance_now == 2'600 || balance_now == 2'600 - 1'010) << balance_now;

  const auto succeeded = [&] {
    auto provider = ask<domain::provider::state>(rt_.providers, std::string("p1"), state_atom::value);
    EXPECT_TRUE(provider);
    return provider ? provider->jobs_succeeded : 0u;
  };
  EXPECT_EQ(succeeded(), 0u) << "scored once the bill is in";
  auto refused = ask<job_accepted>(rt_.scheduler, request("j2", "alice", true));
  ASSERT_FALSE(refused) << "j1's hold is kept while its bill is retried";
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::insufficient_funds);

  // A tick a second later offers the group again, and the store takes it. (The ledger started
  // again may first meet the failed append's record, if it read the log before the store reopened:
  // that try fails too, and the next one, after twice the wait, is taken.)
  retry_settlements();
  EXPECT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(balance("user-alice"), 2'600 - 1'010);  // 1000 prompt + 10 answer tokens
  EXPECT_EQ(succeeded(), 1u) << "the provider is scored once its bill is in";
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true))) << "the hold went with the bill";
}

TEST_F(arming_store_scheduler_test, an_end_whose_fsync_failed_keeps_its_hold_until_its_record_is_read_then_settles) {
  // A failed fsync leaves the end's fate open: the store reopens from its write-ahead log, which
  // holds it here. serve's next start would settle the bill; released meanwhile, the premium hold
  // would let new jobs spend what the bill needs. One job's hold (1,500) fits 2,600, two do not.
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("alice", events::user_tier::premium, 2'600));
  ASSERT_NO_FATAL_FAILURE(end_j1_failing_while([](bool on) { faults_->set_fail_sync(on); }));
  retry_settlements();  // reads j1's end, then offers its bill
  EXPECT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(job("j1").status, domain::job_status::completed) << "the write-ahead log held the end";
  EXPECT_EQ(balance("user-alice"), 2'600 - 1'010) << "the recorded bill is settled now, not at the next start";
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true))) << "the hold went with the bill";
}

TEST_F(arming_store_scheduler_test, an_end_the_full_disk_did_not_record_releases_its_hold_and_fails_the_job) {
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("alice", events::user_tier::premium, 2'600));
  ASSERT_NO_FATAL_FAILURE(end_j1_failing_while([](bool on) { faults_->set_no_space(on); }));
  retry_settlements();
  EXPECT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(job("j1").status, domain::job_status::failed) << "live in the log with nothing running it";
  EXPECT_EQ(job("j1").failure, events::failure_reason::internal);
  EXPECT_EQ(balance("user-alice"), 2'600) << "an unrecorded end bills nothing";
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true))) << "the hold was released";
}

TEST_F(scheduler_test, a_free_job_whose_bill_the_ledger_refuses_for_good_still_counts_its_tokens_against_the_quota) {
  bring_online("p1", "llama-8b", 4);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  // Its ad's campaign holds no escrow: the ledger refuses the job's group for good.
  job_result result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40};
  result.ad = domain::ad_charge{.impression_id = "c-empty.j1", .campaign_id = "c-empty", .price_micros = 2'000};
  auto ended = ask<job_ended>(rt_.scheduler, result);
  ASSERT_TRUE(ended) << describe(ended.error());
  ASSERT_NE(ended->bill_unsettled.find("left to the next start"), std::string::npos) << ended->bill_unsettled;
  run();
  auto user = ask<domain::user_state>(rt_.users, std::string("bob"), state_atom::value);
  ASSERT_TRUE(user);
  EXPECT_EQ(user->free_tokens_today, 1'010) << "its recorded free tokens count now, not from the next start";
}

/// An arming store, and a scheduler that holds one live job at most.
class one_job_arming_store_scheduler_test : public arming_store_scheduler_test {
 protected:
  one_job_arming_store_scheduler_test() : arming_store_scheduler_test(1) {}
};

TEST_F(one_job_arming_store_scheduler_test, a_bill_waiting_for_the_ledger_counts_against_jobs_live_max) {
  // Else a long ledger outage would grow the scheduler's retries by every job that ends.
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("alice", events::user_tier::premium, 50'000'000));
  ASSERT_NO_FATAL_FAILURE(end_j1_leaving_its_bill_unsettled());
  auto refused = ask<job_accepted>(rt_.scheduler, request("j2", "alice", true));
  ASSERT_FALSE(refused);
  const auto busy = domain_error_of(refused.error());
  ASSERT_TRUE(busy) << describe(refused.error());
  EXPECT_EQ(busy->code, domain::errc::busy);
  EXPECT_NE(busy->message.find("1 bills waiting for the ledger"), std::string::npos) << busy->message;
  retry_settlements();
  ASSERT_EQ(counts().settlements_retrying, 0u);
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true))) << "room again once the ledger took it";
}

TEST_F(arming_store_scheduler_test, a_bill_serves_start_could_not_settle_is_held_against_its_user_and_retried) {
  bring_online("p1", "llama-8b", 4);
  create_user("alice", events::user_tier::premium, 2'600);
  // A job that ended before this start: its bill (1,200) is in the log, its ledger group is not.
  auto settled = domain::settle_job(domain::job_bill{.job_id = "j0",
                                                     .user_id = "alice",
                                                     .provider_id = "p1",
                                                     .premium = true,
                                                     .outcome = domain::job_outcome::completed,
                                                     .price = {1'000'000, 1'000'000},
                                                     .quality = events::quality_tier::standard,
                                                     .prompt_tokens = 1'000,
                                                     .completion_tokens = 200,
                                                     .ad = std::nullopt,
                                                     .earlier = {}},
                                    {});
  ASSERT_TRUE(settled) << settled.error().message;
  ASSERT_EQ(settled->gross_micros, 1'200);
  self_->send(rt_.scheduler, settle_atom::value, std::string("j0"), domain::to_bill(settled->group));
  run();
  EXPECT_EQ(counts().settlements_retrying, 1u);
  // 1,400 is left once it is paid: a job quoted 1,500 does not fit.
  EXPECT_FALSE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true))) << "the bill's money would be spent twice";
  retry_settlements();
  EXPECT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(balance("user-alice"), 1'400);
  EXPECT_EQ(counts().users_holding, 0u) << "its hold went with it";
}

TEST_F(arming_store_scheduler_test, a_free_end_whose_fsync_failed_keeps_its_quota_hold_even_with_nothing_to_bill) {
  // A provider at price 0 bills nothing: the end records only the free tokens, which still count.
  bring_online("p1", "llama-8b", 8, 0, 0);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  faults_->set_fail_sync(true);
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40});
  faults_->set_fail_sync(false);
  ASSERT_FALSE(ended) << "the end's fsync failed";
  // Each free job holds 1,500 of the day's 10,000 tokens: with j1's kept, five more fit, not six.
  int admitted = 0;
  for (int i = 2; i < 8; ++i) admitted += ask<job_accepted>(rt_.scheduler, request("j" + std::to_string(i), "bob", false)) ? 1 : 0;
  EXPECT_EQ(admitted, 5) << "j1's quota hold was released while its end may be recorded";
  retry_settlements();
  EXPECT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  auto user = ask<domain::user_state>(rt_.users, std::string("bob"), state_atom::value);
  ASSERT_TRUE(user);
  EXPECT_EQ(user->free_tokens_today, 1'010) << "its recorded free tokens count against the quota";
}

TEST_F(arming_store_scheduler_test, a_bill_the_ledger_refuses_after_the_end_is_recorded_leaves_the_answer_the_clients) {
  // A domain refusal of a result tells the relay nothing was recorded (it then takes back the
  // answer's ad impression), and any other error fails the answer (SDKs retry it, billed again).
  // Once the job's end, with its bill, is recorded, the answer is the client's as billed.
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("alice", events::user_tier::premium, 2'600));
  // Her money goes elsewhere meanwhile: the bill no longer fits her balance.
  const domain::record_transfers away{
      "away", {{"away", "user-alice", "provider-p1", 2'500, events::transfer_kind::usage, "test"}}};
  ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{away}));
  auto ended = ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 200'000, 4'000'000, 10, 40});
  ASSERT_TRUE(ended) << describe(ended.error());
  EXPECT_EQ(ended->status, domain::job_status::completed);
  EXPECT_EQ(ended->gross_micros, 1'010);
  EXPECT_NE(ended->bill_unsettled.find("left to the next start"), std::string::npos) << ended->bill_unsettled;
  EXPECT_NE(ended->bill_unsettled.find("insufficient_funds"), std::string::npos) << ended->bill_unsettled;
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
}

TEST_F(arming_store_scheduler_test, a_free_bill_taken_on_a_retry_records_the_tokens_against_the_quota) {
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("bob", events::user_tier::free, 0));
  ASSERT_NO_FATAL_FAILURE(end_j1_leaving_its_bill_unsettled());
  const auto free_today = [&] {
    auto user = ask<domain::user_state>(rt_.users, std::string("bob"), state_atom::value);
    EXPECT_TRUE(user);
    return user ? user->free_tokens_today : -1;
  };
  EXPECT_EQ(free_today(), 0) << "recorded once the bill is in";
  retry_settlements();
  ASSERT_EQ(counts().settlements_retrying, 0u);
  EXPECT_EQ(free_today(), 1'010) << "the prompt and the answer's tokens, as a settled free job counts them";
}

TEST_F(arming_store_scheduler_test, a_free_bill_being_retried_keeps_its_quota_hold_until_the_usage_is_recorded) {
  // Each free job holds 1,500 tokens (1,000 prompt + 500 max_tokens) of the day's 10,000.
  ASSERT_NO_FATAL_FAILURE(start_j1_on_p1("bob", events::user_tier::free, 0));
  ASSERT_NO_FATAL_FAILURE(end_j1_leaving_its_bill_unsettled());
  // While j1's bill waits, its 1,500 stay held: five more jobs fit beside it, a sixth does not.
  const auto admit = [&](int from, int to) {
    for (int i = from; i < to; ++i) {
      if (!ask<job_accepted>(rt_.scheduler, request("j" + std::to_string(i), "bob", false))) return i - from;
    }
    return to - from;
  };
  EXPECT_EQ(admit(2, 8), 5) << "j1's hold was released before its usage was recorded";
  for (int i = 2; i < 7; ++i) {
    ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_cancel{"j" + std::to_string(i), events::cancelled_by::client, 0}));
  }
  retry_settlements();
  ASSERT_EQ(counts().settlements_retrying, 0u);
  // Recorded, the 1,010 used replace the hold: 10,000 - 1,010 leaves room for five jobs again.
  EXPECT_EQ(admit(8, 14), 5) << "j1's hold outlived its recorded usage";
}

TEST_F(scheduler_test, a_link_offering_other_models_keeps_its_jobs_and_fails_those_queued_for_a_model_left_unserved) {
  // The agent's backend unloaded one model and loaded another, and its link says so.
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));  // on p1's one slot
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "alice", true)));  // behind it
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  ASSERT_EQ(counts().queued, 1u);

  advertise_again("p1", {events::model_offer{"qwen-7b", 8192, "Q4_K_M", 1'000'000, 1'000'000, 2}});
  EXPECT_EQ((*offers_)["p1"].size(), 1u) << "j1's offer is not sent again on the link that has it";
  EXPECT_EQ(job("j1").status, domain::job_status::assigned);
  EXPECT_EQ(job("j2").status, domain::job_status::failed);
  EXPECT_EQ(job("j2").failure, events::failure_reason::no_provider);
  EXPECT_EQ(counts().queued, 0u);

  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "alice", true, "qwen-7b")));
  ASSERT_EQ((*offers_)["p1"].size(), 2u) << "the new model is served at once, in the slot left";
  EXPECT_EQ((*offers_)["p1"][1].job_id, "j3");
  auto refused = ask<job_accepted>(rt_.scheduler, request("j4", "alice", true));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::no_provider);
}

TEST_F(scheduler_test, a_draining_link_offering_other_models_still_takes_no_new_job) {
  // What the link said (draining) holds over a listing that comes over the same link.
  bring_online("p1", "llama-8b", 2);
  create_user("alice", events::user_tier::premium, 50'000'000);
  self_->send(rt_.scheduler, load_atom::value, std::string("p1"),
              domain::load_report{.load_percent = 0, .health_percent = 100, .draining = true});
  run();
  advertise_again("p1", {events::model_offer{"llama-8b", 8192, "Q4_K_M", 1'000'000, 1'000'000, 2},
                         events::model_offer{"qwen-7b", 8192, "Q4_K_M", 1'000'000, 1'000'000, 2}});
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  EXPECT_TRUE((*offers_)["p1"].empty()) << "a draining provider takes no new job";
  EXPECT_EQ(counts().queued, 1u);
}

TEST_F(scheduler_test, a_provider_linking_again_gets_the_offers_its_old_link_lost) {
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_EQ((*offers_)["p1"].size(), 1u);
  // The agent links again (a new session for the same provider, as a new link's hello gives)
  // before j1 started: the offer to the old link may have died with it, so j1 is offered again.
  ASSERT_NO_FATAL_FAILURE(link_again("p1"));
  ASSERT_EQ((*offers_)["p1"].size(), 2u);
  EXPECT_EQ((*offers_)["p1"][1].job_id, "j1");
  EXPECT_EQ((*offers_)["p1"][1].attempt, (*offers_)["p1"][0].attempt) << "the same attempt, offered again";
  // A started job is not offered again.
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"), std::string("p1")));
  ASSERT_NO_FATAL_FAILURE(link_again("p1"));
  EXPECT_EQ((*offers_)["p1"].size(), 2u);
}

class small_scheduler_test : public scheduler_test {
 protected:
  small_scheduler_test() : scheduler_test(2) {}
};

class one_queued_scheduler_test : public scheduler_test {
 protected:
  one_queued_scheduler_test() : scheduler_test(100'000, buffered(), 1) {}
};

TEST_F(one_queued_scheduler_test, a_full_queue_refuses_new_jobs_but_takes_back_an_answer_to_continue) {
  const std::string busy = two_providers_one_busy();
  ASSERT_FALSE(busy.empty());
  const std::string broken = start_j1_beside(busy);
  ASSERT_FALSE(broken.empty());
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "dave", true)));
  auto refused = ask<job_accepted>(rt_.scheduler, request("j3", "dave", true));
  ASSERT_FALSE(refused) << "jobs_queued_max is 1";
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::busy);
  auto moved = ask<job_ended>(rt_.scheduler, job_failure{"j1", broken, domain::job_fault::provider, 5, "backend died"});
  ASSERT_TRUE(moved) << describe(moved.error());
  run();
  EXPECT_EQ(job("j1").status, domain::job_status::queued) << "admitted before: it continues, it is not failed";
  EXPECT_EQ(job("j2").provider_id, broken) << "the freed slot goes to j2; j1 waits for another provider";
}

TEST_F(small_scheduler_test, jobs_live_max_is_a_limit) {
  bring_online("p1", "llama-8b", 1);
  create_user("bob", events::user_tier::free, 0);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "bob", false)));
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j2", "bob", false)));
  auto refused = ask<job_accepted>(rt_.scheduler, request("j3", "bob", false));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::busy);
  EXPECT_EQ(job("j3").status, domain::job_status::none) << "nothing recorded for a refused request";
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"),
                                 std::string("p1")));
  ASSERT_TRUE(ask<job_ended>(rt_.scheduler, job_result{"j1", "p1", 10, 10, 100, 500, 10, 10 * 4}));
  EXPECT_TRUE(ask<job_accepted>(rt_.scheduler, request("j3", "bob", false)))
      << "room again once a job ended";
}

TEST_F(scheduler_test, reports_about_an_ending_job_are_refused_and_a_lost_provider_does_not_touch_it) {
  bring_online("p1", "llama-8b", 1);
  create_user("alice", events::user_tier::premium, 50'000'000);
  ASSERT_TRUE(ask<job_accepted>(rt_.scheduler, request("j1", "alice", true)));
  ASSERT_TRUE(ask<std::uint64_t>(rt_.scheduler, started_atom::value, std::string("j1"),
                                 std::string("p1")));
  // The result and the provider's loss arrive together: the completion wins, the loss is ignored.
  auto ended = self_->request(rt_.scheduler, caf::infinite,
                              job_result{"j1", "p1", 100, 100, 1000, 5000, 100, 100 * 4});
  self_->send(rt_.scheduler, offline_atom::value, std::string("p1"));
  auto late = self_->request(rt_.scheduler, caf::infinite,
                             job_failure{"j1", "p1", domain::job_fault::provider, 0, "late"});
  run();
  auto completed = collect<job_ended>(ended);
  ASSERT_TRUE(completed) << describe(completed.error());
  EXPECT_EQ(completed.value().status, domain::job_status::completed);
  auto refused = collect<job_ended>(late);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::invalid_state);
  EXPECT_EQ(job("j1").status, domain::job_status::completed);
  EXPECT_EQ(balance("user-alice"), 50'000'000 - 1100);
}

/// Random steps through the runtime; after each, the ledger's full invariants hold and the
/// scheduler's counts agree with the jobs' own states; in the end, once providers answer every
/// offer and deadlines pass, no job is left live.
TEST_F(scheduler_test, random_walk_keeps_invariants_and_leaves_no_job_stuck) {
  const auto seed = testing::seed_from_environment();
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::mt19937_64 random(seed);
  const std::vector<std::string> models = {"llama-8b", "qwen-14b"};
  create_user("rich", events::user_tier::premium, 1'000'000'000);
  create_user("free", events::user_tier::free, 0);
  std::set<std::string> online;
  std::set<std::string> submitted;
  int next_job = 0;
  int next_provider = 0;
  auto pick = [&](const auto& set) {
    auto it = set.begin();
    std::advance(it, static_cast<long>(random() % set.size()));
    return *it;
  };
  for (int step = 0; step < 300; ++step) {
    switch (random() % 8) {
      case 0:
        if (online.size() < 4) {
          const std::string id = "p" + std::to_string(next_provider++);
          bring_online(id, models[random() % 2], 1 + static_cast<std::uint32_t>(random() % 2));
          online.insert(id);
        }
        break;
      case 1:
        if (!online.empty()) {
          const std::string id = pick(online);
          if (random() % 2 == 0) {  // the link went first, its offline notice held back a moment
            self_->send(rt_.scheduler, link_lost_atom::value, id);
            run();
          }
          self_->send(rt_.scheduler, offline_atom::value, id);
          run();
          online.erase(id);
        }
        break;
      case 2:
      case 3: {
        const std::string id = "j" + std::to_string(next_job++);
        const bool premium = random() % 2 == 0;
        (void)ask<job_accepted>(rt_.scheduler,
                                request(id, premium ? "rich" : "free", premium, models[random() % 2]));
        submitted.insert(id);
        break;
      }
      case 4:
      case 5:  // every provider answers its oldest unanswered offer: done, failed, or never
        for (auto& [provider, offers] : *offers_) {
          if (offers.empty()) continue;
          const auto offer = offers.front();
          offers.erase(offers.begin());
          const auto answer = random() % 8;
          if (answer == 0) {
            continue;  // the provider never answers: the stall timeout must take the job back
          } else if (answer < 3) {
            (void)ask<job_ended>(rt_.scheduler,
                                 job_failure{offer.job_id, provider, domain::job_fault::provider, 0, "x"});
          } else {
            (void)ask<std::uint64_t>(rt_.scheduler, started_atom::value, offer.job_id, provider);
            (void)ask<job_ended>(rt_.scheduler, job_result{offer.job_id, provider, 10, 10, 100, 500, 10, 10 * 4});
          }
        }
        break;
      case 6:  // a client goes away (refusals are fine: the job may have ended or be in transit)
        if (!submitted.empty()) {
          (void)ask<job_ended>(rt_.scheduler,
                               job_cancel{pick(submitted), events::cancelled_by::client, 5});
        }
        break;
      default:
        *clock_.now_us += 5'000'000;
        sched_.clock().advance_time(std::chrono::seconds(1));
        run();
    }
    auto ledger = ask<domain::ledger::state>(rt_.ledger, state_atom::value);
    ASSERT_TRUE(ledger);
    auto sound = domain::check_ledger(ledger.value());
    ASSERT_TRUE(sound) << "step " << step << ": " << sound.error().message;
    std::uint64_t live = 0;
    for (const auto& id : submitted) live += domain::is_terminal(job(id).status) ? 0 : 1;
    const auto c = counts();
    ASSERT_EQ(c.queued + c.running, live) << "step " << step;
  }
  // Drain: providers answer everything, time passes every deadline.
  for (int round = 0; round < 20; ++round) {
    for (auto& [provider, offers] : *offers_) {
      // Answering runs the system, which may offer more jobs: take the current ones out first.
      const auto pending = std::exchange(offers, {});
      for (const auto& offer : pending) {
        (void)ask<std::uint64_t>(rt_.scheduler, started_atom::value, offer.job_id, provider);
        (void)ask<job_ended>(rt_.scheduler, job_result{offer.job_id, provider, 10, 10, 100, 500, 10, 10 * 4});
      }
    }
    *clock_.now_us += 31'000'000;
    sched_.clock().advance_time(std::chrono::seconds(1));
    run();
  }
  for (const auto& id : submitted) {
    EXPECT_TRUE(domain::is_terminal(job(id).status))
        << id << " is stuck in " << domain::to_string(job(id).status);
  }
  EXPECT_EQ(counts().side_effects_failed, 0u);

  // Live state equals the state rebuilt from the log, and the log passes every domain check.
  auto live_ledger = ask<domain::ledger::state>(rt_.ledger, state_atom::value);
  ASSERT_TRUE(live_ledger);
  std::map<std::string, domain::provider::state> live_providers;
  for (int p = 0; p < next_provider; ++p) {
    const std::string id = "p" + std::to_string(p);
    auto state = ask<domain::provider::state>(rt_.providers, id, state_atom::value);
    ASSERT_TRUE(state);
    live_providers[id] = state.value();
  }
  close_store();
  const auto rebuilt = verify_log();
  ASSERT_TRUE(rebuilt);
  EXPECT_EQ(verified_.job_bills_unsettled, 0u) << "every bill recorded with a job's end is in the ledger";
  EXPECT_EQ(verified_.free_usage_unrecorded, 0u) << "every free end's usage is on its user's stream";
  const auto* ledger = std::get<const domain::ledger::state*>(rebuilt->state_of("ledger"));
  EXPECT_EQ(*ledger, live_ledger.value());
  for (const auto& [id, state] : live_providers) {
    EXPECT_EQ(*std::get<const domain::provider::state*>(rebuilt->state_of("provider-" + id)), state)
        << id;
  }
}

}  // namespace
}  // namespace gpustream::actors
