#pragma once
/// Notices a silent WebSocket peer with one timer per connection that fires every quarter idle
/// timeout, instead of Beast's own idle timeout, which re-arms its timer on every message read
/// (a timer operation, usually a timerfd_settime, per streamed token). The owner calls heard()
/// whenever anything arrives (a message, a ping or a pong: cheap, no system call) and starts
/// watch() once the connection is up. Checking every quarter leaves a peer that answers the ping
/// (sent after half the timeout) a quarter of the timeout for its pong before the next check.
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

  /// Every quarter idle timeout until cancel() or `ended()`: pings through `ws` a peer silent for
  /// half the timeout (one ping at a time: the last may be stuck behind a write; its failure shows
  /// in the owner's read loop), and calls `on_silent()`, which ends the watch, for one silent for
  /// all of it. `owner` (a shared_ptr to whatever holds this watch and `ws`) keeps both alive.
  template <class WebSocket, class Owner, class Ended, class OnSilent>
  void watch(WebSocket& ws, Owner owner, Ended ended, OnSilent on_silent) {
    timer_.expires_after(idle_timeout_ / 4);
    timer_.async_wait([this, &ws, owner = std::move(owner), ended = std::move(ended),
                       on_silent = std::move(on_silent)](const boost::system::error_code& ec) mutable {
      if (ec || ended()) return;
      switch (check()) {
        case verdict::fine:
          break;
        case verdict::ping:
          if (!pinging_) {
            pinging_ = true;
            ws.async_ping({}, [this, owner](const auto&) { pinging_ = false; });
          }
          break;
        case verdict::silent:
          return on_silent();
      }
      watch(ws, std::move(owner), std::move(ended), std::move(on_silent));
    });
  }

  void cancel() { timer_.cancel(); }

 private:
  using clock = std::chrono::steady_clock;
  boost::asio::steady_timer timer_;
  std::chrono::milliseconds idle_timeout_;
  clock::time_point last_heard_ = clock::now();
  bool pinging_ = false;
};

}  // namespace gpustream::gateway
