#include "gateway/actor_ad_source.hpp"

#include <caf/event_based_actor.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <memory>

#include "actors/errors.hpp"
#include "actors/persistence.hpp"
#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {

/// How long a pick's answer is awaited after its answer stopped waiting for it, to release what it
/// reserved; past it, the reservation expires by itself. Bounds the continuations a hung ad server
/// leaves waiting.
constexpr std::chrono::seconds late_pick_wait_max{60};

actor_ad_source::actor_ad_source(actor_bridge& bridge, actors::ad_server_actor ads, actor_ad_source_options options)
    : bridge_(bridge), ads_(std::move(ads)), options_(options) {}

void actor_ad_source::set_click_base(std::string base) {
  std::lock_guard lock(mutex_);
  click_base_ = std::move(base);
}

std::string actor_ad_source::click_base() const {
  std::lock_guard lock(mutex_);
  return click_base_;
}

void actor_ad_source::pick(std::string job_id, std::string user_id, std::string prompt_text,
                           std::function<void(std::optional<ad_info>)> done) {
  // Whichever comes first, the pick or the end of the wait, answers; a pick after the wait has
  // reserved its ad (and a place in the user's frequency cap) for nothing, and gives it back.
  auto answered = std::make_shared<std::atomic<bool>>(false);
  const std::int64_t answer_by_us =
      actors::system_clock_us() + std::chrono::duration_cast<std::chrono::microseconds>(options_.pick_wait_max).count();
  bridge_.run([this, answered,
               request = actors::ad_request{std::move(job_id), std::move(user_id), std::move(prompt_text), answer_by_us},
               done](caf::event_based_actor* actor) mutable {
    const auto wait = std::max<std::chrono::milliseconds>(late_pick_wait_max, options_.pick_wait_max);
    actor->request(ads_, wait, std::move(request))
        .then(
            [this, answered, done](const actors::ad_pick& pick) {
              if (answered->exchange(true)) {
                if (pick.ad) release(pick.ad->impression_id, "picked after its answer stopped waiting for it");
                return;
              }
              if (!pick.ad) return done(std::nullopt);
              const auto& ad = *pick.ad;
              done(ad_info{ad.impression_id, ad.campaign_id, ad.title, ad.text, click_base() + ad.impression_id});
            },
            [answered, done](caf::error& failure) {
              if (answered->exchange(true)) return;
              spdlog::warn("ads: no ad picked: {}", actors::describe(failure));
              done(std::nullopt);
            });
  });
  bridge_.run_later(options_.pick_wait_max, [answered, done = std::move(done), wait = options_.pick_wait_max](
                                                caf::event_based_actor*) {
    if (answered->exchange(true)) return;
    spdlog::warn("ads: no ad picked within {} ms", wait.count());
    done(std::nullopt);
  });
}

void actor_ad_source::served(std::string impression_id, std::function<void(std::optional<domain::ad_charge>)> done) {
  // No bound here: the impression and its charge are being recorded, and an ad whose charge may
  // yet be recorded must not be dropped from the answer. The wait is an append's, like any other.
  bridge_.run([this, impression_id = std::move(impression_id), done = std::move(done)](caf::event_based_actor* actor) {
    actor->request(ads_, caf::infinite, actors::served_atom::value, impression_id)
        .then([done](const domain::ad_charge& charge) { done(charge); },
              [done, impression_id](caf::error& failure) {
                spdlog::warn("ads: impression={} not recorded, ad not shown: {}", impression_id,
                             actors::describe(failure));
                done(std::nullopt);
              });
  });
}

void actor_ad_source::release(std::string impression_id, std::string reason) {
  bridge_.run([this, impression_id = std::move(impression_id), reason = std::move(reason)](caf::event_based_actor* actor) {
    actor->request(ads_, caf::infinite, actors::release_atom::value, impression_id, reason)
        .then([](bool) {},
              [impression_id](caf::error& failure) {
                // The reservation expires by itself; nothing is lost.
                spdlog::debug("ads: release of impression={} failed: {}", impression_id, actors::describe(failure));
              });
  });
}

void actor_ad_source::unserved(std::string impression_id, std::string reason) {
  bridge_.run([this, impression_id = std::move(impression_id), reason = std::move(reason)](caf::event_based_actor* actor) {
    actor->request(ads_, caf::infinite, actors::unserved_atom::value, impression_id, reason)
        .then([](bool) {},
              [impression_id](caf::error& failure) {
                // Never reserved, or taken back longer ago than the campaign remembers (an hour
                // after its reservation's expiry; a recorded impression, 7 days): nothing to take back.
                if (const auto refused = actors::domain_error_of(failure); refused && refused->code == domain::errc::not_found) {
                  spdlog::debug("ads: impression={} had nothing to take back", impression_id);
                  return;
                }
                // The campaign keeps the spend of an ad nobody paid for: its advertiser gets one
                // impression less for the money.
                spdlog::warn("ads: impression={} not taken back after its answer went unsettled: {}", impression_id,
                             actors::describe(failure));
              });
  });
}

}  // namespace gpustream::gateway
