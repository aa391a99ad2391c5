#include "domain/pricing.hpp"

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "base/ensure.hpp"

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

/// The transfers of a settled job, zero amounts left out: the last attempt's provider, then the
/// earlier ones', then the ad.
record_transfers job_group(const job_bill& bill, const job_settlement& amounts,
                           const std::vector<provider_part>& earlier) {
  const std::string group_id = "job-" + bill.job_id;
  record_transfers group{group_id, {}};
  std::int64_t earlier_gross = 0;
  std::int64_t earlier_fee = 0;
  for (const auto& part : earlier) {
    earlier_gross += part.gross_micros;
    earlier_fee += part.fee_micros;
  }
  add_part(group, bill,
           {bill.provider_id, amounts.gross_micros - earlier_gross, amounts.platform_fee_micros - earlier_fee}, "");
  for (std::size_t n = 0; n < earlier.size(); ++n) add_part(group, bill, earlier[n], "/" + std::to_string(n + 1));
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
  if (price.input_micros_per_mtok < 0 || price.output_micros_per_mtok < 0) {
    return refuse(errc::invalid_argument,
                  "prices must not be negative (input " +
                      std::to_string(price.input_micros_per_mtok) + ", output " +
                      std::to_string(price.output_micros_per_mtok) +
                      " micro-USD per million tokens)");
  }
  const auto rule = rule_of(options, tier);
  if (!rule) return unexpected{rule.error()};
  // Bounds: tokens < 2^32, prices < 2^63 and the multiplier <= 10^4 < 2^14, so the product stays
  // below 2^(32+63+1+14) = 2^110, well inside 128 bits.
  const __int128 exact = (__int128{prompt_tokens} * price.input_micros_per_mtok +
                          __int128{completion_tokens} * price.output_micros_per_mtok) *
                         rule->multiplier_percent;
  const __int128 rounded_up = (exact + cost_divisor - 1) / cost_divisor;
  if (rounded_up > std::numeric_limits<std::int64_t>::max()) {
    return refuse(errc::limit_exceeded,
                  "the price of " + std::to_string(prompt_tokens) + " prompt and " +
                      std::to_string(completion_tokens) +
                      " completion tokens exceeds the largest amount the ledger holds");
  }
  return static_cast<std::int64_t>(rounded_up);
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

expected<job_settlement, error> settle_job(const job_bill& bill, const pricing_options& options) {
  if (auto valid = validate(options); !valid) return unexpected{valid.error()};
  if (auto valid = validate_bill(bill); !valid) return unexpected{valid.error()};
  const auto rule = rule_of(options, bill.quality);
  if (!rule) return unexpected{rule.error()};
  const auto [prompt, completion] = billed_tokens(bill);
  // Each earlier attempt's tokens, never more than are billed in all.
  std::vector<std::uint32_t> earlier_tokens;
  std::uint32_t counted = 0;
  for (const auto& part : bill.earlier) {
    if (part.provider_id.empty()) {
      return refuse(errc::invalid_argument, "an earlier attempt of job " + bill.job_id + " has no provider to pay");
    }
    if (part.price.output_micros_per_mtok < 0) {
      return refuse(errc::invalid_argument, "an earlier attempt of job " + bill.job_id + " has a negative price");
    }
    earlier_tokens.push_back(std::min(part.completion_tokens, completion - counted));
    counted += earlier_tokens.back();
  }
  // The last attempt: the prompt and the tokens after the earlier ones', at its price.
  const auto last = cost_micros(bill.price, bill.quality, prompt, completion - counted, options);
  if (!last) return unexpected{last.error()};
  // The whole, rounded up once (as one provider's bill is); the earlier parts rounded down, the
  // last attempt's part being the rest.
  std::int64_t gross = *last;
  std::vector<provider_part> earlier;
  std::int64_t earlier_gross = 0;
  if (!bill.earlier.empty()) {
    __int128 exact = (__int128{prompt} * bill.price.input_micros_per_mtok +
                      __int128{completion - counted} * bill.price.output_micros_per_mtok) *
                     rule->multiplier_percent;
    std::vector<__int128> parts;
    for (std::size_t i = 0; i < bill.earlier.size(); ++i) {
      parts.push_back(__int128{earlier_tokens[i]} * bill.earlier[i].price.output_micros_per_mtok *
                      rule->multiplier_percent);
      exact += parts.back();
    }
    const __int128 rounded_up = (exact + cost_divisor - 1) / cost_divisor;
    if (rounded_up > std::numeric_limits<std::int64_t>::max()) {
      return refuse(errc::limit_exceeded,
                    "the price of job " + bill.job_id + " exceeds the largest amount the ledger holds");
    }
    gross = static_cast<std::int64_t>(rounded_up);
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const auto share = static_cast<std::int64_t>(parts[i] / cost_divisor);  // <= gross: it fits
      earlier.push_back({bill.earlier[i].provider_id, share, platform_fee_micros(share, options)});
      earlier_gross += share;
    }
  }
  GPUSTREAM_ENSURE(gross >= earlier_gross);  // the whole rounded up holds the parts rounded down

  job_settlement settlement;
  settlement.gross_micros = gross;
  settlement.platform_fee_micros = platform_fee_micros(gross - earlier_gross, options);
  for (const auto& part : earlier) settlement.platform_fee_micros += part.fee_micros;
  settlement.provider_net_micros = gross - settlement.platform_fee_micros;
  if (bill.ad && bill.outcome != job_outcome::failed) settlement.ad_micros = bill.ad->price_micros;
  settlement.group = job_group(bill, settlement, earlier);
  return settlement;
}

}  // namespace gpustream::domain
