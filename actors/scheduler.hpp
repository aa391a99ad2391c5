#pragma once
/// The scheduler: the priority queue of jobs waiting for a provider, the index of online providers
/// and the selection policy, and the job lifecycle across the aggregates. It is the only writer of
/// job streams after submission, and the one that settles a finished job in the ledger.
///
/// A job's way: submit (refused at once, and recorded as failed, when no online provider serves
/// its model and tier, a premium user's balance cannot cover its quote, or a free user's quota is
/// used up) -> queued (bounded queue, deadline) -> assigned to the provider the policy picks, within
/// its concurrency limit, and offered to its session -> started (first token) -> completed (ledger
/// group, provider scored, free usage recorded) | failed | cancelled (tokens so far billed). A
/// provider lost or failing before the end puts the job back in the queue (attempts bounded);
/// queued jobs no provider can serve any more fail with no_provider; a job offered to a provider
/// that sends no first token within first_token_wait_max goes to another; queue deadlines and
/// stalls are enforced by a timer. Every step is persisted before the next is taken (persist, then apply).

#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "actors/aggregates.hpp"
#include "actors/atoms.hpp"
#include "actors/ledger_actor.hpp"
#include "actors/persistence.hpp"
#include "domain/job.hpp"
#include "domain/job_queue.hpp"
#include "domain/pricing.hpp"
#include "domain/priority.hpp"
#include "domain/provider.hpp"
#include "domain/selection.hpp"
#include "domain/user.hpp"

