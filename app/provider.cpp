#include "app/provider.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>
#include <spdlog/fmt/fmt.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <csignal>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <utility>

#include "app/open_files.hpp"
#include "base/text.hpp"
#include "domain/provider.hpp"
#include "domain/scoring.hpp"
#include "gateway/backend_context.hpp"
#include "gateway/link_codec.hpp"
#include "kernels/gpu_probe.hpp"

#ifndef GPUSTREAM_VERSION
#define GPUSTREAM_VERSION "unknown"
#endif

namespace gpustream::app {

namespace asio = boost::asio;
namespace link = gateway::link;
using steady = std::chrono::steady_clock;

// -------------------------------------------------------------------------------------------------
// Pure parts.

probe_step next_probe_step(const std::vector<probe_level>& measured, std::uint32_t max_concurrency,
                           std::chrono::microseconds measurable_min) {
  const std::uint32_t top = std::max<std::uint32_t>(max_concurrency, 1);
  if (measured.empty()) {
    return top == 1 ? probe_step{.done = true, .sustained = 1} : probe_step{.next_concurrency = 1};
  }
  const auto& last = measured.back();
  const std::uint32_t before = measured.size() >= 2 ? measured[measured.size() - 2].concurrency : 0;
  if (last.failed) return {.done = true, .sustained = std::max<std::uint32_t>(before, 1)};
  if (measured.size() >= 2) {
    const auto& previous = measured[measured.size() - 2];
    const bool measurable = previous.duration >= measurable_min && last.duration >= measurable_min;
    if (measurable && !(last.tokens_per_second > 1.10 * previous.tokens_per_second)) {
      return {.done = true, .sustained = before};
    }
  }
  if (last.concurrency >= top) return {.done = true, .sustained = top};
  const std::uint32_t doubled =
      last.concurrency > top / 2 ? top : std::min<std::uint32_t>(last.concurrency * 2, top);
  return {.next_concurrency = doubled};
}

std::vector<std::string_view> split_utf8(std::string_view text, std::size_t bytes_max) {
  std::vector<std::string_view> pieces;
  const std::size_t step = std::max<std::size_t>(bytes_max, 1);
  while (!text.empty()) {
    std::size_t cut = std::min(step, text.size());
    // Back up over continuation bytes (10xxxxxx) so that the cut falls before a sequence's start.
    while (cut < text.size() && cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) {
      --cut;
    }
    if (cut == 0) {  // one sequence longer than bytes_max: send it whole
      cut = 1;
      while (cut < text.size() && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) ++cut;
    }
    pieces.push_back(text.substr(0, cut));
    text.remove_prefix(cut);
  }
  return pieces;
}

// -------------------------------------------------------------------------------------------------
// Options.

namespace {

/// Most concurrent jobs an agent may be configured for: what the coordinator takes for one model
/// (a hello asking for more is refused, and the agent would link again and again in vain).
constexpr std::uint32_t provider_concurrency_max = domain::provider_options{}.offer_concurrency_max;
/// The highest price the coordinator accepts for an offer.
constexpr std::int64_t provider_price_micros_per_mtok_max = domain::provider_options{}.price_micros_per_mtok_max;
/// Largest --context-length, and the most a backend's window is taken as: what the coordinator
/// takes (the largest models' windows are 10 million tokens).
constexpr std::uint32_t provider_context_tokens_max = domain::provider_options{}.context_length_tokens_max;
/// Longest --name kept (it goes into the User-Agent and logs).
constexpr std::size_t provider_name_bytes_max = 64;
/// Shortest time between two advertise frames of the agent: twice the coordinator's default
/// minimum (provider_link_options::advertise_interval_min), for frames that the network bunches.
constexpr std::chrono::milliseconds advertise_spacing{2'000};
/// The link's path on the coordinator.
constexpr std::string_view link_path = "/v1/providers/link";
/// Longest the agent waits for the frames it sent to go out before it closes its link to go
/// offline (see backend_gone).
constexpr std::chrono::milliseconds link_drain_wait_max{1'000};
/// Marks the probe's requests (OpenAI's optional end-user field), so that a backend's own logs or
/// counters can tell them from real jobs.
constexpr std::string_view probe_user = "gpustream-concurrency-probe";

std::string printable(std::string_view text, std::size_t bytes_max) {
  std::string out;
  for (char c : text.substr(0, bytes_max)) out.push_back(c >= 0x20 && c < 0x7f ? c : '_');
  return out;
}

}  // namespace

expected<provider_options, std::string> resolve_provider_options(provider_options options) {
  constexpr std::string_view openai_prefix = "openai=";
  if (options.backend.rfind("builtin=", 0) == 0) {
    return unexpected{std::string(
        "--backend builtin=… is not available in this build yet; use --backend openai=URL")};
  }
  if (options.backend.rfind(openai_prefix, 0) != 0 || options.backend.size() == openai_prefix.size()) {
    return unexpected{"--backend must be openai=URL (e.g. openai=http://127.0.0.1:1234/v1), got \"" +
                      printable(gateway::redacted_url(options.backend), 200) + "\""};
  }
  options.upstream.base_url = options.backend.substr(openai_prefix.size());
  // The hello names the backend (redacted): one longer than the link allows could never be sent.
  if (const auto shown = gateway::redacted_url(options.upstream.base_url);
      shown.size() > options.link.limits.url_bytes_max) {
    return unexpected{"--backend URL is " + std::to_string(shown.size()) + " bytes long; at most " +
                      std::to_string(options.link.limits.url_bytes_max) + " are allowed"};
  } else if (!std::all_of(shown.begin(), shown.end(), [](char c) { return c > ' ' && c < 0x7f; })) {
    // A hello naming it would be refused at every link, for ever.
    return unexpected{"--backend URL must be printable ASCII without spaces (percent-encode other characters), got \"" +
                      printable(shown, 200) + "\""};
  }
  auto url = gateway::parse_ws_url(options.coordinator);
  if (!url) return unexpected{"--coordinator: " + url.error()};
  if (url->target == "/") {
    while (!options.coordinator.empty() && options.coordinator.back() == '/') options.coordinator.pop_back();
    options.coordinator += link_path;
  }
  if (options.token.empty()) {
    return unexpected{std::string("no provider token: pass --token or set GPUSTREAM_PROVIDER_TOKEN")};
  }
  if (options.max_concurrency == 0 || options.max_concurrency > provider_concurrency_max) {
    return unexpected{"--max-concurrency must be from 1 to " + std::to_string(provider_concurrency_max)};
  }
  if (options.price_per_mtok_micros < 0 || options.price_per_mtok_micros > provider_price_micros_per_mtok_max) {
    return unexpected{"--price-per-mtok must be from 0 to " + std::to_string(provider_price_micros_per_mtok_max) +
                      " micro-USD per million tokens"};
  }
  if (options.probe_tokens == 0) return unexpected{std::string("probe_tokens must be at least 1")};
  if (options.probe_tokens_max < options.probe_tokens) {
    return unexpected{std::string("probe_tokens_max must be at least probe_tokens")};
  }
  if (options.context_length_tokens > provider_context_tokens_max) {
    return unexpected{"--context-length must be at most " + std::to_string(provider_context_tokens_max) +
                      " tokens (0: what the backend says)"};
  }
  options.name = printable(options.name.empty() ? "provider" : options.name, provider_name_bytes_max);
  options.link.url = options.coordinator;
  options.link.bearer_token = options.token;
  options.link.user_agent = "gpustream-provider/" GPUSTREAM_VERSION " (" + options.name + ")";
  return options;
}

// -------------------------------------------------------------------------------------------------
// The agent.

class provider_agent::impl : public std::enable_shared_from_this<impl> {
 public:
  impl(asio::io_context& io, provider_options options, gateway::upstream_client upstream,
       std::function<void(int)> on_exit)
      : io_(io),
        options_(std::move(options)),
        upstream_(std::move(upstream)),
        on_exit_(std::move(on_exit)),
        log_(spdlog::default_logger()->clone("provider")),
        timer_(io),
        heartbeat_timer_(io),
        drain_timer_(io),
        refresh_timer_(io),
        rng_(std::random_device{}()),
        heartbeat_interval_(options_.heartbeat_interval_default) {}

  void start() {
    GPUSTREAM_ENSURE(phase_ == phase::idle);
    log_->info("starting name={} version={} backend={} coordinator={} max_concurrency={}",
               options_.name, GPUSTREAM_VERSION, gateway::redacted_url(options_.upstream.base_url),
               gateway::redacted_url(options_.coordinator),
               options_.max_concurrency);
    find_gpus();
    list_models();
  }

  void drain(std::function<void()> drained) {
    if (draining_ || phase_ == phase::stopped) return;
    draining_ = true;
    on_drained_ = std::move(drained);
    log_->info("draining: no new job; {} running may finish within {} ms", jobs_.size(), options_.stop_drain_max.count());
    // Told at once, so that no offer is sent here meanwhile (each declined one costs its job an
    // attempt); the heartbeats after it say the same. Before its welcome a link's heartbeat is
    // not read: on_welcome sends it then.
    if (phase_ == phase::linked && welcomed_ && link_->connected()) send_heartbeat();
    drain_timer_.expires_after(options_.stop_drain_max);
    drain_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec || !self->on_drained_) return;
      self->log_->warn("drain took longer than {} ms; {} job(s) still running are cut off",
                       self->options_.stop_drain_max.count(), self->jobs_.size());
      std::exchange(self->on_drained_, {})();
    });
    check_drained();
  }

