#include "gateway/provider_link.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <spdlog/spdlog.h>

#include <atomic>
#include <map>
#include <mutex>
#include <optional>

#include "actors/errors.hpp"
#include "base/text.hpp"
#include "domain/selection.hpp"
#include "gateway/actor_bridge.hpp"
#include "gateway/directory.hpp"
#include "gateway/link_codec.hpp"
#include "gateway/relay.hpp"
#include "gateway/secrets.hpp"

namespace gpustream::gateway {
namespace {

using steady = std::chrono::steady_clock;

/// The link's actor: what the scheduler talks to (offers, cancels), plus the staleness timer.
using link_actor = caf::typed_actor<caf::reacts_to<actors::offer_atom, actors::job_offer>,
                                    caf::reacts_to<actors::cancel_atom, std::string>,
                                    caf::reacts_to<actors::tick_atom>>;

/// What an agent is told (and its disconnect records) when `failure` stopped its `frame` (a hello,
/// an advertise): a domain refusal's own words (a bad offer, a suspension). Anything else is the
/// server's (a store's message names its files) and stays in the server's log.
std::string link_failure(const std::string& provider_id, std::string_view frame, const caf::error& failure) {
  if (const auto refused = actors::domain_error_of(failure)) return refused->message;
  spdlog::error("link: the {} of provider={} could not be answered: {}", frame, provider_id, actors::describe(failure));
  return "the server could not record the " + std::string(frame) + " now; link again later";
}

http_response unauthorized(std::string_view message) {
  return {401, "application/json",
          R"({"error":{"message":")" + std::string(message) +
              R"(","type":"invalid_request_error","param":null,"code":"invalid_provider_token"}})",
          {{"WWW-Authenticate", "Bearer"}}};
}

}  // namespace

/// One provider's open link.
class link_session : public std::enable_shared_from_this<link_session> {
 public:
  link_session(std::shared_ptr<provider_links::impl> owner, std::shared_ptr<websocket_connection> connection,
               std::string provider_id, events::sha256_digest token_hash)
      : owner_(std::move(owner)), connection_(std::move(connection)), provider_id_(std::move(provider_id)),
        token_hash_(token_hash) {}

  void start();
  /// A newer link of the same provider took over: this one ends without touching the provider's
  /// state (the newer link's hello already recorded the replacement).
  void retire();

  const std::string& provider_id() const { return provider_id_; }
  /// The latest heartbeat, none before the first.
  std::optional<link::heartbeat> last_heartbeat() const {
    std::lock_guard lock(heartbeat_mutex_);
    return heartbeat_;
  }

