#pragma once
/// What a job costs and who pays whom for it, in integer micro-USD.
///
/// Prices are set by providers per model in micro-USD per million tokens (events::model_offer).
/// A job's quality tier multiplies the price and needs a minimum provider level. The platform
/// takes a fee in basis points of the gross price.
///
/// The one rounding rule: a job's gross price is computed exactly in 128-bit integers and rounded
/// UP once, at the end, to whole micro-USD:
///   gross = ceil((prompt * input_price + completion * output_price) * multiplier_percent
///                / (1'000'000 * 100))
/// and the platform fee is rounded DOWN: fee = floor(gross * fee_bps / 10'000), so any rounding
/// micro goes to the provider, never to the platform. provider_net = gross - fee. After a failover
/// each provider's part of the gross is its own, and the fee is taken (and rounded down) part by
/// part, so the fees may add up to a few micros less than that of the whole gross.
///
/// Who pays (job_settlement, one linked ledger group "job-<id>"):
///   premium: user-<u> -> provider-<p> (usage, gross), provider-<p> -> platform (platform_fee)
///   free:    subsidy  -> provider-<p> (free_tier_subsidy, gross), provider-<p> -> platform (fee)
///   an ad served with a free answer: campaign-<c> -> platform (ad_spend, impression price)
/// Transfer ids are "job-<id>/usage", "job-<id>/free_tier_subsidy", "job-<id>/platform_fee" and
/// "job-<id>/ad_spend", so a retried settlement is applied once. Zero amounts are left out.

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "domain/ledger.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Highest platform fee: all of the gross price.
inline constexpr std::int64_t platform_fee_bps_max = 10'000;

/// Highest quality-tier multiplier, percent (100x the provider's price).
inline constexpr std::int64_t tier_multiplier_percent_max = 10'000;

/// What a quality tier costs and who may serve it.
struct tier_rule {
  std::int64_t multiplier_percent = 100;  ///< applied to the provider's prices; 1 .. max
  events::provider_level level_min = events::provider_level::unverified;  ///< lowest level allowed

  bool operator==(const tier_rule&) const = default;
};

struct pricing_options {
  /// The platform's share of a job's gross price, in basis points (1/100 of a percent),
  /// 0 .. platform_fee_bps_max. Default: 1000 (10%).
  std::int64_t platform_fee_bps = 1000;

  /// Per quality tier, indexed by events::quality_tier. Defaults: low 50% from unverified,
  /// standard 100% from bronze, high 150% from silver, ultra 200% from gold.
  std::array<tier_rule, 4> tiers = {{
      {50, events::provider_level::unverified},
      {100, events::provider_level::bronze},
      {150, events::provider_level::silver},
      {200, events::provider_level::gold},
  }};
};

/// Refuses (invalid_argument) a fee outside 0 .. platform_fee_bps_max or a multiplier outside
/// 1 .. tier_multiplier_percent_max, naming the value.
[[nodiscard]] expected<void, error> validate(const pricing_options& options);

/// The rule of `tier`; refuses (invalid_argument) a tier value outside the enum (e.g. decoded
/// from a newer client).
[[nodiscard]] expected<tier_rule, error> rule_of(const pricing_options& options,
                                                 events::quality_tier tier);

/// Whether a provider of `level` may serve jobs of `tier` (false for an unknown tier).
[[nodiscard]] bool may_serve(const pricing_options& options, events::provider_level level,
                             events::quality_tier tier) noexcept;

/// One model's prices at one provider, micro-USD per million tokens; both >= 0.
struct model_price {
  std::int64_t input_micros_per_mtok = 0;
  std::int64_t output_micros_per_mtok = 0;

  bool operator==(const model_price&) const = default;
};

[[nodiscard]] model_price price_of(const events::model_offer& offer) noexcept;

/// The gross price of `prompt_tokens` + `completion_tokens` at `tier`, rounded up once to whole
/// micro-USD (see the top of this file). Refuses a negative price or unknown tier
/// (invalid_argument) and a price beyond int64 micro-USD (limit_exceeded); never overflows.
[[nodiscard]] expected<std::int64_t, error> cost_micros(const model_price& price,
                                                        events::quality_tier tier,
                                                        std::uint32_t prompt_tokens,
                                                        std::uint32_t completion_tokens,
                                                        const pricing_options& options);

