// The relay against a stand-in scheduler that records what it is told: what happens to an offer
// for a job nobody waits for any more, to a request that arrives after the relay stopped, and to
// the offline notice of a provider whose finished answer still waits for its ad.

#include "gateway/relay.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <map>
#include <memory>
#include <set>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "actors/errors.hpp"
#include "domain/auction.hpp"
#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;

struct test_config : caf::actor_system_config {
  test_config() { actors::add_error_categories(*this); }
};

/// What a stand-in scheduler was told, in order ("request j1", "started j1", "result j1",
/// "cancel j1 0", "offline p1").
class scheduler_log {
 public:
  void add(std::string what) {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(what));
    changed_.notify_all();
  }
  /// True once `what` was told (false after `wait_max`).
  bool wait_for(const std::string& what, std::chrono::milliseconds wait_max) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, wait_max, [&] { return std::find(events_.begin(), events_.end(), what) != events_.end(); });
  }
  std::vector<std::string> events() {
    std::lock_guard lock(mutex_);
    return events_;
  }
  void set_watcher(actors::job_watcher watcher) {
    std::lock_guard lock(mutex_);
    watcher_ = std::move(watcher);
  }
  actors::job_watcher watcher() {
    std::lock_guard lock(mutex_);
    return watcher_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> events_;
  actors::job_watcher watcher_;
};

std::string fault_name(domain::job_fault fault) {
  switch (fault) {
    case domain::job_fault::none: return "none";
    case domain::job_fault::provider: return "provider";
    case domain::job_fault::platform: return "platform";
    case domain::job_fault::client: return "client";
    case domain::job_fault::request: return "request";
    case domain::job_fault::declined: return "declined";
  }
  return "?";
}

/// A result reporting this prompt count is answered with a store failure.
constexpr std::uint32_t store_failing_prompt_tokens = 4242;
/// A result reporting this prompt count is refused (the job moved on to another provider).
constexpr std::uint32_t refused_prompt_tokens = 4343;

/// Accepts jobs, their starts, results and cancels as a scheduler would, and logs them. A job
/// whose id begins with "held-" is accepted only at the next tick (its accept overtaken by its
/// offer, which the scheduler makes while it records the job).
actors::scheduler_actor::behavior_type recording_scheduler(actors::scheduler_actor::pointer self,
                                                           std::shared_ptr<scheduler_log> log) {
  // What each job was admitted with (its prompt estimate and max_tokens), to bill as the scheduler does.
  auto admitted = std::make_shared<std::map<std::string, actors::job_request>>();
  using accept_promise = caf::typed_response_promise<actors::job_accepted>;
  auto held = std::make_shared<std::vector<std::pair<std::string, accept_promise>>>();
  // Results of jobs whose id begins with "held-result-", answered at the next tick.
  using end_promise = caf::typed_response_promise<actors::job_ended>;
  auto held_results = std::make_shared<std::vector<std::pair<actors::job_ended, end_promise>>>();
  return {
      [self, log, admitted, held](actors::job_request& request) -> caf::result<actors::job_accepted> {
        if (request.job_id.starts_with("refused-")) {  // refused as a full queue or a fixed limit
          const auto code = request.job_id == "refused-busy" ? domain::errc::busy : domain::errc::limit_exceeded;
          return actors::make_error(domain::error{code, "refused by the test's scheduler"});
        }
        (*admitted)[request.job_id] = request;
        log->set_watcher(request.watcher);
        log->add("window " + request.job_id + " " + std::to_string(request.context_tokens_min));
        log->add("request " + request.job_id);
        if (request.job_id.starts_with("held-")) {
          held->emplace_back(request.job_id, self->make_response_promise<actors::job_accepted>());
          return held->back().second;
        }
        return actors::job_accepted{request.job_id, 0, 0};
      },
      [](actors::online_atom, actors::provider_online&) {},
      [log](actors::offline_atom, std::string& provider_id) { log->add("offline " + provider_id); },
      [log](actors::link_lost_atom, std::string& provider_id) { log->add("link lost " + provider_id); },
      [](actors::load_atom, std::string&, domain::load_report&) {},
      [log](actors::started_atom, std::string& job_id, std::string&) -> caf::result<std::uint64_t> {
        log->add("started " + job_id);
        return std::uint64_t{1};
      },
      [self, log, admitted, held_results](actors::job_result& result) -> caf::result<actors::job_ended> {
        if (result.prompt_tokens_reported == store_failing_prompt_tokens) {  // the ledger's store failed
          return actors::make_error(storage::error{storage::errc::io_error, "fsync of /srv/gpustream/data/000042.log"});
        }
        if (result.prompt_tokens_reported == refused_prompt_tokens) {
          return actors::make_error(domain::error{domain::errc::invalid_state, "job is no longer running on p1"});
        }
        if (result.ad) log->add("ad " + result.job_id + " " + result.ad->impression_id);
        log->add("tokens " + result.job_id + " " + std::to_string(result.completion_tokens));
        if (result.cut) log->add("cut " + result.job_id);
        log->add("timing " + result.job_id + " " + std::to_string(result.ttft_us) + " " + std::to_string(result.total_us));
        log->add("result " + result.job_id);
        const auto& job = (*admitted)[result.job_id];
        actors::job_ended ended{result.job_id, domain::job_status::completed, 0, 0};
        // Billed: the backend's count of the prompt when lower than the estimate, the answer up to max_tokens.
        ended.prompt_tokens = result.prompt_tokens_reported != 0 ? std::min(result.prompt_tokens_reported, job.prompt_tokens)
                                                                 : job.prompt_tokens;
        ended.completion_tokens = std::min(result.completion_tokens, job.max_tokens);
        if (result.job_id.starts_with("held-result-")) {
          held_results->emplace_back(ended, self->make_response_promise<actors::job_ended>());
          return held_results->back().second;
        }
        return ended;
      },
      [log](actors::job_failure& failure) -> caf::result<actors::job_ended> {
        log->add("failure " + failure.job_id + " " + failure.provider_id + " " + fault_name(failure.fault) + " " +
                 std::to_string(failure.tokens_so_far) + (failure.with_link ? " with link" : ""));
        return actors::job_ended{failure.job_id, domain::job_status::queued, 0, 0};  // another provider's turn
      },
      [log, platform_cancels = std::make_shared<std::set<std::string>>()](
          actors::job_cancel& cancel) -> caf::result<actors::job_ended> {
        // A stopping node's first cancel of a job is refused as the scheduler does while it still
        // records the job's queueing: the relay must try again.
        if (cancel.by == events::cancelled_by::platform && platform_cancels->insert(cancel.job_id).second) {
          log->add("cancel refused " + cancel.job_id);
          return actors::make_error(domain::error{domain::errc::invalid_state, "job is being queued; retry the cancel"});
        }
        // A job whose id begins with "store-fails-": its client's first cancel is not recorded.
        if (cancel.job_id.starts_with("store-fails-") && cancel.by == events::cancelled_by::client &&
            platform_cancels->insert("client " + cancel.job_id).second) {
          log->add("cancel failed " + cancel.job_id);
          return actors::make_error(storage::error{storage::errc::io_error, "fsync failed"});
        }
        log->add("cancel " + cancel.job_id + " " + std::to_string(cancel.tokens_produced));
        // A cancel bound to one provider (it applies only while the job runs there) says so too.
        if (!cancel.provider_id.empty()) log->add("cancel " + cancel.job_id + " only at " + cancel.provider_id);
        return actors::job_ended{cancel.job_id, domain::job_status::cancelled, 0, 0};
      },
      [log](actors::cancel_atom, std::string& job_id, std::string& provider_id) {
        log->add("stop " + job_id + " at " + provider_id);
      },
      [](actors::count_atom) { return actors::scheduler_counts{}; },
      [](actors::settle_atom, std::string&, events::ledger_bill&) {},
      [held, held_results](actors::tick_atom) {
        for (auto& [job_id, promise] : *held) promise.deliver(actors::job_accepted{job_id, 0, 0});
        held->clear();
        for (auto& [ended, promise] : *held_results) promise.deliver(ended);
        held_results->clear();
      },
  };
}

/// A relay with its actor system, bridge and stand-in scheduler; stopped in order at the end.
struct relay_world {
  explicit relay_world(ad_source* ads = nullptr, relay_options options = {})
      : scheduler(system.spawn(recording_scheduler, log)), relay(system, bridge, scheduler, ads, std::move(options)) {}
  ~relay_world() {
    bridge.stop();
    relay.stop();
    caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown);
  }

  test_config config;
  caf::actor_system system{config};
  std::shared_ptr<scheduler_log> log = std::make_shared<scheduler_log>();
  actors::scheduler_actor scheduler;
  actor_bridge bridge{system};
  gateway::relay relay;
};

