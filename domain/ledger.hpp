#pragma once
/// The ledger: every money movement of the platform as a double-entry transfer in micro-USD between
/// named accounts, applied in linked groups (all or nothing), each transfer id at most once.
/// Balances are derived from the transfers; nothing else changes them.
///
/// Accounts are named by strings, and the name alone says whether the balance may go negative:
///   "user-<id>"          a user's prepaid balance                      never negative
///   "provider-<id>"      a provider's earnings                          never negative
///   "campaign-<id>"      an advertiser's escrow for one campaign        never negative
///   "payouts_in_flight"  money of requested, unsettled payouts          never negative
///   "platform"           the platform's revenue                         may go negative
///   "subsidy"            what the free tier costs the platform          may go negative
///   "external"           the outside world (deposits in, payouts out)   may go negative
///
/// One aggregate, stream "ledger", one event type (events::transfer_recorded). The actor wrapping it
/// runs decide, appends the events, evolves them and, in debug builds and tests, checks
/// `check_group_applied` after every group: that check only looks at the accounts the group touched
/// and a running total, so it costs O(group), not O(accounts). `check_ledger` is the full check for
/// replay and tests, and `ledger_verifier` folds a log from scratch checking everything on the way.

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

// ---------------------------------------------------------------------------------------------
// Limits.

/// Most transfers one linked group may hold. A job settlement needs at most three, a payout step
/// one; the bound keeps one command's work (and one atomic append) small.
inline constexpr std::size_t transfers_per_group_max = 16;

/// Longest transfer id, group id, reference or account name, in bytes. Ids are stored with every
/// transfer for idempotency, so they must stay short.
inline constexpr std::size_t ledger_id_length_max = 256;

/// How many of the most recent transfers of jobs (usage, platform fees, free-tier subsidies, ad
/// spend) the ledger keeps in memory to compare a retried command with; older ones are forgotten,
/// so that the ledger's memory does not grow with every job ever billed. Deposits and payouts are
/// kept for good (a payout run reconciles with them; they grow with users, campaigns and payouts,
/// not with jobs). Applying a transfer id at most once does not depend on this window: the actor
/// claims every transfer and group id in the event store for good (actors/ledger_actor.hpp).
inline constexpr std::size_t ledger_recent_transfers_max = 16'384;

// ---------------------------------------------------------------------------------------------
// Accounts.

enum class account_kind : std::uint8_t {
  user,               ///< "user-<id>": prepaid balance
  provider,           ///< "provider-<id>": earnings
  campaign,           ///< "campaign-<id>": advertiser escrow
  platform,           ///< "platform": revenue
  subsidy,            ///< "subsidy": the free tier's cost
  external,           ///< "external": the outside world
  payouts_in_flight,  ///< "payouts_in_flight": requested, unsettled payouts
};

inline constexpr std::string_view platform_account = "platform";
inline constexpr std::string_view subsidy_account = "subsidy";
inline constexpr std::string_view external_account = "external";
inline constexpr std::string_view payouts_in_flight_account = "payouts_in_flight";
/// provider_account(id) is this prefix + id.
inline constexpr std::string_view provider_account_prefix = "provider-";

/// What an account name means.
struct account_info {
  account_kind kind = account_kind::platform;
  std::string_view owner_id;  ///< the <id> of user-/provider-/campaign- names; empty otherwise.
                              ///< Points into the name that was classified.
};

/// Whether an account of this kind may hold a negative balance (platform, subsidy, external).
[[nodiscard]] bool may_go_negative(account_kind kind) noexcept;

/// Classifies an account name; refuses (invalid_argument) an unknown name, an empty <id> or a name
/// longer than ledger_id_length_max.
[[nodiscard]] expected<account_info, error> classify_account(std::string_view name);

[[nodiscard]] std::string user_account(std::string_view user_id);
[[nodiscard]] std::string provider_account(std::string_view provider_id);
[[nodiscard]] std::string campaign_account(std::string_view campaign_id);

/// Whether money of `kind` may move from a `debit` account to a `credit` account:
///   usage: user -> provider             platform_fee: provider -> platform
///   free_tier_subsidy: subsidy -> provider                ad_spend: campaign -> platform
///   deposit: external -> user | campaign
///   payout: provider -> payouts_in_flight (request), payouts_in_flight -> external (settle),
///           payouts_in_flight -> provider (fail: the money returns)
/// The table is what lets the ledger tell earnings from payouts per provider.
[[nodiscard]] bool route_allowed(events::transfer_kind kind, account_kind debit,
                                 account_kind credit) noexcept;

// ---------------------------------------------------------------------------------------------
// Commands.

/// One transfer as a command asks for it; the ledger adds the group id and the time.
struct transfer {
  std::string transfer_id;  ///< idempotency key: applied at most once
  std::string debit_account;
  std::string credit_account;
  std::int64_t amount_micros = 0;  ///< > 0
  events::transfer_kind kind = events::transfer_kind::usage;
  std::string reference;  ///< the job, impression, deposit or payout that caused it (may be empty)

