#include "domain/payout.hpp"

#include <set>
#include <type_traits>
#include <utility>
#include <vector>

#include "base/ensure.hpp"

namespace gpustream::domain {
namespace {

using events::transfer_kind;

std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }

/// A non-empty text no longer than payout_text_length_max.
expected<void, error> check_text(std::string_view what, std::string_view text) {
  if (text.empty()) return refuse(errc::invalid_argument, std::string(what) + " must not be empty");
  if (text.size() > payout_text_length_max) {
    return refuse(errc::invalid_argument, std::string(what) + " of " + std::to_string(text.size()) +
                                              " bytes exceeds payout_text_length_max (" +
                                              std::to_string(payout_text_length_max) + ")");
  }
  return {};
}

/// A command for payout X sent to the state of payout Y is a wiring bug of the caller, but it comes
/// in as input, so it is refused rather than ensured.
expected<void, error> check_same_payout(const payout::state& current, std::string_view payout_id) {
  if (current.status != payout_status::none && current.payout_id != payout_id) {
    return refuse(errc::invalid_argument, "command for payout " + quoted(payout_id) +
                                              " was sent to payout " + quoted(current.payout_id));
  }
  return {};
}

std::vector<events::event> one(events::event event) {
  std::vector<events::event> out;
  out.push_back(std::move(event));
  return out;
}

decision decide_request(const payout::state& current, const request_payout& command,
                        std::int64_t now_us) {
  if (auto ok = check_text("payout id", command.payout_id); !ok) return unexpected{ok.error()};
  if (auto ok = check_text("provider id", command.provider_id); !ok) return unexpected{ok.error()};
  if (auto ok = check_same_payout(current, command.payout_id); !ok) return unexpected{ok.error()};
  if (command.amount_micros <= 0) {
    return refuse(errc::invalid_argument, "payout " + quoted(command.payout_id) + " asks for " +
                                              micros(command.amount_micros) +
                                              "; a payout must be positive");
  }
  if (current.status != payout_status::none) {
    if (current.provider_id == command.provider_id &&
        current.amount_micros == command.amount_micros && current.automatic == command.automatic) {
      return std::vector<events::event>{};
    }
    return refuse(errc::already_exists,
                  "payout " + quoted(command.payout_id) + " was already requested for provider " +
                      quoted(current.provider_id) + " and " + micros(current.amount_micros));
  }
  if (command.amount_micros > command.provider_balance_micros) {
    return refuse(errc::insufficient_funds,
                  "payout " + quoted(command.payout_id) + " asks for " +
                      micros(command.amount_micros) + " but provider " +
                      quoted(command.provider_id) + " holds " +
                      micros(command.provider_balance_micros));
  }
  return one(events::payout_requested{command.payout_id, command.provider_id,
                                      command.amount_micros, command.automatic, now_us});
}

decision decide_settle(const payout::state& current, const settle_payout& command,
                       std::int64_t now_us) {
  if (auto ok = check_text("payout id", command.payout_id); !ok) return unexpected{ok.error()};
  if (auto ok = check_text("external reference", command.external_reference); !ok) {
    return unexpected{ok.error()};
  }
  if (auto ok = check_same_payout(current, command.payout_id); !ok) return unexpected{ok.error()};
  switch (current.status) {
    case payout_status::none:
      return refuse(errc::not_found, "payout " + quoted(command.payout_id) + " was never requested");
    case payout_status::requested:
      return one(events::payout_settled{command.payout_id, command.external_reference, now_us});
    case payout_status::settled:
      if (current.external_reference == command.external_reference) {
        return std::vector<events::event>{};
      }
      return refuse(errc::already_exists,
                    "payout " + quoted(command.payout_id) + " was already settled as " +
                        quoted(current.external_reference) + ", not " +
                        quoted(command.external_reference) + "; check for a double payment");
    case payout_status::failed:
      return refuse(errc::invalid_state, "payout " + quoted(command.payout_id) + " failed (" +
                                             current.failure_reason +
                                             ") and its money returned; it cannot be settled");
  }
  GPUSTREAM_ENSURE(false);
  return std::vector<events::event>{};
}

decision decide_fail(const payout::state& current, const fail_payout& command,
                     std::int64_t now_us) {
  if (auto ok = check_text("payout id", command.payout_id); !ok) return unexpected{ok.error()};
  if (auto ok = check_text("failure reason", command.reason); !ok) return unexpected{ok.error()};
  if (auto ok = check_same_payout(current, command.payout_id); !ok) return unexpected{ok.error()};
  switch (current.status) {
    case payout_status::none:
      return refuse(errc::not_found, "payout " + quoted(command.payout_id) + " was never requested");
    case payout_status::requested:
      return one(events::payout_failed{command.payout_id, command.reason, now_us});
    case payout_status::failed: return std::vector<events::event>{};
    case payout_status::settled:
      return refuse(errc::invalid_state, "payout " + quoted(command.payout_id) +
                                             " was already settled as " +
                                             quoted(current.external_reference) +
                                             "; its money has left and cannot fail back");
  }
  GPUSTREAM_ENSURE(false);
  return std::vector<events::event>{};
}

record_transfers single(std::string id, std::string debit, std::string credit,
                        std::int64_t amount_micros, std::string_view payout_id) {
  transfer t{id, std::move(debit), std::move(credit), amount_micros, transfer_kind::payout,
             std::string(payout_id)};
  return record_transfers{std::move(id), {std::move(t)}};
}

}  // namespace

