#include "actors/ad_server.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <utility>

#include "actors/errors.hpp"
#include "base/ensure.hpp"

namespace gpustream::actors {

namespace {

struct cache_entry {
  std::size_t at = 0;         ///< position in ad_server_state::states
  std::uint64_t version = 0;  ///< stream version the cached state includes; 0: unknown (re-read)
};

struct ad_server_state {
  // Declared so that the state is no aggregate (CAF would try to build it from the actor pointer).
  ad_server_state() = default;

  ad_server_options options;
  ad_server_peers peers;
  /// The cached campaigns, contiguous so that the auction runs over them as they are. A finished
  /// one may be swapped out for a new one (make_room), so a position or pointer is good only
  /// within one handler.
  std::vector<domain::campaign_state> states;
  std::map<std::string, cache_entry> index;  ///< by campaign id
  /// Campaigns load found holding reservations but could not cache (the cache was full), with
  /// the latest of their reservations' expiries: the timer expires them too, or they would hold
  /// their budget, pacing and frequency caps for good (no pick serves or releases them).
  std::map<std::string, std::int64_t> uncached_holding;
  ad_server_counts counts;

  static inline const char* name = "gpustream.ad_server";
};

using self_pointer = ad_server_actor::stateful_pointer<ad_server_state>;

std::int64_t now_us(self_pointer self) { return self->state.options.clock_us(); }

caf::error refusal(domain::errc code, std::string message) {
  return make_error(domain::error{code, std::move(message)});
}

std::string in_quotes(std::string_view text) { return "\"" + std::string(text) + "\""; }

bool is_id_byte(char c) noexcept {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' ||
         c == '_';
}

/// Why `campaign_id` cannot name a campaign of the ad server; empty when it can.
std::string campaign_id_problem(std::string_view campaign_id, std::size_t length_max) {
  if (campaign_id.empty()) return "the campaign id is empty";
  if (campaign_id.size() > length_max) {
    return "campaign id " + in_quotes(campaign_id) + " is " + std::to_string(campaign_id.size()) +
           " bytes long; at most " + std::to_string(length_max) + " are allowed";
  }
  if (!std::all_of(campaign_id.begin(), campaign_id.end(), is_id_byte)) {
    return "campaign id " + in_quotes(campaign_id) +
           " may hold only ASCII letters, digits, '-' and '_' (it is part of impression ids)";
  }
  return {};
}

std::string budget_deposit_id(std::string_view campaign_id) {
  return "campaign-" + std::string(campaign_id) + "/budget";
}

// ---------------------------------------------------------------------------------------------
// The cache.

domain::campaign_state* cached(self_pointer self, const std::string& campaign_id) {
  auto found = self->state.index.find(campaign_id);
  if (found == self->state.index.end()) return nullptr;
  return &self->state.states[found->second.at];
}

/// Campaign states read at once by load().
constexpr std::size_t load_in_flight_max = 64;

/// A campaign that takes part in no auction any more and holds no reservation: its budget is spent.
/// Served and clicked ads of it are still handled, by reading it from its aggregate. No command
/// funds a campaign past its budget again, but an impression taken back (void_impression) can end
/// its exhaustion: a campaign dropped from the cache before that takes part in auctions again only
/// after the next start loads it (a top-up, were one added, would need the same).
bool finished(const domain::campaign_state& state) { return state.exhausted && state.reservations.empty(); }

/// Room for one more campaign in a full cache, made by dropping a finished one; false when none
/// is finished. Campaigns ever created are not a limit: only those that can still spend are.
bool make_room(self_pointer self) {
  auto& st = self->state;
  if (st.states.size() < st.options.campaigns_max) return true;
  const auto done = std::find_if(st.states.begin(), st.states.end(), finished);
  if (done == st.states.end()) return false;
  const auto at = static_cast<std::size_t>(done - st.states.begin());
  st.index.erase(done->campaign_id);
  if (at + 1 != st.states.size()) {
    st.states[at] = std::move(st.states.back());
    st.index.at(st.states[at].campaign_id).at = at;
  }
  st.states.pop_back();
  ++st.counts.evicted;
  return true;
}

/// Puts `state` into the cache, replacing what was there; false when the cache is full of
/// campaigns that can still spend.
bool cache(self_pointer self, domain::campaign_state state, std::uint64_t version) {
  auto& st = self->state;
  if (auto found = st.index.find(state.campaign_id); found != st.index.end()) {
    st.states[found->second.at] = std::move(state);
    found->second.version = version;
    return true;
  }
  if (!make_room(self)) return false;
  st.index.emplace(state.campaign_id, cache_entry{st.states.size(), version});
  st.states.push_back(std::move(state));
  return true;
}

/// Re-reads a cached campaign from its aggregate: a refusal or a version gap showed that the
/// cache missed something (a command sent to the campaign by someone else).
void refresh(self_pointer self, const std::string& campaign_id) {
  ++self->state.counts.refreshes;
  self->request(self->state.peers.campaigns, caf::infinite, campaign_id, state_atom::value)
      .then(
          [self](domain::campaign_state& state) {
            if (state.created) (void)cache(self, std::move(state), 0);  // full: stays uncached
          },
          [self](caf::error&) { ++self->state.counts.failures; });
}

/// Applies what a command to `campaign_id` appended to its cached state. Replies of one campaign
/// arrive in the order its actor appended them, so the events follow on from the cached version;
/// a gap means another writer, and the state is read again.
/// Takes reservation `id` out of a cached state (a hold the cache took ahead of the campaign's
/// reply), if it is there.
void drop_held(domain::campaign_state& state, const std::string& id) {
  const auto held = state.reservations.find(id);
  if (held == state.reservations.end()) return;
  state.reserved_micros -= held->second.price_micros;
  state.reservations.erase(held);
}

void apply_reply(self_pointer self, const std::string& campaign_id, const command_reply& reply) {
  auto found = self->state.index.find(campaign_id);
  if (found == self->state.index.end()) return;
  auto& entry = found->second;
  if (entry.version != 0 && reply.version - reply.events.size() != entry.version) {
    refresh(self, campaign_id);
    return;
  }
  auto& state = self->state.states[entry.at];
  for (const auto& event : reply.events) {
    // A pick's hold, which the cache took ahead of this reply: replaced by what the campaign recorded.
    if (const auto* reserved = std::get_if<events::ad_reserved>(&event)) drop_held(state, reserved->reservation_id);
    state = domain::campaign::evolve(std::move(state), event);
  }
  entry.version = reply.version;
}

/// A command to a campaign failed: a refusal means the cache misjudged the campaign, anything
/// else (the store) is counted.
void note_failure(self_pointer self, const std::string& campaign_id, const caf::error& failure) {
  const auto refused = domain_error_of(failure);
  if (refused && refused->code == domain::errc::busy) {  // its stream is full now: no read on top
    ++self->state.counts.failures;
    return;
  }
  if (refused) {
    if (cached(self, campaign_id)) refresh(self, campaign_id);
  } else {
    ++self->state.counts.failures;
  }
}

/// Runs `found` with the campaign's state, from the cache or (caching it) from its aggregate, or
/// `failed` with why not.
template <class Found, class Failed>
void with_campaign(self_pointer self, const std::string& campaign_id, Found found, Failed failed) {
  if (const auto* state = cached(self, campaign_id)) {
    found(*state);
    return;
  }
  self->request(self->state.peers.campaigns, caf::infinite, campaign_id, state_atom::value)
      .then(
          [self, campaign_id, found, failed](domain::campaign_state& state) mutable {
            if (!state.created) {
              failed(refusal(domain::errc::not_found, "no campaign " + in_quotes(campaign_id)));
              return;
            }
            (void)cache(self, state, 0);  // a full cache just does not keep it
            found(state);
          },
          [failed](caf::error& failure) mutable { failed(failure); });
}

/// The campaign of an impression id that the ad server could have made, or why there is none.
expected<std::string, caf::error> campaign_of(self_pointer self, const std::string& impression_id) {
  const auto campaign_id = campaign_of_impression(impression_id);
  if (campaign_id.empty() ||
      !campaign_id_problem(campaign_id, self->state.options.campaign_id_length_max).empty()) {
    return unexpected{refusal(domain::errc::not_found,
                              "no impression " + in_quotes(impression_id) + ": it names no campaign")};
  }
  return std::string(campaign_id);
}

// ---------------------------------------------------------------------------------------------
// Campaigns.

/// Steps (2) and (3) of creating a campaign: escrow the budget unless the campaign is funded.
void fund_created(self_pointer self, const std::string& id,
                  caf::typed_response_promise<std::string> reply) {
  auto& st = self->state;
  self->request(st.peers.campaigns, caf::infinite, id, state_atom::value)
      .then(
          [self, id, reply](domain::campaign_state& state) mutable {
            const bool funded = state.funded_micros > 0;
            const std::int64_t amount = state.budget_micros;
            if (funded && finished(state)) {  // a repeated create of a campaign that spent its budget
              reply.deliver(id);
              return;
            }
            if (!cache(self, std::move(state), 0)) {
              reply.deliver(refusal(domain::errc::limit_exceeded,
                                    "campaign " + in_quotes(id) + " exists, but the ad server holds " +
                                        std::to_string(self->state.states.size()) +
                                        " campaigns (campaigns_max), so it takes part in no auction"));
              return;
            }
            if (funded) {  // a repeated command: the budget is in escrow already
              reply.deliver(id);
              return;
            }
            auto deposit = domain::campaign_deposit(budget_deposit_id(id), id, amount);
            self->request(self->state.peers.ledger, caf::infinite,
                          domain::ledger::command{std::move(deposit)})
                .then(
                    [self, id, amount, reply](const command_reply&) mutable {
                      self->request(self->state.peers.campaigns, caf::infinite, id,
                                    domain::campaign::command{domain::fund_campaign{amount}})
                          .then(
                              [self, id, reply](const command_reply& r) mutable {
                                apply_reply(self, id, r);
                                reply.deliver(id);
                              },
                              [self, id, reply](caf::error& failure) mutable {
                                // A concurrent identical creation may have funded it first.
                                const auto* state = cached(self, id);
                                if (state && state->funded_micros >= state->budget_micros) {
                                  reply.deliver(id);
                                } else {
                                  reply.deliver(failure);
                                }
                              });
                    },
                    [reply](const caf::error& failure) mutable { reply.deliver(failure); });
          },
          [reply](const caf::error& failure) mutable { reply.deliver(failure); });
}

caf::result<std::string> create(self_pointer self, domain::create_campaign& command) {
  auto& st = self->state;
  const std::string id = command.campaign_id;
  if (auto problem = campaign_id_problem(id, st.options.campaign_id_length_max); !problem.empty()) {
    return refusal(domain::errc::invalid_argument, std::move(problem));
  }
  // Below the floor it would never win an auction, and its escrowed budget would never be spent.
  if (const auto floor = st.options.auction.floor_cpm_micros; command.cpm_bid_micros < floor) {
    return refusal(domain::errc::invalid_argument,
                   "cpm_bid_micros " + std::to_string(command.cpm_bid_micros) + " is below the auction's floor of " +
                       std::to_string(floor) + " micro-USD per thousand impressions; the campaign would never be "
                       "shown. Bid at least " + std::to_string(floor));
  }
  auto reply = self->make_response_promise<std::string>();
  if (!cached(self, id) && !make_room(self)) {
    // Full of campaigns that can still spend: only a repeated create (of a campaign that exists,
    // e.g. finished and dropped from the cache) is answered.
    self->request(st.peers.campaigns, caf::infinite, id, state_atom::value)
        .then(
            [self, id, reply, command](const domain::campaign_state& state) mutable {
              if (!state.created) {
                reply.deliver(refusal(domain::errc::limit_exceeded,
                                      "the ad server holds " + std::to_string(self->state.states.size()) +
                                          " campaigns that can still spend, the most allowed (campaigns_max)"));
                return;
              }
              // The command still decides: one with other settings is refused, a repeat changes nothing.
              self->request(self->state.peers.campaigns, caf::infinite, id, domain::campaign::command{std::move(command)})
                  .then([self, id, reply](const command_reply&) mutable { fund_created(self, id, reply); },
                        [reply](const caf::error& failure) mutable { reply.deliver(failure); });
            },
            [reply](const caf::error& failure) mutable { reply.deliver(failure); });
    return reply;
  }
  // (1) The creation event validates the campaign and claims the id before any money moves.
  self->request(st.peers.campaigns, caf::infinite, id, domain::campaign::command{std::move(command)})
      .then([self, id, reply](const command_reply&) mutable { fund_created(self, id, reply); },
            [reply](const caf::error& failure) mutable { reply.deliver(failure); });
  return reply;
}

/// Caches the created campaigns among `ids` that can still spend; `done` gets how many of them
/// are cached afterwards. At most load_in_flight_max are read at once: each read wakes the
/// campaign's actor, and a platform's campaigns ever created may be many.
void load(self_pointer self, std::vector<std::string> ids, std::function<void(std::size_t)> done) {
  struct progress {
    std::vector<std::string> ids;
    std::size_t next = 0;      ///< the next id to read
    std::size_t answered = 0;  ///< reads answered (or skipped)
    std::size_t cached = 0;
    std::function<void(std::size_t)> done;
  };
  auto p = std::make_shared<progress>(progress{std::move(ids), 0, 0, 0, std::move(done)});
  if (p->ids.empty()) {
    p->done(0);
    return;
  }
  // Reads the next id; each answer reads one more, so that at most load_in_flight_max are out.
  auto read_next = std::make_shared<std::function<void()>>();
  *read_next = [self, p, weak = std::weak_ptr<std::function<void()>>(read_next)] {
    auto again = weak.lock();
    while (p->next < p->ids.size()) {
      const auto& id = p->ids[p->next++];
      if (!campaign_id_problem(id, self->state.options.campaign_id_length_max).empty()) {
        ++p->answered;
        continue;
      }
      auto one_done = [p, again](bool is_cached) {
        p->cached += is_cached ? 1 : 0;
        if (++p->answered == p->ids.size()) return p->done(p->cached);
        (*again)();
      };
      self->request(self->state.peers.campaigns, caf::infinite, id, state_atom::value)
          .then(
              [self, one_done](domain::campaign_state& state) {
                std::int64_t held_until = 0;
                for (const auto& [id, r] : state.reservations) held_until = std::max(held_until, r.expires_at_us);
                const std::string campaign_id = state.campaign_id;
                const bool cached = state.created && !finished(state) && cache(self, std::move(state), 0);
                if (!cached && held_until != 0) self->state.uncached_holding[campaign_id] = held_until;
                one_done(cached);
              },
              [self, one_done](caf::error&) {
                ++self->state.counts.failures;
                one_done(false);
              });
      return;
    }
    if (p->answered == p->ids.size()) p->done(p->cached);  // the last ids were all skipped
  };
  for (std::size_t i = 0; i < load_in_flight_max && p->next < p->ids.size(); ++i) (*read_next)();
}

// ---------------------------------------------------------------------------------------------
// Ads.

std::optional<caf::error> check_text(std::string_view what, std::string_view text,
                                     std::size_t length_max) {
  if (text.empty()) return refusal(domain::errc::invalid_argument, std::string(what) + " is empty");
  if (text.size() > length_max) {
    return refusal(domain::errc::invalid_argument,
                   std::string(what) + " is " + std::to_string(text.size()) +
                       " bytes long; at most " + std::to_string(length_max) + " are allowed");
  }
  return std::nullopt;
}

caf::result<ad_pick> pick(self_pointer self, const ad_request& request) {
  auto& st = self->state;
  const std::size_t id_length_max = st.options.auction.campaign.id_length_max;
  if (auto problem = check_text("job id", request.job_id, id_length_max)) return *problem;
  if (auto problem = check_text("user id", request.user_id, id_length_max)) return *problem;
  ++st.counts.picks;
  const std::int64_t now = now_us(self);
  if (request.answer_by_us != 0 && now >= request.answer_by_us) {
    ++st.counts.picks_late;
    return ad_pick{};
  }
  auto choice = domain::run_auction(st.states, request.prompt, request.user_id, now, st.options.auction);
  if (!choice) return ad_pick{};
  auto impression_id = impression_id_of(choice->campaign_id, request.job_id, id_length_max);
  domain::reserve_ad reserve{impression_id, request.job_id, request.user_id, choice->price_micros,
                             now + st.options.reservation_ttl.count()};
  auto reply = self->make_response_promise<ad_pick>();
  // The ad's words as the auction saw them: the reply comes in another handler.
  const auto entry = st.index.find(choice->campaign_id);
  GPUSTREAM_ENSURE(entry != st.index.end());  // the auction ran over the cache just now
  auto& winner = st.states[entry->second.at];
  served_ad ad{impression_id, choice->campaign_id, winner.title, winner.text, winner.url, choice->price_micros};
  // Held in the cache at once, as the campaign will hold it: the picks decided before its reply
  // comes count it (budget, pacing, the user's cap) and go to the next bidder rather than be
  // refused. Its reply applies the same event again, which changes nothing; a refusal or a
  // failure re-reads the campaign.
  winner = domain::campaign::evolve(std::move(winner),
                                    events::ad_reserved{reserve.reservation_id, choice->campaign_id, reserve.job_id,
                                                        reserve.user_id, reserve.price_micros, now,
                                                        reserve.expires_at_us});
  self->request(st.peers.campaigns, caf::infinite, choice->campaign_id,
                domain::campaign::command{std::move(reserve)})
      .then(
          [self, reply, ad = std::move(ad)](const command_reply& r) mutable {
            apply_reply(self, ad.campaign_id, r);
            ++self->state.counts.ads;
            reply.deliver(ad_pick{std::move(ad)});
          },
          [self, reply, campaign_id = choice->campaign_id,
           reservation_id = impression_id](caf::error& failure) mutable {
            // Without the hold the cache took ahead of the reply: dropped here (the campaign holds
            // nothing), and the campaign read again, should the cache have misjudged it.
            if (const auto entry = self->state.index.find(campaign_id); entry != self->state.index.end()) {
              drop_held(self->state.states[entry->second.at], reservation_id);
            }
            refresh(self, campaign_id);
            if (!domain_error_of(failure)) {
              ++self->state.counts.failures;
              reply.deliver(failure);
              return;
            }
            ++self->state.counts.reservations_refused;
            reply.deliver(ad_pick{});
          });
  return reply;
}

caf::result<domain::ad_charge> served(self_pointer self, const std::string& impression_id) {
  auto campaign_id = campaign_of(self, impression_id);
  if (!campaign_id) return campaign_id.error();
  auto reply = self->make_response_promise<domain::ad_charge>();
  auto found = [self, reply, impression_id,
                campaign_id = *campaign_id](const domain::campaign_state& state) mutable {
    std::int64_t price = 0;
    if (auto held = state.reservations.find(impression_id); held != state.reservations.end()) {
      price = held->second.price_micros;
    } else if (auto shown = state.impressions.find(impression_id); shown != state.impressions.end()) {
      price = shown->second.price_micros;  // served before: the same charge again
    } else {
      reply.deliver(refusal(domain::errc::not_found,
                            "campaign " + in_quotes(campaign_id) + " holds no reservation " +
                                in_quotes(impression_id) +
                                ": it was released, expired or never picked; serve no ad"));
      return;
    }
    self->request(self->state.peers.campaigns, caf::infinite, campaign_id,
                  domain::campaign::command{domain::record_impression{impression_id, price}})
        .then(
            [self, reply, impression_id, campaign_id, price](const command_reply& r) mutable {
              if (!r.events.empty()) ++self->state.counts.impressions;
              apply_reply(self, campaign_id, r);
              reply.deliver(domain::ad_charge{impression_id, campaign_id, price});
            },
            [self, reply, campaign_id](caf::error& failure) mutable {
              note_failure(self, campaign_id, failure);
              reply.deliver(failure);
            });
  };
  with_campaign(self, *campaign_id, std::move(found),
                [reply](const caf::error& failure) mutable { reply.deliver(failure); });
  return reply;
}

caf::result<bool> release(self_pointer self, const std::string& impression_id, std::string reason) {
  auto campaign_id = campaign_of(self, impression_id);
  if (!campaign_id) return campaign_id.error();
  auto reply = self->make_response_promise<bool>();
  self->request(self->state.peers.campaigns, caf::infinite, *campaign_id,
                domain::campaign::command{
                    domain::release_ad_reservation{impression_id, std::move(reason)}})
      .then(
          [self, reply, campaign_id = *campaign_id](const command_reply& r) mutable {
            apply_reply(self, campaign_id, r);
            if (!r.events.empty()) ++self->state.counts.releases;
            reply.deliver(!r.events.empty());
          },
          [self, reply, campaign_id = *campaign_id](caf::error& failure) mutable {
            note_failure(self, campaign_id, failure);
            reply.deliver(failure);
          });
  return reply;
}

caf::result<bool> unserved(self_pointer self, const std::string& impression_id, std::string reason) {
  auto campaign_id = campaign_of(self, impression_id);
  if (!campaign_id) return campaign_id.error();
  auto reply = self->make_response_promise<bool>();
  self->request(self->state.peers.campaigns, caf::infinite, *campaign_id,
                domain::campaign::command{domain::void_impression{impression_id, std::move(reason)}})
      .then(
          [self, reply, campaign_id = *campaign_id](const command_reply& r) mutable {
            apply_reply(self, campaign_id, r);
            for (const auto& e : r.events) {
              ++(std::holds_alternative<events::ad_reservation_released>(e) ? self->state.counts.releases
                                                                             : self->state.counts.voided);
            }
            reply.deliver(!r.events.empty());
          },
          [self, reply, campaign_id = *campaign_id](caf::error& failure) mutable {
            note_failure(self, campaign_id, failure);
            reply.deliver(failure);
          });
  return reply;
}

caf::result<click_redirect> click(self_pointer self, const std::string& impression_id) {
  auto campaign_id = campaign_of(self, impression_id);
  if (!campaign_id) return campaign_id.error();
  auto reply = self->make_response_promise<click_redirect>();
  auto found = [self, reply, impression_id,
                campaign_id = *campaign_id](const domain::campaign_state& state) mutable {
    self->request(self->state.peers.campaigns, caf::infinite, campaign_id,
                  domain::campaign::command{domain::click_ad{impression_id}})
        .then(
            [self, reply, campaign_id, url = state.url](const command_reply& r) mutable {
              if (!r.events.empty()) ++self->state.counts.clicks;
              apply_reply(self, campaign_id, r);
              reply.deliver(click_redirect{url, {}});
            },
            [self, reply, campaign_id, url = state.url](caf::error& failure) mutable {
              // An impression the campaign does not count a click for (older than the click
              // window, or never served): the person following an ad's link from an old answer
              // still reaches the advertiser, and nothing is counted.
              const auto refused = domain_error_of(failure);
              if (refused && (refused->code == domain::errc::not_found || refused->code == domain::errc::invalid_state)) {
                reply.deliver(click_redirect{url, {}});
                return;
              }
              // Not recorded now (the store failed, or the campaign's stream is full): the person
              // still reaches the advertiser, and the click goes uncounted (a click moves no money).
              note_failure(self, campaign_id, failure);
              ++self->state.counts.clicks_unrecorded;
              reply.deliver(click_redirect{url, describe(failure)});
            });
  };
  with_campaign(self, *campaign_id, std::move(found),
                [reply](const caf::error& failure) mutable { reply.deliver(failure); });
  return reply;
}

/// Releases the expired reservations of every cached campaign that holds one, and of those load
/// left out of the cache once all theirs are due.
void expire(self_pointer self) {
  const std::int64_t now = now_us(self);
  for (auto it = self->state.uncached_holding.begin(); it != self->state.uncached_holding.end();) {
    if (self->state.index.contains(it->first)) {  // cached since: expired with the others below
      it = self->state.uncached_holding.erase(it);
      continue;
    }
    if (it->second > now) {
      ++it;
      continue;
    }
    self->request(self->state.peers.campaigns, caf::infinite, it->first,
                  domain::campaign::command{domain::expire_ad_reservations{}})
        .then([self](const command_reply& r) { self->state.counts.expired += r.events.size(); },
              [self, id = it->first](caf::error& failure) {
                note_failure(self, id, failure);
                self->state.uncached_holding.emplace(id, now_us(self));  // again at the next tick
              });
    it = self->state.uncached_holding.erase(it);
  }
  for (const auto& state : self->state.states) {
    const bool any = std::any_of(state.reservations.begin(), state.reservations.end(),
                                 [now](const auto& r) { return r.second.expires_at_us <= now; });
    if (!any) continue;
    self->request(self->state.peers.campaigns, caf::infinite, state.campaign_id,
                  domain::campaign::command{domain::expire_ad_reservations{}})
        .then(
            [self, id = state.campaign_id](const command_reply& r) {
              self->state.counts.expired += r.events.size();
              apply_reply(self, id, r);
            },
            [self, id = state.campaign_id](caf::error& failure) { note_failure(self, id, failure); });
  }
}

ad_server_actor::behavior_type ad_server_behavior(self_pointer self, ad_server_peers peers,
                                                  ad_server_options options) {
  auto& st = self->state;
  if (!options.clock_us) options.clock_us = system_clock_us;
  // Configuration bugs, not operating errors: the aggregates would refuse every reservation.
  GPUSTREAM_ENSURE(options.reservation_ttl.count() > 0);
  GPUSTREAM_ENSURE(options.reservation_ttl.count() <=
                   options.auction.campaign.reservation_ttl_us_max);
  GPUSTREAM_ENSURE(options.auction.floor_cpm_micros >= 1'000);
  st.options = std::move(options);
  st.peers = std::move(peers);
  // The ad server cannot work without its peers: it stops with them.
  self->monitor(st.peers.campaigns);
  self->monitor(st.peers.ledger);
  self->set_down_handler([self](caf::down_msg& msg) { self->quit(msg.reason); });
  if (!st.options.campaign_ids.empty()) load(self, st.options.campaign_ids, [](std::size_t) {});
  self->delayed_send(self, st.options.expire_interval, tick_atom::value);
  return {
      [self](domain::create_campaign& command) { return create(self, command); },
      [self](const ad_request& request) { return pick(self, request); },
      [self](served_atom, const std::string& impression_id) { return served(self, impression_id); },
      [self](release_atom, const std::string& impression_id, std::string& reason) {
        return release(self, impression_id, std::move(reason));
      },
      [self](unserved_atom, const std::string& impression_id, std::string& reason) {
        return unserved(self, impression_id, std::move(reason));
      },
      [self](click_atom, const std::string& impression_id) { return click(self, impression_id); },
      [self](load_atom, const std::vector<std::string>& ids) -> caf::result<std::size_t> {
        auto reply = self->make_response_promise<std::size_t>();
        load(self, ids, [reply](std::size_t n) mutable { reply.deliver(n); });
        return reply;
      },
      [self](count_atom) {
        auto counts = self->state.counts;
        counts.campaigns = self->state.states.size();
        return counts;
      },
      [self](state_atom, const std::string& campaign_id) -> caf::result<domain::campaign_state> {
        if (const auto* state = cached(self, campaign_id)) return *state;
        return refusal(domain::errc::not_found, "campaign " + in_quotes(campaign_id) + " is not cached");
      },
      [self](tick_atom) {
        expire(self);
        self->delayed_send(self, self->state.options.expire_interval, tick_atom::value);
      },
  };
}

}  // namespace

std::string impression_id_of(std::string_view campaign_id, std::string_view job_id,
                             std::size_t id_length_max) {
  std::string id = std::string(campaign_id) + "." + std::string(job_id);
  if (id.size() <= id_length_max) return id;
  // FNV-1a: the job part only has to tell the campaign's impressions apart.
  std::uint64_t hash = 14'695'981'039'346'656'037ULL;
  for (const char c : job_id) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 1'099'511'628'211ULL;
  }
  static constexpr std::array<char, 16> digits = {'0', '1', '2', '3', '4', '5', '6', '7',
                                                  '8', '9', 'a', 'b', 'c', 'd', 'e', 'f'};
  std::string hex(16, '0');
  for (int i = 15; i >= 0; --i, hash >>= 4) hex[static_cast<std::size_t>(i)] = digits[hash & 0xf];
  return std::string(campaign_id) + ".h" + hex;
}

std::string_view campaign_of_impression(std::string_view impression_id) noexcept {
  const auto dot = impression_id.find('.');
  if (dot == std::string_view::npos || dot == 0 || dot + 1 == impression_id.size()) return {};
  return impression_id.substr(0, dot);
}

ad_server_actor spawn_ad_server(caf::actor_system& system, ad_server_peers peers,
                                ad_server_options options) {
  return system.spawn(ad_server_behavior, std::move(peers), std::move(options));
}

}  // namespace gpustream::actors
