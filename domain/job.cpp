#include "domain/job.hpp"

#include <type_traits>
#include <utility>

namespace gpustream::domain {

namespace {

using events_list = std::vector<events::event>;

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }

std::string describe(const job_state& s) {
  std::string text = "job " + quoted(s.job_id) + " is " + std::string(to_string(s.status));
  if (!s.provider_id.empty() && (s.status == job_status::assigned || s.status == job_status::streaming))
    text += " on provider " + quoted(s.provider_id);
  return text;
}

unexpected<error> wrong_state(const job_state& s, std::string_view action) {
  return refuse(errc::invalid_state, describe(s) + "; cannot " + std::string(action));
}

expected<void, error> check_id(std::string_view what, std::string_view id, std::size_t length_max,
                               bool may_be_empty = false) {
  if (!may_be_empty && id.empty()) return refuse(errc::invalid_argument, std::string(what) + " is empty");
  if (id.size() > length_max)
    return refuse(errc::invalid_argument, std::string(what) + " is " + std::to_string(id.size()) +
                                              " bytes long; at most " + std::to_string(length_max) +
                                              " are allowed");
  return {};
}

template <class T>
expected<void, error> check_range(std::string_view what, T value, T low, T high) {
  if (value >= low && value <= high) return {};
  return refuse(errc::invalid_argument, std::string(what) + " is " + std::to_string(value) + "; it must be within " +
                                            std::to_string(low) + " .. " + std::to_string(high));
}

expected<void, error> validate(const submit_job& c, const job_options& o) {
  for (auto [what, id] : {std::pair<std::string_view, std::string_view>{"job id", c.job_id}, {"user id", c.user_id}})
    if (auto ok = check_id(what, id, o.id_length_max); !ok) return ok;
  if (auto ok = check_id("model", c.model, o.model_name_length_max); !ok) return ok;
  if (auto ok = check_id("conversation id", c.conversation_id, o.id_length_max, true); !ok) return ok;
  if (auto ok = check_range<std::uint32_t>("prompt_tokens", c.prompt_tokens, 1, o.prompt_tokens_max); !ok) return ok;
  if (auto ok = check_range<std::uint32_t>("max_tokens", c.max_tokens, 1, o.max_tokens_max); !ok) return ok;
  return check_range<std::int64_t>("max_price_micros", c.max_price_micros, 0, o.max_price_micros_max);
}

decision on(const job_state& s, const submit_job& c, std::int64_t now_us, const job_options& o) {
  if (auto ok = validate(c, o); !ok) return unexpected{ok.error()};
  const events::job_submitted submitted{c.job_id, c.user_id, c.model, c.quality, c.prompt_tokens, c.max_tokens,
                                        c.max_price_micros, c.premium, c.conversation_id, now_us};
  if (s.status == job_status::none) return events_list{submitted};
  const bool same = s.job_id == c.job_id && s.user_id == c.user_id && s.model == c.model && s.quality == c.quality &&
                    s.prompt_tokens == c.prompt_tokens && s.max_tokens == c.max_tokens &&
                    s.max_price_micros == c.max_price_micros && s.premium == c.premium &&
                    s.conversation_id == c.conversation_id;
  if (same) return events_list{};
  return refuse(errc::already_exists, "job " + quoted(s.job_id) + " was already submitted with other parameters");
}

decision on(const job_state& s, const queue_job& c, std::int64_t now_us, const job_options& o) {
  if (s.status == job_status::queued && s.priority == c.priority && s.deadline_at_us == c.deadline_at_us)
    return events_list{};
  if (s.status != job_status::submitted && s.status != job_status::queued) return wrong_state(s, "queue it");
  if (c.deadline_at_us <= now_us || c.deadline_at_us - now_us > o.queue_wait_us_max)
    return refuse(errc::invalid_argument, "queue deadline " + std::to_string(c.deadline_at_us) +
                                              " us must lie after now (" + std::to_string(now_us) +
                                              " us) by at most " + std::to_string(o.queue_wait_us_max) + " us");
  return events_list{events::job_queued{s.job_id, c.priority, c.deadline_at_us, now_us}};
}

decision on(const job_state& s, const assign_job& c, std::int64_t now_us, const job_options& o) {
  if (auto ok = check_id("provider id", c.provider_id, o.id_length_max); !ok) return unexpected{ok.error()};
  if (s.status == job_status::assigned && s.provider_id == c.provider_id) return events_list{};
  if (s.status != job_status::queued) return wrong_state(s, "assign it to " + quoted(c.provider_id));
  const std::int64_t chosen_at_us = c.chosen_at_us != 0 ? c.chosen_at_us : now_us;
  if (chosen_at_us >= s.deadline_at_us)
    return refuse(errc::invalid_state, describe(s) + " past its deadline " + std::to_string(s.deadline_at_us) +
                                           " us (chosen at " + std::to_string(chosen_at_us) +
                                           " us); expire it or queue it with a new deadline");
  if (s.attempt - s.declines >= o.attempts_max)
    return refuse(errc::limit_exceeded, "job " + quoted(s.job_id) + " has had " + std::to_string(s.attempt - s.declines) +
                                            " attempts, the most allowed; fail it with all_providers_failed");
  if (s.declines >= o.declines_max)
    return refuse(errc::limit_exceeded, "job " + quoted(s.job_id) + " was declined " + std::to_string(s.declines) +
                                            " times, the most allowed; fail it with all_providers_failed");
  return events_list{events::job_assigned{s.job_id, c.provider_id, s.attempt + 1, now_us}};
}

decision on(const job_state& s, const start_job& c, std::int64_t now_us, const job_options&) {
  if (s.status == job_status::streaming && s.provider_id == c.provider_id) return events_list{};
  if (s.status != job_status::assigned || s.provider_id != c.provider_id)
    return wrong_state(s, "start it on provider " + quoted(c.provider_id));
  return events_list{events::job_started{s.job_id, c.provider_id, now_us}};
}

decision on(const job_state& s, const reassign_job& c, std::int64_t now_us, const job_options&) {
  if (s.status == job_status::queued && s.reassignments > 0 && s.reassigned_from_provider_id == c.from_provider_id &&
      s.tokens_so_far == c.tokens_so_far)
    return events_list{};
  const bool on_provider = s.status == job_status::assigned || s.status == job_status::streaming;
  if (!on_provider || s.provider_id != c.from_provider_id)
    return wrong_state(s, "reassign it away from provider " + quoted(c.from_provider_id));
  if (c.reason == events::reassign_reason::provider_declined && s.status != job_status::assigned)
    return refuse(errc::invalid_argument, describe(s) + ": an offer is declined untried, before its answer starts");
  // No token arrives between assignment and start, so an assigned job keeps exactly what it had.
  const std::uint32_t low = s.tokens_so_far;
  const std::uint32_t high = s.status == job_status::assigned ? s.tokens_so_far : s.max_tokens;
  if (auto ok = check_range("tokens_so_far", c.tokens_so_far, low, high); !ok) return unexpected{ok.error()};
  return events_list{events::job_reassigned{s.job_id, c.from_provider_id, c.reason, c.tokens_so_far, now_us}};
}

/// An end counts nothing against the free quota, or (free tier only) its billed prompt and its
/// completion.
expected<void, error> check_free_tokens(const job_state& s, std::uint32_t free_tokens, std::uint32_t prompt_tokens,
                                        std::uint32_t completion_tokens) {
  if (free_tokens == 0) return {};
  if (s.premium) return refuse(errc::invalid_argument, describe(s) + " is premium: it counts no free tokens, not " +
                                                           std::to_string(free_tokens));
  const std::uint64_t used = std::uint64_t{prompt_tokens} + completion_tokens;
  if (free_tokens != used)
    return refuse(errc::invalid_argument, describe(s) + " used " + std::to_string(used) +
                                              " free tokens (prompt and completion), not " +
                                              std::to_string(free_tokens));
  return {};
}

decision on(const job_state& s, const complete_job& c, std::int64_t now_us, const job_options&) {
  const std::uint32_t prompt_billed = c.prompt_tokens_billed != 0 ? c.prompt_tokens_billed : s.prompt_tokens;
  if (s.status == job_status::completed && s.provider_id == c.provider_id &&
      s.completion_tokens == c.completion_tokens && s.provider_reported_tokens == c.provider_reported_tokens &&
      s.prompt_tokens_billed == prompt_billed)
    return events_list{};
  if (s.status != job_status::streaming || s.provider_id != c.provider_id)
    return wrong_state(s, "complete it on provider " + quoted(c.provider_id));
  if (auto ok = check_range("completion_tokens", c.completion_tokens, s.tokens_so_far, s.max_tokens); !ok)
    return unexpected{ok.error()};
  if (auto ok = check_range("prompt_tokens_billed", prompt_billed, 1u, s.prompt_tokens); !ok)
    return unexpected{ok.error()};
  if (auto ok = check_free_tokens(s, c.free_tokens, prompt_billed, c.completion_tokens); !ok)
    return unexpected{ok.error()};
  return events_list{events::job_completed{s.job_id, c.provider_id, s.prompt_tokens, c.completion_tokens,
                                           c.provider_reported_tokens, s.first_token_at_us - s.submitted_at_us,
                                           now_us - s.submitted_at_us, now_us, c.bill, c.free_tokens,
                                           prompt_billed}};
}

decision on(const job_state& s, const fail_job& c, std::int64_t now_us, const job_options& o) {
  if (s.status == job_status::failed && s.failure == c.reason) return events_list{};
  if (is_terminal(s.status)) return wrong_state(s, "fail it");
  if (auto ok = check_id("failure message", c.message, o.message_length_max, true); !ok)
    return unexpected{ok.error()};
  if (c.reason == events::failure_reason::deadline_exceeded) {
    if (s.status != job_status::queued) return wrong_state(s, "fail it for an exceeded queue deadline");
    if (now_us < s.deadline_at_us)
      return refuse(errc::invalid_state, describe(s) + " until its deadline " + std::to_string(s.deadline_at_us) +
                                             " us; now is " + std::to_string(now_us) + " us");
  }
  return events_list{events::job_failed{s.job_id, c.reason, c.message, now_us}};
}

decision on(const job_state& s, const cancel_job& c, std::int64_t now_us, const job_options&) {
  if (s.status == job_status::cancelled && s.cancelled_by == c.by && s.completion_tokens == c.tokens_produced)
    return events_list{};
  if (is_terminal(s.status)) return wrong_state(s, "cancel it");
  if (auto ok = check_range("tokens_produced", c.tokens_produced, s.tokens_so_far, s.max_tokens); !ok)
    return unexpected{ok.error()};
  if (auto ok = check_free_tokens(s, c.free_tokens, s.prompt_tokens, c.tokens_produced); !ok)
    return unexpected{ok.error()};
  return events_list{events::job_cancelled{s.job_id, c.by, c.tokens_produced, now_us, c.bill, c.free_tokens}};
}

decision on(const job_state& s, const expire_job&, std::int64_t now_us, const job_options&) {
  if (s.status != job_status::queued || now_us < s.deadline_at_us) return events_list{};
  return events_list{events::job_failed{
      s.job_id, events::failure_reason::deadline_exceeded,
      "no provider took the job before its queue deadline " + std::to_string(s.deadline_at_us) + " us", now_us}};
}

bool live(const job_state& s) { return s.status != job_status::none && !is_terminal(s.status); }

void apply_submitted(job_state& s, const events::job_submitted& e) {
  if (s.status != job_status::none) return;
  s.status = job_status::submitted;
  s.job_id = e.job_id;
  s.user_id = e.user_id;
  s.model = e.model;
  s.quality = e.quality;
  s.prompt_tokens = e.prompt_tokens;
  s.max_tokens = e.max_tokens;
  s.max_price_micros = e.max_price_micros;
  s.premium = e.premium;
  s.conversation_id = e.conversation_id;
  s.submitted_at_us = e.submitted_at_us;
}

/// The lifecycle events after submission. Each applies only from the states decide allows it in,
/// so a log that breaks the lifecycle leaves the state as it was rather than inconsistent.
struct lifecycle {
  job_state& s;

