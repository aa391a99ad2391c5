#pragma once
/// A deliberately small aggregate for testing the actor shells (persistence, registry): a wallet
/// credited by deposits, each deposit id applied once. It stands in for any domain aggregate; the
/// real ones have their own tests.

#include <caf/allowed_unsafe_message_type.hpp>

#include <set>
#include <string>
#include <variant>
#include <vector>

#include "domain/aggregate.hpp"

namespace gpustream::actors::testing {

struct wallet {
  struct state {
    std::int64_t balance_micros = 0;
    std::set<std::string> deposit_ids;
    bool operator==(const state&) const = default;
  };
  struct credit {
    std::string deposit_id;
    std::int64_t amount_micros = 0;
  };
  using command = std::variant<credit>;
  static constexpr std::uint32_t snapshot_version = 1;

  static state evolve(state s, const events::event& e) {
    if (const auto* credited = std::get_if<events::user_credited>(&e)) {
      s.balance_micros += credited->amount_micros;
      s.deposit_ids.insert(credited->deposit_id);
    }
    return s;
  }

  static domain::decision decide(const state& s, const command& c, std::int64_t now_us) {
    const auto& cmd = std::get<credit>(c);
    if (cmd.amount_micros <= 0) {
      return domain::refuse(domain::errc::invalid_argument, "a credit must be positive");
    }
    if (s.deposit_ids.contains(cmd.deposit_id)) return std::vector<events::event>{};
    return std::vector<events::event>{events::user_credited{
        .user_id = "w", .deposit_id = cmd.deposit_id, .amount_micros = cmd.amount_micros,
        .credited_at_us = now_us}};
  }
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, wallet::state& x) {
  return f(x.balance_micros, x.deposit_ids);
}

static_assert(domain::aggregate<wallet>);

}  // namespace gpustream::actors::testing

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::testing::wallet::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::actors::testing::wallet::command>)
