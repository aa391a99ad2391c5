#pragma once
/// An asynchronous client for an OpenAI-compatible backend (LM Studio, Ollama, llama.cpp server,
/// vLLM, the test upstream): lists its models and streams completions over plain http://, on a
/// caller-supplied boost::asio::io_context. Beast stays behind this header.
///
/// Threading: every callback runs on one of the threads running the io_context. The callbacks of
/// one request never run concurrently with each other. `upstream_client` and `upstream_request`
/// may be used from any thread.
///
/// Lifetime: the io_context must outlive the client, every request and every callback. A request
/// keeps what it needs alive by itself until it ends; dropping its handle does not cancel it.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"

namespace boost::asio {
class io_context;
}

namespace gpustream::gateway {

struct upstream_options {
  /// Base URL of the OpenAI-compatible API, e.g. "http://127.0.0.1:1234/v1"; only http:// is
  /// supported. Paths given to the operations are appended to it. No default: required.
  std::string base_url;
  /// Sent as "Authorization: Bearer <api_key>" when not empty (vLLM --api-key, hosted backends).
  /// Never logged. Default: empty (no header).
  std::string api_key;
  /// Longest time to resolve the host and open the TCP connection. Default: 5 s.
  std::chrono::milliseconds connect_timeout{5000};
  /// Longest time without receiving a single byte while a response is awaited or streamed; then
  /// the request fails (kind timeout). A streamed answer's wait for its first event has its own
  /// bound, first_token_timeout. Default: 120 s.
  std::chrono::milliseconds idle_timeout{120'000};
  /// Longest time without a byte before a streamed answer's first event: the backend reads the
  /// whole prompt first, which for a long one on a slow GPU takes minutes (the coordinator
  /// decides sooner whether to wait, and cancels). Default: 600 s.
  std::chrono::milliseconds first_token_timeout{600'000};
  /// Largest response header block, bytes. Default: 64 KiB.
  std::size_t header_bytes_max = 64 * 1024;
  /// Largest response body to a completion, bytes (its whole SSE stream, or its error body).
  /// Default: 64 MiB.
  std::size_t response_bytes_max = 64 * 1024 * 1024;
  /// Largest body of a list or a model's details (/models, /props, /api/show ...), read whole and
  /// parsed at once. Default: 4 MiB.
  std::size_t list_bytes_max = 4 * 1024 * 1024;
  /// Largest single SSE event (all its `data:` lines together), bytes. Default: 1 MiB.
  std::size_t event_bytes_max = 1024 * 1024;
  /// Most models kept from a models list; the rest are dropped. Default: 1024.
  std::size_t models_max = 1024;
  /// Most idle keep-alive connections kept for reuse; 0 opens a connection per request.
  /// Default: 256.
  std::size_t idle_connections_max = 256;
};

/// One model the backend serves.
struct upstream_model {
  std::string id;
  /// Context window in tokens, from the backend's `context_length`, `max_model_len` (vLLM),
  /// `max_context_length` / `loaded_context_length` (LM Studio) or `meta.n_ctx_train`
  /// (llama.cpp server); 0 when the backend does not say (LM Studio's and Ollama's /v1/models
  /// do not: find_context_lengths asks their own APIs).
  std::uint32_t context_length_tokens = 0;
  /// The context came from `meta.n_ctx_train`: what the model was trained with, which a
  /// llama.cpp server serves only if started so (its /props says what it serves).
  bool context_is_trained = false;
};

/// Token counts as the backend reported them (often 0 or cumulative on some servers: callers
/// cross-check against their own count).
struct upstream_usage {
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
};

/// Why a request failed. A closed set; `message` says the details.
enum class upstream_error_kind {
  connect,      ///< could not resolve or connect (refused, unreachable, connect_timeout)
  timeout,      ///< no byte for idle_timeout
  http_status,  ///< the backend answered with a status other than 200 (see http_status)
  protocol,     ///< malformed HTTP, SSE or JSON, or a stream that ended without finishing
  too_large,    ///< header_bytes_max, response_bytes_max or event_bytes_max exceeded
  dropped,      ///< the connection closed or reset before the answer was complete
  backend,      ///< the backend reported an error inside a 200 stream (`data: {"error":…}`)
};

[[nodiscard]] std::string_view to_string(upstream_error_kind kind) noexcept;

struct upstream_error {
  upstream_error_kind kind = upstream_error_kind::protocol;
  /// What went wrong, for logs and for the user; for kind http_status and backend it carries the
  /// backend's own message (from its OpenAI error body, at most 500 bytes) when there is one.
  std::string message;
  /// The HTTP status when kind is http_status, otherwise 0.
  unsigned http_status = 0;
  /// False only when the backend rejected the request itself as invalid (HTTP 400, 413 or 422,
  /// at the start or as llama.cpp's mid-stream error code): then the request, not the provider,
  /// is at fault. True for everything else (401 and 403: a key the backend wants; 404: a model
  /// it no longer serves; a 400-422 whose error names the model, as LM Studio's "No models
  /// loaded"; 408, 429, 5xx, drops and timeouts).
  bool upstream_fault = true;
  /// kind connect: the backend's address refused the connection (nothing listens there: the
  /// backend is not running), rather than a timeout, an unreachable host or a local shortage.
  bool refused = false;
};

/// A URL as logs, messages and the provider's hello may show it: "user:password@" becomes "***@"
/// and a query or fragment "?***", either of which may carry a key.
[[nodiscard]] std::string redacted_url(std::string_view url);

/// The models of an OpenAI-style list ({"data":[{"id":…},…]}: /v1/models, or LM Studio's
/// /api/v0/models), at most `models_max`, in its order; entries without an id are skipped.
[[nodiscard]] expected<std::vector<upstream_model>, upstream_error> parse_models(std::string_view body,
                                                                               std::size_t models_max);

/// Callbacks of one streamed completion. Exactly one of on_done / on_error is called, once, and
/// none of them after cancel() has returned.
struct upstream_stream_handlers {
  /// A piece of the answer (choices[0].delta.content or choices[0].text), in order; empty pieces
  /// are not reported. The view is valid only during the call. A backend that answers whole (it
  /// ignored "stream": true) has its text handed over in one piece per token, as a stream's would
  /// be: as many pieces as its usage counts when that is plausible (at most one per two bytes),
  /// else its bytes / 4, each ending on a UTF-8 character's boundary.
  std::function<void(std::string_view text)> on_delta;
  /// The stream finished (`data: [DONE]`, or a clean end after a finish_reason): the last
  /// finish_reason seen ("stop", "length", …; empty if none) and the last usage the backend sent.
  std::function<void(std::string finish_reason, std::optional<upstream_usage> usage)> on_done;
  std::function<void(upstream_error error)> on_error;
  /// A piece of a reasoning model's thinking (choices[0].delta.reasoning_content, or .reasoning as
  /// Ollama names it; message.* in a whole answer), in order with on_delta's pieces; empty pieces
  /// are not reported. Unset: the thinking is dropped.
  std::function<void(std::string_view text)> on_reasoning{};
};

/// A completion in flight.
class upstream_request {
 public:
  /// Stops the request: no callback runs after this returns (a callback already running on
  /// another thread is waited for), and the socket is closed right away on the io_context so the
  /// backend sees the disconnect. Safe from any thread, from inside the request's own callbacks,
  /// and more than once. Do not call it while holding a lock that the callbacks take.
  void cancel();

  class impl;
  explicit upstream_request(std::shared_ptr<impl> state);

 private:
  std::shared_ptr<impl> impl_;
};

/// Parses a text/event-stream incrementally: bytes go in as they arrive (split anywhere), each
/// complete event's data comes out. Lines may end in "\n", "\r\n" or "\r"; comment lines (":")
/// and fields other than `data` are skipped; several `data:` lines of one event are joined with
/// "\n". Pure, no I/O; exposed for its unit test.
class upstream_sse_parser {
 public:
  explicit upstream_sse_parser(std::size_t event_bytes_max) : event_bytes_max_(event_bytes_max) {}

  /// Feeds bytes; calls on_event(data) for every event completed by them, in order. Fails (and
  /// stays failed) when one event's data exceeds event_bytes_max. on_event returns false to
  /// stop parsing at once (the rest of the bytes are ignored).
  [[nodiscard]] expected<void, std::string> feed(
      std::string_view bytes, const std::function<bool(std::string_view data)>& on_event);

  /// The body ended: a last line or event whose line break or blank line never came is complete
  /// with it (a server that ends its stream right after the last event's data), and goes to
  /// on_event. Call only at a proper end of the body, never after a broken connection (the
  /// event may be cut short). Nothing once the parser failed (feed() reported it); a pending line
  /// was already judged against event_bytes_max by feed().
  void finish(const std::function<bool(std::string_view data)>& on_event);

 private:
  // Handles one complete line; false when on_event asked to stop.
  bool take_line(std::string_view line, const std::function<bool(std::string_view)>& on_event);
  [[nodiscard]] bool within_limit(std::size_t pending_bytes);

  std::size_t event_bytes_max_;
  std::string line_;   // the start of a line whose end has not arrived yet
  std::string data_;   // the data of the event being read
  bool has_data_ = false;
  bool after_cr_ = false;  // the last byte was "\r": a "\n" right after it ends nothing
  bool failed_ = false;
};

/// A handle on one backend. Cheap to copy; copies share the connection pool.
class upstream_client {
 public:
  /// Checks the options (an http:// base_url with a host) without connecting.
  [[nodiscard]] static expected<upstream_client, std::string> create(boost::asio::io_context& io,
                                                                     upstream_options options);

  /// GET {base_url}/models and calls `done` once with the models in the backend's order, or an
  /// error.
  void list_models(std::function<void(expected<std::vector<upstream_model>, upstream_error>)> done);

  /// GET (no body) or POST (a JSON body) `path` under the base URL's root, its path without a
  /// last "/v1" (where LM Studio, Ollama and llama.cpp server answer their own APIs), and calls
  /// `done` once with the whole answer's body or an error (http_status for any status but 200).
  void fetch_from_root(std::string_view path, std::optional<std::string> body,
                       std::function<void(expected<std::string, upstream_error>)> done);

  /// POST {base_url}{path} with the JSON `body` as is (path "/chat/completions" or
  /// "/completions"; the body should ask for `"stream": true`) and streams the answer through
  /// `handlers`. A backend that answers with a plain JSON completion instead of a stream is
  /// accepted too: its whole text comes as one delta. Starts at once; callbacks come later, on
  /// the io_context, never inside this call.
  [[nodiscard]] std::shared_ptr<upstream_request> stream(std::string_view path, std::string body,
                                                         upstream_stream_handlers handlers);

  /// The options the client was created with.
  [[nodiscard]] const upstream_options& options() const noexcept;

  class impl;

 private:
  explicit upstream_client(std::shared_ptr<impl> state);
  std::shared_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