  void operator()(const events::job_queued& e) {
    if (s.status != job_status::submitted && s.status != job_status::queued) return;
    s.status = job_status::queued;
    s.priority = e.priority;
    s.deadline_at_us = e.deadline_at_us;
    s.queued_at_us = e.queued_at_us;
  }
  void operator()(const events::job_assigned& e) {
    if (s.status != job_status::queued || e.attempt != s.attempt + 1) return;
    s.status = job_status::assigned;
    s.provider_id = e.provider_id;
    s.attempt = e.attempt;
    s.providers_tried.push_back(e.provider_id);
    s.assigned_at_us = e.assigned_at_us;
  }
  void operator()(const events::job_started& e) {
    if (s.status != job_status::assigned || e.provider_id != s.provider_id) return;
    s.status = job_status::streaming;
    if (s.first_token_at_us == 0) s.first_token_at_us = e.first_token_at_us;
  }
  void operator()(const events::job_reassigned& e) {
    const bool on_provider = s.status == job_status::assigned || s.status == job_status::streaming;
    if (!on_provider || e.from_provider_id != s.provider_id) return;
    s.status = job_status::queued;
    s.provider_id.clear();
    s.reassignments += 1;
    if (e.reason == events::reassign_reason::provider_declined) s.declines += 1;
    s.reassigned_from_provider_id = e.from_provider_id;
    s.tokens_so_far = e.tokens_so_far;
  }
  void operator()(const events::job_completed& e) {
    if (s.status != job_status::streaming || e.provider_id != s.provider_id) return;
    s.status = job_status::completed;
    s.completion_tokens = e.completion_tokens;
    s.provider_reported_tokens = e.provider_reported_tokens;
    s.prompt_tokens_billed = events::billed_prompt_tokens(e);
    s.finished_at_us = e.completed_at_us;
  }
  void operator()(const events::job_failed& e) {
    if (!live(s)) return;
    s.status = job_status::failed;
    s.failure = e.reason;
    s.failure_message = e.message;
    s.finished_at_us = e.failed_at_us;
  }
  void operator()(const events::job_cancelled& e) {
    if (!live(s)) return;
    s.status = job_status::cancelled;
    s.cancelled_by = e.by;
    s.completion_tokens = e.tokens_produced;
    s.prompt_tokens_billed = s.prompt_tokens;  // a cancel bills the prompt as estimated
    s.finished_at_us = e.cancelled_at_us;
  }
  void operator()(const auto&) {}  // events of other aggregates
};

template <class Event>
concept job_event = requires(const Event& e) {
  { e.job_id } -> std::convertible_to<std::string>;
};

}  // namespace