 private:
  friend class provider_links::impl;
  void on_message(std::string_view bytes);
  void on_closed(std::string reason);
  void on_hello(const link::hello& hello);
  /// `models` with none allowing more jobs at once than the hello's max_concurrency (over all
  /// models): the scheduler gives a provider at most its largest offer's.
  std::vector<events::model_offer> within_concurrency(std::vector<events::model_offer> models) const;
  /// The agent offers other models now: recorded, then the gateway and the scheduler list them
  /// in place of the old ones (this link's jobs go on).
  void on_advertise(std::vector<events::model_offer> models);
  /// The checked hello makes this link its provider's: the link it replaces ends, and the hello's
  /// commands are recorded before the link goes online.
  void take_over(std::vector<domain::provider::command> commands, std::vector<events::model_offer> models,
                 std::size_t gpus);
  /// Ends the link now and asks the agent to close it with `code`.
  void close(std::uint16_t code, std::string reason);
  /// The link is over (closed by the server, or by the peer or the network): its jobs go back to
  /// the scheduler and the provider is recorded offline, once.
  void end(std::string reason);
  void send(const link::frame& f) {
    auto bytes = link::encode(f);
    connection_->send(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  }
  void touch() {
    last_frame_ns_.store(steady::now().time_since_epoch().count(), std::memory_order_relaxed);
  }
  /// Whether a heartbeat goes on to the scheduler: one that says something new (health, draining),
  /// else at most one per half heartbeat interval. Every link shares the one scheduler, and each
  /// report it takes starts an assignment pass: an agent sending heartbeats without pause must not
  /// hold up everyone else's routing. On the connection's strand.
  bool forward_heartbeat(const link::heartbeat& beat);
  /// Closed, or replaced by a newer link of the same provider (whose jobs were handed back with
  /// link_replaced): it takes no offer and relays nothing.
  bool done_with() const { return closed_ || retired_; }

  std::shared_ptr<provider_links::impl> owner_;
  std::shared_ptr<websocket_connection> connection_;
  const std::string provider_id_;
  const events::sha256_digest token_hash_;  ///< of the token the link opened with
  // Written on the connection's strand; read by end(), which may run on an actor's thread.
  std::atomic<bool> hello_seen_{false};
  std::uint32_t concurrency_max_ = 0;  ///< the hello's max_concurrency (0: none); on the strand
  // Shared with the link actor and the owner.
  std::atomic<bool> online_{false};
  std::atomic<bool> retired_{false};
  std::atomic<bool> closed_{false};
  /// Held while going online (take_over's continuation) and while end() marks the link closed, so
  /// that a link ending meanwhile is either seen there, or ends after it went online (its offline
  /// notice then follows the online one: both go through the bridge under the provider's key).
  std::mutex online_mutex_;
  std::atomic<bool> stale_{false};          ///< closed for missing heartbeats
  std::atomic<bool> protocol_error_{false}; ///< closed for a frame the protocol forbids
  std::atomic<std::int64_t> last_frame_ns_{steady::now().time_since_epoch().count()};
  std::atomic<std::int64_t> hello_at_ns_{0};  ///< when the hello came, on the steady clock
  link_actor actor_;
  mutable std::mutex heartbeat_mutex_;
  std::optional<link::heartbeat> heartbeat_;  ///< guarded by heartbeat_mutex_
  std::optional<link::heartbeat> forwarded_;  ///< the last one passed to the scheduler (strand only)
  std::optional<steady::time_point> advertised_at_;  ///< the last advertise frame (strand only)
  steady::time_point forwarded_at_;           ///< when (strand only)
  steady::time_point draining_forwarded_at_;  ///< when the last change of `draining` was (strand only)
};

class provider_links::impl : public std::enable_shared_from_this<impl> {
 public:
  impl(caf::actor_system& system, actor_bridge& bridge, const actors::runtime& runtime, directory& who,
       relay& answers, provider_link_options options)
      : system_(system), bridge_(bridge), runtime_(runtime), directory_(who), relay_(answers),
        options_(std::move(options)) {
    if (!options_.clock_us) options_.clock_us = actors::system_clock_us;
  }

  websocket_decision upgrade(const http_request& request) {
    const auto token = bearer_token(request.header("authorization"));
    if (token.empty()) return unauthorized("send the provider token as 'Authorization: Bearer <token>'");
    const auto provider = directory_.provider_by_token(token);
    if (!provider) return unauthorized("unknown provider token");
    if (links_of(provider->provider_id) >= options_.links_per_provider_max) return too_many_links();
    auto self = shared_from_this();
    return websocket_accept{[self, provider_id = provider->provider_id,
                             token_hash = sha256(token)](std::shared_ptr<websocket_connection> c) {
      auto session = std::make_shared<link_session>(self, std::move(c), provider_id, token_hash);
      session->start();
    }};
  }

  /// Links whose hello is recorded (a link adopted while its hello is still recorded is not
  /// online yet, nor ever when that fails).
  std::size_t online() const {
    std::lock_guard lock(mutex_);
    return static_cast<std::size_t>(std::count_if(links_.begin(), links_.end(), [](const auto& entry) {
      const auto session = entry.second.lock();
      return session && session->online_.load();
    }));
  }

  std::optional<link::heartbeat> last_heartbeat(const std::string& provider_id) const {
    std::shared_ptr<link_session> session;
    {
      std::lock_guard lock(mutex_);
      const auto it = links_.find(provider_id);
      if (it != links_.end()) session = it->second.lock();
    }
    return session ? session->last_heartbeat() : std::nullopt;
  }

  /// Makes `session` its provider's link; returns the one it replaces, if any.
  std::shared_ptr<link_session> adopt(const std::shared_ptr<link_session>& session) {
    std::lock_guard lock(mutex_);
    auto& slot = links_[session->provider_id()];
    auto previous = slot.lock();
    slot = session;
    return previous;
  }

