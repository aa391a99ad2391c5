#include "gateway/relay.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <set>
#include <tuple>
#include <variant>

#include "actors/errors.hpp"
#include "gateway/actor_bridge.hpp"

namespace gpustream::gateway {
namespace {

using clock = std::chrono::steady_clock;

/// A job's end the scheduler recorded with a bill the ledger has not taken yet: the operator's to
/// know (gpustream_job_bills_retrying counts those retried).
void log_if_unsettled(const actors::job_ended& ended) {
  if (!ended.bill_unsettled.empty()) {
    spdlog::error("relay: job={} ended, and its bill is recorded but not settled: {}", ended.job_id, ended.bill_unsettled);
  }
}

/// Where a live job is in its life on this node.
enum class phase : std::uint8_t {
  submitting,  ///< asked the scheduler, no answer yet
  running,     ///< accepted: waiting for or receiving the answer
  finishing,   ///< the provider is done: ad and settlement under way
  ended,       ///< the client got its last byte (or left)
};

struct live_job {
  std::mutex mutex;
  relay_job job;
  response_meta meta;
  phase state = phase::submitting;
  bool cut_short = false;       ///< a stopping node cut it short: nothing more from its provider
  bool stream_started = false;  ///< the stream's headers went out
  std::string text;             ///< the answer so far, over every attempt
  std::string reasoning;        ///< a reasoning model's thinking so far, for a whole chat answer (none kept for a stream)
  std::uint32_t tokens = 0;     ///< pieces so far (answer and thinking): the platform's own count
  std::uint32_t attempt_tokens = 0;  ///< of those, the current attempt's
  std::uint64_t attempt_bytes = 0;   ///< their text, bytes
  bool piece_sent = false;      ///< a piece went out (the first carries the assistant role)
  std::string provider_id;      ///< the provider of the current attempt
  std::uint32_t attempt = 0;    ///< the current attempt's number, from its offer
  bool attempt_started = false; ///< the current attempt produced a token
  std::uint32_t failovers = 0;  ///< attempts that continued an answer begun elsewhere
  std::optional<ad_info> ad;
  /// A free-tier job's ad is to be picked, or being picked: it starts once the scheduler has
  /// accepted the job or offered it, whichever comes first (ad_pick_started).
  bool ad_pending = false;
  bool ad_pick_started = false;
  /// The provider finished while the ad was still being picked: the result, reported once it is.
  struct finished {
    actors::job_result result;
    std::string finish_reason;
  };
  std::optional<finished> waiting_for_ad;
  clock::time_point received_at = clock::now();
  clock::time_point offered_at{};  ///< when its latest offer went to a provider
  clock::time_point attempt_first_at{};  ///< when the current attempt's first piece came
  clock::time_point last_piece_at{};     ///< when the current attempt's latest piece came
  bool first_token_seen = false;
  bool result_sent = false;  ///< finishing: its result is on its way to the scheduler
  bool ad_written = false;   ///< its stream's ad chunk went out (show_ad)
  /// Its client left while its result was on its way: the scheduler's answer to the result
  /// counts its end in the metrics (count_after_client_left).
  bool counted_by_result = false;
};

std::int64_t unix_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// The quality tier a request runs at: the one it asks for, or standard.
events::quality_tier job_quality(const completion_request& request) {
  return request.extension.quality.value_or(events::quality_tier::standard);
}

/// A refusal from the scheduler, as the client sees it.
api_error refusal_of(const caf::error& failure) {
  const auto domain_failure = actors::domain_error_of(failure);
  if (!domain_failure) {
    return make_api_error(500, "the job could not be recorded: " + actors::describe(failure));
  }
  switch (domain_failure->code) {
    case domain::errc::no_provider:
      return make_api_error(503, domain_failure->message, "model", "no_provider");
    case domain::errc::insufficient_funds:
      return make_api_error(402, domain_failure->message, {}, "insufficient_funds");
    case domain::errc::quota_exceeded:
      return make_api_error(429, domain_failure->message, {}, "insufficient_quota");
    case domain::errc::busy:  // a queue is full now
      return make_api_error(429, domain_failure->message, {}, "server_busy");
    case domain::errc::limit_exceeded:  // a fixed limit the request exceeds (e.g. a price past int64): no retry helps
      return make_api_error(400, domain_failure->message, {}, "limit_exceeded");
    case domain::errc::invalid_argument:
      return make_api_error(400, domain_failure->message);
    default:
      return make_api_error(500, domain_failure->message);
  }
}

}  // namespace

class relay::impl : public std::enable_shared_from_this<impl> {
 public:
  impl(caf::actor_system& system, actor_bridge& bridge, actors::scheduler_actor scheduler, ad_source* ads,
       relay_options options)
      : system_(system), bridge_(bridge), scheduler_(std::move(scheduler)), ads_(ads), options_(std::move(options)) {}

  void start() {
    std::weak_ptr<impl> weak = shared_from_this();
    watcher_ = system_.spawn([weak](actors::job_watcher::pointer) -> actors::job_watcher::behavior_type {
      return {[weak](const actors::job_ended& ended) {
        if (auto self = weak.lock()) self->ended_by_scheduler(ended);
      }};
    });
    check_silence_later();
  }

  /// Every silence_check_interval until stop(): answers whose provider went silent after a piece
  /// (relay_options::piece_silence_max) are failed there and continue elsewhere.
  void check_silence_later() {
    std::weak_ptr<impl> weak = shared_from_this();
    bridge_.run_later(options_.silence_check_interval, [weak](caf::event_based_actor*) {
      auto self = weak.lock();
      if (!self) return;
      {
        std::lock_guard table(self->table_mutex_);
        if (self->stopped_) return;
      }
      self->fail_silent();
      self->check_silence_later();
    });
  }

  void fail_silent() {
    const auto now = clock::now();
    std::vector<std::tuple<std::string, std::string, std::uint32_t>> silent;  // job, provider, tokens
    {
      std::lock_guard table(table_mutex_);
      for (const auto& [id, live] : jobs_) {
        std::lock_guard lock(live->mutex);
        if (live->state != phase::running || !live->attempt_started || live->provider_id.empty() ||
            now - live->last_piece_at <= options_.piece_silence_max) {
          continue;
        }
        silent.emplace_back(id, live->provider_id, live->tokens);
        live->provider_id.clear();  // what it may still send is not relayed; current again at its next offer
      }
    }
    const auto silence_s = std::chrono::duration_cast<std::chrono::seconds>(options_.piece_silence_max).count();
    for (const auto& [job_id, provider_id, tokens] : silent) {
      report_failure_keyed(provider_id, job_id, tokens,
                           "the provider sent nothing for " + std::to_string(silence_s) + " s in the middle of the answer",
                           domain::job_fault::provider);
    }
  }

  void stop() {
    stop_and_wait(system_, {caf::actor_cast<caf::actor>(watcher_)});
    // The live jobs' replies hold their connections: they must go while the server still runs.
    std::map<std::string, std::shared_ptr<live_job>> dropped;
    {
      std::lock_guard lock(table_mutex_);
      stopped_ = true;  // a request still arriving must not leave a reply behind
      dropped.swap(jobs_);
    }
  }

