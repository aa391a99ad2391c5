#pragma once
/// The campaign aggregate (stream campaign-<id>): an advertiser's ad, its budget and what it spent.
///
/// Money rules (all amounts micro-USD):
///   - spendable = min(funded, budget_micros): funding is what the advertiser deposited (the ledger
///     moves the money), budget_micros what they agreed to spend at most; funding above the budget
///     is refused.
///   - An ad is paid for in two steps: `reserve_ad` holds its price before the ad is served
///     (ad_reserved), `record_impression` turns the hold into spend once it is served
///     (impression_recorded, impression id = reservation id, price <= the price held), and
///     `release_ad_reservation` / `expire_ad_reservations` give it back when it is not
///     (ad_reservation_released). spent + reserved never exceeds spendable. `void_impression`
///     takes a recorded impression back when its answer was not settled with it (nobody paid for
///     it): its spend, its count and the user's frequency cap that day (impression_voided); one
///     only reserved is released.
///   - One impression at the bid costs impression_price_micros(cpm_bid_micros). When what is left
///     (spendable - spent) cannot pay for one more, the impression that spent it also emits
///     campaign_exhausted. Funding that makes room for an impression again ends the exhaustion
///     (no separate event: the campaign_funded event is enough to replay it).
///
/// Daily pacing (UTC day = at_us / 86'400'000'000): by the instant t of a day, the campaign may have
/// spent or reserved at most
///     allowed(t) = min(daily_budget, daily_budget * elapsed_seconds(t) / 86'400 + burst)
///     burst      = max(daily_budget * pacing_burst_permille / 1000, one impression at the bid)
/// (integer division, rounded down), where "spent" counts impressions recorded that day and
/// "reserved" every outstanding reservation. So spend follows the clock through the day instead of
/// being used up in its first hour, with a small burst so that the day can start at all.
///
/// Frequency cap: a user sees at most frequency_cap_per_day impressions of the campaign per UTC day;
/// outstanding reservations for the user count as impressions.
///
/// Clicks are accepted once per impression, for impressions recorded within click_window_us. The
/// state remembers recorded impressions for that long only (older ones are dropped on the first
/// event of a new day), so it stays bounded by a week of paid traffic. Releases cost nobody
/// anything, so a client that opens and drops free requests makes one each: they are remembered
/// for release_memory_us after their reservation's expiry (pruned at most once that long), when
/// any retry of the reservation's commands is refused anyway.
///
/// The actor: decide, append, evolve, and (in tests and debug builds) `check` after each append;
/// a timer sends expire_ad_reservations. The auction (auction.hpp) reads the same rules through
/// `can_reserve`, so an auction winner's reservation is only refused when the state changed since.
/// campaign_funded carries no funding id: a retried funding command must reuse its event id so
/// that the store's idempotent append drops the duplicate.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// How long after an impression a click on it counts: 7 days. Fixed, because evolve (which has
/// no options) forgets impressions after it.
inline constexpr std::int64_t click_window_us = 7 * 86'400'000'000;

/// How long a release (or a void) is remembered after its reservation's expiry (after the void):
/// a retried release or void meanwhile is answered with no events, a retried reserve or record
/// refused as released. Later they find no reservation (not_found), and a reserve is past its
/// expiry. 1 hour. Fixed, because evolve (which has no options) forgets them after it.
inline constexpr std::int64_t release_memory_us = 3'600'000'000;

/// Limits and pacing of campaigns. The defaults are what production runs with.
struct campaign_options {
  /// Longest a reservation may be held before expire_ad_reservations releases it; taken as at most
  /// release_memory_us, so that a retried reserve of a released or voided reservation is refused
  /// by its expiry once the release is forgotten. Default: 30 min.
  std::int64_t reservation_ttl_us_max = 1'800'000'000;
  /// Reservations one campaign may hold at once. Default: 1,000.
  std::size_t reservations_max = 1'000;
  /// Pacing burst, in thousandths of the daily budget (at least one impression at the bid).
  /// Default: 50 (5 %).
  std::int64_t pacing_burst_permille = 50;
  /// Keywords and categories a campaign may list. Default: 50 and 20.
  std::size_t keywords_max = 50;
  std::size_t categories_max = 20;
  /// Longest keyword or category, in bytes. Default: 40.
  std::size_t word_length_max = 40;
  /// Longest campaign, advertiser, reservation, job or user id, in bytes. Default: 128.
  std::size_t id_length_max = 128;
  /// Longest title, in bytes. Default: 100.
  std::size_t title_length_max = 100;
  /// Longest ad text or pause/release reason, in bytes. Default: 500.
  std::size_t text_length_max = 500;
  /// Longest URL, in bytes. Default: 2,048.
  std::size_t url_length_max = 2'048;
  /// Largest total budget, micro-USD. Default: 1,000,000 USD.
  std::int64_t budget_micros_max = 1'000'000'000'000;
  /// Highest CPM bid, micro-USD per thousand impressions. Default: 1,000 USD.
  std::int64_t cpm_bid_micros_max = 1'000'000'000;
  /// Highest frequency cap, impressions per user per day. Default: 100.
  std::uint32_t frequency_cap_per_day_max = 100;
};

