#pragma once
/// The directory: the gateway's read model of who is who, folded from the event log. It answers
/// the questions asked on every request without a round trip into the actors: which user an API
/// key belongs to, which provider a link token belongs to, a user's contribution score; and the
/// listings of the admin API and the provider's own page (providers, jobs by state, payouts,
/// earnings).
///
/// It is built at open by reading the whole log in bounded chunks, then kept current by a
/// catch-up subscription on its own thread (gapless, in global order). Writers that just
/// appended events (the admin API) hand them in at once with apply_committed, so that a key works
/// the moment the request that created it returns. Both paths apply an event only once and in
/// stream order: each stream's last applied version is kept, events at or below it are skipped,
/// and a gap before handed-in events is first filled from the log.
///
/// It also keeps the bills of jobs' ends until their ledger groups appear (unsettled_bills), and
/// the free tokens of jobs' ends until their usage appears on the user's stream
/// (unrecorded_free_usage), so that `serve` can settle and record at start what a stop interrupted.
///
/// What it holds: every user (tier, unrevoked key digests), provider (domain::provider's fold,
/// plus its money from the ledger and its newest payouts), campaign (id and names); and the
/// newest jobs, at most jobs_max, forgetting the oldest finished jobs first. Users, providers and
/// campaigns are the platform's population and are all kept (a few hundred bytes each); jobs and
/// payouts grow with traffic and are bounded.
///
/// Thread-safe: lookups share a lock, applying takes it exclusively. No CAF, Beast or RocksDB here.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "domain/job.hpp"
#include "domain/payout.hpp"
#include "events/event.hpp"
#include "storage/error.hpp"

namespace gpustream::storage {
class event_store;
}

namespace gpustream::gateway {

struct directory_options {
  /// Most jobs kept. A new job beyond it makes the directory forget the job that finished
  /// longest ago, or, when none has finished, the oldest one. Default: 100,000.
  std::size_t jobs_max = 100'000;
  /// Most payouts kept per provider (the newest); money totals count every payout. Default: 100.
  std::size_t payouts_per_provider_max = 100;
  /// Most events read from the log at once, at open and per subscription step. Default: 4096.
  std::size_t read_events_max = 4096;
  /// Longest the subscription thread waits for new events before it looks at its stop flag, so
  /// destruction never takes longer than about this. Default: 100 ms.
  std::chrono::milliseconds subscription_wait_max{100};
  /// How long the subscription thread waits before reading again after the store failed a read.
  /// Default: 1 s.
  std::chrono::milliseconds read_retry_wait{1000};
  /// Most events apply_committed reads from the log to fill a gap before the events handed in;
  /// a larger gap is left to the subscription (the events then show up a little later).
  /// Default: 4096.
  std::size_t gap_events_max = 4096;
  /// Most free-token usages remembered that were applied before their job's end (a gap fill of
  /// the user's stream can bring them first): the end then waits for no usage. Beyond it the
  /// oldest is forgotten, and its job's end would count as unrecorded until a restart. Default: 4096.
  std::size_t usage_ahead_max = 4096;
};

/// Who an API key belongs to.
struct user_entry {
  std::string user_id;
  events::user_tier tier = events::user_tier::free;

  bool operator==(const user_entry&) const = default;
};

/// A provider as the admin API and the provider's own page show it.
struct provider_entry {
  std::string provider_id;
  std::string owner_user_id;
  std::string name;
  std::int64_t created_at_us = 0;
  bool online = false;                 ///< as its last connect/disconnect event says
  std::int64_t connected_at_us = 0;    ///< start of the current connection (when online)
  std::int64_t suspended_until_at_us = 0;  ///< 0: never suspended
  std::int64_t score = 0;
  events::provider_level level = events::provider_level::bronze;
  std::uint64_t jobs_succeeded = 0;
  std::uint64_t jobs_failed = 0;  ///< failures the provider caused
  std::vector<events::achievement_kind> achievements;  ///< in enum order
  std::vector<events::model_offer> models;  ///< what the current connection advertises
  // Money, from the ledger's transfers (micro-USD).
  std::int64_t balance_micros = 0;   ///< the provider account's balance
  std::int64_t earned_micros = 0;    ///< usage and subsidy credited, minus platform fees
  std::int64_t paid_out_micros = 0;  ///< payouts requested, minus payouts that failed

  bool operator==(const provider_entry&) const = default;
};

/// One payout of a provider.
struct payout_entry {
  std::string payout_id;
  std::string provider_id;
  std::int64_t amount_micros = 0;
  bool automatic = false;
  domain::payout_status status = domain::payout_status::requested;
  std::int64_t requested_at_us = 0;
  std::int64_t closed_at_us = 0;   ///< settled or failed; 0 while requested
  std::string external_reference;  ///< settled
  std::string failure_reason;      ///< failed

