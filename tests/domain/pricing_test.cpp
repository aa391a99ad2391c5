// Pricing: quality tiers, the one rounding rule, overflow-free cost, the platform fee, quotes, and
// the ledger groups that settle premium, free, cancelled and failed jobs.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <random>
#include <string>

#include "domain/ledger.hpp"
#include "domain/pricing.hpp"

namespace gpustream::domain {
namespace {

using events::provider_level;
using events::quality_tier;
using events::transfer_kind;

constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();
constexpr std::uint32_t uint32_max = std::numeric_limits<std::uint32_t>::max();

const pricing_options defaults{};

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

std::int64_t cost(const model_price& price, quality_tier tier, std::uint32_t prompt,
                  std::uint32_t completion, const pricing_options& options = defaults) {
  const auto c = cost_micros(price, tier, prompt, completion, options);
  EXPECT_TRUE(c.has_value()) << c.error().message;
  return c.has_value() ? *c : -1;
}

// ---------------------------------------------------------------------------------------------
// Tiers and options.

TEST(pricing_tiers, default_table_has_the_documented_multipliers_and_levels) {
  const std::pair<quality_tier, tier_rule> expected[] = {
      {quality_tier::low, {50, provider_level::unverified}},
      {quality_tier::standard, {100, provider_level::bronze}},
      {quality_tier::high, {150, provider_level::silver}},
      {quality_tier::ultra, {200, provider_level::gold}},
  };
  for (const auto& [tier, rule] : expected) {
    const auto found = rule_of(defaults, tier);
    ASSERT_TRUE(found.has_value());
    EXPECT_EQ(*found, rule);
  }
  EXPECT_EQ(defaults.platform_fee_bps, 1000);
  EXPECT_TRUE(validate(defaults).has_value());
}

TEST(pricing_tiers, a_provider_serves_tiers_up_to_its_level) {
  EXPECT_TRUE(may_serve(defaults, provider_level::unverified, quality_tier::low));
  EXPECT_FALSE(may_serve(defaults, provider_level::unverified, quality_tier::standard));
  EXPECT_TRUE(may_serve(defaults, provider_level::bronze, quality_tier::standard));
  EXPECT_FALSE(may_serve(defaults, provider_level::bronze, quality_tier::high));
  EXPECT_TRUE(may_serve(defaults, provider_level::silver, quality_tier::high));
  EXPECT_FALSE(may_serve(defaults, provider_level::silver, quality_tier::ultra));
  EXPECT_TRUE(may_serve(defaults, provider_level::gold, quality_tier::ultra));
  EXPECT_TRUE(may_serve(defaults, provider_level::master, quality_tier::ultra));
  EXPECT_FALSE(may_serve(defaults, provider_level::master, static_cast<quality_tier>(4)));
}

TEST(pricing_tiers, an_unknown_tier_is_refused) {
  const auto rule = rule_of(defaults, static_cast<quality_tier>(9));
  ASSERT_FALSE(rule.has_value());
  EXPECT_EQ(rule.error().code, errc::invalid_argument);
  EXPECT_TRUE(contains(rule.error().message, "unknown quality tier 9"));
  const auto c = cost_micros({1, 1}, static_cast<quality_tier>(9), 1, 1, defaults);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().code, errc::invalid_argument);
}

TEST(pricing_options_limits, fee_and_multipliers_are_bounded) {
  auto options = defaults;
  options.platform_fee_bps = platform_fee_bps_max;
  EXPECT_TRUE(validate(options).has_value());
  options.platform_fee_bps = platform_fee_bps_max + 1;
  auto refused = validate(options);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::invalid_argument);
  EXPECT_TRUE(contains(refused.error().message, "10001"));
  options.platform_fee_bps = -1;
  EXPECT_FALSE(validate(options).has_value());

  options = defaults;
  options.tiers[3].multiplier_percent = tier_multiplier_percent_max;
  EXPECT_TRUE(validate(options).has_value());
  options.tiers[3].multiplier_percent = tier_multiplier_percent_max + 1;
  refused = validate(options);
  ASSERT_FALSE(refused.has_value());
  EXPECT_TRUE(contains(refused.error().message, "quality tier 3"));
  options.tiers[0].multiplier_percent = 0;
  EXPECT_FALSE(validate(options).has_value());
}

