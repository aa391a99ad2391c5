#pragma once
/// The shapes of the OpenAI-compatible API, as pure functions: parsing and validating request bodies,
/// estimating prompt size against a model's context length, building the body a provider sends to
/// its backend, and formatting responses, stream chunks, the models list and errors. No sockets, no
/// clock (times are passed in), no state. Boost.JSON stays in openai_api.cpp.

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/event.hpp"

namespace gpustream::gateway {

/// Bounds on what a request body may contain. Every field is checked by parse_chat_request /
/// parse_completion_request, and exceeding one is a 400 naming the parameter.
struct api_limits {
  /// Deepest nesting of arrays and objects in the JSON body. OpenAI's bodies need about 5 levels;
  /// the bound keeps a hostile body from costing stack or time. Default: 32.
  std::size_t json_depth_max = 32;
  /// Most entries in `messages`. Default: 1024.
  std::size_t messages_max = 1024;
  /// Largest content of one message (or of the prompt), bytes after flattening text parts.
  /// Default: 512 KiB.
  std::size_t message_bytes_max = 512 * 1024;
  /// Largest sum of all message contents (or the prompt), bytes. It keeps the body built by
  /// upstream_body, plus a continuation prefix, under the provider link's 1 MiB request_json
  /// bound. Default: 512 KiB.
  std::size_t prompt_bytes_max = 512 * 1024;
  /// Most text parts in one message's content array. Default: 256.
  std::size_t content_parts_max = 256;
  /// Most stop sequences (OpenAI's own bound). Default: 4.
  std::size_t stop_sequences_max = 4;
  /// Longest stop sequence, bytes. Default: 256.
  std::size_t stop_sequence_bytes_max = 256;
  /// Longest model name, bytes (the provider link's name bound). Default: 200.
  std::size_t model_name_bytes_max = 200;
  /// Longest `user`, bytes. Default: 256.
  std::size_t identifier_bytes_max = 256;
  /// Longest `x_gpustream.conversation_id`, bytes (the job's bound on ids,
  /// domain::job_options::id_length_max). Default: 128.
  std::size_t conversation_id_bytes_max = 128;
  /// Largest `x_gpustream.max_price_micros` (the job's bound, domain::job_options::
  /// max_price_micros_max); the least is 1 (leave it out for no cap). Default: 1,000 USD.
  std::int64_t max_price_micros_max = 1'000'000'000;
  /// Largest `max_tokens` / `max_completion_tokens`. Default: 131072.
  std::uint32_t max_tokens_max = 131072;
};

/// Which endpoint a request came through: /v1/chat/completions or /v1/completions.
enum class request_kind : std::uint8_t { chat, completion };

/// One chat message with its content flattened to text.
struct chat_message {
  std::string role;     ///< "system", "developer", "user" or "assistant"
  std::string content;  ///< text; an array of text parts is joined with "\n"
};

/// The request extension object `x_gpustream`.
struct request_extension {
  /// Lowest quality tier the client accepts; absent: the gateway's default.
  std::optional<events::quality_tier> quality;
  /// Highest price the client accepts, micro-USD per million tokens; absent: no cap.
  std::optional<std::int64_t> max_price_micros;
  /// Keeps a conversation on one provider while it is healthy; empty: none.
  std::string conversation_id;
};

/// A validated chat or completion request. Only fields the gateway honours are kept.
struct completion_request {
  request_kind kind = request_kind::chat;
  std::string model;
  std::vector<chat_message> messages;  ///< chat only
  std::string prompt;                  ///< completion only
  bool stream = false;
  /// `stream_options.include_usage`: the client asked for a separate usage chunk.
  bool include_usage = false;
  /// `max_tokens`, or `max_completion_tokens` (which wins when both are given).
  std::optional<std::uint32_t> max_tokens;
  std::optional<double> temperature;        ///< 0..2
  std::optional<double> top_p;              ///< 0..1
  std::optional<double> presence_penalty;   ///< -2..2
  std::optional<double> frequency_penalty;  ///< -2..2
  std::optional<std::int64_t> seed;
  std::vector<std::string> stop;  ///< at most api_limits::stop_sequences_max
  std::string user;               ///< the client's end-user id; never forwarded to providers
  request_extension extension;    ///< `x_gpustream`
};

/// An error as the API reports it; error_body() renders it. Empty `param` / `code` render as null.
struct api_error {
  unsigned status = 400;
  std::string type = "invalid_request_error";
  std::string message;
  std::string param;
  std::string code;
};

/// An api_error whose `type` follows from the HTTP status as OpenAI's API sets it: 429 "requests"
/// (a limit on requests) or, with code insufficient_quota, "insufficient_quota" (a used-up quota),
/// 5xx server_error, every other 4xx (a wrong key, an unknown model) invalid_request_error; `code`
/// tells them apart (invalid_api_key, model_not_found, …).
[[nodiscard]] api_error make_api_error(unsigned status, std::string message, std::string param = {},
                                       std::string code = {});

/// `{"error":{"message":…,"type":…,"param":…,"code":…}}`.
[[nodiscard]] std::string error_body(const api_error& error);

/// Parses a /v1/chat/completions body. Unknown top-level fields are ignored (SDKs send many);
/// fields the gateway cannot honour (tools, n > 1, logprobs, non-text content, response formats
/// other than text) are a 400 rather than silently dropped. An assistant message that ends with
/// an ad of this platform (ad_text(), as a client keeps a free-tier answer in its history) loses
/// it: the ad is not the model's words, and neither goes back to a model nor counts as prompt.
[[nodiscard]] expected<completion_request, api_error> parse_chat_request(std::string_view body,
                                                                         const api_limits& limits);

/// Parses a /v1/completions body: `prompt` is a string or an array of exactly one string.
[[nodiscard]] expected<completion_request, api_error> parse_completion_request(std::string_view body,
                                                                               const api_limits& limits);

/// A conservative estimate of the prompt's size in tokens, for checking it against a model's
/// context length without that model's tokenizer:
///   chat: sum over messages of (ceil(content bytes / 3) + 6) + 3;  completion: ceil(bytes / 3) + 3.
/// Byte-pair tokenizers average about 4 bytes of English (3.5 of code) per token, so bytes / 3
/// over-estimates ordinary text; 6 per message covers the chat template's tokens (ChatML and
/// Llama 3 use 5: start, role, separator, end, newline) and 3 covers BOS and reply priming.
/// It errs high on purpose: a prompt wrongly refused gets a clear 400 the client can act on,
/// while one wrongly accepted overflows on the backend, which truncates silently or fails after
/// the job was queued. Text a tokenizer splits into single bytes (rare scripts on small
/// vocabularies) can still exceed the estimate; the backend's own error covers that case.
/// Saturates at UINT32_MAX.
[[nodiscard]] std::uint32_t estimate_prompt_tokens(const completion_request& request);

/// The context window a request needs, from its estimated prompt: with max_tokens, prompt +
/// max_tokens; without it, the completion gets what remains, so prompt + 1. Saturates at
/// UINT32_MAX.
[[nodiscard]] std::uint32_t context_tokens_needed(std::uint32_t prompt_tokens, std::optional<std::uint32_t> max_tokens);

/// Checks that the estimated prompt plus the completion budget fits the context length: with
/// max_tokens, prompt + max_tokens; without it, the completion gets what remains, so at least one
/// token must remain. A 400 with code "context_length_exceeded" and both numbers in the message.
/// A context length of 0 means unknown and always passes.
[[nodiscard]] expected<void, api_error> check_context(const completion_request& request,
                                                      std::uint32_t context_length_tokens);

/// The body a provider agent sends to its backend: model, messages or prompt, the sampling
/// parameters given, max_tokens, "stream": true and "stream_options": {"include_usage": true}.
/// Never carries `user` or `x_gpustream`. A "developer" message goes as "system", which every
/// OpenAI-compatible server understands.
/// Continuing after a failover: a non-empty `continuation_prefix` (the answer so far) is appended
/// as a trailing assistant message (chat, with vLLM's "continue_final_message": true and
/// "add_generation_prompt": false, without which vLLM starts a new turn) or to the prompt
/// (completion), so the new provider carries on from it, and max_tokens shrinks by
/// `continuation_tokens` (at least 1 remains).
[[nodiscard]] std::string upstream_body(const completion_request& request, std::string_view continuation_prefix = {},
                                        std::uint32_t continuation_tokens = 0);

/// Who answers one request: fixed for all chunks of one response.
struct response_meta {
  request_kind kind = request_kind::chat;
  std::string job_id;  ///< ids are "chatcmpl-<job_id>" (chat) or "cmpl-<job_id>"
  std::string model;
  std::int64_t created_s = 0;  ///< Unix time, seconds
};

struct token_usage {
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;
};

/// The ad appended to a free-tier answer.
struct ad_info {
  std::string impression_id;
  std::string campaign_id;
  std::string title;
  std::string text;
  std::string click_url;  ///< the click-tracking URL (/a/c/<impression>), not the advertiser's
};

/// The response extension object `x_gpustream`.
struct response_extension {
  std::string provider_id;  ///< the provider that produced the answer (the last one after a failover)
  events::quality_tier quality = events::quality_tier::standard;  ///< the tier the job ran at
  std::uint32_t failover = 0;  ///< how many times the job moved to another provider mid-answer
  std::optional<ad_info> ad;
};

/// "low", "standard", "high" or "ultra".
[[nodiscard]] std::string_view quality_name(events::quality_tier tier) noexcept;

/// The path under which an ad's click URL names its impression: "<base>/a/c/<impression id>".
inline constexpr std::string_view click_path = "/a/c/";

/// The ad's content text: "\n\nSponsored: <title> — <text>  <click url>".
[[nodiscard]] std::string ad_text(const ad_info& ad);

/// A streamed piece of the answer: chat "chat.completion.chunk" with choices[0].delta
/// (role "assistant" too when `first`), completion "text_completion" with choices[0].text.
[[nodiscard]] std::string chunk_json(const response_meta& meta, std::string_view text, bool first);

/// A streamed piece of a reasoning model's thinking (chat only): choices[0].delta.reasoning_content,
/// as llama.cpp server, vLLM and DeepSeek stream it (role "assistant" too when `first`).
[[nodiscard]] std::string reasoning_chunk_json(const response_meta& meta, std::string_view text, bool first);

/// The ad as its own content chunk (text from ad_text()).
[[nodiscard]] std::string ad_chunk_json(const response_meta& meta, const ad_info& ad, bool first);

/// The finish_reason a client gets for a backend's. OpenAI's own values pass ("stop", "length",
/// "tool_calls", "content_filter", "function_call"); other servers' words for them are mapped
/// ("eos", "eos_token", "stop_sequence", "end_turn" to "stop"; "max_tokens", "model_length" to
/// "length"); anything else, or none, is "stop": SDKs with strict types (an enum of OpenAI's
/// values) refuse a chunk with any other value, and "error" is the platform's own in-band error.
[[nodiscard]] std::string_view client_finish_reason(std::string_view backend) noexcept;

/// The chunk that ends the choice: an empty delta (or text) and `finish_reason`. `usage` and
/// `extension` are added when given. Pass them here when the client did not ask for a usage
/// chunk: usage then still arrives in the last chunk, without a chunk whose `choices` is empty,
/// which clients that index choices[0] do not expect.
[[nodiscard]] std::string final_chunk_json(const response_meta& meta, std::string_view finish_reason,
                                           const std::optional<token_usage>& usage = std::nullopt,
                                           const std::optional<response_extension>& extension = std::nullopt);

/// The usage chunk sent last when stream_options.include_usage is set: `choices: []`, `usage`
/// and, when given, `x_gpustream`.
[[nodiscard]] std::string usage_chunk_json(const response_meta& meta, const token_usage& usage,
                                           const std::optional<response_extension>& extension = std::nullopt);

/// The in-band error that ends a stream whose headers went out already: choices[0] with
/// finish_reason "error", an "error" object shaped like error_body()'s, and `usage` when given
/// (the last chunk of a stream carries it: what is billed, nothing for a failed job).
[[nodiscard]] std::string error_chunk_json(const response_meta& meta, const api_error& error,
                                           const std::optional<token_usage>& usage = std::nullopt);

/// A whole (non-streamed) answer: "chat.completion" with choices[0].message, or
/// "text_completion" with choices[0].text; `usage` and `x_gpustream`. When extension.ad is set,
/// ad_text() follows `text` in the content, as the stream's ad chunk does. A chat answer's
/// thinking, when there was any, is message.reasoning_content.
[[nodiscard]] std::string response_json(const response_meta& meta, std::string_view text,
                                        std::string_view finish_reason, const token_usage& usage,
                                        const response_extension& extension, std::string_view reasoning = {});

/// One model served by online providers, for GET /v1/models.
struct model_listing {
  std::string id;
  std::int64_t created_s = 0;        ///< Unix time, seconds
  std::uint32_t context_length = 0;  ///< tokens; 0: unknown (rendered as null)
  std::uint32_t providers_online = 0;
  std::int64_t price_per_mtok_min_micros = 0;
  std::int64_t price_per_mtok_max_micros = 0;
};

/// `{"object":"list","data":[model_json(…)…]}`.
[[nodiscard]] std::string models_json(std::span<const model_listing> models);

/// One model: `{"id","object":"model","created","owned_by":"gpustream","x_gpustream":{"context_length",
/// "providers_online","price_per_mtok_min_micros","price_per_mtok_max_micros"}}`
/// (also the body of GET /v1/models/{id}).
[[nodiscard]] std::string model_json(const model_listing& model);

/// `data: <json>\n\n`. `json` must be one line (all *_json() results are).
[[nodiscard]] std::string sse_event(std::string_view json);

/// The stream terminator.
inline constexpr std::string_view sse_done = "data: [DONE]\n\n";

}  // namespace gpustream::gateway
