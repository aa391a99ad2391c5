#include "domain/pricing.hpp"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "base/ensure.hpp"
#include "domain/job.hpp"

namespace gpustream::domain {
namespace {

using events::quality_tier;
using events::transfer_kind;

/// Tokens per price unit (prices are per million tokens) times percent.
constexpr __int128 cost_divisor = __int128{1'000'000} * 100;

std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

std::size_t tier_index(quality_tier tier) { return static_cast<std::size_t>(tier); }

expected<void, error> validate_bill(const job_bill& bill) {
  if (bill.job_id.empty()) return refuse(errc::invalid_argument, "a job bill needs a job id");
  if (bill.provider_id.empty()) {
    return refuse(errc::invalid_argument, "job " + bill.job_id + " has no provider to pay");
  }
  if (bill.premium && bill.user_id.empty()) {
    return refuse(errc::invalid_argument, "premium job " + bill.job_id + " has no user to charge");
  }
  if (!bill.ad) return {};
  if (bill.premium) {
    return refuse(errc::invalid_argument, "premium job " + bill.job_id +
                                              " carries an ad; premium users never see ads");
  }
  if (bill.ad->impression_id.empty() || bill.ad->campaign_id.empty()) {
    return refuse(errc::invalid_argument,
                  "the ad of job " + bill.job_id + " lacks its impression or campaign id");
  }
  if (bill.ad->price_micros < 0) {
    return refuse(errc::invalid_argument, "the ad of job " + bill.job_id + " has a negative price (" +
                                              micros(bill.ad->price_micros) + ")");
  }
  return {};
}

/// The tokens that are billed for an outcome, as (prompt, completion).
std::pair<std::uint32_t, std::uint32_t> billed_tokens(const job_bill& bill) {
  if (bill.outcome == job_outcome::failed) return {0, 0};
  return {bill.prompt_tokens, bill.completion_tokens};
}

/// Refuses a negative price, naming both of its numbers.
expected<void, error> check_price(const model_price& price) {
  if (price.input_micros_per_mtok >= 0 && price.output_micros_per_mtok >= 0) return {};
  return refuse(errc::invalid_argument, "prices must not be negative (input " +
                                            std::to_string(price.input_micros_per_mtok) + ", output " +
                                            std::to_string(price.output_micros_per_mtok) +
                                            " micro-USD per million tokens)");
}

/// (prompt × input price + completion × output price) × multiplier: a cost in units of
/// 1/cost_divisor micro-USD. Tokens < 2^32, prices < 2^63 and the multiplier <= 10^4 < 2^14 keep
/// it below 2^(32+63+1+14) = 2^110, and a bill's parts, whose tokens add up to one bill's, too.
__int128 exact_cost(const model_price& price, std::uint32_t prompt_tokens, std::uint32_t completion_tokens,
                    std::int64_t multiplier_percent) {
  return (__int128{prompt_tokens} * price.input_micros_per_mtok +
          __int128{completion_tokens} * price.output_micros_per_mtok) *
         multiplier_percent;
}

/// `exact` rounded up to a micro, or limit_exceeded when the ledger cannot hold it.
expected<std::int64_t, error> rounded_up_micros(__int128 exact, std::uint32_t prompt_tokens,
                                                std::uint32_t completion_tokens) {
  const __int128 rounded_up = (exact + cost_divisor - 1) / cost_divisor;
  if (rounded_up > std::numeric_limits<std::int64_t>::max()) {
    return refuse(errc::limit_exceeded,
                  "the price of " + std::to_string(prompt_tokens) + " prompt and " + std::to_string(completion_tokens) +
                      " completion tokens exceeds the largest amount the ledger holds");
  }
  return static_cast<std::int64_t>(rounded_up);
}

/// The exact cost of each earlier attempt's tokens at its own price (exact_cost), counting at most
/// `tokens_max` tokens over all of them, in order; `counted` gets how many were. Refuses an
/// earlier part without a provider or with a negative price.
expected<std::vector<__int128>, error> earlier_costs(const std::vector<earlier_part>& earlier, std::uint32_t tokens_max,
                                                     std::int64_t multiplier_percent, std::uint32_t& counted) {
  std::vector<__int128> costs;
  costs.reserve(earlier.size());
  counted = 0;
  for (const auto& part : earlier) {
    if (part.provider_id.empty()) return refuse(errc::invalid_argument, "an earlier attempt has no provider to pay");
    if (auto valid = check_price(part.price); !valid) return unexpected{valid.error()};
    const std::uint32_t tokens = std::min(part.completion_tokens, tokens_max - counted);
    counted += tokens;
    costs.push_back(exact_cost(part.price, 0, tokens, multiplier_percent));
  }
  return costs;
}

/// One provider's part of a job's bill.
struct provider_part {
  std::string provider_id;
  std::int64_t gross_micros = 0;
  std::int64_t fee_micros = 0;
};

/// The transfers of one provider's part: paid by the user (premium) or the subsidy, less the
/// platform's fee; `suffix` tells an earlier attempt's transfers apart ("" for the last one's).
void add_part(record_transfers& group, const job_bill& bill, const provider_part& part, const std::string& suffix) {
  const std::string& group_id = group.group_id;
  const std::string provider = provider_account(part.provider_id);
  if (part.gross_micros > 0) {
    if (bill.premium) {
      group.transfers.push_back(transfer{group_id + "/usage" + suffix, user_account(bill.user_id), provider,
                                         part.gross_micros, transfer_kind::usage, bill.job_id});
    } else {
      group.transfers.push_back(transfer{group_id + "/free_tier_subsidy" + suffix, std::string(subsidy_account),
                                         provider, part.gross_micros, transfer_kind::free_tier_subsidy, bill.job_id});
    }
  }
  if (part.fee_micros > 0) {
    group.transfers.push_back(transfer{group_id + "/platform_fee" + suffix, provider, std::string(platform_account),
                                       part.fee_micros, transfer_kind::platform_fee, bill.job_id});
  }
}

/// The transfers of a settled job, zero amounts left out: each provider's part (the last
/// attempt's first, then the earlier ones'), then the ad.
record_transfers job_group(const job_bill& bill, const job_settlement& amounts,
                           const std::vector<provider_part>& parts) {
  record_transfers group{"job-" + bill.job_id, {}};
  const std::string& group_id = group.group_id;
  for (std::size_t n = 0; n < parts.size(); ++n) {
    add_part(group, bill, parts[n], n == 0 ? std::string() : "/" + std::to_string(n));
  }
  if (amounts.ad_micros > 0) {
    group.transfers.push_back(transfer{group_id + "/ad_spend", campaign_account(bill.ad->campaign_id),
                                       std::string(platform_account), amounts.ad_micros,
                                       transfer_kind::ad_spend, bill.ad->impression_id});
  }
  return group;
}

}  // namespace

expected<void, error> validate(const pricing_options& options) {
  if (options.platform_fee_bps < 0 || options.platform_fee_bps > platform_fee_bps_max) {
    return refuse(errc::invalid_argument,
                  "platform_fee_bps is " + std::to_string(options.platform_fee_bps) +
                      "; it must lie in 0 .. " + std::to_string(platform_fee_bps_max));
  }
  for (std::size_t i = 0; i < options.tiers.size(); ++i) {
    const auto multiplier = options.tiers[i].multiplier_percent;
    if (multiplier < 1 || multiplier > tier_multiplier_percent_max) {
      return refuse(errc::invalid_argument,
                    "quality tier " + std::to_string(i) + " has multiplier " +
                        std::to_string(multiplier) + "%; it must lie in 1 .. " +
                        std::to_string(tier_multiplier_percent_max) + "%");
    }
  }
  return {};
}

expected<tier_rule, error> rule_of(const pricing_options& options, quality_tier tier) {
  if (tier_index(tier) >= options.tiers.size()) {
    return refuse(errc::invalid_argument,
                  "unknown quality tier " + std::to_string(tier_index(tier)) +
                      "; known tiers are low, standard, high and ultra");
  }
  return options.tiers[tier_index(tier)];
}

bool may_serve(const pricing_options& options, events::provider_level level,
               quality_tier tier) noexcept {
  if (tier_index(tier) >= options.tiers.size()) return false;
  return level >= options.tiers[tier_index(tier)].level_min;
}

model_price price_of(const events::model_offer& offer) noexcept {
  return {offer.input_price_micros_per_mtok, offer.output_price_micros_per_mtok};
}

expected<std::int64_t, error> cost_micros(const model_price& price, quality_tier tier,
                                          std::uint32_t prompt_tokens,
                                          std::uint32_t completion_tokens,
                                          const pricing_options& options) {
  if (auto valid = check_price(price); !valid) return unexpected{valid.error()};
  const auto rule = rule_of(options, tier);
  if (!rule) return unexpected{rule.error()};
  return rounded_up_micros(exact_cost(price, prompt_tokens, completion_tokens, rule->multiplier_percent),
                           prompt_tokens, completion_tokens);
}

expected<std::int64_t, error> quote_max_micros(const model_price& price, quality_tier tier,
                                               std::uint32_t prompt_tokens,
                                               std::uint32_t max_tokens,
                                               const pricing_options& options) {
  return cost_micros(price, tier, prompt_tokens, max_tokens, options);
}

expected<void, error> check_affordable(std::string_view job_id, std::int64_t quote_micros,
                                       std::int64_t balance_micros) {
  if (quote_micros > balance_micros) {
    return refuse(errc::insufficient_funds,
                  "job " + std::string(job_id) + " may cost up to " + micros(quote_micros) +
                      " but the prepaid balance is " + micros(balance_micros) +
                      "; add funds or lower max_tokens");
  }
  return {};
}

std::int64_t platform_fee_micros(std::int64_t gross_micros, const pricing_options& options) {
  GPUSTREAM_ENSURE(gross_micros >= 0);
  GPUSTREAM_ENSURE(options.platform_fee_bps >= 0);
  GPUSTREAM_ENSURE(options.platform_fee_bps <= platform_fee_bps_max);
  // The fee is at most the gross, so the quotient fits in an int64.
  return static_cast<std::int64_t>(__int128{gross_micros} * options.platform_fee_bps /
                                   platform_fee_bps_max);
}

expected<std::int64_t, error> hold_left_micros(std::int64_t hold_micros, const std::vector<earlier_part>& earlier,
                                               quality_tier tier, const pricing_options& options) {
  const auto rule = rule_of(options, tier);
  if (!rule) return unexpected{rule.error()};
  std::uint32_t tokens = 0;
  const auto costs =
      earlier_costs(earlier, std::numeric_limits<std::uint32_t>::max(), rule->multiplier_percent, tokens);
  if (!costs) return unexpected{costs.error()};
  __int128 spent = 0;
  for (const auto cost : *costs) spent += cost;
  const auto spent_micros = rounded_up_micros(spent, 0, tokens);
  if (!spent_micros) return unexpected{spent_micros.error()};
  return std::max<std::int64_t>(hold_micros - *spent_micros, 0);
}

// A bill holds two transfers per attempt that produced tokens (its pay and the fee) and one for
// the ad, in one ledger group: as many attempts as a job may have must fit, or such a bill would be
// refused for good.
static_assert(2 * job_options{}.attempts_max + 1 <= transfers_per_group_max);

expected<job_settlement, error> settle_job(const job_bill& bill, const pricing_options& options) {
  if (auto valid = validate(options); !valid) return unexpected{valid.error()};
  if (auto valid = validate_bill(bill); !valid) return unexpected{valid.error()};
  if (auto valid = check_price(bill.price); !valid) return unexpected{valid.error()};
  const auto rule = rule_of(options, bill.quality);
  if (!rule) return unexpected{rule.error()};
  const auto [prompt, completion] = billed_tokens(bill);
  // Each earlier attempt is paid its own tokens (never more than are billed in all) at its own
  // price, rounded down; the whole is rounded up once, as one provider's bill is, and the last
  // attempt's part, the prompt and the tokens after theirs, is the rest.
  std::uint32_t counted = 0;
  const auto earlier_exact = earlier_costs(bill.earlier, completion, rule->multiplier_percent, counted);
  if (!earlier_exact) return refuse(earlier_exact.error().code, "job " + bill.job_id + ": " + earlier_exact.error().message);
  __int128 whole = exact_cost(bill.price, prompt, completion - counted, rule->multiplier_percent);
  for (const auto cost : *earlier_exact) whole += cost;
  const auto gross = rounded_up_micros(whole, prompt, completion);
  if (!gross) return unexpected{gross.error()};

  std::vector<provider_part> parts{{bill.provider_id, *gross, 0}};  // the last attempt's: the rest
  for (std::size_t i = 0; i < bill.earlier.size(); ++i) {
    const auto share = static_cast<std::int64_t>((*earlier_exact)[i] / cost_divisor);  // <= gross: it fits
    parts.push_back({bill.earlier[i].provider_id, share, 0});
    parts.front().gross_micros -= share;
  }
  job_settlement settlement;
  settlement.gross_micros = *gross;
  for (auto& part : parts) {
    part.fee_micros = platform_fee_micros(part.gross_micros, options);
    settlement.platform_fee_micros += part.fee_micros;
  }
  settlement.provider_net_micros = *gross - settlement.platform_fee_micros;
  if (bill.ad && bill.outcome != job_outcome::failed) settlement.ad_micros = bill.ad->price_micros;
  settlement.group = job_group(bill, settlement, parts);
  return settlement;
}

}  // namespace gpustream::domain