  bool operator==(const payout_entry&) const = default;
};

/// One job, as the admin API lists it.
struct job_entry {
  std::string job_id;
  std::string user_id;
  std::string model;
  domain::job_status status = domain::job_status::submitted;
  bool premium = false;
  std::string provider_id;  ///< assigned, streaming or completed: the provider; else empty
  std::uint32_t attempt = 0;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t max_tokens = 0;
  std::uint32_t completion_tokens = 0;  ///< completed or cancelled: the tokens billed
  /// completed or cancelled: the prompt tokens billed (the backend's count when below the
  /// estimate prompt_tokens); 0 while live or failed
  std::uint32_t prompt_tokens_billed = 0;
  events::failure_reason failure = events::failure_reason::no_provider;  ///< failed: why
  std::int64_t submitted_at_us = 0;
  std::int64_t finished_at_us = 0;  ///< 0 while live
  // Money of the job's ledger group "job-<id>" (micro-USD).
  std::int64_t gross_micros = 0;         ///< paid by the user (premium) or the subsidy (free)
  std::int64_t platform_fee_micros = 0;  ///< of which the platform keeps
  std::int64_t ad_micros = 0;            ///< charged to the campaign whose ad was served
  /// While live: the ad impression recorded for its answer and not taken back, which only its
  /// end settles (empty: none). Its end clears it: the bill pays the ad, or it was taken back.
  std::string impression_id;

  bool operator==(const job_entry&) const = default;
};

/// One campaign, as far as the gateway needs to know it.
struct campaign_entry {
  std::string campaign_id;
  std::string advertiser;
  std::string title;
  std::int64_t created_at_us = 0;
  std::string url;  ///< the advertiser's page, where a click on its ad leads

  bool operator==(const campaign_entry&) const = default;
};

/// A bill recorded with a job's end (events::ledger_bill) whose ledger group the log does not show.
struct unsettled_bill {
  std::string job_id;
  events::ledger_bill bill;

  bool operator==(const unsettled_bill&) const = default;
};

/// The free tokens a job's end counts against its user's quota (events::job_completed::
/// free_tokens) whose free_tokens_used the log does not show.
struct unrecorded_usage {
  std::string job_id;
  std::string user_id;
  std::uint32_t tokens = 0;
  std::int64_t ended_at_us = 0;

  bool operator==(const unrecorded_usage&) const = default;
};

struct directory_counts {
  std::uint64_t users = 0;
  std::uint64_t active_api_keys = 0;
  std::uint64_t providers = 0;
  std::uint64_t providers_online = 0;
  std::uint64_t campaigns = 0;
  std::uint64_t jobs = 0;            ///< kept now (<= jobs_max)
  std::uint64_t jobs_forgotten = 0;  ///< dropped to stay within jobs_max
  std::uint64_t events_skipped = 0;  ///< events whose payload did not decode (newer build?)
  /// Events apply_committed read from the log to fill a gap before the events handed in.
  std::uint64_t events_filled = 0;
  std::uint64_t unsettled_bills = 0;  ///< unsettled_bills(): ends whose ledger group is not seen
  std::uint64_t unrecorded_free_usage = 0;  ///< unrecorded_free_usage(): ends whose usage is not seen
  std::uint64_t position = 0;        ///< global position the subscription has applied
};

/// Everything the directory holds, in a fixed order (by id; jobs oldest first): for tests and
/// for comparing a directory with one rebuilt from the log. O(size): not for request paths.
struct directory_contents {
  struct user {
    user_entry entry;
    std::vector<events::sha256_digest> api_key_hashes;  ///< unrevoked, by key id
    bool operator==(const user&) const = default;
  };
  std::vector<user> users;
  std::vector<provider_entry> providers;
  std::vector<payout_entry> payouts;  ///< by provider, oldest first
  std::vector<campaign_entry> campaigns;
  std::vector<job_entry> jobs;
  std::vector<unsettled_bill> unsettled_bills;  ///< by group id
  std::vector<unrecorded_usage> unrecorded_free_usage;  ///< by job id

  bool operator==(const directory_contents&) const = default;
};

class directory {
 public:
  /// Reads the whole log of `store` into a new directory, then starts the subscription thread.
  /// Fails with the store's error if the log cannot be read.
  [[nodiscard]] static expected<std::unique_ptr<directory>, storage::error> open(
      std::shared_ptr<storage::event_store> store, directory_options options = {});

