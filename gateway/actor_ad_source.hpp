#pragma once
/// The relay's ad_source backed by the ad server actor: picks, impressions and releases are
/// requests carried into the actor system by the actor bridge.

#include <chrono>
#include <functional>
#include <mutex>
#include <optional>
#include <string>

#include "actors/ad_server.hpp"
#include "gateway/relay.hpp"

namespace gpustream::gateway {

class actor_bridge;

struct actor_ad_source_options {
  /// Longest wait for the ad server's pick. Past it the answer goes without an ad: a free-tier
  /// answer that ends before its ad is picked waits for the pick, and must not wait for an ad
  /// server that does not answer. A pick that comes later reserved its ad for nothing, and is
  /// released. Default: 1 s.
  std::chrono::milliseconds pick_wait_max{1000};
};

class actor_ad_source final : public ad_source {
 public:
  /// `bridge` must outlive this.
  actor_ad_source(actor_bridge& bridge, actors::ad_server_actor ads, actor_ad_source_options options = {});

  /// Set once the server's address is known, before the first request can pick an ad, e.g.
  /// "http://127.0.0.1:8080/a/c/".
  void set_click_base(std::string base);

  void pick(std::string job_id, std::string user_id, std::string prompt_text,
            std::function<void(std::optional<ad_info>)> done) override;
  void served(std::string impression_id, std::function<void(std::optional<domain::ad_charge>)> done) override;
  void release(std::string impression_id, std::string reason) override;
  void unserved(std::string impression_id, std::string reason) override;

 private:
  std::string click_base() const;

  actor_bridge& bridge_;
  actors::ad_server_actor ads_;
  actor_ad_source_options options_;
  mutable std::mutex mutex_;
  std::string click_base_;
};

}  // namespace gpustream::gateway
