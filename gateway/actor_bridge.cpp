#include "gateway/actor_bridge.hpp"

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <spdlog/spdlog.h>

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

actor_bridge::actor_bridge(caf::actor_system& system, std::size_t actors_max) : system_(system) {
  GPUSTREAM_ENSURE(actors_max > 0);
  for (std::size_t i = 0; i < actors_max; ++i) {
    actors_.push_back(system.spawn([](caf::event_based_actor* self) -> caf::behavior {
      return {[self](bridge_task& t) { t.run(self); }};
    }));
  }
}

actor_bridge::~actor_bridge() { stop(); }

void actor_bridge::stop() { stop_and_wait(system_, actors_); }

void stop_and_wait(caf::actor_system& system, const std::vector<caf::actor>& actors,
                   std::chrono::milliseconds wait_max) {
  caf::scoped_actor self{system};
  std::size_t waiting = 0;
  for (const auto& a : actors) {
    if (!a) continue;
    self->monitor(a);  // an actor already gone sends its down message at once
    self->send_exit(a, caf::exit_reason::user_shutdown);
    ++waiting;
  }
  const auto deadline = std::chrono::steady_clock::now() + wait_max;
  bool late = false;
  while (waiting > 0 && !late) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    self->receive([&](const caf::down_msg&) { --waiting; },
                  caf::after(std::max(left, std::chrono::milliseconds(0))) >> [&] { late = true; });
  }
  if (late) spdlog::error("shutdown: {} actors still running after {} ms", waiting, wait_max.count());
}

void actor_bridge::run_later(std::chrono::milliseconds delay, task t) {
  const auto i = next_.fetch_add(1, std::memory_order_relaxed) % actors_.size();
  caf::delayed_anon_send(actors_[i], delay, bridge_task{std::move(t)});
}

void actor_bridge::run_keyed(std::string_view key, task t) {
  const auto i = std::hash<std::string_view>{}(key) % actors_.size();
  caf::anon_send(actors_[i], bridge_task{std::move(t)});
}

void detail::ask_tally::done(bool succeeded) {
  std::lock_guard lock(mutex_);
  succeeded_ += succeeded ? 1 : 0;
  if (--left_ == 0) all_done_.notify_all();
}

std::size_t detail::ask_tally::wait() {
  std::unique_lock lock(mutex_);
  all_done_.wait(lock, [&] { return left_ == 0; });
  return succeeded_;
}

void actor_bridge::run(task t) {
  const auto i = next_.fetch_add(1, std::memory_order_relaxed) % actors_.size();
  caf::anon_send(actors_[i], bridge_task{std::move(t)});
}

}  // namespace gpustream::gateway