  void stop() {
    if (phase_ == phase::stopped) return;
    phase_ = phase::stopped;
    timer_.cancel();
    heartbeat_timer_.cancel();
    drain_timer_.cancel();
    refresh_timer_.cancel();
    cancel_probe();
    // A drain under way ends here without calling its `drained` (provider.hpp): its owner may be
    // gone. Ending the jobs below would otherwise find the drain done.
    on_drained_ = {};
    cancel_all_jobs("the agent is stopping");
    if (link_) link_->stop();
  }

 private:
  enum class phase { idle, listing, probing, linked, stopped };

  struct job {
    std::shared_ptr<gateway::upstream_request> request;
    std::uint32_t attempt = 0;  ///< the offer's, echoed in every frame about the job
    std::uint32_t tokens = 0;
    std::uint64_t bytes = 0;  ///< of the pieces sent, as the coordinator counts them
    steady::time_point started;
    std::optional<steady::time_point> first_token;
  };

  struct probe_run {
    bool warm_up = false;  ///< the unmeasured first request
    std::uint32_t concurrency = 0;
    std::uint32_t pending = 0;
    std::uint64_t tokens = 0;
    bool failed = false;
    bool refused = false;  ///< a request of it was refused by the backend (4xx): its model, perhaps
    bool finished = false;
    std::string failure;
    steady::time_point started;
    std::vector<std::shared_ptr<gateway::upstream_request>> requests;
  };

  // --- start-up: GPUs, models, probe ------------------------------------------------------------

  void find_gpus() {
    auto found = kernels::probe_gpus();
    if (!found) {
      log_->info("no GPU advertised: {}", found.error().message);
      return;
    }
    for (const auto& gpu : *found) {
      log_->info("gpu name=\"{}\" memory_bytes={} compute_capability={}.{}", gpu.name,
                 gpu.memory_bytes, gpu.compute_capability_major, gpu.compute_capability_minor);
      // A name that is not UTF-8, holds a control character or is past the link's limit would
      // make every hello fail: it is repaired, then cut (at a character's start).
      const std::string repaired = controls_replaced(utf8_repaired(gpu.name));
      const auto name = split_utf8(repaired, options_.link.limits.name_bytes_max);
      gpus_.push_back({.name = name.empty() ? std::string() : std::string(name.front()),
                       .memory_bytes = gpu.memory_bytes,
                       .compute_capability_major = gpu.compute_capability_major,
                       .compute_capability_minor = gpu.compute_capability_minor});
    }
  }

  void list_models() {
    phase_ = phase::listing;
    upstream_.list_models([self = shared_from_this()](auto result) {
      asio::post(self->io_, [self, result = std::move(result)]() mutable {
        self->on_models(std::move(result));
      });
    });
  }

  void on_models(expected<std::vector<gateway::upstream_model>, gateway::upstream_error> result) {
    if (phase_ != phase::listing) return;
    if (result && !result->empty()) {
      // Windows the list leaves out (LM Studio, Ollama) or overstates (llama.cpp server).
      gateway::find_context_lengths(upstream_, std::move(*result), [self = shared_from_this()](auto models) {
        asio::post(self->io_, [self, models = std::move(models)]() mutable { self->on_windows(std::move(models)); });
      });
      return;
    }
    const auto wait = gateway::backoff_delay(options_.link.backoff, attempt_++, rng_);
    const auto base = gateway::redacted_url(options_.upstream.base_url);
    if (result) {
      log_->warn("the backend at {} lists no model; asking again in {} ms", base, wait.count());
    } else if (result.error().kind == gateway::upstream_error_kind::http_status && result.error().http_status == 404) {
      log_->warn("GET {}/models answered 404: is the backend's URL right? OpenAI-compatible servers answer "
                 "under /v1 (e.g. openai=http://127.0.0.1:1234/v1 for LM Studio, :11434/v1 for Ollama); "
                 "asking again in {} ms",
                 base, wait.count());
    } else {
      log_->warn("listing the backend's models at {} failed ({}: {}); trying again in {} ms", base,
                 gateway::to_string(result.error().kind), result.error().message, wait.count());
    }
    after(wait, [this] { list_models(); });
  }

  /// The models with their windows: those the coordinator cannot take are left out, each named.
  void on_windows(std::vector<gateway::upstream_model> found) {
    if (phase_ != phase::listing) return;
    models_ = usable_models(std::move(found), true);
    if (models_.empty()) {
      const auto wait = gateway::backoff_delay(options_.link.backoff, attempt_++, rng_);
      log_->warn("no model of the backend can be advertised; asking again in {} ms", wait.count());
      after(wait, [this] { list_models(); });
      return;
    }
    attempt_ = 0;
    start_probe();
  }