/// Budget held for one ad about to be served.
struct ad_reservation_state {
  std::string job_id;
  std::string user_id;
  std::int64_t price_micros = 0;
  std::int64_t reserved_at_us = 0;
  std::int64_t expires_at_us = 0;

  bool operator==(const ad_reservation_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, ad_reservation_state& x) {
  return f(x.job_id, x.user_id, x.price_micros, x.reserved_at_us, x.expires_at_us);
}

/// One served ad, remembered for click_window_us.
struct impression_state {
  std::string job_id;
  std::string user_id;
  std::int64_t price_micros = 0;
  std::int64_t recorded_at_us = 0;
  bool clicked = false;

  bool operator==(const impression_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, impression_state& x) {
  return f(x.job_id, x.user_id, x.price_micros, x.recorded_at_us, x.clicked);
}

struct campaign_state {
  bool created = false;
  // From campaign_created.
  std::string campaign_id;
  std::string advertiser;
  std::string title;
  std::string text;
  std::string url;
  std::vector<std::string> keywords;    ///< lowercase words
  std::vector<std::string> categories;  ///< lowercase words
  std::int64_t cpm_bid_micros = 0;
  std::int64_t budget_micros = 0;
  std::int64_t daily_budget_micros = 0;
  std::uint32_t frequency_cap_per_day = 0;
  std::int64_t created_at_us = 0;
  // Money.
  std::int64_t funded_micros = 0;
  std::int64_t spent_micros = 0;
  std::int64_t reserved_micros = 0;  ///< sum of the outstanding reservations' prices
  // Status.
  bool paused = false;
  std::string pause_reason;
  bool exhausted = false;
  // Ads.
  std::map<std::string, ad_reservation_state> reservations;  ///< outstanding, by reservation id
  std::map<std::string, impression_state> impressions;  ///< recorded within the click window, by id
  /// Released reservations and voided impressions: id -> when it may be forgotten (us), see
  /// release_memory_us.
  std::map<std::string, std::int64_t> released;
  std::int64_t releases_pruned_at_us = 0;  ///< when `released` was last pruned
  std::uint64_t impressions_total = 0;
  std::uint64_t clicks_total = 0;
  // The current UTC day's counters (pacing, frequency cap).
  std::int64_t day = 0;
  std::int64_t spent_today_micros = 0;
  std::map<std::string, std::uint32_t> impressions_today;  ///< by user id

