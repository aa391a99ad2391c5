#pragma once
/// The ad server: every campaign's state cached in one actor, so that choosing the ad of a
/// free-tier answer runs the auction (domain/auction.hpp) over all active campaigns in one pass,
/// without a round trip per campaign. The campaign aggregates (through the campaign registry) stay
/// the authority: every reservation, impression, release and click is a command to the campaign's
/// own actor, which decides it against its persisted state, and the cache is updated from each
/// command's reply. A stale cache can therefore only lose an auction (the reservation is refused,
/// the answer goes without an ad), never overspend a budget.
///
/// Money: creating a campaign escrows its whole budget in the ledger (external -> campaign-<id>);
/// an ad is paid for when its job settles, by the ad_spend transfer campaign-<id> -> platform in the
/// job's ledger group (domain/pricing.hpp settle_job), at the price `served` answers.
///
/// Impression ids are "<campaign_id>.<job_id>" (the job id replaced by "h" and 16 hex digits of its
/// hash when the whole would pass the domain's id length limit), so the campaign of an impression
/// is known from its id alone: a click after a restart, before the campaign is cached again, still
/// finds it. Campaign ids are therefore restricted to ASCII letters, digits, '-' and '_'.
///
/// Include this only in .cpp files: it pulls in CAF.

#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "actors/aggregates.hpp"
#include "actors/atoms.hpp"
#include "actors/ledger_actor.hpp"
#include "domain/auction.hpp"
#include "domain/campaign.hpp"
#include "domain/pricing.hpp"

namespace gpustream::actors {

/// A free-tier job asks for an ad.
struct ad_request {
  std::string job_id;
  std::string user_id;  ///< for the frequency cap
  std::string prompt;   ///< the prompt text, read for contextual relevance only; never logged
  /// When the asker stops waiting for the pick, microseconds since the epoch (the system clock, as
  /// the ad server's); 0: never. A request the ad server reaches later (its mailbox backed up)
  /// reserves nothing and answers no ad: a reservation nobody waits for would hold the campaign's
  /// budget and the user's frequency cap until it expired.
  std::int64_t answer_by_us = 0;
};

/// The ad to show with an answer. Its budget is reserved until `served` or `release`, or until the
/// reservation expires (ad_server_options::reservation_ttl).
struct served_ad {
  std::string impression_id;  ///< for served / release / click, and the click URL /a/c/<id>
  std::string campaign_id;
  std::string title;
  std::string text;
  std::string url;                ///< the advertiser's page (the click redirects there)
  std::int64_t price_micros = 0;  ///< what the impression costs the campaign once served