std::string_view to_string(job_status status) noexcept {
  switch (status) {
    case job_status::none: return "none";
    case job_status::submitted: return "submitted";
    case job_status::queued: return "queued";
    case job_status::assigned: return "assigned";
    case job_status::streaming: return "streaming";
    case job_status::completed: return "completed";
    case job_status::failed: return "failed";
    case job_status::cancelled: return "cancelled";
  }
  return "unknown";
}

bool is_terminal(job_status status) noexcept {
  return status == job_status::completed || status == job_status::failed || status == job_status::cancelled;
}

job_state job::evolve(state s, const events::event& e) {
  if (const auto* submitted = std::get_if<events::job_submitted>(&e)) {
    apply_submitted(s, *submitted);
    return s;
  }
  std::visit(
      [&s](const auto& event) {
        using event_type = std::decay_t<decltype(event)>;
        if constexpr (job_event<event_type>) {
          // Impressions and suspicions name a job too, but lifecycle ignores them.
          if (s.status != job_status::none && event.job_id == s.job_id) lifecycle{s}(event);
        }
      },
      e);
  return s;
}

decision job::decide(const state& s, const command& c, std::int64_t now_us) {
  return decide(s, c, now_us, job_options{});
}

decision job::decide(const state& s, const command& c, std::int64_t now_us, const job_options& options) {
  if (s.status == job_status::none && !std::holds_alternative<submit_job>(c))
    return refuse(errc::not_found, "no job has been submitted on this stream; submit it first");
  return std::visit([&](const auto& command) { return on(s, command, now_us, options); }, c);
}