  std::size_t drain(std::chrono::milliseconds wait_max, std::chrono::milliseconds cancel_wait_max) {
    std::vector<std::string> left;
    {
      std::unique_lock lock(table_mutex_);
      draining_ = true;
      drained_.wait_for(lock, wait_max, [&] { return jobs_.empty(); });
      for (const auto& [id, live] : jobs_) left.push_back(id);
    }
    std::size_t cut = 0;
    for (const auto& id : left) cut += cut_short(id) ? 1 : 0;
    std::unique_lock lock(table_mutex_);
    drained_.wait_for(lock, cancel_wait_max, [&] { return jobs_.empty(); });
    return cut;
  }

  // -- API ----------------------------------------------------------------------------------

  void submit(relay_job job) {
    auto live = std::make_shared<live_job>();
    const std::string id = job.job_id;
    live->meta = response_meta{job.request.kind, id, job.request.model, unix_seconds()};
    actors::job_request request;
    request.job_id = id;
    request.user_id = job.user_id;
    request.model = job.request.model;
    request.quality = job_quality(job.request);
    request.prompt_tokens = job.prompt_tokens;
    request.max_tokens = job.completion_budget;
    request.max_price_micros = job.request.extension.max_price_micros.value_or(0);
    request.premium = job.premium;
    request.conversation_id = job.request.extension.conversation_id;
    request.contribution_score = job.contribution_score;
    request.watcher = watcher_;
    request.context_tokens_min = context_tokens_needed(job.prompt_tokens, job.request.max_tokens);
    const bool wants_ad = !job.premium && ads_ != nullptr;
    live->job = std::move(job);
    live->ad_pending = wants_ad;
    // Whole before it is in the table, where a drain or a link's loss may find it.
    {
      std::lock_guard lock(table_mutex_);
      const auto refuse = [&](const api_error& error) {
        live->job.reply->send({error.status, "application/json", error_body(error), {{"Retry-After", "1"}}});
      };
      if (stopped_ || draining_) {
        return refuse(make_api_error(503, "this node is shutting down; retry on another", {}, "server_shutting_down"));
      }
      if (jobs_.size() >= options_.live_jobs_max) {
        return refuse(make_api_error(429,
                                     "this node holds " + std::to_string(jobs_.size()) +
                                         " live jobs, the most allowed (live_jobs_max); retry later",
                                     {}, "server_busy"));
      }
      jobs_.emplace(id, live);
    }
    std::weak_ptr<impl> weak = shared_from_this();
    live->job.reply->on_close([weak, id] {
      if (auto self = weak.lock()) self->client_gone(id);
    });
    auto self = shared_from_this();
    // Keyed by the job: a cancel (also keyed) reaches the scheduler after the submission.
    bridge_.run_keyed(id, [self, id, request = std::move(request)](caf::event_based_actor* actor) mutable {
      actor->request(self->scheduler_, caf::infinite, std::move(request))
          .then([self, id](const actors::job_accepted&) { self->accepted(id); },
                [self, id](caf::error& failure) { self->finish_error(id, refusal_of(failure)); });
    });
  }

  std::vector<model_listing> models() const {
    std::map<std::string, model_listing> by_name;
    std::lock_guard lock(providers_mutex_);
    for (const auto& [provider_id, offers] : providers_) {
      for (const auto& offer : offers) {
        auto [it, fresh] = by_name.try_emplace(offer.model_name);
        auto& m = it->second;
        const auto price = offer.output_price_micros_per_mtok;
        if (fresh) {
          m.id = offer.model_name;
          m.created_s = unix_seconds();
          m.context_length = offer.context_length_tokens;
          m.price_per_mtok_min_micros = price;
          m.price_per_mtok_max_micros = price;
        }
        m.context_length = std::max(m.context_length, offer.context_length_tokens);
        m.price_per_mtok_min_micros = std::min(m.price_per_mtok_min_micros, price);
        m.price_per_mtok_max_micros = std::max(m.price_per_mtok_max_micros, price);
        m.providers_online += 1;
      }
    }
    std::vector<model_listing> out;
    for (auto& [name, m] : by_name) out.push_back(std::move(m));
    return out;
  }

  std::optional<std::uint32_t> context_length(const std::string& model) const {
    std::optional<std::uint32_t> largest;
    std::lock_guard lock(providers_mutex_);
    for (const auto& [provider_id, offers] : providers_) {
      for (const auto& offer : offers) {
        if (offer.model_name != model) continue;
        largest = std::max(largest.value_or(0), offer.context_length_tokens);
      }
    }
    return largest;
  }

  std::size_t live_jobs() const {
    std::lock_guard lock(table_mutex_);
    return jobs_.size();
  }

  // -- Links --------------------------------------------------------------------------------

  void provider_online(online_offers offers) {
    std::lock_guard lock(providers_mutex_);
    providers_[offers.provider_id] = std::move(offers.models);
  }

  void provider_offline(const std::string& provider_id) {
    std::lock_guard lock(providers_mutex_);
    providers_.erase(provider_id);
  }

  std::optional<link::offer> take_offer(const std::string& provider_id, const actors::job_offer& offer) {
    auto live = find(offer.job_id);
    if (!live) {
      // Nobody waits for it here any more (the client left, or its answer ended in an error):
      // the scheduler stops the job at once rather than wait for a first token that never comes
      // and blame the provider for it.
      cancel_unknown(offer.job_id, provider_id);
      return std::nullopt;
    }
    std::optional<ad_pick> pick;
    auto made = offer_of(*live, provider_id, offer, pick);
    if (pick) start_ad_pick(offer.job_id, std::move(*pick));
    if (auto* frame = std::get_if<link::offer>(&made)) return std::move(*frame);
    // Its answer finished (its result on the way) or ended meanwhile: as for a job not here.
    if (std::get<offer_declined>(made) == offer_declined::answer_over) cancel_unknown(offer.job_id, provider_id);
    return std::nullopt;
  }

  /// Why offer_of sends no frame.
  enum class offer_declined {
    answer_over,  ///< finished (its result on the way) or ended: the scheduler cancels the job
    /// An offer of an earlier attempt, come late: the job is no longer that provider's, which may
    /// be the one whose finished answer's result is on its way (no cancel, which would end it).
    stale_attempt,
    failed,  ///< it cannot be sent (reported as the job's failure)
  };

  /// What an ad's pick needs of its job.
  struct ad_pick {
    std::string user_id;
    std::string prompt_text;
  };

  /// With `live`'s lock held: the job's ad pick, to start once the lock is let go, unless it
  /// started before, the job wants none, or a stopping node cut it short (it shows no ad).
  std::optional<ad_pick> claim_ad_pick(live_job& live) const {
    if (!live.ad_pending || live.ad_pick_started || live.cut_short) return std::nullopt;
    live.ad_pick_started = true;
    return ad_pick{live.job.user_id, prompt_of(live.job.request, options_.ad_prompt_bytes_max)};
  }

  void start_ad_pick(const std::string& id, ad_pick pick) {
    auto self = shared_from_this();
    ads_->pick(id, std::move(pick.user_id), std::move(pick.prompt_text),
               [self, id](std::optional<ad_info> ad) { self->ad_picked(id, std::move(ad)); });
  }

