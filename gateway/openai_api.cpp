#include "gateway/openai_api.hpp"

#include <algorithm>
#include <array>
#include <boost/json.hpp>
#include <charconv>
#include <cstring>
#include <limits>

#include "base/text.hpp"

namespace gpustream::gateway {
namespace json = boost::json;

namespace {

/// Longest `role`, content part `type` and `x_gpustream.quality` read before they are compared
/// with the known values, so an error message never echoes a huge string.
constexpr std::size_t role_bytes_max = 32;
constexpr std::size_t part_type_bytes_max = 32;
constexpr std::size_t quality_bytes_max = 32;

// ---------------------------------------------------------------------------------------------
// Errors

api_error invalid(std::string message, std::string param, std::string code) {
  return make_api_error(400, std::move(message), std::move(param), std::move(code));
}

std::string_view kind_name(const json::value& value) {
  switch (value.kind()) {
    case json::kind::null:
      return "null";
    case json::kind::bool_:
      return "a boolean";
    case json::kind::int64:
    case json::kind::uint64:
      return "an integer";
    case json::kind::double_:
      return "a decimal";
    case json::kind::string:
      return "a string";
    case json::kind::array:
      return "an array";
    case json::kind::object:
      return "an object";
  }
  return "an unknown type";
}

api_error invalid_type(std::string_view param, std::string_view wanted, const json::value& got) {
  return invalid("Invalid type for '" + std::string(param) + "': expected " + std::string(wanted) + ", but got " +
                     std::string(kind_name(got)) + " instead.",
                 std::string(param), "invalid_type");
}

api_error unsupported(std::string_view param, std::string_view reason) {
  return invalid("Unsupported parameter: '" + std::string(param) + "': " + std::string(reason), std::string(param),
                 "unsupported_parameter");
}

api_error too_long(std::string_view param, std::size_t bytes_max) {
  return invalid("Invalid '" + std::string(param) + "': string too long. Expected at most " +
                     std::to_string(bytes_max) + " bytes.",
                 std::string(param), "string_above_max_length");
}

std::string element(std::string_view param, std::size_t index) {
  return std::string(param) + "[" + std::to_string(index) + "]";
}

/// Absent and null both mean "not given", as in OpenAI's API.
const json::value* field(const json::object& object, std::string_view name) {
  const json::value* value = object.if_contains(name);
  return value == nullptr || value->is_null() ? nullptr : value;
}

// ---------------------------------------------------------------------------------------------
// Typed readers: each returns nullopt for a field not given, or an api_error naming the param.

template <class T>
using field_result = expected<std::optional<T>, api_error>;

field_result<bool> read_bool(const json::object& object, std::string_view name, std::string_view param) {
  const json::value* value = field(object, name);
  if (value == nullptr) return std::optional<bool>{};
  if (!value->is_bool()) return unexpected{invalid_type(param, "a boolean", *value)};
  return std::optional<bool>{value->get_bool()};
}

field_result<std::string> read_string(const json::object& object, std::string_view name, std::string_view param,
                                      std::size_t bytes_max) {
  const json::value* value = field(object, name);
  if (value == nullptr) return std::optional<std::string>{};
  if (!value->is_string()) return unexpected{invalid_type(param, "a string", *value)};
  const json::string& text = value->get_string();
  if (text.size() > bytes_max) return unexpected{too_long(param, bytes_max)};
  return std::optional<std::string>{std::string(text.data(), text.size())};
}

/// An integer in [minimum, maximum]; decimals such as 10.0 are refused as OpenAI does.
field_result<std::int64_t> read_integer(const json::object& object, std::string_view name, std::string_view param,
                                        std::int64_t minimum, std::int64_t maximum) {
  const json::value* value = field(object, name);
  if (value == nullptr) return std::optional<std::int64_t>{};
  const std::string p(param);
  if (value->is_uint64()) {  // only values above INT64_MAX are stored as uint64
    return unexpected{invalid(
        "Invalid '" + p + "': integer above maximum value. Expected a value <= " + std::to_string(maximum) + ".", p,
        "integer_above_max_value")};
  }
  if (!value->is_int64()) return unexpected{invalid_type(param, "an integer", *value)};
  const std::int64_t number = value->get_int64();
  if (number < minimum) {
    return unexpected{invalid("Invalid '" + p + "': integer below minimum value. Expected a value >= " +
                                  std::to_string(minimum) + ", but got " + std::to_string(number) + " instead.",
                              p, "integer_below_min_value")};
  }
  if (number > maximum) {
    return unexpected{invalid("Invalid '" + p + "': integer above maximum value. Expected a value <= " +
                                  std::to_string(maximum) + ", but got " + std::to_string(number) + " instead.",
                              p, "integer_above_max_value")};
  }
  return std::optional<std::int64_t>{number};
}

std::string format_bound(double bound) {
  std::array<char, 32> text{};
  const auto written = std::to_chars(text.data(), text.data() + text.size(), bound);
  return std::string(text.data(), written.ptr);
}

/// A number (integer or decimal) in [minimum, maximum].
field_result<double> read_number(const json::object& object, std::string_view name, std::string_view param,
                                 double minimum, double maximum) {
  const json::value* value = field(object, name);
  if (value == nullptr) return std::optional<double>{};
  if (!value->is_number()) return unexpected{invalid_type(param, "a number", *value)};
  json::error_code ec;
  const double number = value->to_number<double>(ec);
  // In OpenAI's words and codes. Written so that NaN fails too (the parser never produces one,
  // but the check stays honest).
  const std::string p(param);
  if (ec || !(number >= minimum)) {
    return unexpected{invalid("Invalid '" + p + "': decimal below minimum value. Expected a value >= " +
                                  format_bound(minimum) + ", but got " + format_bound(number) + " instead.",
                              p, "decimal_below_min_value")};
  }
  if (!(number <= maximum)) {
    return unexpected{invalid("Invalid '" + p + "': decimal above maximum value. Expected a value <= " +
                                  format_bound(maximum) + ", but got " + format_bound(number) + " instead.",
                              p, "decimal_above_max_value")};
  }
  return std::optional<double>{number};
}

// ---------------------------------------------------------------------------------------------
// Parsing

expected<json::object, api_error> parse_body(std::string_view body, const api_limits& limits) {
  json::parse_options options;
  options.max_depth = limits.json_depth_max;
  json::error_code ec;
  json::value root = json::parse(json::string_view(body.data(), body.size()), ec, {}, options);
  if (ec == json::error::too_deep) {
    return unexpected{invalid(
        "The JSON body nests deeper than " + std::to_string(limits.json_depth_max) + " levels (json_depth_max).", "",
        "json_too_deep")};
  }
  if (ec) {
    return unexpected{
        invalid("We could not parse the JSON body of your request (" + ec.message() + ").", "", "invalid_json")};
  }
  if (!root.is_object()) {
    return unexpected{invalid("The request body must be a JSON object, but got " + std::string(kind_name(root)) + ".",
                              "", "invalid_json")};
  }
  return std::move(root.get_object());
}

expected<std::string, api_error> parse_model(const json::object& body, const api_limits& limits) {
  auto model = read_string(body, "model", "model", limits.model_name_bytes_max);
  if (!model) return unexpected{model.error()};
  if (!model->has_value() || (*model)->empty()) {
    return unexpected{invalid("You must provide a model parameter.", "model", "missing_required_parameter")};
  }
  return std::move(**model);
}

/// One text part of a content array; other part types are refused with a reason.
expected<std::string, api_error> parse_content_part(const json::value& part, const std::string& param) {
  if (!part.is_object()) return unexpected{invalid_type(param, "an object", part)};
  const json::object& object = part.get_object();
  auto type = read_string(object, "type", param + ".type", part_type_bytes_max);
  if (!type) return unexpected{type.error()};
  if (!type->has_value()) {
    return unexpected{
        invalid("Missing required parameter: '" + param + ".type'.", param + ".type", "missing_required_parameter")};
  }
  const std::string& name = **type;
  if (name == "image_url" || name == "input_image") {
    return unexpected{
        invalid("Image inputs are not supported: models on gpustream take text only. Send "
                "content as a string or as parts of type 'text'.",
                param + ".type", "unsupported_value")};
  }
  if (name != "text") {
    return unexpected{invalid("Invalid value for '" + param + ".type': '" + std::string(name) +
                                  "'. Supported content part types are: 'text'.",
                              param + ".type", "unsupported_value")};
  }
  const json::value* text = field(object, "text");
  if (text == nullptr || !text->is_string()) {
    return unexpected{
        invalid("Missing or invalid '" + param + ".text': expected a string.", param + ".text", "invalid_type")};
  }
  return std::string(text->get_string());
}

/// A message's content: a string, or an array of text parts joined with "\n" (as vLLM does).
expected<std::string, api_error> parse_content(const json::value* content, const std::string& param,
                                               const api_limits& limits) {
  if (content == nullptr) {
    return unexpected{invalid("Missing required parameter: '" + param + "'.", param, "missing_required_parameter")};
  }
  if (content->is_string()) return std::string(content->get_string());
  if (!content->is_array()) return unexpected{invalid_type(param, "a string or an array", *content)};
  const json::array& parts = content->get_array();
  if (parts.size() > limits.content_parts_max) {
    return unexpected{invalid("Invalid '" + param + "': array too long. Expected at most " +
                                  std::to_string(limits.content_parts_max) + " parts.",
                              param, "array_above_max_length")};
  }
  std::string text;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    auto part = parse_content_part(parts[i], element(param, i));
    if (!part) return unexpected{part.error()};
    if (i > 0) text += '\n';
    text += *part;
    if (text.size() > limits.message_bytes_max) return unexpected{too_long(param, limits.message_bytes_max)};
  }
  return text;
}

/// Whether an optional parameter's value asks for nothing: null, false, 0, {} or [].
bool asks_for_nothing(const json::value& v) {
  return v.is_null() || (v.is_bool() && !v.get_bool()) || (v.is_int64() && v.get_int64() == 0) ||
         (v.is_uint64() && v.get_uint64() == 0) || (v.is_object() && v.get_object().empty()) ||
         (v.is_array() && v.get_array().empty());
}

// ad_text()'s parts: "<head><title><dash><text><gap><click URL>". The dash is U+2014 EM DASH,
// spelled as UTF-8 bytes so the source's encoding cannot change it.
constexpr std::string_view ad_head = "\n\nSponsored: ";
constexpr std::string_view ad_dash = " \xE2\x80\x94 ";
constexpr std::string_view ad_gap = "  ";

/// `content` without the ad that ends it, when it ends with one in ad_text()'s shape: one line
/// (an ad holds no line break) "Sponsored: <title> — <text>  <click URL>", the URL one of ours.
void drop_ad(std::string& content) {
  const auto at = content.rfind(ad_head);
  if (at == std::string::npos) return;
  const std::string_view tail = std::string_view(content).substr(at + ad_head.size());
  const auto dash = tail.find(ad_dash);
  const auto gap = tail.rfind(ad_gap);
  if (tail.find('\n') != std::string_view::npos || dash == std::string_view::npos || gap == std::string_view::npos ||
      gap < dash) {
    return;
  }
  const std::string_view url = tail.substr(gap + ad_gap.size());
  const auto click = url.find(click_path);
  if (click == std::string_view::npos || click + click_path.size() == url.size() ||
      url.find(' ') != std::string_view::npos) {
    return;
  }
  content.erase(at);
}

expected<chat_message, api_error> parse_message(const json::value& value, const std::string& param,
                                                const api_limits& limits) {
  if (!value.is_object()) return unexpected{invalid_type(param, "an object", value)};
  const json::object& object = value.get_object();
  auto role = read_string(object, "role", param + ".role", role_bytes_max);
  if (!role) return unexpected{role.error()};
  if (!role->has_value()) {
    return unexpected{
        invalid("Missing required parameter: '" + param + ".role'.", param + ".role", "missing_required_parameter")};
  }
  const std::string& name = **role;
  if (name != "system" && name != "developer" && name != "user" && name != "assistant") {
    return unexpected{invalid("Invalid value for '" + param + ".role': '" + name +
                                  "'. Supported roles are: 'system', 'developer', 'user' and 'assistant' "
                                  "(tools are not supported).",
                              param + ".role", "unsupported_value")};
  }
  // An assistant message replayed from history by some frameworks carries "tool_calls": [] (or
  // null): that asks for nothing.
  if (const json::value* calls = field(object, "tool_calls"); calls != nullptr && !asks_for_nothing(*calls)) {
    return unexpected{unsupported(param + ".tool_calls", "tool calls are not supported.")};
  }
  if (const json::value* call = field(object, "function_call"); call != nullptr && !asks_for_nothing(*call)) {
    return unexpected{unsupported(param + ".function_call", "function calls are not supported.")};
  }
  // OpenAI's own answers replayed as history: an assistant message that refused has null content
  // and its words in "refusal"; OpenAI takes null content from an assistant.
  const json::value* content_field = field(object, "content");
  if (content_field == nullptr && name == "assistant") {
    const json::value* refusal = field(object, "refusal");
    if (refusal != nullptr && !refusal->is_string()) return unexpected{invalid_type(param + ".refusal", "a string", *refusal)};
    static const json::value no_words = json::string();
    content_field = refusal != nullptr ? refusal : &no_words;
  }
  auto content = parse_content(content_field, param + ".content", limits);
  if (!content) return unexpected{content.error()};
  if (content->size() > limits.message_bytes_max) {
    return unexpected{too_long(param + ".content", limits.message_bytes_max)};
  }
  if (name == "assistant") drop_ad(*content);
  return chat_message{std::move(**role), std::move(*content)};
}

expected<std::vector<chat_message>, api_error> parse_messages(const json::object& body, const api_limits& limits) {
  const json::value* value = field(body, "messages");
  if (value == nullptr) {
    return unexpected{invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")};
  }
  if (!value->is_array()) return unexpected{invalid_type("messages", "an array", *value)};
  const json::array& array = value->get_array();
  if (array.empty()) {
    return unexpected{invalid("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages",
                              "empty_array")};
  }
  if (array.size() > limits.messages_max) {
    return unexpected{invalid("Invalid 'messages': array too long. Expected an array with maximum length " +
                                  std::to_string(limits.messages_max) + ", but got " + std::to_string(array.size()) +
                                  " instead.",
                              "messages", "array_above_max_length")};
  }
  std::vector<chat_message> messages;
  messages.reserve(array.size());
  std::size_t total_bytes = 0;
  for (std::size_t i = 0; i < array.size(); ++i) {
    auto message = parse_message(array[i], element("messages", i), limits);
    if (!message) return unexpected{message.error()};
    total_bytes += message->content.size();
    if (total_bytes > limits.prompt_bytes_max) {
      return unexpected{invalid(
          "The messages are too long: together they exceed " + std::to_string(limits.prompt_bytes_max) + " bytes.",
          "messages", "string_above_max_length")};
    }
    messages.push_back(std::move(*message));
  }
  return messages;
}

expected<std::string, api_error> parse_prompt(const json::object& body, const api_limits& limits) {
  const std::size_t bytes_max = std::min(limits.message_bytes_max, limits.prompt_bytes_max);
  const json::value* value = field(body, "prompt");
  if (value == nullptr) {
    return unexpected{invalid("Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")};
  }
  const json::value* text = value;
  if (value->is_array()) {
    const json::array& array = value->get_array();
    if (!array.empty() && (array[0].is_number() || array[0].is_array())) {
      return unexpected{
          invalid("Invalid 'prompt': token-id prompts are not supported; send text.", "prompt", "unsupported_value")};
    }
    if (array.size() != 1) {
      return unexpected{invalid("Invalid 'prompt': exactly one prompt per request is supported, but got " +
                                    std::to_string(array.size()) + ".",
                                "prompt", "unsupported_value")};
    }
    text = &array[0];
  }
  if (!text->is_string()) {
    if (text != value) return unexpected{invalid_type("prompt[0]", "a string", *text)};
    return unexpected{invalid_type("prompt", "a string or an array of one string", *value)};
  }
  if (text->get_string().size() > bytes_max) return unexpected{too_long("prompt", bytes_max)};
  return std::string(text->get_string());
}

expected<std::vector<std::string>, api_error> parse_stop(const json::object& body, const api_limits& limits) {
  const json::value* value = field(body, "stop");
  std::vector<std::string> stop;
  if (value == nullptr) return stop;
  auto add = [&](const json::value& item, const std::string& param) -> expected<void, api_error> {
    if (!item.is_string()) return unexpected{invalid_type(param, "a string", item)};
    const json::string& text = item.get_string();
    if (text.size() > limits.stop_sequence_bytes_max) {
      return unexpected{too_long(param, limits.stop_sequence_bytes_max)};
    }
    // An empty stop sequence would end every answer at once on some backends; it means nothing.
    if (!text.empty()) stop.emplace_back(text.data(), text.size());
    return {};
  };
  if (value->is_string()) {
    auto added = add(*value, "stop");
    if (!added) return unexpected{added.error()};
    return stop;
  }
  if (!value->is_array()) return unexpected{invalid_type("stop", "a string or an array of strings", *value)};
  const json::array& array = value->get_array();
  if (array.size() > limits.stop_sequences_max) {
    return unexpected{invalid("Invalid 'stop': array too long. Expected an array with maximum length " +
                                  std::to_string(limits.stop_sequences_max) + ", but got " +
                                  std::to_string(array.size()) + " instead.",
                              "stop", "array_above_max_length")};
  }
  for (std::size_t i = 0; i < array.size(); ++i) {
    auto added = add(array[i], element("stop", i));
    if (!added) return unexpected{added.error()};
  }
  return stop;
}

expected<request_extension, api_error> parse_extension(const json::object& body, const api_limits& limits) {
  request_extension extension;
  const json::value* value = field(body, "x_gpustream");
  if (value == nullptr) return extension;
  if (!value->is_object()) return unexpected{invalid_type("x_gpustream", "an object", *value)};
  const json::object& object = value->get_object();
  auto quality = read_string(object, "quality", "x_gpustream.quality", quality_bytes_max);
  if (!quality) return unexpected{quality.error()};
  if (quality->has_value()) {
    static constexpr std::array tiers{events::quality_tier::low, events::quality_tier::standard,
                                      events::quality_tier::high, events::quality_tier::ultra};
    for (const auto tier : tiers) {
      if (**quality == quality_name(tier)) extension.quality = tier;
    }
    if (!extension.quality) {
      return unexpected{invalid("Invalid value for 'x_gpustream.quality': '" + **quality +
                                    "'. Supported values are: 'low', 'standard', 'high' and 'ultra'.",
                                "x_gpustream.quality", "invalid_value")};
    }
  }
  // 0 is no price a job can be capped at (a job without a cap records 0): leave it out instead.
  auto price = read_integer(object, "max_price_micros", "x_gpustream.max_price_micros", 1, limits.max_price_micros_max);
  if (!price) return unexpected{price.error()};
  extension.max_price_micros = *price;
  auto conversation =
      read_string(object, "conversation_id", "x_gpustream.conversation_id", limits.conversation_id_bytes_max);
  if (!conversation) return unexpected{conversation.error()};
  if (conversation->has_value()) extension.conversation_id = std::move(**conversation);
  return extension;
}

/// Parameters the gateway cannot honour are refused instead of silently dropped, so a client never
/// believes it got (say) tool calls or three choices when it did not.
expected<void, api_error> refuse_unsupported(const json::object& body, request_kind kind) {
  auto n = read_integer(body, "n", "n", 1, std::numeric_limits<std::int64_t>::max());
  if (!n) return unexpected{n.error()};
  if (n->value_or(1) != 1) return unexpected{unsupported("n", "only n = 1 is supported.")};
  if (const json::value* tools = field(body, "tools");
      tools != nullptr && !(tools->is_array() && tools->get_array().empty())) {
    return unexpected{unsupported("tools", "tools are not supported.")};
  }
  // A tool call asked for, by name or by "required", cannot be honoured without tools.
  if (const json::value* choice = field(body, "tool_choice");
      choice != nullptr && !choice->is_null() && !(choice->is_string() && (choice->get_string() == "none" ||
                                                                           choice->get_string() == "auto"))) {
    return unexpected{unsupported("tool_choice", "tools are not supported, so only \"none\" or \"auto\" is.")};
  }
  if (const json::value* functions = field(body, "functions");
      functions != nullptr && !(functions->is_array() && functions->get_array().empty())) {
    return unexpected{unsupported("functions", "functions are not supported.")};
  }
  if (const json::value* logprobs = field(body, "logprobs");
      logprobs != nullptr && !(logprobs->is_bool() && !logprobs->get_bool())) {
    return unexpected{unsupported("logprobs", "log probabilities are not supported.")};
  }
  // Whatever changes the answer and that the gateway does not pass on: refused unless it asks for
  // nothing (null, false, 0, {} or []).
  for (const auto& [name, reason] : {std::pair{"logit_bias", "token biases are not supported."},
                                     std::pair{"top_logprobs", "log probabilities are not supported."},
                                     std::pair{"reasoning_effort", "reasoning effort is not supported."},
                                     std::pair{"audio", "audio output is not supported."},
                                     std::pair{"prediction", "predicted outputs are not supported."},
                                     std::pair{"web_search_options", "web search is not supported."}}) {
    if (const json::value* asked = field(body, name); asked != nullptr && !asks_for_nothing(*asked)) {
      return unexpected{unsupported(name, reason)};
    }
  }
  if (const json::value* modalities = field(body, "modalities");
      modalities != nullptr && !asks_for_nothing(*modalities) &&
      *modalities != json::value(json::array{"text"})) {
    return unexpected{unsupported("modalities", "only the text modality is supported.")};
  }
  if (const json::value* format = field(body, "response_format"); format != nullptr) {
    const json::value* type = format->is_object() ? field(format->get_object(), "type") : nullptr;
    if (type == nullptr || !type->is_string() || type->get_string() != "text") {
      return unexpected{invalid("Invalid value for 'response_format': only the type 'text' is supported.",
                                "response_format", "unsupported_value")};
    }
  }
  if (kind == request_kind::completion) {
    if (const json::value* echo = field(body, "echo"); echo != nullptr && !(echo->is_bool() && !echo->get_bool())) {
      return unexpected{unsupported("echo", "echoing the prompt is not supported.")};
    }
    if (const json::value* suffix = field(body, "suffix");
        suffix != nullptr && !(suffix->is_string() && suffix->get_string().empty())) {
      return unexpected{unsupported("suffix", "a suffix is not supported.")};
    }
    auto best_of = read_integer(body, "best_of", "best_of", 1, std::numeric_limits<std::int64_t>::max());
    if (!best_of) return unexpected{best_of.error()};
    if (best_of->value_or(1) != 1) return unexpected{unsupported("best_of", "only best_of = 1 is supported.")};
  }
  return {};
}

/// `stream` and `stream_options`, added to `request`.
expected<completion_request, api_error> parse_stream(const json::object& body, completion_request request) {
  auto stream = read_bool(body, "stream", "stream");
  if (!stream) return unexpected{stream.error()};
  request.stream = stream->value_or(false);
  const json::value* options = field(body, "stream_options");
  if (options == nullptr) return request;
  if (!options->is_object()) return unexpected{invalid_type("stream_options", "an object", *options)};
  auto include_usage = read_bool(options->get_object(), "include_usage", "stream_options.include_usage");
  if (!include_usage) return unexpected{include_usage.error()};
  // Only meaningful with stream: true; OpenAI refuses it otherwise, we simply ignore it.
  request.include_usage = request.stream && include_usage->value_or(false);
  return request;
}

/// max_tokens, the sampling parameters and stop, added to `request`.
expected<completion_request, api_error> parse_sampling(const json::object& body, const api_limits& limits,
                                                       completion_request request) {
  const std::int64_t tokens_max = limits.max_tokens_max;
  auto max_tokens = read_integer(body, "max_tokens", "max_tokens", 1, tokens_max);
  if (!max_tokens) return unexpected{max_tokens.error()};
  auto max_completion_tokens = read_integer(body, "max_completion_tokens", "max_completion_tokens", 1, tokens_max);
  if (!max_completion_tokens) return unexpected{max_completion_tokens.error()};
  if (auto chosen = max_completion_tokens->has_value() ? *max_completion_tokens : *max_tokens) {
    request.max_tokens = static_cast<std::uint32_t>(*chosen);
  }
  struct number_field {
    std::string_view name;
    double minimum;
    double maximum;
    std::optional<double>& target;
  };
  const std::array numbers{number_field{"temperature", 0, 2, request.temperature},
                           number_field{"top_p", 0, 1, request.top_p},
                           number_field{"presence_penalty", -2, 2, request.presence_penalty},
                           number_field{"frequency_penalty", -2, 2, request.frequency_penalty}};
  for (const auto& number : numbers) {
    auto value = read_number(body, number.name, number.name, number.minimum, number.maximum);
    if (!value) return unexpected{value.error()};
    number.target = *value;
  }
  auto seed = read_integer(body, "seed", "seed", std::numeric_limits<std::int64_t>::min(),
                           std::numeric_limits<std::int64_t>::max());
  if (!seed) return unexpected{seed.error()};
  request.seed = *seed;
  auto stop = parse_stop(body, limits);
  if (!stop) return unexpected{stop.error()};
  request.stop = std::move(*stop);
  return request;
}

/// Everything but model and messages / prompt.
expected<completion_request, api_error> parse_common(const json::object& body, const api_limits& limits,
                                                     request_kind kind) {
  auto refused = refuse_unsupported(body, kind);
  if (!refused) return unexpected{refused.error()};
  completion_request fresh;
  fresh.kind = kind;
  auto streamed = parse_stream(body, std::move(fresh));
  if (!streamed) return unexpected{streamed.error()};
  auto request = parse_sampling(body, limits, std::move(*streamed));
  if (!request) return unexpected{request.error()};
  auto user = read_string(body, "user", "user", limits.identifier_bytes_max);
  if (!user) return unexpected{user.error()};
  if (user->has_value()) request->user = std::move(**user);
  auto extension = parse_extension(body, limits);
  if (!extension) return unexpected{extension.error()};
  request->extension = std::move(*extension);
  return request;
}

// ---------------------------------------------------------------------------------------------
// Formatting

std::string response_id(const response_meta& meta) {
  return (meta.kind == request_kind::chat ? "chatcmpl-" : "cmpl-") + meta.job_id;
}

json::object usage_object(const token_usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", std::uint64_t{usage.prompt_tokens} + usage.completion_tokens}};
}

json::object extension_object(const response_extension& extension) {
  json::object object;
  object["provider_id"] = extension.provider_id;
  object["quality"] = quality_name(extension.quality);
  object["failover"] = extension.failover;
  if (extension.ad) {
    const ad_info& ad = *extension.ad;
    object["ad"] = {{"impression_id", ad.impression_id},
                    {"campaign_id", ad.campaign_id},
                    {"title", ad.title},
                    {"text", ad.text},
                    {"url", ad.click_url}};
  }
  return object;
}

json::object error_object(const api_error& error) {
  auto or_null = [](const std::string& text) { return text.empty() ? json::value(nullptr) : json::value(text); };
  return {
      {"message", error.message}, {"type", error.type}, {"param", or_null(error.param)}, {"code", or_null(error.code)}};
}

/// The fields every chunk starts with, in OpenAI's order.
json::object chunk_head(const response_meta& meta) {
  const bool chat = meta.kind == request_kind::chat;
  return {{"id", response_id(meta)},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", meta.created_s},
          {"model", meta.model}};
}

/// choices[0] of a chunk: a delta (chat) or text (completion) and a finish reason or null.
json::object chunk_choice(const response_meta& meta, std::string_view text, bool first,
                          const json::value& finish_reason) {
  json::object choice{{"index", 0}};
  if (meta.kind == request_kind::chat) {
    json::object delta;
    if (first) delta["role"] = "assistant";
    if (!text.empty() || first) delta["content"] = text;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = text;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  return choice;
}

}  // namespace

api_error make_api_error(unsigned status, std::string message, std::string param, std::string code) {
  // OpenAI's own types: a wrong key (401) and an unknown model (404) are invalid requests, told
  // apart by their code (invalid_api_key, model_not_found); a rate limit on requests is
  // "requests" (code rate_limit_exceeded), a used-up quota "insufficient_quota" (the same code).
  std::string type = "invalid_request_error";
  if (status == 429) type = code == "insufficient_quota" ? "insufficient_quota" : "requests";
  if (status >= 500) type = "server_error";
  // Messages quote what came from outside (a request path, a field's name, a backend's words):
  // the JSON answer must be UTF-8 all the same, or strict clients cannot read the error at all.
  if (!valid_utf8(message)) message = utf8_repaired(message);
  if (!valid_utf8(param)) param = utf8_repaired(param);
  return api_error{status, std::move(type), std::move(message), std::move(param), std::move(code)};
}

std::string error_body(const api_error& error) {
  return json::serialize(json::object{{"error", error_object(error)}});
}

expected<completion_request, api_error> parse_chat_request(std::string_view body, const api_limits& limits) {
  auto object = parse_body(body, limits);
  if (!object) return unexpected{object.error()};
  auto model = parse_model(*object, limits);
  if (!model) return unexpected{model.error()};
  auto messages = parse_messages(*object, limits);
  if (!messages) return unexpected{messages.error()};
  auto request = parse_common(*object, limits, request_kind::chat);
  if (!request) return unexpected{request.error()};
  request->model = std::move(*model);
  request->messages = std::move(*messages);
  return request;
}

expected<completion_request, api_error> parse_completion_request(std::string_view body, const api_limits& limits) {
  auto object = parse_body(body, limits);
  if (!object) return unexpected{object.error()};
  auto model = parse_model(*object, limits);
  if (!model) return unexpected{model.error()};
  auto prompt = parse_prompt(*object, limits);
  if (!prompt) return unexpected{prompt.error()};
  auto request = parse_common(*object, limits, request_kind::completion);
  if (!request) return unexpected{request.error()};
  request->model = std::move(*model);
  request->prompt = std::move(*prompt);
  return request;
}

std::uint32_t estimate_prompt_tokens(const completion_request& request) {
  constexpr std::uint64_t bytes_per_token = 3;
  constexpr std::uint64_t tokens_per_message = 6;
  constexpr std::uint64_t tokens_per_request = 3;
  auto text_tokens = [](std::size_t bytes) { return (bytes + bytes_per_token - 1) / bytes_per_token; };
  std::uint64_t tokens = tokens_per_request;
  if (request.kind == request_kind::chat) {
    for (const auto& message : request.messages) tokens += text_tokens(message.content.size()) + tokens_per_message;
  } else {
    tokens += text_tokens(request.prompt.size());
  }
  return static_cast<std::uint32_t>(std::min<std::uint64_t>(tokens, std::numeric_limits<std::uint32_t>::max()));
}

std::uint32_t context_tokens_needed(std::uint32_t prompt_tokens, std::optional<std::uint32_t> max_tokens) {
  const std::uint64_t needed = std::uint64_t{prompt_tokens} + max_tokens.value_or(1);
  return static_cast<std::uint32_t>(std::min<std::uint64_t>(needed, std::numeric_limits<std::uint32_t>::max()));
}

expected<void, api_error> check_context(const completion_request& request, std::uint32_t context_length_tokens) {
  if (context_length_tokens == 0) return {};
  const std::uint64_t prompt = estimate_prompt_tokens(request);
  if (context_tokens_needed(static_cast<std::uint32_t>(prompt), request.max_tokens) <= context_length_tokens) return {};
  const bool chat = request.kind == request_kind::chat;
  const std::string what = chat ? "messages" : "prompt";
  const std::string head =
      "This model's maximum context length is " + std::to_string(context_length_tokens) + " tokens. However, ";
  const std::string estimate_note =
      " (The gateway estimates prompt tokens conservatively from the text's size, about 3 bytes per token.)";
  if (request.max_tokens) {
    const std::uint64_t total = prompt + *request.max_tokens;
    return unexpected{invalid(head + "you requested " + std::to_string(total) + " tokens (" + std::to_string(prompt) +
                                  " in the " + what + ", " + std::to_string(*request.max_tokens) +
                                  " in the completion). Please reduce the "
                                  "length of the " +
                                  what + " or completion." + estimate_note,
                              what, "context_length_exceeded")};
  }
  return unexpected{invalid(head + "your " + what + " resulted in " + std::to_string(prompt) +
                                " tokens, which leaves no room for the completion. Please reduce the length "
                                "of the " +
                                what + "." + estimate_note,
                            what, "context_length_exceeded")};
}

std::string upstream_body(const completion_request& request, std::string_view continuation_prefix,
                          std::uint32_t continuation_tokens) {
  json::object body;
  body["model"] = request.model;
  if (request.kind == request_kind::chat) {
    json::array messages;
    messages.reserve(request.messages.size() + 1);
    for (const auto& message : request.messages) {
      const std::string_view role = message.role == "developer" ? "system" : std::string_view(message.role);
      messages.push_back(json::object{{"role", role}, {"content", message.content}});
    }
    const bool continuing = !continuation_prefix.empty();
    if (continuing) {
      // The answer so far continues the client's own trailing assistant message (a prefill such as
      // "Sure:") when there is one: two assistant turns in a row are refused by chat templates
      // that want the roles to alternate (Gemma's), and read as a closed turn by the others.
      const bool prefilled = !request.messages.empty() && request.messages.back().role == "assistant";
      if (prefilled) {
        auto& content = messages.back().as_object()["content"].as_string();
        content.append(continuation_prefix);
      } else {
        messages.push_back(json::object{{"role", "assistant"}, {"content", continuation_prefix}});
      }
    }
    body["messages"] = std::move(messages);
    if (continuing) {
      // vLLM opens a new assistant turn after a trailing assistant message unless told to continue
      // it, and refuses continue_final_message together with its default add_generation_prompt.
      // llama.cpp server and Ollama continue a trailing assistant message by themselves and, like
      // LM Studio, ignore fields they do not know.
      body["continue_final_message"] = true;
      body["add_generation_prompt"] = false;
    }
  } else {
    std::string prompt = request.prompt;
    prompt += continuation_prefix;
    body["prompt"] = std::move(prompt);
  }
  if (request.max_tokens) {
    const std::uint32_t left =
        *request.max_tokens > continuation_tokens ? *request.max_tokens - continuation_tokens : 1;
    body["max_tokens"] = left;
  }
  if (request.temperature) body["temperature"] = *request.temperature;
  if (request.top_p) body["top_p"] = *request.top_p;
  if (request.presence_penalty) body["presence_penalty"] = *request.presence_penalty;
  if (request.frequency_penalty) body["frequency_penalty"] = *request.frequency_penalty;
  if (request.seed) body["seed"] = *request.seed;
  if (!request.stop.empty()) {
    json::array stop;
    for (const auto& sequence : request.stop) stop.emplace_back(sequence);
    body["stop"] = std::move(stop);
  }
  body["stream"] = true;
  body["stream_options"] = {{"include_usage", true}};
  return json::serialize(body);
}

std::string_view quality_name(events::quality_tier tier) noexcept {
  switch (tier) {
    case events::quality_tier::low:
      return "low";
    case events::quality_tier::standard:
      return "standard";
    case events::quality_tier::high:
      return "high";
    case events::quality_tier::ultra:
      return "ultra";
  }
  return "low";
}

std::string ad_text(const ad_info& ad) {
  return std::string(ad_head) + ad.title + std::string(ad_dash) + ad.text + std::string(ad_gap) + ad.click_url;
}

namespace {
/// A streamed piece in delta field `field` (chat) or text (completion). One of these goes out per
/// token: written directly rather than built as a json::object (a handful of allocations per
/// token), with the same keys, order and escaping as chunk_head() and chunk_choice() give (tests
/// check the exact bytes, and parse awkward texts back).
std::string delta_chunk_json(const response_meta& meta, std::string_view field, std::string_view text, bool first) {
  const bool chat = meta.kind == request_kind::chat;
  std::string out;
  out.reserve(160 + meta.job_id.size() + meta.model.size() + text.size());
  out += R"({"id":)";
  out += json::serialize(json::string_view(response_id(meta)));
  out += chat ? R"(,"object":"chat.completion.chunk","created":)" : R"(,"object":"text_completion","created":)";
  out += std::to_string(meta.created_s);
  out += R"(,"model":)";
  out += json::serialize(json::string_view(meta.model));
  out += R"(,"choices":[{"index":0,)";
  if (chat) {
    out += R"("delta":{)";
    if (first) out += R"("role":"assistant")";
    if (!text.empty() || first) {
      if (first) out += ',';
      out += '"';
      out += field;
      out += R"(":)";
      out += json::serialize(json::string_view(text.data(), text.size()));
    }
    out += '}';
  } else {
    out += R"("text":)";
    out += json::serialize(json::string_view(text.data(), text.size()));
  }
  out += R"(,"logprobs":null,"finish_reason":null}]})";
  return out;
}
}  // namespace

std::string chunk_json(const response_meta& meta, std::string_view text, bool first) {
  return delta_chunk_json(meta, "content", text, first);
}

std::string reasoning_chunk_json(const response_meta& meta, std::string_view text, bool first) {
  GPUSTREAM_ENSURE(meta.kind == request_kind::chat);
  return delta_chunk_json(meta, "reasoning_content", text, first);
}

std::string ad_chunk_json(const response_meta& meta, const ad_info& ad, bool first) {
  return chunk_json(meta, ad_text(ad), first);
}

std::string_view client_finish_reason(std::string_view backend) noexcept {
  for (const std::string_view openai : {"stop", "length", "tool_calls", "content_filter", "function_call"}) {
    if (backend == openai) return openai;
  }
  for (const std::string_view length : {"max_tokens", "model_length"}) {
    if (backend == length) return "length";
  }
  return "stop";
}

std::string final_chunk_json(const response_meta& meta, std::string_view finish_reason,
                             const std::optional<token_usage>& usage,
                             const std::optional<response_extension>& extension) {
  json::object chunk = chunk_head(meta);
  chunk["choices"] = json::array{chunk_choice(meta, {}, false, json::value(finish_reason))};
  if (usage) chunk["usage"] = usage_object(*usage);
  if (extension) chunk["x_gpustream"] = extension_object(*extension);
  return json::serialize(chunk);
}

std::string usage_chunk_json(const response_meta& meta, const token_usage& usage,
                             const std::optional<response_extension>& extension) {
  json::object chunk = chunk_head(meta);
  chunk["choices"] = json::array{};
  chunk["usage"] = usage_object(usage);
  if (extension) chunk["x_gpustream"] = extension_object(*extension);
  return json::serialize(chunk);
}

std::string error_chunk_json(const response_meta& meta, const api_error& error,
                             const std::optional<token_usage>& usage) {
  json::object chunk = chunk_head(meta);
  chunk["choices"] = json::array{chunk_choice(meta, {}, false, json::value("error"))};
  if (usage) chunk["usage"] = usage_object(*usage);
  chunk["error"] = error_object(error);
  return json::serialize(chunk);
}

std::string response_json(const response_meta& meta, std::string_view text, std::string_view finish_reason,
                          const token_usage& usage, const response_extension& extension, std::string_view reasoning) {
  std::string content(text);
  if (extension.ad) content += ad_text(*extension.ad);
  const bool chat = meta.kind == request_kind::chat;
  json::object choice{{"index", 0}};
  if (chat) {
    choice["message"] = {{"role", "assistant"}, {"content", content}};
    if (!reasoning.empty()) choice["message"].as_object()["reasoning_content"] = reasoning;
  } else {
    choice["text"] = content;
  }
  choice["logprobs"] = nullptr;
  choice["finish_reason"] = finish_reason;
  json::object body{{"id", response_id(meta)},
                    {"object", chat ? "chat.completion" : "text_completion"},
                    {"created", meta.created_s},
                    {"model", meta.model}};
  body["choices"] = json::array{std::move(choice)};
  body["usage"] = usage_object(usage);
  body["x_gpustream"] = extension_object(extension);
  return json::serialize(body);
}

namespace {
json::object model_object(const model_listing& model) {
  // OpenAI's model object, and what gpustream adds under x_gpustream only.
  json::object object{{"id", model.id}, {"object", "model"}, {"created", model.created_s}, {"owned_by", "gpustream"}};
  object["x_gpustream"] = {
      {"context_length", model.context_length == 0 ? json::value(nullptr) : json::value(model.context_length)},
      {"providers_online", model.providers_online},
      {"price_per_mtok_min_micros", model.price_per_mtok_min_micros},
      {"price_per_mtok_max_micros", model.price_per_mtok_max_micros}};
  return object;
}
}  // namespace

std::string models_json(std::span<const model_listing> models) {
  json::array data;
  data.reserve(models.size());
  for (const auto& model : models) data.push_back(model_object(model));
  return json::serialize(json::object{{"object", "list"}, {"data", std::move(data)}});
}

std::string model_json(const model_listing& model) {
  return json::serialize(model_object(model));
}

std::string sse_event(std::string_view json_text) {
  // A raw line break would end the SSE field early and corrupt the stream: a caller's bug.
  GPUSTREAM_ENSURE(find_line_break(json_text) == std::string_view::npos);
  std::string event;
  event.reserve(json_text.size() + 8);
  event += "data: ";
  event += json_text;
  event += "\n\n";
  return event;
}

}  // namespace gpustream::gateway
