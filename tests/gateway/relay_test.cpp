// The relay against a stand-in scheduler that records what it is told: what happens to an offer
// for a job nobody waits for any more, and to a request that arrives after the relay stopped.

#include "gateway/relay.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "actors/errors.hpp"
#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;

struct test_config : caf::actor_system_config {
  test_config() { actors::add_error_categories(*this); }
};

/// The cancels a stand-in scheduler received.
class cancel_log {
 public:
  void add(actors::job_cancel cancel) {
    std::lock_guard lock(mutex_);
    cancels_.push_back(std::move(cancel));
    changed_.notify_all();
  }
  /// The first cancel, once one arrived (or nothing after `wait_max`).
  std::optional<actors::job_cancel> first(std::chrono::milliseconds wait_max) {
    std::unique_lock lock(mutex_);
    if (!changed_.wait_for(lock, wait_max, [&] { return !cancels_.empty(); })) return std::nullopt;
    return cancels_.front();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<actors::job_cancel> cancels_;
};

/// Answers cancels as a scheduler would and records them; refuses everything else.
actors::scheduler_actor::behavior_type recording_scheduler(actors::scheduler_actor::pointer,
                                                           std::shared_ptr<cancel_log> log) {
  const auto refused = [] { return caf::make_error(caf::sec::unexpected_message); };
  return {
      [refused](actors::job_request&) -> caf::result<actors::job_accepted> { return refused(); },
      [](actors::online_atom, actors::provider_online&) {},
      [](actors::offline_atom, std::string&) {},
      [](actors::load_atom, std::string&, domain::load_report&) {},
      [refused](actors::started_atom, std::string&, std::string&) -> caf::result<std::uint64_t> {
        return refused();
      },
      [refused](actors::job_result&) -> caf::result<actors::job_ended> { return refused(); },
      [refused](actors::job_failure&) -> caf::result<actors::job_ended> { return refused(); },
      [log](actors::job_cancel& cancel) -> caf::result<actors::job_ended> {
        log->add(cancel);
        return actors::job_ended{cancel.job_id, domain::job_status::cancelled, 0, 0};
      },
      [](actors::count_atom) { return actors::scheduler_counts{}; },
      [](actors::tick_atom) {},
  };
}

TEST(relay, an_offer_for_a_job_nobody_waits_for_is_declined_and_the_job_cancelled) {
  test_config config;
  caf::actor_system system(config);
  auto log = std::make_shared<cancel_log>();
  auto scheduler = system.spawn(recording_scheduler, log);
  actor_bridge bridge(system);
  relay relay(system, bridge, scheduler, nullptr);

  const actors::job_offer offer{.job_id = "j-gone", .model = "m", .prompt_tokens = 10, .max_tokens = 20};
  EXPECT_FALSE(relay.take_offer("p1", offer)) << "no frame for a job that is not live here";
  const auto cancel = log->first(10s);
  ASSERT_TRUE(cancel) << "the scheduler was not asked to stop the job";
  EXPECT_EQ(cancel->job_id, "j-gone");
  EXPECT_EQ(cancel->tokens_produced, 0u);

  bridge.stop();
  relay.stop();
  caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown);
}

/// A reply that records what it was sent.
class recorded_reply final : public http_reply {
 public:
  void send(http_response response) override { sent.push_back(std::move(response)); }
  void start_stream(unsigned, std::string, http_headers) override { ++streams; }
  void write(std::string) override {}
  void finish() override {}
  void on_close(std::function<void()>) override {}

  std::vector<http_response> sent;
  int streams = 0;
};

TEST(relay, a_request_after_stop_is_refused_and_its_reply_not_kept) {
  test_config config;
  caf::actor_system system(config);
  auto scheduler = system.spawn(recording_scheduler, std::make_shared<cancel_log>());
  actor_bridge bridge(system);
  relay relay(system, bridge, scheduler, nullptr);
  bridge.stop();
  relay.stop();  // the node stops the relay while its server still takes requests

  auto reply = std::make_shared<recorded_reply>();
  relay_job job;
  job.job_id = "j-late";
  job.completion_budget = 10;
  job.reply = reply;
  relay.submit(std::move(job));
  ASSERT_EQ(reply->sent.size(), 1u);
  EXPECT_EQ(reply->sent.front().status, 503u);
  EXPECT_NE(reply->sent.front().body.find("shutting down"), std::string::npos) << reply->sent.front().body;
  EXPECT_EQ(relay.live_jobs(), 0u);
  EXPECT_EQ(reply.use_count(), 1) << "the relay kept the reply, which would outlive the server";
  caf::anon_send_exit(scheduler, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace gpustream::gateway
