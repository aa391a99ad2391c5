#pragma once
/// The provider link's frames as plain C++ values: one struct per member of the `Frame` union in
/// gateway/link.capnp, field for field. `frame` is the variant of all of them, in the union's order
/// (the variant index is the union tag on the wire, so only ever append).
///
/// Agent -> server: hello (first frame, exactly once), heartbeat, delta, done, job_error, deltas,
/// advertise.
/// Server -> agent: welcome (answer to hello), offer, cancel.
///
/// This header includes no Cap'n Proto header; gateway/link_codec.hpp does the wire work.

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "events/event.hpp"

namespace gpustream::gateway::link {

/// Which endpoint the backend request goes to.
enum class job_kind : std::uint8_t {
  chat,        ///< POST {base}/chat/completions
  completion,  ///< POST {base}/completions
};

// -------------------------------------------------------------------------------------------------
// agent -> server

/// The agent's introduction: what it runs and what it offers. Sent once, first.
struct hello {
  std::string agent_version;
  events::backend_kind backend = events::backend_kind::openai;
  std::string backend_url;  ///< openai: the backend's base URL; builtin: the model file
  std::vector<events::gpu_info> gpus;
  std::vector<events::model_offer> models;
  /// Jobs the agent runs at once, over all models: the server caps each model's max_concurrency
  /// (here and in later advertise frames) to it. 0: no cap but the models' own.
  std::uint32_t max_concurrency = 0;

  bool operator==(const hello&) const = default;
};

/// The agent's health, every heartbeat_interval_ms of the welcome.
struct heartbeat {
  std::uint32_t active_jobs = 0;
  std::uint32_t queued_jobs = 0;
  std::uint32_t load_percent = 0;    ///< active jobs over max concurrency, 0..100 (shown to admins)
  std::uint32_t health_percent = 0;  ///< share of recent jobs that ended without a backend fault
  std::uint64_t tokens_per_second_milli = 0;  ///< recent output rate, thousandths of a token/s
  /// The agent is stopping: it lets its running jobs finish and declines every offer until it
  /// links again, so none should be sent (each would cost its job an attempt).
  bool draining = false;

  bool operator==(const heartbeat&) const = default;
};

/// A piece of a job's answer; the pieces of one job arrive in order.
struct delta {
  std::string job_id;
  std::string text;
  std::uint32_t attempt = 0;  ///< the offer's attempt, echoed; 0: an agent that sends none
  /// A reasoning model's thinking rather than its answer (sent only to a server whose welcome
  /// set reasoning_deltas): the client gets it as reasoning_content, and it counts as a token.
  bool reasoning = false;

  bool operator==(const delta&) const = default;
};

/// A job finished normally.
struct done {
  std::string job_id;
  std::string finish_reason;  ///< the backend's, e.g. "stop", "length"
  /// The agent's own count: one token per streamed content chunk (the OpenAI streaming convention).
  std::uint32_t completion_tokens_counted = 0;
  /// The backend's reported usage; 0 when it sent none. May be cumulative or zero on some servers.
  std::uint32_t prompt_tokens_reported = 0;
  std::uint32_t completion_tokens_reported = 0;
  std::int64_t ttft_us = 0;   ///< offer received -> first content chunk
  std::int64_t total_us = 0;  ///< offer received -> end of the stream
  std::uint32_t attempt = 0;  ///< the offer's attempt, echoed; 0: an agent that sends none

  bool operator==(const done&) const = default;
};

/// A job failed (or was refused) on the agent's side.
struct job_error {
  std::string job_id;
  std::uint32_t tokens_so_far = 0;  ///< content chunks already sent as deltas
  std::string message;              ///< for an operator; never prompt text
  bool upstream_fault = false;      ///< the backend failed (the provider's fault)
  std::uint32_t attempt = 0;        ///< the offer's attempt, echoed; 0: an agent that sends none
  /// The backend refused the request itself (HTTP 400, 413 or 422): not the provider's
  /// fault, and perhaps no other backend takes it either. Neither this nor upstream_fault: the
  /// agent declined the offer without asking its backend (at capacity, a duplicate).
  bool request_rejected = false;

  bool operator==(const job_error&) const = default;
};

// -------------------------------------------------------------------------------------------------
// server -> agent

/// The server's answer to hello.
struct welcome {
  std::string provider_id;
  std::uint32_t heartbeat_interval_ms = 0;
  /// The server takes `deltas` frames. An older server does not: the agent then sends each delta
  /// on its own.
  bool delta_batches = false;
  /// The server takes deltas marked `reasoning`. An older server does not: the agent then drops
  /// the thinking, which such a server would show as the answer.
  bool reasoning_deltas = false;
  /// The server takes `advertise` frames. An older server does not: the agent then keeps the
  /// models of its hello until it links again.
  bool model_updates = false;

  bool operator==(const welcome&) const = default;
};

/// A job for the agent. request_json is the OpenAI request body to send to the backend as is.
struct offer {
  std::string job_id;
  job_kind kind = job_kind::chat;
  std::string request_json;
  /// The job's attempt, from 1. The agent's delta, done and job_error for it carry the same
  /// number, so that a job offered again to the same provider is not mixed with its earlier attempt.
  std::uint32_t attempt = 0;

