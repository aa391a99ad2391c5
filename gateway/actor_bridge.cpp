#include "gateway/actor_bridge.hpp"

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include "base/ensure.hpp"

namespace gpustream::gateway {
namespace {

/// A task as a message (local only: it never crosses a node boundary).
struct bridge_task {
  actor_bridge::task run;
};

}  // namespace
}  // namespace gpustream::gateway

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::gateway::bridge_task)

namespace gpustream::gateway {

actor_bridge::actor_bridge(caf::actor_system& system, std::size_t actors_max) {
  GPUSTREAM_ENSURE(actors_max > 0);
  for (std::size_t i = 0; i < actors_max; ++i) {
    actors_.push_back(system.spawn([](caf::event_based_actor* self) -> caf::behavior {
      return {[self](bridge_task& t) { t.run(self); }};
    }));
  }
}

actor_bridge::~actor_bridge() {
  for (auto& a : actors_) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
}

void actor_bridge::run_later(std::chrono::milliseconds delay, task t) {
  const auto i = next_.fetch_add(1, std::memory_order_relaxed) % actors_.size();
  caf::delayed_anon_send(actors_[i], delay, bridge_task{std::move(t)});
}

void actor_bridge::run_keyed(std::string_view key, task t) {
  const auto i = std::hash<std::string_view>{}(key) % actors_.size();
  caf::anon_send(actors_[i], bridge_task{std::move(t)});
}

void actor_bridge::run(task t) {
  const auto i = next_.fetch_add(1, std::memory_order_relaxed) % actors_.size();
  caf::anon_send(actors_[i], bridge_task{std::move(t)});
}

}  // namespace gpustream::gateway
