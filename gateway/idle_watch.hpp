#pragma once
/// Notices a silent WebSocket peer with one timer per connection that fires every quarter idle
/// timeout, instead of Beast's own idle timeout, which re-arms its timer on every message read
/// (a timer operation, usually a timerfd_settime, per streamed token). The owner calls heard()
/// whenever anything arrives (a message, a ping or a pong: cheap, no system call) and, each time
/// the timer fires, asks check() what to do: nothing, ping, or give the peer up. Checking every
/// quarter leaves a peer that answers the ping (sent after half the timeout) a quarter of the
/// timeout for its pong before the next check.
/// Include only in .cpp files that already use Asio.

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <utility>

namespace gpustream::gateway {

class idle_watch {
 public:
  enum class verdict {
    fine,    ///< heard from the peer within half the idle timeout
    ping,    ///< silent for half the idle timeout: ask it for a pong
    silent,  ///< silent for the whole idle timeout: the peer is gone
  };

  idle_watch(const boost::asio::any_io_executor& executor, std::chrono::milliseconds idle_timeout)
      : timer_(executor), idle_timeout_(idle_timeout) {}

  /// Something arrived from the peer.
  void heard() noexcept { last_heard_ = clock::now(); }

  [[nodiscard]] verdict check() const {
    const auto silent_for = clock::now() - last_heard_;
    if (silent_for >= idle_timeout_) return verdict::silent;
    if (silent_for >= idle_timeout_ / 2) return verdict::ping;
    return verdict::fine;
  }

  [[nodiscard]] std::chrono::milliseconds idle_timeout() const noexcept { return idle_timeout_; }

  /// Calls `handler(error_code)` a quarter idle timeout from now (operation_aborted after cancel()).
  template <class Handler>
  void wait(Handler&& handler) {
    timer_.expires_after(idle_timeout_ / 4);
    timer_.async_wait(std::forward<Handler>(handler));
  }

  void cancel() { timer_.cancel(); }

  /// Pings through `ws`, unless the last ping is still on its way (stuck behind a write): one at
  /// a time. `owner` (a shared_ptr to whatever holds this watch and `ws`) keeps both alive until
  /// the ping completes; its failure shows in the owner's read loop.
  template <class WebSocket, class Owner>
  void ping(WebSocket& ws, Owner owner) {
    if (pinging_) return;
    pinging_ = true;
    ws.async_ping({}, [this, owner = std::move(owner)](const auto&) { pinging_ = false; });
  }

 private:
  using clock = std::chrono::steady_clock;
  boost::asio::steady_timer timer_;
  std::chrono::milliseconds idle_timeout_;
  clock::time_point last_heard_ = clock::now();
  bool pinging_ = false;
};

}  // namespace gpustream::gateway
