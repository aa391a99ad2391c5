// The ad source backed by the ad server actor: a pick that the ad server answers arrives with its
// click URL, and a pick it never answers gives up after pick_wait_max, so that a free-tier answer
// waiting for its ad is not held forever.
#include <gtest/gtest.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <chrono>
#include <condition_variable>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "actors/errors.hpp"
#include "actors/persistence.hpp"
#include "gateway/actor_ad_source.hpp"
#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;

struct test_config : caf::actor_system_config {
  test_config() { actors::add_error_categories(*this); }
};

/// An ad server that answers picks with `answer`, or never when `answer` is empty; everything
/// else it never answers either (these tests do not ask for it). A pick whose answer_by_us is not
/// ahead of now gets no ad, as the real one answers a pick its asker no longer waits for.
actors::ad_server_actor::behavior_type fake_ad_server(actors::ad_server_actor::pointer self,
                                                      std::optional<actors::ad_pick> answer) {
  return {
      [self](domain::create_campaign&) { return self->make_response_promise<std::string>(); },
      [self, answer](actors::ad_request& request) -> caf::result<actors::ad_pick> {
        if (answer && request.answer_by_us <= actors::system_clock_us()) return actors::ad_pick{};
        if (answer) return *answer;
        return self->make_response_promise<actors::ad_pick>();  // never delivered
      },
      [self](actors::served_atom, std::string&) { return self->make_response_promise<domain::ad_charge>(); },
      [self](actors::release_atom, std::string&, std::string&) { return self->make_response_promise<bool>(); },
      [self](actors::unserved_atom, std::string&, std::string&) { return self->make_response_promise<bool>(); },
      [self](actors::click_atom, std::string&) { return self->make_response_promise<actors::click_redirect>(); },
      [self](actors::load_atom, std::vector<std::string>&) { return self->make_response_promise<std::size_t>(); },
      [self](actors::count_atom) { return self->make_response_promise<actors::ad_server_counts>(); },
      [self](actors::state_atom, std::string&) { return self->make_response_promise<domain::campaign_state>(); },
      [](actors::tick_atom) {},
  };
}

class actor_ad_source_test : public ::testing::Test {
 protected:
  /// Picks through a source in front of `server`; the pick's answer, or a failure after 10 s.
  std::optional<ad_info> pick(actors::ad_server_actor server, std::chrono::milliseconds wait_max,
                              std::chrono::milliseconds* took = nullptr) {
    actor_ad_source source(bridge_, std::move(server), actor_ad_source_options{wait_max});
    source.set_click_base("http://node/a/c/");
    std::promise<std::optional<ad_info>> picked;
    const auto start = std::chrono::steady_clock::now();
    source.pick("job-1", "user-1", "a prompt", [&](std::optional<ad_info> ad) { picked.set_value(std::move(ad)); });
    auto future = picked.get_future();
    EXPECT_EQ(future.wait_for(10s), std::future_status::ready) << "the pick never ended";
    if (took) *took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    return future.valid() && future.wait_for(0s) == std::future_status::ready ? future.get() : std::nullopt;
  }

  test_config config_;
  caf::actor_system system_{config_};
  actor_bridge bridge_{system_};
};

TEST_F(actor_ad_source_test, a_picked_ad_arrives_with_its_click_url) {
  actors::served_ad ad;
  ad.impression_id = "imp-1";
  ad.campaign_id = "camp-1";
  ad.title = "Title";
  ad.text = "Text";
  auto server = system_.spawn(fake_ad_server, std::optional<actors::ad_pick>(actors::ad_pick{ad}));
  const auto picked = pick(server, 1000ms);
  ASSERT_TRUE(picked.has_value());
  EXPECT_EQ(picked->impression_id, "imp-1");
  EXPECT_EQ(picked->click_url, "http://node/a/c/imp-1");
  caf::anon_send_exit(server, caf::exit_reason::user_shutdown);
}

TEST_F(actor_ad_source_test, a_pick_the_ad_server_never_answers_ends_without_an_ad_after_the_wait) {
  auto server = system_.spawn(fake_ad_server, std::optional<actors::ad_pick>{});
  std::chrono::milliseconds took{0};
  const auto picked = pick(server, 50ms, &took);
  EXPECT_FALSE(picked.has_value());
  EXPECT_GE(took, 50ms) << "not before the wait is over";
  caf::anon_send_exit(server, caf::exit_reason::user_shutdown);
}

/// An ad server that answers picks only when sent a tick, with an ad "imp-late", and records
/// which impressions it is asked to release.
struct late_ad_server_log {
  std::mutex mutex;
  std::condition_variable changed;
  std::vector<std::string> released;
};

actors::ad_server_actor::behavior_type late_ad_server(actors::ad_server_actor::pointer self,
                                                      std::shared_ptr<late_ad_server_log> log) {
  auto held = std::make_shared<std::vector<caf::typed_response_promise<actors::ad_pick>>>();
  return {
      [self](domain::create_campaign&) { return self->make_response_promise<std::string>(); },
      [self, held](actors::ad_request&) -> caf::result<actors::ad_pick> {
        held->push_back(self->make_response_promise<actors::ad_pick>());
        return held->back();
      },
      [self](actors::served_atom, std::string&) { return self->make_response_promise<domain::ad_charge>(); },
      [log](actors::release_atom, std::string& impression_id, std::string&) -> caf::result<bool> {
        std::lock_guard lock(log->mutex);
        log->released.push_back(impression_id);
        log->changed.notify_all();
        return true;
      },
      [self](actors::unserved_atom, std::string&, std::string&) { return self->make_response_promise<bool>(); },
      [self](actors::click_atom, std::string&) { return self->make_response_promise<actors::click_redirect>(); },
      [self](actors::load_atom, std::vector<std::string>&) { return self->make_response_promise<std::size_t>(); },
      [self](actors::count_atom) { return self->make_response_promise<actors::ad_server_counts>(); },
      [self](actors::state_atom, std::string&) { return self->make_response_promise<domain::campaign_state>(); },
      [held](actors::tick_atom) {
        actors::served_ad ad;
        ad.impression_id = "imp-late";
        ad.campaign_id = "camp-1";
        for (auto& promise : *held) promise.deliver(actors::ad_pick{ad});
        held->clear();
      },
  };
}

TEST_F(actor_ad_source_test, an_ad_picked_after_the_wait_is_released_rather_than_held_for_nothing) {
  auto log = std::make_shared<late_ad_server_log>();
  auto server = system_.spawn(late_ad_server, log);
  actor_ad_source source(bridge_, server, actor_ad_source_options{50ms});
  std::promise<std::optional<ad_info>> picked;
  source.pick("job-1", "user-1", "a prompt", [&](std::optional<ad_info> ad) { picked.set_value(std::move(ad)); });
  auto future = picked.get_future();
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready) << "the pick never ended";
  EXPECT_FALSE(future.get().has_value()) << "the answer went on without an ad";
  caf::anon_send(server, actors::tick_atom::value);  // the ad server picks at last
  std::unique_lock lock(log->mutex);
  ASSERT_TRUE(log->changed.wait_for(lock, 10s, [&] { return !log->released.empty(); }))
      << "the late pick's reservation was kept, holding its budget and the user's frequency cap";
  EXPECT_EQ(log->released, std::vector<std::string>{"imp-late"});
  lock.unlock();
  caf::anon_send_exit(server, caf::exit_reason::user_shutdown);
}

}  // namespace
}  // namespace gpustream::gateway
