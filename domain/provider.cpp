#include "domain/provider.hpp"

#include <algorithm>
#include <set>
#include <utility>

namespace gpustream::domain {

namespace {

using events::event;

/// Applies each event to a working copy as it is emitted, so that later checks of the same
/// decision see the state the log will have after the earlier events.
class emitter {
 public:
  explicit emitter(const provider::state& current) : state_(current) {}

  void emit(event e) {
    state_ = provider::evolve(std::move(state_), e);
    events_.push_back(std::move(e));
  }
  [[nodiscard]] const provider::state& state() const noexcept { return state_; }
  [[nodiscard]] std::vector<event> take() && { return std::move(events_); }

 private:
  provider::state state_;
  std::vector<event> events_;
};

provider::offer offer_from(const events::model_offer& m) {
  return {m.model_name,  m.context_length_tokens,       m.quantisation,
          m.input_price_micros_per_mtok, m.output_price_micros_per_mtok, m.max_concurrency};
}

bool same_offers(const std::vector<provider::offer>& held,
                 const std::vector<events::model_offer>& wanted) {
  return std::equal(held.begin(), held.end(), wanted.begin(), wanted.end(),
                    [](const provider::offer& a, const events::model_offer& b) {
                      return a == offer_from(b);
                    });
}

events::suspicion_counters counters_of(const provider::suspicion& s) {
  return {s.unreasonably_fast_jobs, s.aborted_jobs, s.token_count_mismatches};
}

provider::state apply_scored(provider::state s, const events::provider_scored& e) {
  s.score = e.total_score;
  s.level = e.level;
  // The sign convention of success_points is part of the event's meaning (see event.hpp).
  if (e.success_points < 0) {
    ++s.jobs_failed;
    s.successes_in_a_row = 0;
    return s;
  }
  ++s.jobs_succeeded;
  ++s.successes_in_a_row;
  if (e.speed_points >= fast_job_speed_points_min) ++s.fast_jobs;
  return s;
}

provider::state apply_disconnected(provider::state s, std::int64_t at_us) {
  if (!s.online) return s;
  s.online_us_total += std::max<std::int64_t>(0, at_us - s.connected_at_us);
  s.online = false;
  s.offers.clear();
  return s;
}

/// The provider events that apply to `s`, each as a change of state. Events of another stream
/// fall through unchanged.
struct evolver {
  provider::state s;

  provider::state operator()(const events::provider_created& e) {
    if (s.exists) return s;
    s.exists = true;
    s.provider_id = e.provider_id;
    s.owner_user_id = e.owner_user_id;
    s.name = e.name;
    s.token_hash.assign(e.token_hash.begin(), e.token_hash.end());
    s.created_at_us = e.created_at_us;
    s.level = level_for_score(0);
    return s;
  }
  provider::state operator()(const events::provider_token_replaced& e) {
    if (!mine(e.provider_id)) return s;
    s.token_hash.assign(e.token_hash.begin(), e.token_hash.end());
    return s;
  }
  provider::state operator()(const events::provider_connected& e) {
    if (!mine(e.provider_id)) return s;
    s.online = true;
    s.connected_at_us = e.connected_at_us;
    s.offers.clear();
    return s;
  }
  provider::state operator()(const events::models_advertised& e) {
    if (!mine(e.provider_id)) return s;
    s.offers.clear();
    for (const auto& m : e.models) s.offers.push_back(offer_from(m));
    return s;
  }
  provider::state operator()(const events::provider_disconnected& e) {
    if (!mine(e.provider_id)) return s;
    return apply_disconnected(std::move(s), e.disconnected_at_us);
  }
  provider::state operator()(const events::provider_scored& e) {
    if (!mine(e.provider_id)) return s;
    return apply_scored(std::move(s), e);
  }
  provider::state operator()(const events::achievement_unlocked& e) {
    if (!mine(e.provider_id)) return s;
    s.achievements.insert(e.achievement);
    return s;
  }
  provider::state operator()(const events::suspicion_recorded& e) {
    if (!mine(e.provider_id)) return s;
    s.counters = {e.counters.unreasonably_fast_jobs, e.counters.aborted_jobs,
                  e.counters.token_count_mismatches};
    s.jobs_at_suspicion = s.jobs_succeeded + s.jobs_failed;
    return s;
  }
  provider::state operator()(const events::provider_suspended& e) {
    if (!mine(e.provider_id)) return s;
    s.counters = {};
    ++s.suspensions;
    s.suspended_until_at_us = std::max(s.suspended_until_at_us, e.suspended_until_at_us);
    return s;
  }
  template <class Other>
  provider::state operator()(const Other&) {
    return s;
  }

