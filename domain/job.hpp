#pragma once
/// The job aggregate (stream job-<id>): one request's life from submission to its end.
///
///   submitted -> queued -> assigned -> streaming -> completed
///                  ^          |           |
///                  +--reassign+-----------+        any live state -> failed | cancelled
///
/// `job_reassigned` (provider lost, stalled or erred) takes an assigned or streaming job back to
/// queued; the completion tokens it had produced are kept as the assistant prefix for the next
/// provider, and the next assignment is attempt + 1. completed, failed and cancelled are terminal.
///
/// Every command is checked against the current state and refused with errc::invalid_state naming
/// it. Repeating the command that produced the current state (same content) yields no events, so
/// an actor may retry a command whose reply it lost. submit_job is idempotent at any state: it is
/// the job's creation.
///
/// The actor: decide, append, evolve; a queued job gets a timer for its deadline, which sends
/// expire_job (no events when the job has moved on). `check` is the invariant for
/// `gpustream replay --verify` and tests.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "domain/aggregate.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Limits of the job aggregate. The defaults are what production runs with.
struct job_options {
  /// Longest job, user, provider or conversation id, in bytes. Default: 128.
  std::size_t id_length_max = 128;
  /// Longest model name, in bytes: the provider link's bound on the names a provider offers.
  /// Default: 200.
  std::size_t model_name_length_max = 200;
  /// Largest prompt a job may carry, tokens. Default: 1,048,576.
  std::uint32_t prompt_tokens_max = 1'048'576;
  /// Largest max_tokens (completion tokens) a job may ask for: the OpenAI API's bound
  /// (gateway::api_options::max_tokens_max), which also caps the budget of a request without
  /// max_tokens. Default: 131,072.
  std::uint32_t max_tokens_max = 131'072;
  /// Largest max_price a job may carry, micro-USD. Default: 1,000 USD.
  std::int64_t max_price_micros_max = 1'000'000'000;
  /// Assignments (attempts) a job may have, not counting offers its providers declined untried;
  /// the next one is refused and the job should be failed with all_providers_failed. Default: 5.
  std::uint32_t attempts_max = 5;
  /// Offers of a job its providers may decline untried (reassign_reason::provider_declined), which
  /// spend no attempt; the next assignment after them is refused. Default: 32.
  std::uint32_t declines_max = 32;
  /// Furthest a queue deadline may lie after the time it is set. Default: 10 minutes.
  std::int64_t queue_wait_us_max = 600'000'000;
  /// Longest failure message, in bytes. Default: 1,000.
  std::size_t message_length_max = 1'000;
};

enum class job_status : std::uint8_t {
  none,       ///< nothing submitted on this stream yet
  submitted,
  queued,     ///< waiting for a provider, until deadline_at_us
  assigned,   ///< offered to provider_id, no token yet
  streaming,  ///< provider_id is producing tokens
  completed,
  failed,
  cancelled,
};

[[nodiscard]] std::string_view to_string(job_status status) noexcept;

/// completed, failed and cancelled: nothing changes a job in these states.
[[nodiscard]] bool is_terminal(job_status status) noexcept;

struct job_state {
  job_status status = job_status::none;
  // From job_submitted.
  std::string job_id;
  std::string user_id;
  std::string model;
  events::quality_tier quality = events::quality_tier::low;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  std::int64_t max_price_micros = 0;
  bool premium = false;
  std::string conversation_id;
  std::int64_t submitted_at_us = 0;
  // From the latest job_queued.
  std::int32_t priority = 0;
  std::int64_t deadline_at_us = 0;
  std::int64_t queued_at_us = 0;
  // Attempts.
  std::string provider_id;  ///< assigned, streaming or completed: the provider; else empty
  std::uint32_t attempt = 0;                 ///< assignments so far; the current one's number
  std::vector<std::string> providers_tried;  ///< one per attempt, in order
  std::uint32_t reassignments = 0;
  std::uint32_t declines = 0;                ///< reassignments of offers declined untried: spent no attempt
  std::string reassigned_from_provider_id;   ///< of the latest reassignment
  std::int64_t assigned_at_us = 0;           ///< of the current attempt
  std::int64_t first_token_at_us = 0;        ///< first token of the job (any attempt); 0 if none yet
  std::uint32_t tokens_so_far = 0;           ///< completion tokens kept across reassignments
  // The end.
  std::uint32_t completion_tokens = 0;         ///< completed or cancelled: the tokens billed
  std::uint32_t provider_reported_tokens = 0;  ///< completed: what the provider claimed
  /// completed: the prompt tokens its end billed (at most prompt_tokens); cancelled:
  /// prompt_tokens, what a cancel bills when it bills anything (one that came before the
  /// provider started bills nothing at all)
  std::uint32_t prompt_tokens_billed = 0;
  events::failure_reason failure = events::failure_reason::no_provider;  ///< failed: why
  std::string failure_message;
  events::cancelled_by cancelled_by = events::cancelled_by::client;  ///< cancelled: who
  std::int64_t finished_at_us = 0;