  /// Forgets `session` if it is still its provider's link; true when it was.
  bool release(const link_session* session) {
    std::lock_guard lock(mutex_);
    const auto it = links_.find(session->provider_id());
    if (it == links_.end() || it->second.lock().get() != session) return false;
    links_.erase(it);
    return true;
  }

  http_response too_many_links() const {
    return {429, "application/json",
            R"({"error":{"message":"this provider has )" + std::to_string(options_.links_per_provider_max) +
                R"( links open, the most allowed; close one or retry later","type":"rate_limit_error","param":null,"code":"too_many_links"}})",
            {{"Retry-After", "5"}}};
  }

  /// Whether the provider may say hello now (hello_interval_min after its previous one); if so,
  /// this is its previous one from now on.
  bool take_hello_turn(const std::string& provider_id) {
    const auto now = steady::now();
    std::lock_guard lock(mutex_);
    auto [last, fresh] = last_hello_.try_emplace(provider_id, now);
    if (fresh) return true;
    if (now - last->second < options_.hello_interval_min) return false;
    last->second = now;
    return true;
  }

  /// The provider's links open now, hello or not.
  std::size_t links_of(const std::string& provider_id) const {
    std::lock_guard lock(mutex_);
    const auto found = per_provider_.find(provider_id);
    return found == per_provider_.end() ? 0 : found->second;
  }

  enum class tracking { tracked, stopped, too_many };
  /// Every link actor alive (hello or not), so that stopping the node stops them all: a link
  /// whose connection is dropped by the server's shutdown never sees on_closed. Not tracked once
  /// stopped, nor past links_per_provider_max (links that raced past the upgrade's check): the
  /// caller then stops `actor` itself.
  [[nodiscard]] tracking track(const link_session* session, link_actor actor) {
    std::lock_guard lock(mutex_);
    if (stopped_) return tracking::stopped;
    auto& open = per_provider_[session->provider_id()];
    if (open >= options_.links_per_provider_max) return tracking::too_many;
    ++open;
    actors_[session] = std::move(actor);
    return tracking::tracked;
  }
  void untrack(const link_session* session) {
    std::lock_guard lock(mutex_);
    if (actors_.erase(session) == 0) return;
    const auto open = per_provider_.find(session->provider_id());
    if (open != per_provider_.end() && --open->second == 0) per_provider_.erase(open);
  }
  void stop() {
    std::vector<caf::actor> running;
    {
      std::lock_guard lock(mutex_);
      stopped_ = true;
      for (auto& [session, actor] : actors_) running.push_back(caf::actor_cast<caf::actor>(actor));
      actors_.clear();
      per_provider_.clear();
    }
    stop_and_wait(system_, running);
  }

  caf::actor_system& system_;
  actor_bridge& bridge_;
  const actors::runtime& runtime_;
  directory& directory_;
  relay& relay_;
  provider_link_options options_;
  /// Held from a link's adoption (its hello) or release (its end) until its provider's connect or
  /// disconnect is queued, so that those follow in the order the links changed hands. Otherwise a
  /// link ending just as its agent's next one says hello could record the provider offline after
  /// the new link's connect.
  std::mutex handover_mutex_;
  mutable std::mutex mutex_;
  std::map<std::string, std::weak_ptr<link_session>> links_;  ///< the current link of each provider
  std::map<const link_session*, link_actor> actors_;
  std::map<std::string, std::size_t> per_provider_;  ///< links tracked, by provider id
  std::map<std::string, steady::time_point> last_hello_;  ///< by provider id: see take_hello_turn
  bool stopped_ = false;
  std::atomic<std::uint64_t> heartbeats_forwarded_{0};
  std::atomic<std::uint64_t> heartbeats_skipped_{0};
};