TEST(relay, an_offer_for_a_job_nobody_waits_for_is_declined_and_the_job_cancelled) {
  relay_world world;
  const actors::job_offer offer{.job_id = "j-gone", .model = "m", .prompt_tokens = 10, .max_tokens = 20};
  EXPECT_FALSE(world.relay.take_offer("p1", offer)) << "no frame for a job that is not live here";
  EXPECT_TRUE(world.log->wait_for("cancel j-gone 0", 10s)) << "the scheduler was not asked to stop the job";
}

/// A reply that records what it was sent (from any thread).
class recorded_reply final : public http_reply {
 public:
  void send(http_response response) override {
    std::lock_guard lock(mutex_);
    sent_.push_back(std::move(response));
    changed_.notify_all();
  }
  void start_stream(unsigned, std::string, http_headers) override {}
  void write(std::string bytes) override {
    std::lock_guard lock(mutex_);
    streamed_ += bytes;
  }
  void finish() override {
    std::lock_guard lock(mutex_);
    finished_ = true;
    changed_.notify_all();
  }
  void on_close(std::function<void()> closed) override {
    std::lock_guard lock(mutex_);
    closed_ = std::move(closed);
  }
  /// The client goes away: the callback the relay registered runs.
  void close() {
    std::function<void()> closed;
    {
      std::lock_guard lock(mutex_);
      closed = std::move(closed_);
    }
    if (closed) closed();
  }

  /// The whole answers sent so far, once there is one (none after `wait_max`).
  std::vector<http_response> sent(std::chrono::milliseconds wait_max = 0ms) {
    std::unique_lock lock(mutex_);
    changed_.wait_for(lock, wait_max, [&] { return !sent_.empty(); });
    return sent_;
  }

  /// What a streamed answer wrote so far.
  std::string written() {
    std::lock_guard lock(mutex_);
    return streamed_;
  }

  /// What a streamed answer wrote, once it finished (empty if it did not within `wait_max`).
  std::string streamed(std::chrono::milliseconds wait_max) {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, wait_max, [&] { return finished_; })) return {};
    return streamed_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<http_response> sent_;
  std::string streamed_;
  bool finished_ = false;
  std::function<void()> closed_;
};

TEST(relay, a_request_after_stop_is_refused_and_its_reply_not_kept) {
  relay_world world;
  world.bridge.stop();
  world.relay.stop();  // the node stops the relay while its server still takes requests

  auto reply = std::make_shared<recorded_reply>();
  relay_job job;
  job.job_id = "j-late";
  job.completion_budget = 10;
  job.reply = reply;
  world.relay.submit(std::move(job));
  const auto sent = reply->sent();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 503u);
  EXPECT_NE(sent.front().body.find("shutting down"), std::string::npos) << sent.front().body;
  EXPECT_EQ(world.relay.live_jobs(), 0u);
  EXPECT_EQ(reply.use_count(), 1) << "the relay kept the reply, which would outlive the server";
}

TEST(relay, a_full_queue_is_429_server_busy_and_a_fixed_limit_400_which_no_retry_passes) {
  relay_world world;
  for (const auto& [job_id, status, code] : {std::tuple{"refused-busy", 429u, "server_busy"},
                                             std::tuple{"refused-limit", 400u, "limit_exceeded"}}) {
    auto reply = std::make_shared<recorded_reply>();
    relay_job job;
    job.job_id = job_id;
    job.completion_budget = 10;
    job.reply = reply;
    world.relay.submit(std::move(job));
    const auto sent = reply->sent(10s);
    ASSERT_EQ(sent.size(), 1u) << job_id;
    EXPECT_EQ(sent.front().status, status) << sent.front().body;
    EXPECT_NE(sent.front().body.find(std::string("\"code\":\"") + code + "\""), std::string::npos) << sent.front().body;
  }
}

/// Picks one ad for every job at once, and holds the recording of its impression until told.
class held_ads final : public ad_source {
 public:
  /// With `hold_picks`, a pick waits for finish_pick.
  explicit held_ads(bool hold_picks = false) : hold_picks_(hold_picks) {}

  void pick(std::string, std::string, std::string prompt, std::function<void(std::optional<ad_info>)> done) override {
    ++picks;
    {
      std::lock_guard lock(mutex_);
      prompts_.push_back(std::move(prompt));
    }
    if (hold_picks_) {
      std::lock_guard lock(mutex_);
      held_pick_ = std::move(done);
      return;
    }
    done(imp_1());
  }
  /// Lets the held pick finish with the ad imp-1; returns whether there was one.
  bool finish_pick() {
    std::function<void(std::optional<ad_info>)> done;
    {
      std::lock_guard lock(mutex_);
      done = std::move(held_pick_);
    }
    if (!done) return false;
    done(imp_1());
    return true;
  }
  void served(std::string, std::function<void(std::optional<domain::ad_charge>)> done) override {
    std::lock_guard lock(mutex_);
    held_ = std::move(done);
  }
  void release(std::string impression_id, std::string) override {
    std::lock_guard lock(mutex_);
    released_.push_back(std::move(impression_id));
  }
  void unserved(std::string impression_id, std::string reason) override {
    std::lock_guard lock(mutex_);
    unserved_.push_back(impression_id + ": " + reason);
  }
  std::vector<std::string> released() {
    std::lock_guard lock(mutex_);
    return released_;
  }
  /// The prompt text of each pick.
  std::vector<std::string> prompts() {
    std::lock_guard lock(mutex_);
    return prompts_;
  }
  std::atomic<int> picks{0};
  std::vector<std::string> unserved() {
    std::lock_guard lock(mutex_);
    return unserved_;
  }
  /// Lets the held recording finish, with `charge` (none: not recorded), and returns whether there
  /// was one.
  bool finish_served(std::optional<domain::ad_charge> charge = std::nullopt) {
    std::function<void(std::optional<domain::ad_charge>)> done;
    {
      std::lock_guard lock(mutex_);
      done = std::move(held_);
    }
    if (!done) return false;
    done(std::move(charge));
    return true;
  }

 private:
  static ad_info imp_1() {
    return ad_info{.impression_id = "imp-1", .campaign_id = "c1", .title = "T", .text = "X", .click_url = "/a/c/imp-1"};
  }

  const bool hold_picks_;
  std::mutex mutex_;
  std::function<void(std::optional<ad_info>)> held_pick_;
  std::function<void(std::optional<domain::ad_charge>)> held_;
  std::vector<std::string> released_;
  std::vector<std::string> unserved_;
  std::vector<std::string> prompts_;
};