  /// Of the backend's models, those the coordinator can take (at most models_max), in its order;
  /// `report`: each left out, changed or kept is logged (at start-up; a refresh logs only changes).
  std::vector<gateway::upstream_model> usable_models(std::vector<gateway::upstream_model> found, bool report) {
    std::vector<gateway::upstream_model> usable;
    for (auto& model : found) {
      if (options_.context_length_tokens != 0) model.context_length_tokens = options_.context_length_tokens;
      if (model.id.size() > options_.link.limits.name_bytes_max) {
        if (report) {
          log_->warn("model id={}... is {} bytes long, over the link's {}: not advertised", printable(model.id, 64),
                     model.id.size(), options_.link.limits.name_bytes_max);
        }
        continue;
      }
      if (!valid_name(model.id)) {
        // The coordinator refuses a hello offering it: the agent would never link.
        if (report) log_->warn("model id={} is not UTF-8 or holds a control character: not advertised", printable(model.id, 64));
        continue;
      }
      if (std::any_of(usable.begin(), usable.end(), [&](const auto& kept) { return kept.id == model.id; })) {
        // The coordinator refuses a hello offering a model twice: the agent would never link.
        if (report) log_->warn("model id={} is listed twice by the backend: advertised once", model.id);
        continue;
      }
      if (model.context_length_tokens == 0) {
        if (report) {
          log_->warn("model id={}: the backend does not say its context window (asked /v1/models, /props, "
                     "/api/v0/models, /api/show): not advertised; set it with --context-length",
                     model.id);
        }
        continue;
      }
      if (model.context_length_tokens > provider_context_tokens_max) {
        // The coordinator would refuse the hello, and the agent link again in vain.
        if (report) {
          log_->warn("model id={}: the backend claims a window of {} tokens; advertised as {}", model.id,
                     model.context_length_tokens, provider_context_tokens_max);
        }
        model.context_length_tokens = provider_context_tokens_max;
      }
      if (report && model.context_is_trained) {
        log_->info("model id={}: only the window it was trained with is known; a llama.cpp server started "
                   "with a smaller -c serves less (--context-length says what it serves)",
                   model.id);
      }
      if (report) log_->info("model id={} context_length_tokens={}", model.id, model.context_length_tokens);
      usable.push_back(std::move(model));
    }
    if (usable.size() > options_.link.limits.models_max) {
      if (report) {
        log_->warn("the backend lists {} models; advertising the first {}", usable.size(),
                   options_.link.limits.models_max);
      }
      usable.resize(options_.link.limits.models_max);
    }
    return usable;
  }

  /// Runs `f` after `wait` unless the agent stops first.
  void after(std::chrono::milliseconds wait, std::function<void()> f) {
    timer_.expires_after(wait);
    timer_.async_wait([self = shared_from_this(), f = std::move(f)](boost::system::error_code ec) {
      if (!ec && self->phase_ != phase::stopped) f();
    });
  }

  void start_probe() {
    phase_ = phase::probing;
    if (!options_.probe) {
      concurrency_ = options_.max_concurrency;
      log_->info("concurrency probe off; advertising max_concurrency={}", concurrency_);
      connect_link();
      return;
    }
    probe_next();
  }

  void probe_next() {
    const auto step = next_probe_step(measured_, options_.max_concurrency,
                                      options_.probe_measurable_min);
    if (step.done) {
      finish_probe(step.sustained);
      return;
    }
    // A backend that loads its model on first use (LM Studio, Ollama) spends the load's time on
    // its first request: one request goes first, unmeasured, lest level 1 look slow and the next
    // level look faster than the backend really is with more streams.
    auto run = std::make_shared<probe_run>();
    run->warm_up = !warmed_up_;
    run->concurrency = run->warm_up ? 1 : step.next_concurrency;
    run->pending = run->concurrency;
    run->started = steady::now();
    probe_ = run;
    const std::string body = probe_body();
    for (std::uint32_t i = 0; i < run->concurrency; ++i) {
      std::weak_ptr<impl> weak = shared_from_this();
      auto on_end = [weak, run](std::optional<std::string> failure, bool refused = false) {
        if (refused) run->refused = true;
        if (auto self = weak.lock()) self->on_probe_request_end(run, std::move(failure));
      };
      // A reasoning model may spend every token thinking: its pieces count as the answer's, and
      // the backend's usage when it counts more (the larger of the two counts is taken), either
      // within the probe_tokens asked for (a backend whose usage adds up every answer so far, or
      // that ignores max_tokens, would make each level look faster than the last).
      auto deltas = std::make_shared<std::uint32_t>(0);
      const auto count = [run, deltas, asked = probe_tokens()](std::string_view) {
        if (*deltas < asked) ++run->tokens;
        ++*deltas;
      };
      run->requests.push_back(upstream_.stream(
          "/chat/completions", body,
          {.on_delta = count,
           .on_done =
               [run, deltas, on_end, asked = probe_tokens()](std::string,
                                                                   std::optional<gateway::upstream_usage> usage) {
                 const std::uint32_t reported = usage ? std::min(usage->completion_tokens, asked) : 0;
                 if (reported > *deltas) run->tokens += reported - *deltas;
                 on_end({});
               },
           .on_error =
               [on_end](gateway::upstream_error error) {
                 // The backend refused the request itself (400, 413, 422), not for its own state.
                 const bool refused = error.kind == gateway::upstream_error_kind::http_status && !error.upstream_fault;
                 on_end(std::string(gateway::to_string(error.kind)) + ": " + error.message, refused);
               },
           .on_reasoning = count}));
    }
    const auto limit = run->warm_up ? options_.probe_warm_up_timeout : options_.probe_level_timeout;
    after(limit, [this, run, limit] {
      on_probe_request_end(run, (run->warm_up ? std::string("the warm-up request")
                                              : "level of " + std::to_string(run->concurrency)) +
                                    " took longer than " + std::to_string(limit.count()) + " ms");
    });
  }

  /// The models the probe may ask, in the order it tries them: those that do not look like
  /// embedding models (which cannot answer a chat) first.
  std::vector<std::string> probe_models() const {
    std::vector<std::string> ids;
    for (const auto& model : models_) ids.push_back(model.id);
    std::stable_partition(ids.begin(), ids.end(), [](const std::string& id) { return id.find("embed") == std::string::npos; });
    return ids;
  }

  std::string probe_body() const {
    const auto ids = probe_models();
    boost::json::object body{
        {"model", ids.at(std::min(probe_model_, ids.size() - 1))},
        {"messages", boost::json::array{boost::json::object{
                         {"role", "user"}, {"content", "Count from 1 to 100, separated by spaces."}}}},
        {"max_tokens", probe_tokens()},
        {"temperature", 0},
        {"stream", true},
        {"stream_options", boost::json::object{{"include_usage", true}}},
        {"user", probe_user}};
    return boost::json::serialize(body);
  }

  void on_probe_request_end(const std::shared_ptr<probe_run>& run, std::optional<std::string> failure) {
    if (run->finished || run != probe_ || phase_ != phase::probing) return;
    if (failure) {
      run->failed = true;
      run->failure = std::move(*failure);
    } else {
      --run->pending;
    }
    if (!run->failed && run->pending > 0) return;
    run->finished = true;
    timer_.cancel();
    for (const auto& request : run->requests) request->cancel();
    run->requests.clear();  // the requests' handlers hold `run`: break the cycle
    const auto duration =
        std::chrono::duration_cast<std::chrono::microseconds>(steady::now() - run->started);
    const double seconds = std::max(std::chrono::duration<double>(duration).count(), 1e-6);
    if (run->warm_up) {
      warmed_up_ = true;
      if (run->failed) {
        log_->info("probe warm-up failed: {}", run->failure);
      } else {
        log_->info("probe warm-up duration_ms={:.1f}", seconds * 1000.0);
      }
      probe_next();
      return;
    }
    if (rerun_level_one_longer(*run, duration)) return;
    last_level_refused_ = run->failed && run->refused;
    measured_.push_back({.concurrency = run->concurrency,
                         .failed = run->failed,
                         .tokens_per_second = static_cast<double>(run->tokens) / seconds,
                         .duration = duration});
    if (run->failed) {
      log_->info("probe level={} failed: {}", run->concurrency, run->failure);
    } else {
      log_->info("probe level={} tokens_per_second={:.1f} duration_ms={:.1f}", run->concurrency,
                 measured_.back().tokens_per_second, seconds * 1000.0);
    }
    probe_next();
  }

