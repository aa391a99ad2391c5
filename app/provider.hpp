#pragma once
/// `gpustream provider`: the agent a GPU owner runs next to an OpenAI-compatible server (LM Studio,
/// Ollama, llama.cpp server, vLLM). It lists the backend's models, probes how many streams the
/// backend really sustains, connects out to the coordinator's provider link (no open port), says
/// hello, sends heartbeats, runs the jobs it is offered against the backend and streams the answers
/// back, counting tokens itself. Reconnects with backoff; a lost link cancels every running job.
///
/// Logs never carry the token or any prompt or answer text.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "gateway/link_client.hpp"
#include "gateway/upstream_client.hpp"

namespace gpustream::app {

struct provider_options {
  /// The coordinator, "ws://HOST:PORT"; "/v1/providers/link" is added when the URL names no path.
  /// Required.
  std::string coordinator;
  /// The provider token from POST /admin/providers (also GPUSTREAM_PROVIDER_TOKEN). Never logged.
  /// Required.
  std::string token;
  /// The backend, "openai=URL" with URL the base of an OpenAI-compatible API, e.g.
  /// "openai=http://127.0.0.1:1234/v1". Required.
  std::string backend;
  /// This agent's name in logs and in its User-Agent. Default: "provider".
  std::string name = "provider";
  /// Price of input and of output tokens, micro-USD per million tokens. Default: 0.
  std::int64_t price_per_mtok_micros = 0;
  /// The context window, in tokens, to advertise for every model instead of what the backend
  /// says (e.g. for an Ollama server started with OLLAMA_CONTEXT_LENGTH, or a model whose window
  /// the backend does not report); at most 16,777,216. Default: 0, the backend's.
  std::uint32_t context_length_tokens = 0;
  /// Most jobs at once; the probe may find the backend sustains fewer. Default: 8.
  std::uint32_t max_concurrency = 8;
  /// Probe the backend's concurrency before saying hello (off: advertise max_concurrency as is):
  /// one unmeasured request first (a backend may load its model on first use), then levels of 1,
  /// 2, 4 … streams (next_probe_step). Default: on.
  bool probe = true;
  /// Offers declined in a row for a backend busy before its answer began (HTTP 429 or 503), with
  /// no token from it between (nor a restart of it); past them its failures count as the
  /// provider's, as a broken backend's do. Default: 3.
  std::uint32_t busy_declines_in_a_row_max = 3;
  /// Tokens asked of each probe request (max_tokens). Default: 16.
  std::uint32_t probe_tokens = 16;
  /// Most tokens a probe request asks for when level 1 ran shorter than probe_measurable_min and
  /// runs again asking for more (at least probe_tokens). Default: 256.
  std::uint32_t probe_tokens_max = 256;
  /// Longest one probe level may take; a level that runs over counts as failed. Default: 60 s.
  std::chrono::milliseconds probe_level_timeout{60'000};
  /// Longest the probe's first, unmeasured request may take: a backend may load its model from
  /// disk first. Default: 600 s (as the backend's first-token timeout).
  std::chrono::milliseconds probe_warm_up_timeout{600'000};
  /// Shortest level whose throughput is compared with the next (see next_probe_step). Default:
  /// 50 ms.
  std::chrono::milliseconds probe_measurable_min{50};
  /// Heartbeat interval used until the coordinator's welcome names one, and bounds on what it may
  /// name (a smaller or larger value is clamped). Defaults: 1 s, 50 ms, 60 s.
  std::chrono::milliseconds heartbeat_interval_default{1000};
  std::chrono::milliseconds heartbeat_interval_min{50};
  std::chrono::milliseconds heartbeat_interval_max{60'000};
  /// How long a drain (a stop on SIGINT or SIGTERM) lets running answers finish before it cuts
  /// them off (each cut answer counts against the provider). Default: 60 s.
  std::chrono::milliseconds stop_drain_max{60'000};
  /// While linked (to a coordinator that takes model updates), how often the agent lists the
  /// backend's models again and advertises them when they changed: a model loaded or unloaded in
  /// LM Studio or Ollama. 0: never. Default: 30 s.
  std::chrono::milliseconds models_refresh_interval{30'000};
  /// A job the backend answers with 404 (its model may be gone) lists them at once, but not
  /// sooner than this after the last listing. Default: 5 s.
  std::chrono::milliseconds models_refresh_min{5'000};
  /// Recent job outcomes the health percentage is computed over. Default: 50.
  std::size_t health_window_jobs_max = 50;
  /// ... of which those older than this are forgotten: a provider whose backend failed (and was
  /// mended) gets few jobs while its health is low, so without an age its health would stay low
  /// until 50 more jobs came. None left: 100 %. Default: 10 minutes.
  std::chrono::milliseconds health_window_age_max{600'000};
  /// The link client's options (url, token and user agent are filled in from the fields above).
  gateway::link_client_options link;
  /// The backend client's options (base_url is filled in from `backend`).
  gateway::upstream_options upstream;
};

/// The agent's exit code when the coordinator turned it away for good: its token refused, or its
/// link taken over by another agent with the same token. Starting it again does not help, so a
/// supervisor should not (systemd: `RestartPreventExitStatus=3`).
inline constexpr int exit_turned_away = 3;

/// Runs the agent until SIGINT or SIGTERM; returns the process exit code: 0 once stopped by a
/// signal, 1 when the options are unusable, exit_turned_away when the coordinator turned it away.
[[nodiscard]] int run_provider(const provider_options& options);

// -------------------------------------------------------------------------------------------------
// The agent itself, for run_provider and for tests that drive it on their own io_context.

/// Checks and completes options: the backend flag, the coordinator URL (with its default path),
/// non-empty token, non-zero concurrency. Returns the options ready for provider_agent.
[[nodiscard]] expected<provider_options, std::string> resolve_provider_options(provider_options options);

class provider_agent {
 public:
  /// Builds the agent on `io` from resolved options (see resolve_provider_options). `on_exit` is
  /// called once, on the io_context, if the agent gives up by itself (the coordinator turned it
  /// away): with the exit code for the process (exit_turned_away).
  [[nodiscard]] static expected<std::unique_ptr<provider_agent>, std::string> create(
      boost::asio::io_context& io, provider_options options, std::function<void(int)> on_exit);
  ~provider_agent();  ///< stop()
  provider_agent(const provider_agent&) = delete;
  provider_agent& operator=(const provider_agent&) = delete;

  /// Lists the models, probes, then connects. Call once, on the io_context's thread.
  void start();

  /// Takes no new job (offers are declined: they go to other providers) and calls `drained` once,
  /// on the io_context, when no job runs any more and what was sent for the last ones has gone out
  /// (at most 1 s more), or after stop_drain_max with jobs still running; stop() then ends what is
  /// left. A stop() before then means `drained` is never called. For a stop that lets answers
  /// finish. On the io_context's thread.
  void drain(std::function<void()> drained);

  /// Cancels every job, closes the link. Idempotent; on the io_context's thread.
  void stop();

  class impl;

 private:
  explicit provider_agent(std::shared_ptr<impl> state);
  std::shared_ptr<impl> impl_;
};

// -------------------------------------------------------------------------------------------------
// Pure parts, exposed for their tests.

/// One measured level of the concurrency probe.
struct probe_level {
  std::uint32_t concurrency = 0;
  bool failed = false;               ///< a request failed, was refused (429/503) or timed out
  double tokens_per_second = 0.0;    ///< all streams together
  std::chrono::microseconds duration{0};  ///< first request sent -> last stream ended
};

/// What the probe does next, given the levels measured so far (in order 1, 2, 4, …).
struct probe_step {
  bool done = false;
  std::uint32_t next_concurrency = 0;  ///< the next level to measure when !done
  std::uint32_t sustained = 0;         ///< when done: the concurrency the backend sustains
};

/// The probe's rule: levels double (the last one is max_concurrency itself); it stops at the first
/// level that fails or whose throughput is not more than 10% above the level before, and then
/// the backend sustains the level before it (at least 1); when every level up to max_concurrency
/// passes, max_concurrency. Throughput is compared only when both levels lasted at least
/// `measurable_min`: a backend that answers in microseconds (a test server) shows scheduling noise,
/// not capacity, and such levels count as improving.
[[nodiscard]] probe_step next_probe_step(const std::vector<probe_level>& measured,
                                         std::uint32_t max_concurrency,
                                         std::chrono::microseconds measurable_min);

/// Splits text into pieces of at most `bytes_max` bytes, never inside a UTF-8 sequence (a
/// sequence longer than bytes_max, impossible for bytes_max ≥ 4, goes whole).
[[nodiscard]] std::vector<std::string_view> split_utf8(std::string_view text, std::size_t bytes_max);

}  // namespace gpustream::app