  [[nodiscard]] bool mine(const std::string& provider_id) const {
    return s.exists && provider_id == s.provider_id;
  }
};

// ---------------------------------------------------------------------------------------------
// Decisions, one per command.

decision decide_create(const provider::state& s, const provider::create& c, std::int64_t now_us) {
  if (c.provider_id.empty()) return refuse(errc::invalid_argument, "a provider needs an id");
  if (c.owner_user_id.empty()) {
    return refuse(errc::invalid_argument,
                  "provider " + c.provider_id + " needs the id of the user who owns it");
  }
  if (s.exists) {
    const bool same = s.provider_id == c.provider_id && s.owner_user_id == c.owner_user_id &&
                      s.name == c.name &&
                      std::equal(s.token_hash.begin(), s.token_hash.end(), c.token_hash.begin(),
                                 c.token_hash.end());
    if (same) return std::vector<event>{};
    return refuse(errc::already_exists, "provider " + s.provider_id +
                                            " already exists with another owner, name or token");
  }
  return std::vector<event>{events::provider_created{c.provider_id, c.owner_user_id, c.name,
                                                     c.token_hash, now_us}};
}

/// Unlocks `hour_of_uptime` when the current connection has lasted long enough by `now_us`.
void unlock_uptime(emitter& out, std::int64_t now_us, const scoring_options& options) {
  const auto& s = out.state();
  if (!s.online || s.achievements.contains(events::achievement_kind::hour_of_uptime)) return;
  if (connected_for_us(s, now_us) < options.uptime_for_achievement_us) return;
  out.emit(events::achievement_unlocked{s.provider_id, events::achievement_kind::hour_of_uptime,
                                        now_us});
}

decision decide_connect(const provider::state& s, const provider::connect& c, std::int64_t now_us,
                        const provider_options& options) {
  if (is_suspended(s, now_us)) {
    return refuse(errc::suspended,
                  "provider " + s.provider_id + " is suspended for another " +
                      std::to_string((s.suspended_until_at_us - now_us + 999'999) / 1'000'000) +
                      " s (until " + std::to_string(s.suspended_until_at_us) + " us)");
  }
  emitter out(s);
  if (s.online) {
    unlock_uptime(out, now_us, options.scoring);
    out.emit(events::provider_disconnected{s.provider_id, events::disconnect_reason::replaced,
                                           "a newer link of this provider took over", now_us});
  }
  out.emit(events::provider_connected{s.provider_id, c.gpus, c.backend, c.backend_url,
                                      c.agent_version, now_us});
  return std::move(out).take();
}

/// Why an offer cannot be advertised, or an empty string when it can.
std::string offer_problem(const events::model_offer& m) {
  if (m.model_name.empty()) return "an offered model has no name";
  const std::string which = "model " + m.model_name;
  if (m.context_length_tokens == 0) return which + " has a context length of 0 tokens";
  if (m.max_concurrency == 0) return which + " has a max concurrency of 0: it could serve nothing";
  if (m.input_price_micros_per_mtok < 0 || m.output_price_micros_per_mtok < 0) {
    return which + " has a negative price (" + std::to_string(m.input_price_micros_per_mtok) +
           " in, " + std::to_string(m.output_price_micros_per_mtok) + " out, micro-USD/Mtok)";
  }
  return {};
}

decision decide_advertise(const provider::state& s, const provider::advertise& c,
                          std::int64_t now_us, const provider_options& options) {
  if (!s.online) {
    return refuse(errc::invalid_state,
                  "provider " + s.provider_id + " must be connected to advertise models");
  }
  if (c.models.size() > options.models_advertised_max) {
    return refuse(errc::limit_exceeded,
                  "provider " + s.provider_id + " advertised " + std::to_string(c.models.size()) +
                      " models; at most " + std::to_string(options.models_advertised_max) +
                      " are allowed");
  }
  std::set<std::string_view> names;
  for (const auto& m : c.models) {
    if (auto problem = offer_problem(m); !problem.empty()) {
      return refuse(errc::invalid_argument, std::move(problem));
    }
    if (std::max(m.input_price_micros_per_mtok, m.output_price_micros_per_mtok) > options.price_micros_per_mtok_max) {
      return refuse(errc::limit_exceeded,
                    "model " + m.model_name + " is priced at " + std::to_string(m.input_price_micros_per_mtok) +
                        " in, " + std::to_string(m.output_price_micros_per_mtok) +
                        " out (micro-USD per million tokens); at most " +
                        std::to_string(options.price_micros_per_mtok_max) + " is allowed");
    }
    if (m.context_length_tokens > options.context_length_tokens_max) {
      return refuse(errc::limit_exceeded,
                    "model " + m.model_name + " claims a context window of " +
                        std::to_string(m.context_length_tokens) + " tokens; at most " +
                        std::to_string(options.context_length_tokens_max) + " are allowed");
    }
    if (m.max_concurrency > options.offer_concurrency_max) {
      return refuse(errc::limit_exceeded,
                    "model " + m.model_name + " asks for " + std::to_string(m.max_concurrency) +
                        " concurrent jobs; at most " +
                        std::to_string(options.offer_concurrency_max) + " are allowed");
    }
    if (!names.insert(m.model_name).second) {
      return refuse(errc::invalid_argument, "model " + m.model_name + " is offered twice");
    }
  }
  if (same_offers(s.offers, c.models)) return std::vector<event>{};
  return std::vector<event>{events::models_advertised{s.provider_id, c.models, now_us}};
}

decision decide_disconnect(const provider::state& s, const provider::disconnect& c,
                           std::int64_t now_us, const provider_options& options) {
  if (!s.online) return std::vector<event>{};
  emitter out(s);
  unlock_uptime(out, now_us, options.scoring);
  out.emit(events::provider_disconnected{s.provider_id, c.reason, c.detail, now_us});
  return std::move(out).take();
}

void unlock_job_achievements(emitter& out, std::int64_t now_us, const scoring_options& options) {
  using events::achievement_kind;
  const auto unlock_if = [&](bool reached, achievement_kind kind) {
    if (!reached || out.state().achievements.contains(kind)) return;
    out.emit(events::achievement_unlocked{out.state().provider_id, kind, now_us});
  };
  const auto& s = out.state();
  unlock_if(s.fast_jobs >= options.fast_jobs_for_achievement, achievement_kind::ten_fast_jobs);
  unlock_if(s.jobs_succeeded >= options.jobs_for_achievement, achievement_kind::hundred_jobs);
  unlock_if(s.successes_in_a_row >= options.successes_in_a_row_for_achievement,
            achievement_kind::fifty_successes_in_a_row);
  unlock_uptime(out, now_us, options);
}

void record_suspicion(emitter& out, const std::string& job_id, events::suspicion_kind kind,
                      std::int64_t now_us, const scoring_options& options) {
  const auto& s = out.state();
  // Far enough from the previous suspicion: counting starts again.
  const bool apart = s.jobs_succeeded + s.jobs_failed - s.jobs_at_suspicion >= options.suspicion_window_jobs;
  auto counters = apart ? events::suspicion_counters{} : counters_of(s.counters);
  switch (kind) {
    case events::suspicion_kind::unreasonably_fast: ++counters.unreasonably_fast_jobs; break;
    case events::suspicion_kind::aborted: ++counters.aborted_jobs; break;
    case events::suspicion_kind::token_count_mismatch: ++counters.token_count_mismatches; break;
  }
  out.emit(events::suspicion_recorded{out.state().provider_id, job_id, kind, counters, now_us});
}

void suspend_if_due(emitter& out, std::int64_t now_us, const scoring_options& options) {
  const auto counters = counters_of(out.state().counters);
  if (!reaches_suspension(counters, options)) return;
  out.emit(events::provider_suspended{out.state().provider_id,
                                      suspension_reason(counters, options), counters, now_us,
                                      now_us + options.suspension_us});
}

void emit_scored(emitter& out, const std::string& job_id, const job_points& points,
                 std::int64_t now_us) {
  const std::int64_t total = add_points(out.state().score, points.total());
  out.emit(events::provider_scored{out.state().provider_id, job_id, points.speed_points,
                                   points.complexity_points, points.success_points, total,
                                   level_for_score(total), now_us});
}

std::string measure_problem(const provider::record_job_outcome& c) {
  if (c.job_id.empty()) return "a job outcome needs the job's id";
  const auto& m = c.measure;
  if (m.ttft_us < 0 || m.total_us < m.ttft_us) {
    return "job " + c.job_id + " has impossible timings: first token after " +
           std::to_string(m.ttft_us) + " us, last after " + std::to_string(m.total_us) + " us";
  }
  return {};
}

decision decide_outcome(const provider::state& s, const provider::record_job_outcome& c,
                        std::int64_t now_us, const provider_options& options) {
  if (auto problem = measure_problem(c); !problem.empty()) {
    return refuse(errc::invalid_argument, std::move(problem));
  }
  const auto& scoring = options.scoring;
  emitter out(s);
  switch (c.fault) {
    case job_fault::platform:
    case job_fault::client:
    case job_fault::request:
    case job_fault::declined:
      // Neither points nor suspicion: the provider did nothing wrong.
      return std::vector<event>{};
    case job_fault::provider:
      emit_scored(out, c.job_id, points_for_provider_fault(scoring), now_us);
      record_suspicion(out, c.job_id, events::suspicion_kind::aborted, now_us, scoring);
      break;
    case job_fault::none: {
      const bool too_fast = unreasonably_fast(c.measure, scoring);
      const bool own_owners = !c.requested_by.empty() && c.requested_by == s.owner_user_id;
      if (!own_owners) {
        emit_scored(out, c.job_id, points_for_success(c.measure, !too_fast, scoring), now_us);
        unlock_job_achievements(out, now_us, scoring);
      }
      if (too_fast) {
        record_suspicion(out, c.job_id, events::suspicion_kind::unreasonably_fast, now_us, scoring);
      }
      if (!token_counts_match(c.measure, scoring)) {
        record_suspicion(out, c.job_id, events::suspicion_kind::token_count_mismatch, now_us, scoring);
      }
      break;
    }
  }
  suspend_if_due(out, now_us, scoring);
  return std::move(out).take();
}

decision decide_replace_token(const provider::state& s, const provider::replace_token& c, std::int64_t now_us) {
  if (std::equal(s.token_hash.begin(), s.token_hash.end(), c.token_hash.begin(), c.token_hash.end())) {
    return std::vector<event>{};
  }
  return std::vector<event>{events::provider_token_replaced{s.provider_id, c.token_hash, now_us}};
}

decision decide_check_uptime(const provider::state& s, std::int64_t now_us,
                             const provider_options& options) {
  emitter out(s);
  unlock_uptime(out, now_us, options.scoring);
  return std::move(out).take();
}

}  // namespace

provider::state provider::evolve(state current, const events::event& event) {
  return std::visit(evolver{std::move(current)}, event);
}

decision provider::decide(const state& current, const command& command, std::int64_t now_us) {
  return decide(current, command, now_us, provider_options{});
}

decision provider::decide(const state& current, const command& command, std::int64_t now_us,
                          const provider_options& options) {
  // evolve tells a failure from a success by the sign of success_points.
  GPUSTREAM_ENSURE(options.scoring.failure_points < 0);
  GPUSTREAM_ENSURE(options.scoring.success_points >= 0);
  if (const auto* c = std::get_if<create>(&command)) return decide_create(current, *c, now_us);
  if (!current.exists) {
    return refuse(errc::not_found, "no provider with this id has been created");
  }
  return std::visit(
      [&](const auto& c) -> decision {
        using C = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<C, create>) {
          return decide_create(current, c, now_us);  // handled above; kept for exhaustiveness
        } else if constexpr (std::is_same_v<C, connect>) {
          return decide_connect(current, c, now_us, options);
        } else if constexpr (std::is_same_v<C, advertise>) {
          return decide_advertise(current, c, now_us, options);
        } else if constexpr (std::is_same_v<C, disconnect>) {
          return decide_disconnect(current, c, now_us, options);
        } else if constexpr (std::is_same_v<C, record_job_outcome>) {
          return decide_outcome(current, c, now_us, options);
        } else if constexpr (std::is_same_v<C, replace_token>) {
          return decide_replace_token(current, c, now_us);
        } else {
          return decide_check_uptime(current, now_us, options);
        }
      },
      command);
}

bool is_suspended(const provider::state& state, std::int64_t now_us) noexcept {
  return now_us < state.suspended_until_at_us;
}

std::int64_t connected_for_us(const provider::state& state, std::int64_t now_us) noexcept {
  if (!state.online) return 0;
  return std::max<std::int64_t>(0, now_us - state.connected_at_us);
}

}  // namespace gpustream::domain