  std::uint32_t probe_tokens() const {
    return probe_tokens_scaled_ != 0 ? probe_tokens_scaled_ : options_.probe_tokens;
  }

  /// A first level that passed too quickly to measure (a small model on a fast GPU) would leave
  /// the comparison with level 2 unmade, and level 2 taken as sustained even by a backend with one
  /// slot: it runs again asking for more tokens (about twice probe_measurable_min's worth), up to
  /// probe_tokens_max. Returns whether it does.
  bool rerun_level_one_longer(const probe_run& run, std::chrono::microseconds duration) {
    const auto measurable_min = std::chrono::duration_cast<std::chrono::microseconds>(options_.probe_measurable_min);
    const std::uint32_t tokens = probe_tokens();
    if (run.failed || !measured_.empty() || duration >= measurable_min || tokens >= options_.probe_tokens_max) return false;
    const auto factor = static_cast<std::uint64_t>(2 * measurable_min.count() / std::max<std::int64_t>(duration.count(), 1)) + 1;
    probe_tokens_scaled_ = static_cast<std::uint32_t>(
        std::min<std::uint64_t>(std::uint64_t{tokens} * std::max<std::uint64_t>(factor, 2), options_.probe_tokens_max));
    log_->info("probe level=1 duration_ms={:.1f} is too short to measure; again with max_tokens={}",
               static_cast<double>(duration.count()) / 1000.0, probe_tokens_scaled_);
    probe_next();
    return true;
  }

  void finish_probe(std::uint32_t sustained) {
    probe_.reset();
    std::string levels;
    for (const auto& level : measured_) {
      levels += (levels.empty() ? "" : ", ") + std::to_string(level.concurrency) + ":" +
                (level.failed ? std::string("failed")
                              : fmt::format("{:.1f}tok/s", level.tokens_per_second));
    }
    if (const auto ids = probe_models(); !measured_.empty() && measured_.front().failed && last_level_refused_ &&
                                          probe_model_ + 1 < ids.size()) {
      // The backend refused the request itself, as it does for a model that cannot chat (an
      // embedding model whose name does not say so): the probe starts again with the next model.
      log_->info("probe: {} refused a chat; probing with {}", ids[probe_model_], ids[probe_model_ + 1]);
      ++probe_model_;
      measured_.clear();
      probe_tokens_scaled_ = 0;
      warmed_up_ = false;
      probe_next();
      return;
    }
    if (!measured_.empty() && measured_.front().failed) {
      // Not even one stream worked: the probe says nothing about concurrency (a model that must
      // be loaded first, a backend hiccup). Jobs will show what the backend can do.
      concurrency_ = options_.max_concurrency;
      log_->warn("concurrency probe inconclusive (a single stream failed, see above); advertising "
                 "max_concurrency={}",
                 concurrency_);
    } else {
      concurrency_ = std::min(options_.max_concurrency, sustained);
      log_->info("concurrency probe levels=[{}] sustained={} flag={} advertised={}", levels,
                 sustained, options_.max_concurrency, concurrency_);
    }
    connect_link();
  }

  void cancel_probe() {
    if (!probe_) return;
    probe_->finished = true;
    for (const auto& request : probe_->requests) request->cancel();
    probe_->requests.clear();
    probe_.reset();
  }

  // --- the link ---------------------------------------------------------------------------------

  void connect_link() {
    phase_ = phase::linked;
    welcomed_ = false;
    std::weak_ptr<impl> weak = shared_from_this();
    auto created = gateway::link_client::create(
        io_, options_.link,
        {.on_connected = [weak] { if (auto self = weak.lock()) self->on_connected(); },
         .on_frame = [weak](link::frame f) { if (auto self = weak.lock()) self->on_frame(std::move(f)); },
         .on_disconnected =
             [weak](const gateway::link_disconnect& d) { if (auto self = weak.lock()) self->on_disconnected(d); }});
    // The options were checked by resolve_provider_options, so this cannot fail.
    GPUSTREAM_ENSURE(created.has_value());
    link_ = std::move(*created);
    link_->start();
  }

  link::hello make_hello() const {
    link::hello hello{.agent_version = "gpustream " GPUSTREAM_VERSION,
                      .backend = events::backend_kind::openai,
                      .backend_url = gateway::redacted_url(options_.upstream.base_url),
                      .gpus = gpus_,
                      .models = offers(),
                      .max_concurrency = concurrency_};
    if (hello.gpus.size() > options_.link.limits.gpus_max) hello.gpus.resize(options_.link.limits.gpus_max);
    return hello;
  }

  /// What the agent offers: each of the backend's usable models at its price and concurrency.
  std::vector<events::model_offer> offers() const {
    std::vector<events::model_offer> out;
    for (const auto& model : models_) {
      out.push_back({.model_name = model.id,
                     .context_length_tokens = model.context_length_tokens,
                     .quantisation = "",
                     .input_price_micros_per_mtok = options_.price_per_mtok_micros,
                     .output_price_micros_per_mtok = options_.price_per_mtok_micros,
                     .max_concurrency = concurrency_});
    }
    return out;
  }

  // --- the backend's models while linked ----------------------------------------------------------