  bool operator==(const transfer&) const = default;
};

/// Applies `transfers` in order, all or none, as the linked group `group_id`.
///
/// Decided as: a malformed command is invalid_argument (also too many transfers:
/// limit_exceeded); if every transfer id is already applied with identical content (group id
/// included) there is nothing to do (no events); if an id is applied with other content, or the
/// group id was used by other transfers, already_exists; if only part of the group is applied,
/// invalid_state. Balances are checked after each transfer, in order: one that would take an
/// account that must not go negative below zero is insufficient_funds; one that would overflow a
/// balance is limit_exceeded.
struct record_transfers {
  std::string group_id;
  std::vector<transfer> transfers;

  bool operator==(const record_transfers&) const = default;
};

/// Money entering a user's prepaid balance from outside: group and transfer id
/// "deposit-<deposit_id>", kind deposit, reference `deposit_id`.
[[nodiscard]] record_transfers user_deposit(std::string_view deposit_id, std::string_view user_id,
                                            std::int64_t amount_micros);

/// Money entering a campaign's escrow from outside, as user_deposit. The campaign_funded event has
/// no id of its own, so the caller names the deposit (e.g. "campaign-<id>/funded-<version>").
[[nodiscard]] record_transfers campaign_deposit(std::string_view deposit_id,
                                                std::string_view campaign_id,
                                                std::int64_t amount_micros);

/// A group as a job's end records it (events::ledger_bill), and back: the same transfers, in
/// order, field for field, so that settling a recorded bill applies what was decided.
[[nodiscard]] events::ledger_bill to_bill(const record_transfers& group);
[[nodiscard]] record_transfers from_bill(const events::ledger_bill& bill);

// ---------------------------------------------------------------------------------------------
// The aggregate.

struct ledger {
  /// What an applied transfer was, kept so that a retried command can be compared with it.
  struct applied_transfer {
    std::string debit_account;
    std::string credit_account;
    std::int64_t amount_micros = 0;
    events::transfer_kind kind = events::transfer_kind::usage;
    std::string reference;
    std::string group_id;

    bool operator==(const applied_transfer&) const = default;
  };

  /// A provider's money as the routes tell it apart. Balance = earned - paid out.
  struct provider_totals {
    std::int64_t earned_micros = 0;    ///< usage + free_tier_subsidy credited, minus platform fees
    std::int64_t paid_out_micros = 0;  ///< payouts requested, minus payouts returned on failure

    bool operator==(const provider_totals&) const = default;
  };

  /// A group in the window of recent transfers, oldest first.
  struct recent_group {
    std::string group_id;
    std::vector<std::string> transfer_ids;
    bool kept = false;  ///< holds a deposit or payout: kept for good, never forgotten

    bool operator==(const recent_group&) const = default;
  };

  struct state {
    /// Every account that ever moved money; an account never touched has balance 0.
    std::map<std::string, std::int64_t, std::less<>> balances_micros;
    /// Applied transfers by id: every deposit and payout, and the recent transfers of jobs.
    std::map<std::string, applied_transfer, std::less<>> transfers;
    /// The ids of the groups in `transfers` and how many transfers each holds.
    std::map<std::string, std::uint32_t, std::less<>> group_sizes;
    /// The groups applied since the oldest recent transfer of a job still held, in order; a job's
    /// group is forgotten (its transfers and its size) once more than recent_transfers_max
    /// transfers of jobs came after it.
    std::deque<recent_group> recent;
    std::size_t recent_transfers = 0;  ///< transfers of jobs in `recent`
    /// The window's size; tests make it small. Whole-log checks keep what they need themselves
    /// (ledger_history).
    std::size_t recent_transfers_max = ledger_recent_transfers_max;
    /// Per provider account name.
    std::map<std::string, provider_totals, std::less<>> providers;
    /// Sum of all balances, kept up to date change by change so that the per-group check does not
    /// sum every account. Zero whenever the ledger is sound.
    std::int64_t balance_total_micros = 0;

    bool operator==(const state&) const = default;
  };

  using command = std::variant<record_transfers>;

  /// 2: the window of recent transfers of jobs (version 1 kept every transfer).
  static constexpr std::uint32_t snapshot_version = 2;

  /// Applies a transfer_recorded; any other event, a transfer id already applied, or a transfer
  /// that cannot apply (amount <= 0, same account twice, a balance overflow) leaves the state as
  /// it is. Accounts are not classified here: the verifier reports bad names. Then forgets the
  /// oldest groups of jobs beyond the window (recent_transfers_max).
  [[nodiscard]] static state evolve(state current, const events::event& event);

  /// The transfer_recorded events (one per transfer, linked_group_id = group_id, recorded_at_us =
  /// now_us) or why not; see record_transfers.
  [[nodiscard]] static decision decide(const state& current, const command& command,
                                       std::int64_t now_us);
};

static_assert(aggregate<ledger>);