bool link_session::forward_heartbeat(const link::heartbeat& beat) {
  const auto now = steady::now();
  // Health as the scheduler reads it (at most 100): 100 and 101 are no news.
  const auto health = [](const link::heartbeat& b) { return std::min<std::uint32_t>(b.health_percent, 100); };
  const bool draining_news = forwarded_ && forwarded_->draining != beat.draining;
  const bool news = !forwarded_ || health(*forwarded_) != health(beat) || draining_news;
  // News goes on at once, yet not more often than 8 times an interval: an agent flipping its
  // health in every frame must not drive the scheduler. News held back goes with a later frame
  // (it stays news until forwarded); an agent sends one every interval. A drain's start or end
  // goes at once whatever health news went just before (offers to a draining agent are only
  // declined), and is paced on its own the same way.
  const auto news_wait = owner_->options_.heartbeat_interval / 8;
  const bool drain_due = draining_news && now - draining_forwarded_at_ >= news_wait;
  const auto wait_min = drain_due ? std::chrono::milliseconds(0)
                        : news    ? news_wait
                                  : owner_->options_.heartbeat_interval / 2;
  if (forwarded_ && now - forwarded_at_ < wait_min) {
    owner_->heartbeats_skipped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  if (draining_news) draining_forwarded_at_ = now;
  forwarded_ = beat;
  forwarded_at_ = now;
  owner_->heartbeats_forwarded_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void link_session::start() {
  auto self = shared_from_this();
  std::weak_ptr<link_session> weak = self;
  const auto interval = owner_->options_.heartbeat_interval;
  actor_ = owner_->system_.spawn([weak, interval](link_actor::pointer actor) -> link_actor::behavior_type {
    actor->delayed_send(actor, interval, actors::tick_atom::value);
    return {
        [weak](actors::offer_atom, const actors::job_offer& offer) {
          auto session = weak.lock();
          // A replaced link takes no offer: the relay would make the job the provider's on a
          // socket that is closing (and count a second start when the scheduler offers it again
          // on the new link, as it does for the jobs of a link that linked again).
          if (!session || session->done_with()) return;
          if (auto frame = session->owner_->relay_.take_offer(session->provider_id_, offer)) {
            session->send(std::move(*frame));
          }
        },
        [weak](actors::cancel_atom, const std::string& job_id) {
          auto session = weak.lock();
          // A replaced link's frames are ignored already; revoking here could take the job from
          // the provider's new link.
          if (!session || session->done_with()) return;
          // The job is taken away from this provider (its client left, or it gave no first token
          // in time and goes to another one): what the agent still sends for it is not relayed.
          session->owner_->relay_.revoke(session->provider_id_, job_id);
          session->send(link::cancel{job_id});
        },
        [weak, actor, interval](actors::tick_atom) {
          auto session = weak.lock();
          if (!session || session->closed_) return;
          const auto& options = session->owner_->options_;
          // Its hello being answered (which may wait for the store), the agent need send nothing;
          // that wait counts from the hello, whatever the agent sends meanwhile.
          const bool answering_hello = session->hello_seen_ && !session->online_;
          const auto& since = answering_hello ? session->hello_at_ns_ : session->last_frame_ns_;
          const auto silent =
              steady::now().time_since_epoch() - steady::duration(since.load(std::memory_order_relaxed));
          if (silent > (answering_hello ? options.hello_answer_wait_max : options.stale_after)) {
            session->stale_ = true;
            const auto silent_ms = std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(silent).count());
            session->close(1008, answering_hello ? "the hello was not answered within " + silent_ms + " ms"
                                                 : "no heartbeat for " + silent_ms + " ms: the link is stale");
            return;
          }
          // The token it opened with was replaced (lost, or leaked): it opens nothing any more.
          if (!session->owner_->directory_.token_is_of(session->token_hash_, session->provider_id_)) {
            session->close(1008, "this provider's token was replaced: link again with the new one");
            return;
          }
          actor->delayed_send(actor, interval, actors::tick_atom::value);
        },
    };
  });
  if (const auto tracked = owner_->track(this, actor_); tracked != provider_links::impl::tracking::tracked) {
    caf::anon_send_exit(actor_, caf::exit_reason::user_shutdown);
    closed_ = true;
    if (tracked == provider_links::impl::tracking::stopped) {
      connection_->close(1001, "the server is stopping");
    } else {
      connection_->close(1008, "this provider has " + std::to_string(owner_->options_.links_per_provider_max) +
                                   " links open, the most allowed");
    }
    return;
  }
  connection_->start([self](std::string_view bytes) { self->on_message(bytes); },
                     [self](std::string reason) { self->on_closed(std::move(reason)); });
}

void link_session::on_message(std::string_view bytes) {
  if (done_with()) return;
  touch();
  const std::span<const std::uint8_t> view(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
  auto decoded = link::decode(view, owner_->options_.limits);
  if (!decoded) {
    protocol_error_ = true;
    return close(link::websocket_close_code(decoded.error().code), decoded.error().message);
  }
  auto& frame = decoded.value();
  if (auto* hello = std::get_if<link::hello>(&frame)) {
    if (hello_seen_) {
      protocol_error_ = true;
      return close(1008, "hello may be sent only once per link");
    }
    hello_at_ns_.store(steady::now().time_since_epoch().count(), std::memory_order_relaxed);
    hello_seen_ = true;
    if (!owner_->take_hello_turn(provider_id_)) {
      return close(1008, "this provider said hello less than " +
                             std::to_string(owner_->options_.hello_interval_min.count()) +
                             " ms ago (hello_interval_min); link again later");
    }
    return on_hello(*hello);
  }
  if (!hello_seen_) {
    protocol_error_ = true;
    return close(1008, std::string("the first frame must be hello, not ") + std::string(link::frame_name(frame)));
  }
  if (!online_ && !std::holds_alternative<link::heartbeat>(frame)) {
    // No offer goes out before the link is online: a frame about a job is another link's (a
    // second agent with the same token whose hello is still being checked) or made up.
    protocol_error_ = true;
    return close(1008, std::string("no ") + std::string(link::frame_name(frame)) + " may come before the welcome");
  }
  auto& relay = owner_->relay_;
  std::visit(
      [&](auto& f) {
        using F = std::decay_t<decltype(f)>;
        if constexpr (std::is_same_v<F, link::heartbeat>) {
          if (!online_) return;
          {
            std::lock_guard lock(heartbeat_mutex_);
            heartbeat_ = f;
          }
          if (!forward_heartbeat(f)) return;
          // The frame's load is the share of the agent's slots in use. The scheduler counts the
          // jobs it placed itself, and more freshly; read as the GPU's load (what the selection
          // index's load means) it would shut the provider out at 80 % of its slots until a later
          // heartbeat. The link has no measure of the GPU's own load, so none is passed on.
          caf::anon_send(owner_->runtime_.scheduler, actors::load_atom::value, provider_id_,
                         domain::load_report{.load_percent = 0, .health_percent = f.health_percent,
                                             .draining = f.draining});
        } else if constexpr (std::is_same_v<F, link::delta>) {
          relay.delta(provider_id_, std::move(f));
        } else if constexpr (std::is_same_v<F, link::deltas>) {
          for (auto& item : f.items) relay.delta(provider_id_, std::move(item));
        } else if constexpr (std::is_same_v<F, link::done>) {
          relay.done(provider_id_, f);
        } else if constexpr (std::is_same_v<F, link::job_error>) {
          relay.failed(provider_id_, f);
        } else if constexpr (std::is_same_v<F, link::advertise>) {
          const auto now = steady::now();
          if (advertised_at_ && now - *advertised_at_ < owner_->options_.advertise_interval_min) {
            protocol_error_ = true;
            return close(1008, "advertise frames may come at most every " +
                                   std::to_string(owner_->options_.advertise_interval_min.count()) + " ms");
          }
          advertised_at_ = now;
          on_advertise(within_concurrency(std::move(f.models)));
        } else {
          protocol_error_ = true;
          close(1008, std::string("an agent may not send ") + std::string(link::frame_name(frame)));
        }
      },
      frame);
}

std::vector<events::model_offer> link_session::within_concurrency(std::vector<events::model_offer> models) const {
  if (concurrency_max_ == 0) return models;
  for (auto& offer : models) offer.max_concurrency = std::min(offer.max_concurrency, concurrency_max_);
  return models;
}

void link_session::on_hello(const link::hello& hello) {
  concurrency_max_ = hello.max_concurrency;
  auto offers = within_concurrency(hello.models);
  std::vector<domain::provider::command> commands;
  commands.push_back(domain::provider::connect{hello.gpus, hello.backend, hello.backend_url, hello.agent_version});
  commands.push_back(domain::provider::advertise{offers});
  // The hello is checked against the provider's state before this link takes over: a hello that
  // would be refused (a bad offer, a suspension) must not end the provider's link that works,
  // which a second agent started with the same token would otherwise do at each of its retries.
  auto self = shared_from_this();
  auto owner = owner_;
  owner_->bridge_.run_keyed(provider_id_, [self, owner, commands = std::move(commands), models = std::move(offers),
                                           gpus = hello.gpus.size()](caf::event_based_actor* actor) mutable {
    actor->request(owner->runtime_.providers, caf::infinite, self->provider_id_, actors::state_atom::value)
        .then(
            [self, owner, commands = std::move(commands), models = std::move(models),
             gpus](const domain::provider::state& state) mutable {
              if (auto refused = domain::decide_all<domain::provider>(state, commands, owner->options_.clock_us());
                  !refused) {
                return self->close(1008, refused.error().message);
              }
              self->take_over(std::move(commands), std::move(models), gpus);
            },
            [self](caf::error& failure) { self->close(1011, link_failure(self->provider_id_, "hello", failure)); });
  });
}

void link_session::on_advertise(std::vector<events::model_offer> models) {
  auto self = shared_from_this();
  auto owner = owner_;
  owner_->bridge_.run_keyed(provider_id_, [self, owner, models = std::move(models)](caf::event_based_actor* actor) mutable {
    // Replaced meanwhile: the newer link's hello says what the provider offers.
    if (self->done_with()) return;
    const std::size_t offered = models.size();
    actor->request(owner->runtime_.providers, caf::infinite, self->provider_id_,
                   domain::provider::command{domain::provider::advertise{models}})
        .then(
            [self, owner, actor, models = std::move(models), offered](const actors::command_reply& r) mutable {
              if (r.events.empty()) return;  // the offers it has already: nothing to relist
              actor->request(owner->runtime_.providers, caf::infinite, self->provider_id_, actors::state_atom::value)
                  .then(
                      [self, owner, actor, models = std::move(models), offered](const domain::provider::state& state) {
                        std::lock_guard online(self->online_mutex_);
                        if (self->done_with()) return;
                        owner->relay_.provider_online({self->provider_id_, models});
                        actor->send(owner->runtime_.scheduler, actors::online_atom::value,
                                    actors::provider_online{domain::listing_for(state, owner->options_.clock_us()),
                                                            actors::provider_session{self->actor_}});
                        spdlog::info("link: provider={} now offers models={}", self->provider_id_, offered);
                      },
                      [self](caf::error& failure) { self->close(1011, link_failure(self->provider_id_, "advertise", failure)); });
            },
            [self](caf::error& failure) {
              // A refused offer (over a limit, a model twice) or the store: as for a hello.
              self->protocol_error_ = actors::domain_error_of(failure).has_value();
              self->close(self->protocol_error_ ? 1008 : 1011, link_failure(self->provider_id_, "advertise", failure));
            });
  });
}

void link_session::take_over(std::vector<domain::provider::command> commands, std::vector<events::model_offer> models,
                             std::size_t gpus) {
  std::lock_guard handover(owner_->handover_mutex_);
  // Ended while its hello was checked: it never became the provider's link, so its end recorded
  // nothing, and nothing is to be undone.
  if (closed_) return;
  if (auto previous = owner_->adopt(shared_from_this())) {
    previous->retire();
    owner_->relay_.link_replaced(provider_id_);  // before this hello's task: same bridge key
  }
  auto self = shared_from_this();
  auto owner = owner_;
  owner_->bridge_.run_keyed(provider_id_, [self, owner, commands = std::move(commands), models = std::move(models),
                                           gpus](caf::event_based_actor* actor) mutable {
    actor->request(owner->runtime_.providers, caf::infinite, self->provider_id_, std::move(commands))
        .then(
            [self, owner, actor, models, gpus](const actors::command_reply&) {
              actor->request(owner->runtime_.providers, caf::infinite, self->provider_id_, actors::state_atom::value)
                  .then(
                      [self, owner, actor, models, gpus](const domain::provider::state& state) {
                        std::lock_guard online(self->online_mutex_);
                        if (self->done_with()) return;
                        // Online, and welcomed, before the scheduler hears of it: its first offer
                        // goes out after the welcome, which tells the agent how to answer it.
                        self->online_ = true;
                        self->touch();  // its heartbeats are due from the welcome on
                        self->send(link::welcome{
                            .provider_id = self->provider_id_,
                            .heartbeat_interval_ms = static_cast<std::uint32_t>(owner->options_.heartbeat_interval.count()),
                            .delta_batches = true,
                            .reasoning_deltas = true,
                            .model_updates = true});
                        owner->relay_.provider_online({self->provider_id_, models});
                        actor->send(owner->runtime_.scheduler, actors::online_atom::value,
                                    actors::provider_online{domain::listing_for(state, owner->options_.clock_us()),
                                                            actors::provider_session{self->actor_}});
                        spdlog::info("link: provider={} online models={} gpus={} level={}", self->provider_id_,
                                     models.size(), gpus, static_cast<int>(state.level));
                      },
                      [self](caf::error& failure) { self->close(1011, link_failure(self->provider_id_, "hello", failure)); });
            },
            [self](caf::error& failure) {
              // Refused although the check passed: the provider's state changed in between (e.g.
              // it was suspended); the domain's message says why. Or the store failed.
              self->close(actors::domain_error_of(failure) ? 1008 : 1011, link_failure(self->provider_id_, "hello", failure));
            });
  });
}

void link_session::close(std::uint16_t code, std::string reason) {
  spdlog::warn("link: closing provider={} code={} reason={}", provider_id_, code, reason);
  connection_->close(code, reason);
  // Not when the closing handshake ends: a stale agent never answers it (the socket would go only
  // after Beast's close timeout or the idle watch), and its jobs must move on now.
  end(std::move(reason));
}

void link_session::retire() {
  retired_ = true;
  close(link::close_code_replaced, "replaced by a newer link of the same provider");
}

void link_session::on_closed(std::string reason) { end(controls_replaced(reason)); }  // the peer's words

void link_session::end(std::string reason) {
  {
    std::lock_guard online(online_mutex_);
    if (closed_.exchange(true)) return;
  }
  caf::anon_send_exit(actor_, caf::exit_reason::user_shutdown);
  owner_->untrack(this);
  if (retired_ || !hello_seen_) return;
  std::lock_guard handover(owner_->handover_mutex_);
  const bool current = owner_->release(this);
  if (!current) return;  // its hello was refused, or the link ended while the hello was checked
  spdlog::info("link: provider={} offline reason={}", provider_id_, reason);
  owner_->relay_.link_lost(provider_id_);  // jobs back to the scheduler, then offline
  const auto why = stale_            ? events::disconnect_reason::heartbeat_missed
                   : protocol_error_ ? events::disconnect_reason::protocol_error
                                     : events::disconnect_reason::connection_lost;
  auto owner = owner_;
  const std::string provider_id = provider_id_;
  owner_->bridge_.run_keyed(provider_id, [owner, provider_id, why, reason](caf::event_based_actor* actor) {
    actor->request(owner->runtime_.providers, caf::infinite, provider_id,
                   domain::provider::command{domain::provider::disconnect{why, std::string(utf8_prefix(reason, 200))}})
        .then([](const actors::command_reply&) {},
              [provider_id](caf::error& failure) {
                spdlog::warn("link: disconnect of provider={} not recorded: {}", provider_id, actors::describe(failure));
              });
  });
}

provider_links::provider_links(caf::actor_system& system, actor_bridge& bridge, const actors::runtime& runtime,
                               directory& who, relay& answers, provider_link_options options)
    : impl_(std::make_shared<impl>(system, bridge, runtime, who, answers, std::move(options))) {}

provider_links::~provider_links() { impl_->stop(); }
void provider_links::stop() { impl_->stop(); }

websocket_decision provider_links::upgrade(const http_request& request) { return impl_->upgrade(request); }
std::size_t provider_links::online() const noexcept { return impl_->online(); }
provider_link_counts provider_links::counts() const noexcept {
  return {impl_->heartbeats_forwarded_.load(std::memory_order_relaxed),
          impl_->heartbeats_skipped_.load(std::memory_order_relaxed)};
}
std::optional<link::heartbeat> provider_links::last_heartbeat(const std::string& provider_id) const {
  return impl_->last_heartbeat(provider_id);
}

}  // namespace gpustream::gateway
