#pragma once
/// The provider aggregate (stream "provider-<id>"): a GPU owner's registration, its connections,
/// the models it advertises, its score, level and achievements, and the suspicion that may suspend
/// it. Follows the shape in aggregate.hpp.
///
/// Soft state that changes with every heartbeat (load, health, queue length, speed EWMAs) is not
/// here: it lives in the selection index (selection.hpp), which `listing_for` feeds from this state.

#include <cstdint>
#include <set>
#include <string>
#include <variant>
#include <vector>

#include "domain/aggregate.hpp"
#include "domain/scoring.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Who caused a job to end the way it did. Only `provider` counts against the provider.
enum class job_fault : std::uint8_t {
  none,      ///< the job completed
  provider,  ///< the provider dropped, stalled or erred
  platform,  ///< the platform failed (never counts against the provider)
  client,    ///< the client cancelled or disconnected (never counts against the provider)
  request,   ///< the provider's backend refused the request itself (never counts against the provider)
  declined,  ///< the provider declined the offer without trying it, e.g. at capacity (never counts)
};

struct provider_options {
  scoring_options scoring;
  /// Most models one provider may advertise at once. Default: 64.
  std::uint32_t models_advertised_max = 64;
  /// Most jobs one offer may serve at once. Default: 256.
  std::uint32_t offer_concurrency_max = 256;
  /// Highest input or output price of an offer, micro-USD per million tokens. Routing prefers an
  /// idle provider over a cheap one, and a premium job is quoted at the highest online price, so an
  /// absurd price would be paid out of the free tier's subsidy or refuse every premium job of its
  /// model. Default: 1,000 USD per million tokens (above any model's list price).
  std::int64_t price_micros_per_mtok_max = 1'000'000'000;
  /// Largest context window an offer may claim, tokens. The gateway checks prompts against the
  /// largest window online for the model and bounds answers by it, so one absurd claim would turn
  /// the check off for everyone. Default: 16 Mi (the largest models' windows are 10 million).
  std::uint32_t context_length_tokens_max = 16'777'216;
};

struct provider {
  /// One advertised model, as the state keeps it (a copy of events::model_offer).
  struct offer {
    std::string model_name;
    std::uint32_t context_length_tokens = 0;
    std::string quantisation;
    std::int64_t input_price_micros_per_mtok = 0;
    std::int64_t output_price_micros_per_mtok = 0;
    std::uint32_t max_concurrency = 0;

    bool operator==(const offer&) const = default;
  };

  struct suspicion {
    std::uint32_t unreasonably_fast_jobs = 0;
    std::uint32_t aborted_jobs = 0;
    std::uint32_t token_count_mismatches = 0;

    bool operator==(const suspicion&) const = default;
  };

  struct state {
    bool exists = false;
    std::string provider_id;
    std::string owner_user_id;
    std::string name;
    std::vector<std::uint8_t> token_hash;  ///< SHA-256 of the link token (32 bytes)
    std::int64_t created_at_us = 0;

    bool online = false;
    std::int64_t connected_at_us = 0;      ///< start of the current connection
    std::int64_t online_us_total = 0;      ///< length of all closed connections
    std::vector<offer> offers;             ///< what the current connection advertised

    std::int64_t score = 0;
    events::provider_level level = events::provider_level::bronze;
    std::uint64_t jobs_succeeded = 0;
    std::uint64_t jobs_failed = 0;         ///< failures the provider caused
    std::uint64_t fast_jobs = 0;
    std::uint64_t successes_in_a_row = 0;
    std::set<events::achievement_kind> achievements;

    suspicion counters;                    ///< restart at 0 after each suspension
    /// Jobs ended (succeeded + failed) when the latest suspicion was recorded.
    std::uint64_t jobs_at_suspicion = 0;
    std::uint32_t suspensions = 0;
    std::int64_t suspended_until_at_us = 0;

    bool operator==(const state&) const = default;
  };

  struct create {
    std::string provider_id;
    std::string owner_user_id;
    std::string name;
    events::sha256_digest token_hash{};
  };
  /// The link's hello. While suspended the provider cannot connect; a connect while online
  /// replaces the old link (disconnected with `replaced`, then connected).
  struct connect {
    std::vector<events::gpu_info> gpus;
    events::backend_kind backend = events::backend_kind::openai;
    std::string backend_url;
    std::string agent_version;
  };
  /// Replaces every earlier offer; needs a connection.
  struct advertise {
    std::vector<events::model_offer> models;
  };
  struct disconnect {
    events::disconnect_reason reason = events::disconnect_reason::going_offline;
    std::string detail;
  };
  /// How one job the provider was assigned ended, with what the platform measured.
  struct record_job_outcome {
    std::string job_id;
    job_fault fault = job_fault::none;
    job_measure measure;
    /// The user whose job it was (empty: not known). A job of the provider's own owner earns no
    /// points and counts toward no achievement: an owner sending work to their own GPU would
    /// otherwise buy their way up the levels, and with them queue priority. Its faults and
    /// suspicions count as any job's.
    std::string requested_by{};
  };
  /// A heartbeat tick: unlocks `hour_of_uptime` once the current connection is long enough.
  struct check_uptime {};
  /// A new link token (the old one was lost or leaked); the same one again changes nothing.
  struct replace_token {
    events::sha256_digest token_hash{};
  };

  using command = std::variant<create, connect, advertise, disconnect, record_job_outcome,
                               check_uptime, replace_token>;

  static constexpr std::uint32_t snapshot_version = 2;  // 2: jobs_at_suspicion

  [[nodiscard]] static state evolve(state current, const events::event& event);
  [[nodiscard]] static decision decide(const state& current, const command& command,
                                       std::int64_t now_us);
  [[nodiscard]] static decision decide(const state& current, const command& command,
                                       std::int64_t now_us, const provider_options& options);
};

static_assert(aggregate<provider>);

/// Whether the provider is suspended at `now_us`.
[[nodiscard]] bool is_suspended(const provider::state& state, std::int64_t now_us) noexcept;

/// Length of the current connection at `now_us` (0 when offline).
[[nodiscard]] std::int64_t connected_for_us(const provider::state& state,
                                            std::int64_t now_us) noexcept;

template <class Inspector>
auto inspect(Inspector& f, provider::offer& x) {
  return f(x.model_name, x.context_length_tokens, x.quantisation, x.input_price_micros_per_mtok,
           x.output_price_micros_per_mtok, x.max_concurrency);
}

template <class Inspector>
auto inspect(Inspector& f, provider::suspicion& x) {
  return f(x.unreasonably_fast_jobs, x.aborted_jobs, x.token_count_mismatches);
}

template <class Inspector>
auto inspect(Inspector& f, provider::state& x) {
  return f(x.exists, x.provider_id, x.owner_user_id, x.name, x.token_hash, x.created_at_us,
           x.online, x.connected_at_us, x.online_us_total, x.offers, x.score, x.level,
           x.jobs_succeeded, x.jobs_failed, x.fast_jobs, x.successes_in_a_row, x.achievements,
           x.counters, x.jobs_at_suspicion, x.suspensions, x.suspended_until_at_us);
}

}  // namespace gpustream::domain