/// The most a job can cost: its prompt plus max_tokens of completion. Premium jobs are quoted
/// before they run and refused when the quote exceeds the user's balance (check_affordable).
[[nodiscard]] expected<std::int64_t, error> quote_max_micros(const model_price& price,
                                                             events::quality_tier tier,
                                                             std::uint32_t prompt_tokens,
                                                             std::uint32_t max_tokens,
                                                             const pricing_options& options);

/// Refuses (insufficient_funds) a premium job whose quote exceeds the user's prepaid balance,
/// naming both amounts.
[[nodiscard]] expected<void, error> check_affordable(std::string_view job_id,
                                                     std::int64_t quote_micros,
                                                     std::int64_t balance_micros);

/// floor(gross * fee_bps / 10'000): the provider keeps the rounding micro. gross >= 0.
[[nodiscard]] std::int64_t platform_fee_micros(std::int64_t gross_micros,
                                               const pricing_options& options);

enum class job_outcome : std::uint8_t {
  completed,  ///< bill every token
  cancelled,  ///< bill the prompt and the completion tokens produced before the cancel
  failed,     ///< bill nothing
};

/// An ad served with a free-tier answer, charged to its campaign.
struct ad_charge {
  std::string impression_id;
  std::string campaign_id;
  std::int64_t price_micros = 0;  ///< the impression's (second) price; >= 0
};

/// Completion tokens an earlier attempt of the job produced on another provider before the answer
/// failed over (the rest of the answer continued from them): that provider is paid for them at
/// its own price. The prompt is billed once, with the last attempt.
struct earlier_part {
  std::string provider_id;
  model_price price;
  std::uint32_t completion_tokens = 0;

  bool operator==(const earlier_part&) const = default;
};

/// Everything settling one job needs.
struct job_bill {
  std::string job_id;
  std::string user_id;  ///< who pays when premium; may be empty for a free job
  std::string provider_id;
  bool premium = false;
  job_outcome outcome = job_outcome::completed;
  model_price price;
  events::quality_tier quality = events::quality_tier::standard;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;  ///< for a cancelled job: events::job_cancelled::tokens_produced
  std::optional<ad_charge> ad;          ///< free tier only
  /// The attempts before the last that produced tokens, in order; provider_id and price above
  /// are the last attempt's, which is billed the prompt and the tokens after theirs.
  std::vector<earlier_part> earlier{};
};

/// The amounts of a settled job and the ledger group that moves them.
struct job_settlement {
  std::int64_t gross_micros = 0;         ///< paid by the user (premium) or the subsidy (free)
  std::int64_t platform_fee_micros = 0;  ///< kept by the platform
  std::int64_t provider_net_micros = 0;  ///< gross - fee: what the providers earn
  std::int64_t ad_micros = 0;            ///< charged to the campaign
  /// Group "job-<id>". No transfers (a failed job, or only zero amounts) means nothing to record:
  /// do not send it to the ledger, which refuses an empty group.
  record_transfers group;
};

/// What is left of a premium job's hold for the rest of its answer after a failover: the hold less
/// what its earlier attempts' tokens cost together (rounded up), never below 0. A provider whose
/// quote for the prompt and the tokens still allowed (max_tokens less those produced) is at most
/// this keeps the job's whole bill within its hold, since settle_job rounds the whole up once.
/// Refuses what cost_micros refuses.
[[nodiscard]] expected<std::int64_t, error> hold_left_micros(std::int64_t hold_micros,
                                                             const std::vector<earlier_part>& earlier,
                                                             events::quality_tier tier,
                                                             const pricing_options& options);

/// Prices a job and builds its ledger group (see the top of this file). A job that failed over
/// mid-answer pays each earlier provider its own tokens at its own price (rounded down, transfers
/// "…/usage/<n>" or "…/free_tier_subsidy/<n>" and "…/platform_fee/<n>", n from 1), and the last
/// one the rest: the whole is rounded up once, as one provider's bill is. Refuses (invalid_argument)
/// an empty job or provider id, a premium job without a user id, an ad on a premium job, an ad
/// without ids or with a negative price, and whatever cost_micros refuses. A failed job yields
/// no transfers and no ad charge.
[[nodiscard]] expected<job_settlement, error> settle_job(const job_bill& bill,
                                                         const pricing_options& options);

}  // namespace gpustream::domain