/// The charge of held_ads' ad once recorded.
const domain::ad_charge imp_1_charge{.impression_id = "imp-1", .campaign_id = "c1", .price_micros = 2'000};

/// Job j1's offer of `attempt` (0: none given).
actors::job_offer j1_offer(std::uint32_t attempt = 0) {
  return {.job_id = "j1", .model = "m", .max_tokens = 10, .attempt = attempt};
}

/// Submits chat job `job_id` of user u1 ("hi") for model "m", answered to `reply`, with a budget
/// of 10 tokens, or of the request's `max_tokens` when given (then also sent to the backend), and
/// waits until the scheduler has it.
void submit_job(relay_world& world, const std::string& job_id, const std::shared_ptr<recorded_reply>& reply,
                bool premium, bool stream = false, std::uint32_t prompt_tokens = 1,
                std::optional<std::uint32_t> max_tokens = std::nullopt) {
  relay_job job;
  job.job_id = job_id;
  job.user_id = "u1";
  job.premium = premium;
  job.request.stream = stream;
  job.request.model = "m";
  job.request.messages = {chat_message{"user", "hi"}};
  job.request.max_tokens = max_tokens;
  job.prompt_tokens = prompt_tokens;
  job.completion_budget = max_tokens.value_or(10);
  job.answer_tokens_max = max_tokens.value_or(0);
  job.reply = reply;
  world.relay.submit(std::move(job));
  ASSERT_TRUE(world.log->wait_for("request " + job_id, 10s));
}

/// submit_job of job j1.
void submit_j1(relay_world& world, const std::shared_ptr<recorded_reply>& reply, bool premium, bool stream = false,
               std::uint32_t prompt_tokens = 1, std::optional<std::uint32_t> max_tokens = std::nullopt) {
  submit_job(world, "j1", reply, premium, stream, prompt_tokens, max_tokens);
}

TEST(relay, a_model_is_served_within_its_largest_window_and_a_job_asks_for_a_provider_whose_window_holds_it) {
  relay_world world;
  const auto offer = [](std::uint32_t window) {
    return events::model_offer{.model_name = "m", .context_length_tokens = window, .quantisation = "Q4",
                               .input_price_micros_per_mtok = 1, .output_price_micros_per_mtok = 1, .max_concurrency = 1};
  };
  world.relay.provider_online({"large", {offer(131'072)}});
  world.relay.provider_online({"small", {offer(4'096)}});  // listed after: one provider cannot shrink the model
  EXPECT_EQ(world.relay.context_length("m"), 131'072u);
  const auto models = world.relay.models();
  ASSERT_EQ(models.size(), 1u);
  EXPECT_EQ(models[0].context_length, 131'072u);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, false, 20, 100));
  EXPECT_TRUE(world.log->wait_for("window j1 120", 10s)) << "its prompt and max_tokens";
}

TEST(relay, a_job_without_max_tokens_needs_a_window_with_room_for_one_token_past_its_prompt) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, false, 20));
  EXPECT_TRUE(world.log->wait_for("window j1 21", 10s));
}

/// How many times `needle` occurs in `text`.
std::size_t occurrences(std::string_view text, std::string_view needle) {
  std::size_t n = 0;
  for (auto at = text.find(needle); at != std::string_view::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

/// The body of the one whole answer `reply` got (within 10 s), which must be a 200.
std::string answered_body(recorded_reply& reply) {
  const auto sent = reply.sent(10s);
  EXPECT_EQ(sent.size(), 1u);
  if (sent.size() != 1) return {};
  EXPECT_EQ(sent.front().status, 200u) << sent.front().body;
  return sent.front().body;
}

/// A free-tier job that provider p1 finished; its result waits for its ad's impression.
/// What the relay told its metrics observer: the jobs ended, by status, and the completion tokens
/// their clients got. Its options() observe into it, so it must outlive the relay.
/// What the relay's metrics observer was told, from whichever thread told it.
class metrics_seen {
 public:
  relay_options options() {
    relay_options out;
    out.observer.job_ended = [this](domain::job_status status) {
      std::lock_guard lock(mutex_);
      statuses_.push_back(status);
      changed_.notify_all();
    };
    out.observer.completion_tokens = [this](std::uint32_t count) {
      std::lock_guard lock(mutex_);
      tokens_ += count;
    };
    return out;
  }

  std::vector<domain::job_status> statuses() const {
    std::lock_guard lock(mutex_);
    return statuses_;
  }

  std::uint32_t tokens() const {
    std::lock_guard lock(mutex_);
    return tokens_;
  }

  /// Waits until `count` ends were counted; returns whether they were within `wait`.
  bool wait_for_ends(std::size_t count, std::chrono::milliseconds wait) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, wait, [&] { return statuses_.size() >= count; });
  }

 private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<domain::job_status> statuses_;
  std::uint32_t tokens_ = 0;
};

void finish_a_free_job_on_p1(relay_world& world, const std::shared_ptr<recorded_reply>& reply,
                             std::uint32_t prompt_tokens_reported = 0, bool stream = false) {
  world.relay.provider_online({"p1", {}});
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, false, stream));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .prompt_tokens_reported = prompt_tokens_reported});
  ASSERT_TRUE(world.log->wait_for("started j1", 10s));
}

TEST(relay, a_recorded_ad_goes_out_with_the_settled_answer_and_is_not_taken_back) {
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  ASSERT_TRUE(world.log->wait_for("ad j1 imp-1", 10s)) << "the settlement pays for the ad";
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 200u);
  EXPECT_NE(sent.front().body.find("Sponsored"), std::string::npos) << sent.front().body;
  EXPECT_TRUE(ads.unserved().empty());
}

TEST(relay, a_free_job_the_scheduler_refuses_reserves_no_ad) {
  // A free user past the day's quota whose SDK retries the 429: no ad reserved and released for
  // each try, which its campaign would remember for the click window.
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  relay_job job;
  job.job_id = "refused-busy";
  job.user_id = "u1";
  job.premium = false;
  job.completion_budget = 10;
  job.reply = reply;
  world.relay.submit(std::move(job));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 429u) << sent.front().body;
  EXPECT_EQ(ads.picks, 0);
  EXPECT_TRUE(ads.released().empty());
  // An accepted one gets its ad.
  auto accepted = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, accepted));
  EXPECT_EQ(ads.picks, 1);
}

TEST(relay, a_free_jobs_ad_is_picked_at_its_offer_when_that_comes_before_the_accept) {
  // The scheduler offers a job while it records it, and accepts it after: a quick answer must not
  // wait for the accept (an fsync) before its ad is even picked.
  held_ads ads;
  relay_world world(&ads);
  world.relay.provider_online({"p1", {}});
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_job(world, "held-j1", reply, /*premium=*/false));
  EXPECT_EQ(ads.picks, 0) << "no ad before the scheduler took the job";
  ASSERT_TRUE(world.relay.take_offer("p1", {.job_id = "held-j1", .model = "m", .max_tokens = 10}));
  EXPECT_EQ(ads.picks, 1) << "picked at the offer";
  world.relay.delta("p1", link::delta{"held-j1", "Hello"});
  world.relay.done("p1", link::done{.job_id = "held-j1", .finish_reason = "stop"});
  ASSERT_TRUE(ads.finish_served(imp_1_charge)) << "the impression is recorded as the answer ends";
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u) << "no answer: it is still waiting for its ad, whose pick waits for the accept";
  EXPECT_NE(sent.front().body.find("Sponsored"), std::string::npos) << sent.front().body;
  caf::anon_send(world.scheduler, actors::tick_atom::value);  // the accept, late, for a job already gone
}

TEST(relay, an_ad_recorded_after_its_client_left_is_taken_back_and_not_billed) {
  // The client leaves while the impression is being recorded (an fsync under sync durability):
  // the result must not carry the ad's charge, and the campaign gets its spend back.
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  reply->close();
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  ASSERT_TRUE(world.log->wait_for("result j1", 10s)) << "the provider's work still completes the job";
  const auto events = world.log->events();
  EXPECT_EQ(std::find(events.begin(), events.end(), "ad j1 imp-1"), events.end()) << testing::PrintToString(events);
  EXPECT_EQ(ads.unserved(), std::vector<std::string>{"imp-1: the client left before the answer completed"});
  EXPECT_TRUE(ads.released().empty()) << "recorded, so taken back rather than released";
}

TEST(relay, an_ad_whose_answer_the_scheduler_refuses_to_settle_is_taken_back) {
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply, refused_prompt_tokens));
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 500u) << sent.front().body;
  EXPECT_EQ(sent.front().body.find("Sponsored"), std::string::npos) << "no ad in an error";
  EXPECT_EQ(ads.unserved(),
            std::vector<std::string>{"imp-1: the answer was not settled: job is no longer running on p1"});
  EXPECT_EQ(world.relay.drain(0ms, 10s), 0u);  // returns once the job is forgotten, after any release
  EXPECT_TRUE(ads.released().empty()) << "taken back, not released (the campaign would refuse that)";
}

TEST(relay, an_ad_whose_settlement_the_store_failed_is_kept_for_the_next_start_to_settle) {
  // The end may be recorded (and settled with its ad at the next start): nothing is taken back.
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply, store_failing_prompt_tokens));
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 500u) << sent.front().body;
  EXPECT_TRUE(ads.unserved().empty());
  EXPECT_EQ(world.relay.drain(0ms, 10s), 0u);  // returns once the job is forgotten, after any release
  EXPECT_TRUE(ads.released().empty()) << "recorded: nothing to release";
}

TEST(relay, a_link_lost_while_a_finished_answer_waits_for_its_ad_reports_the_result_before_going_offline) {
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  world.relay.link_lost("p1");
  // The scheduler hears at once that the link is gone (no new job goes there), while the offline
  // notice waits for the result.
  ASSERT_TRUE(world.log->wait_for("link lost p1", 10s));
  // The impression is recorded after the link went: the result still comes first, so that the
  // scheduler does not hand the finished job to another provider.
  ASSERT_TRUE(ads.finish_served());
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  const auto result = std::find(events.begin(), events.end(), "result j1");
  const auto offline = std::find(events.begin(), events.end(), "offline p1");
  ASSERT_NE(result, events.end()) << "no result";
  EXPECT_LT(result, offline) << "the scheduler heard of the provider going offline before the job's result";
  EXPECT_LT(std::find(events.begin(), events.end(), "link lost p1"), result);
}

TEST(relay, a_link_lost_after_the_client_left_a_finished_answer_still_reports_the_result_before_going_offline) {
  // Else the scheduler would hand the finished job to another provider, and its own would not
  // be paid for the answer it gave.
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  reply->close();  // while the answer's ad is being recorded
  world.relay.link_lost("p1");
  ASSERT_TRUE(world.log->wait_for("link lost p1", 10s)) << testing::PrintToString(world.log->events());
  ASSERT_TRUE(ads.finish_served());
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  const auto result = std::find(events.begin(), events.end(), "result j1");
  ASSERT_NE(result, events.end()) << "no result";
  EXPECT_LT(result, std::find(events.begin(), events.end(), "offline p1")) << testing::PrintToString(events);
  EXPECT_EQ(world.relay.live_jobs(), 0u) << "forgotten once its result went";
}