  /// take_offer's offer frame for a live job, or why none; `pick` gets its ad's pick when the
  /// offer is the first sign that the scheduler took the job.
  std::variant<link::offer, offer_declined> offer_of(live_job& live, const std::string& provider_id,
                                                     const actors::job_offer& offer, std::optional<ad_pick>& pick) {
    std::lock_guard lock(live.mutex);
    // An offer of an earlier attempt that reached its provider's session after a later one
    // reached another's (the sessions are not ordered against each other).
    if (offer.attempt != 0 && offer.attempt < live.attempt) return offer_declined::stale_attempt;
    if (live.state != phase::submitting && live.state != phase::running) return offer_declined::answer_over;
    pick = claim_ad_pick(live);
    // Continuing an answer begun elsewhere (its text, or only its thinking, which the next
    // provider starts over); the same attempt offered again on a provider's new link is no new
    // failover.
    if (live.tokens > 0 && (offer.attempt == 0 || offer.attempt != live.attempt)) live.failovers += 1;
    live.provider_id = provider_id;
    live.attempt = offer.attempt;
    live.offered_at = clock::now();
    live.attempt_started = false;
    live.attempt_tokens = 0;
    live.attempt_bytes = 0;
    const auto kind = live.job.request.kind == request_kind::chat ? link::job_kind::chat : link::job_kind::completion;
    auto body = upstream_body(live.job.request, live.text, live.tokens);
    if (body.size() > options_.offer_request_bytes_max) {
      // Only a continuation grows past the bound (the API admits a request with room for an
      // answer so far): it cannot go to any provider, whose agent would refuse the frame and drop
      // its link. The job fails here, through no provider's fault.
      report_failure_keyed(provider_id, offer.job_id, live.tokens,
                           "the answer broke off after " + std::to_string(live.tokens) +
                               " tokens, and with it the request is " + std::to_string(body.size()) + " bytes, over the " +
                               std::to_string(options_.offer_request_bytes_max) +
                               " a provider can be sent: it cannot be continued",
                           domain::job_fault::platform);
      return offer_declined::failed;
    }
    return link::offer{offer.job_id, kind, std::move(body), offer.attempt};
  }

  void revoke(const std::string& provider_id, const std::string& job_id) {
    auto live = find(job_id);
    if (!live) return;
    std::lock_guard lock(live->mutex);
    if (is_current(*live, provider_id)) live->provider_id.clear();  // current again at its next offer
  }

  void delta(const std::string& provider_id, link::delta d) {
    auto live = find(d.job_id);
    if (!live) return;
    bool report_started = false;
    bool was_cut = false;
    std::optional<ended_attempt> cut;  // none also when the cut answer waits for its ad's pick
    {
      std::lock_guard lock(live->mutex);
      if (!is_current(*live, provider_id, d.attempt)) return;
      // No text is no token (the agent sends no empty piece; one that did would bill nothing).
      if (d.text.empty()) return;
      // What the backend generated, shown or not: its usage counts it.
      live->attempt_bytes += d.text.size();
      // A completion (no chat) has nowhere to put thinking: it is neither shown nor billed, but its
      // bytes count against the answer's bound (a backend that thinks for ever is cut off too).
      if (!d.reasoning || live->job.request.kind == request_kind::chat) {
        live->last_piece_at = clock::now();
        if (!live->attempt_started) {
          live->attempt_started = true;
          live->attempt_first_at = live->last_piece_at;
          report_started = true;
        }
        if (!live->first_token_seen) {
          live->first_token_seen = true;
          if (options_.observer.first_token) {
            const auto now = clock::now();
            options_.observer.first_token(std::chrono::duration_cast<std::chrono::microseconds>(now - live->received_at),
                                          std::chrono::duration_cast<std::chrono::microseconds>(now - live->offered_at));
          }
        }
        start_stream(*live);
        live->tokens += 1;
        live->attempt_tokens += 1;
        const bool first = !std::exchange(live->piece_sent, true);
        if (!d.reasoning) {
          live->text += d.text;
        } else if (!live->job.request.stream) {
          live->reasoning += d.text;  // a stream's thinking is sent, not kept: no failover carries it
        }
        if (live->job.request.stream) {
          live->job.reply->write(sse_event(d.reasoning ? reasoning_chunk_json(live->meta, d.text, first)
                                                       : chunk_json(live->meta, d.text, first)));
        }
      }
      const std::uint64_t pieces_max = overrun_limit(attempt_asked(*live));
      const std::uint64_t bytes_max =
          std::min<std::uint64_t>(pieces_max * options_.piece_bytes_average_max, options_.answer_bytes_max);
      if (live->attempt_tokens >= pieces_max || live->attempt_bytes > bytes_max) {
        cut = cut_off(*live, provider_id);
        was_cut = true;
      }
    }
    if (report_started) send_started(provider_id, d.job_id);
    if (was_cut) {
      // Its provider stops now, not once the ad is picked and the result settled: the backend
      // would go on unpaid in one of its slots meanwhile. Keyed by provider: ahead of the result.
      bridge_.run_keyed(provider_id, [self = shared_from_this(), job_id = d.job_id,
                                      provider_id](caf::event_based_actor* actor) {
        actor->send(self->scheduler_, actors::cancel_atom::value, job_id, provider_id);
      });
    }
    if (cut) finish_with_ad(live, std::move(cut->result), std::move(cut->finish_reason), std::move(cut->impression));
  }

  /// The most the current attempt's backend should produce, as upstream_body asked it: the
  /// answer's bound less the answer before this attempt (after a failover, what was left).
  static std::uint32_t attempt_asked(const live_job& live) {
    const std::uint32_t answer_max = live.job.answer_tokens_max != 0 ? live.job.answer_tokens_max : live.job.completion_budget;
    const std::uint32_t before = live.tokens - live.attempt_tokens;
    return answer_max > before ? answer_max - before : 1;
  }

  /// The most pieces an answer of at most `tokens` tokens may have before it is cut off.
  std::uint64_t overrun_limit(std::uint32_t tokens) const {
    return std::uint64_t{tokens} +
           std::max<std::uint64_t>(options_.overrun_pieces_min, std::uint64_t{tokens} * options_.overrun_percent / 100);
  }

  /// An attempt's end, ready for finish_with_ad.
  struct ended_attempt {
    actors::job_result result;
    std::string finish_reason;
    std::optional<std::string> impression;
  };

  /// With `live`'s lock held: its answer ran past overrun_limit (a backend that ignores max_tokens,
  /// or never stops). It ends here as cut by its length, billed at its budget as any longer answer
  /// is; the scheduler tells its provider to stop. Nothing when the answer waits for its ad first.
  std::optional<ended_attempt> cut_off(live_job& live, const std::string& provider_id) {
    actors::job_result result;
    result.cut = true;
    time_attempt(live, result);
    return end_attempt(live, provider_id, std::move(result), "length");
  }