  bool operator==(const offer&) const = default;
};

/// Stop a job at once: the agent closes the backend request.
struct cancel {
  std::string job_id;

  bool operator==(const cancel&) const = default;
};

/// agent -> server: several deltas (of one or more jobs) in one message, in the order they were
/// produced. An agent batches the deltas that pile up while its previous write is in flight, so
/// that a busy link costs one write and one read per batch instead of per token.
struct deltas {
  std::vector<delta> items;

  bool operator==(const deltas&) const = default;
};

/// agent -> server, only to a server whose welcome set model_updates: the models the agent offers
/// now, in place of those it offered before (its backend loaded or unloaded one). Jobs already
/// running on a model no longer offered go on.
struct advertise {
  std::vector<events::model_offer> models;

  bool operator==(const advertise&) const = default;
};

/// One link message. The alternatives' order is the wire's union order: only ever append.
using frame = std::variant<hello, heartbeat, delta, done, job_error, welcome, offer, cancel, deltas, advertise>;

/// The frame's type name for logs, e.g. "hello", "job_error".
[[nodiscard]] std::string_view frame_name(const frame& f) noexcept;

// -------------------------------------------------------------------------------------------------
// Limits and errors

/// Bounds on what decode accepts (and validate checks). Everything that comes off the link is
/// untrusted; these keep one peer from making the other allocate or work without bound.
struct codec_limits {
  /// Largest frame, bytes; bigger is decode_errc::too_large (WebSocket close 1009). Default: 1 MiB.
  std::size_t frame_bytes_max = std::size_t{1} << 20;
  /// Most 8-byte words Cap'n Proto may traverse in one frame, per word of the frame. A frame read
  /// once traverses each of its words at most once; a crafted one can point many pointers at the
  /// same words and decode to many times its size. Default: 2.
  std::uint64_t traversal_per_frame_word = 2;
  /// Longest job id, bytes. Default: 128.
  std::size_t job_id_bytes_max = 128;
  /// Longest delta text, bytes. Default: 64 KiB.
  std::size_t text_bytes_max = 64 * 1024;
  /// Longest offer request_json, bytes. Default: 1 MiB.
  std::size_t request_json_bytes_max = std::size_t{1} << 20;
  /// Most models in a hello or an advertise. Default: 64.
  std::size_t models_max = 64;
  /// Most GPUs in a hello. Default: 16.
  std::size_t gpus_max = 16;
  /// Longest name-like string (model, GPU, quantisation, agent version, provider id, finish reason),
  /// bytes. Default: 200.
  std::size_t name_bytes_max = 200;
  /// Longest URL (hello's backend_url), bytes. Default: 2048.
  std::size_t url_bytes_max = 2048;
  /// Longest job_error message, bytes. Default: 4 KiB.
  std::size_t message_bytes_max = 4 * 1024;
  /// Most deltas in one `deltas` frame. Default: 4096.
  std::size_t batch_deltas_max = 4096;
};

/// Room an offer frame takes besides its request JSON (Cap'n Proto's framing and pointers, the job
/// id of at most job_id_bytes_max bytes, padding), with a margin: a few hundred bytes in fact.
inline constexpr std::size_t offer_frame_overhead_max = 4096;

/// The largest request JSON an offer can carry under `limits`: within request_json_bytes_max, and
/// with its frame within frame_bytes_max (a bigger frame would be refused by the agent, which
/// closes the link).
[[nodiscard]] constexpr std::size_t offer_request_bytes_max(const codec_limits& limits) noexcept {
  const std::size_t frame_room = limits.frame_bytes_max > offer_frame_overhead_max
                                     ? limits.frame_bytes_max - offer_frame_overhead_max
                                     : 0;
  return limits.request_json_bytes_max < frame_room ? limits.request_json_bytes_max : frame_room;
}

/// The closed set of reasons a frame is refused.
enum class decode_errc : std::uint8_t {
  too_large,      ///< more bytes than frame_bytes_max
  malformed,      ///< not a valid Cap'n Proto `Frame` (truncated, garbage, over the traversal limit)
  unknown_frame,  ///< a union member this build does not know (a newer peer)
  over_limit,     ///< a field over its codec_limits bound (string length, list size)
  invalid_field,  ///< a field with a value the protocol forbids (unknown enumerant, bad UTF-8,
                  ///< empty job id)
};

struct decode_error {
  decode_errc code = decode_errc::malformed;
  /// What went wrong, for a person: names the frame, the field and the sizes involved.
  std::string message;
};

/// The WebSocket close code a server or agent sends when a frame fails to decode: 1009 (message too
/// big) for too_large, 1002 (protocol error) for malformed and unknown_frame, 1008 (policy
/// violation) for over_limit and invalid_field.
[[nodiscard]] std::uint16_t websocket_close_code(decode_errc code) noexcept;

/// The WebSocket close code of a link replaced by a newer one of the same provider: another agent
/// linked with its token. The replaced agent does not link again, or the two would take turns,
/// each dropping the other's jobs.
inline constexpr std::uint16_t close_code_replaced = 4001;

}  // namespace gpustream::gateway::link
