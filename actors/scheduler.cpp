#include "actors/scheduler.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "actors/errors.hpp"
#include "base/text.hpp"
#include "domain/scoring.hpp"

namespace gpustream::actors {

namespace {

/// What the scheduler knows of a live job (queued or running) beyond what the queue holds.
struct live_job {
  job_request request;
  /// Premium: the quote held against the user's balance, and the most the job may cost: it goes
  /// only to providers whose price quotes it at most this (job_queue), so its bill never passes
  /// what is held for it.
  std::int64_t hold_micros = 0;
  /// Free tier: the tokens (prompt + max_tokens) held against the user's daily quota until its
  /// usage is recorded, so that jobs running at once cannot together pass the quota.
  std::int64_t free_tokens_held = 0;
  std::int32_t priority = 0;
  std::string provider_id;       ///< running: the provider it is assigned to
  domain::model_price price;     ///< running: that provider's price for the model
  std::uint32_t attempt = 0;
  std::uint32_t declines = 0;  ///< attempts whose offer was declined untried: they spend none
  std::uint32_t tokens_so_far = 0;
  /// The providers whose backend refused the request itself (job_fault::request), each once.
  std::vector<std::string> rejected_by;
  bool running = false;
  std::string avoided_provider_id;  ///< the provider the last attempt failed on
  /// The answer began there: it waits for another provider when one could take it
  /// (queued_job::avoided_strictly).
  bool avoided_strictly = false;
  /// When the job first entered the queue: its age in the queue's order, kept when it comes back
  /// (its deadline is not: each wait in the queue is bounded by queue_wait_max on its own).
  std::int64_t queued_first_at_us = 0;
  /// The attempts that produced tokens and failed over: each provider is paid its own tokens.
  std::vector<domain::earlier_part> earlier;
  bool started = false;             ///< running: the first token arrived
  /// Completion or cancellation is being recorded: no other report or loss applies to it any more.
  bool ending = false;
  std::int64_t assigned_at_us = 0;  ///< running: when the current attempt was assigned
};

struct scheduler_state {
  // Declared so that the state is no aggregate (CAF would try to build it from the actor pointer).
  scheduler_state() = default;

  scheduler_options options;
  scheduler_peers peers;
  std::unique_ptr<domain::selection_index> index;
  std::unique_ptr<domain::job_queue> queue;
  std::unique_ptr<domain::sticky_sessions> sticky;  ///< conversation -> provider its last answer completed on
  std::map<std::string, provider_session> sessions;  ///< by provider id
  std::map<std::string, live_job> jobs;              ///< by job id
  std::map<std::string, std::int64_t> holds_micros;  ///< premium quotes held, by user id
  std::map<std::string, std::int64_t> free_tokens_held;  ///< free jobs' tokens held, by user id
  /// Prices of the online offers of each model, to quote a premium job's worst case.
  std::map<std::string, std::multiset<std::int64_t>> input_prices;
  std::map<std::string, std::multiset<std::int64_t>> output_prices;
  /// When each provider's suspension ends, by provider id, for those suspended until a time not
  /// yet past: lifted by the tick. Kept while a provider is offline too, since a suspension may
  /// be recorded between its links (its next listing then says so as well).
  std::map<std::string, std::int64_t> suspended_until_us;
  /// Providers whose link loss was counted against them already (on one of the jobs it took):
  /// until they are listed again, the other jobs it took count no more.
  std::set<std::string> losses_counted;
  std::uint64_t passes = 0;
  std::uint64_t side_effects_failed = 0;
  /// A job's bill whose ledger group the store failed to take (the job's end, with the bill, is
  /// recorded), or whose end's append failed in a way that may have recorded it all the same (a
  /// failed fsync). Its premium hold stays in holds_micros until the ledger takes or refuses the
  /// group, or the end proves unrecorded: released at once, it would let new jobs spend what the
  /// bill needs, and the bill could be refused for good when serve settles it at its next start.
  struct unsettled_group {
    std::string user_id;
    std::int64_t hold_micros = 0;
    domain::record_transfers group;
    /// What the settlement does once the ledger took the group: the provider's score (a completed
    /// job) and the free tokens counted against the user's quota.
    std::string provider_id;
    bool completed = false;
    domain::job_measure measure;
    std::uint32_t free_tokens = 0;
    /// The job's hold on the user's free quota: kept until its usage is recorded, as on the
    /// first try, so that jobs admitted meanwhile still see these tokens.
    std::int64_t free_tokens_held = 0;
    std::int64_t retry_at_us = 0;
    std::int64_t wait_us = 0;
    bool in_flight = false;
    /// Whether the job's end, with this bill, is recorded is not known yet: the retry first reads
    /// the job's state (its actor recovers from the store, which reopens after a disk failure).
    bool end_unknown = false;
  };
  std::map<std::string, unsettled_group> unsettled;  ///< by job id