  /// With `live`'s lock held: the attempt's times, which score the provider and rank it for
  /// `fastest`. The first token's is the relay's own, from the offer to the first piece (to the
  /// end, for an empty answer). The decoding's (total less first token) is the agent's figure when
  /// it sends one, which its link's batching and bursts do not shorten, within what the relay saw:
  /// at least the time from the first piece to now (batching only shortens that), at most the
  /// time from the offer to now (an agent cannot finish decoding before it got the offer).
  static void time_attempt(const live_job& live, actors::job_result& result,
                           std::optional<std::pair<std::int64_t, std::int64_t>> agent_ttft_total_us = std::nullopt) {
    const auto now = clock::now();
    const auto micros = [&](clock::time_point t) {
      return std::chrono::duration_cast<std::chrono::microseconds>(t - live.offered_at).count();
    };
    const std::int64_t total = micros(now);
    result.ttft_us = micros(live.attempt_first_at >= live.offered_at ? live.attempt_first_at : now);
    std::int64_t decoding = total - result.ttft_us;
    if (agent_ttft_total_us && agent_ttft_total_us->second > 0) {
      const auto [agent_ttft, agent_total] = *agent_ttft_total_us;
      const std::int64_t agent_decoding = agent_total - std::clamp<std::int64_t>(agent_ttft, 0, agent_total);
      decoding = std::clamp(agent_decoding, decoding, total);
    }
    result.total_us = result.ttft_us + decoding;
  }

  /// With `live`'s lock held: the current attempt, of `provider_id`, ended with `result` (what
  /// only the provider knows already in it) and `finish_reason`. The job is finishing; what
  /// finish_with_ad needs, or nothing when the ad is still being picked (ad_picked finishes it).
  std::optional<ended_attempt> end_attempt(live_job& live, const std::string& provider_id, actors::job_result result,
                                           std::string finish_reason) {
    live.state = phase::finishing;
    result.job_id = live.job.job_id;
    result.provider_id = provider_id;
    result.completion_tokens = live.tokens;
    result.attempt_tokens = live.attempt_tokens;
    result.attempt_bytes = live.attempt_bytes;
    if (live.ad_pending) {  // a quick answer: its ad comes with ad_picked
      live.waiting_for_ad = live_job::finished{std::move(result), std::move(finish_reason)};
      return std::nullopt;
    }
    std::optional<std::string> impression;
    if (live.ad) impression = live.ad->impression_id;
    return ended_attempt{std::move(result), std::move(finish_reason), std::move(impression)};
  }

  /// Tells the scheduler the attempt produced its first token (the job streams).
  void send_started(const std::string& provider_id, const std::string& job_id) {
    auto self = shared_from_this();
    bridge_.run_keyed(provider_id, [self, job_id, provider_id](caf::event_based_actor* actor) {
      actor->request(self->scheduler_, caf::infinite, actors::started_atom::value, job_id, provider_id)
          .then([](std::uint64_t) {},
                [job_id](caf::error& failure) {
                  // The job moved on meanwhile (cancelled, reassigned): its end is reported there.
                  spdlog::debug("relay: start of job={} not recorded: {}", job_id, actors::describe(failure));
                });
    });
  }

  void done(const std::string& provider_id, const link::done& d) {
    auto live = find(d.job_id);
    if (!live) return cancel_unknown(d.job_id, provider_id);
    actors::job_result result;
    result.provider_reported_tokens = d.completion_tokens_reported;
    result.prompt_tokens_reported = d.prompt_tokens_reported;
    std::optional<ended_attempt> ended;
    {
      std::lock_guard lock(live->mutex);
      if (!is_current(*live, provider_id, d.attempt)) return;
      if (!live->attempt_started) {  // an empty answer: it still started before it ended
        live->attempt_started = true;
        send_started(provider_id, d.job_id);
      }
      time_attempt(*live, result, std::pair{d.ttft_us, d.total_us});
      // The backend's own first-token time (the agent's figure, without the link), for the
      // metrics: within what the relay saw.
      if (options_.observer.provider_ttft) {
        options_.observer.provider_ttft(std::chrono::microseconds(std::clamp<std::int64_t>(d.ttft_us, 0, result.ttft_us)));
      }
      ended = end_attempt(*live, provider_id, std::move(result), std::string(client_finish_reason(d.finish_reason)));
    }
    if (ended) finish_with_ad(live, std::move(ended->result), std::move(ended->finish_reason), std::move(ended->impression));
  }

  /// Reports the provider's result, first recording the ad's impression (and its charge) when
  /// there is one to show.
  void finish_with_ad(std::shared_ptr<live_job> live, actors::job_result result, std::string finish_reason,
                      std::optional<std::string> impression) {
    auto self = shared_from_this();
    if (!impression) return report_result(std::move(live), std::move(result), std::move(finish_reason), false);
    ads_->served(*impression, [self, live = std::move(live), impression = *impression, result = std::move(result),
                               finish_reason = std::move(finish_reason)](std::optional<domain::ad_charge> charge) mutable {
      bool shown = charge.has_value();
      // Not recorded, as far as is known: the answer goes without its ad, which is taken back now
      // (its budget, pacing, the user's frequency cap) rather than when its reservation expires;
      // voided should its recording have been written after all (its answer lost), released if not.
      if (!shown) self->ads_->unserved(impression, "its impression could not be recorded");
      // Recorded, but its client left meanwhile: nobody will see it, so nobody pays for it.
      if (shown && !self->show_ad(*live)) {
        shown = false;
        charge.reset();
        self->ads_->unserved(impression, "the client left before the answer completed");
      }
      result.ad = std::move(charge);
      self->report_result(std::move(live), std::move(result), std::move(finish_reason), shown);
    });
  }

  void failed(const std::string& provider_id, const link::job_error& e) {
    auto live = find(e.job_id);
    if (!live) return cancel_unknown(e.job_id, provider_id);
    std::uint32_t tokens = 0;
    std::uint32_t attempt_tokens = 0;
    {
      std::lock_guard lock(live->mutex);
      if (!is_current(*live, provider_id, e.attempt)) return;
      tokens = live->tokens;
      attempt_tokens = live->attempt_tokens;
      live->provider_id.clear();  // reported once; current again at its next offer
    }
    report_failure_keyed(provider_id, e.job_id, tokens, e.message, fault_of(e, attempt_tokens));
  }

  /// Whose fault the agent says a failure was. An offer is declined before its attempt streamed
  /// anything: a "decline" after this attempt's tokens reached the client is the provider's
  /// failure (tokens of earlier attempts, on other providers, say nothing about this one).
  /// A backend refuses a request (HTTP 400, 413, 422) before its answer begins: a "rejection" after
  /// this attempt's tokens reached the client is the provider's failure too, or an agent could
  /// abort answers without their counting against it.
  static domain::job_fault fault_of(const link::job_error& e, std::uint32_t attempt_tokens_relayed) {
    if (e.upstream_fault) return domain::job_fault::provider;
    if (e.request_rejected) {
      return attempt_tokens_relayed == 0 && e.tokens_so_far == 0 ? domain::job_fault::request
                                                                 : domain::job_fault::provider;
    }
    return attempt_tokens_relayed == 0 && e.tokens_so_far == 0 ? domain::job_fault::declined
                                                               : domain::job_fault::provider;
  }

  void link_lost(const std::string& provider_id) {
    provider_offline(provider_id);
    jobs_lost(provider_id, "the provider's link was lost", true);
  }