namespace gpustream::actors {

struct job_ended;

/// Told how a job ended when the scheduler ends it on its own (no provider left, every attempt
/// failed, queue deadline passed), so that whoever waits for the answer can stop waiting.
using job_watcher = caf::typed_actor<caf::reacts_to<job_ended>>;

/// A request to run a job, as the gateway makes it.
struct job_request {
  std::string job_id;
  std::string user_id;
  std::string model;
  events::quality_tier quality = events::quality_tier::standard;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  /// The highest price per million tokens the client accepts (x_gpustream.max_price_micros):
  /// the job goes to no provider above it; 0: any.
  std::int64_t max_price_micros = 0;
  bool premium = false;
  std::string conversation_id;
  /// The user's contribution score (from the providers they own), for the priority.
  std::int64_t contribution_score = 0;
  /// Optional: told when the scheduler fails or expires the job by itself.
  job_watcher watcher{};
  /// The context window the job needs (its prompt and the client's max_tokens): it goes only to
  /// a provider serving the model with at least this window. 0: any.
  std::uint32_t context_tokens_min = 0;
};

/// The answer to an accepted job request: it is queued (persisted) with this priority.
struct job_accepted {
  std::string job_id;
  std::int32_t priority = 0;
  std::int64_t deadline_at_us = 0;
};

/// Sent to a provider's session: run this job.
struct job_offer {
  std::string job_id;
  std::string model;
  events::quality_tier quality = events::quality_tier::standard;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  std::uint32_t attempt = 0;
  std::uint32_t tokens_so_far = 0;  ///< after a failover: completion tokens to continue from
};

/// The other end of a provider's link (the gateway's link session; a simulated provider in tests
/// and benchmarks). It answers offers by reporting to the scheduler.
using provider_session =
    caf::typed_actor<caf::reacts_to<offer_atom, job_offer>, caf::reacts_to<cancel_atom, std::string>>;

/// A provider came online (its connect and offers are already persisted by its aggregate).
struct provider_online {
  domain::provider_listing listing;
  provider_session session;
};

/// A job's provider finished it.
struct job_result {
  std::string job_id;
  std::string provider_id;
  std::uint32_t completion_tokens = 0;         ///< the platform's own count
  std::uint32_t provider_reported_tokens = 0;  ///< the backend's usage
  std::int64_t ttft_us = 0;
  std::int64_t total_us = 0;
  /// Of completion_tokens, the pieces this provider's attempt sent and their text in bytes
  /// (domain::job_measure).
  std::uint32_t attempt_tokens = 0;
  std::uint64_t attempt_bytes = 0;
  /// Free tier: the ad served with the answer (its impression already recorded by the campaign);
  /// its price moves in the job's settlement group.
  std::optional<domain::ad_charge> ad{};
  /// The backend's count of the prompt (its usage.prompt_tokens); 0: none reported. It lowers the
  /// prompt tokens billed, never raises them above the job's estimate (see
  /// scheduler_options::prompt_count_floor_percent).
  std::uint32_t prompt_tokens_reported = 0;
  /// The relay cut the answer off past its budget while the provider still streamed it: the
  /// provider is told to stop.
  bool cut = false;
};

/// A job's provider could not finish it.
struct job_failure {
  std::string job_id;
  std::string provider_id;
  domain::job_fault fault = domain::job_fault::provider;
  std::uint32_t tokens_so_far = 0;
  std::string message;
  /// Lost with its provider's link: the loss counts against the provider once, on the first of
  /// the jobs it took, not once per job (ten at once would suspend it).
  bool with_link = false;
};

/// Stop a job (the client went away, or an operator).
struct job_cancel {
  std::string job_id;
  events::cancelled_by by = events::cancelled_by::client;
  std::uint32_t tokens_produced = 0;
  /// When set, the cancel applies only while the job runs on this provider (one that reported a
  /// job nobody waits for); else it is refused with not_found. A provider cannot end the jobs
  /// of others. Default: any.
  std::string provider_id{};
};

/// How a job ended, for the one who reported it.
struct job_ended {
  std::string job_id;
  domain::job_status status = domain::job_status::completed;
  std::int64_t gross_micros = 0;         ///< billed
  std::int64_t platform_fee_micros = 0;  ///< of which the platform keeps
  std::string detail{};                  ///< failed: why, in words a user can act on
  /// failed: why, as the job's record has it (internal when it could not be recorded).
  events::failure_reason failure = events::failure_reason::internal;
  /// completed or cancelled with a bill: the prompt tokens billed (the client's usage.prompt_tokens;
  /// a cancel bills the estimate); 0 otherwise.
  std::uint32_t prompt_tokens = 0;
  /// completed or cancelled with a bill: the completion tokens billed (the client's
  /// usage.completion_tokens: what it got, at most the job's max_tokens); 0 otherwise.
  std::uint32_t completion_tokens = 0;
  /// Ended with a bill that the ledger has not taken (its end, with the bill, is recorded): what
  /// becomes of the bill, and why. Empty when the ledger took it or there is none.
  std::string bill_unsettled{};
};

/// What the scheduler holds now.
struct scheduler_counts {
  std::uint64_t queued = 0;
  std::uint64_t running = 0;   ///< assigned or streaming
  std::uint64_t providers_online = 0;
  std::uint64_t side_effects_failed = 0;  ///< scoring or usage records whose append failed
  /// Jobs' bills whose ledger group the store failed to take: retried, with their premium holds
  /// kept, until the ledger takes or refuses them.
  std::uint64_t settlements_retrying = 0;
  std::uint64_t users_holding = 0;  ///< premium users with quotes held for their live jobs
};

struct scheduler_options {
  domain::job_queue_options queue;
  /// Its quality_level_min is taken from `pricing` (one rule for who may serve a tier).
  domain::selection_options selection;
  domain::assign_options assign;
  domain::pricing_options pricing;
  domain::priority_options priority;
  domain::user_options users;
  /// Sticky sessions: a conversation's next job (x_gpustream.conversation_id) goes first to the
  /// provider its last answer completed on, while that one is a candidate that takes work (its
  /// prompt cache is warm there).
  domain::sticky_options sticky;
  /// Most jobs the scheduler holds at once (being checked, queued or running), counting the bills
  /// of ended jobs it retries while the ledger cannot take them; one more is refused with busy
  /// before anything is recorded. Default: 100,000.
  std::size_t jobs_live_max = 100'000;
  /// Highest price per million tokens, input or output, of a provider a free job goes to: the
  /// platform pays for free answers, and routing prefers an idle provider over a cheap one.
  /// Default: 10 USD per million tokens.
  std::int64_t free_tier_price_micros_per_mtok_max = 10'000'000;
  /// How long a job may wait in the queue before it fails with deadline_exceeded. Default: 60 s.
  std::chrono::microseconds queue_wait_max = std::chrono::seconds(60);
  /// How long an assigned job may wait for its first token before it goes to another provider
  /// (the provider counts as having failed it), besides the time to read its prompt
  /// (first_token_wait_per_prompt_token). Default: 30 s.
  std::chrono::microseconds first_token_wait_max = std::chrono::seconds(30);
  /// The first token's wait grows by this much per prompt token (and, after a failover, per token
  /// of the answer so far, which the next provider reads too): a long prompt on a slow GPU is not
  /// taken away, and counted against its provider, while it is being read. Default: 1 ms, a
  /// prefill of at least 1,000 tokens per second (a 100,000-token prompt may wait 130 s).
  std::chrono::microseconds first_token_wait_per_prompt_token = std::chrono::milliseconds(1);
  /// How many different providers' backends may refuse a job's request itself (an HTTP 400, 413
  /// or 422) before the job fails with upstream_error and the backend's message, instead of
  /// going to another provider. Default: 2.
  std::uint32_t request_rejections_max = 2;
  /// A backend's count of a prompt below this share of the node's estimate is taken as no count
  /// (the estimate is billed): some backends leave out the tokens they found in their cache, and
  /// no tokenizer takes 4 times the 3 bytes a token the estimate allows. Default: 25 %.
  std::uint32_t prompt_count_floor_percent = 25;
  /// How often deadlines are enforced and a pass over the queue is made even without an event
  /// that would start one. Default: 100 ms.
  std::chrono::milliseconds tick_interval = std::chrono::milliseconds(100);
  /// Source of `now`, microseconds since the Unix epoch. Default: the system clock.
  std::function<std::int64_t()> clock_us;
};

/// The aggregate actors the scheduler drives; spawned by the runtime.
struct scheduler_peers {
  ledger_actor ledger;
  user_registry users;
  provider_registry providers;
  job_registry jobs;
};

using scheduler_actor = caf::typed_actor<
    caf::replies_to<job_request>::with<job_accepted>,
    caf::reacts_to<online_atom, provider_online>,
    caf::reacts_to<offline_atom, std::string>,
    // The provider's link is gone but its offline notice waits for the results of answers it
    // finished: no new job goes to it, and its jobs that never started move on at once.
    caf::reacts_to<link_lost_atom, std::string>,
    caf::reacts_to<load_atom, std::string, domain::load_report>,
    caf::replies_to<started_atom, std::string, std::string>::with<std::uint64_t>,
    caf::replies_to<job_result>::with<job_ended>,
    caf::replies_to<job_failure>::with<job_ended>,
    caf::replies_to<job_cancel>::with<job_ended>,
    // (job id, provider id): the provider's answer was cut off (it ran past what was asked): the
    // provider is told to stop at once, while its result is still being settled.
    caf::reacts_to<cancel_atom, std::string, std::string>,
    caf::replies_to<count_atom>::with<scheduler_counts>,
    // (settle, job id, bill): the bill of a job that ended before this start, which the log holds
    // without its ledger group and serve's start could not settle now (the ledger busy, its store
    // failing). The scheduler retries it as it does its own, and holds what its premium user pays
    // meanwhile, so that jobs admitted until the ledger takes it cannot spend that money.
    caf::reacts_to<settle_atom, std::string, events::ledger_bill>,
    // Internal: the deadline and queue timer.
    caf::reacts_to<tick_atom>>;

[[nodiscard]] scheduler_actor spawn_scheduler(caf::actor_system& system, scheduler_peers peers,
                                              scheduler_options options = {});

}  // namespace gpustream::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_request)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_accepted)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_offer)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::provider_online)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_failure)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_cancel)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::job_ended)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::scheduler_counts)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::load_report)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::events::ledger_bill)