  /// Lists the backend's models again in `wait`, unless a listing is due sooner already.
  void schedule_refresh(std::chrono::milliseconds wait) {
    if (!model_updates_ || options_.models_refresh_interval.count() == 0) return;
    const auto due = steady::now() + wait;
    if (refresh_scheduled_ && refresh_due_ <= due) return;
    refresh_scheduled_ = true;
    refresh_due_ = due;
    refresh_timer_.expires_at(due);  // cancels the wait for a later one
    refresh_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec) return;
      self->refresh_scheduled_ = false;
      self->refresh_models();
    });
  }

  /// A job's 404 says its model may be gone: its listing comes at once, or models_refresh_min
  /// after the last one.
  void refresh_soon() {
    const auto since = std::chrono::duration_cast<std::chrono::milliseconds>(steady::now() - last_listing_);
    schedule_refresh(std::max(options_.models_refresh_min - since, std::chrono::milliseconds(0)));
  }

  void refresh_models() {
    // A link not welcomed yet is refreshed from its welcome; a draining agent takes no new work.
    if (phase_ != phase::linked || !welcomed_ || draining_ || listing_models_) return;
    listing_models_ = true;
    last_listing_ = steady::now();
    upstream_.list_models([self = shared_from_this()](auto result) {
      asio::post(self->io_, [self, result = std::move(result)]() mutable { self->on_refreshed(std::move(result)); });
    });
  }

  void on_refreshed(expected<std::vector<gateway::upstream_model>, gateway::upstream_error> result) {
    if (phase_ != phase::linked) {  // stopped, or gone offline: its own listing decides
      listing_models_ = false;
      return;
    }
    if (!result) {
      // The jobs' own errors tell whether the backend is gone; what it offers stays as it was.
      listing_models_ = false;
      log_->warn("listing the backend's models again failed ({}: {}); asking again in {} ms",
                 gateway::to_string(result.error().kind), result.error().message,
                 options_.models_refresh_interval.count());
      schedule_refresh(options_.models_refresh_interval);
      return;
    }
    gateway::find_context_lengths(upstream_, std::move(*result), [self = shared_from_this()](auto models) {
      asio::post(self->io_, [self, models = std::move(models)]() mutable { self->on_rewindowed(std::move(models)); });
    });
  }

  void on_rewindowed(std::vector<gateway::upstream_model> found) {
    listing_models_ = false;
    if (phase_ != phase::linked) return;  // gone offline meanwhile: its own listing decides
    schedule_refresh(options_.models_refresh_interval);
    // A window the backend's own API did not tell this time (a lookup that timed out) is the one
    // told before, not a reason to withdraw a model that serves. A model no longer listed goes.
    for (auto& model : found) {
      const auto known = std::find_if(models_.begin(), models_.end(), [&](const auto& m) { return m.id == model.id; });
      const bool unknown = model.context_length_tokens == 0 || model.context_is_trained;
      if (unknown && known != models_.end() && !known->context_is_trained) {
        model.context_length_tokens = known->context_length_tokens;
        model.context_is_trained = false;
      }
    }
    auto usable = usable_models(std::move(found), false);
    const auto same = [](const gateway::upstream_model& a, const gateway::upstream_model& b) {
      return a.id == b.id && a.context_length_tokens == b.context_length_tokens;
    };
    if (std::equal(usable.begin(), usable.end(), models_.begin(), models_.end(), same)) {
      tell_models();  // one held back by advertise_spacing goes now
      return;
    }
    const auto names = [](const std::vector<gateway::upstream_model>& models) {
      std::string out;
      for (const auto& model : models) out += (out.empty() ? "" : ",") + model.id;
      return out.empty() ? std::string("none") : out;
    };
    log_->info("the backend's models changed: now {} (before: {})", names(usable), names(models_));
    models_ = std::move(usable);
    tell_models();
  }

  /// Sends the models offered now when the current link was told others (in its hello or last
  /// advertise). Not welcomed yet: on_welcome tells it; not linked: the next hello does.
  void tell_models() {
    if (!welcomed_ || !model_updates_ || !link_->connected()) return;
    auto now = offers();
    if (now == told_) return;
    // The coordinator closes a link whose advertise frames come closer than a second apart.
    const auto since = steady::now() - last_advertise_;
    if (since < advertise_spacing) {
      schedule_refresh(std::chrono::duration_cast<std::chrono::milliseconds>(advertise_spacing - since) +
                       std::chrono::milliseconds(1));
      return;
    }
    told_ = now;
    last_advertise_ = steady::now();
    send(link::advertise{std::move(now)});
  }

  void on_connected() {
    if (phase_ != phase::linked) return;  // going offline (see backend_gone): the link is about to stop
    const auto hello = make_hello();
    if (auto valid = link::validate(hello, options_.link.limits); !valid) {
      // A model name or URL over the link's limits: the coordinator would close the link.
      log_->error("cannot say hello: {}", valid.error().message);
      link_->drop(1008, "hello over the link's limits");
      return;
    }
    log_->info("link up; hello models={} gpus={} max_concurrency={}", hello.models.size(),
               hello.gpus.size(), hello.max_concurrency);
    told_ = hello.models;
    send(hello);
  }

  void on_disconnected(const gateway::link_disconnect& d) {
    welcomed_ = false;
    heartbeat_timer_.cancel();
    refresh_timer_.cancel();
    refresh_scheduled_ = false;
    cancel_all_jobs("the link to the coordinator went down");
    if (d.kind == gateway::link_disconnect_kind::rejected &&
        (d.http_status == 401 || d.http_status == 403)) {
      log_->error("{}; check --token (or GPUSTREAM_PROVIDER_TOKEN). Giving up.", d.message);
      stop();
      if (on_exit_) on_exit_(exit_turned_away);
      return;
    }
    if (d.kind == gateway::link_disconnect_kind::closed_by_peer && d.close_code == link::close_code_replaced) {
      log_->error("{}: another agent linked with this provider's token, and two agents cannot share one (each "
                  "would drop the other's jobs); give each GPU server its own provider and token. Giving up.",
                  d.message);
      stop();
      if (on_exit_) on_exit_(exit_turned_away);
      return;
    }
    log_->warn("link down kind={} was_connected={} retry_in_ms={}: {}", gateway::to_string(d.kind),
               d.was_connected, d.retry_in.count(), d.message);
  }

  void on_frame(link::frame f) {
    if (auto* offer = std::get_if<link::offer>(&f)) {
      on_offer(std::move(*offer));
    } else if (const auto* cancel = std::get_if<link::cancel>(&f)) {
      on_cancel(*cancel);
    } else if (const auto* welcome = std::get_if<link::welcome>(&f)) {
      on_welcome(*welcome);
    } else {
      // Frames of the agent's own direction coming back: the coordinator is confused.
      log_->warn("unexpected {} frame from the coordinator; closing the link", link::frame_name(f));
      link_->drop(1008, "unexpected frame for an agent");
    }
  }

  void on_welcome(const link::welcome& welcome) {
    link_->batch_deltas(welcome.delta_batches);
    reasoning_deltas_ = welcome.reasoning_deltas;
    heartbeat_interval_ = std::clamp(std::chrono::milliseconds(welcome.heartbeat_interval_ms),
                                     options_.heartbeat_interval_min, options_.heartbeat_interval_max);
    model_updates_ = welcome.model_updates;
    log_->info("welcome provider_id={} heartbeat_interval_ms={} delta_batches={} reasoning_deltas={} model_updates={}",
               welcome.provider_id, heartbeat_interval_.count(), welcome.delta_batches, welcome.reasoning_deltas,
               welcome.model_updates);
    last_heartbeat_ = steady::now();
    tokens_since_heartbeat_ = 0;
    welcomed_ = true;
    schedule_heartbeat();
    if (draining_) send_heartbeat();  // a link made while stopping: told at once, as drain() does
    tell_models();  // a listing that ended between the hello and the welcome
    schedule_refresh(options_.models_refresh_interval);
  }

  void schedule_heartbeat() {
    heartbeat_timer_.expires_after(heartbeat_interval_);
    heartbeat_timer_.async_wait([self = shared_from_this()](boost::system::error_code ec) {
      if (ec || self->phase_ != phase::linked || !self->link_->connected()) return;
      self->send_heartbeat();
      // A full send queue drops the link in send_heartbeat: the next link's welcome starts anew.
      if (self->link_->connected()) self->schedule_heartbeat();
    });
  }

  void send_heartbeat() {
    const auto now = steady::now();
    const double seconds = std::max(std::chrono::duration<double>(now - last_heartbeat_).count(), 1e-3);
    const auto active = static_cast<std::uint32_t>(jobs_.size());
    while (!outcomes_.empty() && now - outcomes_.front().at > options_.health_window_age_max) outcomes_.pop_front();
    std::uint32_t healthy = 0;
    for (const auto& outcome : outcomes_) healthy += outcome.ok ? 1 : 0;
    send(link::heartbeat{
        .active_jobs = active,
        .queued_jobs = 0,  // the agent queues nothing: offers beyond its concurrency are refused
        .load_percent = std::min<std::uint32_t>(100, active * 100 / std::max<std::uint32_t>(concurrency_, 1)),
        .health_percent = outcomes_.empty()
                              ? 100
                              : static_cast<std::uint32_t>(healthy * 100 / outcomes_.size()),
        .tokens_per_second_milli =
            static_cast<std::uint64_t>(static_cast<double>(tokens_since_heartbeat_) * 1000.0 / seconds),
        .draining = draining_});
    last_heartbeat_ = now;
    tokens_since_heartbeat_ = 0;
  }

  /// Sends a frame; a full queue means the coordinator stopped reading, so the link is dropped
  /// (and every job with it) rather than losing a piece of some answer.
  bool send(const link::frame& f) { return sent(link_->send(f), link::frame_name(f)); }

  /// Sends a job's first delta, which may overtake other jobs' later ones (link_client::send_first).
  bool send_first(const link::delta& d) { return sent(link_->send_first(d), "delta"); }

  bool sent(const expected<void, gateway::link_send_error>& result, std::string_view frame_name) {
    if (result) return true;
    if (result.error().code == gateway::link_send_errc::queue_full) {
      log_->error("dropping the link: {}", result.error().message);
      link_->drop(1008, "agent send queue full");
    } else if (result.error().code == gateway::link_send_errc::frame_too_large) {
      log_->error("a {} frame is too large for the link: {}", frame_name, result.error().message);
    }
    return false;
  }

  // --- jobs -------------------------------------------------------------------------------------

  void on_offer(link::offer offer) {
    if (const auto running = jobs_.find(offer.job_id); running != jobs_.end()) {
      // Refusing an offer of the attempt that runs would end that attempt at the coordinator (its
      // error names the attempt) while its backend request goes on, holding a slot for nothing.
      if (offer.attempt == running->second.attempt) {
        log_->warn("job={} attempt={} offered again while it runs: the running answer goes on", offer.job_id,
                   offer.attempt);
        return;
      }
      if (offer.attempt < running->second.attempt) {
        refuse(offer, "job " + offer.job_id + " runs here for a later attempt");
        return;
      }
      // The coordinator gave up on the earlier attempt (the answer continues from what it got):
      // that request stops, and the new one takes its slot (also while draining or going
      // offline: it is refused below, as any new offer is then).
      log_->info("job={} attempt={} replaces attempt={} running here", offer.job_id, offer.attempt,
                 running->second.attempt);
      running->second.request->cancel();
      jobs_.erase(running);
    }
    if (phase_ != phase::linked) {  // going offline: the backend does not answer
      refuse(offer, "the provider's backend does not answer; the provider is going offline");
      return;
    }
    if (draining_) {
      refuse(offer, "the provider is stopping");
      check_drained();  // the earlier attempt stopped above may have been the last job
      return;
    }
    if (jobs_.size() >= concurrency_) {
      log_->warn("refusing job={}: {} of {} slots busy", offer.job_id, jobs_.size(), concurrency_);
      refuse(offer, "the provider is at capacity (" + std::to_string(concurrency_) + " jobs)");
      return;
    }
    const std::string_view path =
        offer.kind == link::job_kind::chat ? "/chat/completions" : "/completions";
    log_->debug("job={} started kind={}", offer.job_id, path);
    auto& running = jobs_[offer.job_id];
    running.started = steady::now();
    running.attempt = offer.attempt;
    std::weak_ptr<impl> weak = shared_from_this();
    const std::string id = offer.job_id;
    const std::uint32_t attempt = offer.attempt;
    running.request = upstream_.stream(
        path, std::move(offer.request_json),
        {.on_delta =
             [weak, id, attempt](std::string_view text) {
               if (auto self = weak.lock()) self->on_delta(id, attempt, text, false);
             },
         .on_done =
             [weak, id, attempt](std::string finish_reason, std::optional<gateway::upstream_usage> usage) {
               if (auto self = weak.lock()) self->on_done(id, attempt, std::move(finish_reason), usage);
             },
         .on_error =
             [weak, id, attempt](gateway::upstream_error error) {
               if (auto self = weak.lock()) self->on_error(id, attempt, std::move(error));
             },
         .on_reasoning =
             [weak, id, attempt](std::string_view text) {
               if (auto self = weak.lock()) self->on_delta(id, attempt, text, true);
             }});
  }

  /// Declines an offer without asking the backend (neither fault flag: the provider did nothing
  /// wrong, and another provider may take the job).
  void refuse(const link::offer& offer, std::string message) {
    send(link::job_error{.job_id = offer.job_id, .tokens_so_far = 0, .message = std::move(message),
                         .upstream_fault = false, .attempt = offer.attempt, .request_rejected = false});
  }

  /// The job `job_id` running here for `attempt`, or jobs_.end() (it ended, or a later offer of
  /// the same job runs now: what the earlier attempt's request still reports is not the job's).
  auto find_job(const std::string& job_id, std::uint32_t attempt) {
    const auto found = jobs_.find(job_id);
    return found != jobs_.end() && found->second.attempt == attempt ? found : jobs_.end();
  }

  /// A piece of the answer, or of a reasoning model's thinking (`reasoning`), which goes only to a
  /// server that takes it (an older one would show it as the answer) and then counts as a token.
  void on_delta(const std::string& job_id, std::uint32_t attempt, std::string_view text, bool reasoning) {
    if (reasoning && !reasoning_deltas_) return;
    const auto found = find_job(job_id, attempt);
    if (found == jobs_.end()) return;
    auto& running = found->second;
    bool first = !running.first_token;
    if (first) {
      running.first_token = steady::now();
      busy_in_a_row_ = 0;  // the backend answers: busy again later is busy, not broken
    }
    ++running.tokens;  // one token per chunk: the OpenAI streaming convention
    running.bytes += text.size();
    ++tokens_since_heartbeat_;
    for (const auto piece : split_utf8(text, options_.link.limits.text_bytes_max)) {
      link::delta frame{.job_id = job_id, .text = std::string(piece), .attempt = attempt, .reasoning = reasoning};
      if (auto valid = link::validate(frame, options_.link.limits); !valid) {
        fail_job(job_id, "the backend sent text the link cannot carry: " + valid.error().message,
                 failure_cause::backend);
        return;
      }
      // The first token's first piece may overtake other jobs' later tokens held for the link.
      const bool ok = std::exchange(first, false) ? send_first(frame) : send(frame);
      if (!ok) return;  // the link is down or being dropped: the job goes with it
    }
  }

  void on_done(const std::string& job_id, std::uint32_t attempt, std::string finish_reason,
               std::optional<gateway::upstream_usage> usage) {
    const auto found = find_job(job_id, attempt);
    if (found == jobs_.end()) return;
    if (finish_reason == "abort" || finish_reason == "error") {
      // vLLM ends an answer its engine gave up on with "abort": cut short, not finished. As a
      // failure it continues on another provider with the answer so far.
      fail_job(job_id, "the backend ended the answer with finish_reason \"" + finish_reason + "\"",
               failure_cause::backend);
      return;
    }
    const job running = std::move(found->second);
    jobs_.erase(found);
    record_outcome(true);
    const auto now = steady::now();
    const auto micros = [&](steady::time_point t) {
      return std::chrono::duration_cast<std::chrono::microseconds>(t - running.started).count();
    };
    const auto pieces = split_utf8(finish_reason, options_.link.limits.name_bytes_max);
    // The backend's count of the answer, cross-checked against the pieces counted here as the
    // coordinator checks it: a backend whose usage adds up answers (or says 1 for every answer)
    // would get an honest provider suspended for mismatched counts. Such a count goes as unknown.
    std::uint32_t reported = usage ? usage->completion_tokens : 0;
    if (reported != 0 &&
        !domain::token_counts_match(
            {.provider_reported_tokens = reported, .attempt_tokens = running.tokens, .attempt_bytes = running.bytes},
            domain::scoring_options{})) {
      log_->warn("job={} the backend's usage says {} completion tokens for {} pieces ({} bytes): sent as unknown "
                 "(does it add up usage over answers?)",
                 job_id, reported, running.tokens, running.bytes);
      reported = 0;
    }
    link::done done{.job_id = job_id,
                    .finish_reason = pieces.empty() ? std::string() : std::string(pieces.front()),
                    .completion_tokens_counted = running.tokens,
                    .prompt_tokens_reported = usage ? usage->prompt_tokens : 0,
                    .completion_tokens_reported = reported,
                    .ttft_us = running.first_token ? micros(*running.first_token) : micros(now),
                    .total_us = micros(now),
                    .attempt = attempt};
    if (!link::validate(done, options_.link.limits)) done.finish_reason = "stop";
    log_->info("job={} done finish_reason={} tokens_counted={} tokens_reported={} ttft_ms={} total_ms={}",
               job_id, printable(done.finish_reason, 40), done.completion_tokens_counted,
               done.completion_tokens_reported, done.ttft_us / 1000, done.total_us / 1000);
    busy_in_a_row_ = 0;  // it answered (an empty answer has no first token)
    send(done);
    check_drained();  // after the done is queued: the drain's end waits for it to go out
  }

  void on_error(const std::string& job_id, std::uint32_t attempt, gateway::upstream_error error) {
    const auto found = find_job(job_id, attempt);
    if (found == jobs_.end()) return;
    if (error.kind == gateway::upstream_error_kind::connect && error.refused && found->second.tokens == 0) {
      return backend_gone(job_id, error.message);
    }
    // Its model may be gone (404), or unloaded (a 400 or 422 that blames it, as LM Studio's "No
    // models loaded"): the coordinator should know.
    const bool model_refused = error.upstream_fault && (error.http_status == 400 || error.http_status == 422);
    if (error.http_status == 404 || model_refused) refresh_soon();
    // Busy now (Ollama's full queue, llama.cpp loading its model, a rate limit in front of the
    // backend) before the answer began: not a broken answer. The job goes to another provider
    // declined, spending none of its attempts and none of this provider's standing, and this one
    // gets no new job until its next heartbeat; its health shows the failure meanwhile. A backend
    // busy busy_declines_in_a_row_max times with no answer between is taken as broken (a proxy
    // answering 503 for a crashed server): its failures count as the provider's again.
    const bool busy_now = error.kind == gateway::upstream_error_kind::http_status &&
                          (error.http_status == 429 || error.http_status == 503) && found->second.tokens == 0;
    if (busy_now) ++busy_in_a_row_;
    const bool busy = busy_now && busy_in_a_row_ <= options_.busy_declines_in_a_row_max;
    fail_job(job_id,
             std::string(busy ? "backend busy, " : "backend ") + std::string(gateway::to_string(error.kind)) +
                 (error.http_status != 0 ? " " + std::to_string(error.http_status) : std::string()) +
                 ": " + error.message,
             busy ? failure_cause::busy : error.upstream_fault ? failure_cause::backend : failure_cause::request);
  }

  /// Why a running job failed: its backend failed (the provider's fault), the backend refused the
  /// request itself (HTTP 400, 413 or 422: the request's fault, as far as this backend can tell),
  /// or it was busy before the answer began (HTTP 429 or 503: declined, nobody's fault).
  enum class failure_cause { backend, request, busy };

  void fail_job(const std::string& job_id, std::string message, failure_cause cause) {
    const bool upstream_fault = cause == failure_cause::backend;
    const auto found = jobs_.find(job_id);
    if (found == jobs_.end()) return;
    const auto tokens = found->second.tokens;
    const auto attempt = found->second.attempt;
    found->second.request->cancel();  // no-op when the request already ended
    jobs_.erase(found);
    if (cause != failure_cause::request) record_outcome(false);
    // The message may carry the backend's own words, never the prompt: the upstream client keeps
    // only the backend's error message.
    message = utf8_repaired(message);  // a frame that is not UTF-8 would close the link
    const auto pieces = split_utf8(message, options_.link.limits.message_bytes_max);
    message = pieces.empty() ? std::string() : std::string(pieces.front());
    log_->warn("job={} failed tokens_so_far={} upstream_fault={}: {}", job_id, tokens, upstream_fault,
               message);
    send(link::job_error{.job_id = job_id, .tokens_so_far = tokens, .message = std::move(message),
                         .upstream_fault = upstream_fault, .attempt = attempt,
                         .request_rejected = cause == failure_cause::request});
    check_drained();  // after the job_error is queued: the drain's end waits for it to go out
  }

  /// Nothing listens at the backend's address (LM Studio or Ollama quit, vLLM restarting; a
  /// refused connection, not a timeout or a shortage of file descriptors here): every
  /// offer would fail the same way, each counted against this provider until it is suspended. The
  /// job that found out goes back declined (no fault: its request never reached a backend), and
  /// the agent goes offline, once that has been sent, until the backend lists its models again;
  /// then it probes and links anew.
  void backend_gone(const std::string& job_id, const std::string& why) {
    const auto found = jobs_.find(job_id);
    const std::uint32_t attempt = found->second.attempt;
    jobs_.erase(found);
    log_->warn("the backend at {} does not answer ({}); going offline until it lists its models again",
               gateway::redacted_url(options_.upstream.base_url), why);
    send(link::job_error{.job_id = job_id, .tokens_so_far = 0,
                         .message = utf8_repaired("the provider's backend does not answer: " + why),
                         .upstream_fault = false, .attempt = attempt, .request_rejected = false});
    phase_ = phase::listing;  // no offer is taken meanwhile, and no heartbeat sent
    busy_in_a_row_ = 0;       // a backend started again is judged afresh
    heartbeat_timer_.cancel();
    cancel_all_jobs("the backend does not answer");
    when_sent(timer_, steady::now() + link_drain_wait_max, [this] {
      // Stops the link, then lists the backend's models again, after backoff.
      if (link_) link_->stop();
      link_.reset();
      models_.clear();
      measured_.clear();
      probe_tokens_scaled_ = 0;
      warmed_up_ = false;
      probe_model_ = 0;
      const auto wait = gateway::backoff_delay(options_.link.backoff, attempt_++, rng_);
      after(wait, [this] { list_models(); });
    });
  }

  /// Calls `then` once the frames sent on the link have gone out (or the link is down, or at
  /// `deadline`), checking every 10 ms with `timer`; never when the timer is cancelled (a stop),
  /// or its wait replaced: `timer` must have no other user meanwhile (timer_ has none once the
  /// agent is linked; drain_timer_ none once drained).
  void when_sent(asio::steady_timer& timer, steady::time_point deadline, std::function<void()> then) {
    if (!link_ || !link_->connected() || link_->queued_bytes() == 0 || steady::now() >= deadline) return then();
    timer.expires_after(std::chrono::milliseconds(10));
    timer.async_wait([self = shared_from_this(), &timer, deadline, then = std::move(then)](boost::system::error_code ec) mutable {
      if (!ec && self->phase_ != phase::stopped) self->when_sent(timer, deadline, std::move(then));
    });
  }

  void on_cancel(const link::cancel& cancel) {
    const auto found = jobs_.find(cancel.job_id);
    if (found == jobs_.end()) return;  // already ended: its done or error is on its way
    found->second.request->cancel();
    log_->info("job={} cancelled by the coordinator tokens_so_far={}", cancel.job_id,
               found->second.tokens);
    jobs_.erase(found);
    check_drained();
  }

  /// Also when none runs: the job that made this call may have been the last (a drain ends).
  void cancel_all_jobs(std::string_view why) {
    if (!jobs_.empty()) {
      log_->warn("cancelling {} running job(s): {}", jobs_.size(), why);
      for (auto& [id, running] : jobs_) running.request->cancel();
      jobs_.clear();
    }
    check_drained();
  }

  /// Calls the drain's callback, after the current handler, once no job runs and what was sent
  /// for the last ones (their done frames) has gone out: the callback stops the link, which would
  /// drop frames still queued.
  void check_drained() {
    if (!draining_ || !jobs_.empty() || !on_drained_) return;
    drain_timer_.cancel();
    // Posted: a stop() that runs before it (a second signal) means it is never called.
    when_sent(drain_timer_, steady::now() + link_drain_wait_max,
              [this, drained = std::exchange(on_drained_, {})] {
                asio::post(io_, [self = weak_from_this(), drained] {
                  const auto agent = self.lock();
                  if (agent && agent->phase_ != phase::stopped) drained();
                });
              });
  }

  void record_outcome(bool ok) {
    outcomes_.push_back({steady::now(), ok});
    while (outcomes_.size() > options_.health_window_jobs_max) outcomes_.pop_front();
  }

  asio::io_context& io_;
  provider_options options_;
  gateway::upstream_client upstream_;
  std::function<void(int)> on_exit_;
  std::shared_ptr<spdlog::logger> log_;
  asio::steady_timer timer_;  // model listing retries and the probe's level timeout
  asio::steady_timer heartbeat_timer_;
  asio::steady_timer drain_timer_;  // a drain's limit (stop_drain_max)
  asio::steady_timer refresh_timer_;  // the next listing of the backend's models while linked
  std::mt19937_64 rng_;
  phase phase_ = phase::idle;
  std::uint32_t attempt_ = 0;
  std::vector<events::gpu_info> gpus_;
  std::vector<gateway::upstream_model> models_;
  bool draining_ = false;
  bool welcomed_ = false;  ///< the current link got its welcome (heartbeats are read from then on)
  std::function<void()> on_drained_;  ///< the drain's callback, until called
  std::vector<probe_level> measured_;
  std::uint32_t busy_in_a_row_ = 0;  ///< offers declined for a busy backend since it last answered
  /// Tokens each probe request asks for now: probe_tokens, more once level 1 ran too short to
  /// measure (see on_probe_request_end); 0 until then.
  std::uint32_t probe_tokens_scaled_ = 0;
  bool warmed_up_ = false;  ///< the probe's unmeasured first request has run
  std::size_t probe_model_ = 0;      ///< of probe_models(), the one the probe asks
  bool last_level_refused_ = false;  ///< the last level measured failed on a refusal (4xx)
  std::shared_ptr<probe_run> probe_;
  std::uint32_t concurrency_ = 1;
  std::unique_ptr<gateway::link_client> link_;
  std::map<std::string, job> jobs_;
  struct outcome {
    steady::time_point at;
    bool ok = true;  ///< false when the backend failed
  };
  std::deque<outcome> outcomes_;  // recent jobs, oldest first
  std::chrono::milliseconds heartbeat_interval_;
  steady::time_point last_heartbeat_{};
  std::uint64_t tokens_since_heartbeat_ = 0;
  bool reasoning_deltas_ = false;  ///< the server's welcome: it takes deltas marked reasoning
  bool model_updates_ = false;     ///< the server's welcome: it takes advertise frames
  std::vector<events::model_offer> told_;  ///< what the current link was told it offers
  steady::time_point last_advertise_{};     ///< when it was last told (advertise_spacing)
  bool refresh_scheduled_ = false;  ///< refresh_timer_ waits for refresh_due_
  steady::time_point refresh_due_{};
  bool listing_models_ = false;  ///< a refresh's listing is under way
  steady::time_point last_listing_{};
};