  void link_replaced(const std::string& provider_id) {
    jobs_lost(provider_id, "the provider reconnected: the jobs of its old link were dropped by its agent", false);
  }

  /// Reports every job running on `provider_id` as failed there (each continues elsewhere with
  /// the answer so far, or fails), then, when `offline`, the provider as offline.
  void jobs_lost(const std::string& provider_id, const std::string& why, bool offline) {
    std::vector<std::pair<std::string, std::uint32_t>> lost;  // job, tokens so far
    bool defer_offline = false;
    // Held until the task below is queued: a finishing job's result is either counted as sent
    // here (result_sent) or awaited, and an offline notice sent for it follows this task.
    std::lock_guard waiting(offline_mutex_);
    {
      std::lock_guard table(table_mutex_);
      for (const auto& [id, live] : jobs_) {
        std::lock_guard lock(live->mutex);
        if (is_current(*live, provider_id)) {
          lost.emplace_back(id, live->tokens);
          live->provider_id.clear();  // reported once; current again at its next offer
        }
        // A finished job whose result is not on its way yet, also one whose client left meanwhile.
        const bool finished = live->state == phase::finishing || live->counted_by_result;
        if (offline && finished && live->provider_id == provider_id && !live->result_sent) {
          offline_after_[provider_id].jobs.insert(id);
          defer_offline = true;
        }
      }
    }
    auto self = shared_from_this();
    // One task, so the scheduler sees every job's failure before the provider's going offline
    // (or, for a replaced link, before the new link's hello lists it again: same key). A job the
    // provider finished, whose result still waits for its ad, is no failure: the offline notice
    // waits for its result (at most offline_wait_max), or the scheduler would hand the finished
    // job to another provider.
    bridge_.run_keyed(provider_id, [self, provider_id, why, offline, defer_offline, lost = std::move(lost)](
                                       caf::event_based_actor* actor) {
      // First, the link is gone: no new job may go to it, and an answer that broke off with it
      // does not count on it to take the answer back (it fails at once when no one else may).
      if (offline) actor->send(self->scheduler_, actors::link_lost_atom::value, provider_id);
      for (const auto& [job_id, tokens] : lost) {
        self->report_failure(actor, job_id, provider_id, tokens, why, domain::job_fault::provider, true);
      }
      if (offline && !defer_offline) actor->send(self->scheduler_, actors::offline_atom::value, provider_id);
    });
    if (defer_offline) {
      const std::uint64_t generation = offline_after_[provider_id].generation = ++offline_generation_;
      bridge_.run_later(options_.offline_wait_max, [self, provider_id, generation](caf::event_based_actor*) {
        self->send_deferred_offline(provider_id, std::nullopt, generation);
      });
    }
  }

 private:
  std::shared_ptr<live_job> find(const std::string& id) const {
    std::lock_guard lock(table_mutex_);
    const auto it = jobs_.find(id);
    return it == jobs_.end() ? nullptr : it->second;
  }

  void forget(const std::string& id) {
    std::lock_guard lock(table_mutex_);
    jobs_.erase(id);
    if (jobs_.empty()) drained_.notify_all();
  }

  /// `job_id`'s result is on its way to the scheduler, or (no job) the deferral of `generation`
  /// reached offline_wait_max: once no finishing job of `provider_id` is awaited, the scheduler is
  /// told the provider is offline, after those results (same key), unless the provider linked
  /// again by then.
  void send_deferred_offline(const std::string& provider_id, const std::optional<std::string>& job_id,
                             std::uint64_t generation = 0) {
    std::lock_guard lock(offline_mutex_);
    const auto awaited = offline_after_.find(provider_id);
    if (awaited == offline_after_.end()) return;
    if (job_id) {
      awaited->second.jobs.erase(*job_id);
      if (!awaited->second.jobs.empty()) return;
    } else if (awaited->second.generation != generation) {
      return;  // the timer of an earlier deferral, which a later loss of the link took over
    }
    offline_after_.erase(awaited);
    auto self = shared_from_this();
    bridge_.run_keyed(provider_id, [self, provider_id](caf::event_based_actor* actor) {
      {
        // Checked here, in order with the online report of a new link (same key).
        std::lock_guard online(self->providers_mutex_);
        if (self->providers_.contains(provider_id)) return;
      }
      actor->send(self->scheduler_, actors::offline_atom::value, provider_id);
    });
  }

  /// The job runs its current attempt on `provider_id`, and `attempt` is that attempt (0: any,
  /// from an agent that does not echo attempts). A provider the job was taken from and offered
  /// again may still send frames of its earlier attempt: they are not the current one's.
  static bool is_current(const live_job& live, const std::string& provider_id, std::uint32_t attempt = 0) {
    return (live.state == phase::running || live.state == phase::submitting) && !live.cut_short &&
           live.provider_id == provider_id && (attempt == 0 || attempt == live.attempt);
  }

  /// What the ad's auction reads of the prompt: the user's newest words first (a long chat's
  /// first question may be long settled), and no more than it reads (`read_max`, and the byte
  /// after it, which tells whether the last word was cut).
  static std::string prompt_of(const completion_request& request, std::size_t read_max) {
    const std::size_t bytes_max = read_max + 1;
    if (request.kind == request_kind::completion) return request.prompt.substr(0, bytes_max);
    std::string text;
    for (auto m = request.messages.rbegin(); m != request.messages.rend() && text.size() < bytes_max; ++m) {
      if (m->role == "user") text.append(m->content, 0, bytes_max - text.size()).append("\n");
    }
    return text;
  }

  /// A stream's head goes out with its first piece (or its end, for an empty answer): a refusal
  /// before it is an HTTP error, and the first token is the head's company, not a write of its own.
  static void start_stream(live_job& live) {
    if (!live.job.request.stream || live.stream_started) return;
    live.stream_started = true;
    live.job.reply->start_stream(200, "text/event-stream", {});
  }

  void accepted(const std::string& id) {
    auto live = find(id);
    if (!live) return;
    std::optional<ad_pick> pick;
    {
      std::lock_guard lock(live->mutex);
      if (live->state == phase::ended) return;
      // A stream's head waits for its first piece: until then a refusal (a backend's 400, no
      // provider left) is an HTTP error, as for a whole answer, not an error chunk after a 200.
      if (live->state == phase::submitting) live->state = phase::running;
      pick = claim_ad_pick(*live);
    }
    // Its ad is picked once the scheduler took the job (accepted, or offered it first: the offer
    // goes out while the job is recorded), long before the answer ends: a request the scheduler
    // refuses (a free user past the day's quota, whose SDK retries the 429) reserves no ad, which
    // would be released at once and remembered by its campaign for the click window.
    if (pick) start_ad_pick(id, std::move(*pick));
  }

  /// The ad picked for a free-tier job, or none. An answer that finished meanwhile was waiting
  /// for it and goes on now.
  void ad_picked(const std::string& id, std::optional<ad_info> ad) {
    bool kept = false;
    std::optional<live_job::finished> resumed;
    std::optional<std::string> impression;
    const auto live = find(id);
    if (live) {
      std::lock_guard lock(live->mutex);
      live->ad_pending = false;
      const bool waiting = live->state == phase::finishing && live->waiting_for_ad.has_value();
      if (ad && (live->state == phase::submitting || live->state == phase::running || waiting)) {
        live->ad = *ad;
        kept = true;
      }
      if (waiting) {
        resumed = std::move(live->waiting_for_ad);
        live->waiting_for_ad.reset();
        if (live->ad) impression = live->ad->impression_id;
      }
    }
    if (ad && !kept) ads_->release(ad->impression_id, "the answer ended before the ad was picked");
    if (resumed) finish_with_ad(live, std::move(resumed->result), std::move(resumed->finish_reason), std::move(impression));
  }