namespace {

/// The invariants that hold in every status: token counts and the attempt bookkeeping.
void check_counts(const job_state& s, std::vector<std::string>& broken) {
  const std::string job = "job " + quoted(s.job_id) + ": ";
  if (s.providers_tried.size() != s.attempt)
    broken.push_back(job + std::to_string(s.attempt) + " attempts but " + std::to_string(s.providers_tried.size()) +
                     " providers tried");
  if (s.declines > s.reassignments)
    broken.push_back(job + std::to_string(s.declines) + " declines exceed " + std::to_string(s.reassignments) +
                     " reassignments");
  if (s.reassignments > s.attempt)
    broken.push_back(job + std::to_string(s.reassignments) + " reassignments exceed " + std::to_string(s.attempt) +
                     " attempts");
  if (s.tokens_so_far > s.max_tokens)
    broken.push_back(job + std::to_string(s.tokens_so_far) + " tokens kept exceed max_tokens " +
                     std::to_string(s.max_tokens));
  if (s.completion_tokens > s.max_tokens)
    broken.push_back(job + std::to_string(s.completion_tokens) + " completion tokens exceed max_tokens " +
                     std::to_string(s.max_tokens));
  if (is_terminal(s.status) && s.finished_at_us < s.submitted_at_us)
    broken.push_back(job + "finished at " + std::to_string(s.finished_at_us) + " us, before its submission at " +
                     std::to_string(s.submitted_at_us) + " us");
}

/// The invariants of each status: what must be set, and how attempts relate to reassignments
/// (every attempt but a running or completed one ended in a reassignment, except the last of a
/// failed or cancelled job).
void check_status(const job_state& s, std::vector<std::string>& broken) {
  const std::string job = "job " + quoted(s.job_id) + " (" + std::string(to_string(s.status)) + "): ";
  const bool on_provider = s.status == job_status::assigned || s.status == job_status::streaming ||
                           s.status == job_status::completed;
  if (on_provider) {
    if (s.provider_id.empty()) broken.push_back(job + "no provider");
    if (s.attempt == 0 || s.reassignments + 1 != s.attempt)
      broken.push_back(job + std::to_string(s.attempt) + " attempts with " + std::to_string(s.reassignments) +
                       " reassignments; expected one attempt more than reassignments");
    else if (s.providers_tried.empty() || s.providers_tried.back() != s.provider_id)
      broken.push_back(job + "provider " + quoted(s.provider_id) + " is not the last one tried");
  }
  if (s.status == job_status::submitted && s.attempt != 0)
    broken.push_back(job + std::to_string(s.attempt) + " attempts before queueing");
  if (s.status == job_status::queued) {
    if (s.deadline_at_us == 0) broken.push_back(job + "no deadline");
    if (!s.provider_id.empty()) broken.push_back(job + "still names provider " + quoted(s.provider_id));
    if (s.reassignments != s.attempt)
      broken.push_back(job + std::to_string(s.attempt) + " attempts but " + std::to_string(s.reassignments) +
                       " reassignments");
  }
  if ((s.status == job_status::streaming || s.status == job_status::completed) && s.first_token_at_us == 0)
    broken.push_back(job + "no first token");
  if (s.status == job_status::completed && s.completion_tokens < s.tokens_so_far)
    broken.push_back(job + std::to_string(s.completion_tokens) + " completion tokens, fewer than the " +
                     std::to_string(s.tokens_so_far) + " kept");
  const bool ended = s.status == job_status::completed || s.status == job_status::cancelled;
  if (ended && (s.prompt_tokens_billed == 0 || s.prompt_tokens_billed > s.prompt_tokens))
    broken.push_back(job + "billed " + std::to_string(s.prompt_tokens_billed) + " prompt tokens of its " +
                     std::to_string(s.prompt_tokens));
}

}  // namespace

std::vector<std::string> check(const job_state& s) {
  std::vector<std::string> broken;
  if (s.status > job_status::cancelled) {
    broken.push_back("job " + quoted(s.job_id) + ": unknown status " + std::to_string(static_cast<int>(s.status)));
    return broken;
  }
  if (s.status == job_status::none) {
    if (!s.job_id.empty() || s.attempt != 0) broken.push_back("a job that was never submitted has an id or attempts");
    return broken;
  }
  if (s.job_id.empty() || s.user_id.empty() || s.model.empty())
    broken.push_back("job " + quoted(s.job_id) + ": job id, user id or model is empty");
  if (s.prompt_tokens == 0 || s.max_tokens == 0)
    broken.push_back("job " + quoted(s.job_id) + ": prompt_tokens and max_tokens must be positive");
  if (s.max_price_micros < 0)
    broken.push_back("job " + quoted(s.job_id) + ": negative max price " + std::to_string(s.max_price_micros));
  check_counts(s, broken);
  check_status(s, broken);
  return broken;
}

}  // namespace gpustream::domain
