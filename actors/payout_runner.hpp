#pragma once
/// The payout runner: pays providers their earnings once they reach the automatic threshold
/// (domain/payout.hpp), and carries out the later steps of a payout (settle, fail).
///
/// Every step of a payout touches two streams, the ledger and the payout's own stream, so each is
/// a small saga in the order domain/payout.hpp prescribes, after deciding the payout command
/// against the payout's state:
///   - request: the ledger group first (the ledger is the authority on the provider's money: if
///     it refuses, nothing is appended), then the payout event. A crash between the two leaves a
///     ledger movement without its payout event; the next run finds it and appends the event.
///   - settle, fail: the payout event first (the payout's stream decides between the two), then
///     the ledger group. A crash between the two leaves a closed payout open in the ledger; the
///     next run finds every such payout and records its movement.
/// Both appends are idempotent (the ledger's transfer ids "payout-<id>/<step>", the payout
/// aggregate's own rules), so a step that failed half-way is completed by repeating it. Each run
/// completes what a crash left (reconciliation) before it considers new payouts.
///
/// Automatic payout ids are "auto-<provider_id>-<n>", n = 1 + the payout requests the ledger holds
/// for the provider: the same ledger gives the same id, so two runs on the same ledger cannot pay
/// twice, and a provider's latest payout is found without reading every payout. Only that latest
/// payout can have lost its request event: a run does not request a provider's next payout until
/// it has checked (and if need be completed) the latest one.
///
/// One operation at a time: a run, a settle or a fail waits for the one before it (bounded), so
/// that two steps of one payout are never decided against the same state.
///
/// Include this only in .cpp files: it pulls in CAF.

#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "actors/aggregates.hpp"
#include "actors/atoms.hpp"
#include "actors/ledger_actor.hpp"
#include "domain/payout.hpp"

namespace gpustream::actors {

/// One payout a run or a step touched, as it stands afterwards.
struct payout_entry {
  std::string payout_id;
  std::string provider_id;
  std::int64_t amount_micros = 0;
  domain::payout_status status = domain::payout_status::none;
  /// A crash came between its two appends, and this run completed the step: it appended the
  /// request's (or an at-once settlement's) missing event, or recorded the ledger movement of a
  /// settle or fail whose event was recorded.
  bool reconciled = false;

  bool operator==(const payout_entry&) const = default;
};

/// What a run did: the payouts it requested, settled or reconciled, and what it could not do, in
/// words naming the payout, provider and amounts.
struct payout_report {
  std::vector<payout_entry> payouts;
  std::vector<std::string> problems;
};

struct payout_runner_options {
  /// The automatic threshold and the shortest time between two automatic payouts of a provider.
  domain::payout_options payout;
  /// Settle every payout as soon as it is requested (money leaves to `external`), with the
  /// reference "at-once-<payout_id>". Without a payment rail payouts stay requested (their money in
  /// payouts_in_flight) until someone settles or fails them. When on, the runner is the only one
  /// settling, so a run also completes a settlement whose event was lost. Default: false.
  bool settle_at_once = false;
  /// Most new payouts one run requests; providers beyond it are left for the next run (and named
  /// in the report's problems). Default: 1,000.
  std::size_t payouts_per_run_max = 1'000;
  /// Most runs, settles and fails waiting behind the one in progress; beyond it they are refused
  /// with busy. Default: 64.
  std::size_t operations_waiting_max = 64;
  /// How often the runner runs by itself (0: only when asked). A run reads the whole ledger state
  /// once. Default: 1 hour.
  std::chrono::milliseconds run_interval = std::chrono::hours(1);
  /// With run_interval: its first run is as soon as it starts, to complete what a crash left half
  /// done; otherwise after run_interval, for an owner that asks for the first run itself (the
  /// gateway's node, before it serves). Default: true.
  bool first_run_at_once = true;
  /// Source of `now`, microseconds since the Unix epoch. Default: the system clock.
  std::function<std::int64_t()> clock_us;
};

/// The actors the payout runner drives; spawned by the runtime. It stops when either stops.
struct payout_runner_peers {
  ledger_actor ledger;
  payout_registry payouts;
};

/// The payout runner's messages. Refusals arrive as domain errors (errors.hpp), failures of the
/// store as storage errors.
using payout_runner_actor = caf::typed_actor<
    /// Reconciles each provider's latest payout with the ledger, then requests an automatic payout
    /// of the whole balance for every provider that automatic_payout_due says is due (and settles
    /// it when settle_at_once). Replies the report.
    caf::replies_to<run_atom>::with<payout_report>,
    /// (settle, payout_id, external_reference): the payment went through; moves the money from
    /// payouts_in_flight to external. Repeating it with the same reference changes nothing.
    caf::replies_to<settle_atom, std::string, std::string>::with<payout_entry>,
    /// (fail, payout_id, reason): the payment did not go through; the money returns to the
    /// provider. Repeating it changes nothing.
    caf::replies_to<fail_atom, std::string, std::string>::with<payout_entry>,
    /// The report of the latest run that finished (empty before the first), whether it was asked
    /// for or started by the timer.
    caf::replies_to<state_atom>::with<payout_report>,
    // Internal: the run timer.
    caf::reacts_to<tick_atom>>;

[[nodiscard]] payout_runner_actor spawn_payout_runner(caf::actor_system& system,
                                                      payout_runner_peers peers,
                                                      payout_runner_options options = {});

/// "auto-<provider_id>-<sequence>": the id of a provider's sequence-th payout (from 1).
[[nodiscard]] std::string automatic_payout_id(std::string_view provider_id, std::uint64_t sequence);

/// "at-once-<payout_id>": the external reference of a payout settled with settle_at_once.
[[nodiscard]] std::string at_once_reference(std::string_view payout_id);

}  // namespace gpustream::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::payout_entry)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::payout_report)