// ---------------------------------------------------------------------------------------------
// Cost.

TEST(pricing_cost, follows_the_formula_for_each_tier) {
  // 1000 prompt tokens at 0.2 USD/Mtok + 500 completion tokens at 0.6 USD/Mtok = 500 micro-USD.
  const model_price price{200'000, 600'000};
  EXPECT_EQ(cost(price, quality_tier::low, 1000, 500), 250);
  EXPECT_EQ(cost(price, quality_tier::standard, 1000, 500), 500);
  EXPECT_EQ(cost(price, quality_tier::high, 1000, 500), 750);
  EXPECT_EQ(cost(price, quality_tier::ultra, 1000, 500), 1000);
  // A million tokens cost exactly the listed price.
  EXPECT_EQ(cost(price, quality_tier::standard, 1'000'000, 0), 200'000);
  EXPECT_EQ(cost(price, quality_tier::standard, 0, 1'000'000), 600'000);
  EXPECT_EQ(cost(price, quality_tier::standard, 0, 0), 0);
  EXPECT_EQ(cost({0, 0}, quality_tier::ultra, 5000, 5000), 0);
}

TEST(pricing_cost, rounds_up_once_at_the_end) {
  // One token at 1 micro-USD per Mtok is a millionth of a micro: it rounds up to 1.
  EXPECT_EQ(cost({1, 1}, quality_tier::standard, 1, 0), 1);
  // Two such fractions are added before rounding: 1, not 2.
  EXPECT_EQ(cost({1, 1}, quality_tier::standard, 1, 1), 1);
  // Exactly one micro is not rounded further.
  EXPECT_EQ(cost({1, 1}, quality_tier::standard, 1'000'000, 0), 1);
  EXPECT_EQ(cost({1, 1}, quality_tier::standard, 1'000'001, 0), 2);
  // The multiplier applies before rounding: 1.5 micro at high rounds to 2, 0.5 at low to 1.
  EXPECT_EQ(cost({1'000'000, 0}, quality_tier::high, 1, 0), 2);
  EXPECT_EQ(cost({1'000'000, 0}, quality_tier::low, 1, 0), 1);
}

TEST(pricing_cost, the_largest_inputs_do_not_overflow) {
  // Largest token counts at a price where the result still fits: exact to the micro.
  const model_price fits{1'000'000'000, 1'000'000'000};  // 1000 USD per million tokens
  const __int128 exact = (__int128{uint32_max} * 1'000'000'000 * 2) * 200;
  const auto expected = static_cast<std::int64_t>((exact + 99'999'999) / 100'000'000);
  EXPECT_EQ(cost(fits, quality_tier::ultra, uint32_max, uint32_max), expected);
  // Past int64: refused, never wrapped.
  const auto too_much = cost_micros({int64_max, int64_max}, quality_tier::ultra, uint32_max,
                                    uint32_max, defaults);
  ASSERT_FALSE(too_much.has_value());
  EXPECT_EQ(too_much.error().code, errc::limit_exceeded);
  EXPECT_TRUE(contains(too_much.error().message, std::to_string(uint32_max)));
  // At the multiplier limit too.
  auto options = defaults;
  options.tiers[0].multiplier_percent = tier_multiplier_percent_max;
  EXPECT_FALSE(cost_micros({int64_max, int64_max}, quality_tier::low, uint32_max, uint32_max,
                           options)
                   .has_value());
  // The largest representable cost is accepted: 10^8 micro-USD per token at 100%.
  EXPECT_EQ(cost({int64_max, 0}, quality_tier::standard, 1'000'000, 0), int64_max);
}

TEST(pricing_cost, negative_prices_are_refused) {
  const auto c = cost_micros({-1, 5}, quality_tier::standard, 1, 1, defaults);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().code, errc::invalid_argument);
  EXPECT_TRUE(contains(c.error().message, "input -1"));
  EXPECT_FALSE(cost_micros({5, -1}, quality_tier::standard, 1, 1, defaults).has_value());
}

TEST(pricing_cost, price_of_reads_a_model_offer) {
  events::model_offer offer;
  offer.input_price_micros_per_mtok = 11;
  offer.output_price_micros_per_mtok = 22;
  EXPECT_EQ(price_of(offer), (model_price{11, 22}));
}

std::uint64_t seed_from_env_or_device() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  std::random_device device;
  return (std::uint64_t{device()} << 32) | device();
}

TEST(pricing_cost, random_inputs_round_up_by_less_than_one_micro_and_split_exactly) {
  const auto seed = seed_from_env_or_device();
  std::cout << "pricing seed: " << seed << " (rerun with GPUSTREAM_SEED=" << seed << ")\n";
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::int64_t> price_of_mtok(0, 100'000'000);
  std::uniform_int_distribution<std::uint32_t> tokens(0, 2'000'000);
  std::uniform_int_distribution<int> tier(0, 3);
  std::uniform_int_distribution<std::int64_t> bps(0, platform_fee_bps_max);
  for (int i = 0; i < 10'000; ++i) {
    const model_price price{price_of_mtok(rng), price_of_mtok(rng)};
    const auto t = static_cast<quality_tier>(tier(rng));
    const auto prompt = tokens(rng);
    const auto completion = tokens(rng);
    const auto gross = cost(price, t, prompt, completion);
    const __int128 exact = (__int128{prompt} * price.input_micros_per_mtok +
                            __int128{completion} * price.output_micros_per_mtok) *
                           defaults.tiers[static_cast<std::size_t>(t)].multiplier_percent;
    // gross is the smallest whole micro not below the exact price.
    ASSERT_GE(__int128{gross} * 100'000'000, exact) << i;
    ASSERT_LT(__int128{gross - 1} * 100'000'000, exact) << i;
    auto options = defaults;
    options.platform_fee_bps = bps(rng);
    const auto fee = platform_fee_micros(gross, options);
    ASSERT_GE(fee, 0);
    ASSERT_LE(__int128{fee} * 10'000, __int128{gross} * options.platform_fee_bps) << i;
    ASSERT_GT(__int128{fee + 1} * 10'000, __int128{gross} * options.platform_fee_bps) << i;
  }
}

// ---------------------------------------------------------------------------------------------
// Fee, quote, affordability.

TEST(pricing_fee, rounds_down_so_the_provider_keeps_the_rounding_micro) {
  EXPECT_EQ(platform_fee_micros(999, defaults), 99);  // 99.9 -> 99
  EXPECT_EQ(platform_fee_micros(1000, defaults), 100);
  EXPECT_EQ(platform_fee_micros(9, defaults), 0);
  EXPECT_EQ(platform_fee_micros(0, defaults), 0);
  auto options = defaults;
  options.platform_fee_bps = 0;
  EXPECT_EQ(platform_fee_micros(12345, options), 0);
  options.platform_fee_bps = platform_fee_bps_max;
  EXPECT_EQ(platform_fee_micros(12345, options), 12345);
  EXPECT_EQ(platform_fee_micros(int64_max, options), int64_max);
  options.platform_fee_bps = 1;
  EXPECT_EQ(platform_fee_micros(int64_max, options), int64_max / 10'000);
}

TEST(pricing_quote, is_the_cost_of_the_prompt_and_max_tokens) {
  const model_price price{200'000, 600'000};
  const auto quote = quote_max_micros(price, quality_tier::high, 1000, 2000, defaults);
  ASSERT_TRUE(quote.has_value());
  EXPECT_EQ(*quote, cost(price, quality_tier::high, 1000, 2000));
  EXPECT_EQ(*quote, 2100);  // (200'000'000 + 1'200'000'000) * 150 / 10^8
}

TEST(pricing_quote, a_premium_job_beyond_the_balance_is_refused_before_it_runs) {
  EXPECT_TRUE(check_affordable("j1", 2100, 2100).has_value());
  EXPECT_TRUE(check_affordable("j1", 0, 0).has_value());
  const auto refused = check_affordable("j1", 2101, 2100);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::insufficient_funds);
  EXPECT_TRUE(contains(refused.error().message, "2101 micro-USD"));
  EXPECT_TRUE(contains(refused.error().message, "2100 micro-USD"));
  EXPECT_TRUE(contains(refused.error().message, "j1"));
}

// ---------------------------------------------------------------------------------------------
// Settling jobs.

job_bill premium_bill() {
  job_bill bill;
  bill.job_id = "42";
  bill.user_id = "u1";
  bill.provider_id = "p1";
  bill.premium = true;
  bill.price = {200'000, 600'000};
  bill.quality = quality_tier::standard;
  bill.prompt_tokens = 1000;
  bill.completion_tokens = 1500;  // gross 1100, fee 110
  return bill;
}

job_bill free_bill() {
  auto bill = premium_bill();
  bill.premium = false;
  bill.user_id = "f1";
  return bill;
}

TEST(pricing_settle, a_premium_job_pays_the_provider_from_the_user_and_the_fee_to_the_platform) {
  const auto s = settle_job(premium_bill(), defaults);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  EXPECT_EQ(s->gross_micros, 1100);
  EXPECT_EQ(s->platform_fee_micros, 110);
  EXPECT_EQ(s->provider_net_micros, 990);
  EXPECT_EQ(s->ad_micros, 0);
  const record_transfers expected{
      "job-42",
      {transfer{"job-42/usage", "user-u1", "provider-p1", 1100, transfer_kind::usage, "42"},
       transfer{"job-42/platform_fee", "provider-p1", "platform", 110, transfer_kind::platform_fee,
                "42"}}};
  EXPECT_EQ(s->group, expected);
}

TEST(pricing_settle, after_a_failover_each_provider_is_paid_its_own_tokens_at_its_own_price) {
  auto bill = premium_bill();
  // p0 produced the first 1,000 of the 1,500 tokens at 0.4 USD per million before it failed:
  // 400. p1, the last, is billed the prompt (200) and the other 500 tokens (300) at its prices.
  bill.earlier = {earlier_part{"p0", {50'000, 400'000}, 1000}};
  const auto s = settle_job(bill, defaults);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  EXPECT_EQ(s->gross_micros, 900);
  EXPECT_EQ(s->platform_fee_micros, 90);
  EXPECT_EQ(s->provider_net_micros, 810);
  const record_transfers expected{
      "job-42",
      {transfer{"job-42/usage", "user-u1", "provider-p1", 500, transfer_kind::usage, "42"},
       transfer{"job-42/platform_fee", "provider-p1", "platform", 50, transfer_kind::platform_fee, "42"},
       transfer{"job-42/usage/1", "user-u1", "provider-p0", 400, transfer_kind::usage, "42"},
       transfer{"job-42/platform_fee/1", "provider-p0", "platform", 40, transfer_kind::platform_fee, "42"}}};
  EXPECT_EQ(s->group, expected);

  // An earlier attempt never counts more tokens than are billed in all.
  bill.earlier = {earlier_part{"p0", {50'000, 400'000}, 2000}};
  const auto clamped = settle_job(bill, defaults);
  ASSERT_TRUE(clamped.has_value()) << clamped.error().message;
  EXPECT_EQ(clamped->gross_micros, 200 + 600);  // the prompt at p1's price, 1,500 tokens at p0's
  bill.earlier = {earlier_part{"", {0, 1}, 1}};
  EXPECT_FALSE(settle_job(bill, defaults).has_value()) << "an earlier attempt needs its provider";
}

TEST(pricing_settle, after_a_failover_the_whole_is_rounded_up_once_and_the_earlier_parts_down) {
  // 1 prompt token and 3 completion tokens at 1 micro-USD per million: 4 millionths of a micro,
  // rounded up to 1 as one provider's bill would be; p0's 3 millionths round down to nothing.
  job_bill bill = premium_bill();
  bill.price = {1, 1};
  bill.prompt_tokens = 1;
  bill.completion_tokens = 3;
  bill.earlier = {earlier_part{"p0", {1, 1}, 3}};
  const auto s = settle_job(bill, defaults);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  EXPECT_EQ(s->gross_micros, 1);
  const record_transfers expected{
      "job-42", {transfer{"job-42/usage", "user-u1", "provider-p1", 1, transfer_kind::usage, "42"}}};
  EXPECT_EQ(s->group, expected);
}

TEST(pricing_settle, a_free_job_is_paid_by_the_subsidy_and_its_ad_by_the_campaign) {
  auto bill = free_bill();
  bill.ad = ad_charge{"imp-9", "c7", 2500};
  const auto s = settle_job(bill, defaults);
  ASSERT_TRUE(s.has_value()) << s.error().message;
  EXPECT_EQ(s->ad_micros, 2500);
  const record_transfers expected{
      "job-42",
      {transfer{"job-42/free_tier_subsidy", "subsidy", "provider-p1", 1100,
                transfer_kind::free_tier_subsidy, "42"},
       transfer{"job-42/platform_fee", "provider-p1", "platform", 110, transfer_kind::platform_fee,
                "42"},
       transfer{"job-42/ad_spend", "campaign-c7", "platform", 2500, transfer_kind::ad_spend,
                "imp-9"}}};
  EXPECT_EQ(s->group, expected);
}

TEST(pricing_settle, a_cancelled_job_bills_the_tokens_produced_and_a_failed_job_nothing) {
  auto cancelled = premium_bill();
  cancelled.outcome = job_outcome::cancelled;
  cancelled.completion_tokens = 500;  // tokens_produced
  const auto c = settle_job(cancelled, defaults);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->gross_micros, 500);
  ASSERT_EQ(c->group.transfers.size(), 2u);
  EXPECT_EQ(c->group.transfers[0].amount_micros, 500);

  auto failed = free_bill();
  failed.outcome = job_outcome::failed;
  failed.ad = ad_charge{"imp-9", "c7", 2500};
  const auto f = settle_job(failed, defaults);
  ASSERT_TRUE(f.has_value());
  EXPECT_EQ(f->gross_micros, 0);
  EXPECT_EQ(f->ad_micros, 0);
  EXPECT_TRUE(f->group.transfers.empty());
}

TEST(pricing_settle, zero_amounts_are_left_out) {
  auto tiny = premium_bill();
  tiny.price = {1, 1};
  tiny.prompt_tokens = 1;
  tiny.completion_tokens = 0;  // gross 1, fee 0
  const auto s = settle_job(tiny, defaults);
  ASSERT_TRUE(s.has_value());
  ASSERT_EQ(s->group.transfers.size(), 1u);
  EXPECT_EQ(s->group.transfers[0].transfer_id, "job-42/usage");

  auto free_of_charge = free_bill();
  free_of_charge.price = {0, 0};
  free_of_charge.ad = ad_charge{"imp", "c", 0};
  const auto none = settle_job(free_of_charge, defaults);
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->group.transfers.empty());
}

TEST(pricing_settle, malformed_bills_are_refused) {
  struct bad_case {
    job_bill bill;
    std::string_view part;
  };
  std::vector<bad_case> cases;
  cases.push_back({premium_bill(), "premium users never see ads"});
  cases.back().bill.ad = ad_charge{"imp", "c", 1};
  cases.push_back({premium_bill(), "no user to charge"});
  cases.back().bill.user_id.clear();
  cases.push_back({premium_bill(), "needs a job id"});
  cases.back().bill.job_id.clear();
  cases.push_back({premium_bill(), "no provider"});
  cases.back().bill.provider_id.clear();
  cases.push_back({free_bill(), "lacks its impression or campaign id"});
  cases.back().bill.ad = ad_charge{"", "c", 1};
  cases.push_back({free_bill(), "negative price"});
  cases.back().bill.ad = ad_charge{"imp", "c", -1};
  cases.push_back({free_bill(), "must not be negative"});
  cases.back().bill.price = {-5, 0};
  for (const auto& c : cases) {
    const auto s = settle_job(c.bill, defaults);
    ASSERT_FALSE(s.has_value()) << c.part;
    EXPECT_EQ(s.error().code, errc::invalid_argument);
    EXPECT_TRUE(contains(s.error().message, c.part)) << s.error().message;
  }
  auto bad_options = defaults;
  bad_options.platform_fee_bps = 20'000;
  EXPECT_FALSE(settle_job(premium_bill(), bad_options).has_value());
}

TEST(pricing_settle, the_ledger_applies_a_settlement_once_and_refuses_an_unfunded_one) {
  ledger::state state;
  auto apply = [&](const record_transfers& group) {
    auto d = ledger::decide(state, group, 1);
    if (d) {
      for (const auto& e : *d) state = ledger::evolve(std::move(state), e);
    }
    return d;
  };
  const auto s = settle_job(premium_bill(), defaults);
  ASSERT_TRUE(s.has_value());
  const auto unfunded = apply(s->group);
  ASSERT_FALSE(unfunded.has_value());
  EXPECT_EQ(unfunded.error().code, errc::insufficient_funds);
  EXPECT_TRUE(contains(unfunded.error().message, "\"user-u1\" has 0 micro-USD"));

  ASSERT_TRUE(apply(user_deposit("d1", "u1", 1100)).has_value());
  const auto first = apply(s->group);
  ASSERT_TRUE(first.has_value()) << first.error().message;
  EXPECT_EQ(first->size(), 2u);
  const auto retried = apply(s->group);
  ASSERT_TRUE(retried.has_value());
  EXPECT_TRUE(retried->empty());
  EXPECT_EQ(balance_micros(state, "user-u1"), 0);
  EXPECT_EQ(balance_micros(state, "provider-p1"), 990);
  EXPECT_EQ(balance_micros(state, "platform"), 110);
  EXPECT_TRUE(check_ledger(state).has_value());
}

}  // namespace
TEST(pricing_settle, an_earlier_attempt_without_a_provider_or_with_a_negative_price_is_refused_naming_the_job) {
  auto bill = premium_bill();
  bill.earlier = {earlier_part{"", {50'000, 400'000}, 10}};
  const auto nobody = settle_job(bill, defaults);
  ASSERT_FALSE(nobody);
  EXPECT_EQ(nobody.error().code, errc::invalid_argument);
  EXPECT_NE(nobody.error().message.find("job 42"), std::string::npos) << nobody.error().message;
  EXPECT_NE(nobody.error().message.find("no provider to pay"), std::string::npos) << nobody.error().message;
  bill.earlier = {earlier_part{"p0", {50'000, -1}, 10}};
  const auto negative = settle_job(bill, defaults);
  ASSERT_FALSE(negative);
  EXPECT_NE(negative.error().message.find("must not be negative"), std::string::npos) << negative.error().message;
}

TEST(pricing_hold_left, is_the_hold_less_the_earlier_tokens_cost_rounded_up_once_never_below_zero) {
  const pricing_options options;  // standard tier: 100%
  const std::vector<earlier_part> earlier{{"p1", {1'000'000, 3'000'000}, 400}, {"p2", {0, 333'333}, 3}};
  // 400 x 3 + 3 x 0.333333 = 1,200.999999 micro-USD: 1,201 once rounded up.
  auto left = hold_left_micros(2'500, earlier, events::quality_tier::standard, options);
  ASSERT_TRUE(left) << left.error().message;
  EXPECT_EQ(*left, 2'500 - 1'201);
  EXPECT_EQ(hold_left_micros(2'500, {}, events::quality_tier::standard, options).value(), 2'500);
  EXPECT_EQ(hold_left_micros(1'000, earlier, events::quality_tier::standard, options).value(), 0);
  auto refused = hold_left_micros(2'500, {{"p1", {-1, 0}, 1}}, events::quality_tier::standard, options);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, errc::invalid_argument);
}

}  // namespace gpustream::domain