  /// report_failure, in order with the provider's other reports (keyed by provider).
  void report_failure_keyed(const std::string& provider_id, const std::string& job_id, std::uint32_t tokens,
                            std::string message, domain::job_fault fault) {
    auto self = shared_from_this();
    bridge_.run_keyed(provider_id, [self, provider_id, job_id, tokens, message = std::move(message),
                                    fault](caf::event_based_actor* actor) {
      self->report_failure(actor, job_id, provider_id, tokens, message, fault);
    });
  }

  /// `with_link`: the job was lost with its provider's link (see job_failure).
  void report_failure(caf::event_based_actor* actor, const std::string& job_id, const std::string& provider_id,
                      std::uint32_t tokens, const std::string& message, domain::job_fault fault,
                      bool with_link = false) {
    auto self = shared_from_this();
    actor->request(scheduler_, caf::infinite,
                   actors::job_failure{job_id, provider_id, fault, tokens, message, with_link})
        .then(
            [self](const actors::job_ended& ended) {
              // Its watcher hears the same; whichever comes first ends the answer.
              self->ended_by_scheduler(ended);
              // queued: another provider gets it; the relay continues from the answer so far.
            },
            [job_id](caf::error& failure) {
              // Not running there any more (the scheduler already moved it on): nothing to do.
              spdlog::debug("relay: failure of job={} not recorded: {}", job_id, actors::describe(failure));
            });
  }

  /// As the ad's impression of answer `live` is recorded: a stream's ad chunk goes out now, ahead
  /// of the settlement that charges it (its client may leave meanwhile, having seen it); a whole
  /// answer carries it in its body, and so does a stream with no piece yet, whose head goes out
  /// with its end (finish_ok), so that a refused settlement is still an HTTP error. False when
  /// the client left (or the answer ended otherwise): nobody sees the ad.
  static bool show_ad(live_job& live) {
    std::lock_guard lock(live.mutex);
    if (live.state == phase::ended) return false;
    if (live.job.request.stream && live.ad && live.stream_started) {
      const bool first = !std::exchange(live.piece_sent, true);
      live.job.reply->write(sse_event(ad_chunk_json(live.meta, *live.ad, first)));
      live.ad_written = true;
    }
    return true;
  }

  /// Reports job `live`'s result to the scheduler, and ends its answer with the scheduler's
  /// answer (or, its client gone, counts its end then).
  void report_result(std::shared_ptr<live_job> live, actors::job_result result, std::string finish_reason,
                     bool ad_shown) {
    auto self = shared_from_this();
    if (!ad_shown) {
      std::lock_guard lock(live->mutex);
      live->ad.reset();
    }
    // Keyed by provider: the result reaches the scheduler after the job's start report, and
    // before the provider's offline notice if its link is lost meanwhile (see jobs_lost).
    const std::string provider_id = result.provider_id;
    const std::string job_id = result.job_id;
    bridge_.run_keyed(provider_id, [self, live, result = std::move(result), finish_reason](caf::event_based_actor* actor) mutable {
      const std::string job_id = result.job_id;
      std::optional<std::string> charged;  // the recorded impression the settlement would pay for
      if (result.ad) charged = result.ad->impression_id;
      actor->request(self->scheduler_, caf::infinite, std::move(result))
          .then([self, live, job_id, finish_reason](const actors::job_ended& ended) {
                  log_if_unsettled(ended);
                  if (!self->finish_ok(job_id, ended, finish_reason)) self->count_after_client_left(*live, ended.status);
                },
                [self, live, job_id, charged](caf::error& failure) {
                  // Its end may be recorded, and settled at the next start: what is billed is not known.
                  // A refusal's words are the client's; the store's (they name its files) stay here.
                  const auto refused = actors::domain_error_of(failure);
                  if (!refused) spdlog::error("relay: job={} not settled: {}", job_id, actors::describe(failure));
                  // Refused: nothing was recorded, the ad's impression included, and nobody pays
                  // for it (the answer goes as an error; a stream's ad chunk went out already).
                  if (charged) {
                    // Recorded: finish_error must not release it (the campaign would refuse).
                    {
                      std::lock_guard lock(live->mutex);
                      live->ad.reset();
                    }
                    if (refused) self->ads_->unserved(*charged, "the answer was not settled: " + refused->message);
                  }
                  self->finish_error(job_id,
                                     make_api_error(500, "the answer could not be settled" +
                                                             (refused ? ": " + refused->message : std::string())),
                                     std::nullopt);
                  self->count_after_client_left(*live, domain::job_status::failed);
                });
    });
    bool client_left = false;
    {
      std::lock_guard lock(live->mutex);
      live->result_sent = true;  // after the task above: an offline notice sent now follows it
      client_left = live->state == phase::ended;
    }
    // Its client left while the result was prepared (client_gone kept it for jobs_lost to find).
    if (client_left) forget(job_id);
    send_deferred_offline(provider_id, job_id);
  }

  /// Ends job `id`'s answer with its settled result; false when it had ended already (its client
  /// left, or an error ended it).
  bool finish_ok(const std::string& id, const actors::job_ended& ended, const std::string& finish_reason) {
    auto live = find(id);
    if (!live) return false;
    std::uint32_t tokens_sent = 0;
    {
      std::lock_guard lock(live->mutex);
      if (live->state == phase::ended) return false;
      live->state = phase::ended;
      // The tokens as billed: the backend's count of the prompt when below the node's estimate, and
      // the answer's pieces up to the job's budget (a backend may run past it; the rest is free).
      const token_usage usage{ended.prompt_tokens, ended.completion_tokens};
      response_extension extension{live->provider_id, job_quality(live->job.request), live->failovers, live->ad};
      auto& reply = *live->job.reply;
      if (live->job.request.stream) {
        start_stream(*live);
        std::string tail;
        // A chat stream's first chunk carries the assistant's role, also when the answer was
        // empty. Its ad's chunk went out already, unless the answer had no piece (show_ad).
        const bool first = !std::exchange(live->piece_sent, true);
        if (live->ad && !live->ad_written) {
          tail += sse_event(ad_chunk_json(live->meta, *live->ad, first));
        } else if (first && live->job.request.kind == request_kind::chat) {
          tail += sse_event(chunk_json(live->meta, "", true));
        }
        if (live->job.request.include_usage) {
          tail += sse_event(final_chunk_json(live->meta, finish_reason));
          tail += sse_event(usage_chunk_json(live->meta, usage, extension));
        } else {
          tail += sse_event(final_chunk_json(live->meta, finish_reason, usage, extension));
        }
        tail += sse_done;
        reply.write(std::move(tail));
        reply.finish();
      } else {
        reply.send({200, "application/json", response_json(live->meta, live->text, finish_reason, usage, extension, live->reasoning), {}});
      }
      tokens_sent = live->tokens;
    }
    count_end(tokens_sent, ended.status);
    forget(id);
    return true;
  }

