#include "domain/ledger.hpp"

#include <algorithm>
#include <limits>
#include <set>

#include "base/ensure.hpp"

namespace gpustream::domain {
namespace {

using events::transfer_kind;

constexpr std::string_view user_prefix = "user-";
constexpr std::string_view campaign_prefix = "campaign-";

std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }

/// Adds without overflow; false when the sum does not fit in an int64.
[[nodiscard]] bool add_checked(std::int64_t a, std::int64_t b, std::int64_t& sum) {
  return !__builtin_add_overflow(a, b, &sum);
}

[[nodiscard]] bool sub_checked(std::int64_t a, std::int64_t b, std::int64_t& difference) {
  return !__builtin_sub_overflow(a, b, &difference);
}

std::string_view kind_name(transfer_kind kind) {
  switch (kind) {
    case transfer_kind::usage: return "usage";
    case transfer_kind::platform_fee: return "platform_fee";
    case transfer_kind::free_tier_subsidy: return "free_tier_subsidy";
    case transfer_kind::ad_spend: return "ad_spend";
    case transfer_kind::deposit: return "deposit";
    case transfer_kind::payout: return "payout";
  }
  return "unknown";
}

/// The problems a transfer can have on its own, shared by decide (a refusal) and the verifier (a
/// violation). Empty when the transfer is well formed.
std::string transfer_problem(std::string_view id, std::string_view debit, std::string_view credit,
                             std::int64_t amount, transfer_kind kind, std::string_view reference) {
  if (id.empty()) return "a transfer has an empty transfer id";
  if (id.size() > ledger_id_length_max) {
    return "transfer id of " + std::to_string(id.size()) + " bytes exceeds ledger_id_length_max (" +
           std::to_string(ledger_id_length_max) + ")";
  }
  if (reference.size() > ledger_id_length_max) {
    return "transfer " + quoted(id) + " has a reference of " + std::to_string(reference.size()) +
           " bytes, more than ledger_id_length_max (" + std::to_string(ledger_id_length_max) + ")";
  }
  if (amount <= 0) {
    return "transfer " + quoted(id) + " moves " + micros(amount) + "; amounts must be positive";
  }
  if (debit == credit) {
    return "transfer " + quoted(id) + " debits and credits the same account " + quoted(debit);
  }
  const auto debit_info = classify_account(debit);
  if (!debit_info) return "transfer " + quoted(id) + ": " + debit_info.error().message;
  const auto credit_info = classify_account(credit);
  if (!credit_info) return "transfer " + quoted(id) + ": " + credit_info.error().message;
  if (!route_allowed(kind, debit_info->kind, credit_info->kind)) {
    return "transfer " + quoted(id) + " of kind " + std::string(kind_name(kind)) +
           " may not move money from " + quoted(debit) + " to " + quoted(credit);
  }
  return {};
}

ledger::applied_transfer applied_from(const transfer& t, std::string_view group_id) {
  return {t.debit_account, t.credit_account, t.amount_micros, t.kind, t.reference,
          std::string(group_id)};
}

/// Malformed commands: the group id, the number of transfers, each transfer, duplicate ids.
expected<void, error> validate_command(const record_transfers& command) {
  if (command.group_id.empty()) {
    return refuse(errc::invalid_argument, "record_transfers needs a non-empty group id");
  }
  if (command.group_id.size() > ledger_id_length_max) {
    return refuse(errc::invalid_argument,
                  "group id of " + std::to_string(command.group_id.size()) +
                      " bytes exceeds ledger_id_length_max (" +
                      std::to_string(ledger_id_length_max) + ")");
  }
  if (command.transfers.empty()) {
    return refuse(errc::invalid_argument, "group " + quoted(command.group_id) + " has no transfers");
  }
  if (command.transfers.size() > transfers_per_group_max) {
    return refuse(errc::limit_exceeded,
                  "group " + quoted(command.group_id) + " has " +
                      std::to_string(command.transfers.size()) +
                      " transfers; transfers_per_group_max is " +
                      std::to_string(transfers_per_group_max));
  }
  std::set<std::string_view> ids;
  for (const auto& t : command.transfers) {
    auto problem = transfer_problem(t.transfer_id, t.debit_account, t.credit_account,
                                    t.amount_micros, t.kind, t.reference);
    if (!problem.empty()) return refuse(errc::invalid_argument, std::move(problem));
    if (!ids.insert(t.transfer_id).second) {
      return refuse(errc::invalid_argument, "group " + quoted(command.group_id) +
                                                " lists transfer " + quoted(t.transfer_id) +
                                                " twice");
    }
  }
  return {};
}

/// How a command relates to what is already applied: none of it, all of it (identically), or a
/// refusal (other content under an applied id, a partly applied group, a reused group id).
enum class applied_part { none, all };

expected<applied_part, error> compare_with_applied(const ledger::state& state,
                                                   const record_transfers& command) {
  const transfer* first_new = nullptr;
  const transfer* first_applied = nullptr;
  for (const auto& t : command.transfers) {
    const auto found = state.transfers.find(t.transfer_id);
    if (found == state.transfers.end()) {
      if (first_new == nullptr) first_new = &t;
      continue;
    }
    if (!(found->second == applied_from(t, command.group_id))) {
      return refuse(errc::already_exists,
                    "transfer " + quoted(t.transfer_id) + " was already applied in group " +
                        quoted(found->second.group_id) + " as " + micros(found->second.amount_micros) +
                        " from " + quoted(found->second.debit_account) + " to " +
                        quoted(found->second.credit_account) +
                        ", with other content than this command asks for");
    }
    if (first_applied == nullptr) first_applied = &t;
  }
  const auto group = state.group_sizes.find(command.group_id);
  if (first_new == nullptr) {
    // All of it is applied: as the whole group, not as a part of a larger one (a retry that left
    // a transfer out would read as carried out while the ledger moved more).
    if (group != state.group_sizes.end() && group->second != command.transfers.size()) {
      return refuse(errc::already_exists, "group " + quoted(command.group_id) + " was applied with " +
                                              std::to_string(group->second) + " transfers, not the " +
                                              std::to_string(command.transfers.size()) +
                                              " this command lists");
    }
    return applied_part::all;
  }
  if (first_applied != nullptr) {
    return refuse(errc::invalid_state, "group " + quoted(command.group_id) +
                                           " is partly applied: transfer " +
                                           quoted(first_applied->transfer_id) +
                                           " is, transfer " + quoted(first_new->transfer_id) +
                                           " is not; a group applies all or nothing");
  }
  if (group != state.group_sizes.end()) {
    return refuse(errc::already_exists,
                  "group id " + quoted(command.group_id) + " was already used by " +
                      std::to_string(group->second) + " other transfer(s), e.g. not " +
                      quoted(first_new->transfer_id));
  }
  return applied_part::none;
}

/// Balances of the accounts a group touches, as the group goes; groups are small, so a vector.
class balance_scratch {
 public:
  explicit balance_scratch(const ledger::state& state) : state_(state) {}