TEST(relay, an_offer_of_an_answer_that_already_finished_is_declined_and_the_job_cancelled) {
  // Its provider's offline notice went out while the answer's ad was still being recorded (past
  // offline_wait_max), and the scheduler offered the job to another provider: that one must not
  // hold a slot, and take the fault of a first token that never comes, for an offer never sent.
  held_ads ads;
  relay_world world(&ads);
  world.relay.provider_online({"p1", {}});
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, false));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(2)));
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  ASSERT_TRUE(world.log->wait_for("started j1", 10s));
  // A late offer of an earlier attempt on the provider that finished the answer (an old link's
  // session) is declined without a cancel, which would end the job whose result is on its way.
  EXPECT_FALSE(world.relay.take_offer("p1", j1_offer(1)));
  EXPECT_FALSE(world.relay.take_offer("p2", j1_offer(3)));
  // Cancels go to the scheduler in order: p1's, had there been one, came first.
  EXPECT_TRUE(world.log->wait_for("cancel j1 only at p2", 10s)) << testing::PrintToString(world.log->events());
  const auto events = world.log->events();
  EXPECT_EQ(std::find(events.begin(), events.end(), "cancel j1 only at p1"), events.end()) << testing::PrintToString(events);
  ASSERT_TRUE(ads.finish_served());
}

TEST(relay, an_ads_pick_reads_the_users_newest_words_first_and_no_more_than_the_auction_does) {
  held_ads ads;
  relay_options options;
  options.ad_prompt_bytes_max = 1'000;
  relay_world world(&ads, options);
  const std::size_t read_max = options.ad_prompt_bytes_max;
  EXPECT_EQ(relay_options{}.ad_prompt_bytes_max, domain::auction_options{}.prompt_bytes_max)
      << "the default is the auction's";
  relay_job job;
  job.job_id = "j1";
  job.user_id = "u1";
  job.request.model = "m";
  job.request.messages = {chat_message{"user", "pizza " + std::string(100'000, 'x')},
                          chat_message{"assistant", "sure"}, chat_message{"user", "a python question"}};
  job.prompt_tokens = 1;
  job.completion_budget = 10;
  job.reply = std::make_shared<recorded_reply>();
  world.relay.submit(std::move(job));
  ASSERT_TRUE(world.log->wait_for("request j1", 10s));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  const auto prompts = ads.prompts();
  ASSERT_EQ(prompts.size(), 1u);
  EXPECT_TRUE(prompts.front().starts_with("a python question\npizza ")) << prompts.front().substr(0, 40);
  EXPECT_EQ(prompts.front().find("sure"), std::string::npos) << "only the user's words";
  EXPECT_LE(prompts.front().size(), read_max + 2) << "the auction reads " << read_max << " bytes";
}

TEST(relay, a_streamed_ad_goes_out_as_its_impression_is_recorded_ahead_of_the_settlement_and_once) {
  // Its client may leave while the answer is settled (which charges the ad): it saw the ad.
  held_ads ads;
  relay_world world(&ads);
  world.relay.provider_online({"p1", {}});
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_job(world, "held-result-j1", reply, /*premium=*/false, /*stream=*/true));
  ASSERT_TRUE(world.relay.take_offer("p1", {.job_id = "held-result-j1", .model = "m", .max_tokens = 10}));
  world.relay.delta("p1", link::delta{"held-result-j1", "Hello"});
  world.relay.done("p1", link::done{.job_id = "held-result-j1", .finish_reason = "stop"});
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  ASSERT_TRUE(world.log->wait_for("result held-result-j1", 10s));  // its answer held back
  EXPECT_NE(reply->written().find("Sponsored: T"), std::string::npos) << reply->written();
  caf::anon_send(world.scheduler, actors::tick_atom::value);
  const auto body = reply->streamed(10s);
  EXPECT_EQ(occurrences(body, "Sponsored: "), 1u) << body;
  EXPECT_LT(body.find("Sponsored: "), body.find(R"("finish_reason":"stop")")) << body;
  EXPECT_NE(body.find(R"("impression_id":"imp-1")"), std::string::npos) << "x_gpustream.ad in the last chunk: " << body;
  EXPECT_TRUE(ads.unserved().empty());
}

TEST(relay, an_empty_free_stream_whose_settlement_is_refused_gets_an_http_error_not_a_stream) {
  // Its head goes out with its end: the ad, recorded before the settlement, is no piece.
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply, refused_prompt_tokens, /*stream=*/true));
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u) << reply->written();
  EXPECT_EQ(sent.front().status, 500u) << sent.front().body;
  EXPECT_TRUE(reply->written().empty()) << reply->written();
}

TEST(relay, an_empty_free_stream_gets_its_ad_with_its_end) {
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply, 0, /*stream=*/true));
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  const auto body = reply->streamed(10s);
  EXPECT_EQ(occurrences(body, "Sponsored: "), 1u) << body;
  EXPECT_NE(body.find(R"("role":"assistant")"), std::string::npos) << "the ad's chunk is the first: " << body;
}

TEST(relay, an_ad_whose_impression_could_not_be_recorded_is_taken_back) {
  held_ads ads;
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  EXPECT_TRUE(ads.unserved().empty());
  ASSERT_TRUE(ads.finish_served());  // not recorded, as far as is known: the answer goes without it
  ASSERT_TRUE(world.log->wait_for("result j1", 10s));
  // Its budget, pacing and the user's frequency cap are not held until the reservation expires;
  // and had its recording been written after all (its answer lost), its spend comes back too,
  // which a release (refused for a recorded impression) would not give.
  EXPECT_EQ(ads.unserved(), std::vector<std::string>{"imp-1: its impression could not be recorded"});
  EXPECT_TRUE(ads.released().empty());
}

TEST(relay, a_client_leaving_after_its_provider_finished_sends_no_cancel_and_the_result_completes_the_job) {
  held_ads ads;
  metrics_seen seen;
  relay_world world(&ads, seen.options());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  reply->close();  // while the answer's ad is being recorded
  EXPECT_TRUE(seen.statuses().empty()) << "counted as the scheduler answers its result";
  ASSERT_TRUE(ads.finish_served());
  ASSERT_TRUE(world.log->wait_for("result j1", 10s));
  ASSERT_TRUE(seen.wait_for_ends(1, 10s));
  EXPECT_EQ(seen.statuses(), std::vector<domain::job_status>{domain::job_status::completed}) << "its result completes it";
  world.relay.link_lost("p1");  // a flush: the result's answer, if any, comes before its notice
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  EXPECT_EQ(seen.statuses().size(), 1u) << "counted once";
  const auto events = world.log->events();
  EXPECT_EQ(std::find_if(events.begin(), events.end(), [](const std::string& e) { return e.starts_with("cancel j1"); }),
            events.end())
      << testing::PrintToString(events);
}

TEST(relay, a_client_leaving_while_a_finished_answer_waits_for_its_ad_pick_completes_the_job) {
  // A quick answer ends before its ad is picked; its client leaves then. The provider finished the
  // work: the job completes without the ad (no cancel), as it does a moment later.
  held_ads ads(/*hold_picks=*/true);
  metrics_seen seen;
  relay_world world(&ads, seen.options());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  EXPECT_EQ(ads.picks, 1);
  reply->close();
  ASSERT_TRUE(world.log->wait_for("result j1", 10s)) << testing::PrintToString(world.log->events());
  ASSERT_TRUE(seen.wait_for_ends(1, 10s));
  EXPECT_EQ(seen.statuses(), std::vector<domain::job_status>{domain::job_status::completed});
  ASSERT_TRUE(ads.finish_pick());
  EXPECT_EQ(ads.released(), std::vector<std::string>{"imp-1"}) << "picked too late: given back";
  world.relay.link_lost("p1");  // a flush: whatever the relay told the scheduler comes before this
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  EXPECT_EQ(std::find_if(events.begin(), events.end(), [](const std::string& e) { return e.starts_with("cancel j1"); }),
            events.end())
      << testing::PrintToString(events);
  EXPECT_EQ(std::find(events.begin(), events.end(), "ad j1 imp-1"), events.end()) << testing::PrintToString(events);
  EXPECT_EQ(seen.statuses().size(), 1u) << "counted once";
}

TEST(relay, a_client_leaving_after_its_provider_finished_counts_a_failed_job_when_its_result_is_not_settled) {
  held_ads ads;
  metrics_seen seen;
  relay_world world(&ads, seen.options());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply, store_failing_prompt_tokens));
  reply->close();  // while the answer's ad is being recorded
  ASSERT_TRUE(ads.finish_served());
  ASSERT_TRUE(seen.wait_for_ends(1, 10s));
  world.relay.link_lost("p1");  // a flush: the result's answer comes before its notice
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  EXPECT_EQ(seen.statuses(), std::vector<domain::job_status>{domain::job_status::failed}) << "not completed";
}

