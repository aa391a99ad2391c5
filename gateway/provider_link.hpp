#pragma once
/// The server side of the provider link (WebSocket `GET /v1/providers/link`). The agent
/// authenticates with its token on the upgrade; then hello -> the provider's connect and offers
/// are persisted, the scheduler lists it, welcome goes back; heartbeats report load and keep the
/// link fresh (a link without one for stale_after is closed and its jobs reassigned); offers and
/// cancels go out; deltas, done and errors come in and go to the relay. A frame that does not
/// decode closes that link only, with a logged reason. Include only in .cpp files (CAF).

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "actors/runtime.hpp"
#include "gateway/http_server.hpp"
#include "gateway/link_frames.hpp"

namespace gpustream::gateway {

class actor_bridge;
class directory;
class relay;

struct provider_link_options {
  link::codec_limits limits;
  /// How often agents send heartbeats (told to them in the welcome). Default: 1 s.
  std::chrono::milliseconds heartbeat_interval{1000};
  /// A link with no heartbeat (or other frame) for this long is stale: closed, its jobs
  /// reassigned. Default: 3 heartbeat intervals.
  std::chrono::milliseconds stale_after{3000};
  /// Longest a link waits for its hello's answer (the provider's connect and offers recorded, then
  /// the welcome) before it is closed: its agent sends no heartbeat before the welcome, so
  /// stale_after does not apply yet. Default: 30 s.
  std::chrono::milliseconds hello_answer_wait_max{30'000};
  /// Most links one provider may have open at once (a link that replaces another overlaps it for a
  /// moment; one not yet past its hello lives up to stale_after). More are refused (429 on the
  /// upgrade, or closed with 1008 when they raced past it), so that one token cannot use up the
  /// server's connections. Default: 4.
  std::size_t links_per_provider_max = 4;
  /// Shortest time between two advertise frames on one link; a sooner one closes the link (1008).
  /// Each is recorded and relists the provider with the scheduler that every link shares; an agent
  /// sends one when its backend's models changed, found at most every few seconds. Default: 1 s.
  std::chrono::milliseconds advertise_interval_min{1000};
  /// Shortest time between two hellos of one provider, over all its links; a sooner one closes
  /// its link (1008) and leaves the provider's other link alone. Each hello is recorded (connect,
  /// and a replaced link's disconnect) and relists the provider with the scheduler: without it an
  /// agent relinking in a loop would drive the store's fsyncs. Default: 100 ms, below the agent's
  /// shortest reconnect wait (125 to 250 ms).
  std::chrono::milliseconds hello_interval_min{100};
  /// Source of `now` for the provider's listing, microseconds since the Unix epoch.
  std::function<std::int64_t()> clock_us;
};

/// What the links passed on, for tests and operators.
struct provider_link_counts {
  std::uint64_t heartbeats_forwarded = 0;  ///< passed on to the scheduler
  std::uint64_t heartbeats_skipped = 0;    ///< kept (as the link's latest) but not passed on: nothing new, too soon
};

class provider_links {
 public:
  provider_links(caf::actor_system& system, actor_bridge& bridge, const actors::runtime& runtime,
                 directory& who, relay& answers, provider_link_options options = {});
  /// Stops (see stop()).
  ~provider_links();
  provider_links(const provider_links&) = delete;
  provider_links& operator=(const provider_links&) = delete;

  /// Decides on an upgrade to /v1/providers/link: 401 without a known provider token.
  [[nodiscard]] websocket_decision upgrade(const http_request& request);

  /// Links open now (hello received).
  [[nodiscard]] std::size_t online() const noexcept;
  [[nodiscard]] provider_link_counts counts() const noexcept;
  /// The latest heartbeat on `provider_id`'s current link; none while it has no link or has not
  /// sent one yet.
  [[nodiscard]] std::optional<link::heartbeat> last_heartbeat(const std::string& provider_id) const;

  /// Stops every link's actor and waits until they are gone: no offer, cancel or staleness
  /// check runs from then on, and links opened later are closed at once (1001). Their
  /// connections stay with the server, which must outlive this call. Idempotent.
  void stop();

  class impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
