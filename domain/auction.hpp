#pragma once
/// The ad auction: which campaign's ad, if any, a free-tier answer carries, and what it pays.
/// A pure function of the campaigns' states, the prompt, the user and the time. Premium users
/// never see ads: the caller does not run the auction for them.
///
/// Relevance (contextual, no profile): the prompt's first prompt_bytes_max bytes are split into
/// words (runs of ASCII letters, digits and non-ASCII bytes; ASCII lowercased). Then
///     relevance = keyword_weight  * (campaign keywords that are prompt words)
///               + category_weight * (campaign categories matched)
/// where a category matches when it is itself a prompt word or a prompt word belongs to it in the
/// small built-in table of category_of (e.g. "cuda" -> "hardware", "recipe" -> "food"). Each
/// keyword and category counts once however often it appears.
///
/// Eligible: the campaign could reserve one impression at its own bid for this user now
/// (`can_reserve`: active, funded, within pacing, under the frequency cap), its bid is at least
/// the floor, and its relevance is positive. Ranked by effective bid = relevance * cpm_bid_micros,
/// ties broken by the smaller campaign id. The winner pays the runner-up's effective bid scaled
/// back to its own relevance (second price on quality-weighted bids), or the floor when alone:
///     clearing_cpm = clamp(runner_up.effective_bid / winner.relevance, floor, winner.cpm_bid)
///     price        = impression_price_micros(clearing_cpm) = clearing_cpm / 1000
/// Every division rounds down (in the advertiser's favour). No eligible campaign: no ad.
///
/// The actor then sends reserve_ad{price} to the winner; the price is at most one impression at
/// the winner's bid, which is what eligibility checked, so the reservation is refused only if the
/// campaign changed in between (then the answer goes without an ad, or the auction reruns).

#include <cstddef>
#include <cstdint>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>

#include "domain/campaign.hpp"

namespace gpustream::domain {

struct auction_options {
  /// Reserve price: the lowest CPM a winner pays and the lowest bid that takes part, micro-USD per
  /// thousand impressions. Must be at least 1,000, so that an impression costs at least 1 micro-USD.
  /// Default: 100,000 (0.10 USD CPM).
  std::int64_t floor_cpm_micros = 100'000;
  /// Prompt bytes read for relevance; the rest is ignored. Default: 16,384.
  std::size_t prompt_bytes_max = 16'384;
  /// Relevance points for each campaign keyword found in the prompt. Default: 3.
  std::int64_t keyword_weight = 3;
  /// Relevance points for each campaign category matched. Default: 1.
  std::int64_t category_weight = 1;
  /// The campaign rules that eligibility shares with reserve_ad (pacing burst, reservation limit).
  campaign_options campaign;
};

/// The auction's outcome when some campaign is eligible.
struct ad_choice {
  std::string campaign_id;
  std::int64_t relevance = 0;
  std::int64_t effective_bid = 0;        ///< relevance * cpm_bid_micros
  std::int64_t clearing_cpm_micros = 0;  ///< what the winner pays per thousand impressions
  std::int64_t price_micros = 0;         ///< what the winner pays for this impression
  std::string runner_up_campaign_id;     ///< empty when the winner was the only eligible campaign

  bool operator==(const ad_choice&) const = default;
};

/// The distinct words of the first `bytes_max` bytes of `prompt`, as the relevance rule reads them
/// (a word cut by the limit is left out).
[[nodiscard]] std::set<std::string> prompt_words(std::string_view prompt, std::size_t bytes_max);

/// The category a lowercase word belongs to in the built-in table; empty when none.
[[nodiscard]] std::string_view category_of(std::string_view word) noexcept;

/// The relevance of a campaign to a prompt's words (see above); 0 when nothing matches.
[[nodiscard]] std::int64_t relevance(const std::set<std::string>& words, const campaign_state& campaign,
                                     const auction_options& options);

/// Runs the auction over `campaigns` for an answer to `prompt` shown to `user_id` at `now_us`.
/// The result does not depend on the order of `campaigns`.
[[nodiscard]] std::optional<ad_choice> run_auction(std::span<const campaign_state> campaigns,
                                                   std::string_view prompt, std::string_view user_id,
                                                   std::int64_t now_us, const auction_options& options);

}  // namespace gpustream::domain