  /// Stops the subscription thread (within about subscription_wait_max) and joins it.
  ~directory();
  directory(const directory&) = delete;
  directory& operator=(const directory&) = delete;

  // -- Hot path: one of these per API request. ----------------------------------------------

  /// The user an API key belongs to: hashes `key` (SHA-256) and looks the digest up. Nothing
  /// for an unknown or revoked key.
  [[nodiscard]] std::optional<user_entry> user_by_api_key(std::string_view key) const;

  /// The provider a link token belongs to (by SHA-256 digest); nothing for an unknown token.
  [[nodiscard]] std::optional<provider_entry> provider_by_token(std::string_view token) const;
  /// Whether the link token of SHA-256 `token_hash` is still `provider_id`'s (not replaced since).
  [[nodiscard]] bool token_is_of(const events::sha256_digest& token_hash, std::string_view provider_id) const;

  /// The best score of the providers `user_id` owns (0 when none): the user's contribution, which
  /// orders their jobs in the queue.
  [[nodiscard]] std::int64_t contribution_score(std::string_view user_id) const;

  // -- Lookups and listings. ------------------------------------------------------------------

  [[nodiscard]] std::optional<user_entry> user(std::string_view user_id) const;
  [[nodiscard]] std::optional<provider_entry> provider(std::string_view provider_id) const;
  [[nodiscard]] std::optional<job_entry> job(std::string_view job_id) const;
  [[nodiscard]] std::optional<campaign_entry> campaign(std::string_view campaign_id) const;

  /// Providers by id, those after `after` ("": from the first), at most `max`.
  [[nodiscard]] std::vector<provider_entry> providers(std::size_t max, std::string_view after = {}) const;
  /// Jobs newest first (by submission), only those in `status` when given, at most `max`.
  [[nodiscard]] std::vector<job_entry> jobs(std::optional<domain::job_status> status,
                                            std::size_t max) const;
  /// The same, from the job submitted before job `after` on; nothing when the directory does not
  /// hold `after` (never seen, or forgotten: see directory_options::jobs_max).
  [[nodiscard]] std::optional<std::vector<job_entry>> jobs(std::optional<domain::job_status> status,
                                                           std::size_t max, std::string_view after) const;
  /// The provider's payouts, newest first, at most `max` (and at most payouts_per_provider_max).
  [[nodiscard]] std::vector<payout_entry> payouts_of(std::string_view provider_id,
                                                     std::size_t max) const;
  /// Campaigns by id, at most `max`.
  [[nodiscard]] std::vector<campaign_entry> campaigns(std::size_t max) const;

  /// Bills recorded with jobs' ends whose ledger groups the log does not show, by group id, at
  /// most `max`. A job's end is appended before its group (actors/scheduler), so right after
  /// open these are the bills a stop left between the two appends, or that the ledger refused;
  /// while serving, also those being settled at that moment. Kept whatever jobs_max forgets.
  [[nodiscard]] std::vector<unsettled_bill> unsettled_bills(std::size_t max) const;

  /// Free tokens recorded with jobs' ends whose usage the log does not show on the user's stream,
  /// by job id, at most `max`: as unsettled_bills, the usage is recorded after the end. Only for
  /// jobs the directory still holds when they end (it needs their user).
  [[nodiscard]] std::vector<unrecorded_usage> unrecorded_free_usage(std::size_t max) const;

  [[nodiscard]] directory_counts counts() const;
  [[nodiscard]] directory_contents contents() const;

  // -- Keeping current. -----------------------------------------------------------------------

  /// Applies events a writer just appended: `events` are the last events of `stream`, which is at
  /// `version_after` after them (so the i-th of n has version version_after - n + 1 + i), e.g. an
  /// actors::command_reply. Events already applied are skipped; if events before them are
  /// missing, they are read from the log first (up to gap_events_max). Returns at once when
  /// `events` is empty.
  void apply_committed(std::string_view stream, std::uint64_t version_after,
                       std::span<const events::event> events);

  /// Global position of the last event the subscription has applied.
  [[nodiscard]] std::uint64_t position() const;

  /// Why the subscription cannot read on (e.g. a gap in the log: damage that no retry mends),
  /// while it cannot; none while it reads. New users, keys and providers are not known meanwhile.
  [[nodiscard]] std::optional<std::string> read_problem() const;

  /// Waits until the subscription has applied every event up to `target` (a global position) or
  /// `wait_max` passes; true when it has.
  [[nodiscard]] bool wait_for_position(std::uint64_t target,
                                       std::chrono::milliseconds wait_max) const;

  class impl;

 private:
  explicit directory(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