TEST(relay, a_providers_end_of_a_job_nobody_waits_for_cancels_it_when_the_clients_cancel_was_not_recorded) {
  // Else the scheduler would hold the job running on the provider, its slot taken, for good.
  relay_world world;
  world.relay.provider_online({"p1", {}});
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_job(world, "store-fails-j1", reply, /*premium=*/true, /*stream=*/true));
  ASSERT_TRUE(world.relay.take_offer("p1", {.job_id = "store-fails-j1", .model = "m", .max_tokens = 10}));
  world.relay.delta("p1", link::delta{"store-fails-j1", "Hello"});
  reply->close();
  ASSERT_TRUE(world.log->wait_for("cancel failed store-fails-j1", 10s)) << testing::PrintToString(world.log->events());
  world.relay.done("p1", link::done{.job_id = "store-fails-j1", .finish_reason = "stop"});
  EXPECT_TRUE(world.log->wait_for("cancel store-fails-j1 0", 10s)) << testing::PrintToString(world.log->events());
}

TEST(relay, a_client_leaving_mid_stream_counts_the_tokens_it_got_and_a_cancelled_job) {
  metrics_seen seen;
  relay_world world(nullptr, seen.options());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  for (const char* piece : {"one", " two", " three"}) world.relay.delta("p1", link::delta{"j1", piece});
  reply->close();
  ASSERT_TRUE(world.log->wait_for("cancel j1 3", 10s)) << testing::PrintToString(world.log->events());
  EXPECT_EQ(seen.statuses(), std::vector<domain::job_status>{domain::job_status::cancelled});
  EXPECT_EQ(seen.tokens(), 3u);
}

TEST(relay, the_offline_notice_waits_for_a_finished_answer_at_most_offline_wait_max) {
  held_ads ads;
  relay_options options;
  options.offline_wait_max = 200ms;
  relay_world world(&ads, options);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(finish_a_free_job_on_p1(world, reply));
  const auto lost_at = std::chrono::steady_clock::now();
  world.relay.link_lost("p1");
  // The impression is never recorded: the provider still goes offline, once the wait is over.
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  EXPECT_GE(std::chrono::steady_clock::now() - lost_at, options.offline_wait_max);
  const auto events = world.log->events();
  EXPECT_EQ(std::find(events.begin(), events.end(), "result j1"), events.end());
}

TEST(relay, a_drain_cuts_short_an_answer_still_running_at_its_end_billing_its_tokens_and_refuses_new_jobs) {
  metrics_seen seen;
  relay_world world(nullptr, seen.options());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.delta("p1", link::delta{"j1", "Hello"});
  world.relay.delta("p1", link::delta{"j1", " there"});
  EXPECT_EQ(world.relay.drain(50ms, 10s), 1u);
  EXPECT_TRUE(world.log->wait_for("cancel refused j1", 10s)) << testing::PrintToString(world.log->events());
  EXPECT_TRUE(world.log->wait_for("cancel j1 2", 10s)) << "tried again: " << testing::PrintToString(world.log->events());
  const auto body = reply->streamed(10s);
  EXPECT_NE(body.find("Hello"), std::string::npos) << body;
  EXPECT_NE(body.find("\"finish_reason\":\"error\""), std::string::npos) << body;
  EXPECT_NE(body.find("cut short after 2 tokens"), std::string::npos) << body;
  EXPECT_NE(body.find("\"usage\""), std::string::npos) << "the usage billed: " << body;
  EXPECT_NE(body.find("[DONE]"), std::string::npos) << body;
  EXPECT_EQ(seen.statuses(), std::vector<domain::job_status>{domain::job_status::cancelled});
  EXPECT_EQ(seen.tokens(), 2u) << "the tokens the client got count in the metrics";
  // No new job while the node stops.
  auto late = std::make_shared<recorded_reply>();
  relay_job job;
  job.job_id = "j2";
  job.user_id = "u1";
  job.request.model = "m";
  job.reply = late;
  world.relay.submit(std::move(job));
  const auto sent = late->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 503u);
  EXPECT_NE(sent.front().body.find("server_shutting_down"), std::string::npos) << sent.front().body;
}

TEST(relay, a_drain_cutting_short_a_whole_answer_bills_none_of_its_tokens_the_client_never_got) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, false));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.delta("p1", link::delta{"j1", "Hello"});
  world.relay.delta("p1", link::delta{"j1", " there"});
  EXPECT_EQ(world.relay.drain(50ms, 10s), 1u);
  EXPECT_TRUE(world.log->wait_for("cancel j1 0", 10s)) << testing::PrintToString(world.log->events());
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent.front().status, 503u);
  EXPECT_EQ(sent.front().body.find("Hello"), std::string::npos) << sent.front().body;
  EXPECT_NE(sent.front().body.find("cut short after 0 tokens"), std::string::npos) << sent.front().body;
}

TEST(relay, what_the_provider_sends_after_a_drain_cut_its_answer_is_neither_relayed_nor_taken_as_its_end) {
  relay_options options;
  options.cancel_retry_wait = std::chrono::hours(1);  // the cut's cancel, refused once, waits
  relay_world world(nullptr, options);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.delta("p1", link::delta{"j1", "Hello"});
  EXPECT_EQ(world.relay.drain(50ms, 0ms), 1u);
  ASSERT_TRUE(world.log->wait_for("cancel refused j1", 10s)) << testing::PrintToString(world.log->events());
  // The job is still live, its cancel to be tried again: its provider's late piece and end come.
  world.relay.delta("p1", link::delta{"j1", " late"});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop"});
  EXPECT_NE(reply->written().find("Hello"), std::string::npos) << reply->written();
  EXPECT_EQ(reply->written().find("late"), std::string::npos) << reply->written();
  // The end was not taken as the answer's (a finishing job's client leaving sends no cancel).
  reply->close();
  EXPECT_TRUE(world.log->wait_for("cancel j1 1", 10s)) << testing::PrintToString(world.log->events());
  const auto events = world.log->events();
  EXPECT_EQ(std::find(events.begin(), events.end(), "result j1"), events.end()) << testing::PrintToString(events);
}

/// Options whose cancel_retries_max makes the scheduler's first refusal of a cancel the last try.
relay_options one_cancel_try() {
  relay_options options;
  options.cancel_retries_max = 1;
  return options;
}

/// Premium job j1 (streamed or not) gets `pieces` from p1, then a drain cuts it short, whose
/// cancel the test's scheduler refuses once (with one_cancel_try, for good).
void drain_j1_after(relay_world& world, const std::shared_ptr<recorded_reply>& reply, bool stream,
                    const std::vector<std::string>& pieces) {
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, stream));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  for (const auto& piece : pieces) world.relay.delta("p1", link::delta{"j1", piece});
  EXPECT_EQ(world.relay.drain(50ms, 10s), 1u);
}

TEST(relay, a_cancel_refused_cancel_retries_max_times_still_ends_the_answer_with_the_most_it_bills) {
  relay_world world(nullptr, one_cancel_try());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(drain_j1_after(world, reply, /*stream=*/true, {"Hello"}));
  const auto body = reply->streamed(10s);
  EXPECT_NE(body.find("\"finish_reason\":\"error\""), std::string::npos) << body;
  EXPECT_NE(body.find("cut short after 1 tokens"), std::string::npos) << body;
  // What was billed is not known; the last chunk's usage is the most it can be.
  EXPECT_NE(body.find(R"("usage":{"prompt_tokens":1,"completion_tokens":1,)"), std::string::npos) << body;
  EXPECT_NE(body.find("at most 1 prompt and 1 completion tokens are billed"), std::string::npos) << body;
  const auto events = world.log->events();
  EXPECT_EQ(std::count(events.begin(), events.end(), "cancel refused j1"), 1) << testing::PrintToString(events);
  EXPECT_EQ(std::find(events.begin(), events.end(), "cancel j1 1"), events.end()) << "not tried again";
}

TEST(relay, a_whole_answer_a_drain_could_not_cancel_bills_at_most_none_of_its_tokens) {
  relay_world world(nullptr, one_cancel_try());
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(drain_j1_after(world, reply, /*stream=*/false, {"Hello", " there"}));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_NE(sent.front().body.find("cut short after 0 tokens"), std::string::npos) << sent.front().body;
  EXPECT_NE(sent.front().body.find("at most 1 prompt and 0 completion tokens are billed"), std::string::npos)
      << "the client got none of them: " << sent.front().body;
}

TEST(relay, a_drain_lets_an_answer_that_ends_within_its_wait_complete) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.delta("p1", link::delta{"j1", "Hello"});
  auto draining = std::async(std::launch::async, [&] { return world.relay.drain(60s, 10s); });
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop"});
  ASSERT_EQ(draining.wait_for(10s), std::future_status::ready) << "the drain ends once the last answer did";
  EXPECT_EQ(draining.get(), 0u);
  EXPECT_TRUE(world.log->wait_for("result j1", 10s));
  const auto events = world.log->events();
  EXPECT_EQ(std::find_if(events.begin(), events.end(), [](const std::string& e) { return e.starts_with("cancel j1"); }),
            events.end());
  const auto body = reply->streamed(10s);
  EXPECT_NE(body.find("\"finish_reason\":\"stop\""), std::string::npos) << body;
}

