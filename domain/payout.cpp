#include "domain/payout.hpp"

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

}  // namespace gpustream::domain