template <class Inspector>
auto inspect(Inspector& f, ledger::applied_transfer& x) {
  return f(x.debit_account, x.credit_account, x.amount_micros, x.kind, x.reference, x.group_id);
}

template <class Inspector>
auto inspect(Inspector& f, ledger::recent_group& x) {
  return f(x.group_id, x.transfer_ids, x.kept);
}

template <class Inspector>
auto inspect(Inspector& f, ledger::provider_totals& x) {
  return f(x.earned_micros, x.paid_out_micros);
}

template <class Inspector>
auto inspect(Inspector& f, ledger::state& x) {
  return f(x.balances_micros, x.transfers, x.group_sizes, x.providers, x.balance_total_micros,
           x.recent, x.recent_transfers, x.recent_transfers_max);
}

/// The balance of `account`; 0 for an account that never moved money.
[[nodiscard]] std::int64_t balance_micros(const ledger::state& state, std::string_view account);

// ---------------------------------------------------------------------------------------------
// Invariants, for the actor (after every group), `gpustream replay --verify` and tests.

/// The first broken invariant, in words naming the accounts, ids and amounts involved.
struct invariant_violation {
  std::string message;
};

using invariant_check = expected<void, invariant_violation>;

/// Whether `recorded` may be applied to `state`: its id is new (no transfer id twice), its amount is
/// positive, its accounts are distinct and known, and its kind may move money between them.
[[nodiscard]] invariant_check check_transfer_applicable(const ledger::state& state,
                                                        const events::transfer_recorded& recorded);

/// The incremental check after a group: the running total is zero, and each of `accounts` holds a
/// balance its kind allows and, for a provider, paid out <= earned. O(accounts.size() * log n).
[[nodiscard]] invariant_check check_accounts(const ledger::state& state,
                                             std::span<const std::string> accounts);

/// check_accounts over the accounts that the transfer_recorded events of `group` touched: what the
/// ledger actor runs after evolving the events of one decision.
[[nodiscard]] invariant_check check_group_applied(const ledger::state& state,
                                                  std::span<const events::event> group);

/// The full check, O(accounts): balances sum to zero (recomputed, and equal to the running total),
/// no account below zero that must not be, no provider paid out more than it earned, every
/// recorded group size matches its transfers.
[[nodiscard]] invariant_check check_ledger(const ledger::state& state);

/// What checking a whole log needs beyond the ledger's state, which forgets old transfers of jobs:
/// every transfer id and group id applied so far (and where), and each campaign's ad spend. Its
/// memory grows with the log: it is for replay --verify and tests, not for the live ledger.
class ledger_history {
 public:
  /// Why `recorded` cannot come next: its transfer id was applied before, or its group (which is
  /// not the group being applied) was.
  [[nodiscard]] invariant_check check(const events::transfer_recorded& recorded,
                                      std::string_view current_group) const;
  void add(const events::transfer_recorded& recorded);

  [[nodiscard]] std::size_t transfers() const noexcept { return group_of_.size(); }
  [[nodiscard]] std::size_t groups() const noexcept { return groups_.size(); }
  /// Ad spend moved out of each campaign account so far.
  [[nodiscard]] const std::map<std::string, std::int64_t, std::less<>>& ad_spend() const noexcept {
    return ad_spend_;
  }

 private:
  struct applied {
    std::string group_id;
    std::int64_t amount_micros = 0;
  };
  std::unordered_map<std::string, applied> group_of_;  ///< by transfer id
  std::unordered_set<std::string> groups_;
  std::map<std::string, std::int64_t, std::less<>> ad_spend_;
};

/// Rebuilds a ledger from its log, one transfer_recorded at a time, checking every invariant on the
/// way: each transfer before it is applied, the touched accounts whenever a group ends (the
/// linked_group_id changes), and everything at the end. Stops at the first violation. Pure: the
/// caller reads the log.
class ledger_verifier {
 public:
  /// Checks and applies the next recorded transfer.
  [[nodiscard]] invariant_check apply(const events::transfer_recorded& recorded);

  /// Checks the accounts the current group touched (apply() does when the next group starts); a
  /// caller that reports where a violation is can call it first, to tell a group's end from the
  /// next transfer. Nothing to check: fine.
  [[nodiscard]] invariant_check end_group();

  /// Ends the last group and runs the full check.
  [[nodiscard]] invariant_check finish();

  [[nodiscard]] const ledger::state& state() const noexcept { return state_; }
  [[nodiscard]] const ledger_history& history() const noexcept { return history_; }
  /// The group being applied ("" before the first transfer).
  [[nodiscard]] const std::string& group_id() const noexcept { return group_id_; }

  /// Transfers applied so far.
  [[nodiscard]] std::uint64_t transfers_applied() const noexcept { return transfers_applied_; }

 private:
  ledger::state state_;
  ledger_history history_;
  std::string group_id_;
  std::vector<std::string> touched_;
  std::uint64_t transfers_applied_ = 0;
};

}  // namespace gpustream::domain