expected<std::unique_ptr<provider_agent>, std::string> provider_agent::create(
    asio::io_context& io, provider_options options, std::function<void(int)> on_exit) {
  auto upstream = gateway::upstream_client::create(io, options.upstream);
  if (!upstream) return unexpected{"--backend: " + upstream.error()};
  auto state = std::make_shared<impl>(io, std::move(options), std::move(*upstream), std::move(on_exit));
  return std::unique_ptr<provider_agent>(new provider_agent(std::move(state)));
}

provider_agent::provider_agent(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

provider_agent::~provider_agent() { impl_->stop(); }

void provider_agent::start() { impl_->start(); }

void provider_agent::drain(std::function<void()> drained) { impl_->drain(std::move(drained)); }

void provider_agent::stop() { impl_->stop(); }

// -------------------------------------------------------------------------------------------------
// The subcommand.

int run_provider(const provider_options& given) {
  auto options = resolve_provider_options(given);
  if (!options) {
    spdlog::error("provider: {}", options.error());
    return 1;
  }
  (void)raise_open_files_limit();  // a backend connection per concurrent job
  // One thread runs everything (link, backend requests, timers): forwarding tokens is light work,
  // and one thread needs no locks.
  asio::io_context io(1);
  int exit_code = 0;
  auto agent = provider_agent::create(io, std::move(*options), [&](int code) {
    exit_code = code;
    io.stop();
  });
  if (!agent) {
    spdlog::error("provider: {}", agent.error());
    return 1;
  }
  asio::signal_set signals(io, SIGINT, SIGTERM);
  // Its terminal closed (SIGHUP) drains too, as serve's does, unless ignored (nohup): asio's
  // handler would take it over.
  if (struct sigaction hang_up {}; sigaction(SIGHUP, nullptr, &hang_up) == 0 && hang_up.sa_handler != SIG_IGN) {
    signals.add(SIGHUP);
  }
  asio::steady_timer grace(io);
  bool stopping = false;
  const auto stop_now = [&] {
    if (std::exchange(stopping, true)) return;
    signals.cancel();
    (*agent)->stop();
    // Closing handshakes get a moment; idle backend connections would otherwise keep run() busy.
    grace.expires_after(std::chrono::seconds(1));
    grace.async_wait([&](boost::system::error_code) { io.stop(); });
  };
  // The first signal lets running answers finish (an answer cut off counts against the
  // provider); a second one stops at once.
  signals.async_wait([&](boost::system::error_code ec, int signal) {
    if (ec) return;
    spdlog::info("provider: stopping on signal {} once running answers finish (another signal stops at once)", signal);
    signals.async_wait([&](boost::system::error_code again, int) {
      if (!again) stop_now();
    });
    (*agent)->drain(stop_now);
  });
  (*agent)->start();
  io.run();
  return exit_code;
}

}  // namespace gpustream::app