  [[nodiscard]] std::int64_t get(const std::string& account) const {
    for (const auto& [name, balance] : entries_) {
      if (name == account) return balance;
    }
    return balance_micros(state_, account);
  }

  void set(const std::string& account, std::int64_t balance) {
    for (auto& [name, current] : entries_) {
      if (name == account) {
        current = balance;
        return;
      }
    }
    entries_.emplace_back(account, balance);
  }

 private:
  const ledger::state& state_;
  std::vector<std::pair<std::string, std::int64_t>> entries_;
};

error overflow(const transfer& t, const std::string& account, std::int64_t balance) {
  return error{errc::limit_exceeded, "transfer " + quoted(t.transfer_id) + " of " +
                                         micros(t.amount_micros) +
                                         " would overflow the balance of " + quoted(account) +
                                         " (" + micros(balance) + ")"};
}

/// Applies the group's transfers in order to scratch balances and refuses the first that would
/// take a never-negative account below zero or overflow a balance. Checking after each transfer
/// (not only after the whole group) keeps every prefix of a group sound too, so a verifier that
/// checks event by event agrees with decide.
expected<void, error> check_balances(const ledger::state& state, const record_transfers& command) {
  balance_scratch balances(state);
  for (const auto& t : command.transfers) {
    const std::int64_t debit = balances.get(t.debit_account);
    std::int64_t debit_after = 0;
    if (!sub_checked(debit, t.amount_micros, debit_after)) {
      return unexpected{overflow(t, t.debit_account, debit)};
    }
    if (debit_after < 0 && !may_go_negative(classify_account(t.debit_account)->kind)) {
      return refuse(errc::insufficient_funds,
                    "account " + quoted(t.debit_account) + " has " + micros(debit) +
                        "; transfer " + quoted(t.transfer_id) + " of group " +
                        quoted(command.group_id) + " needs " + micros(t.amount_micros));
    }
    const std::int64_t credit = balances.get(t.credit_account);
    std::int64_t credit_after = 0;
    if (!add_checked(credit, t.amount_micros, credit_after)) {
      return unexpected{overflow(t, t.credit_account, credit)};
    }
    balances.set(t.debit_account, debit_after);
    balances.set(t.credit_account, credit_after);
  }
  return {};
}

/// The provider totals a transfer changes, by its route (see provider_totals).
void count_for_providers(ledger::state& state, const events::transfer_recorded& t) {
  const bool debit_is_provider = t.debit_account.starts_with(provider_account_prefix);
  const bool credit_is_provider = t.credit_account.starts_with(provider_account_prefix);
  if (credit_is_provider) {
    auto& totals = state.providers[t.credit_account];
    if (t.kind == transfer_kind::payout) {
      totals.paid_out_micros -= t.amount_micros;
    } else {
      totals.earned_micros += t.amount_micros;
    }
  }
  if (debit_is_provider) {
    auto& totals = state.providers[t.debit_account];
    if (t.kind == transfer_kind::payout) {
      totals.paid_out_micros += t.amount_micros;
    } else {
      totals.earned_micros -= t.amount_micros;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Accounts.

bool may_go_negative(account_kind kind) noexcept {
  switch (kind) {
    case account_kind::platform:
    case account_kind::subsidy:
    case account_kind::external: return true;
    case account_kind::user:
    case account_kind::provider:
    case account_kind::campaign:
    case account_kind::payouts_in_flight: return false;
  }
  return false;
}

expected<account_info, error> classify_account(std::string_view name) {
  if (name.size() > ledger_id_length_max) {
    return refuse(errc::invalid_argument, "account name of " + std::to_string(name.size()) +
                                              " bytes exceeds ledger_id_length_max (" +
                                              std::to_string(ledger_id_length_max) + ")");
  }
  if (name == platform_account) return account_info{account_kind::platform, {}};
  if (name == subsidy_account) return account_info{account_kind::subsidy, {}};
  if (name == external_account) return account_info{account_kind::external, {}};
  if (name == payouts_in_flight_account) return account_info{account_kind::payouts_in_flight, {}};
  const std::pair<std::string_view, account_kind> owned[] = {
      {user_prefix, account_kind::user},
      {provider_account_prefix, account_kind::provider},
      {campaign_prefix, account_kind::campaign},
  };
  for (const auto& [prefix, kind] : owned) {
    if (!name.starts_with(prefix)) continue;
    const auto owner = name.substr(prefix.size());
    if (owner.empty()) {
      return refuse(errc::invalid_argument,
                    "account name " + quoted(name) + " lacks the id after " + quoted(prefix));
    }
    return account_info{kind, owner};
  }
  return refuse(errc::invalid_argument,
                "unknown account " + quoted(name) +
                    "; accounts are user-<id>, provider-<id>, campaign-<id>, platform, subsidy, "
                    "external and payouts_in_flight");
}

std::string user_account(std::string_view user_id) {
  return std::string(user_prefix) + std::string(user_id);
}

std::string provider_account(std::string_view provider_id) {
  return std::string(provider_account_prefix) + std::string(provider_id);
}

std::string campaign_account(std::string_view campaign_id) {
  return std::string(campaign_prefix) + std::string(campaign_id);
}

bool route_allowed(transfer_kind kind, account_kind debit, account_kind credit) noexcept {
  using k = account_kind;
  switch (kind) {
    case transfer_kind::usage: return debit == k::user && credit == k::provider;
    case transfer_kind::platform_fee: return debit == k::provider && credit == k::platform;
    case transfer_kind::free_tier_subsidy: return debit == k::subsidy && credit == k::provider;
    case transfer_kind::ad_spend: return debit == k::campaign && credit == k::platform;
    case transfer_kind::deposit:
      return debit == k::external && (credit == k::user || credit == k::campaign);
    case transfer_kind::payout:
      return (debit == k::provider && credit == k::payouts_in_flight) ||
             (debit == k::payouts_in_flight && (credit == k::external || credit == k::provider));
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Deposits.

namespace {
record_transfers deposit_into(std::string_view deposit_id, std::string account,
                              std::int64_t amount_micros) {
  const std::string id = "deposit-" + std::string(deposit_id);
  return record_transfers{
      id, {transfer{id, std::string(external_account), std::move(account), amount_micros,
                    transfer_kind::deposit, std::string(deposit_id)}}};
}
}  // namespace

record_transfers user_deposit(std::string_view deposit_id, std::string_view user_id,
                              std::int64_t amount_micros) {
  return deposit_into(deposit_id, user_account(user_id), amount_micros);
}

record_transfers campaign_deposit(std::string_view deposit_id, std::string_view campaign_id,
                                  std::int64_t amount_micros) {
  return deposit_into(deposit_id, campaign_account(campaign_id), amount_micros);
}

events::ledger_bill to_bill(const record_transfers& group) {
  events::ledger_bill bill{.group_id = group.group_id, .transfers = {}};
  bill.transfers.reserve(group.transfers.size());
  for (const auto& t : group.transfers) {
    bill.transfers.push_back({t.transfer_id, t.debit_account, t.credit_account, t.amount_micros, t.kind,
                              t.reference});
  }
  return bill;
}

record_transfers from_bill(const events::ledger_bill& bill) {
  record_transfers group{.group_id = bill.group_id, .transfers = {}};
  group.transfers.reserve(bill.transfers.size());
  for (const auto& t : bill.transfers) {
    group.transfers.push_back({t.transfer_id, t.debit_account, t.credit_account, t.amount_micros, t.kind,
                               t.reference});
  }
  return group;
}

// ---------------------------------------------------------------------------------------------
// The aggregate.

namespace {

/// Deposits and payouts are kept for good; transfers of jobs only while recent.
bool kept_for_good(events::transfer_kind kind) {
  return kind == events::transfer_kind::deposit || kind == events::transfer_kind::payout;
}

/// Adds `t` to the window of recent groups, then forgets the oldest groups of jobs while the
/// window holds more than recent_transfers_max transfers of jobs. The group being applied (the
/// newest) is never forgotten, so a group is dropped whole.
void remember_recent(ledger::state& s, const events::transfer_recorded& t) {
  if (s.recent.empty() || s.recent.back().group_id != t.linked_group_id) {
    s.recent.push_back(ledger::recent_group{t.linked_group_id, {}, false});
  }
  auto& group = s.recent.back();
  group.transfer_ids.push_back(t.transfer_id);
  if (kept_for_good(t.kind) && !group.kept) {
    group.kept = true;
    s.recent_transfers -= group.transfer_ids.size() - 1;  // those before it were counted as a job's
  } else if (!group.kept) {
    ++s.recent_transfers;
  }
  while (s.recent_transfers > s.recent_transfers_max && s.recent.size() > 1) {
    auto& oldest = s.recent.front();
    if (!oldest.kept) {
      for (const auto& id : oldest.transfer_ids) s.transfers.erase(id);
      s.group_sizes.erase(oldest.group_id);
      s.recent_transfers -= oldest.transfer_ids.size();
    }
    s.recent.pop_front();
  }
}

}  // namespace

std::int64_t balance_micros(const ledger::state& state, std::string_view account) {
  const auto found = state.balances_micros.find(account);
  return found == state.balances_micros.end() ? 0 : found->second;
}

ledger::state ledger::evolve(state current, const events::event& event) {
  const auto* t = std::get_if<events::transfer_recorded>(&event);
  if (t == nullptr) return current;
  if (t->amount_micros <= 0 || t->debit_account == t->credit_account) return current;
  if (current.transfers.contains(t->transfer_id)) return current;
  std::int64_t debit_after = 0;
  std::int64_t credit_after = 0;
  if (!sub_checked(balance_micros(current, t->debit_account), t->amount_micros, debit_after) ||
      !add_checked(balance_micros(current, t->credit_account), t->amount_micros, credit_after)) {
    return current;
  }
  // The running total follows each balance change rather than assuming the two cancel, so that the
  // per-group check would notice a fold that moved only one side.
  auto& debit = current.balances_micros[t->debit_account];
  current.balance_total_micros += debit_after - debit;
  debit = debit_after;
  auto& credit = current.balances_micros[t->credit_account];
  current.balance_total_micros += credit_after - credit;
  credit = credit_after;

  current.transfers.emplace(t->transfer_id,
                            applied_transfer{t->debit_account, t->credit_account, t->amount_micros,
                                             t->kind, t->reference, t->linked_group_id});
  ++current.group_sizes[t->linked_group_id];
  count_for_providers(current, *t);
  remember_recent(current, *t);
  return current;
}

decision ledger::decide(const state& current, const command& command, std::int64_t now_us) {
  const auto& record = std::get<record_transfers>(command);
  if (auto valid = validate_command(record); !valid) return unexpected{valid.error()};
  auto applied = compare_with_applied(current, record);
  if (!applied) return unexpected{std::move(applied).error()};
  if (*applied == applied_part::all) return std::vector<events::event>{};
  if (auto funded = check_balances(current, record); !funded) return unexpected{funded.error()};

  std::vector<events::event> out;
  out.reserve(record.transfers.size());
  for (const auto& t : record.transfers) {
    out.emplace_back(events::transfer_recorded{t.transfer_id, t.debit_account, t.credit_account,
                                               t.amount_micros, t.kind, t.reference,
                                               record.group_id, now_us});
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Invariants.

namespace {
invariant_check violation(std::string message) {
  return unexpected{invariant_violation{std::move(message)}};
}

/// The account's balance is allowed by its kind, and a provider paid out no more than it earned.
invariant_check check_account(const ledger::state& state, std::string_view account,
                              std::int64_t balance) {
  const auto info = classify_account(account);
  if (!info) return violation(info.error().message);
  if (balance < 0 && !may_go_negative(info->kind)) {
    return violation("account " + quoted(account) + " holds " + micros(balance) +
                     "; it must never go negative");
  }
  if (info->kind == account_kind::provider) {
    const auto found = state.providers.find(account);
    const auto totals = found == state.providers.end() ? ledger::provider_totals{} : found->second;
    if (totals.paid_out_micros > totals.earned_micros) {
      return violation("provider account " + quoted(account) + " was paid out " +
                       micros(totals.paid_out_micros) + " but earned only " +
                       micros(totals.earned_micros));
    }
  }
  return {};
}

std::string int128_string(__int128 value) {
  if (value == 0) return "0";
  const bool negative = value < 0;
  std::string digits;
  while (value != 0) {
    const auto digit = static_cast<int>(value % 10);
    digits.push_back(static_cast<char>('0' + (negative ? -digit : digit)));
    value /= 10;
  }
  if (negative) digits.push_back('-');
  std::reverse(digits.begin(), digits.end());
  return digits;
}

invariant_check check_running_total(const ledger::state& state) {
  if (state.balance_total_micros != 0) {
    return violation("balances sum to " + micros(state.balance_total_micros) +
                     " (running total), not zero");
  }
  return {};
}
}  // namespace

invariant_check check_transfer_applicable(const ledger::state& state,
                                          const events::transfer_recorded& recorded) {
  const auto found = state.transfers.find(recorded.transfer_id);
  if (found != state.transfers.end()) {
    return violation("transfer " + quoted(recorded.transfer_id) + " is applied twice: first in group " +
                     quoted(found->second.group_id) + " (" + micros(found->second.amount_micros) +
                     "), again in group " + quoted(recorded.linked_group_id) + " (" +
                     micros(recorded.amount_micros) + ")");
  }
  auto problem = transfer_problem(recorded.transfer_id, recorded.debit_account,
                                  recorded.credit_account, recorded.amount_micros, recorded.kind,
                                  recorded.reference);
  if (!problem.empty()) return violation(std::move(problem));
  if (recorded.linked_group_id.empty()) {
    return violation("transfer " + quoted(recorded.transfer_id) + " has no linked group id");
  }
  std::int64_t ignored = 0;
  if (!sub_checked(balance_micros(state, recorded.debit_account), recorded.amount_micros, ignored) ||
      !add_checked(balance_micros(state, recorded.credit_account), recorded.amount_micros, ignored)) {
    return violation("transfer " + quoted(recorded.transfer_id) + " of " +
                     micros(recorded.amount_micros) + " overflows a balance of " +
                     quoted(recorded.debit_account) + " or " + quoted(recorded.credit_account));
  }
  return {};
}

invariant_check check_accounts(const ledger::state& state, std::span<const std::string> accounts) {
  if (auto total = check_running_total(state); !total) return total;
  for (const auto& account : accounts) {
    if (auto ok = check_account(state, account, balance_micros(state, account)); !ok) return ok;
  }
  return {};
}

invariant_check check_group_applied(const ledger::state& state,
                                    std::span<const events::event> group) {
  std::vector<std::string> touched;
  touched.reserve(group.size() * 2);
  for (const auto& event : group) {
    if (const auto* t = std::get_if<events::transfer_recorded>(&event)) {
      touched.push_back(t->debit_account);
      touched.push_back(t->credit_account);
    }
  }
  return check_accounts(state, touched);
}

invariant_check check_ledger(const ledger::state& state) {
  // 128 bits: the sum of many int64 balances may pass int64's range on the way.
  __int128 sum = 0;
  for (const auto& [account, balance] : state.balances_micros) {
    sum += balance;
    if (auto ok = check_account(state, account, balance); !ok) return ok;
  }
  if (sum != 0) {
    return violation("balances sum to " + int128_string(sum) + " micro-USD, not zero");
  }
  if (auto total = check_running_total(state); !total) return total;
  for (const auto& [account, totals] : state.providers) {
    if (!state.balances_micros.contains(account)) {
      return violation("provider account " + quoted(account) + " has totals but no balance");
    }
    if (totals.earned_micros - totals.paid_out_micros != balance_micros(state, account)) {
      return violation("provider account " + quoted(account) + " holds " +
                       micros(balance_micros(state, account)) + " but earned " +
                       micros(totals.earned_micros) + " and was paid out " +
                       micros(totals.paid_out_micros));
    }
  }
  std::uint64_t grouped = 0;
  for (const auto& [group_id, size] : state.group_sizes) grouped += size;
  if (grouped != state.transfers.size()) {
    return violation("groups hold " + std::to_string(grouped) + " transfers but " +
                     std::to_string(state.transfers.size()) + " are applied");
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// The verifier.

invariant_check ledger_history::check(const events::transfer_recorded& recorded,
                                      std::string_view current_group) const {
  if (const auto found = group_of_.find(recorded.transfer_id); found != group_of_.end()) {
    return violation("transfer " + quoted(recorded.transfer_id) + " is applied twice: first in group " +
                     quoted(found->second.group_id) + " (" + micros(found->second.amount_micros) +
                     "), again in group " + quoted(recorded.linked_group_id) + " (" +
                     micros(recorded.amount_micros) + ")");
  }
  if (recorded.linked_group_id != current_group && groups_.contains(recorded.linked_group_id)) {
    return violation("group " + quoted(recorded.linked_group_id) +
                     " appears again after other groups (at transfer " +
                     quoted(recorded.transfer_id) + "); a group is applied all at once");
  }
  return {};
}

void ledger_history::add(const events::transfer_recorded& recorded) {
  group_of_.emplace(recorded.transfer_id, applied{recorded.linked_group_id, recorded.amount_micros});
  groups_.insert(recorded.linked_group_id);
  if (recorded.kind == events::transfer_kind::ad_spend) ad_spend_[recorded.debit_account] += recorded.amount_micros;
}

invariant_check ledger_verifier::apply(const events::transfer_recorded& recorded) {
  if (recorded.linked_group_id != group_id_) {
    if (auto ended = end_group(); !ended) return ended;
  }
  if (auto ok = history_.check(recorded, group_id_); !ok) return ok;
  // The limits decide applies to a command (validate_command): a log that breaks them was not
  // written by decide.
  if (recorded.linked_group_id.size() > ledger_id_length_max) {
    return violation("group id of " + std::to_string(recorded.linked_group_id.size()) +
                     " bytes exceeds ledger_id_length_max (" + std::to_string(ledger_id_length_max) + ")");
  }
  if (recorded.linked_group_id == group_id_ && touched_.size() / 2 >= transfers_per_group_max) {
    return violation("group " + quoted(group_id_) + " has more than " + std::to_string(transfers_per_group_max) +
                     " transfers (transfers_per_group_max)");
  }
  group_id_ = recorded.linked_group_id;
  if (auto ok = check_transfer_applicable(state_, recorded); !ok) return ok;
  history_.add(recorded);
  state_ = ledger::evolve(std::move(state_), events::event{recorded});
  // Every prefix of a group is sound, as decide checks it (check_balances): an account that must
  // not go negative may not dip below zero in the middle of a group and come back by its end.
  const auto debit = balance_micros(state_, recorded.debit_account);
  if (debit < 0 && !may_go_negative(classify_account(recorded.debit_account)->kind)) {
    return violation("transfer " + quoted(recorded.transfer_id) + " of group " + quoted(recorded.linked_group_id) +
                     " leaves account " + quoted(recorded.debit_account) + " holding " + micros(debit) +
                     "; it must never go negative, not even within a group");
  }
  touched_.push_back(recorded.debit_account);
  touched_.push_back(recorded.credit_account);
  ++transfers_applied_;
  return {};
}

invariant_check ledger_verifier::end_group() {
  if (touched_.empty()) return {};
  auto checked = check_accounts(state_, touched_);
  if (!checked) {
    return violation("after group " + quoted(group_id_) + ": " + checked.error().message);
  }
  touched_.clear();
  return {};
}

invariant_check ledger_verifier::finish() {
  if (auto ended = end_group(); !ended) return ended;
  group_id_.clear();
  return check_ledger(state_);
}

}  // namespace gpustream::domain