bool automatic_payout_due(std::int64_t balance_micros,
                          std::optional<std::int64_t> last_automatic_payout_at_us,
                          std::int64_t now_us, const payout_options& options) noexcept {
  if (balance_micros <= 0 || balance_micros < options.threshold_micros) return false;
  if (!last_automatic_payout_at_us) return true;
  std::int64_t elapsed_us = 0;
  if (__builtin_sub_overflow(now_us, *last_automatic_payout_at_us, &elapsed_us)) {
    return now_us > *last_automatic_payout_at_us;  // too far apart for an int64: long enough
  }
  return elapsed_us >= options.interval_min_us;
}

payout::state payout::evolve(state current, const events::event& event) {
  if (const auto* requested = std::get_if<events::payout_requested>(&event)) {
    if (current.status != payout_status::none) return current;
    current.status = payout_status::requested;
    current.payout_id = requested->payout_id;
    current.provider_id = requested->provider_id;
    current.amount_micros = requested->amount_micros;
    current.automatic = requested->automatic;
    current.requested_at_us = requested->requested_at_us;
  } else if (const auto* settled = std::get_if<events::payout_settled>(&event)) {
    if (current.status != payout_status::requested || settled->payout_id != current.payout_id) {
      return current;
    }
    current.status = payout_status::settled;
    current.external_reference = settled->external_reference;
    current.closed_at_us = settled->settled_at_us;
  } else if (const auto* failed = std::get_if<events::payout_failed>(&event)) {
    if (current.status != payout_status::requested || failed->payout_id != current.payout_id) {
      return current;
    }
    current.status = payout_status::failed;
    current.failure_reason = failed->reason;
    current.closed_at_us = failed->failed_at_us;
  }
  return current;
}

decision payout::decide(const state& current, const command& command, std::int64_t now_us) {
  return std::visit(
      [&](const auto& c) -> decision {
        using type = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<type, request_payout>) {
          return decide_request(current, c, now_us);
        } else if constexpr (std::is_same_v<type, settle_payout>) {
          return decide_settle(current, c, now_us);
        } else {
          return decide_fail(current, c, now_us);
        }
      },
      command);
}

std::string payout_stream(std::string_view payout_id) {
  return "payout-" + std::string(payout_id);
}

record_transfers payout_request_transfers(std::string_view payout_id, std::string_view provider_id,
                                          std::int64_t amount_micros) {
  return single(payout_stream(payout_id) + "/request", provider_account(provider_id),
                std::string(payouts_in_flight_account), amount_micros, payout_id);
}

record_transfers payout_settle_transfers(std::string_view payout_id, std::int64_t amount_micros) {
  return single(payout_stream(payout_id) + "/settle", std::string(payouts_in_flight_account),
                std::string(external_account), amount_micros, payout_id);
}

record_transfers payout_fail_transfers(std::string_view payout_id, std::string_view provider_id,
                                       std::int64_t amount_micros) {
  return single(payout_stream(payout_id) + "/fail", std::string(payouts_in_flight_account),
                provider_account(provider_id), amount_micros, payout_id);
}

