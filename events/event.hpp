#pragma once
/// The event catalog as plain C++ values: one struct per event type, mirroring the Cap'n Proto
/// structs of events/schema/events.capnp field by field. `event` is the variant of all of them; its
/// index is the event's type number on the wire (the `Event` union ordinal), so the order of the
/// variant's alternatives is part of the storage format: only ever append.
///
/// Units: money in micro-USD (`_micros`), prices in micro-USD per million tokens
/// (`_micros_per_mtok`), instants in microseconds since the Unix epoch (`_at_us`), durations in
/// microseconds (`_us`). Secrets appear only as SHA-256 digests (`_hash`).
///
/// This header deliberately includes no Cap'n Proto header; events/codec.hpp does the wire work.

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace gpustream::events {

/// A SHA-256 digest (32 bytes), the only form in which API keys and provider tokens are stored.
using sha256_digest = std::array<std::uint8_t, 32>;

// ---------------------------------------------------------------------------------------------
// Enums: each mirrors the capnp enum of the same name, enumerant for enumerant, in the same order.

enum class user_tier : std::uint8_t { free, premium };

/// How a provider runs models: an OpenAI-compatible server on its machine, or the built-in engine.
enum class backend_kind : std::uint8_t { openai, builtin };

enum class disconnect_reason : std::uint8_t {
  going_offline,     ///< the provider said goodbye
  heartbeat_missed,  ///< too many heartbeats missed: the link is stale
  connection_lost,   ///< the transport closed without a goodbye
  replaced,          ///< a newer link of the same provider took over
  protocol_error,    ///< the provider sent something the link protocol forbids
};

enum class provider_level : std::uint8_t {
  unverified,
  bronze,
  silver,
  gold,
  platinum,
  diamond,
  master,
};

enum class achievement_kind : std::uint8_t {
  ten_fast_jobs,
  hundred_jobs,
  fifty_successes_in_a_row,
  hour_of_uptime,
};

enum class quality_tier : std::uint8_t { low, standard, high, ultra };

enum class reassign_reason : std::uint8_t {
  provider_lost,     ///< the provider's link went away
  provider_stalled,  ///< no token within the allowed time
  provider_error,    ///< the provider reported an error for this job
  /// The provider declined the offer without trying it (its slots were full, or it was
  /// stopping): the attempt does not count toward job_options::attempts_max.
  provider_declined,
};

enum class failure_reason : std::uint8_t {
  no_provider,           ///< no online provider serves the model at the requested quality
  deadline_exceeded,     ///< still queued when the deadline passed
  all_providers_failed,  ///< every attempt failed and no provider is left
  prompt_too_long,       ///< the prompt does not fit the model's context length
  insufficient_funds,    ///< the prepaid balance cannot cover the maximum price
  upstream_error,        ///< the provider's backend returned an error that cannot be retried
  internal,              ///< a fault of the platform itself
  quota_exceeded,        ///< a free user's daily token quota cannot cover the job
};

enum class cancelled_by : std::uint8_t {
  client,    ///< the client disconnected or asked to stop
  platform,  ///< an operator or a platform rule stopped the job
};

enum class transfer_kind : std::uint8_t {
  usage,              ///< user pays for tokens consumed
  platform_fee,       ///< the platform's share of a job
  free_tier_subsidy,  ///< the platform pays for a free-tier job
  ad_spend,           ///< a campaign pays for an impression
  deposit,            ///< money enters from outside
  payout,             ///< money leaves to a provider
};

/// Why a provider became more suspect; each kind has its own counter in suspicion_counters.
enum class suspicion_kind : std::uint8_t {
  unreasonably_fast,     ///< output faster than the provider's hardware can plausibly produce
  aborted,               ///< a job dropped without a platform or client cause
  token_count_mismatch,  ///< the provider's token count disagrees with the platform's own count
};

// ---------------------------------------------------------------------------------------------
// Value structs nested inside events.

struct gpu_info {
  std::string name;                            ///< e.g. "NVIDIA GeForce RTX 4090"
  std::uint64_t memory_bytes = 0;              ///< total device memory, bytes
  std::uint8_t compute_capability_major = 0;   ///< CUDA compute capability, 8 of 8.9
  std::uint8_t compute_capability_minor = 0;   ///< 9 of 8.9

  bool operator==(const gpu_info&) const = default;
};

struct model_offer {
  std::string model_name;                         ///< e.g. "llama-3.1-8b-instruct"
  std::uint32_t context_length_tokens = 0;
  std::string quantisation;                       ///< e.g. "Q4_K_M", "fp16"
  std::int64_t input_price_micros_per_mtok = 0;   ///< micro-USD per million prompt tokens
  std::int64_t output_price_micros_per_mtok = 0;  ///< micro-USD per million completion tokens
  std::uint32_t max_concurrency = 0;              ///< jobs served at once for this model

  bool operator==(const model_offer&) const = default;
};

struct suspicion_counters {
  std::uint32_t unreasonably_fast_jobs = 0;  ///< output faster than the hardware can produce
  std::uint32_t aborted_jobs = 0;            ///< jobs dropped without a platform or client cause
  std::uint32_t token_count_mismatches = 0;  ///< reported token counts that disagree with ours

  bool operator==(const suspicion_counters&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Users and API keys (stream user-<id>).

struct user_created {
  std::string user_id;
  std::string display_name;
  user_tier tier = user_tier::free;
  std::int64_t created_at_us = 0;

  bool operator==(const user_created&) const = default;
};

struct api_key_issued {
  std::string user_id;
  std::string key_id;        ///< public id shown next to the label
  sha256_digest key_hash{};  ///< SHA-256 of the secret key; the key itself is never stored
  std::string label;
  std::int64_t issued_at_us = 0;

  bool operator==(const api_key_issued&) const = default;
};

struct api_key_revoked {
  std::string user_id;
  std::string key_id;
  std::string reason;
  std::int64_t revoked_at_us = 0;

  bool operator==(const api_key_revoked&) const = default;
};

struct user_tier_changed {
  std::string user_id;
  user_tier tier = user_tier::free;  ///< the new tier
  std::int64_t changed_at_us = 0;

  bool operator==(const user_tier_changed&) const = default;
};

struct user_credited {
  std::string user_id;
  std::string deposit_id;  ///< the payment that brought the money in
  std::int64_t amount_micros = 0;
  std::int64_t credited_at_us = 0;

  bool operator==(const user_credited&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Providers (stream provider-<id>).

struct provider_created {
  std::string provider_id;
  std::string owner_user_id;  ///< the user who owns the GPUs
  std::string name;
  sha256_digest token_hash{};  ///< SHA-256 of the provider link token
  std::int64_t created_at_us = 0;

  bool operator==(const provider_created&) const = default;
};

/// The provider's link token was replaced (its operator lost it, or it leaked): links must use the
/// new one from now on, and those open with the old one are closed.
struct provider_token_replaced {
  std::string provider_id;
  sha256_digest token_hash{};  ///< SHA-256 of the new link token
  std::int64_t replaced_at_us = 0;

  bool operator==(const provider_token_replaced&) const = default;
};

struct provider_connected {
  std::string provider_id;
  std::vector<gpu_info> gpus;
  backend_kind backend = backend_kind::openai;
  std::string backend_url;  ///< openai: the upstream base URL; builtin: the model file
  std::string agent_version;
  std::int64_t connected_at_us = 0;

  bool operator==(const provider_connected&) const = default;
};

struct models_advertised {
  std::string provider_id;
  std::vector<model_offer> models;  ///< replaces every earlier offer of this provider
  std::int64_t advertised_at_us = 0;

  bool operator==(const models_advertised&) const = default;
};

struct provider_disconnected {
  std::string provider_id;
  disconnect_reason reason = disconnect_reason::going_offline;
  std::string detail;
  std::int64_t disconnected_at_us = 0;

  bool operator==(const provider_disconnected&) const = default;
};

struct provider_suspended {
  std::string provider_id;
  std::string reason;
  suspicion_counters counters;  ///< the counters that led to the suspension
  std::int64_t suspended_at_us = 0;
  std::int64_t suspended_until_at_us = 0;

  bool operator==(const provider_suspended&) const = default;
};

struct provider_scored {
  std::string provider_id;
  std::string job_id;
  std::int32_t speed_points = 0;
  std::int32_t complexity_points = 0;
  std::int32_t success_points = 0;  ///< negative for a failure the provider caused
  std::int64_t total_score = 0;     ///< the provider's score after this job
  provider_level level = provider_level::unverified;  ///< the level after this job
  std::int64_t scored_at_us = 0;

  bool operator==(const provider_scored&) const = default;
};

struct achievement_unlocked {
  std::string provider_id;
  achievement_kind achievement = achievement_kind::ten_fast_jobs;
  std::int64_t unlocked_at_us = 0;

  bool operator==(const achievement_unlocked&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Jobs (stream job-<id>).

struct job_submitted {
  std::string job_id;
  std::string user_id;
  std::string model;
  quality_tier quality = quality_tier::low;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  std::int64_t max_price_micros = 0;  ///< the most the user agreed to pay for this job
  bool premium = false;
  std::string conversation_id;  ///< keeps a conversation on one provider (sticky sessions)
  std::int64_t submitted_at_us = 0;

  bool operator==(const job_submitted&) const = default;
};

struct job_queued {
  std::string job_id;
  std::int32_t priority = 0;  ///< higher is served first
  std::int64_t deadline_at_us = 0;
  std::int64_t queued_at_us = 0;

  bool operator==(const job_queued&) const = default;
};

struct job_assigned {
  std::string job_id;
  std::string provider_id;
  std::uint32_t attempt = 0;  ///< 1 for the first assignment
  std::int64_t assigned_at_us = 0;

  bool operator==(const job_assigned&) const = default;
};

struct job_started {
  std::string job_id;
  std::string provider_id;
  std::int64_t first_token_at_us = 0;

  bool operator==(const job_started&) const = default;
};

struct job_reassigned {
  std::string job_id;
  std::string from_provider_id;
  reassign_reason reason = reassign_reason::provider_lost;
  std::uint32_t tokens_so_far = 0;  ///< completion tokens kept as the assistant prefix
  std::int64_t reassigned_at_us = 0;

  bool operator==(const job_reassigned&) const = default;
};

/// One transfer of a job's bill: a domain::ledger transfer as the job's end records it.
struct billed_transfer {
  std::string transfer_id;
  std::string debit_account;
  std::string credit_account;
  std::int64_t amount_micros = 0;
  transfer_kind kind = transfer_kind::usage;
  std::string reference;

  bool operator==(const billed_transfer&) const = default;
};

/// What a job's end owes the ledger: exactly the linked group the ledger is asked to apply,
/// recorded with the end (job_completed, job_cancelled) so that a stop between the job's append
/// and the ledger's leaves the bill in the log, and `serve` settles it when it starts again. No
/// transfers: nothing owed (also every end recorded before bills were).
struct ledger_bill {
  std::string group_id;
  std::vector<billed_transfer> transfers;

  bool operator==(const ledger_bill&) const = default;
};

struct job_completed {
  std::string job_id;
  std::string provider_id;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
  std::uint32_t provider_reported_tokens = 0;  ///< what the provider claimed
  std::int64_t time_to_first_token_us = 0;
  std::int64_t total_us = 0;
  std::int64_t completed_at_us = 0;
  ledger_bill bill{};
  /// Free tier: the tokens (prompt + completion) this end counts against the user's daily quota,
  /// recorded after it as free_tokens_used on the user's stream; 0 for a premium job, an end that
  /// settles nothing, and ends recorded before this field.
  std::uint32_t free_tokens = 0;
  /// The prompt tokens the bill and the free usage count: the backend's own count when it
  /// reported one below prompt_tokens (the platform's estimate at submission). 0 in ends recorded
  /// before this field, which counted prompt_tokens (see billed_prompt_tokens).
  std::uint32_t prompt_tokens_billed = 0;

  bool operator==(const job_completed&) const = default;
};

/// The prompt tokens a completed job's end counted: prompt_tokens_billed, or prompt_tokens for an
/// end recorded before that field.
[[nodiscard]] inline std::uint32_t billed_prompt_tokens(const job_completed& e) noexcept {
  return e.prompt_tokens_billed != 0 ? e.prompt_tokens_billed : e.prompt_tokens;
}

struct job_failed {
  std::string job_id;
  failure_reason reason = failure_reason::no_provider;
  std::string message;
  std::int64_t failed_at_us = 0;

  bool operator==(const job_failed&) const = default;
};

struct job_cancelled {
  std::string job_id;
  cancelled_by by = cancelled_by::client;
  std::uint32_t tokens_produced = 0;  ///< completion tokens generated before the cancel; billed
  std::int64_t cancelled_at_us = 0;
  ledger_bill bill{};
  std::uint32_t free_tokens = 0;  ///< as job_completed's

  bool operator==(const job_cancelled&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Campaigns (stream campaign-<id>).

struct campaign_created {
  std::string campaign_id;
  std::string advertiser;
  std::string title;
  std::string text;
  std::string url;
  std::vector<std::string> keywords;
  std::vector<std::string> categories;
  std::int64_t cpm_bid_micros = 0;  ///< bid per thousand impressions
  std::int64_t budget_micros = 0;
  std::int64_t daily_budget_micros = 0;
  std::uint32_t frequency_cap_per_day = 0;  ///< impressions per user per day
  std::int64_t created_at_us = 0;

  bool operator==(const campaign_created&) const = default;
};

struct campaign_funded {
  std::string campaign_id;
  std::int64_t amount_micros = 0;
  std::int64_t funded_at_us = 0;

  bool operator==(const campaign_funded&) const = default;
};

struct campaign_paused {
  std::string campaign_id;
  std::string reason;
  std::int64_t paused_at_us = 0;

  bool operator==(const campaign_paused&) const = default;
};

struct campaign_resumed {
  std::string campaign_id;
  std::int64_t resumed_at_us = 0;

  bool operator==(const campaign_resumed&) const = default;
};

struct campaign_exhausted {
  std::string campaign_id;
  std::int64_t spent_micros = 0;  ///< total spent when the budget ran out
  std::int64_t exhausted_at_us = 0;

  bool operator==(const campaign_exhausted&) const = default;
};

struct impression_recorded {
  std::string impression_id;
  std::string campaign_id;
  std::string job_id;
  std::string user_id;
  std::int64_t price_micros = 0;  ///< charged for this one impression (second price)
  std::int64_t recorded_at_us = 0;

  bool operator==(const impression_recorded&) const = default;
};

/// A recorded impression taken back: its answer was not settled with it (the scheduler refused the
/// result, or the client left before the answer completed), so nobody paid for it and it may not
/// have been seen. Its price goes back to what the campaign can spend, and the user's frequency
/// cap that day is given back; a click on it no longer counts.
struct impression_voided {
  std::string impression_id;
  std::string campaign_id;
  std::string reason;
  std::int64_t voided_at_us = 0;

  bool operator==(const impression_voided&) const = default;
};

struct ad_clicked {
  std::string impression_id;
  std::string campaign_id;
  std::int64_t clicked_at_us = 0;

  bool operator==(const ad_clicked&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Ledger (stream ledger).

struct transfer_recorded {
  std::string transfer_id;  ///< idempotency key: one id is applied at most once
  std::string debit_account;
  std::string credit_account;
  std::int64_t amount_micros = 0;  ///< always positive
  transfer_kind kind = transfer_kind::usage;
  std::string reference;        ///< the job, impression, deposit or payout that caused it
  std::string linked_group_id;  ///< transfers of one group are applied together or not at all
  std::int64_t recorded_at_us = 0;

  bool operator==(const transfer_recorded&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Payouts (stream payout-<id>).

struct payout_requested {
  std::string payout_id;
  std::string provider_id;
  std::int64_t amount_micros = 0;
  bool automatic = false;  ///< requested by the threshold rule rather than by the provider
  std::int64_t requested_at_us = 0;

  bool operator==(const payout_requested&) const = default;
};

struct payout_settled {
  std::string payout_id;
  std::string external_reference;  ///< the payment processor's id for the transfer
  std::int64_t settled_at_us = 0;

  bool operator==(const payout_settled&) const = default;
};

struct payout_failed {
  std::string payout_id;
  std::string reason;
  std::int64_t failed_at_us = 0;

  bool operator==(const payout_failed&) const = default;
};

// ---------------------------------------------------------------------------------------------
// Appended later (type numbers 31 and up); each lives in the stream named in its comment.

/// Budget held for an ad about to be served (stream campaign-<id>).
struct ad_reserved {
  std::string reservation_id;  ///< becomes the impression id when the ad is served
  std::string campaign_id;
  std::string job_id;
  std::string user_id;
  std::int64_t price_micros = 0;  ///< held from the budget until recorded or released
  std::int64_t reserved_at_us = 0;
  std::int64_t expires_at_us = 0;  ///< released automatically if not served by then

  bool operator==(const ad_reserved&) const = default;
};

/// A reservation given back because its ad was not served (stream campaign-<id>).
struct ad_reservation_released {
  std::string reservation_id;
  std::string campaign_id;
  std::string reason;  ///< why the ad was not served (job failed, expired, ...)
  std::int64_t released_at_us = 0;

  bool operator==(const ad_reservation_released&) const = default;
};

/// One more reason to suspect a provider (stream provider-<id>).
struct suspicion_recorded {
  std::string provider_id;
  std::string job_id;
  suspicion_kind kind = suspicion_kind::unreasonably_fast;
  suspicion_counters counters;  ///< the provider's counters after this one
  std::int64_t recorded_at_us = 0;

  bool operator==(const suspicion_recorded&) const = default;
};

/// Tokens a free-tier user consumed, counted against the daily quota (stream user-<id>).
struct free_tokens_used {
  std::string user_id;
  std::string job_id;
  std::uint32_t tokens = 0;  ///< prompt + completion tokens
  std::int64_t used_at_us = 0;

  bool operator==(const free_tokens_used&) const = default;
};

// ---------------------------------------------------------------------------------------------
// The event.

/// Every event type. The index of an alternative is its type number on the wire and the ordinal
/// of its member in the capnp `Event` union: never reorder, never remove, only append.
using event = std::variant<user_created,          // 0
                           api_key_issued,        // 1
                           api_key_revoked,       // 2
                           user_tier_changed,     // 3
                           user_credited,         // 4
                           provider_created,      // 5
                           provider_connected,    // 6
                           models_advertised,     // 7
                           provider_disconnected, // 8
                           provider_suspended,    // 9
                           provider_scored,       // 10
                           achievement_unlocked,  // 11
                           job_submitted,         // 12
                           job_queued,            // 13
                           job_assigned,          // 14
                           job_started,           // 15
                           job_reassigned,        // 16
                           job_completed,         // 17
                           job_failed,            // 18
                           job_cancelled,         // 19
                           campaign_created,      // 20
                           campaign_funded,       // 21
                           campaign_paused,       // 22
                           campaign_resumed,      // 23
                           campaign_exhausted,    // 24
                           impression_recorded,   // 25
                           ad_clicked,            // 26
                           transfer_recorded,     // 27
                           payout_requested,      // 28
                           payout_settled,        // 29
                           payout_failed,         // 30
                           ad_reserved,           // 31
                           ad_reservation_released,  // 32
                           suspicion_recorded,    // 33
                           free_tokens_used,      // 34
                           impression_voided,     // 35
                           provider_token_replaced>;  // 36

/// An event's type number: the variant index, the capnp union ordinal and the envelope's `type`.
using event_type = std::uint16_t;

/// How many event types this build knows; type numbers are 0 .. event_type_count - 1.
inline constexpr event_type event_type_count = std::variant_size_v<event>;

/// The type number of `e`.
[[nodiscard]] event_type type_of(const event& e) noexcept;

/// The snake_case name of a type number, e.g. "user_created"; "unknown" when out of range.
/// The returned view points at static storage.
[[nodiscard]] std::string_view type_name(event_type type) noexcept;

/// The bill a job's end records (job_completed, job_cancelled); nullptr for any other event. It
/// points into `e`.
[[nodiscard]] const ledger_bill* bill_of(const event& e) noexcept;

/// The free-tier tokens a job's end counts against its user's quota (job_completed,
/// job_cancelled); 0 for any other event.
[[nodiscard]] std::uint32_t free_tokens_of(const event& e) noexcept;

}  // namespace gpustream::events
