#pragma once
/// The agent's side of the provider link: an outbound WebSocket client (plain TCP, `ws://`) that
/// authenticates with a bearer token on the upgrade, exchanges link frames as binary messages, and
/// reconnects on its own with capped exponential backoff and jitter for as long as it runs.
///
/// Threading: the client runs on a caller-supplied io_context and is not thread-safe. Call every
/// member from a thread running that io_context (boost::asio::post onto it otherwise); every
/// callback runs there too. Meant for an io_context run by one thread, like the agent's.
///
/// Lifetime: the io_context must outlive the client. No callback runs after stop() or the
/// destructor has returned. Beast stays behind this header.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <string_view>

#include "base/expected.hpp"
#include "gateway/link_frames.hpp"

namespace boost::asio {
class io_context;
}

namespace gpustream::gateway {

/// How long to wait between connection attempts.
struct backoff_options {
  /// Wait before the first retry. Default: 250 ms.
  std::chrono::milliseconds delay_initial{250};
  /// Growth of the wait per failed attempt in a row. Default: 2.
  double factor = 2.0;
  /// Longest wait, before jitter. Default: 30 s.
  std::chrono::milliseconds delay_max{30'000};
  /// Share of each wait that is random, 0..1: the wait is d·(1 − jitter_fraction·u) with u uniform
  /// in [0, 1), so many agents cut off at once do not all come back at the same instant.
  /// Default: 0.5.
  double jitter_fraction = 0.5;
  /// A connection that stayed up at least this long resets the wait to delay_initial; a shorter
  /// one (a server that accepts and drops at once) keeps growing it. Default: 10 s.
  std::chrono::milliseconds stable_after{10'000};
};

/// The wait before retry number `attempt` (0 = the first retry after a failure):
/// min(delay_max, delay_initial·factor^attempt), less up to jitter_fraction of it at random.
/// Pure apart from the draw from `rng`.
[[nodiscard]] std::chrono::milliseconds backoff_delay(const backoff_options& options,
                                                      std::uint32_t attempt, std::mt19937_64& rng);

/// The parts of a `ws://host[:port][/path]` URL.
struct ws_url {
  std::string host;          ///< a name, an IPv4 address or an IPv6 address without brackets
  std::uint16_t port = 80;   ///< 80 when the URL names none
  std::string target = "/";  ///< path and query, "/" when the URL names none
};

/// Parses a ws:// URL. wss:// is refused with a message saying so (this client speaks plain TCP).
[[nodiscard]] expected<ws_url, std::string> parse_ws_url(std::string_view url);

struct link_client_options {
  /// Where the coordinator listens, e.g. "ws://127.0.0.1:8080/v1/providers/link". Required.
  std::string url;
  /// Sent as "Authorization: Bearer <token>" on the upgrade. Never logged. Required.
  std::string bearer_token;
  /// Sent as User-Agent on the upgrade. Default: "gpustream-provider".
  std::string user_agent = "gpustream-provider";
  /// Bounds on frames received (frame_bytes_max is also the WebSocket read limit; a bigger message
  /// closes the link with 1009) and the size checked before one is sent.
  link::codec_limits limits;
  /// Most bytes of frames waiting to be written (the one being written included); send() refuses
  /// more with link_send_errc::queue_full. Default: 16 MiB.
  std::size_t send_queue_bytes_max = 16 * 1024 * 1024;
  /// Longest time for resolving, connecting and the WebSocket upgrade together (also the longest
  /// wait for a closing handshake). Default: 10 s.
  std::chrono::milliseconds connect_timeout{10'000};
  /// With nothing received for half this long the client pings; with nothing for this long the
  /// connection counts as lost. Default: 30 s.
  std::chrono::milliseconds idle_timeout{30'000};
  backoff_options backoff;
  /// Seed of the backoff's jitter; 0 draws one from std::random_device. Default: 0.
  std::uint64_t seed = 0;
};

/// Why the link is not (or no longer) up.
enum class link_disconnect_kind : std::uint8_t {
  connect_failed,   ///< resolving, connecting or the upgrade failed or timed out
  rejected,         ///< the server answered the upgrade with an HTTP status (401: bad token)
  closed_by_peer,   ///< the server sent a WebSocket close (see close_code)
  connection_lost,  ///< the connection broke or went silent for idle_timeout
  protocol_error,   ///< the server sent something that is not a valid frame; we closed the link
  dropped,          ///< the owner closed the connection with drop()
};

[[nodiscard]] std::string_view to_string(link_disconnect_kind kind) noexcept;

struct link_disconnect {
  link_disconnect_kind kind = link_disconnect_kind::connect_failed;
  /// What happened, for a person (for `rejected`, with the start of the server's answer body).
  std::string message;
  /// The HTTP status for kind rejected, otherwise 0.
  unsigned http_status = 0;
  /// The WebSocket close code sent by the server (closed_by_peer) or by us (protocol_error,
  /// dropped), otherwise 0.
  std::uint16_t close_code = 0;
  /// True when this ends a connection that was up (on_connected was called for it); false when an
  /// attempt to connect failed.
  bool was_connected = false;
  /// How long the client waits before its next attempt.
  std::chrono::milliseconds retry_in{0};
};

enum class link_send_errc : std::uint8_t {
  not_connected,   ///< no connection is up: nothing was queued
  queue_full,      ///< send_queue_bytes_max would be exceeded: the peer is not reading
  frame_too_large, ///< the encoded frame exceeds limits.frame_bytes_max
};

struct link_send_error {
  link_send_errc code = link_send_errc::not_connected;
  std::string message;
};

struct link_client_callbacks {
  /// The upgrade succeeded; frames may be sent now. Required.
  std::function<void()> on_connected;
  /// A frame arrived (decoded and validated against limits). Required.
  std::function<void(link::frame)> on_frame;
  /// The connection ended or an attempt failed; the next attempt is scheduled already. The send
  /// queue has been emptied. Required.
  std::function<void(const link_disconnect&)> on_disconnected;
};

class link_client {
 public:
  /// Checks the options (a ws:// URL, a token) without connecting; start() connects.
  [[nodiscard]] static expected<std::unique_ptr<link_client>, std::string> create(
      boost::asio::io_context& io, link_client_options options, link_client_callbacks callbacks);
  ~link_client();  ///< stop()
  link_client(const link_client&) = delete;
  link_client& operator=(const link_client&) = delete;

  /// Starts connecting; after a failure or a disconnect it tries again after backoff_delay, until
  /// stop(). Call once.
  void start();

  /// Closes the connection (a WebSocket close 1001 "going away" when one is up), cancels any
  /// pending attempt, and ends all callbacks. Idempotent.
  void stop();

  /// Encodes `f` and queues it for writing. Refused when no connection is up, when the queue would
  /// exceed send_queue_bytes_max or when the frame exceeds limits.frame_bytes_max.
  [[nodiscard]] expected<void, link_send_error> send(const link::frame& f);

  /// Sends a job's first delta (the first piece of its first token) as send() does, except that
  /// when it is held in a batch it goes ahead of the later deltas held with it (behind the first
  /// deltas held before it): of all the tokens in a batch, a first one is what a client waits for
  /// most. Each job's own order is kept, since no delta of the job can be held before its first.
  [[nodiscard]] expected<void, link_send_error> send_first(const link::delta& d);

  /// With batching on, deltas sent while a write is in flight are held and go out together, as
  /// one `deltas` frame, when it completes (any other frame sent meanwhile goes after them, so the
  /// order is kept): a busy link then costs one write per batch instead of one per token. Turn it
  /// on only for a server whose welcome says it takes `deltas` frames; every new connection starts
  /// with it off.
  void batch_deltas(bool enabled) noexcept;

  /// Closes the current connection with WebSocket close `close_code` and `reason`, reports it as
  /// link_disconnect_kind::dropped and reconnects after the backoff. For an owner that sees the
  /// peer break the protocol, or its queue overflow. No effect when no connection is up.
  void drop(std::uint16_t close_code, std::string reason);

  /// True between on_connected and on_disconnected.
  [[nodiscard]] bool connected() const noexcept;

  /// Bytes of frames queued and not yet written.
  [[nodiscard]] std::size_t queued_bytes() const noexcept;

  class impl;

 private:
  explicit link_client(std::shared_ptr<impl> state);
  std::shared_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