  static inline const char* name = "gpustream.scheduler";
};

using self_pointer = scheduler_actor::stateful_pointer<scheduler_state>;

std::int64_t now_us(self_pointer self) { return self->state.options.clock_us(); }

caf::error refusal(domain::errc code, std::string message) {
  return make_error(domain::error{code, std::move(message)});
}

// ---------------------------------------------------------------------------------------------
// Prices of online offers.

void add_prices(self_pointer self, const domain::provider_listing& listing) {
  for (const auto& offer : listing.offers) {
    self->state.input_prices[offer.model_name].insert(offer.input_price_micros_per_mtok);
    self->state.output_prices[offer.model_name].insert(offer.output_price_micros_per_mtok);
  }
}

void remove_prices(self_pointer self, const domain::online_provider& provider) {
  auto erase_one = [](auto& book, const std::string& model, std::int64_t price) {
    auto prices = book.find(model);
    if (prices == book.end()) return;
    if (auto at = prices->second.find(price); at != prices->second.end()) prices->second.erase(at);
    if (prices->second.empty()) book.erase(prices);
  };
  for (const auto& offer : provider.offers) {
    erase_one(self->state.input_prices, offer.model_name, offer.input_price_micros_per_mtok);
    erase_one(self->state.output_prices, offer.model_name, offer.output_price_micros_per_mtok);
  }
}

/// The most any online provider charges for the model: a premium job's quote is its worst case.
domain::model_price worst_price(self_pointer self, const std::string& model) {
  domain::model_price price;
  if (auto in = self->state.input_prices.find(model); in != self->state.input_prices.end()) {
    price.input_micros_per_mtok = *in->second.rbegin();
  }
  if (auto out = self->state.output_prices.find(model); out != self->state.output_prices.end()) {
    price.output_micros_per_mtok = *out->second.rbegin();
  }
  return price;
}

domain::model_price offer_price(self_pointer self, const std::string& provider_id,
                                const std::string& model) {
  if (const auto* provider = self->state.index->find(provider_id)) {
    for (const auto& offer : provider->offers) {
      if (offer.model_name == model) {
        return {offer.input_price_micros_per_mtok, offer.output_price_micros_per_mtok};
      }
    }
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Ending jobs.

void fail_unservable(self_pointer self, std::string_view what_happened);

/// Routing follows what a job's outcome did to its provider: a new level or score (a lower level
/// may leave queued jobs of a higher tier with nobody), or a suspension, which keeps new jobs off
/// it (its running ones go on) until the suspension ends.
void apply_standing(self_pointer self, const std::string& provider_id, const std::vector<events::event>& recorded) {
  auto& st = self->state;
  bool fewer_serve = false;
  for (const auto& e : recorded) {
    if (const auto* scored = std::get_if<events::provider_scored>(&e)) {
      const auto* listed = st.index->find(provider_id);  // none: offline meanwhile
      if (listed != nullptr && scored->level < listed->level) fewer_serve = true;
      (void)st.index->rescore(provider_id, scored->level, scored->total_score);
    } else if (const auto* suspension = std::get_if<events::provider_suspended>(&e)) {
      auto& until = st.suspended_until_us[provider_id];
      until = std::max(until, suspension->suspended_until_at_us);
      fewer_serve |= st.index->set_suspended(provider_id, true);  // false: offline meanwhile
    }
  }
  if (fewer_serve) fail_unservable(self, "was suspended or lost its level");
}

/// Tells the provider's actor how a job it ran ended (`fault` none: finished, with `measure`); the
/// provider's score counts only its own faults. The job does not wait for it; its failure (the
/// aggregate's store failed) is counted, never hidden: scheduler_counts reports it.
void record_outcome(self_pointer self, const std::string& provider_id, const std::string& job_id,
                    domain::job_fault fault, const domain::job_measure& measure = {},
                    const std::string& requested_by = {}) {
  self->request(self->state.peers.providers, caf::infinite, provider_id,
                domain::provider::command{domain::provider::record_job_outcome{job_id, fault, measure, requested_by}})
      .then([self, provider_id](const command_reply& r) { apply_standing(self, provider_id, r.events); },
            [self](caf::error&) { ++self->state.side_effects_failed; });
}

/// Lifts the suspensions that have ended.
void end_suspensions(self_pointer self) {
  auto& st = self->state;
  const std::int64_t now = now_us(self);
  for (auto it = st.suspended_until_us.begin(); it != st.suspended_until_us.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    (void)st.index->set_suspended(it->first, false);  // false: offline, and listed anew when it links
    it = st.suspended_until_us.erase(it);
  }
}

/// Takes `amount` off `user_id`'s entry in `holds`, dropping it at zero.
void release(std::map<std::string, std::int64_t>& holds, const std::string& user_id, std::int64_t amount) {
  if (amount == 0) return;
  auto held = holds.find(user_id);
  if (held == holds.end()) return;
  held->second -= amount;
  if (held->second <= 0) holds.erase(held);
}

void release_hold(self_pointer self, const live_job& job) {
  release(self->state.holds_micros, job.request.user_id, job.hold_micros);
  release(self->state.free_tokens_held, job.request.user_id, job.free_tokens_held);
}

/// Forgets a job that ended: its hold, its provider slot, and its actor, which the jobs registry
/// stops once its last append is done instead of keeping it for idle_max (at 1,000 jobs a second
/// that would be 60,000 idle actors).
void forget(self_pointer self, const std::string& job_id) {
  auto found = self->state.jobs.find(job_id);
  if (found == self->state.jobs.end()) return;
  release_hold(self, found->second);
  if (found->second.running) (void)self->state.index->job_finished(found->second.provider_id);
  self->state.jobs.erase(found);
  self->send(self->state.peers.jobs, passivate_atom::value, job_id);
}

void assign_pass(self_pointer self);

/// forget, then a job that held a provider's slot offers it to the next queued job now rather
/// than at the next tick (up to tick_interval later).
void forget_and_assign(self_pointer self, const std::string& job_id) {
  const auto found = self->state.jobs.find(job_id);
  const bool held_slot = found != self->state.jobs.end() && found->second.running;
  forget(self, job_id);
  if (held_slot) assign_pass(self);
}

/// `tokens` as the job's record takes them: never more than its max_tokens, the most it was
/// quoted and admitted for. The relay counts the content chunks the client got, and a backend may
/// send more chunks than tokens, or ignore max_tokens; the client is then billed the maximum.
std::uint32_t within_budget(const live_job& job, std::uint32_t tokens) {
  return std::min(tokens, job.request.max_tokens);
}

/// Tells the job's watcher, if it has one, how the job ended.
void notify_watcher(self_pointer self, const std::string& job_id, const job_ended& ended) {
  auto found = self->state.jobs.find(job_id);
  if (found != self->state.jobs.end() && found->second.request.watcher) {
    self->send(found->second.request.watcher, ended);
  }
}

/// Lets go of a job whose next step could not be recorded (`failure`): its watcher is told it
/// failed, so that its client gets an error rather than wait for an answer that will not come.
void drop_unrecorded(self_pointer self, const std::string& job_id, const caf::error& failure) {
  notify_watcher(self, job_id,
                 job_ended{job_id, domain::job_status::failed, 0, 0,
                           "the job could not be recorded: " + describe(failure)});
  forget_and_assign(self, job_id);
}

/// Records the job as failed (persisted), then forgets it. `done` gets the outcome; so does the
/// job's watcher.
template <class Done>
void fail_job(self_pointer self, const std::string& job_id, events::failure_reason reason,
              std::string message, Done done) {
  // A backend's error may be longer than the job's record takes (4 KiB on the link, 1,000 bytes
  // recorded): the record would refuse the whole end, and the job would never end.
  if (const auto max = domain::job_options{}.message_length_max; message.size() > max) {
    static constexpr std::string_view cut = " …";
    message = std::string(utf8_prefix(message, max - cut.size())) + std::string(cut);
  }
  self->request(self->state.peers.jobs, caf::infinite, job_id,
                domain::job::command{domain::fail_job{reason, message}})
      .then(
          [self, job_id, message, reason, done](const command_reply&) mutable {
            job_ended ended{job_id, domain::job_status::failed, 0, 0, message, reason};
            notify_watcher(self, job_id, ended);
            forget_and_assign(self, job_id);
            done(std::move(ended));
          },
          [self, job_id, done](caf::error& failure) mutable {
            drop_unrecorded(self, job_id, failure);
            done(failure);
          });
}

/// What a job ending with `outcome` after `completion_tokens` owes: its ledger group, built before
/// the end is recorded so that the end records it (events::ledger_bill) and a stop before the
/// ledger's append leaves the bill in the log, for `serve` to settle when it starts again.
expected<domain::job_settlement, domain::error> bill_of(self_pointer self, const std::string& job_id,
                                                        domain::job_outcome outcome, std::uint32_t prompt_tokens,
                                                        std::uint32_t completion_tokens,
                                                        std::optional<domain::ad_charge> ad,
                                                        bool attempt_started = true) {
  const auto& job = self->state.jobs.at(job_id);
  domain::job_bill bill{.job_id = job_id,
                        .user_id = job.request.user_id,
                        .provider_id = job.provider_id,
                        .premium = job.request.premium,
                        .outcome = outcome,
                        .price = job.price,
                        .quality = job.request.quality,
                        .prompt_tokens = prompt_tokens,
                        .completion_tokens = completion_tokens,
                        .ad = std::move(ad),
                        .earlier = job.earlier};
  if (!attempt_started && !bill.earlier.empty()) {
    // The attempt under way (or waiting to be offered) had not begun its answer: the prompt and
    // the last tokens are the last provider's that produced any, at its price.
    bill.provider_id = bill.earlier.back().provider_id;
    bill.price = bill.earlier.back().price;
    bill.earlier.pop_back();
  }
  return domain::settle_job(bill, self->state.options.pricing);
}

/// The bill as the job's end records it: none when nothing is owed, or when it could not be made
/// (the end is recorded anyway, and its requester gets the error).
events::ledger_bill recorded_bill(const expected<domain::job_settlement, domain::error>& settled) {
  if (!settled || settled.value().group.transfers.empty()) return {};
  return domain::to_bill(settled.value().group);
}

/// What the end of a job settled as `settled` after `prompt_tokens` and `completion_tokens`
/// counts against a free user's daily quota, recorded with the end like its bill: both; nothing
/// for a premium job, or an end that could not be settled (which records no usage either).
std::uint32_t recorded_free_tokens(const live_job& job,
                                   const expected<domain::job_settlement, domain::error>& settled,
                                   std::uint32_t prompt_tokens, std::uint32_t completion_tokens) {
  if (job.request.premium || !settled) return 0;
  return prompt_tokens + completion_tokens;
}

/// The prompt tokens a completed job bills: the backend's own count when it reported one below
/// the platform's estimate (which rounds up: a token per 3 bytes, while a tokenizer takes about
/// 4 on English text), never more than the estimate the job was quoted and admitted with. A
/// backend's count includes its chat template and, after a failover, the answer so far, so it
/// only ever lowers the bill; a count far below the estimate (under prompt_count_floor_percent
/// of it) is taken as none: some backends leave out the tokens they found in their cache.
std::uint32_t billed_prompt_tokens(const scheduler_options& options, const live_job& job, std::uint32_t reported) {
  const std::uint32_t estimate = job.request.prompt_tokens;
  if (std::uint64_t{reported} * 100 < std::uint64_t{estimate} * options.prompt_count_floor_percent) return estimate;
  return std::min(reported, estimate);
}

/// Whether the ledger found the group's ids claimed (key_taken): an earlier try of it was written
/// after all, and the ledger's window forgot it since.
bool written_before(const caf::error& failure) {
  const auto stored = storage_error_of(failure);
  return stored && stored->code == storage::errc::key_taken;
}

/// Whether the ledger is done with a group it did not take now: refused for good (a domain
/// refusal other than busy; a store that cannot be written as it is), or written_before.
/// Anything else (the disk, a full queue, a ledger starting again) may pass on a later try.
bool settled_otherwise(const caf::error& failure) {
  if (const auto refused = domain_error_of(failure)) return refused->code != domain::errc::busy;
  const auto stored = storage_error_of(failure);
  if (!stored) return false;  // the ledger stopped (request_receiver_down): its keeper starts it again
  switch (stored->code) {
    case storage::errc::io_error:
    case storage::errc::no_space:
    case storage::errc::overloaded:
    case storage::errc::event_id_conflict:  // a ledger that read the log before the store reopened
    case storage::errc::wrong_expected_version:
      return false;
    case storage::errc::key_taken:
    case storage::errc::invalid_argument:
    case storage::errc::corruption:
    case storage::errc::incompatible_format:
    case storage::errc::closed:
      return true;
  }
  return true;
}

constexpr std::int64_t settle_retry_first_us = 1'000'000;
constexpr std::int64_t settle_retry_max_us = 60'000'000;

/// Records `free_tokens` of job `job_id` against `user_id`'s daily quota (none: nothing to
/// record), then releases the job's `held` tokens: a user's state answers what is recorded, so a
/// job admitted in between must still see them.
void record_free_usage(self_pointer self, const std::string& user_id, const std::string& job_id,
                       std::uint32_t free_tokens, std::int64_t held) {
  if (free_tokens == 0) return release(self->state.free_tokens_held, user_id, held);
  self->request(self->state.peers.users, caf::infinite, user_id,
                domain::user::command{domain::record_free_usage{job_id, free_tokens}})
      .then([self, user_id, held](const command_reply&) { release(self->state.free_tokens_held, user_id, held); },
            [self, user_id, held](caf::error&) {
              ++self->state.side_effects_failed;
              release(self->state.free_tokens_held, user_id, held);
            });
}

/// Job `job_id`'s group is not taken now: it is retried (see unsettled_group), the job's premium
/// hold and free quota hold moving with it, once its end is known to be recorded (`end_unknown`
/// false). A group the ledger refused for good is not kept: its holds go with the job's forget.
void keep_unsettled(self_pointer self, const std::string& job_id, domain::record_transfers group, bool completed,
                    const domain::job_measure& measure, std::uint32_t free_tokens, bool end_unknown) {
  auto& job = self->state.jobs.at(job_id);
  self->state.unsettled[job_id] = {.user_id = job.request.user_id,
                                   .hold_micros = job.hold_micros,
                                   .group = std::move(group),
                                   .provider_id = job.provider_id,
                                   .completed = completed,
                                   .measure = measure,
                                   .free_tokens = free_tokens,
                                   .free_tokens_held = job.free_tokens_held,
                                   .retry_at_us = now_us(self) + settle_retry_first_us,
                                   .wait_us = settle_retry_first_us,
                                   .in_flight = false,
                                   .end_unknown = end_unknown};
  job.hold_micros = 0;  // held on by the retry, not released by forget
  job.free_tokens_held = 0;
}

/// The bill of job `job_id`, ended before this start, that serve's start could not settle: kept
/// unsettled as the scheduler's own are, and retried at once; what its premium user pays (the
/// transfers from the user's account) is held meanwhile. Nothing to score (the provider's outcome
/// is recorded with the end) and no free usage (serve's start records that by itself).
void adopt_bill(self_pointer self, const std::string& job_id, const events::ledger_bill& bill) {
  auto& st = self->state;
  if (bill.transfers.empty() || st.unsettled.contains(job_id) || st.jobs.contains(job_id)) return;
  const std::string user_prefix = domain::user_account("");
  std::string user_id;
  std::int64_t hold = 0;
  for (const auto& t : bill.transfers) {
    if (!t.debit_account.starts_with(user_prefix)) continue;
    user_id = t.debit_account.substr(user_prefix.size());
    hold += t.amount_micros;
  }
  if (hold > 0) st.holds_micros[user_id] += hold;
  st.unsettled[job_id] = {.user_id = user_id,
                          .hold_micros = hold,
                          .group = domain::from_bill(bill),
                          .provider_id = {},
                          .completed = false,
                          .measure = {},
                          .free_tokens = 0,
                          .free_tokens_held = 0,
                          .retry_at_us = now_us(self),
                          .wait_us = settle_retry_first_us,
                          .in_flight = false,
                          .end_unknown = false};
}

/// What settle does after the ledger took a group, for a group a retry got taken: the provider's
/// score and the user's free usage, which then releases the quota hold.
void after_retried(self_pointer self, const std::string& job_id, const scheduler_state::unsettled_group& e) {
  if (e.completed) record_outcome(self, e.provider_id, job_id, domain::job_fault::none, e.measure, e.user_id);
  record_free_usage(self, e.user_id, job_id, e.free_tokens, e.free_tokens_held);
}

/// An unsettled group's try found nothing certain: the next one waits twice as long.
void back_off(self_pointer self, scheduler_state::unsettled_group& e) {
  e.in_flight = false;
  e.wait_us = std::min(e.wait_us * 2, settle_retry_max_us);
  e.retry_at_us = now_us(self) + e.wait_us;
}

/// Reads whether the end of job `job_id`, whose append failed with its fate open, is recorded: if
/// so its group goes to the ledger at the next tick; if not, its holds are released and the job,
/// live in the log with nothing running it, is recorded as failed (else serve's next start would).
/// A read that fails is tried again later.
void learn_end(self_pointer self, const std::string& job_id) {
  auto passivate = [self, job_id] { self->send(self->state.peers.jobs, passivate_atom::value, job_id); };
  self->request(self->state.peers.jobs, caf::infinite, job_id, state_atom::value)
      .then(
          [self, job_id, passivate](const domain::job_state& job) {
            auto found = self->state.unsettled.find(job_id);
            if (found == self->state.unsettled.end()) return passivate();
            auto& e = found->second;
            // The scheduler sends a job's end once: an ended job holds that end and its bill.
            if (job.status == domain::job_status::completed || job.status == domain::job_status::cancelled) {
              if (e.group.transfers.empty()) {  // nothing for the ledger (a provider at price 0): the usage
                after_retried(self, job_id, e);
                release(self->state.holds_micros, e.user_id, e.hold_micros);
                self->state.unsettled.erase(found);
                return passivate();
              }
              e.end_unknown = false;
              e.in_flight = false;
              e.retry_at_us = now_us(self);
              return passivate();
            }
            release(self->state.free_tokens_held, e.user_id, e.free_tokens_held);
            release(self->state.holds_micros, e.user_id, e.hold_micros);
            self->state.unsettled.erase(found);
            if (domain::is_terminal(job.status)) return passivate();
            self->request(self->state.peers.jobs, caf::infinite, job_id,
                          domain::job::command{domain::fail_job{events::failure_reason::internal,
                                                                "its end could not be recorded"}})
                .then([passivate](const command_reply&) { passivate(); },
                      [self, passivate](const caf::error&) {
                        ++self->state.side_effects_failed;  // serve's next start fails it
                        passivate();
                      });
          },
          [self, job_id](const caf::error&) {
            if (auto found = self->state.unsettled.find(job_id); found != self->state.unsettled.end()) {
              back_off(self, found->second);
            }
          });
}

/// Offers each unsettled group that is due to the ledger again (after learning whether its end is
/// recorded, where that is not known).
void retry_unsettled(self_pointer self) {
  const std::int64_t now = now_us(self);
  for (auto& [job_id, entry] : self->state.unsettled) {
    if (entry.in_flight || entry.retry_at_us > now) continue;
    entry.in_flight = true;
    if (entry.end_unknown) {
      learn_end(self, job_id);
      continue;
    }
    auto settled = [self, job_id = job_id](bool applied, const caf::error* failure) {
      auto found = self->state.unsettled.find(job_id);
      if (found == self->state.unsettled.end()) return;
      auto& e = found->second;
      if (!applied && !settled_otherwise(*failure)) return back_off(self, e);
      // Refused for good: counted (serve's start finds the bill without its group and reports it).
      const bool written = applied || written_before(*failure);
      if (written) {
        after_retried(self, job_id, e);
      } else {
        ++self->state.side_effects_failed;
        record_free_usage(self, e.user_id, job_id, e.free_tokens, e.free_tokens_held);  // the end counts them
      }
      release(self->state.holds_micros, e.user_id, e.hold_micros);
      self->state.unsettled.erase(found);
    };
    self->request(self->state.peers.ledger, caf::infinite, domain::ledger::command{entry.group})
        .then([settled](const command_reply&) mutable { settled(true, nullptr); },
              [settled](caf::error& failure) mutable { settled(false, &failure); });
  }
}

/// The append of job `job_id`'s end (with `settled`'s bill) failed. A refusal recorded nothing:
/// the job is forgotten with its holds. Any other failure (a failed fsync, the job's actor
/// stopped) may have recorded it all the same, and serve's next start would then settle the bill:
/// its holds stay until the job's state tells (learn_end).
void end_failed(self_pointer self, const std::string& job_id, const caf::error& failure,
                const expected<domain::job_settlement, domain::error>* settled, bool completed,
                const domain::job_measure& measure, std::uint32_t free_tokens) {
  if (!domain_error_of(failure) && settled && *settled &&
      (!settled->value().group.transfers.empty() || free_tokens > 0)) {
    keep_unsettled(self, job_id, settled->value().group, completed, measure, free_tokens, true);
  }
  forget_and_assign(self, job_id);
}

/// Moves the money of a job whose end (with `settled`'s bill and `free_tokens`) is recorded,
/// scores its provider and records the free usage; then answers `reply` and forgets the job.
void settle(self_pointer self, const std::string& job_id, domain::job_outcome outcome,
            expected<domain::job_settlement, domain::error> settled, std::uint32_t prompt_tokens_billed,
            std::uint32_t free_tokens, const domain::job_measure& measure,
            caf::typed_response_promise<job_ended> reply) {
  if (!settled) {
    forget_and_assign(self, job_id);
    reply.deliver(make_error(settled.error()));
    return;
  }
  job_ended ended{job_id,
                  outcome == domain::job_outcome::completed ? domain::job_status::completed
                                                            : domain::job_status::cancelled,
                  settled.value().gross_micros, settled.value().platform_fee_micros};
  ended.prompt_tokens = prompt_tokens_billed;
  ended.completion_tokens = measure.completion_tokens;
  auto after_ledger = [self, job_id, outcome, free_tokens, measure, ended, reply]() mutable {
    auto& job = self->state.jobs.at(job_id);
    if (outcome == domain::job_outcome::completed) {
      record_outcome(self, job.provider_id, job_id, domain::job_fault::none, measure, job.request.user_id);
      // Its speed as the provider aggregate scores it (with the default scoring options it runs
      // on): a burst of pieces ranks no faster than its whole attempt.
      const auto speed = domain::credible_tokens_per_second(measure, domain::scoring_options{});
      (void)self->state.index->record_speed(job.provider_id, job.request.model, measure.ttft_us,
                                            static_cast<std::int64_t>(speed));
    }
    // The hold is released by the record's answer, not by forget.
    record_free_usage(self, job.request.user_id, job_id, free_tokens, std::exchange(job.free_tokens_held, 0));
    forget(self, job_id);
    reply.deliver(ended);
    assign_pass(self);
  };
  if (settled.value().group.transfers.empty()) {
    after_ledger();
    return;
  }
  self->request(self->state.peers.ledger, caf::infinite, domain::ledger::command{settled.value().group})
      .then([after_ledger](const command_reply&) mutable { after_ledger(); },
            [self, job_id, reply, outcome, measure, free_tokens, ended, after_ledger,
             group = std::move(settled.value().group)](caf::error& failure) mutable {
              if (written_before(failure)) return after_ledger();
              const bool retried = !settled_otherwise(failure);
              if (retried) {
                keep_unsettled(self, job_id, std::move(group), outcome == domain::job_outcome::completed, measure,
                               free_tokens, false);
              } else {
                // Refused for good: the end, with its free tokens, is recorded all the same, and
                // they count against the user's quota now (not only from the next start).
                auto& job = self->state.jobs.at(job_id);
                record_free_usage(self, job.request.user_id, job_id, free_tokens, std::exchange(job.free_tokens_held, 0));
              }
              forget(self, job_id);
              ended.bill_unsettled = std::string(retried ? "retried until the ledger takes it" : "left to the next start") +
                                     ": " + describe(failure);
              // The job's end, with its bill, is recorded already: the answer is the client's, as
              // billed. An error instead would be no refusal (nothing recorded, the ad's impression
              // taken back) and no failure either: SDKs retry one, and the retry is billed again.
              reply.deliver(ended);
              assign_pass(self);
            });
}

// ---------------------------------------------------------------------------------------------
// Queueing and assigning.

domain::job::command submit_command(const job_request& r) {
  return domain::submit_job{r.job_id,           r.user_id,    r.model,
                            r.quality,          r.prompt_tokens, r.max_tokens,
                            r.max_price_micros, r.premium,    r.conversation_id};
}

/// The highest price per million tokens of a provider the job may go to: the client's own limit,
/// within the most the platform pays for a free job (true: that is the lower); none for no cap.
std::pair<std::optional<std::int64_t>, bool> price_cap_of(self_pointer self, const job_request& request) {
  const std::optional<std::int64_t> clients =
      request.max_price_micros > 0 ? std::optional<std::int64_t>(request.max_price_micros) : std::nullopt;
  const std::int64_t platforms = self->state.options.free_tier_price_micros_per_mtok_max;
  if (request.premium || (clients && *clients <= platforms)) return {clients, false};
  return {platforms, true};
}

/// The context window the job needs now: as asked, and after a failover at least the prompt, the
/// answer so far (which its continuation carries) and one more token. 0: any.
std::uint32_t window_of(const live_job& job) {
  const std::uint32_t asked = job.request.context_tokens_min;
  if (asked == 0) return 0;
  return std::max(asked, job.request.prompt_tokens + job.tokens_so_far + 1);
}

/// The user whose providers the job may not go to (domain::queued_job::owner_excluded): a free
/// job's own, since the subsidy would pay them for their own work; none for a premium job.
std::string owner_excluded(const job_request& request) { return request.premium ? std::string() : request.user_id; }

/// Why an answer that broke off on `broken_on` fails when no provider will take it on.
std::string stranded_message(const std::string& broken_on, const std::string& model) {
  return "the answer broke off on provider " + broken_on + " and every provider of model " + model +
         " that could take it on is draining or gone";
}

/// The providers the job may go to: none of owner_excluded's (empty: any).
domain::candidate_filter not_owned_by(const job_request& request) {
  auto owner = owner_excluded(request);
  if (owner.empty()) return {};
  return [owner = std::move(owner)](const domain::online_provider& p, const domain::online_offer&) {
    return p.owner_user_id != owner;
  };
}

/// Whether an online provider other than `excluded` serves the job's model at its tier and may
/// take it (not one of owner_excluded's).
bool others_serve(self_pointer self, const live_job& job, const std::string& excluded) {
  const auto& r = job.request;
  return self->state.index->can_serve(r.model, r.quality, excluded, not_owned_by(r));
}

/// Why an answer that broke off on `broken_on` cannot go on, or nothing when it can: another
/// provider must serve the model, and one (`broken_on` included, which it goes back to when no
/// other may) must take work; a draining or unreachable one never will on its link.
std::optional<std::string> stranded_answer(self_pointer self, const live_job& job, const std::string& broken_on) {
  const auto& r = job.request;
  if (!others_serve(self, job, broken_on)) {
    return "the answer broke off on provider " + broken_on + " and no other provider serves model " + r.model;
  }
  if (!self->state.index->may_take_work(r.model, r.quality, {}, not_owned_by(r))) {
    return stranded_message(broken_on, r.model);
  }
  return std::nullopt;
}

/// A conversation's key for sticky sessions: its id is the client's to choose, so it is the user's
/// own (a common id such as "default" does not gather every user on one provider, nor does one
/// user's id reach another's prompt cache). Empty for a job of no conversation.
std::string sticky_key(const job_request& request) {
  if (request.conversation_id.empty()) return {};
  return request.user_id + '\n' + request.conversation_id;
}

/// Puts the job in the queue, due by `deadline`. A premium job goes only to a provider whose quote
/// for what is left of it (its prompt and the tokens it may still produce) fits what is left of its
/// hold after the attempts before (domain::hold_left_micros): its whole bill stays within the hold.
expected<void, domain::error> push_queued(self_pointer self, const std::string& job_id, std::int64_t now,
                                 std::int64_t deadline) {
  const auto& job = self->state.jobs.at(job_id);
  const auto [price_max, price_cap_is_platforms] = price_cap_of(self, job.request);
  const auto sticky = self->state.sticky->provider_for(sticky_key(job.request), now);
  std::optional<std::int64_t> cost_max;
  if (job.request.premium) {
    auto left = domain::hold_left_micros(job.hold_micros, job.earlier, job.request.quality,
                                         self->state.options.pricing);
    if (!left) return unexpected{left.error()};
    cost_max = *left;
  }
  return self->state.queue->push(domain::queued_job{.job_id = job_id,
                                                    .model = job.request.model,
                                                    .quality = job.request.quality,
                                                    .priority = job.priority,
                                                    .queued_at_us = job.queued_first_at_us,
                                                    .deadline_at_us = deadline,
                                                    .preferred_provider_id = std::string(sticky.value_or("")),
                                                    .avoided_provider_id = job.avoided_provider_id,
                                                    .avoided_strictly = job.avoided_strictly,
                                                    .returning = job.attempt > 0,
                                                    .cost_max_micros = cost_max,
                                                    .price_max_micros_per_mtok = price_max,
                                                    .price_cap_is_platforms = price_cap_is_platforms,
                                                    .context_tokens_min = window_of(job),
                                                    .prompt_tokens = job.request.prompt_tokens,
                                                    .max_tokens = job.request.max_tokens - job.tokens_so_far,
                                                    .owner_excluded = owner_excluded(job.request)},
                                 *self->state.index, now);
}

events::failure_reason failure_reason_of(const domain::error& refusal) {
  return refusal.code == domain::errc::no_provider ? events::failure_reason::no_provider
                                                   : events::failure_reason::internal;
}

/// Tells `provider_id`'s session, if it is online, to stop working on `job_id`.
void cancel_at_provider(self_pointer self, const std::string& provider_id, const std::string& job_id) {
  if (auto session = self->state.sessions.find(provider_id); session != self->state.sessions.end()) {
    self->send(session->second, cancel_atom::value, job_id);
  }
}

/// Takes back a job whose submission or assignment could not be recorded: out of the queue, or
/// its offer cancelled at its provider; then forgotten. A job already ending (cancelled) is left to
/// its ending, which forgets it.
void withdraw(self_pointer self, const std::string& job_id) {
  auto found = self->state.jobs.find(job_id);
  if (found == self->state.jobs.end() || found->second.ending) return;
  if (found->second.running) {
    cancel_at_provider(self, found->second.provider_id, job_id);
  } else {
    (void)self->state.queue->remove(job_id);
  }
  forget(self, job_id);
}

/// Persists a job going back to the queue as queued and puts it there; answers `reply` either way.
template <class Reply>
void enqueue(self_pointer self, const std::string& job_id, Reply reply) {
  auto& job = self->state.jobs.at(job_id);
  const std::int64_t now = now_us(self);
  const std::int64_t deadline = now + self->state.options.queue_wait_max.count();
  self->request(self->state.peers.jobs, caf::infinite, job_id,
                domain::job::command{domain::queue_job{job.priority, deadline}})
      .then(
          [self, job_id, deadline, now, reply](const command_reply&) mutable {
            if (auto pushed = push_queued(self, job_id, now, deadline); !pushed) {
              auto error = make_error(pushed.error());
              fail_job(self, job_id, failure_reason_of(pushed.error()), pushed.error().message,
                       [reply, error](auto&&) mutable { reply(error); });
              return;
            }
            reply(job_accepted{job_id, self->state.jobs.at(job_id).priority, deadline});
            assign_pass(self);
          },
          [self, job_id, reply](caf::error& failure) mutable {
            drop_unrecorded(self, job_id, failure);
            reply(failure);
          });
}

/// Hands an assigned job to its provider's session, or back to the queue if the session is gone.
void offer(self_pointer self, const std::string& job_id) {
  auto found = self->state.jobs.find(job_id);
  if (found == self->state.jobs.end() || !found->second.running || found->second.ending) return;
  auto& job = found->second;
  auto session = self->state.sessions.find(job.provider_id);
  if (session == self->state.sessions.end()) return;  // offline: its jobs were handled there
  self->send(session->second, offer_atom::value,
             job_offer{job_id, job.request.model, job.request.quality, job.request.prompt_tokens,
                       job.request.max_tokens, job.attempt, job.tokens_so_far});
}

/// The assignment of attempt `attempt` could not be recorded (the job's stream failed). Unless the
/// job moved on meanwhile (cancelled, reassigned, ended), the offer already made is withdrawn and
/// the job ends failed for its client.
void assignment_failed(self_pointer self, const std::string& job_id, std::uint32_t attempt,
                       const caf::error& failure) {
  auto found = self->state.jobs.find(job_id);
  if (found == self->state.jobs.end() || found->second.attempt != attempt || !found->second.running ||
      found->second.ending) {
    return;
  }
  notify_watcher(self, job_id,
                 job_ended{job_id, domain::job_status::failed, 0, 0,
                           "the job's assignment could not be recorded: " + describe(failure)});
  withdraw(self, job_id);
}

void assign_pass(self_pointer self) {
  auto& st = self->state;
  // A pass makes at most assignments_per_pass_max assignments; a full one may leave more to do.
  for (bool full = true; full && !st.queue->empty();) {
    domain::assign_options how = st.options.assign;
    how.random_seed = st.options.assign.random_seed + ++st.passes;
    // One time for the choice and for what records it (assign_job::chosen_at_us): the job's
    // actor checks the deadline against the moment the queue let the job go.
    const std::int64_t now = now_us(self);
    auto assignments = st.queue->pop_assignable(*st.index, how, now);
    full = assignments.size() == st.options.queue.assignments_per_pass_max;
    for (auto& a : assignments) {
      auto& job = st.jobs.at(a.job.job_id);
      job.running = true;
      job.started = false;
      job.assigned_at_us = now;
      job.provider_id = a.provider_id;
      job.price = offer_price(self, a.provider_id, job.request.model);
      job.attempt += 1;
      const std::string job_id = a.job.job_id;
      const std::uint32_t attempt = job.attempt;
      self->request(st.peers.jobs, caf::infinite, job_id,
                    domain::job::command{domain::assign_job{a.provider_id, job.assigned_at_us}})
          .then([](const command_reply&) {},
                [self, job_id, attempt](caf::error& failure) { assignment_failed(self, job_id, attempt, failure); });
      // The provider starts while the assignment is being persisted: the first token does not wait
      // for an fsync. Everything the job records later (its start, result or cancel) goes to the
      // same job actor after the assignment and is appended after it; nothing is billed before.
      offer(self, job_id);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Submission.

/// Records a refused job (submitted and failed with `reason`, in one append) and answers `reply`
/// with `error`; a malformed request is refused as such, with nothing recorded.
void refuse_job(self_pointer self, const std::string& job_id, events::failure_reason reason,
                caf::error error, caf::typed_response_promise<job_accepted> reply) {
  std::vector<domain::job::command> commands{
      submit_command(self->state.jobs.at(job_id).request),
      domain::fail_job{reason, describe(error)}};
  self->request(self->state.peers.jobs, caf::infinite, job_id, std::move(commands))
      .then(
          [self, job_id, error, reply](const command_reply&) mutable {
            forget(self, job_id);
            reply.deliver(error);
          },
          [self, job_id, reply](caf::error& failure) mutable {
            forget(self, job_id);
            reply.deliver(failure);
          });
}

/// The checks passed: the job goes into the queue at once, and may be offered to a provider,
/// while it is recorded as submitted and queued (one append): the first token does not wait for
/// an fsync. Every later command for the job reaches its actor after this one and is appended
/// after it (its assignment, start, end); nothing is billed before its end is recorded. If the
/// submission cannot be recorded, the job is withdrawn and the client refused.
void admit(self_pointer self, const std::string& job_id,
           caf::typed_response_promise<job_accepted> reply) {
  auto& job = self->state.jobs.at(job_id);
  const std::int64_t now = now_us(self);
  const std::int64_t deadline = now + self->state.options.queue_wait_max.count();
  job.queued_first_at_us = now;
  if (auto pushed = push_queued(self, job_id, now, deadline); !pushed) {
    refuse_job(self, job_id, failure_reason_of(pushed.error()), make_error(pushed.error()), reply);
    return;
  }
  const job_accepted accepted{job_id, job.priority, deadline};
  std::vector<domain::job::command> commands{submit_command(job.request),
                                             domain::queue_job{job.priority, deadline}};
  self->request(self->state.peers.jobs, caf::infinite, job_id, std::move(commands))
      .then([reply, accepted](const command_reply&) mutable { reply.deliver(accepted); },
            [self, job_id, reply](caf::error& failure) mutable {
              withdraw(self, job_id);
              reply.deliver(failure);
            });
  assign_pass(self);
}

/// Checks the premium user's balance (minus what other jobs hold) against the job's quote.
void check_funds(self_pointer self, const std::string& job_id,
                 caf::typed_response_promise<job_accepted> reply) {
  auto& job = self->state.jobs.at(job_id);
  // The worst price the job may meet: the highest online, within the client's own limit
  // (x_gpustream.max_price_micros), beyond which it goes to no provider.
  auto price = worst_price(self, job.request.model);
  if (const auto limit = job.request.max_price_micros; limit > 0) {
    price.input_micros_per_mtok = std::min(price.input_micros_per_mtok, limit);
    price.output_micros_per_mtok = std::min(price.output_micros_per_mtok, limit);
  }
  auto quote = domain::quote_max_micros(price, job.request.quality, job.request.prompt_tokens,
                                        job.request.max_tokens, self->state.options.pricing);
  if (!quote) {
    refuse_job(self, job_id, events::failure_reason::insufficient_funds, make_error(quote.error()),
               reply);
    return;
  }
  const std::string account = domain::user_account(job.request.user_id);
  self->request(self->state.peers.ledger, caf::infinite, ledger_aggregate::query{.accounts = {account}})
      .then(
          [self, job_id, account, quote = quote.value(), reply](
              const ledger_aggregate::answer& ledger) mutable {
            auto& job = self->state.jobs.at(job_id);
            const auto holding = self->state.holds_micros.find(job.request.user_id);
            const std::int64_t held = holding == self->state.holds_micros.end() ? 0 : holding->second;
            auto affordable =
                domain::check_affordable(job_id, quote, ledger.balances.at(account) - held);
            if (!affordable) {
              refuse_job(self, job_id, events::failure_reason::insufficient_funds,
                         make_error(affordable.error()), reply);
              return;
            }
            job.hold_micros = quote;
            if (quote > 0) self->state.holds_micros[job.request.user_id] += quote;  // release() drops 0
            admit(self, job_id, reply);
          },
          [self, job_id, reply](caf::error& failure) mutable {
            refuse_job(self, job_id, events::failure_reason::internal, failure, reply);
          });
}

/// Checks the free user's daily quota for the job's prompt and maximum completion.
void check_quota(self_pointer self, const std::string& job_id,
                 caf::typed_response_promise<job_accepted> reply) {
  const auto& request = self->state.jobs.at(job_id).request;
  self->request(self->state.peers.users, caf::infinite, request.user_id, state_atom::value)
      .then(
          [self, job_id, reply](const domain::user_state& user) mutable {
            auto& job = self->state.jobs.at(job_id);
            const std::int64_t requested = std::int64_t{job.request.prompt_tokens} + job.request.max_tokens;
            const auto held = self->state.free_tokens_held.find(job.request.user_id);
            auto admitted = domain::admit_free_job(
                user, requested, held == self->state.free_tokens_held.end() ? 0 : held->second, now_us(self),
                self->state.options.users);
            if (!admitted) {
              refuse_job(self, job_id, events::failure_reason::quota_exceeded,
                         make_error(admitted.error()), reply);
              return;
            }
            if (user.tier != events::user_tier::premium) {
              job.free_tokens_held = requested;
              self->state.free_tokens_held[job.request.user_id] += requested;
            }
            admit(self, job_id, reply);
          },
          [self, job_id, reply](caf::error& failure) mutable {
            refuse_job(self, job_id, events::failure_reason::internal, failure, reply);
          });
}

caf::typed_response_promise<job_accepted> submit(self_pointer self, job_request& request) {
  auto reply = self->make_response_promise<job_accepted>();
  auto& st = self->state;
  const std::string job_id = request.job_id;
  if (st.jobs.contains(job_id)) {
    reply.deliver(refusal(domain::errc::already_exists, "job " + job_id + " is already live"));
    return reply;
  }
  // Bills waiting for the ledger count too: while it cannot take them, each ended job leaves one.
  if (st.jobs.size() + st.unsettled.size() >= st.options.jobs_live_max) {
    reply.deliver(refusal(domain::errc::busy,
                          "the scheduler holds " + std::to_string(st.jobs.size()) + " live jobs and " +
                              std::to_string(st.unsettled.size()) +
                              " bills waiting for the ledger, the most allowed (jobs_live_max); retry later"));
    return reply;
  }
  const auto tier = domain::contribution_tier_for(request.contribution_score);
  auto& job = st.jobs[job_id];
  job.request = std::move(request);
  job.priority = domain::priority_for(job.request.premium, tier, st.options.priority);
  // Checks first, then the job is recorded with its outcome in one append: submitted and queued,
  // or submitted and failed with the reason it was refused.
  const auto& r = job.request;
  if (!st.index->can_serve(r.model, r.quality)) {
    refuse_job(self, job_id, events::failure_reason::no_provider,
               refusal(domain::errc::no_provider, "no online provider serves model " + r.model +
                                                      " at quality tier " +
                                                      std::to_string(static_cast<int>(r.quality))),
               reply);
  } else if (r.premium) {
    check_funds(self, job_id, reply);
  } else {
    check_quota(self, job_id, reply);
  }
  return reply;
}

// ---------------------------------------------------------------------------------------------
// Providers.

/// The jobs running on `provider_id` and not ending; only those without a first token yet when
/// `unstarted_only`.
std::vector<std::string> jobs_running_on(self_pointer self, const std::string& provider_id, bool unstarted_only) {
  std::vector<std::string> found;
  for (const auto& [id, job] : self->state.jobs) {
    if (job.running && !job.ending && job.provider_id == provider_id && !(unstarted_only && job.started)) {
      found.push_back(id);
    }
  }
  return found;
}

void on_online(self_pointer self, provider_online& online) {
  auto& st = self->state;
  const std::string id = online.listing.provider_id;
  // Its old prices go only once the new listing is taken: a refused one leaves the old in place.
  std::optional<domain::online_provider> before;
  if (const auto* old = st.index->find(id)) before = *old;
  // A suspension known here but recorded after the listing was read holds; one the listing saw
  // may have ended before it got here.
  std::int64_t until = online.listing.suspended_until_at_us;
  if (const auto known = st.suspended_until_us.find(id); known != st.suspended_until_us.end()) {
    until = std::max(until, known->second);
  }
  online.listing.suspended = until > now_us(self);
  if (online.listing.suspended) {
    st.suspended_until_us[id] = until;
  } else {
    st.suspended_until_us.erase(id);
  }
  // The same link listing other models (its agent's backend loaded or unloaded one), or a link.
  const auto known = st.sessions.find(id);
  const bool same_link = known != st.sessions.end() && known->second == online.session;
  const bool relinked = known != st.sessions.end() && !same_link;
  auto listed = st.index->list(online.listing, same_link);
  if (!listed) return;  // over a limit: as it was (offline for routing, or its old listing)
  st.losses_counted.erase(id);  // a loss from now on is a new one
  if (before) remove_prices(self, *before);
  add_prices(self, online.listing);
  if (same_link) {
    // A model it stopped offering may leave queued jobs with nobody; its running jobs go on.
    fail_unservable(self, "stopped offering it");
    return;
  }
  st.sessions[id] = std::move(online.session);
  if (relinked) {
    // A newer link may list less than the one it replaced (its agent restarted with other models,
    // prices or windows): queued jobs only the old listing served fail now, not at their deadline.
    fail_unservable(self, "linked again without it");
    // A newer link of a listed provider (its agent linked again): offers made to the old link
    // were lost with it, so the jobs still waiting there for their first token are offered on the
    // new one rather than waiting first_token_wait_max. (Those the old link had taken were
    // reported lost by the gateway before this.)
    for (const auto& job_id : jobs_running_on(self, id, true)) offer(self, job_id);
  }
  assign_pass(self);
}

/// A running job lost its provider (gone, or failed): back to the queue while attempts remain.
template <class Reply>
void requeue_or_fail(self_pointer self, const std::string& job_id, events::reassign_reason reason,
                     std::uint32_t tokens_so_far, Reply reply) {
  auto& job = self->state.jobs.at(job_id);
  const std::string from = job.provider_id;
  (void)self->state.index->job_finished(from);
  job.running = false;
  // This attempt's answer began (and broke off) here: the job waits for another provider rather
  // than come back. An attempt that produced nothing (declined, stalled, lost before its first
  // token) is avoided only loosely, and not at all while an earlier break is avoided strictly.
  const bool broke_here = job.started || tokens_so_far > job.tokens_so_far;
  if (broke_here || !job.avoided_strictly) {
    job.avoided_provider_id = from;
    job.avoided_strictly = broke_here;
  }
  // The tokens this attempt added are its provider's, at its price.
  if (tokens_so_far > job.tokens_so_far) {
    job.earlier.push_back({from, job.price, tokens_so_far - job.tokens_so_far});
  }
  job.tokens_so_far = std::max(job.tokens_so_far, tokens_so_far);
  // An answer begun on a provider continues on another one, and with no other provider for the
  // model nothing is left. It broke off on the provider avoided strictly: this attempt's, or an
  // earlier one's when this one produced nothing (its provider, which declined or was lost before
  // a first token, may still take it).
  const std::string broken_on = job.avoided_strictly ? job.avoided_provider_id : from;
  // A job that fails here freed its slot above (forget finds none): the next job takes it now.
  auto failed = [self, reply](auto&& outcome) mutable {
    assign_pass(self);
    reply(std::forward<decltype(outcome)>(outcome));
  };
  if (job.started || job.tokens_so_far > 0) {
    if (auto stranded = stranded_answer(self, job, broken_on)) {
      fail_job(self, job_id, events::failure_reason::all_providers_failed, std::move(*stranded), failed);
      return;
    }
  }
  // The job aggregate's own limits (its actors decide with the default options): one attempt more
  // would be refused there. An offer declined untried spends no attempt, up to declines_max.
  if (reason == events::reassign_reason::provider_declined) ++job.declines;
  const domain::job_options limits{};
  if (job.attempt - job.declines >= limits.attempts_max || job.declines >= limits.declines_max) {
    fail_job(self, job_id, events::failure_reason::all_providers_failed,
             "every attempt failed (" + std::to_string(job.attempt - job.declines) + " attempts" +
                 (job.declines > 0 ? " and " + std::to_string(job.declines) + " offers declined" : std::string()) +
                 ", the last on provider " + from + ")",
             failed);
    return;
  }
  self->request(self->state.peers.jobs, caf::infinite, job_id,
                domain::job::command{domain::reassign_job{from, reason, job.tokens_so_far}})
      .then(
          [self, job_id, reply](const command_reply&) mutable {
            enqueue(self, job_id, [job_id, reply](auto&& outcome) mutable {
              if constexpr (std::is_same_v<std::decay_t<decltype(outcome)>, job_accepted>) {
                reply(job_ended{job_id, domain::job_status::queued, 0, 0});
              } else {
                reply(std::forward<decltype(outcome)>(outcome));
              }
            });
          },
          [self, job_id, failed](caf::error& failure) mutable {
            drop_unrecorded(self, job_id, failure);
            failed(failure);
          });
}

/// The fault a job lost with `provider_id`'s link counts as: the provider's for the first job of
/// the loss, none for the others (until the provider is listed again).
domain::job_fault loss_fault(self_pointer self, const std::string& provider_id) {
  return self->state.losses_counted.insert(provider_id).second ? domain::job_fault::provider
                                                               : domain::job_fault::platform;
}

/// Puts a running job back in the queue (or fails it) because its provider is gone. The loss
/// counts against the provider once, on the first job it took, whatever their number: a link
/// that drops once while ten answers run is one fault, not the ten that suspend a provider.
void provider_lost(self_pointer self, const std::string& provider_id, const std::string& job_id) {
  record_outcome(self, provider_id, job_id, loss_fault(self, provider_id));
  requeue_or_fail(self, job_id, events::reassign_reason::provider_lost, 0, [](auto&&) {});
}

/// The provider's link is gone, and the gateway holds its offline notice back until the results
/// of answers it finished arrive (at most a moment). Meanwhile it gets no new job, and the jobs
/// offered to it that never started (those offers died with the link) go to another provider at
/// once instead of waiting for the notice. Started jobs wait for it: their results are on the way.
/// It stays listed (its slots, measures and health kept) in case a new link lists it again first.
void on_link_lost(self_pointer self, const std::string& provider_id) {
  if (!self->state.index->mark_unreachable(provider_id)) return;
  for (const auto& id : jobs_running_on(self, provider_id, true)) provider_lost(self, provider_id, id);
}

void on_offline(self_pointer self, const std::string& provider_id) {
  auto& st = self->state;
  if (const auto* old = st.index->find(provider_id)) remove_prices(self, *old);
  st.sessions.erase(provider_id);
  for (const auto& id : jobs_running_on(self, provider_id, false)) provider_lost(self, provider_id, id);
  // A job still ending there (its end being recorded) held a slot of this listing, which goes now:
  // its end must not free a slot of the provider's next listing, whose jobs it would overrun.
  for (auto& [id, job] : st.jobs) {
    if (job.running && job.ending && job.provider_id == provider_id) job.running = false;
  }
  (void)st.index->unlist(provider_id);
  fail_unservable(self, "went offline");
}

/// Fails the queued jobs no listed provider serves any more, after the last one of their model
/// `what_happened` ("went offline").
void fail_unservable(self_pointer self, std::string_view what_happened) {
  for (auto& job : self->state.queue->take_unservable(*self->state.index)) {
    if (job.avoided_strictly) {  // its answer broke off, and no provider will take it on
      fail_job(self, job.job_id, events::failure_reason::all_providers_failed,
               stranded_message(job.avoided_provider_id, job.model), [](auto&&) {});
      continue;
    }
    fail_job(self, job.job_id, events::failure_reason::no_provider,
             "the last online provider of model " + job.model + " " + std::string(what_happened), [](auto&&) {});
  }
  // A provider gone (or suspended) may leave an answer that broke off with no other provider that
  // may take it: it goes back to its own now rather than at the next tick.
  assign_pass(self);
}

// ---------------------------------------------------------------------------------------------
// Reports from providers.

bool is_running_on(self_pointer self, const std::string& job_id, const std::string& provider_id) {
  auto found = self->state.jobs.find(job_id);
  return found != self->state.jobs.end() && found->second.running && !found->second.ending &&
         found->second.provider_id == provider_id;
}

caf::typed_response_promise<job_ended> on_result(self_pointer self, job_result& result) {
  auto reply = self->make_response_promise<job_ended>();
  if (!is_running_on(self, result.job_id, result.provider_id)) {
    reply.deliver(refusal(domain::errc::invalid_state, "job " + result.job_id +
                                                           " is not running on provider " +
                                                           result.provider_id));
    return reply;
  }
  auto& job = self->state.jobs.at(result.job_id);
  job.ending = true;
  if (result.cut) cancel_at_provider(self, result.provider_id, result.job_id);
  const std::uint32_t tokens = within_budget(job, result.completion_tokens);
  const std::uint32_t prompt = billed_prompt_tokens(self->state.options, job, result.prompt_tokens_reported);
  // Scored on the estimate: the same prompt earns every provider the same points.
  const domain::job_measure measure{job.request.prompt_tokens, tokens, result.provider_reported_tokens,
                                    result.ttft_us, result.total_us, result.attempt_tokens, result.attempt_bytes};
  auto settled = bill_of(self, result.job_id, domain::job_outcome::completed, prompt, tokens, result.ad);
  const std::uint32_t free_tokens = recorded_free_tokens(job, settled, prompt, tokens);
  self->request(self->state.peers.jobs, caf::infinite, result.job_id,
                domain::job::command{domain::complete_job{result.provider_id, tokens,
                                                          result.provider_reported_tokens,
                                                          recorded_bill(settled), free_tokens, prompt}})
      .then(
          [self, job_id = result.job_id, provider_id = result.provider_id, measure, prompt, settled, free_tokens,
           reply](const command_reply&) mutable {
            if (const auto job = self->state.jobs.find(job_id); job != self->state.jobs.end()) {
              self->state.sticky->remember(sticky_key(job->second.request), provider_id, now_us(self));
            }
            settle(self, job_id, domain::job_outcome::completed, std::move(settled), prompt, free_tokens, measure,
                   reply);
          },
          [self, job_id = result.job_id, settled, measure, free_tokens, reply](caf::error& failure) mutable {
            end_failed(self, job_id, failure, &settled, true, measure, free_tokens);
            reply.deliver(failure);
          });
  return reply;
}

caf::typed_response_promise<job_ended> on_failure(self_pointer self, job_failure& failure) {
  auto reply = self->make_response_promise<job_ended>();
  if (!is_running_on(self, failure.job_id, failure.provider_id)) {
    reply.deliver(refusal(domain::errc::invalid_state, "job " + failure.job_id +
                                                           " is not running on provider " +
                                                           failure.provider_id));
    return reply;
  }
  // Only the provider's own faults count against it (the domain ignores the others).
  record_outcome(self, failure.provider_id, failure.job_id,
                 failure.with_link ? loss_fault(self, failure.provider_id) : failure.fault);
  // One the gateway failed for it (silent mid-answer) may still run it: told to stop. An agent that
  // reported its failure itself has let go of the job already.
  if (failure.fault == domain::job_fault::provider) cancel_at_provider(self, failure.provider_id, failure.job_id);
  auto answer = [reply](auto&& outcome) mutable { reply.deliver(std::move(outcome)); };
  auto& job = self->state.jobs.at(failure.job_id);
  switch (failure.fault) {
    case domain::job_fault::request:
      // A backend that refuses the request itself may be one with a quirk or a smaller context
      // than it advertised; another one is asked, but a request refused by another one too (or
      // with nobody else to ask) is the client's to mend, with the backend's words. The same
      // backend refusing again (the others were busy) tells nothing new: the job's attempts
      // bound that.
      if (std::find(job.rejected_by.begin(), job.rejected_by.end(), failure.provider_id) == job.rejected_by.end()) {
        job.rejected_by.push_back(failure.provider_id);
      }
      if (job.rejected_by.size() >= self->state.options.request_rejections_max ||
          !others_serve(self, job, failure.provider_id)) {
        job.ending = true;  // its provider lost meanwhile is no fault of the provider's for this job
        fail_job(self, failure.job_id, events::failure_reason::upstream_error,
                 "the provider's backend refused the request: " + failure.message, answer);
        break;
      }
      [[fallthrough]];
    case domain::job_fault::provider:
    case domain::job_fault::declined:
      requeue_or_fail(self, failure.job_id,
                      // Declined untried only before its answer started (the job's record refuses it after).
                      failure.fault == domain::job_fault::declined && !job.started
                          ? events::reassign_reason::provider_declined
                          : events::reassign_reason::provider_error,
                      within_budget(job, failure.tokens_so_far), answer);
      // A provider that declined counts its slots full (or refuses work for a reason of its own):
      // the jobs waiting, this one first, go to others until it has news, rather than to it one
      // after another, each spending an attempt. After requeue_or_fail, which freed the job's slot
      // (a freed slot is news that ends the declining).
      if (failure.fault == domain::job_fault::declined) {
        (void)self->state.index->mark_declined(failure.provider_id);  // false: it went offline meanwhile
      }
      break;
    default:
      job.ending = true;
      fail_job(self, failure.job_id, events::failure_reason::internal, failure.message, answer);
  }
  return reply;
}

caf::typed_response_promise<job_ended> on_cancel(self_pointer self, job_cancel& cancel) {
  auto reply = self->make_response_promise<job_ended>();
  auto found = self->state.jobs.find(cancel.job_id);
  if (found == self->state.jobs.end()) {
    reply.deliver(refusal(domain::errc::not_found, "job " + cancel.job_id + " is not live"));
    return reply;
  }
  if (!cancel.provider_id.empty() && !is_running_on(self, cancel.job_id, cancel.provider_id)) {
    reply.deliver(refusal(domain::errc::not_found,
                          "job " + cancel.job_id + " is not running on provider " + cancel.provider_id));
    return reply;
  }
  if (found->second.ending) {
    reply.deliver(refusal(domain::errc::invalid_state,
                          "job " + cancel.job_id + " is already ending"));
    return reply;
  }
  const bool running = found->second.running;
  // The attempt under way began its answer: its first token was reported, or the client got more
  // tokens than the attempts before produced (the relay's cancel may overtake its `started`).
  const bool started =
      running && (found->second.started || cancel.tokens_produced > found->second.tokens_so_far);
  if (!running && !self->state.queue->remove(cancel.job_id)) {
    // Neither running nor queued: its checks or its (re)queueing are being recorded, which
    // takes one append; the continuation of that step still needs the job.
    reply.deliver(refusal(domain::errc::invalid_state,
                          "job " + cancel.job_id + " is being queued; retry the cancel"));
    return reply;
  }
  found->second.ending = true;
  if (running) cancel_at_provider(self, found->second.provider_id, cancel.job_id);
  // What the client got is billed, also when the job waits in the queue again after a failover
  // (the job's record refuses fewer tokens than it holds so far); the provider and price are
  // those of its last attempt that began its answer.
  const std::uint32_t tokens =
      within_budget(found->second, std::max(cancel.tokens_produced, found->second.tokens_so_far));
  // Billed once its provider started (its first token came; a cancel may come before the token
  // count does): a job that never ran, whose attempts produced nothing, or whose offer had not
  // reached a provider when the client left, bills nothing.
  const bool billed = started || tokens > 0;
  std::optional<expected<domain::job_settlement, domain::error>> settled;
  const std::uint32_t prompt = found->second.request.prompt_tokens;  // no backend count: as estimated
  if (billed) {
    settled = bill_of(self, cancel.job_id, domain::job_outcome::cancelled, prompt, tokens, std::nullopt, started);
  }
  const std::uint32_t free_tokens = settled ? recorded_free_tokens(found->second, *settled, prompt, tokens) : 0;
  domain::job_measure measure;
  measure.prompt_tokens = prompt;
  measure.completion_tokens = tokens;
  self->request(self->state.peers.jobs, caf::infinite, cancel.job_id,
                domain::job::command{domain::cancel_job{
                    cancel.by, tokens, settled ? recorded_bill(*settled) : events::ledger_bill{}, free_tokens}})
      .then(
          [self, job_id = cancel.job_id, prompt, measure, settled, free_tokens, reply](const command_reply&) mutable {
            if (!settled) {
              forget(self, job_id);
              reply.deliver(job_ended{job_id, domain::job_status::cancelled, 0, 0});
              assign_pass(self);  // its slot, if it held one, goes to the next job now, not at the tick
              return;
            }
            settle(self, job_id, domain::job_outcome::cancelled, std::move(*settled), prompt, free_tokens, measure,
                   reply);
          },
          [self, job_id = cancel.job_id, measure, settled, free_tokens, reply](caf::error& failure) mutable {
            end_failed(self, job_id, failure, settled ? &*settled : nullptr, false, measure, free_tokens);
            reply.deliver(failure);
          });
  return reply;
}

/// Jobs offered to a provider that has not produced a first token in time go to another one: a
/// provider that never answers must not hold a job forever.
void reassign_stalled(self_pointer self) {
  const std::int64_t now = now_us(self);
  const auto& options = self->state.options;
  std::vector<std::pair<std::string, std::string>> stalled;  // job, provider
  for (const auto& [id, job] : self->state.jobs) {
    const std::int64_t read = std::int64_t{job.request.prompt_tokens} + job.tokens_so_far;
    const std::int64_t wait_max =
        options.first_token_wait_max.count() + read * options.first_token_wait_per_prompt_token.count();
    if (job.running && !job.started && !job.ending && now - job.assigned_at_us > wait_max) {
      stalled.emplace_back(id, job.provider_id);
    }
  }
  for (const auto& [job_id, provider_id] : stalled) {
    cancel_at_provider(self, provider_id, job_id);
    record_outcome(self, provider_id, job_id, domain::job_fault::provider);
    requeue_or_fail(self, job_id, events::reassign_reason::provider_stalled, 0, [](auto&&) {});
  }
}

void on_tick(self_pointer self) {
  end_suspensions(self);
  reassign_stalled(self);
  for (auto& job : self->state.queue->expire(now_us(self))) {
    self->request(self->state.peers.jobs, caf::infinite, job.job_id,
                  domain::job::command{domain::expire_job{}})
        .then(
            [self, id = job.job_id](const command_reply&) {
              notify_watcher(self, id,
                             job_ended{id, domain::job_status::failed, 0, 0,
                                       "no provider took the job before its queue deadline",
                                       events::failure_reason::deadline_exceeded});
              forget(self, id);
            },
            [self, id = job.job_id](caf::error& failure) { drop_unrecorded(self, id, failure); });
  }
  assign_pass(self);
}

scheduler_actor::behavior_type scheduler_behavior(self_pointer self, scheduler_peers peers,
                                                  scheduler_options options) {
  auto& st = self->state;
  if (!options.clock_us) options.clock_us = system_clock_us;
  // Which provider level may serve a quality tier is the pricing rule's; selection applies it.
  for (std::size_t tier = 0; tier < options.pricing.tiers.size(); ++tier) {
    options.selection.quality_level_min[tier] = options.pricing.tiers[tier].level_min;
  }
  st.index = std::make_unique<domain::selection_index>(options.selection);
  auto queue_options = options.queue;
  queue_options.pricing = options.pricing;  // a capped job is quoted as it is billed
  st.queue = std::make_unique<domain::job_queue>(queue_options);
  st.sticky = std::make_unique<domain::sticky_sessions>(options.sticky);
  st.options = std::move(options);
  st.peers = std::move(peers);
  self->delayed_send(self, st.options.tick_interval, tick_atom::value);
  return {
      [self](job_request& request) { return submit(self, request); },
      [self](online_atom, provider_online& online) { on_online(self, online); },
      [self](offline_atom, const std::string& provider_id) { on_offline(self, provider_id); },
      [self](link_lost_atom, const std::string& provider_id) { on_link_lost(self, provider_id); },
      [self](load_atom, const std::string& provider_id, const domain::load_report& report) {
        const auto* listed = self->state.index->find(provider_id);
        const bool drain_begins = listed != nullptr && report.draining && !listed->draining;
        if (!self->state.index->report_load(provider_id, report)) return;
        // An answer that broke off may have waited for this one only (fail_unservable assigns too).
        if (drain_begins) return fail_unservable(self, "began to drain");
        assign_pass(self);
      },
      [self](started_atom, const std::string& job_id, const std::string& provider_id)
          -> caf::result<std::uint64_t> {
        if (!is_running_on(self, job_id, provider_id)) {
          return refusal(domain::errc::invalid_state,
                         "job " + job_id + " is not running on provider " + provider_id);
        }
        auto reply = self->make_response_promise<std::uint64_t>();
        self->state.jobs.at(job_id).started = true;
        self->request(self->state.peers.jobs, caf::infinite, job_id,
                      domain::job::command{domain::start_job{provider_id}})
            .then([reply](const command_reply& r) mutable { reply.deliver(r.version); },
                  [reply](caf::error& failure) mutable { reply.deliver(failure); });
        return reply;
      },
      [self](job_result& result) { return on_result(self, result); },
      [self](job_failure& failure) { return on_failure(self, failure); },
      [self](job_cancel& cancel) { return on_cancel(self, cancel); },
      [self](cancel_atom, const std::string& job_id, const std::string& provider_id) {
        if (is_running_on(self, job_id, provider_id)) cancel_at_provider(self, provider_id, job_id);
      },
      [self](settle_atom, const std::string& job_id, const events::ledger_bill& bill) { adopt_bill(self, job_id, bill); },
      [self](count_atom) {
        std::uint64_t running = 0;
        for (const auto& [id, job] : self->state.jobs) running += job.running ? 1 : 0;
        return scheduler_counts{self->state.queue->size(), running, self->state.index->size(),
                                self->state.side_effects_failed, self->state.unsettled.size(),
                                self->state.holds_micros.size()};
      },
      [self](tick_atom) {
        on_tick(self);
        retry_unsettled(self);
        self->delayed_send(self, self->state.options.tick_interval, tick_atom::value);
      },
  };
}

}  // namespace

scheduler_actor spawn_scheduler(caf::actor_system& system, scheduler_peers peers,
                                scheduler_options options) {
  return system.spawn(scheduler_behavior, std::move(peers), std::move(options));
}

}  // namespace gpustream::actors
