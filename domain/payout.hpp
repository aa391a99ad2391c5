#pragma once
/// Payouts: a provider's earnings leaving the platform. One aggregate per payout, stream
/// "payout-<id>", events payout_requested -> payout_settled | payout_failed.
///
/// Each step moves money in the ledger as its own linked group (builders below):
///   request: provider-<p> -> payouts_in_flight   (group and transfer "payout-<id>/request")
///   settle:  payouts_in_flight -> external        ("payout-<id>/settle")
///   fail:    payouts_in_flight -> provider-<p>    ("payout-<id>/fail": the money returns)
///
/// Intended order for the actor:
///   - request: decide (it needs the provider's ledger balance), record the ledger group, then
///     append the payout event. The ledger is the authority on the provider's money: if it refuses
///     the group (the balance moved meanwhile), append nothing.
///   - settle or fail: append the payout event first, then record the ledger group. The payout's
///     stream decides between the two, so a payout is never both settled and failed; the group
///     cannot be refused (payouts_in_flight holds every open payout's amount). A crash between
///     the two leaves a closed payout without its movement, which `closing_movement` completes.
///     Before appending, check that the ledger holds no movement of the other ending (one left by
///     a build that recorded the group first).
/// Retrying any step is safe: both the ledger group and the payout command are idempotent.
///
/// Automatic payouts: `automatic_payout_due` says when to request the whole balance on the
/// provider's behalf; the caller keeps the time of the provider's last automatic payout.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include "domain/aggregate.hpp"
#include "domain/ledger.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Longest payout id, provider id, external reference or failure reason, in bytes.
inline constexpr std::size_t payout_text_length_max = 256;

struct payout_options {
  /// Balance at which a provider is paid out automatically (the whole balance). Default: 10 USD.
  std::int64_t threshold_micros = 10'000'000;
  /// Shortest time between two automatic payouts of one provider. Default: 24 hours.
  std::int64_t interval_min_us = std::int64_t{24} * 3600 * 1'000'000;
};

/// Whether to request an automatic payout now: the balance has reached the threshold (and is
/// positive) and at least interval_min_us has passed since the provider's last automatic payout
/// (`last_automatic_payout_at_us`, empty when there was none).
[[nodiscard]] bool automatic_payout_due(std::int64_t balance_micros,
                                        std::optional<std::int64_t> last_automatic_payout_at_us,
                                        std::int64_t now_us, const payout_options& options) noexcept;

/// Requests `amount_micros` of the provider's earnings. Refused when the amount is not positive
/// (invalid_argument) or exceeds `provider_balance_micros` (insufficient_funds). Asking again
/// with the same content changes nothing; other content under the same payout id is
/// already_exists.
struct request_payout {
  std::string payout_id;
  std::string provider_id;
  std::int64_t amount_micros = 0;
  bool automatic = false;  ///< requested by the threshold rule
  std::int64_t provider_balance_micros = 0;  ///< the provider's ledger balance now
};

/// The payment processor paid the provider. Settling again with the same reference changes
/// nothing; another reference is already_exists; a failed payout cannot be settled.
struct settle_payout {
  std::string payout_id;
  std::string external_reference;  ///< the payment processor's id; non-empty
};

/// The payment did not go through; the money returns to the provider. Failing a failed payout
/// changes nothing; a settled payout cannot fail.
struct fail_payout {
  std::string payout_id;
  std::string reason;  ///< non-empty, for the provider to read
};

enum class payout_status : std::uint8_t { none, requested, settled, failed };

struct payout {
  struct state {
    payout_status status = payout_status::none;
    std::string payout_id;
    std::string provider_id;
    std::int64_t amount_micros = 0;
    bool automatic = false;
    std::int64_t requested_at_us = 0;
    std::int64_t closed_at_us = 0;   ///< when settled or failed; 0 while requested
    std::string external_reference;  ///< when settled
    std::string failure_reason;      ///< when failed

    bool operator==(const state&) const = default;
  };

  using command = std::variant<request_payout, settle_payout, fail_payout>;

  static constexpr std::uint32_t snapshot_version = 1;

  /// Applies payout_requested (from none), payout_settled and payout_failed (from requested);
  /// anything else, or an event of another payout, leaves the state as it is.
  [[nodiscard]] static state evolve(state current, const events::event& event);

  [[nodiscard]] static decision decide(const state& current, const command& command,
                                       std::int64_t now_us);
};

static_assert(aggregate<payout>);

template <class Inspector>
auto inspect(Inspector& f, payout::state& x) {
  return f(x.status, x.payout_id, x.provider_id, x.amount_micros, x.automatic, x.requested_at_us,
           x.closed_at_us, x.external_reference, x.failure_reason);
}

/// "payout-<payout_id>".
[[nodiscard]] std::string payout_stream(std::string_view payout_id);

/// The ledger group of each step (see the top of this file); the reference is the payout id.
[[nodiscard]] record_transfers payout_request_transfers(std::string_view payout_id,
                                                        std::string_view provider_id,
                                                        std::int64_t amount_micros);
[[nodiscard]] record_transfers payout_settle_transfers(std::string_view payout_id,
                                                       std::int64_t amount_micros);
[[nodiscard]] record_transfers payout_fail_transfers(std::string_view payout_id,
                                                     std::string_view provider_id,
                                                     std::int64_t amount_micros);

/// The ledger group that carries out `event`, a payout event just decided for the payout whose
/// state before it is `before` (needed for the provider and amount of a settle or fail).
[[nodiscard]] record_transfers payout_movement(const payout::state& before,
                                               const events::event& event);

/// The ledger group of a settled or failed payout's ending (settle: on to external; fail: back to
/// the provider), from its state after the event.
[[nodiscard]] record_transfers closing_movement(const payout::state& closed);

/// Cross-checks payouts with the ledger, for `gpustream replay --verify`: every payout moved its
/// amount from its provider into payouts_in_flight; a settled one moved it on to external, a failed
/// one back to the provider, an open one neither; the ledger holds no payout movement without its
/// payout (e.g. a request group recorded before a crash lost the payout event); and
/// payouts_in_flight holds exactly the open payouts' amounts. O(payouts * log transfers).
[[nodiscard]] invariant_check check_payouts_against_ledger(const ledger::state& ledger_state,
                                                           std::span<const payout::state> payouts);

}  // namespace gpustream::domain
