// The one gpustream executable: every operator command is a subcommand.
#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "app/provider.hpp"
#include "app/replay.hpp"
#include "app/serve.hpp"

namespace {

/// Writes `text` to stdout; false when it did not all get there (a full disk behind a redirect).
bool print(const std::string& text) {
  return std::fputs(text.c_str(), stdout) >= 0 && std::fflush(stdout) == 0 && !std::ferror(stdout);
}

int run_replay(const std::string& data, bool verify, bool json) {
  auto report = gpustream::app::replay_store(data, verify);
  if (!report) {
    const auto& problem = report.error();
    if (problem.position == 0 && problem.stream.empty()) {
      std::fprintf(stderr, "replay: %s\n", problem.message.c_str());  // not about one record
    } else {
      std::fprintf(stderr, "replay: problem at position %llu: %s\n",
                   static_cast<unsigned long long>(problem.position), problem.message.c_str());
    }
    if (json) (void)print(gpustream::app::format_json(problem));  // exits 1 either way
    return 1;
  }
  if (!print(json ? gpustream::app::format_json(*report) : gpustream::app::format_text(*report))) {
    std::fprintf(stderr, "replay: the report could not be written to stdout: %s\n", std::strerror(errno));
    return 1;
  }
  return 0;
}

/// The options whose values are secrets: never echoed, and hidden from the process list.
constexpr std::array<std::string_view, 3> secret_options = {"--admin-token", "--token", "--backend-api-key"};

/// Overwrites the values of the secret options in argv, which /proc/PID/cmdline (ps) shows every
/// local user for the life of the process. Takes both `--token VALUE` and `--token=VALUE`.
void hide_secret_values(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view argument = argv[i];
    for (const auto option : secret_options) {
      char* value = nullptr;
      if (argument == option && i + 1 < argc) {
        value = argv[++i];
      } else if (argument.size() > option.size() && argument.starts_with(option) && argument[option.size()] == '=') {
        value = argv[i] + option.size() + 1;
      }
      if (value != nullptr) {
        std::memset(value, 'x', std::strlen(value));
        break;
      }
    }
  }
}

/// A usage error's exit: 2, its message on stderr (--help and --version: their text, exit 0).
/// Unexpected arguments are named by their options only: a misspelt `--admin-tokn s3cret` would
/// otherwise print the secret that followed it.
int usage_error(const CLI::App& cli, const CLI::ParseError& problem) {
  if (problem.get_exit_code() == 0) return cli.exit(problem);
  if (dynamic_cast<const CLI::ExtrasError*>(&problem) != nullptr) {
    std::string named;
    std::size_t values = 0;
    for (const auto& argument : cli.remaining(true)) {
      if (!argument.starts_with('-')) {
        ++values;
        continue;
      }
      named += (named.empty() ? "" : ", ") + argument.substr(0, argument.find('='));
    }
    std::fprintf(stderr, "gpustream: unexpected arguments: %s%s%zu value%s not shown (one may be a secret); see "
                 "`gpustream --help` or `gpustream COMMAND --help`\n",
                 named.c_str(), named.empty() ? "" : ", and ", values, values == 1 ? "" : "s");
    return 2;
  }
  (void)cli.exit(problem);
  return 2;
}

/// A count or an amount written in decimal digits only. CLI11 reads numbers with base 0, where
/// "010" is 8 and "0x10" is 16, and takes signs and spaces: a price of "0250000" would go out as
/// 86,016 micro-USD.
const CLI::Validator decimal_digits(
    [](std::string& text) -> std::string {
      const bool digits = !text.empty() && std::all_of(text.begin(), text.end(), [](unsigned char c) {
        return c >= '0' && c <= '9';
      });
      if (digits && (text.size() == 1 || text.front() != '0')) return {};
      return "must be written in decimal digits, without a sign or a leading 0, not '" + text + "'";
    },
    "DIGITS");

}  // namespace

