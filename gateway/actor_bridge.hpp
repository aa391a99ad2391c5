#pragma once
/// The way from Beast's threads into the actor system without blocking them: a task handed to the
/// bridge runs inside an event-based actor, where it may send requests whose answers arrive as
/// continuations (`self->request(...).then(...)`); those continuations carry results back to
/// Beast (http_reply and websocket_connection are thread-safe). A scoped_actor's blocking request
/// costs ~100 µs of thread wake-ups (../shared/notes/STACK.md); a task costs one message.

#include <caf/fwd.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

namespace gpustream::gateway {

namespace detail {

/// How many of actor_bridge::ask_all's requests are answered, and how many of them succeeded.
class ask_tally {
 public:
  explicit ask_tally(std::size_t count) : left_(count) {}
  void done(bool succeeded);
  /// Waits until every request is answered; how many succeeded.
  std::size_t wait();

 private:
  std::mutex mutex_;
  std::condition_variable all_done_;
  std::size_t left_;
  std::size_t succeeded_ = 0;
};

/// ask_all's requests, made in order by one actor: each answer makes the next one not yet made.
/// Kept alive by the answers it waits for.
template <class Ask>
class ask_chain : public std::enable_shared_from_this<ask_chain<Ask>> {
 public:
  ask_chain(caf::event_based_actor* actor, Ask ask, std::size_t count, std::shared_ptr<ask_tally> tally)
      : actor_(actor), ask_(std::move(ask)), count_(count), tally_(std::move(tally)) {}
  void ask_next() {
    if (next_ >= count_) return;
    ask_(actor_, next_++, [self = this->shared_from_this()](bool succeeded) {
      self->tally_->done(succeeded);
      self->ask_next();
    });
  }

 private:
  caf::event_based_actor* actor_;
  Ask ask_;
  std::size_t count_;
  std::size_t next_ = 0;
  std::shared_ptr<ask_tally> tally_;
};

}  // namespace detail

class actor_bridge {
 public:
  using task = std::function<void(caf::event_based_actor* self)>;

  /// Spawns `actors_max` bridge actors in `system` (tasks are spread over them in turn, so one
  /// busy actor does not serialise the gateway). Default: 2.
  explicit actor_bridge(caf::actor_system& system, std::size_t actors_max = 2);
  /// Stops the bridge actors (see stop()).
  ~actor_bridge();
  actor_bridge(const actor_bridge&) = delete;
  actor_bridge& operator=(const actor_bridge&) = delete;

  /// Runs `t` inside one of the bridge's actors, soon, on an actor-system thread.
  void run(task t);
  /// Runs `t` inside the bridge actor chosen by `key`: tasks with the same key run in the order
  /// given, so their messages reach each receiver in that order (e.g. one provider's job
  /// failures before its going offline).
  void run_keyed(std::string_view key, task t);
  /// Runs `t` inside one of the bridge's actors after `delay`.
  void run_later(std::chrono::milliseconds delay, task t);

  /// Makes `count` requests from one of the bridge's actors and waits until every one is
  /// answered: `ask(self, i, done)` makes request i (i from 0, in order) and, in its answer's
  /// continuation, calls done(succeeded). At most `in_flight_max` (>= 1) are unanswered at once, so
  /// that a burst of appends shares the store's group commits without flooding it. Returns how
  /// many succeeded. Blocks the caller: not for an actor's or a server's thread; each request must
  /// have a timeout, and the bridge must not stop meanwhile.
  template <class Ask>
  std::size_t ask_all(std::size_t count, std::size_t in_flight_max, Ask ask) {
    if (count == 0) return 0;
    auto tally = std::make_shared<detail::ask_tally>(count);
    run([tally, count, in_flight_max, ask = std::move(ask)](caf::event_based_actor* self) {
      auto chain = std::make_shared<detail::ask_chain<Ask>>(self, ask, count, tally);
      for (std::size_t i = 0; i < std::min(count, std::max<std::size_t>(in_flight_max, 1)); ++i) chain->ask_next();
    });
    return tally->wait();
  }

  /// Stops the bridge's actors and waits until they are gone: once it returns, no task or
  /// continuation runs any more (those still queued or pending are dropped, as are tasks handed
  /// over later), so whatever they refer to may be destroyed. Idempotent.
  void stop();

 private:
  caf::actor_system& system_;
  std::vector<caf::actor> actors_;
  std::atomic<std::size_t> next_{0};
};

/// Tells `actors` to exit and waits until every one of them is gone (at most `wait_max`, then
/// logs those still running). For shutdowns: once it returns, none of them runs a handler again.
void stop_and_wait(caf::actor_system& system, const std::vector<caf::actor>& actors,
                   std::chrono::milliseconds wait_max = std::chrono::seconds(10));

}  // namespace gpustream::gateway