  bool operator==(const served_ad&) const = default;
};

/// The answer to an ad_request: an ad, or none (no eligible campaign, or the winner's reservation
/// was refused because its state changed since the cache saw it).
struct ad_pick {
  std::optional<served_ad> ad;
};

/// The answer to a click: where to send the person who followed the ad's link.
struct click_redirect {
  std::string url;  ///< the advertiser's
  /// Why the click could not be recorded now (the store failed, or the campaign's stream is
  /// full), for the log; empty when it was recorded, or counts nothing (see click_atom).
  std::string unrecorded;
};

/// What the ad server has done since it started, for metrics and tests.
struct ad_server_counts {
  std::uint64_t campaigns = 0;             ///< cached now
  std::uint64_t picks = 0;                 ///< ad requests answered
  std::uint64_t picks_late = 0;            ///< of which came after their answer_by_us: no ad
  std::uint64_t ads = 0;                   ///< of which carried an ad (reserved)
  std::uint64_t reservations_refused = 0;  ///< an auction winner refused the reservation
  std::uint64_t impressions = 0;           ///< served and recorded
  std::uint64_t releases = 0;              ///< reservations released on request
  std::uint64_t voided = 0;                ///< recorded impressions taken back (not settled)
  std::uint64_t clicks = 0;                ///< clicks recorded (repeats not counted)
  /// Clicks the campaign failed to record (redirected all the same, and not counted).
  std::uint64_t clicks_unrecorded = 0;
  std::uint64_t expired = 0;               ///< reservations released by the expiry timer
  std::uint64_t refreshes = 0;             ///< cached states re-read from their aggregate
  std::uint64_t failures = 0;              ///< commands that failed other than by a refusal
  std::uint64_t evicted = 0;               ///< finished campaigns dropped to make room for others
};

struct ad_server_options {
  /// Campaigns to load into the cache at start: the ids of the campaigns found in the log. More
  /// can be loaded later with (load_atom, ids). Default: none.
  std::vector<std::string> campaign_ids;
  /// The auction's rules (floor, relevance weights, prompt bytes read). Their `campaign` member
  /// must equal the rules the campaign aggregates decide with (domain::campaign_options{}), or
  /// winners would be refused: only the defaults are supported.
  domain::auction_options auction;
  /// How long a picked ad's budget stays reserved when neither served nor released. The ad is
  /// picked when a free job is submitted and served when its answer ends, so this bounds the
  /// queue wait and the answer together: an answer longer than that goes out without its ad. A
  /// job that fails releases its ad at once; this only bounds what a crash leaves held. At most
  /// auction.campaign.reservation_ttl_us_max. Default: 15 min (a 131,072-token answer at
  /// 150 tokens/s).
  std::chrono::microseconds reservation_ttl = std::chrono::minutes(15);
  /// How often expired reservations are released. Default: 10 s.
  std::chrono::milliseconds expire_interval = std::chrono::seconds(10);
  /// Most campaigns cached (and so taking part in auctions). A finished campaign (its budget
  /// spent, nothing reserved) makes room for a new one; with none finished, creating one more is
  /// refused with limit_exceeded and loading one more leaves it out. Default: 10,000.
  std::size_t campaigns_max = 10'000;
  /// Longest campaign id, bytes, so that "<campaign_id>.<job_id>" fits the domain's id limit for
  /// common job ids. Default: 48.
  std::size_t campaign_id_length_max = 48;
  /// Source of `now`, microseconds since the Unix epoch. Default: the system clock.
  std::function<std::int64_t()> clock_us;
};

/// The actors the ad server drives; spawned by the runtime. It stops when either stops.
struct ad_server_peers {
  campaign_registry campaigns;
  ledger_actor ledger;
};

/// The ad server's messages. Refusals arrive as domain errors (errors.hpp), failures of the store
/// as storage errors.
using ad_server_actor = caf::typed_actor<
    /// Creates the campaign and escrows its whole budget: (1) the campaign_created event, which
    /// validates the campaign and claims its id before any money moves; (2) the ledger deposit
    /// external -> campaign-<id> (group and transfer "deposit-campaign-<id>/budget"); (3) the
    /// campaign_funded event. A failure in between leaves either no money moved, or the money in
    /// the campaign's escrow account while the campaign cannot spend it yet; repeating the same
    /// command completes what is missing and changes nothing that was done. Replies the id.
    caf::replies_to<domain::create_campaign>::with<std::string>,
    /// Runs the auction over the cached campaigns and reserves the winner's price (reserve_ad,
    /// expiring after reservation_ttl); replies the ad, or none. One pick per job.
    caf::replies_to<ad_request>::with<ad_pick>,
    /// (served, impression_id): the ad was shown; records the impression (reservation -> spend)
    /// and replies the charge the job's settlement carries. Repeating it replies the same charge.
    caf::replies_to<served_atom, std::string>::with<domain::ad_charge>,
    /// (release, impression_id, reason): the ad was not shown (the answer failed, the client left);
    /// gives the reservation back. Replies false when it had already been released.
    caf::replies_to<release_atom, std::string, std::string>::with<bool>,
    /// (unserved, impression_id, reason): the impression did not go out with a settled answer;
    /// takes it back (void_impression): voided if recorded, released if only reserved. Replies
    /// false when it was taken back or released before; an id never reserved: not_found.
    caf::replies_to<unserved_atom, std::string, std::string>::with<bool>,
    /// (click, impression_id): records the click (once per impression, within 7 days of it) and
    /// replies the advertiser's URL for the redirect; an impression of a campaign that counts no
    /// click for it (older, or never served), or whose click could not be recorded now, gets the
    /// URL too. An id naming no campaign: not_found.
    caf::replies_to<click_atom, std::string>::with<click_redirect>,
    /// (load, campaign_ids): caches these campaigns (those not created yet, and those finished,
    /// their budget spent with nothing reserved, are skipped), as many as campaigns_max holds;
    /// replies how many of them are cached afterwards.
    caf::replies_to<load_atom, std::vector<std::string>>::with<std::size_t>,
    caf::replies_to<count_atom>::with<ad_server_counts>,
    /// The cached state of one campaign (not_found when not cached), for tests and the admin API.
    caf::replies_to<state_atom, std::string>::with<domain::campaign_state>,
    // Internal: the expiry timer.
    caf::reacts_to<tick_atom>>;

[[nodiscard]] ad_server_actor spawn_ad_server(caf::actor_system& system, ad_server_peers peers,
                                              ad_server_options options = {});

/// The impression id of `job_id`'s ad from `campaign_id` (see the top of this file); fits
/// `id_length_max` when campaign_id.size() + 18 does.
[[nodiscard]] std::string impression_id_of(std::string_view campaign_id, std::string_view job_id,
                                           std::size_t id_length_max);

/// The campaign id an impression id names; empty when it names none.
[[nodiscard]] std::string_view campaign_of_impression(std::string_view impression_id) noexcept;

}  // namespace gpustream::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::create_campaign)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::ad_request)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::ad_pick)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::ad_server_counts)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::click_redirect)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::ad_charge)