TEST(relay, a_provider_the_job_was_taken_from_is_not_relayed_any_more) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer()));
  world.relay.delta("p1", link::delta{"j1", "early "});
  // The scheduler takes the job from p1 (it cancels it there): what p1 still sends is dropped.
  world.relay.revoke("p1", "j1");
  world.relay.delta("p1", link::delta{"j1", "late "});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop"});  // not the job's end
  // The next provider continues from what the client got, which has no late token in it.
  const auto offer = world.relay.take_offer("p2", j1_offer());
  ASSERT_TRUE(offer);
  EXPECT_NE(offer->request_json.find("early "), std::string::npos) << offer->request_json;
  EXPECT_EQ(offer->request_json.find("late "), std::string::npos) << offer->request_json;
}

TEST(relay, a_job_offered_again_to_the_provider_it_was_taken_from_relays_only_the_new_attempt) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  const auto first = world.relay.take_offer("p1", j1_offer(1));
  ASSERT_TRUE(first);
  EXPECT_EQ(first->attempt, 1u);
  world.relay.delta("p1", link::delta{"j1", "old ", 1});
  // Taken from p1 and, p1 being the only provider of the model, offered to it again.
  world.relay.revoke("p1", "j1");
  const auto second = world.relay.take_offer("p1", j1_offer(2));
  ASSERT_TRUE(second);
  EXPECT_EQ(second->attempt, 2u);
  // What p1 sent for the first attempt before it saw the cancel arrives after the new offer.
  world.relay.delta("p1", link::delta{"j1", "stale ", 1});
  world.relay.failed("p1", link::job_error{.job_id = "j1", .message = "cancelled", .attempt = 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  world.relay.delta("p1", link::delta{"j1", "new", 2});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("content":"old new")"), std::string::npos) << body;
  EXPECT_EQ(body.find("stale"), std::string::npos) << body;
  EXPECT_NE(body.find(R"("failover":1)"), std::string::npos) << body;
  const auto events = world.log->events();
  EXPECT_EQ(std::count(events.begin(), events.end(), "result j1"), 1) << "one result, the second attempt's";
}

TEST(relay, a_reasoning_models_thinking_reaches_a_chat_client_apart_from_the_answer_and_counts) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "6 times ", .attempt = 1, .reasoning = true});
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "7", .attempt = 1, .reasoning = true});
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "42", .attempt = 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("content":"42","reasoning_content":"6 times 7")"), std::string::npos) << body;
  EXPECT_NE(body.find(R"("completion_tokens":3)"), std::string::npos) << body;
  EXPECT_TRUE(world.log->wait_for("tokens j1 3", 10s)) << "the thinking is billed as the answer is";
}

TEST(relay, a_finish_reason_outside_openais_set_reaches_the_client_as_one_inside_it) {
  for (const auto& [backend, client] : {std::pair{"eos_token", "stop"}, std::pair{"max_tokens", "length"},
                                        std::pair{"error", "stop"}, std::pair{"length", "length"}}) {
    relay_world world;
    auto reply = std::make_shared<recorded_reply>();
    ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
    ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
    world.relay.delta("p1", link::delta{.job_id = "j1", .text = "42", .attempt = 1});
    world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = backend, .attempt = 1});
    const auto body = answered_body(*reply);
    EXPECT_NE(body.find(std::string(R"("finish_reason":")") + client + '"'), std::string::npos) << backend << body;
  }
}

TEST(relay, the_clients_usage_counts_the_prompt_as_the_scheduler_billed_it) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, false, 20));  // estimated at 20
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "42", .attempt = 1});
  // The backend's count goes to the scheduler, whose answer names what was billed.
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .prompt_tokens_reported = 7, .attempt = 1});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("prompt_tokens":7,"completion_tokens":1)"), std::string::npos) << body;
}

/// A premium job j1 answered "42" by p1, whose end the scheduler's store fails to record.
void answer_j1_unsettled(relay_world& world, const std::shared_ptr<recorded_reply>& reply, bool stream) {
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, stream));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "42", .attempt = 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop",
                                    .prompt_tokens_reported = store_failing_prompt_tokens, .attempt = 1});
}

TEST(relay, an_answer_the_store_fails_to_settle_ends_in_an_error_without_the_stores_words_with_the_most_it_bills) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(answer_j1_unsettled(world, reply, true));
  const auto body = reply->streamed(10s);
  EXPECT_NE(body.find(R"("finish_reason":"error")"), std::string::npos) << body;
  EXPECT_NE(body.find("the answer could not be settled"), std::string::npos) << body;
  EXPECT_EQ(body.find("/srv/gpustream"), std::string::npos) << body;
  // What is billed is not known; the last chunk's usage is the most it can be.
  EXPECT_NE(body.find(R"("usage":{"prompt_tokens":1,"completion_tokens":1,)"), std::string::npos) << body;
  EXPECT_NE(body.find("at most 1 prompt and 1 completion tokens are billed"), std::string::npos) << body;
}

TEST(relay, a_whole_answer_the_store_fails_to_settle_tells_the_sdk_not_to_retry_since_it_may_be_billed) {
  // The OpenAI SDKs retry a 5xx by themselves: a retry of an answer whose bill may be recorded
  // (and settled at the next start) would be billed twice.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(answer_j1_unsettled(world, reply, false));
  const auto sent = reply->sent(10s);
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0].status, 500u) << sent[0].body;
  EXPECT_NE(sent[0].body.find("at most 1 prompt and 1 completion tokens are billed"), std::string::npos) << sent[0].body;
  EXPECT_NE(std::find(sent[0].headers.begin(), sent[0].headers.end(), std::pair<std::string, std::string>{"x-should-retry", "false"}),
            sent[0].headers.end());
}

TEST(relay, the_clients_usage_counts_the_answer_as_billed_not_past_its_budget) {
  // A backend that runs past the job's budget (it was sent no max_tokens): the client gets every
  // piece, and its usage says what it pays for, as the scheduler billed it.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, false, 20));  // a budget of 10
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (int i = 0; i < 12; ++i) world.relay.delta("p1", link::delta{.job_id = "j1", .text = "x", .attempt = 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .prompt_tokens_reported = 7, .attempt = 1});
  const auto body = answered_body(*reply);
  EXPECT_TRUE(world.log->wait_for("tokens j1 12", 10s)) << "the scheduler is told every piece";
  EXPECT_NE(body.find(R"("content":"xxxxxxxxxxxx")"), std::string::npos) << body;
  EXPECT_NE(body.find(R"("prompt_tokens":7,"completion_tokens":10,"total_tokens":17)"), std::string::npos) << body;
}

TEST(relay, an_attempt_is_timed_from_the_offer_with_the_agents_decoding_time_bounded_by_what_the_relay_saw) {
  // The times score the provider and rank it for `fastest`. The first token's is the relay's own;
  // the decoding's is the agent's (the link's batching may bring a whole answer at once), within
  // what the relay saw: at least from the first piece to the done, at most from the offer to it.
  // An agent could make its figures up: a negative first-token time made the outcome
  // unrecordable, which dodged the suspicion counters.
  constexpr std::int64_t gap_us = 2'000;  // kept between the first piece and the done
  struct timing_case {
    std::int64_t agent_ttft_us;
    std::int64_t agent_total_us;
  };
  for (const auto& c : {timing_case{-1'000'000, 1}, timing_case{0, 10'000'000}}) {
    SCOPED_TRACE("agent " + std::to_string(c.agent_ttft_us) + " / " + std::to_string(c.agent_total_us));
    relay_world world;
    auto reply = std::make_shared<recorded_reply>();
    ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
    const auto before_offer = std::chrono::steady_clock::now();
    ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
    world.relay.delta("p1", link::delta{.job_id = "j1", .text = "x", .attempt = 1});
    // A wait on the clock, not on another thread: the relay sees at least this much decoding.
    const auto gap_end = std::chrono::steady_clock::now() + std::chrono::microseconds(gap_us);
    while (std::chrono::steady_clock::now() < gap_end) {
    }
    world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .ttft_us = c.agent_ttft_us,
                                      .total_us = c.agent_total_us, .attempt = 1});
    (void)answered_body(*reply);
    ASSERT_TRUE(world.log->wait_for("result j1", 10s));
    const auto bound_us =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - before_offer).count();
    const auto events = world.log->events();
    const auto timing =
        std::find_if(events.begin(), events.end(), [](const std::string& e) { return e.starts_with("timing j1 "); });
    ASSERT_NE(timing, events.end());
    std::int64_t ttft_us = -1;
    std::int64_t total_us = -1;
    std::istringstream(timing->substr(std::string_view("timing j1 ").size())) >> ttft_us >> total_us;
    EXPECT_GE(ttft_us, 0) << *timing;
    EXPECT_LE(ttft_us, bound_us) << *timing;
    EXPECT_GE(total_us - ttft_us, gap_us) << "1 us claimed, at least what the relay saw: " << *timing;
    EXPECT_LE(total_us - ttft_us, bound_us) << "10 s claimed, at most the offer to the done: " << *timing;
  }
}