  bool operator==(const job_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, job_state& x) {
  return f(x.status, x.job_id, x.user_id, x.model, x.quality, x.prompt_tokens, x.max_tokens,
           x.max_price_micros, x.premium, x.conversation_id, x.submitted_at_us, x.priority,
           x.deadline_at_us, x.queued_at_us, x.provider_id, x.attempt, x.providers_tried,
           x.reassignments, x.declines, x.reassigned_from_provider_id, x.assigned_at_us, x.first_token_at_us,
           x.tokens_so_far, x.completion_tokens, x.provider_reported_tokens, x.prompt_tokens_billed, x.failure,
           x.failure_message, x.cancelled_by, x.finished_at_us);
}

// Commands. Only submit_job names the job: the others apply to the stream's job.

struct submit_job {
  std::string job_id;
  std::string user_id;
  std::string model;
  events::quality_tier quality = events::quality_tier::low;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  std::int64_t max_price_micros = 0;  ///< 0 for free-tier jobs
  bool premium = false;
  std::string conversation_id;  ///< may be empty
};

/// submitted -> queued; on a queued job, a new priority or deadline (aging, or a fresh deadline
/// after a reassignment).
struct queue_job {
  std::int32_t priority = 0;
  std::int64_t deadline_at_us = 0;  ///< after now, at most queue_wait_us_max after it
};

/// queued -> assigned: attempt + 1.
struct assign_job {
  std::string provider_id;
  /// When the scheduler took the job out of its queue for this provider (0: now). The queue
  /// deadline bounds the wait until that choice, not until this command is decided after it: a
  /// choice made just before the deadline is not refused for the moment it took to get here.
  std::int64_t chosen_at_us = 0;
};

/// assigned -> streaming: the provider's first token arrived.
struct start_job {
  std::string provider_id;
};

/// assigned | streaming -> queued: the provider is gone; tokens_so_far are kept.
struct reassign_job {
  std::string from_provider_id;
  events::reassign_reason reason = events::reassign_reason::provider_lost;
  std::uint32_t tokens_so_far = 0;  ///< at least the tokens already kept, at most max_tokens
};

/// streaming -> completed.
struct complete_job {
  std::string provider_id;
  std::uint32_t completion_tokens = 0;  ///< the platform's count, prefix included
  std::uint32_t provider_reported_tokens = 0;
  /// What the end owes the ledger (domain::to_bill of the job's settlement), recorded with it.
  events::ledger_bill bill{};
  /// What the end counts against a free user's daily quota: 0, or the prompt and completion
  /// tokens (always 0 for a premium job). Recorded with it, like the bill.
  std::uint32_t free_tokens = 0;
  /// The prompt tokens billed: from 1 to the submitted prompt_tokens (the platform's estimate),
  /// fewer when the backend counted fewer; 0: all of prompt_tokens.
  std::uint32_t prompt_tokens_billed = 0;
};

/// Any live state -> failed. deadline_exceeded only for a queued job whose deadline has passed.
struct fail_job {
  events::failure_reason reason = events::failure_reason::internal;
  std::string message;
};

/// Any live state -> cancelled. The tokens produced are billed.
struct cancel_job {
  events::cancelled_by by = events::cancelled_by::client;
  std::uint32_t tokens_produced = 0;
  /// What the end owes the ledger and the free quota, as complete_job's.
  events::ledger_bill bill{};
  std::uint32_t free_tokens = 0;
};

/// The deadline timer: fails a queued job whose deadline has passed with deadline_exceeded; no
/// events in any other case (the job moved on, or the deadline is still ahead).
struct expire_job {};

struct job {
  using state = job_state;
  using command = std::variant<submit_job, queue_job, assign_job, start_job, reassign_job,
                               complete_job, fail_job, cancel_job, expire_job>;
  static constexpr std::uint32_t snapshot_version = 3;  // 2: job_state.prompt_tokens_billed; 3: declines

  [[nodiscard]] static state evolve(state s, const events::event& e);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us,
                                       const job_options& options);
};

static_assert(aggregate<job>);

/// Every broken invariant of `s`, in words naming the job and the numbers involved; empty when
/// the job is consistent: live or terminal with the fields its status needs, attempts, providers
/// tried and reassignments agreeing, token counts within max_tokens, a queued job with a
/// deadline, a completed job with a provider and a first token.
[[nodiscard]] std::vector<std::string> check(const job_state& s);

}  // namespace gpustream::domain