int main(int argc, char** argv) {
  // A write to a closed pipe (the `| tee` of serve's log, ended by the same Ctrl-C) fails with
  // EPIPE rather than kill the process before its drain.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App cli{"gpustream: a marketplace for GPU time, as an event-sourced actor runtime"};
  cli.require_subcommand(1);

  gpustream::app::serve_options serve;
  auto* serve_cmd = cli.add_subcommand("serve", "run a node: embedded event store and HTTP gateway");
  serve_cmd->add_option("--data", serve.data, "data directory of the event store")->capture_default_str();
  serve_cmd->add_option("--http", serve.http, "HOST:PORT to listen on")->capture_default_str();
  // By name only: CLI11's enum transformer also takes the enumerators' numbers ("1": buffered).
  std::string durability = "sync";
  serve_cmd->add_option("--durability", durability, "sync (fsync before acknowledging) or buffered")
      ->transform(CLI::IsMember({"sync", "buffered"}, CLI::ignore_case))  // "BUFFERED" -> "buffered"
      ->capture_default_str();
  serve_cmd->add_option("--admin-token", serve.admin_token,
                        "Bearer token of the admin API under /admin (the admin API keeps only its SHA-256; never logged)")
      ->envname("GPUSTREAM_ADMIN_TOKEN");
  serve_cmd->add_option("--rate-per-minute", serve.rate_per_minute,
                        "requests per minute allowed per API key (429 with Retry-After beyond)")
      ->check(decimal_digits)
      ->check(CLI::Range(1u, 1'000'000'000u))
      ->capture_default_str();
  serve_cmd->add_option("--rate-burst", serve.rate_burst, "requests per API key allowed at once")
      ->check(decimal_digits)
      ->check(CLI::Range(1u, 1'000'000u))
      ->capture_default_str();
  serve_cmd->add_option("--cors-origin", serve.cors_origins,
                        "an origin allowed to call the API from a browser (repeatable)");
  serve_cmd->add_option("--heartbeat-ms", serve.heartbeat_ms,
                        "provider heartbeat interval; a link silent for 3 intervals is stale")
      ->check(decimal_digits)
      ->check(CLI::Range(50u, 60'000u))  // agents send none more often than every 50 ms
      ->capture_default_str();
  serve_cmd->add_option("--public-url", serve.public_url,
                        "the address clients reach this node at, for click URLs (default: http://HOST:PORT)");
  serve_cmd->add_option("--http-threads", serve.http_threads, "threads running the HTTP/WebSocket I/O")
      ->check(decimal_digits)
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  serve_cmd->add_option("--actor-threads", serve.actor_threads, "threads running the actors (0: one per core)")
      ->check(decimal_digits)
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  serve_cmd->add_option("--stream-flush-ms", serve.stream_flush_ms,
                        "a streamed answer's first token is written at once, later ones together at "
                        "most once per this many ms (0: each at once)")
      ->check(decimal_digits)
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  serve_cmd->add_option("--sync-interval-us", serve.sync_interval_us,
                        "sync durability under load: fsyncs of the event log at most one per this many "
                        "microseconds on average, after a few back to back (0: each at once)")
      ->check(decimal_digits)
      ->check(CLI::Range(0, 1'000'000))
      ->capture_default_str();
  serve_cmd->add_option("--live-jobs-max", serve.live_jobs_max,
                        "most live jobs this node holds; one more is refused with 429 server_busy (at most "
                        "100,000, the scheduler's and the directory's bound)")
      ->check(decimal_digits)
      ->check(CLI::Range(1, 100'000))
      ->capture_default_str();

  serve_cmd->add_option("--drain-s", serve.drain_s,
                        "on SIGINT or SIGTERM, live answers may finish for up to this many seconds; those "
                        "still running are then cut short, billed for what was produced (a second signal "
                        "stops at once)")
      ->check(decimal_digits)
      ->check(CLI::Range(0u, 3'600u))
      ->capture_default_str();

  gpustream::app::provider_options provider;
  bool provider_no_probe = false;
  auto* provider_cmd = cli.add_subcommand(
      "provider", "run a provider agent: serve jobs from an OpenAI-compatible backend over an "
                  "outbound link to the coordinator");
  provider_cmd->add_option("--coordinator", provider.coordinator,
                           "the coordinator, ws://HOST:PORT (path /v1/providers/link by default)")
      ->required();
  provider_cmd->add_option("--token", provider.token,
                           "provider token from POST /admin/providers (never logged)")
      ->envname("GPUSTREAM_PROVIDER_TOKEN");
  provider_cmd->add_option("--backend", provider.backend,
                           "openai=URL: the base of an OpenAI-compatible API, e.g. "
                           "openai=http://127.0.0.1:1234/v1 (LM Studio), :11434/v1 (Ollama)")
      ->required();
  provider_cmd->add_option("--backend-api-key", provider.upstream.api_key,
                           "sent to the backend as Authorization: Bearer KEY (vLLM's --api-key); never logged")
      ->envname("GPUSTREAM_BACKEND_API_KEY");
  provider_cmd->add_option("--name", provider.name, "this agent's name in logs and its User-Agent")
      ->capture_default_str();
  provider_cmd->add_option("--price-per-mtok", provider.price_per_mtok_micros,
                           "price of input and output tokens, micro-USD per million tokens")
      ->check(decimal_digits)
      ->capture_default_str();
  provider_cmd->add_option("--max-concurrency", provider.max_concurrency,
                           "most jobs at once; the backend probe may find it sustains fewer")
      ->check(decimal_digits)
      ->capture_default_str();
  provider_cmd->add_option("--context-length", provider.context_length_tokens,
                           "context window in tokens to advertise for every model (default: what the "
                           "backend says; Ollama's num_ctx, LM Studio's loaded context, llama.cpp's n_ctx)")
      ->check(decimal_digits);
  provider_cmd->add_flag("--no-probe", provider_no_probe,
                         "advertise --max-concurrency as is, without probing the backend");
  auto provider_first_token_s = static_cast<unsigned>(
      std::chrono::duration_cast<std::chrono::seconds>(provider.upstream.first_token_timeout).count());
  auto provider_idle_s = static_cast<unsigned>(
      std::chrono::duration_cast<std::chrono::seconds>(provider.upstream.idle_timeout).count());
  provider_cmd->add_option("--backend-first-token-timeout-s", provider_first_token_s,
                           "longest silence of the backend before an answer's first token (it reads "
                           "the prompt first), seconds")
      ->check(decimal_digits)
      ->check(CLI::Range(1u, 86'400u))
      ->capture_default_str();
  // Below the coordinator's own limit (relay_options::piece_silence_max, 300 s), which would take
  // the answer away first and count it against the provider.
  provider_cmd->add_option("--backend-idle-timeout-s", provider_idle_s,
                           "longest silence of the backend once an answer streams, seconds (the "
                           "coordinator takes an answer silent for 300 s from its provider)")
      ->check(decimal_digits)
      ->check(CLI::Range(1u, 240u))
      ->capture_default_str();
  auto provider_models_refresh_s = static_cast<unsigned>(
      std::chrono::duration_cast<std::chrono::seconds>(provider.models_refresh_interval).count());
  provider_cmd->add_option("--models-refresh-s", provider_models_refresh_s,
                           "while linked, list the backend's models again this often and advertise them "
                           "when they changed (a model loaded or unloaded); 0: never, seconds")
      ->check(decimal_digits)
      ->check(CLI::Range(0u, 86'400u))
      ->capture_default_str();

  std::string replay_data = "data";
  bool replay_json = false;
  bool replay_verify = false;
  auto* replay_cmd = cli.add_subcommand(
      "replay", "read the whole log, check every record, print counts per event type and the rate");
  replay_cmd->add_option("--data", replay_data, "data directory of the event store")->capture_default_str();
  replay_cmd->add_flag("--verify", replay_verify,
                       "also rebuild every aggregate and check the domain's invariants (ledger "
                       "sums to zero, no forbidden negative balance, campaigns within budget, "
                       "payouts within earnings, transfer ids once, jobs live or terminal, no money moved for a failed job, "
                       "snapshots equal to the log) and that the indexes agree with the log (the "
                       "log itself is always checked: CRCs, gapless positions and versions, "
                       "decodable payloads); exit 1 naming the first problem");
  replay_cmd->add_flag("--json", replay_json, "print the report as JSON");

  try {
    cli.parse(argc, argv);
  } catch (const CLI::ParseError& problem) {
    return usage_error(cli, problem);
  }
  hide_secret_values(argc, argv);
  serve.mode = durability == "buffered" ? gpustream::storage::durability::buffered
                                        : gpustream::storage::durability::sync;
  // Logs go to stderr, like every diagnostic; stdout carries only command output (replay's report).
  spdlog::set_default_logger(spdlog::stderr_color_mt("gpustream"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %n %v");
  if (*serve_cmd) return gpustream::app::run_serve(serve);
  if (*replay_cmd) return run_replay(replay_data, replay_verify, replay_json);
  if (*provider_cmd) {
    provider.probe = !provider_no_probe;
    provider.upstream.first_token_timeout = std::chrono::seconds(provider_first_token_s);
    provider.upstream.idle_timeout = std::chrono::seconds(provider_idle_s);
    provider.models_refresh_interval = std::chrono::seconds(provider_models_refresh_s);
    return gpustream::app::run_provider(provider);
  }
  return 2;
}