TEST(relay, an_answer_running_past_its_budget_is_cut_off_as_by_its_length) {
  // A backend that ignores max_tokens (or never stops): with a budget of 10, the answer ends at
  // 10 + 16 pieces (the least slack), and the scheduler is told to stop its provider.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (int i = 0; i < 40; ++i) world.relay.delta("p1", link::delta{.job_id = "j1", .text = "x", .attempt = 1});
  // What the provider still sends is not the client's any more: its end, while the cut answer
  // is being settled, is not a second result.
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  const auto stream = reply->streamed(10s);
  ASSERT_FALSE(stream.empty()) << "the stream did not finish";
  const auto pieces = occurrences(stream, R"("content":"x")");
  EXPECT_EQ(pieces, 26u) << stream;
  EXPECT_NE(stream.find(R"("finish_reason":"length")"), std::string::npos) << stream;
  EXPECT_NE(stream.find(R"("completion_tokens":10)"), std::string::npos) << "billed at its budget: " << stream;
  EXPECT_TRUE(world.log->wait_for("cut j1", 10s));
  EXPECT_TRUE(world.log->wait_for("tokens j1 26", 10s));
  // Its provider was told to stop at the cut, before the result was settled.
  const auto told = world.log->events();
  const auto stop = std::find(told.begin(), told.end(), "stop j1 at p1");
  ASSERT_NE(stop, told.end()) << testing::PrintToString(told);
  EXPECT_LT(stop, std::find(told.begin(), told.end(), "result j1")) << testing::PrintToString(told);
  // A report of the late end would reach the scheduler before p1's offline notice, which goes the
  // same way.
  world.relay.link_lost("p1");
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  EXPECT_EQ(std::count(events.begin(), events.end(), "result j1"), 1) << testing::PrintToString(events);
}

TEST(relay, an_answer_cut_off_while_its_ad_is_still_being_picked_has_its_provider_told_to_stop_at_once) {
  held_ads ads(/*hold_picks=*/true);
  relay_world world(&ads);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, /*premium=*/false, /*stream=*/true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (int i = 0; i < 40; ++i) world.relay.delta("p1", link::delta{.job_id = "j1", .text = "x", .attempt = 1});
  EXPECT_TRUE(world.log->wait_for("stop j1 at p1", 10s)) << "the stop waited for the ad: "
                                                         << testing::PrintToString(world.log->events());
  ASSERT_TRUE(ads.finish_pick());
  ASSERT_TRUE(ads.finish_served(imp_1_charge));
  const auto stream = reply->streamed(10s);
  EXPECT_NE(stream.find(R"("finish_reason":"length")"), std::string::npos) << "the answer ends with its ad: " << stream;
}

TEST(relay, an_answer_of_huge_pieces_is_cut_off_by_its_bytes) {
  // An agent may send up to 64 KiB a piece. Pieces of 1,000 bytes end the answer:
  // - with a budget of 10 (26 pieces at most, 26 × 128 = 3,328 bytes) at the fourth, not the 26th;
  // - with a budget of 100,000 (125,000 pieces of 128 bytes, 16 MB) at answer_bytes_max, here
  //   10,000, whatever window a provider claims for its model.
  struct cut_case {
    std::uint32_t budget;
    std::size_t pieces;
  };
  for (const auto [budget, pieces] : {cut_case{10, 4}, cut_case{100'000, 11}}) {
    relay_options options;
    options.answer_bytes_max = 10'000;
    relay_world world(nullptr, options);
    auto reply = std::make_shared<recorded_reply>();
    ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true, 1, budget));
    ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
    const std::string piece(1000, 'y');
    for (int i = 0; i < 40; ++i) world.relay.delta("p1", link::delta{.job_id = "j1", .text = piece, .attempt = 1});
    const auto stream = reply->streamed(10s);
    ASSERT_FALSE(stream.empty()) << "the stream did not finish";
    EXPECT_EQ(occurrences(stream, piece), pieces) << budget;
    EXPECT_NE(stream.find(R"("finish_reason":"length")"), std::string::npos) << stream;
    EXPECT_TRUE(world.log->wait_for("cut j1", 10s));
    EXPECT_TRUE(world.log->wait_for("tokens j1 " + std::to_string(pieces), 10s));
  }
}

TEST(relay, after_a_failover_the_cut_counts_what_the_next_attempt_was_asked_for) {
  // max_tokens 100: p1 sends 90 and breaks off; p2 is asked for the 10 left and ignores it. It is
  // cut at 10 + 16 (the least slack) of its own, 116 in all, not at 90 + 125.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true, 1, 100));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (int i = 0; i < 90; ++i) world.relay.delta("p1", link::delta{.job_id = "j1", .text = "x", .attempt = 1});
  world.relay.revoke("p1", "j1");
  const auto second = world.relay.take_offer("p2", j1_offer(2));
  ASSERT_TRUE(second);
  EXPECT_NE(second->request_json.find(R"("max_tokens":10)"), std::string::npos) << second->request_json;
  for (int i = 0; i < 40; ++i) world.relay.delta("p2", link::delta{.job_id = "j1", .text = "x", .attempt = 2});
  const auto stream = reply->streamed(10s);
  ASSERT_FALSE(stream.empty()) << "the stream did not finish";
  const auto pieces = occurrences(stream, R"("content":"x")");
  EXPECT_EQ(pieces, 116u);
  EXPECT_TRUE(world.log->wait_for("cut j1", 10s));
}

TEST(relay, an_empty_streamed_answer_still_opens_with_the_assistants_role) {
  // OpenAI's chat streams always open with {"role":"assistant","content":""}; SDKs that build the
  // message from the deltas take the role from there.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  const auto stream = reply->streamed(10s);
  ASSERT_FALSE(stream.empty()) << "the stream did not finish";
  const auto first = stream.substr(0, stream.find("\n\n"));
  EXPECT_NE(first.find(R"("delta":{"role":"assistant","content":""})"), std::string::npos) << stream;
  EXPECT_EQ(stream.find(R"("role")", first.size()), std::string::npos) << "the role comes once: " << stream;
  EXPECT_NE(stream.find(R"("finish_reason":"stop")"), std::string::npos) << stream;
}

/// Submits j1, a premium user's completion (no chat) with a budget of 10.
void submit_completion_j1(relay_world& world, const std::shared_ptr<recorded_reply>& reply) {
  relay_job job;
  job.job_id = "j1";
  job.user_id = "u1";
  job.premium = true;
  job.request.kind = request_kind::completion;
  job.request.model = "m";
  job.request.prompt = "once";
  job.prompt_tokens = 1;
  job.completion_budget = 10;
  job.reply = reply;
  world.relay.submit(std::move(job));
  ASSERT_TRUE(world.log->wait_for("request j1", 10s));
}

TEST(relay, a_completion_has_no_place_for_thinking_so_it_is_neither_shown_nor_counted) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_completion_j1(world, reply));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "hmm", .attempt = 1, .reasoning = true});
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = " upon", .attempt = 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("text":" upon")"), std::string::npos) << body;
  EXPECT_EQ(body.find("hmm"), std::string::npos) << body;
  EXPECT_TRUE(world.log->wait_for("tokens j1 1", 10s));
}

TEST(relay, a_completion_whose_backend_thinks_for_ever_is_cut_off_by_its_bytes) {
  // Thinking a completion neither shows nor counts still bounds the answer: with a budget of 10
  // (3,328 bytes), 1,000-byte pieces of it end the answer at the fourth.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_completion_j1(world, reply));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (int i = 0; i < 40; ++i) {
    world.relay.delta("p1", link::delta{.job_id = "j1", .text = std::string(1000, 'h'), .attempt = 1, .reasoning = true});
  }
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("finish_reason":"length")"), std::string::npos) << body;
  EXPECT_TRUE(world.log->wait_for("cut j1", 10s));
  EXPECT_TRUE(world.log->wait_for("tokens j1 0", 10s));
}

TEST(relay, the_same_attempt_offered_again_on_a_new_link_is_no_new_failover) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{"j1", "half ", 1});
  world.relay.revoke("p1", "j1");
  // Attempt 2 goes to p2, whose link is replaced before a token: the scheduler offers attempt 2
  // again, on the new link. One failover, not two.
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  world.relay.delta("p2", link::delta{"j1", "whole", 2});
  world.relay.done("p2", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("content":"half whole")"), std::string::npos) << body;
  EXPECT_NE(body.find(R"("failover":1)"), std::string::npos) << body;
}