  /// The metrics of a job that ended: the completion tokens its client got, and how it ended.
  void count_end(std::uint32_t tokens_sent, domain::job_status status) {
    if (tokens_sent > 0 && options_.observer.completion_tokens) options_.observer.completion_tokens(tokens_sent);
    if (options_.observer.job_ended) options_.observer.job_ended(status);
  }

  /// Counts job `live`'s end as `status`, the scheduler's answer to its result, when its client
  /// left while the result was on its way (client_gone left the count to now); else nothing.
  void count_after_client_left(live_job& live, domain::job_status status) {
    std::uint32_t tokens_sent = 0;
    {
      std::lock_guard lock(live.mutex);
      if (!std::exchange(live.counted_by_result, false)) return;
      tokens_sent = tokens_streamed(live);
    }
    count_end(tokens_sent, status);
  }

  /// With `live`'s lock held, as its answer ends short of its result: the tokens its client got,
  /// a stream's pieces sent so far (a whole answer's client gets none).
  static std::uint32_t tokens_streamed(const live_job& live) { return live.job.request.stream ? live.tokens : 0; }

  /// The most job `live`'s end can bill (with its lock held): the prompt as estimated and
  /// `completion_tokens` (the pieces so far when none given) up to its budget, as the scheduler
  /// caps a completed or cancelled job's bill.
  static token_usage most_billed(const live_job& live, std::optional<std::uint32_t> completion_tokens) {
    return {live.job.prompt_tokens, std::min(completion_tokens.value_or(live.tokens), live.job.completion_budget)};
  }

  /// Ends job `id`'s answer with `error` (in-band once its stream started), counted in the metrics
  /// as `counted`. A stream's last chunk says what is billed (`billed`): nothing for a failed job,
  /// what a cancel billed. Unknown (nullopt) when its settlement's fate is open: the chunk's usage
  /// is then the most its end can bill (of the completion, `completion_billed_max` when given,
  /// else every piece), and the error's message says so (a whole answer's too).
  void finish_error(const std::string& id, api_error error,
                    std::optional<token_usage> billed = token_usage{0, 0},
                    domain::job_status counted = domain::job_status::failed,
                    std::optional<std::uint32_t> completion_billed_max = std::nullopt) {
    auto live = find(id);
    if (!live) return;
    std::optional<std::string> unshown_ad;
    std::uint32_t tokens_sent = 0;
    {
      std::lock_guard lock(live->mutex);
      if (live->state == phase::ended) return;
      live->state = phase::ended;
      tokens_sent = tokens_streamed(*live);
      if (live->ad) unshown_ad = live->ad->impression_id;
      const bool bill_unknown = !billed;
      if (!billed) {
        billed = most_billed(*live, completion_billed_max);
        error.message += "; at most " + std::to_string(billed->prompt_tokens) + " prompt and " +
                         std::to_string(billed->completion_tokens) + " completion tokens are billed";
      }
      auto& reply = *live->job.reply;
      if (live->stream_started) {
        reply.write(sse_event(error_chunk_json(live->meta, error, billed)) + std::string(sse_done));
        reply.finish();
      } else {
        http_headers headers;
        if (error.code == "insufficient_quota" || bill_unknown) {
          // The OpenAI SDKs retry a 429 or a 5xx (twice, by default) unless the server says not to;
          // an answer that may be billed must not be billed again.
          headers.emplace_back("x-should-retry", "false");
        } else if (error.status == 429) {
          headers.emplace_back("Retry-After", "1");
        }
        reply.send({error.status, "application/json", error_body(error), std::move(headers)});
      }
    }
    if (unshown_ad) ads_->release(*unshown_ad, "the answer failed");
    count_end(tokens_sent, counted);
    forget(id);
  }

  void ended_by_scheduler(const actors::job_ended& ended) {
    if (ended.status != domain::job_status::failed) return;
    switch (ended.failure) {
      case events::failure_reason::no_provider:
      case events::failure_reason::deadline_exceeded:
        return finish_error(ended.job_id, make_api_error(503, ended.detail, {}, "no_provider"));
      case events::failure_reason::all_providers_failed:
        return finish_error(ended.job_id, make_api_error(502, "no provider could finish the answer: " + ended.detail,
                                                         {}, "provider_failed"));
      case events::failure_reason::upstream_error:
        // The backends refused the request itself: the client's to mend, not to retry.
        return finish_error(ended.job_id, make_api_error(400, ended.detail, {}, "upstream_rejected"));
      default:  // the platform's own fault, e.g. a job that could not be recorded
        return finish_error(ended.job_id, make_api_error(500, ended.detail, {}, "server_error"));
    }
  }

  void client_gone(const std::string& id) {
    auto live = find(id);
    if (!live) return;
    std::uint32_t tokens = 0;
    std::uint32_t tokens_sent = 0;
    std::optional<std::string> unshown_ad;
    std::optional<live_job::finished> unreported;  // a finished answer that waited for its ad's pick
    bool result_coming = false;
    bool kept = false;  // in the table until its result is on its way (report_result forgets it)
    {
      std::lock_guard lock(live->mutex);
      if (live->state == phase::ended) return;
      // Its provider finished: the job completes as the provider left it, and a cancel would only
      // be refused (or race the result). The result is on its way (its ad's impression being
      // recorded, or the result itself), or waits for the ad's pick: it goes now, without one
      // (the pick, when it comes, finds no job and gives the ad back).
      result_coming = live->state == phase::finishing;
      // While its ad's impression is recorded, a link lost meanwhile must still find it, so that
      // the provider's offline notice waits for its result (jobs_lost).
      kept = result_coming && !live->result_sent && !live->waiting_for_ad;
      if (live->waiting_for_ad) {
        unreported = std::move(live->waiting_for_ad);
        live->waiting_for_ad.reset();
      }
      live->state = phase::ended;
      // Its result ends it: counted as the scheduler answers the result (which may refuse it).
      live->counted_by_result = result_coming;
      tokens = live->tokens;
      tokens_sent = tokens_streamed(*live);
      if (live->ad && !result_coming) unshown_ad = live->ad->impression_id;
    }
    // Reported before it is forgotten: a link lost meanwhile holds the offline notice for it.
    if (unreported) report_result(live, std::move(unreported->result), std::move(unreported->finish_reason), false);
    if (!kept) forget(id);
    if (unshown_ad) ads_->release(*unshown_ad, "the client went away");
    if (!result_coming) count_end(tokens_sent, domain::job_status::cancelled);
    if (!result_coming) cancel(id, tokens, 0);
  }

  /// Cuts job `id` short for a stopping node, unless its provider already finished (its result is
  /// on its way and ends it): the scheduler cancels it with the tokens the client got (none of a
  /// whole answer, which it never sees), then the client gets the error with the usage billed.
  /// Returns whether it cut the job.
  bool cut_short(const std::string& id) {
    auto live = find(id);
    if (!live) return false;
    std::uint32_t tokens = 0;
    {
      std::lock_guard lock(live->mutex);
      if (live->state == phase::ended || live->state == phase::finishing) return false;
      live->cut_short = true;  // what its provider sends from now on is neither relayed nor billed
      tokens = tokens_streamed(*live);
    }
    cancel_for_stop(id, tokens, 0);
    return true;
  }