  bool operator==(const campaign_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, campaign_state& x) {
  return f(x.created, x.campaign_id, x.advertiser, x.title, x.text, x.url, x.keywords, x.categories,
           x.cpm_bid_micros, x.budget_micros, x.daily_budget_micros, x.frequency_cap_per_day,
           x.created_at_us, x.funded_micros, x.spent_micros, x.reserved_micros, x.paused,
           x.pause_reason, x.exhausted, x.reservations, x.impressions, x.released,
           x.releases_pruned_at_us, x.impressions_total, x.clicks_total, x.day, x.spent_today_micros,
           x.impressions_today);
}

// Commands. Only create_campaign names the campaign: the others apply to the stream's campaign.

/// Keywords and categories are words of ASCII letters and digits (stored lowercase, duplicates
/// dropped); the auction matches them against the prompt's words. At least one of either is
/// needed, or the auction could never pick the campaign.
struct create_campaign {
  std::string campaign_id;
  std::string advertiser;
  std::string title;
  std::string text;
  std::string url;
  std::vector<std::string> keywords;
  std::vector<std::string> categories;
  std::int64_t cpm_bid_micros = 0;  ///< at least 1,000 so that one impression costs at least 1
  std::int64_t budget_micros = 0;
  std::int64_t daily_budget_micros = 0;  ///< at most budget_micros, at least one impression
  std::uint32_t frequency_cap_per_day = 1;
};

struct fund_campaign {
  std::int64_t amount_micros = 0;
};

struct pause_campaign {
  std::string reason;
};

struct resume_campaign {};

/// Holds `price_micros` (at most one impression at the bid) for an ad shown to `user_id`.
struct reserve_ad {
  std::string reservation_id;  ///< becomes the impression id
  std::string job_id;
  std::string user_id;
  std::int64_t price_micros = 0;
  std::int64_t expires_at_us = 0;  ///< after now, at most reservation_ttl_us_max after it
};

/// The reserved ad was served: its reservation becomes spend of `price_micros` (<= the price held).
struct record_impression {
  std::string impression_id;  ///< the reservation id
  std::int64_t price_micros = 0;
};

/// The reserved ad was not served.
struct release_ad_reservation {
  std::string reservation_id;
  std::string reason;
};

/// A recorded impression whose answer was not settled with it (the scheduler refused the result,
/// the client left before it completed): nobody paid for it, so its spend is taken back
/// (impression_voided). A clicked impression stays: it reached its user. One still only reserved
/// (its recording failed, or was never asked for) is released (ad_reservation_released): whoever
/// does not know which it is (a recording whose answer was lost) takes it back either way.
struct void_impression {
  std::string impression_id;
  std::string reason;
};

/// Releases every reservation whose expires_at_us is at or before now (reason "expired").
struct expire_ad_reservations {};

struct click_ad {
  std::string impression_id;
};

struct campaign {
  using state = campaign_state;
  using command = std::variant<create_campaign, fund_campaign, pause_campaign, resume_campaign,
                               reserve_ad, record_impression, release_ad_reservation,
                               expire_ad_reservations, click_ad, void_impression>;
  static constexpr std::uint32_t snapshot_version = 2;  // 2: released until forget time, releases_pruned_at_us

  [[nodiscard]] static state evolve(state s, const events::event& e);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us,
                                       const campaign_options& options);
};

static_assert(aggregate<campaign>);

/// The price of one impression at a CPM: cpm_micros / 1000, rounded down (in the advertiser's
/// favour). The one rounding rule from CPM to impressions, used by campaigns and the auction.
[[nodiscard]] constexpr std::int64_t impression_price_micros(std::int64_t cpm_micros) noexcept {
  return cpm_micros / 1000;
}

/// min(funded, budget): the most the campaign may ever have spent plus reserved.
[[nodiscard]] std::int64_t spendable_micros(const campaign_state& s) noexcept;

/// What the campaign may still reserve right now: spendable - spent - reserved.
[[nodiscard]] std::int64_t available_micros(const campaign_state& s) noexcept;

/// allowed(t) of the pacing rule above, for the UTC day of `now_us`.
[[nodiscard]] std::int64_t paced_allowance_micros(const campaign_state& s, std::int64_t now_us,
                                                  const campaign_options& options);

/// Spent on the UTC day of `now_us` plus every outstanding reservation: what pacing compares
/// with paced_allowance_micros.
[[nodiscard]] std::int64_t paced_use_micros(const campaign_state& s, std::int64_t now_us);

/// Impressions of the campaign for `user_id` on the UTC day of `now_us`, outstanding reservations
/// for the user included.
[[nodiscard]] std::uint32_t impressions_for_user_today(const campaign_state& s,
                                                       std::string_view user_id,
                                                       std::int64_t now_us);

/// Whether the campaign may hold `price_micros` more for an ad shown to `user_id` at `now_us`:
/// created, neither paused nor exhausted, the budget available (insufficient_funds), within
/// pacing and the reservation limit (limit_exceeded), under the user's frequency cap
/// (quota_exceeded). The messages name the numbers involved.
[[nodiscard]] expected<void, error> can_reserve(const campaign_state& s, std::string_view user_id,
                                                std::int64_t price_micros, std::int64_t now_us,
                                                const campaign_options& options);

/// Every broken invariant of `s`, in words naming the campaign and the amounts; empty when
/// consistent: funded <= budget, spent + reserved <= min(funded, budget) (no campaign spent more
/// than its budget), reserved equals the sum of the reservations, today's spend within the total,
/// clicks within impressions, an exhausted campaign really unable to pay one more impression.
[[nodiscard]] std::vector<std::string> check(const campaign_state& s);

}  // namespace gpustream::domain