record_transfers payout_movement(const payout::state& before, const events::event& event) {
  if (const auto* requested = std::get_if<events::payout_requested>(&event)) {
    return payout_request_transfers(requested->payout_id, requested->provider_id,
                                    requested->amount_micros);
  }
  // Settling or failing needs the request that came before.
  GPUSTREAM_ENSURE(before.status == payout_status::requested);
  if (const auto* settled = std::get_if<events::payout_settled>(&event)) {
    GPUSTREAM_ENSURE(settled->payout_id == before.payout_id);
    return payout_settle_transfers(before.payout_id, before.amount_micros);
  }
  const auto* failed = std::get_if<events::payout_failed>(&event);
  GPUSTREAM_ENSURE(failed != nullptr);
  GPUSTREAM_ENSURE(failed->payout_id == before.payout_id);
  return payout_fail_transfers(before.payout_id, before.provider_id, before.amount_micros);
}

record_transfers closing_movement(const payout::state& closed) {
  if (closed.status == payout_status::settled) {
    return payout_settle_transfers(closed.payout_id, closed.amount_micros);
  }
  GPUSTREAM_ENSURE(closed.status == payout_status::failed);
  return payout_fail_transfers(closed.payout_id, closed.provider_id, closed.amount_micros);
}

namespace {

invariant_check violation(std::string message) {
  return unexpected{invariant_violation{std::move(message)}};
}

/// The ledger holds the one transfer of `expected` exactly as built, or holds no transfer of that
/// id when `expected_present` is false.
invariant_check check_movement(const ledger::state& ledger_state, const payout::state& p,
                               const record_transfers& expected, bool expected_present) {
  const auto& wanted = expected.transfers.front();
  const auto found = ledger_state.transfers.find(wanted.transfer_id);
  const bool present = found != ledger_state.transfers.end();
  if (present != expected_present) {
    return violation("payout " + quoted(p.payout_id) + " of provider " + quoted(p.provider_id) +
                     " (" + micros(p.amount_micros) + ") should " +
                     (expected_present ? "" : "not ") + "have ledger transfer " +
                     quoted(wanted.transfer_id) + " but " + (present ? "does" : "does not"));
  }
  if (!present) return {};
  const auto& t = found->second;
  if (t.debit_account != wanted.debit_account || t.credit_account != wanted.credit_account ||
      t.amount_micros != wanted.amount_micros || t.kind != wanted.kind) {
    return violation("ledger transfer " + quoted(wanted.transfer_id) + " moves " +
                     micros(t.amount_micros) + " from " + quoted(t.debit_account) + " to " +
                     quoted(t.credit_account) + " but payout " + quoted(p.payout_id) + " needs " +
                     micros(wanted.amount_micros) + " from " + quoted(wanted.debit_account) +
                     " to " + quoted(wanted.credit_account));
  }
  return {};
}

invariant_check check_one_payout(const ledger::state& ledger_state, const payout::state& p) {
  const auto request = payout_request_transfers(p.payout_id, p.provider_id, p.amount_micros);
  const auto settle = payout_settle_transfers(p.payout_id, p.amount_micros);
  const auto fail = payout_fail_transfers(p.payout_id, p.provider_id, p.amount_micros);
  if (auto ok = check_movement(ledger_state, p, request, true); !ok) return ok;
  if (auto ok = check_movement(ledger_state, p, settle, p.status == payout_status::settled); !ok) {
    return ok;
  }
  return check_movement(ledger_state, p, fail, p.status == payout_status::failed);
}

}  // namespace

invariant_check check_payouts_against_ledger(const ledger::state& ledger_state,
                                             std::span<const payout::state> payouts) {
  std::set<std::string, std::less<>> streams;
  std::int64_t open_micros = 0;
  for (const auto& p : payouts) {
    if (p.status == payout_status::none) continue;
    if (auto ok = check_one_payout(ledger_state, p); !ok) return ok;
    if (p.status == payout_status::requested) open_micros += p.amount_micros;
    streams.insert(payout_stream(p.payout_id));
  }
  // Payout transfer ids are "payout-<id>/<step>": every one must belong to a known payout.
  const std::string prefix = "payout-";
  for (auto it = ledger_state.transfers.lower_bound(prefix);
       it != ledger_state.transfers.end() && it->first.starts_with(prefix); ++it) {
    const auto slash = it->first.rfind('/');
    const auto stream = std::string_view(it->first).substr(0, slash);
    if (slash == std::string::npos || !streams.contains(stream)) {
      return violation("ledger transfer " + quoted(it->first) + " moves " +
                       micros(it->second.amount_micros) + " for a payout that was never recorded");
    }
  }
  const auto in_flight = balance_micros(ledger_state, payouts_in_flight_account);
  if (in_flight != open_micros) {
    return violation("payouts_in_flight holds " + micros(in_flight) + " but open payouts total " +
                     micros(open_micros));
  }
  return {};
}

}  // namespace gpustream::domain
