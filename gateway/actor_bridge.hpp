#pragma once
/// The way from Beast's threads into the actor system without blocking them: a task handed to the
/// bridge runs inside an event-based actor, where it may send requests whose answers arrive as
/// continuations (`self->request(...).then(...)`); those continuations carry results back to
/// Beast (http_reply and websocket_connection are thread-safe). A scoped_actor's blocking request
/// costs ~100 µs of thread wake-ups (../shared/notes/STACK.md); a task costs one message.

#include <caf/fwd.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <string_view>
#include <vector>

namespace gpustream::gateway {

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