  /// cut_short's cancel, tried again (as a client's cancel is) while the scheduler is still
  /// recording the job's queueing; then the client gets its end.
  void cancel_for_stop(const std::string& id, std::uint32_t tokens, std::uint32_t attempt) {
    auto self = shared_from_this();
    bridge_.run_keyed(id, [self, id, tokens, attempt](caf::event_based_actor* actor) {
      actor->request(self->scheduler_, caf::infinite, actors::job_cancel{id, events::cancelled_by::platform, tokens})
          .then(
              [self, id, tokens](const actors::job_ended& ended) {
                log_if_unsettled(ended);
                self->finish_error(id, stopping_error(tokens), token_usage{ended.prompt_tokens, ended.completion_tokens},
                                   domain::job_status::cancelled);
              },
              [self, id, tokens, attempt](caf::error& failure) {
                const auto refusal = actors::domain_error_of(failure);
                if (refusal && refusal->code == domain::errc::invalid_state &&
                    attempt + 1 < self->options_.cancel_retries_max) {
                  self->bridge_.run_later(self->options_.cancel_retry_wait,
                                          [self, id, tokens, attempt](caf::event_based_actor*) {
                                            self->cancel_for_stop(id, tokens, attempt + 1);
                                          });
                  return;
                }
                // Ended meanwhile (its result came), or not recorded: the client still gets its end,
                // which bills at most the tokens it got (none of a whole answer).
                spdlog::warn("relay: job={} not cancelled for the stop: {}", id, actors::describe(failure));
                self->finish_error(id, stopping_error(tokens), std::nullopt, domain::job_status::failed, tokens);
              });
    });
  }

  static api_error stopping_error(std::uint32_t tokens) {
    return make_api_error(503, "this node is stopping: the answer was cut short after " + std::to_string(tokens) +
                                   " tokens, which are billed; retry on another",
                          {}, "server_shutting_down");
  }

  /// Provider `provider_id` was offered, or ended, job `id`, which nobody here waits for any more.
  /// Usually its client left and the job is cancelled already (the scheduler refuses this cancel);
  /// but when that cancel could not be recorded (the store failed), the scheduler would hold the
  /// job running on the provider for good. Billed without tokens: those the client got are not
  /// known any more. Only while the job runs on that provider: a frame naming another's job
  /// (guessed, or an attempt's before a failover) ends nothing.
  void cancel_unknown(const std::string& id, const std::string& provider_id) { cancel(id, 0, 0, provider_id); }

  /// Tells the scheduler the client is gone (it cancels the provider's work at once). While the
  /// job's queueing is still being recorded the scheduler asks to retry; a few ms later it can.
  void cancel(const std::string& id, std::uint32_t tokens, std::uint32_t attempt, const std::string& provider_id = {}) {
    auto self = shared_from_this();
    bridge_.run_keyed(id, [self, id, tokens, attempt, provider_id](caf::event_based_actor* actor) {
      actor->request(self->scheduler_, caf::infinite,
                     actors::job_cancel{id, events::cancelled_by::client, tokens, provider_id})
          .then([](const actors::job_ended& ended) { log_if_unsettled(ended); },
                [self, id, tokens, attempt, provider_id](caf::error& failure) {
                  const auto refusal = actors::domain_error_of(failure);
                  const bool retry = refusal && refusal->code == domain::errc::invalid_state &&
                                     attempt + 1 < self->options_.cancel_retries_max;
                  if (!retry) {
                    spdlog::debug("relay: cancel of job={} not recorded: {}", id, actors::describe(failure));
                    return;
                  }
                  self->bridge_.run_later(self->options_.cancel_retry_wait,
                                          [self, id, tokens, attempt, provider_id](caf::event_based_actor*) {
                                            self->cancel(id, tokens, attempt + 1, provider_id);
                                          });
                });
    });
  }

  caf::actor_system& system_;
  actor_bridge& bridge_;
  actors::scheduler_actor scheduler_;
  ad_source* ads_;
  relay_options options_;
  actors::job_watcher watcher_;
  mutable std::mutex table_mutex_;
  std::map<std::string, std::shared_ptr<live_job>> jobs_;  ///< by job id
  bool stopped_ = false;  ///< under table_mutex_: stop() has let go of the replies
  bool draining_ = false;  ///< under table_mutex_: drain() refuses new jobs
  std::condition_variable drained_;  ///< with table_mutex_: notified when jobs_ becomes empty
  /// Taken before table_mutex_. Providers whose link was lost while jobs they finished waited for
  /// their ads: their offline notice waits for those jobs' results, by provider id.
  std::mutex offline_mutex_;
  struct awaited_results {
    std::set<std::string> jobs;    ///< finishing jobs whose results are not sent yet
    std::uint64_t generation = 0;  ///< of the latest deferral, which its timer must match
  };
  std::map<std::string, awaited_results> offline_after_;
  std::uint64_t offline_generation_ = 0;  ///< under offline_mutex_
  mutable std::mutex providers_mutex_;
  std::map<std::string, std::vector<events::model_offer>> providers_;  ///< online, by provider id
};

relay::relay(caf::actor_system& system, actor_bridge& bridge, actors::scheduler_actor scheduler, ad_source* ads,
             relay_options options)
    : impl_(std::make_shared<impl>(system, bridge, std::move(scheduler), ads, std::move(options))) {
  impl_->start();
}

relay::~relay() { impl_->stop(); }

void relay::submit(relay_job job) { impl_->submit(std::move(job)); }
std::vector<model_listing> relay::models() const { return impl_->models(); }
std::optional<std::uint32_t> relay::context_length(const std::string& model) const {
  return impl_->context_length(model);
}
std::size_t relay::live_jobs() const { return impl_->live_jobs(); }
void relay::provider_online(online_offers offers) { impl_->provider_online(std::move(offers)); }
void relay::provider_offline(const std::string& provider_id) { impl_->provider_offline(provider_id); }
std::optional<link::offer> relay::take_offer(const std::string& provider_id, const actors::job_offer& offer) {
  return impl_->take_offer(provider_id, offer);
}
void relay::revoke(const std::string& provider_id, const std::string& job_id) { impl_->revoke(provider_id, job_id); }
void relay::delta(const std::string& provider_id, link::delta d) { impl_->delta(provider_id, std::move(d)); }
void relay::done(const std::string& provider_id, const link::done& d) { impl_->done(provider_id, d); }
void relay::failed(const std::string& provider_id, const link::job_error& e) { impl_->failed(provider_id, e); }
void relay::link_lost(const std::string& provider_id) { impl_->link_lost(provider_id); }
void relay::link_replaced(const std::string& provider_id) { impl_->link_replaced(provider_id); }
std::size_t relay::drain(std::chrono::milliseconds wait_max, std::chrono::milliseconds cancel_wait_max) {
  return impl_->drain(wait_max, cancel_wait_max);
}

void relay::stop() { impl_->stop(); }

}  // namespace gpustream::gateway
