#include "tests/actors/actor_testing.hpp"

#include <caf/send.hpp>

#include <cstdlib>
#include <random>

namespace gpustream::actors::testing {

std::uint64_t seed_from_environment() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  return (std::uint64_t{std::random_device{}()} << 32) | std::random_device{}();
}

test_config::test_config() {
  set("scheduler.policy", caf::atom("testing"));
  // The test coordinator owns time: delayed messages fire only when the test advances it.
  add_error_categories(*this);
}

deterministic_fixture::deterministic_fixture()
    : system_(config_),
      sched_(dynamic_cast<caf::scheduler::test_coordinator&>(system_.scheduler())),
      self_(system_) {}

deterministic_fixture::~deterministic_fixture() {
  for (auto& actor : to_stop_) self_->send_exit(actor, caf::exit_reason::user_shutdown);
  run();
  close_store();
}

void deterministic_fixture::open_store() {
  storage::store_options options;
  options.mode = storage::durability::buffered;
  open_store(std::move(options));
}

void deterministic_fixture::open_store(storage::store_options options) {
  auto store = storage::event_store::open(directory_.path(), std::move(options));
  ASSERT_TRUE(store) << store.error().message;
  store_ptr_ = std::move(store.value());
  store_ = spawn_store_actor(system_, store_ptr_, {.wait_for_each_append = true});
}

void deterministic_fixture::close_store() {
  if (!store_) return;
  self_->send_exit(store_, caf::exit_reason::user_shutdown);
  run();
  store_ = nullptr;
  store_ptr_.reset();
}

}  // namespace gpustream::actors::testing