TEST(relay, an_answer_broken_off_while_it_was_thinking_counts_its_failover) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "hmm", .attempt = 1, .reasoning = true});
  world.relay.revoke("p1", "j1");
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  world.relay.delta("p2", link::delta{.job_id = "j1", .text = "42", .attempt = 2});
  world.relay.done("p2", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("failover":1)"), std::string::npos) << "the client saw the thinking break off: " << body;
}

TEST(relay, a_provider_silent_in_the_middle_of_an_answer_loses_it_to_another) {
  relay_options options;
  options.piece_silence_max = 300ms;  // far above a stall of the test's own thread
  options.silence_check_interval = 10ms;
  relay_world world(nullptr, options);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "half ", .attempt = 1});
  // Then nothing, while p1's link lives: the job is reported failed there, once.
  ASSERT_TRUE(world.log->wait_for("failure j1 p1 provider 1", 10s));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "late ", .attempt = 1});
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  world.relay.delta("p2", link::delta{.job_id = "j1", .text = "whole", .attempt = 2});
  world.relay.done("p2", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  const auto stream = reply->streamed(10s);
  EXPECT_EQ(stream.find("late"), std::string::npos) << "what the silent provider sent later is not relayed: " << stream;
  EXPECT_NE(stream.find("whole"), std::string::npos) << stream;
  const auto events = world.log->events();
  EXPECT_EQ(std::count(events.begin(), events.end(), "failure j1 p1 provider 1"), 1) << testing::PrintToString(events);
}

TEST(relay, a_job_lost_with_its_providers_link_is_reported_so) {
  // The scheduler counts one link's loss against its provider once, whatever the jobs it took.
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "half ", .attempt = 1});
  world.relay.link_lost("p1");
  EXPECT_TRUE(world.log->wait_for("failure j1 p1 provider 1 with link", 10s)) << testing::PrintToString(world.log->events());
  // The link's loss first: the scheduler, deciding where the answer goes on, must not count on
  // p1 taking it back; then the offline notice.
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  const auto failure = std::find(events.begin(), events.end(), "failure j1 p1 provider 1 with link");
  EXPECT_LT(std::find(events.begin(), events.end(), "link lost p1"), failure) << testing::PrintToString(events);
  EXPECT_LT(failure, std::find(events.begin(), events.end(), "offline p1")) << testing::PrintToString(events);
}

TEST(relay, a_failure_is_reported_once_even_when_the_link_goes_after_it) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{.job_id = "j1", .text = "half ", .attempt = 1});
  world.relay.failed("p1", link::job_error{.job_id = "j1", .message = "dropped", .upstream_fault = true, .attempt = 1});
  world.relay.link_lost("p1");
  ASSERT_TRUE(world.log->wait_for("offline p1", 10s));
  const auto events = world.log->events();
  EXPECT_EQ(std::count_if(events.begin(), events.end(), [](const std::string& e) { return e.starts_with("failure j1"); }), 1)
      << testing::PrintToString(events);
}

TEST(relay, an_offer_of_an_earlier_attempt_that_arrives_late_is_declined) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
  // Attempt 1 went to p1 and attempt 2 to p2; p2's session happens to take its offer first.
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  EXPECT_FALSE(world.relay.take_offer("p1", j1_offer(1)));
  // The job stays p2's.
  world.relay.delta("p2", link::delta{"j1", "answer", 2});
  world.relay.done("p2", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 2});
  const auto body = answered_body(*reply);
  EXPECT_NE(body.find(R"("content":"answer")"), std::string::npos) << body;
}

TEST(relay, an_empty_piece_is_no_token) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  for (const char* text : {"", "a", "", "", "b"}) world.relay.delta("p1", link::delta{"j1", text, 1});
  world.relay.done("p1", link::done{.job_id = "j1", .finish_reason = "stop", .attempt = 1});
  ASSERT_TRUE(world.log->wait_for("tokens j1 2", 10s)) << testing::PrintToString(world.log->events());
}

TEST(relay, tells_the_scheduler_whose_fault_a_failure_reported_by_the_agent_was) {
  struct failure_case {
    link::job_error error;
    bool tokens_first;  // a token reached the client before the error
    const char* told;
  };
  for (const auto& [error, tokens_first, told] : {
           // The backend failed: the provider's fault.
           failure_case{{.job_id = "j1", .message = "backend 503", .upstream_fault = true, .attempt = 1}, false, "failure j1 p1 provider 0"},
           // The backend refused the request itself (HTTP 400): nobody's fault yet.
           failure_case{{.job_id = "j1", .message = "backend 400", .attempt = 1, .request_rejected = true}, false, "failure j1 p1 request 0"},
           // ... which comes before an answer: after a token, a "rejection" is the provider's failure.
           failure_case{{.job_id = "j1", .message = "backend 400", .attempt = 1, .request_rejected = true}, true, "failure j1 p1 provider 1"},
           // The agent declined the offer (at capacity).
           failure_case{{.job_id = "j1", .message = "at capacity", .attempt = 1}, false, "failure j1 p1 declined 0"},
           // A "decline" after a token went out is a failure of the provider.
           failure_case{{.job_id = "j1", .message = "at capacity", .attempt = 1}, true, "failure j1 p1 provider 1"},
           failure_case{{.job_id = "j1", .tokens_so_far = 3, .message = "at capacity", .attempt = 1}, false, "failure j1 p1 provider 0"},
       }) {
    SCOPED_TRACE(told);
    relay_world world;
    auto reply = std::make_shared<recorded_reply>();
    ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
    ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
    if (tokens_first) world.relay.delta("p1", link::delta{"j1", "tok ", 1});
    world.relay.failed("p1", error);
    EXPECT_TRUE(world.log->wait_for(told, 10s)) << testing::PrintToString(world.log->events());
  }
}

TEST(relay, a_decline_after_a_failover_is_no_fault_of_the_provider_that_declined) {
  relay_world world;
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  ASSERT_TRUE(world.relay.take_offer("p1", j1_offer(1)));
  world.relay.delta("p1", link::delta{"j1", "tok ", 1});
  world.relay.revoke("p1", "j1");  // p1 dropped it; the answer so far goes to p2
  ASSERT_TRUE(world.relay.take_offer("p2", j1_offer(2)));
  world.relay.failed("p2", link::job_error{.job_id = "j1", .message = "at capacity", .attempt = 2});
  EXPECT_TRUE(world.log->wait_for("failure j1 p2 declined 1", 10s)) << testing::PrintToString(world.log->events());
}

TEST(relay, a_continuation_too_large_for_the_link_fails_the_job_instead_of_reaching_a_provider) {
  // An agent refuses a frame over its limit and drops its link (every job on it lost): an answer
  // so far that makes the failover's request too large goes to no provider.
  relay_options options;
  options.offer_request_bytes_max = 1'000;
  relay_world world(nullptr, options);
  auto reply = std::make_shared<recorded_reply>();
  ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true, true));
  const auto first = world.relay.take_offer("p1", j1_offer(1));
  ASSERT_TRUE(first);
  EXPECT_LT(first->request_json.size(), 1'000u);
  for (int i = 0; i < 10; ++i) world.relay.delta("p1", link::delta{"j1", std::string(100, 'x'), 1});
  world.relay.revoke("p1", "j1");  // p1 dropped it; the answer so far would go to p2
  EXPECT_FALSE(world.relay.take_offer("p2", j1_offer(2))) << "no frame for p2";
  EXPECT_TRUE(world.log->wait_for("failure j1 p2 platform 10", 10s)) << testing::PrintToString(world.log->events());
}

TEST(relay, a_job_the_scheduler_ended_gets_the_status_its_failure_calls_for) {
  struct failure_case {
    events::failure_reason reason;
    unsigned status;
    const char* code;
  };
  for (const auto& [reason, status, code] :
       {failure_case{events::failure_reason::no_provider, 503, "no_provider"},
        failure_case{events::failure_reason::all_providers_failed, 502, "provider_failed"},
        failure_case{events::failure_reason::upstream_error, 400, "upstream_rejected"},
        failure_case{events::failure_reason::internal, 500, "server_error"}}) {
    relay_world world;
    auto reply = std::make_shared<recorded_reply>();
    ASSERT_NO_FATAL_FAILURE(submit_j1(world, reply, true));
    caf::anon_send(world.log->watcher(),
                   actors::job_ended{"j1", domain::job_status::failed, 0, 0, "why it failed", reason});
    const auto sent = reply->sent(10s);
    ASSERT_EQ(sent.size(), 1u) << code;
    EXPECT_EQ(sent.front().status, status) << code;
    EXPECT_NE(sent.front().body.find(code), std::string::npos) << sent.front().body;
    EXPECT_NE(sent.front().body.find("why it failed"), std::string::npos) << sent.front().body;
  }
}

}  // namespace
}  // namespace gpustream::gateway
