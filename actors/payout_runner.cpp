#include "actors/payout_runner.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>

#include "actors/errors.hpp"
#include "base/ensure.hpp"

namespace gpustream::actors {

namespace {

struct runner_state {
  // Declared so that the state is no aggregate (CAF would try to build it from the actor pointer).
  runner_state() = default;

  payout_runner_options options;
  payout_runner_peers peers;
  bool busy = false;                         ///< an operation is in progress
  std::deque<std::function<void()>> waiting;  ///< operations behind it, in arrival order
  payout_report last_report;
  /// Every payout open in the ledger was checked against its stream (the first run does it: a
  /// crash may have come between a settle or fail and its movement). Later runs check only those
  /// whose movement failed in this process.
  bool open_checked = false;
  /// Payouts whose settle or fail may be half done in this process (its movement, its event's
  /// append or its stream's read failed): the next run looks at them again.
  std::set<std::string> close_failed;

  static inline const char* name = "gpustream.payout_runner";
};

using self_pointer = payout_runner_actor::stateful_pointer<runner_state>;

std::int64_t now_us(self_pointer self) { return self->state.options.clock_us(); }

std::string in_quotes(std::string_view text) { return "\"" + std::string(text) + "\""; }
std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

payout_entry entry_of(const domain::payout::state& state) {
  return payout_entry{state.payout_id, state.provider_id, state.amount_micros, state.status, false};
}

// ---------------------------------------------------------------------------------------------
// One operation at a time.

void start_next(self_pointer self) {
  auto& st = self->state;
  if (st.busy || st.waiting.empty()) return;
  st.busy = true;
  auto operation = std::move(st.waiting.front());
  st.waiting.pop_front();
  operation();
}

void operation_done(self_pointer self) {
  self->state.busy = false;
  start_next(self);
}

/// The refusal of one more operation when operations_waiting_max are waiting already. Checked
/// before the request's response promise is made: once made, a handler's returned error would
/// not reach the requester.
std::optional<caf::error> line_full(self_pointer self) {
  const auto& st = self->state;
  if (st.waiting.size() < st.options.operations_waiting_max) return std::nullopt;
  return make_error(domain::error{
      domain::errc::busy, "the payout runner has " + std::to_string(st.waiting.size()) +
                              " operations waiting, the most allowed (operations_waiting_max); retry later"});
}

/// Queues `operation`, which must call operation_done once it has finished (line_full first).
void enqueue(self_pointer self, std::function<void()> operation) {
  self->state.waiting.push_back(std::move(operation));
  start_next(self);
}

// ---------------------------------------------------------------------------------------------
// One step of one payout: decide, ledger, payout event.

using step_done = std::function<void(expected<payout_entry, caf::error>)>;

/// Appends the payout event of `command` once the ledger holds its movement.
void append_payout_event(self_pointer self, const std::string& payout_id,
                         domain::payout::command command, domain::payout::state before,
                         step_done done) {
  self->request(self->state.peers.payouts, caf::infinite, payout_id, std::move(command))
      .then(
          [before = std::move(before), done](const command_reply& reply) mutable {
            auto after = std::move(before);
            for (const auto& event : reply.events) {
              after = domain::payout::evolve(std::move(after), event);
            }
            done(entry_of(after));
          },
          [payout_id, done](caf::error& failure) mutable {
            done(unexpected{make_error(domain::error{
                domain::errc::invalid_state,
                "payout " + in_quotes(payout_id) + ": the ledger moved its money but its event was "
                "not recorded (" + describe(failure) + "); the next run completes it"})});
          });
}

/// The ledger's movements of one payout ("payout-<id>/request", "/settle", "/fail").
ledger_aggregate::query movements_query(std::string_view payout_id) {
  return ledger_aggregate::query{.accounts = {std::string(domain::payouts_in_flight_account)},
                                 .account_prefix = {},
                                 .transfer_prefix = domain::payout_stream(payout_id) + "/"};
}

/// Records the ledger movement of a settled or failed payout unless the ledger holds it already.
void record_closing(self_pointer self, domain::payout::state closed, bool held, step_done done) {
  if (held) {
    done(entry_of(closed));
    return;
  }
  if (closed.status != domain::payout_status::settled && closed.status != domain::payout_status::failed) {
    // Its stream did not close it after all (another writer decided first): nothing to move.
    done(unexpected{make_error(domain::error{
        domain::errc::invalid_state, "payout " + in_quotes(closed.payout_id) + " changed meanwhile; send it again"})});
    return;
  }
  auto movement = domain::closing_movement(closed);
  self->request(self->state.peers.ledger, caf::infinite, domain::ledger::command{std::move(movement)})
      .then(
          [self, closed, done](const command_reply&) mutable {
            self->state.close_failed.erase(closed.payout_id);
            done(entry_of(closed));
          },
          [self, closed, done](caf::error& failure) mutable {
            self->state.close_failed.insert(closed.payout_id);
            const bool settled = closed.status == domain::payout_status::settled;
            done(unexpected{make_error(domain::error{
                domain::errc::invalid_state,
                "payout " + in_quotes(closed.payout_id) + " is recorded as " + (settled ? "settled" : "failed") +
                    ", but its ledger movement was not recorded (" + describe(failure) +
                    "); the next run completes it"})});
          });
}

/// A settle or fail: the payout's event first, then its ledger movement (domain/payout.hpp).
void close_step(self_pointer self, const std::string& payout_id, domain::payout::command command,
                domain::payout::state before, std::vector<events::event> decided, step_done done) {
  self->request(self->state.peers.ledger, caf::infinite, movements_query(payout_id))
      .then(
          [self, payout_id, command = std::move(command), before = std::move(before),
           decided = std::move(decided), done](const ledger_aggregate::answer& ledger) mutable {
            const bool settling = std::holds_alternative<domain::settle_payout>(command);
            const auto held = [&](std::string_view step) {
              return ledger.transfers.contains(domain::payout_stream(payout_id) + "/" + std::string(step));
            };
            if (held(settling ? "fail" : "settle")) {
              // Left by a build that moved the money before recording the event, and crashed in
              // between: the ledger decided this payout's ending already.
              done(unexpected{make_error(domain::error{
                  domain::errc::invalid_state,
                  "payout " + in_quotes(payout_id) + " cannot be " + (settling ? "settled" : "failed") +
                      ": the ledger already " +
                      (settling ? "returned its money to the provider" : "paid its money out") +
                      ", and its event is missing; send the same " + (settling ? "fail" : "settle") +
                      " again to record it"})});
              return;
            }
            const bool movement_held = held(settling ? "settle" : "fail");
            if (decided.empty()) {  // closed before: its movement may still be missing
              record_closing(self, std::move(before), movement_held, std::move(done));
              return;
            }
            self->request(self->state.peers.payouts, caf::infinite, payout_id, std::move(command))
                .then(
                    [self, before = std::move(before), movement_held, done](const command_reply& reply) mutable {
                      auto after = std::move(before);
                      for (const auto& event : reply.events) after = domain::payout::evolve(std::move(after), event);
                      record_closing(self, std::move(after), movement_held, std::move(done));
                    },
                    [self, payout_id, done](caf::error& failure) mutable {
                      // The event's fate may be open (a failed fsync): the next run looks.
                      self->state.close_failed.insert(payout_id);
                      done(unexpected{std::move(failure)});
                    });
          },
          [done](caf::error& failure) mutable { done(unexpected{std::move(failure)}); });
}

/// Carries out `command` on the payout in the order of domain/payout.hpp. The caller must hold
/// the operation slot, so that nothing else decides against the same payout meanwhile.
void step(self_pointer self, const std::string& payout_id, domain::payout::command command,
          step_done done) {
  self->request(self->state.peers.payouts, caf::infinite, payout_id, state_atom::value)
      .then(
          [self, payout_id, command = std::move(command),
           done](domain::payout::state& before) mutable {
            auto decided = domain::payout::decide(before, command, now_us(self));
            if (!decided) {
              done(unexpected{make_error(decided.error())});
              return;
            }
            if (!std::holds_alternative<domain::request_payout>(command)) {
              close_step(self, payout_id, std::move(command), std::move(before), std::move(decided).value(),
                         std::move(done));
              return;
            }
            if (decided.value().empty()) {  // requested before: its movement came first
              done(entry_of(before));
              return;
            }
            auto movement = domain::payout_movement(before, decided.value().front());
            self->request(self->state.peers.ledger, caf::infinite,
                          domain::ledger::command{std::move(movement)})
                .then(
                    [self, payout_id, command = std::move(command), before = std::move(before),
                     done](const command_reply&) mutable {
                      append_payout_event(self, payout_id, std::move(command), std::move(before),
                                          std::move(done));
                    },
                    [done](caf::error& failure) mutable { done(unexpected{std::move(failure)}); });
          },
          [done](caf::error& failure) mutable { done(unexpected{std::move(failure)}); });
}

// ---------------------------------------------------------------------------------------------
// Runs.

/// What a run knows of one provider from the ledger.
struct provider_plan {
  std::string provider_id;
  std::int64_t balance_micros = 0;
  std::uint64_t requests = 0;  ///< payout requests the ledger holds for the provider
  /// automatic_payout_id(provider, requests) when the ledger holds its request; else empty.
  std::string latest_id;
  std::int64_t latest_amount_micros = 0;
  bool latest_settled = false;  ///< the ledger holds its settle movement
  bool latest_failed = false;   ///< the ledger holds its fail movement
};

struct run_context {
  /// Payouts the ledger holds open (requested, neither settled nor failed there): a crash may
  /// have left one closed on its stream without its movement.
  std::vector<std::string> open;
  std::size_t next_open = 0;
  std::vector<provider_plan> plans;
  std::size_t next = 0;
  std::int64_t now_us = 0;
  std::size_t requested = 0;  ///< new payouts so far
  std::size_t deferred = 0;   ///< due providers left for the next run (payouts_per_run_max)
  payout_report report;
  std::function<void(payout_report)> done;
};

using context_pointer = std::shared_ptr<run_context>;

/// The ledger's part of a run: the providers' balances and every payout transfer.
ledger_aggregate::query run_query() {
  return ledger_aggregate::query{.accounts = {},
                                 .account_prefix = std::string(domain::provider_account_prefix),
                                 .transfer_prefix = "payout-"};  // "payout-<id>/<step>" (domain/payout.hpp)
}

std::vector<provider_plan> plan_providers(const ledger_aggregate::answer& ledger) {
  std::map<std::string, provider_plan> plans;
  for (const auto& [account, balance] : ledger.balances) {
    auto owner = domain::classify_account(account);
    if (!owner || owner.value().kind != domain::account_kind::provider) continue;
    plans[std::string(owner.value().owner_id)].balance_micros = balance;
  }
  for (const auto& [id, transfer] : ledger.transfers) {
    if (!id.ends_with("/request")) continue;
    auto account = domain::classify_account(transfer.debit_account);
    if (!account || account.value().kind != domain::account_kind::provider) continue;
    ++plans[std::string(account.value().owner_id)].requests;
  }
  std::vector<provider_plan> out;
  out.reserve(plans.size());
  for (auto& [provider_id, plan] : plans) {
    plan.provider_id = provider_id;
    if (plan.requests > 0) {
      const auto latest = automatic_payout_id(provider_id, plan.requests);
      const auto request = ledger.transfers.find(domain::payout_stream(latest) + "/request");
      if (request != ledger.transfers.end()) {
        plan.latest_id = latest;
        plan.latest_amount_micros = request->second.amount_micros;
        plan.latest_settled = ledger.transfers.contains(domain::payout_stream(latest) + "/settle");
        plan.latest_failed = ledger.transfers.contains(domain::payout_stream(latest) + "/fail");
      }
    }
    out.push_back(std::move(plan));
  }
  return out;
}

/// The payouts whose request the ledger moved and whose ending it did not.
std::vector<std::string> open_payouts(const ledger_aggregate::answer& ledger) {
  std::vector<std::string> open;
  const std::string prefix = "payout-";
  for (const auto& [id, transfer] : ledger.transfers) {
    if (!id.starts_with(prefix) || !id.ends_with("/request")) continue;
    const std::string stream = id.substr(0, id.size() - std::string_view("/request").size());
    if (ledger.transfers.contains(stream + "/settle") || ledger.transfers.contains(stream + "/fail")) continue;
    open.push_back(stream.substr(prefix.size()));
  }
  return open;
}

void next_provider(self_pointer self, context_pointer ctx);

/// Records the ledger movement of each payout the ledger holds open but its stream closed (a
/// crash came between the settle or fail event and its movement), then goes on with the providers.
void next_open(self_pointer self, context_pointer ctx) {
  if (ctx->next_open == ctx->open.size()) {
    self->state.open_checked = true;
    next_provider(self, std::move(ctx));
    return;
  }
  const std::string payout_id = ctx->open[ctx->next_open++];
  self->request(self->state.peers.payouts, caf::infinite, payout_id, state_atom::value)
      .then(
          [self, ctx, payout_id](domain::payout::state& state) mutable {
            using domain::payout_status;
            if (state.status != payout_status::settled && state.status != payout_status::failed) {
              self->state.close_failed.erase(payout_id);  // still open on its stream too: whole
              next_open(self, std::move(ctx));
              return;
            }
            record_closing(self, std::move(state), false,
                           [self, ctx](expected<payout_entry, caf::error> closed) mutable {
                             if (!closed) {
                               ctx->report.problems.push_back(describe(closed.error()));
                             } else {
                               closed.value().reconciled = true;
                               for (auto& plan : ctx->plans) {
                                 if (plan.latest_id != closed.value().payout_id) continue;
                                 plan.latest_settled = closed.value().status == domain::payout_status::settled;
                                 plan.latest_failed = closed.value().status == domain::payout_status::failed;
                               }
                               ctx->report.payouts.push_back(std::move(closed.value()));
                             }
                             next_open(self, std::move(ctx));
                           });
          },
          [self, ctx, payout_id](caf::error& failure) mutable {
            self->state.close_failed.insert(payout_id);  // looked at again by the next run
            ctx->report.problems.push_back("payout " + in_quotes(payout_id) + " could not be read (" +
                                           describe(failure) + ")");
            next_open(self, std::move(ctx));
          });
}

/// Requests (and, with settle_at_once, settles) the provider's next automatic payout when due,
/// then goes on with the next provider. Returns false, having done nothing, when none is due: the
/// caller goes on itself (a loop rather than a recursion as deep as the providers).
[[nodiscard]] bool request_if_due(self_pointer self, context_pointer ctx, const provider_plan& plan,
                                  std::optional<std::int64_t> last_automatic_at_us) {
  const auto& options = self->state.options;
  if (!domain::automatic_payout_due(plan.balance_micros, last_automatic_at_us, ctx->now_us,
                                    options.payout)) {
    return false;
  }
  if (ctx->requested >= options.payouts_per_run_max) {
    ++ctx->deferred;
    return false;
  }
  ++ctx->requested;
  const auto payout_id = automatic_payout_id(plan.provider_id, plan.requests + 1);
  domain::request_payout request{payout_id, plan.provider_id, plan.balance_micros, true,
                                 plan.balance_micros};
  step(self, payout_id, std::move(request),
       [self, ctx, payout_id, plan](expected<payout_entry, caf::error> requested) mutable {
         if (!requested) {
           ctx->report.problems.push_back("payout " + in_quotes(payout_id) + " of provider " +
                                          in_quotes(plan.provider_id) + " (" +
                                          micros(plan.balance_micros) +
                                          "): " + describe(requested.error()));
           next_provider(self, std::move(ctx));
           return;
         }
         if (!self->state.options.settle_at_once) {
           ctx->report.payouts.push_back(std::move(requested.value()));
           next_provider(self, std::move(ctx));
           return;
         }
         step(self, payout_id, domain::settle_payout{payout_id, at_once_reference(payout_id)},
              [self, ctx, requested = std::move(requested.value())](
                  expected<payout_entry, caf::error> settled) mutable {
                if (settled) {
                  ctx->report.payouts.push_back(std::move(settled.value()));
                } else {
                  ctx->report.problems.push_back("payout " + in_quotes(requested.payout_id) +
                                                 " was requested but not settled at once: " +
                                                 describe(settled.error()));
                  ctx->report.payouts.push_back(std::move(requested));
                }
                next_provider(self, std::move(ctx));
              });
       });
  return true;
}

/// request_if_due from a response handler, whose stack is fresh.
void consider_new(self_pointer self, context_pointer ctx, const provider_plan& plan,
                  std::optional<std::int64_t> last_automatic_at_us) {
  if (!request_if_due(self, ctx, plan, last_automatic_at_us)) next_provider(self, std::move(ctx));
}

/// Completes an at-once settlement of the latest payout (settle_at_once only).
/// `reconciled`: the payout's request event was just appended from the ledger.
void reconcile_settlement(self_pointer self, context_pointer ctx, const provider_plan& plan,
                          std::optional<std::int64_t> last_automatic_at_us, bool reconciled) {
  step(self, plan.latest_id, domain::settle_payout{plan.latest_id, at_once_reference(plan.latest_id)},
       [self, ctx, plan, last_automatic_at_us,
        reconciled](expected<payout_entry, caf::error> settled) mutable {
         if (settled) {
           // Reconciled: an event of it had been lost (the request's, or the settlement's).
           settled.value().reconciled = reconciled || plan.latest_settled;
           ctx->report.payouts.push_back(std::move(settled.value()));
         } else {
           ctx->report.problems.push_back("payout " + in_quotes(plan.latest_id) +
                                          " could not be settled at once: " +
                                          describe(settled.error()));
         }
         consider_new(self, std::move(ctx), plan, last_automatic_at_us);
       });
}

/// Appends the request event of the provider's latest payout, whose ledger movement exists.
void reconcile_request(self_pointer self, context_pointer ctx, const provider_plan& plan) {
  // The ledger already moved the amount out of the provider's balance, which therefore held it.
  domain::request_payout request{plan.latest_id, plan.provider_id, plan.latest_amount_micros, true,
                                 plan.latest_amount_micros};
  self->request(self->state.peers.payouts, caf::infinite, plan.latest_id,
                domain::payout::command{std::move(request)})
      .then(
          [self, ctx, plan](const command_reply&) mutable {
            const std::int64_t requested_at_us = ctx->now_us;
            if (self->state.options.settle_at_once) {
              reconcile_settlement(self, std::move(ctx), plan, requested_at_us, true);
              return;
            }
            ctx->report.payouts.push_back(payout_entry{plan.latest_id, plan.provider_id,
                                                       plan.latest_amount_micros,
                                                       domain::payout_status::requested, true});
            consider_new(self, std::move(ctx), plan, requested_at_us);
          },
          [self, ctx, plan](caf::error& failure) mutable {
            ctx->report.problems.push_back(
                "payout " + in_quotes(plan.latest_id) + " of provider " + in_quotes(plan.provider_id) +
                ": the ledger moved " + micros(plan.latest_amount_micros) +
                " but its request event is missing and could not be appended (" +
                describe(failure) + "); no new payout for this provider until it is");
            next_provider(self, std::move(ctx));
          });
}

/// Checks the provider's latest payout against the ledger, completes what a crash left half done,
/// then considers a new payout.
void check_latest(self_pointer self, context_pointer ctx, const provider_plan& plan,
                  const domain::payout::state& latest) {
  using domain::payout_status;
  if (latest.status == payout_status::none) {
    reconcile_request(self, std::move(ctx), plan);
    return;
  }
  const std::optional<std::int64_t> last_at =
      latest.automatic ? std::optional<std::int64_t>(latest.requested_at_us) : std::nullopt;
  if (latest.status == payout_status::requested) {
    if (self->state.options.settle_at_once && !plan.latest_failed) {
      reconcile_settlement(self, std::move(ctx), plan, last_at, false);
      return;
    }
    if (plan.latest_settled || plan.latest_failed) {
      ctx->report.problems.push_back(
          "payout " + in_quotes(plan.latest_id) + ": the ledger " +
          (plan.latest_settled ? "settled" : "failed") +
          " it but its event is missing; send the same " +
          (plan.latest_settled ? "settle (with the payment's reference)" : "fail (with its reason)") +
          " again");
    }
  } else if ((latest.status == payout_status::settled) != plan.latest_settled ||
             (latest.status == payout_status::failed) != plan.latest_failed) {
    ctx->report.problems.push_back("payout " + in_quotes(plan.latest_id) +
                                   " disagrees with the ledger about how it ended");
  }
  consider_new(self, std::move(ctx), plan, last_at);
}

void finish_run(self_pointer self, context_pointer ctx) {
  if (ctx->deferred > 0) {
    ctx->report.problems.push_back(
        std::to_string(ctx->deferred) + " more providers are due; they are left for the next run (" +
        std::to_string(self->state.options.payouts_per_run_max) + " payouts per run at most)");
  }
  self->state.last_report = ctx->report;
  auto done = std::move(ctx->done);
  done(std::move(ctx->report));
  operation_done(self);
}

void next_provider(self_pointer self, context_pointer ctx) {
  while (ctx->next < ctx->plans.size() && ctx->plans[ctx->next].latest_id.empty()) {
    // No payout yet: nothing to check, only maybe a first one to request.
    if (request_if_due(self, ctx, ctx->plans[ctx->next++], std::nullopt)) return;
  }
  if (ctx->next == ctx->plans.size()) {
    finish_run(self, std::move(ctx));
    return;
  }
  const auto& plan = ctx->plans[ctx->next++];
  self->request(self->state.peers.payouts, caf::infinite, plan.latest_id, state_atom::value)
      .then(
          [self, ctx, plan](const domain::payout::state& latest) mutable {
            check_latest(self, std::move(ctx), plan, latest);
          },
          [self, ctx, plan](caf::error& failure) mutable {
            ctx->report.problems.push_back("payout " + in_quotes(plan.latest_id) +
                                           " could not be read (" + describe(failure) +
                                           "); no new payout for provider " +
                                           in_quotes(plan.provider_id) + " this run");
            next_provider(self, std::move(ctx));
          });
}

/// A whole run in the operation slot; `done` gets its report.
void run(self_pointer self, std::function<void(payout_report)> done) {
  auto ctx = std::make_shared<run_context>();
  ctx->now_us = now_us(self);
  ctx->done = std::move(done);
  self->request(self->state.peers.ledger, caf::infinite, run_query())
      .then(
          [self, ctx](const ledger_aggregate::answer& ledger) mutable {
            ctx->plans = plan_providers(ledger);
            ctx->open = open_payouts(ledger);
            if (self->state.open_checked) {
              std::erase_if(ctx->open, [self](const std::string& id) { return !self->state.close_failed.contains(id); });
            }
            next_open(self, std::move(ctx));
          },
          [self, ctx](caf::error& failure) mutable {
            ctx->report.problems.push_back("the ledger could not be read: " + describe(failure));
            finish_run(self, std::move(ctx));
          });
}

/// A settle or fail in the operation slot.
caf::result<payout_entry> enqueue_step(self_pointer self, std::string payout_id,
                                       domain::payout::command command) {
  if (auto full = line_full(self)) return *full;
  auto reply = self->make_response_promise<payout_entry>();
  enqueue(self, [self, reply, payout_id = std::move(payout_id), command = std::move(command)]() mutable {
    step(self, payout_id, std::move(command),
         [self, reply](expected<payout_entry, caf::error> outcome) mutable {
           if (outcome) {
             reply.deliver(std::move(outcome.value()));
           } else {
             reply.deliver(std::move(outcome).error());
           }
           operation_done(self);
         });
  });
  return reply;
}

payout_runner_actor::behavior_type payout_runner_behavior(self_pointer self,
                                                          payout_runner_peers peers,
                                                          payout_runner_options options) {
  auto& st = self->state;
  if (!options.clock_us) options.clock_us = system_clock_us;
  st.options = std::move(options);
  st.peers = std::move(peers);
  // The runner cannot work without its peers: it stops with them.
  self->monitor(st.peers.ledger);
  self->monitor(st.peers.payouts);
  self->set_down_handler([self](caf::down_msg& msg) { self->quit(msg.reason); });
  // The first run completes a step that a crash interrupted (a ledger movement without its payout
  // event, which `replay --verify` reports until then), then pays what is due: at once, unless the
  // owner asks for it itself.
  if (st.options.run_interval.count() > 0) {
    if (st.options.first_run_at_once) {
      self->send(self, tick_atom::value);
    } else {
      self->delayed_send(self, st.options.run_interval, tick_atom::value);
    }
  }
  return {
      [self](run_atom) -> caf::result<payout_report> {
        if (auto full = line_full(self)) return *full;
        auto reply = self->make_response_promise<payout_report>();
        enqueue(self, [self, reply]() mutable {
          run(self, [reply](payout_report report) mutable { reply.deliver(std::move(report)); });
        });
        return reply;
      },
      [self](settle_atom, std::string& payout_id, std::string& external_reference) {
        domain::settle_payout settle{payout_id, std::move(external_reference)};
        return enqueue_step(self, std::move(payout_id), std::move(settle));
      },
      [self](fail_atom, std::string& payout_id, std::string& reason) {
        domain::fail_payout fail{payout_id, std::move(reason)};
        return enqueue_step(self, std::move(payout_id), std::move(fail));
      },
      [self](state_atom) { return self->state.last_report; },
      [self](tick_atom) {
        // A timer run behind a full queue is skipped: the next tick tries again.
        if (!line_full(self)) enqueue(self, [self] { run(self, [](payout_report) {}); });
        self->delayed_send(self, self->state.options.run_interval, tick_atom::value);
      },
  };
}

}  // namespace

std::string automatic_payout_id(std::string_view provider_id, std::uint64_t sequence) {
  return "auto-" + std::string(provider_id) + "-" + std::to_string(sequence);
}

std::string at_once_reference(std::string_view payout_id) {
  return "at-once-" + std::string(payout_id);
}

payout_runner_actor spawn_payout_runner(caf::actor_system& system, payout_runner_peers peers,
                                        payout_runner_options options) {
  return system.spawn(payout_runner_behavior, std::move(peers), std::move(options));
}

}  // namespace gpustream::actors
