// The OpenAI API shapes: request parsing and validation with bodies as the official SDKs send them,
// limits, the context-length check, the upstream body, and the exact JSON of every response shape.
#include "domain/job.hpp"
#include "gateway/openai_api.hpp"

#include "base/text.hpp"

#include <gtest/gtest.h>

#include <boost/json.hpp>
#include <string>
#include <vector>

namespace gpustream::gateway {
namespace {
namespace json = boost::json;

const api_limits limits{};

/// Parses a chat body that must be valid.
completion_request chat(std::string_view body, const api_limits& with = limits) {
  auto request = parse_chat_request(body, with);
  EXPECT_TRUE(request.has_value()) << (request ? "" : request.error().message);
  return request ? *request : completion_request{};
}

/// Parses a chat body that must be refused; returns the error.
api_error chat_error(std::string_view body, const api_limits& with = limits) {
  auto request = parse_chat_request(body, with);
  EXPECT_FALSE(request.has_value()) << body;
  return request ? api_error{} : request.error();
}

api_error completion_error(std::string_view body, const api_limits& with = limits) {
  auto request = parse_completion_request(body, with);
  EXPECT_FALSE(request.has_value()) << body;
  return request ? api_error{} : request.error();
}

/// A minimal valid chat body with `extra` spliced in as further top-level fields.
std::string chat_body(std::string_view extra) {
  std::string body = R"({"model":"llama-3-8b","messages":[{"role":"user","content":"Hi"}])";
  if (!extra.empty()) body += "," + std::string(extra);
  return body + "}";
}

// ----------------------------------------------------------------------------------------------
// Parsing: what the SDKs send

TEST(openai_api, parses_a_streamed_chat_body_as_the_python_sdk_sends_it) {
  // openai-python 1.x: client.chat.completions.create(model=…, messages=…, stream=True,
  // stream_options={"include_usage": True}, temperature=0.7, max_tokens=256, seed=42, stop=["\n\n"],
  // user="u-1", extra_body={"x_gpustream": {...}})
  const auto request = chat(R"({
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "Say hi"}],
    "model": "llama-3-8b",
    "max_tokens": 256, "seed": 42, "stop": ["\n\n"], "stream": true,
    "stream_options": {"include_usage": true}, "temperature": 0.7, "user": "u-1",
    "x_gpustream": {"quality": "high", "max_price_micros": 2500000, "conversation_id": "c-9"}
  })");
  EXPECT_EQ(request.kind, request_kind::chat);
  EXPECT_EQ(request.model, "llama-3-8b");
  ASSERT_EQ(request.messages.size(), 2u);
  EXPECT_EQ(request.messages[0].role, "system");
  EXPECT_EQ(request.messages[0].content, "You are terse.");
  EXPECT_EQ(request.messages[1].role, "user");
  EXPECT_EQ(request.messages[1].content, "Say hi");
  EXPECT_TRUE(request.stream);
  EXPECT_TRUE(request.include_usage);
  EXPECT_EQ(request.max_tokens, 256u);
  EXPECT_EQ(request.temperature, 0.7);
  EXPECT_FALSE(request.top_p.has_value());
  EXPECT_EQ(request.seed, 42);
  EXPECT_EQ(request.stop, std::vector<std::string>{"\n\n"});
  EXPECT_EQ(request.user, "u-1");
  EXPECT_EQ(request.extension.quality, events::quality_tier::high);
  EXPECT_EQ(request.extension.max_price_micros, 2500000);
  EXPECT_EQ(request.extension.conversation_id, "c-9");
}

TEST(openai_api, parses_a_plain_chat_body_as_the_node_sdk_sends_it_with_nulls_and_unknown_fields) {
  // openai-node sends what the caller set; callers and frameworks add fields we do not use.
  const auto request = chat(R"({"model":"qwen2.5-7b-instruct","messages":[{"role":"developer","content":"Be brief."},
    {"role":"user","content":"2+2?","name":"alice"}],"temperature":null,"top_p":1,"n":1,"store":false,
    "metadata":{"k":"v"},"service_tier":"auto","parallel_tool_calls":null,"tools":[],"tool_choice":"auto","logprobs":false,
    "presence_penalty":0,"frequency_penalty":-0.5,"response_format":{"type":"text"},"stream_options":null})");
  EXPECT_EQ(request.model, "qwen2.5-7b-instruct");
  ASSERT_EQ(request.messages.size(), 2u);
  EXPECT_EQ(request.messages[0].role, "developer");
  EXPECT_FALSE(request.stream);
  EXPECT_FALSE(request.include_usage);
  EXPECT_FALSE(request.max_tokens.has_value());
  EXPECT_FALSE(request.temperature.has_value());
  EXPECT_EQ(request.top_p, 1.0);
  EXPECT_EQ(request.presence_penalty, 0.0);
  EXPECT_EQ(request.frequency_penalty, -0.5);
  for (const std::string choice : {R"("none")", "null"}) {
    EXPECT_TRUE(parse_chat_request(R"({"model":"m","messages":[{"role":"user","content":"a"}],"tool_choice":)" +
                                   choice + "}", limits))
        << choice;
  }
  EXPECT_FALSE(request.seed.has_value());
  EXPECT_TRUE(request.stop.empty());
  EXPECT_FALSE(request.extension.quality.has_value());
  EXPECT_FALSE(request.extension.max_price_micros.has_value());
}

TEST(openai_api, an_ad_ending_an_assistant_message_from_history_is_dropped) {
  // The free-tier answer as a client keeps it: the model's text, then ad_text().
  const std::string ad = "\\n\\nSponsored: Acme \u2014 Widgets that last  http://gw.example/a/c/imp_42";
  const auto history = [&](const std::string& role, const std::string& content) {
    return chat(R"({"model":"m","messages":[{"role":")" + role + R"(","content":")" + content +
                R"("},{"role":"user","content":"and then?"}]})");
  };
  EXPECT_EQ(history("assistant", "Once upon a time." + ad).messages.front().content, "Once upon a time.");
  EXPECT_EQ(history("assistant", ad).messages.front().content, "");
  // What is not an ad of ours, or not the model's, stays as it is.
  EXPECT_EQ(history("user", "Once upon a time." + ad).messages.front().content,
            "Once upon a time.\n\nSponsored: Acme \u2014 Widgets that last  http://gw.example/a/c/imp_42");
  for (const std::string kept : {"A.\\n\\nSponsored: Acme \u2014 Widgets  http://gw.example/elsewhere",
                                 "A.\\n\\nSponsored: Acme \u2014 Widgets  http://gw.example/a/c/imp_42\\nmore",
                                 "A.\\n\\nSponsored: Acme, Widgets  http://gw.example/a/c/imp_42"}) {
    const auto parsed = history("assistant", kept).messages.front().content;
    EXPECT_NE(parsed.find("Sponsored"), std::string::npos) << kept;
  }
}

TEST(openai_api, an_assistant_message_from_history_may_have_null_content_and_its_refusal) {
  // What OpenAI's own answers look like when kept as history by a client.
  const auto parsed = chat(R"({"model":"m","messages":[{"role":"user","content":"a"},
    {"role":"assistant","content":null,"refusal":"I can't help with that."},
    {"role":"assistant","content":null},{"role":"assistant"},{"role":"user","content":"b"}]})");
  ASSERT_EQ(parsed.messages.size(), 5u);
  EXPECT_EQ(parsed.messages[1].content, "I can't help with that.");
  EXPECT_EQ(parsed.messages[2].content, "");
  EXPECT_EQ(parsed.messages[3].content, "");
  // Only an assistant's content may be left out, and a refusal is text.
  const auto missing = chat_error(R"({"model":"m","messages":[{"role":"user","content":null}]})");
  EXPECT_EQ(missing.param, "messages[0].content");
  EXPECT_EQ(missing.code, "missing_required_parameter");
  const auto refusal = chat_error(R"({"model":"m","messages":[{"role":"assistant","refusal":7}]})");
  EXPECT_EQ(refusal.param, "messages[0].refusal");
  EXPECT_EQ(refusal.code, "invalid_type");
}

TEST(openai_api, include_usage_counts_only_when_streaming) {
  EXPECT_FALSE(chat(chat_body(R"("stream":false,"stream_options":{"include_usage":true})")).include_usage);
  EXPECT_FALSE(chat(chat_body(R"("stream":true,"stream_options":{"include_usage":false})")).include_usage);
  EXPECT_FALSE(chat(chat_body(R"("stream":true,"stream_options":{})")).include_usage);
  EXPECT_EQ(chat_error(chat_body(R"("stream":true,"stream_options":{"include_usage":"yes"})")).param,
            "stream_options.include_usage");
  EXPECT_EQ(chat_error(chat_body(R"("stream":"true")")).param, "stream");
}

TEST(openai_api, flattens_text_parts_and_refuses_images_clearly) {
  const auto request = chat(R"({"model":"m","messages":[{"role":"user","content":[
      {"type":"text","text":"first"},{"type":"text","text":"second"}]}]})");
  ASSERT_EQ(request.messages.size(), 1u);
  EXPECT_EQ(request.messages[0].content, "first\nsecond");

  const auto image = chat_error(R"({"model":"m","messages":[{"role":"user","content":[
      {"type":"text","text":"what is this?"},
      {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]}]})");
  EXPECT_EQ(image.status, 400u);
  EXPECT_EQ(image.type, "invalid_request_error");
  EXPECT_EQ(image.param, "messages[0].content[1].type");
  EXPECT_EQ(image.code, "unsupported_value");
  EXPECT_NE(image.message.find("Image inputs are not supported"), std::string::npos) << image.message;

  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":[{"type":"input_audio"}]}]})").param,
            "messages[0].content[0].type");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":[{"type":"text","text":7}]}]})").param,
            "messages[0].content[0].text");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":["plain"]}]})").param,
            "messages[0].content[0]");
  // A part's type is compared only once short enough: the error never echoes a huge one.
  const auto huge = chat_error(R"({"model":"m","messages":[{"role":"user","content":[{"type":")" +
                               std::string(100'000, 'x') + R"("}]}]})");
  EXPECT_EQ(huge.param, "messages[0].content[0].type");
  EXPECT_LT(huge.message.size(), 200u) << huge.message.size();
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":[{"text":"no type"}]}]})").code,
            "missing_required_parameter");
}

TEST(openai_api, max_completion_tokens_is_accepted_and_wins_over_max_tokens) {
  EXPECT_EQ(chat(chat_body(R"("max_completion_tokens":77)")).max_tokens, 77u);
  EXPECT_EQ(chat(chat_body(R"("max_tokens":10,"max_completion_tokens":20)")).max_tokens, 20u);
  EXPECT_EQ(chat(chat_body(R"("max_tokens":10,"max_completion_tokens":null)")).max_tokens, 10u);
}

TEST(openai_api, wrong_types_and_ranges_name_the_parameter) {
  struct bad {
    std::string extra;
    std::string param;
    std::string code;
  };
  const std::vector<bad> cases{
      {R"("max_tokens":0)", "max_tokens", "integer_below_min_value"},
      {R"("max_tokens":131073)", "max_tokens", "integer_above_max_value"},
      {R"("max_tokens":18446744073709551615)", "max_tokens", "integer_above_max_value"},
      {R"("max_tokens":"100")", "max_tokens", "invalid_type"},
      {R"("max_tokens":10.5)", "max_tokens", "invalid_type"},
      {R"("max_completion_tokens":-1)", "max_completion_tokens", "integer_below_min_value"},
      {R"("temperature":2.5)", "temperature", "decimal_above_max_value"},
      {R"("temperature":-0.1)", "temperature", "decimal_below_min_value"},
      {R"("temperature":"hot")", "temperature", "invalid_type"},
      {R"("top_p":1.01)", "top_p", "decimal_above_max_value"},
      {R"("presence_penalty":3)", "presence_penalty", "decimal_above_max_value"},
      {R"("frequency_penalty":-2.5)", "frequency_penalty", "decimal_below_min_value"},
      {R"("seed":1.5)", "seed", "invalid_type"},
      {R"("seed":9223372036854775808)", "seed", "integer_above_max_value"},
      {R"("stop":5)", "stop", "invalid_type"},
      {R"("stop":["a",5])", "stop[1]", "invalid_type"},
      {R"("stop":["a","b","c","d","e"])", "stop", "array_above_max_length"},
      {R"("user":42)", "user", "invalid_type"},
      {R"("n":2)", "n", "unsupported_parameter"},
      {R"("n":0)", "n", "integer_below_min_value"},
      {R"("tools":[{"type":"function","function":{"name":"f"}}])", "tools", "unsupported_parameter"},
      {R"("functions":[{"name":"f"}])", "functions", "unsupported_parameter"},
      {R"("tools":[],"tool_choice":"required")", "tool_choice", "unsupported_parameter"},
      {R"("tool_choice":{"type":"function","function":{"name":"f"}})", "tool_choice", "unsupported_parameter"},
      {R"("logprobs":true)", "logprobs", "unsupported_parameter"},
      {R"("logit_bias":{"50256":-100})", "logit_bias", "unsupported_parameter"},
      {R"("top_logprobs":2)", "top_logprobs", "unsupported_parameter"},
      {R"("reasoning_effort":"high")", "reasoning_effort", "unsupported_parameter"},
      {R"("modalities":["text","audio"])", "modalities", "unsupported_parameter"},
      {R"("audio":{"voice":"alloy","format":"wav"})", "audio", "unsupported_parameter"},
      {R"("prediction":{"type":"content","content":"x"})", "prediction", "unsupported_parameter"},
      {R"("web_search_options":{"search_context_size":"low"})", "web_search_options", "unsupported_parameter"},
      {R"("response_format":{"type":"json_object"})", "response_format", "unsupported_value"},
      {R"("x_gpustream":"high")", "x_gpustream", "invalid_type"},
      {R"("x_gpustream":{"quality":"premium"})", "x_gpustream.quality", "invalid_value"},
      {R"("x_gpustream":{"max_price_micros":-1})", "x_gpustream.max_price_micros", "integer_below_min_value"},
      {R"("x_gpustream":{"max_price_micros":0})", "x_gpustream.max_price_micros", "integer_below_min_value"},
      {R"("x_gpustream":{"max_price_micros":1000000001})", "x_gpustream.max_price_micros", "integer_above_max_value"},
      {R"("x_gpustream":{"max_price_micros":"5"})", "x_gpustream.max_price_micros", "invalid_type"},
      {R"("x_gpustream":{"conversation_id":[]})", "x_gpustream.conversation_id", "invalid_type"},
  };
  for (const auto& c : cases) {
    const auto error = chat_error(chat_body(c.extra));
    EXPECT_EQ(error.status, 400u) << c.extra;
    EXPECT_EQ(error.type, "invalid_request_error") << c.extra;
    EXPECT_EQ(error.param, c.param) << c.extra;
    EXPECT_EQ(error.code, c.code) << c.extra;
    EXPECT_NE(error.message.find("'" + c.param), std::string::npos) << c.extra << ": " << error.message;
  }
}

TEST(openai_api, parameters_that_ask_for_nothing_are_accepted) {
  for (const std::string extra : {R"("logit_bias":{})", R"("logit_bias":null)", R"("top_logprobs":0)",
                                  R"("modalities":["text"])", R"("audio":null)", R"("reasoning_effort":null)"}) {
    EXPECT_EQ(chat(chat_body(extra)).model, "llama-3-8b") << extra;
  }
}

TEST(openai_api, stop_takes_a_string_or_an_array_and_drops_empty_sequences) {
  EXPECT_EQ(chat(chat_body(R"("stop":"END")")).stop, std::vector<std::string>{"END"});
  EXPECT_EQ(chat(chat_body(R"("stop":["a","","b"])")).stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(chat(chat_body(R"("stop":"")")).stop.empty());
  EXPECT_TRUE(chat(chat_body(R"("stop":[])")).stop.empty());
}

TEST(openai_api, every_quality_tier_parses) {
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"quality":"low"})")).extension.quality, events::quality_tier::low);
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"quality":"standard"})")).extension.quality,
            events::quality_tier::standard);
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"quality":"high"})")).extension.quality, events::quality_tier::high);
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"quality":"ultra"})")).extension.quality, events::quality_tier::ultra);
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"max_price_micros":1})")).extension.max_price_micros, 1);
  EXPECT_EQ(chat(chat_body(R"("x_gpustream":{"max_price_micros":1000000000})")).extension.max_price_micros,
            1'000'000'000);
}

TEST(openai_api, refuses_bodies_missing_what_is_required) {
  auto missing_model = chat_error(R"({"messages":[{"role":"user","content":"Hi"}]})");
  EXPECT_EQ(missing_model.param, "model");
  EXPECT_EQ(missing_model.code, "missing_required_parameter");
  EXPECT_EQ(chat_error(R"({"model":"","messages":[{"role":"user","content":"Hi"}]})").param, "model");
  EXPECT_EQ(chat_error(R"({"model":7,"messages":[{"role":"user","content":"Hi"}]})").code, "invalid_type");
  EXPECT_EQ(chat_error(R"({"model":"m"})").param, "messages");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[]})").code, "empty_array");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":{"role":"user"}})").code, "invalid_type");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":["Hi"]})").param, "messages[0]");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"content":"Hi"}]})").param, "messages[0].role");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user"}]})").param, "messages[0].content");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":null}]})").param, "messages[0].content");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"user","content":1}]})").code, "invalid_type");
  const auto tool = chat_error(R"({"model":"m","messages":[{"role":"user","content":"a"},
      {"role":"tool","content":"b","tool_call_id":"t"}]})");
  EXPECT_EQ(tool.param, "messages[1].role");
  EXPECT_EQ(tool.code, "unsupported_value");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"assistant","content":"",
      "tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]}]})")
                .param,
            "messages[0].tool_calls");
  EXPECT_EQ(chat_error(R"({"model":"m","messages":[{"role":"assistant","content":"",
      "function_call":{"name":"f","arguments":"{}"}}]})")
                .param,
            "messages[0].function_call");
  // History replayed by some frameworks: an assistant message with no calls in it asks for nothing.
  const auto replayed = chat(R"({"model":"m","messages":[{"role":"user","content":"a"},
      {"role":"assistant","content":"b","tool_calls":[]},{"role":"assistant","content":"c","tool_calls":null,
      "function_call":null},{"role":"user","content":"d"}]})");
  ASSERT_EQ(replayed.messages.size(), 4u);
  EXPECT_EQ(replayed.messages[1].content, "b");
}

TEST(openai_api, refuses_bodies_that_are_not_json_objects) {
  const auto broken = chat_error(R"({"model":"m",)");
  EXPECT_EQ(broken.status, 400u);
  EXPECT_EQ(broken.code, "invalid_json");
  EXPECT_EQ(broken.param, "");
  EXPECT_EQ(chat_error("").code, "invalid_json");
  EXPECT_EQ(chat_error("[1,2]").code, "invalid_json");
  EXPECT_EQ(chat_error(R"("text")").code, "invalid_json");
  EXPECT_EQ(chat_error(chat_body("") + " trailing").code, "invalid_json");
  EXPECT_EQ(chat_error("{\"model\":\"m\xff\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]}").code,
            "invalid_json");  // invalid UTF-8
}

// ----------------------------------------------------------------------------------------------
// Limits

/// A valid chat body whose deepest point is `depth` levels of nesting (the body itself is 1).
std::string body_of_depth(std::size_t depth) {
  // {"model":…,"messages":[{…}],"extra": [[…]] }: the extra arrays add depth - 1 levels.
  const std::size_t arrays = depth - 1;
  return chat_body("\"extra\":" + std::string(arrays, '[') + std::string(arrays, ']'));
}

TEST(openai_api, json_deeper_than_json_depth_max_is_a_400_naming_the_limit) {
  EXPECT_TRUE(parse_chat_request(body_of_depth(32), limits).has_value());
  const auto error = chat_error(body_of_depth(33));
  EXPECT_EQ(error.status, 400u);
  EXPECT_EQ(error.code, "json_too_deep");
  EXPECT_NE(error.message.find("32"), std::string::npos) << error.message;
  EXPECT_NE(error.message.find("json_depth_max"), std::string::npos) << error.message;

  // Far beyond the limit: still our message, no stack exhaustion.
  EXPECT_EQ(chat_error(body_of_depth(200'000)).code, "json_too_deep");
  EXPECT_EQ(chat_error(std::string(200'000, '[')).code, "json_too_deep");
  std::string objects;
  for (int i = 0; i < 100'000; ++i) objects += R"({"a":)";
  EXPECT_EQ(chat_error(objects).code, "json_too_deep");

  api_limits shallow;
  shallow.json_depth_max = 4;
  EXPECT_TRUE(parse_chat_request(body_of_depth(4), shallow).has_value());
  const auto shallow_error = chat_error(body_of_depth(5), shallow);
  EXPECT_EQ(shallow_error.code, "json_too_deep");
  EXPECT_NE(shallow_error.message.find(" 4 "), std::string::npos) << shallow_error.message;
}

TEST(openai_api, messages_max_bounds_the_message_count) {
  api_limits small;
  small.messages_max = 3;
  const std::string one = R"({"role":"user","content":"a"})";
  const std::string three = R"({"model":"m","messages":[)" + one + "," + one + "," + one + "]}";
  const std::string four = R"({"model":"m","messages":[)" + one + "," + one + "," + one + "," + one + "]}";
  EXPECT_EQ(chat(three, small).messages.size(), 3u);
  const auto error = chat_error(four, small);
  EXPECT_EQ(error.param, "messages");
  EXPECT_EQ(error.code, "array_above_max_length");
  EXPECT_EQ(api_limits{}.messages_max, 1024u);
}

TEST(openai_api, message_and_prompt_bytes_are_bounded) {
  api_limits small;
  small.message_bytes_max = 10;
  small.prompt_bytes_max = 15;
  auto body = [](std::string_view first, std::string_view second) {
    return R"({"model":"m","messages":[{"role":"user","content":")" + std::string(first) +
           R"("},{"role":"user","content":")" + std::string(second) + R"("}]})";
  };
  EXPECT_TRUE(parse_chat_request(body("0123456789", "01234"), small).has_value());
  EXPECT_EQ(chat_error(body("0123456789A", ""), small).param, "messages[0].content");
  EXPECT_EQ(chat_error(body("0123456789", "012345"), small).param, "messages");
  // Flattened parts count with their separators.
  const std::string parts = R"({"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"01234"},
      {"type":"text","text":"56789"}]}]})";
  EXPECT_EQ(chat_error(parts, small).param, "messages[0].content");

  api_limits few_parts;
  few_parts.content_parts_max = 1;
  EXPECT_EQ(chat_error(parts, few_parts).code, "array_above_max_length");

  EXPECT_EQ(completion_error(R"({"model":"m","prompt":"0123456789A"})", small).param, "prompt");
  // The prompt's own limit, below the message's.
  api_limits small_prompt;
  small_prompt.message_bytes_max = 15;
  small_prompt.prompt_bytes_max = 10;
  EXPECT_TRUE(parse_completion_request(R"({"model":"m","prompt":"0123456789"})", small_prompt).has_value());
  const auto long_prompt = completion_error(R"({"model":"m","prompt":"0123456789A"})", small_prompt);
  EXPECT_EQ(long_prompt.param, "prompt");
  EXPECT_EQ(long_prompt.code, "string_above_max_length");
}

TEST(openai_api, the_defaults_bound_what_a_job_accepts) {
  // A request the API takes must not be refused later by the job's own bounds, naming no parameter.
  const api_limits limits;
  const domain::job_options job;
  EXPECT_EQ(limits.conversation_id_bytes_max, job.id_length_max);
  EXPECT_EQ(limits.max_price_micros_max, job.max_price_micros_max);
  EXPECT_EQ(limits.max_tokens_max, job.max_tokens_max);
  EXPECT_EQ(limits.model_name_bytes_max, job.model_name_length_max);
}

TEST(openai_api, names_and_identifiers_are_bounded) {
  api_limits small;
  small.model_name_bytes_max = 5;
  small.identifier_bytes_max = 3;
  small.conversation_id_bytes_max = 3;
  small.stop_sequence_bytes_max = 2;
  small.stop_sequences_max = 1;
  EXPECT_EQ(chat_error(R"({"model":"abcdef","messages":[{"role":"user","content":"a"}]})", small).param, "model");
  EXPECT_TRUE(parse_chat_request(R"({"model":"abcde","messages":[{"role":"user","content":"a"}]})", small));
  const std::string base = R"({"model":"m","messages":[{"role":"user","content":"a"}],)";
  EXPECT_EQ(chat_error(base + R"("user":"abcd"})", small).code, "string_above_max_length");
  EXPECT_EQ(chat_error(base + R"("x_gpustream":{"conversation_id":"abcd"}})", small).param,
            "x_gpustream.conversation_id");
  EXPECT_EQ(chat_error(base + R"("stop":"abc"})", small).param, "stop");
  EXPECT_EQ(chat_error(base + R"("stop":["a","b"]})", small).param, "stop");
  EXPECT_TRUE(parse_chat_request(base + R"("user":"abc","stop":["ab"]})", small));
}

// ----------------------------------------------------------------------------------------------
// /v1/completions

TEST(openai_api, parses_completion_bodies) {
  auto request = parse_completion_request(
      R"({"model":"gpt2","prompt":"Once upon a time","max_tokens":16,"stream":true,"echo":false,"suffix":null,
          "best_of":1,"logprobs":null})",
      limits);
  ASSERT_TRUE(request.has_value()) << request.error().message;
  EXPECT_EQ(request->kind, request_kind::completion);
  EXPECT_EQ(request->prompt, "Once upon a time");
  EXPECT_TRUE(request->messages.empty());
  EXPECT_EQ(request->max_tokens, 16u);
  EXPECT_TRUE(request->stream);

  auto array = parse_completion_request(R"({"model":"gpt2","prompt":["only one"]})", limits);
  ASSERT_TRUE(array.has_value());
  EXPECT_EQ(array->prompt, "only one");

  EXPECT_EQ(completion_error(R"({"model":"gpt2"})").code, "missing_required_parameter");
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":["a","b"]})").code, "unsupported_value");
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":[]})").code, "unsupported_value");
  for (const std::string token_ids : {R"([1,2,3])", R"([50256])", R"([[1,2]])", R"([[1],[2]])"}) {
    const auto refused = completion_error(R"({"model":"gpt2","prompt":)" + token_ids + "}");
    EXPECT_EQ(refused.code, "unsupported_value") << token_ids;
    EXPECT_NE(refused.message.find("token-id prompts are not supported"), std::string::npos)
        << token_ids << ": " << refused.message;
  }
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":7})").code, "invalid_type");
  // The element of a one-prompt array is named, with what it is (not "got an array").
  const auto element = completion_error(R"({"model":"gpt2","prompt":[{"a":1}]})");
  EXPECT_EQ(element.code, "invalid_type");
  EXPECT_EQ(element.param, "prompt[0]");
  EXPECT_NE(element.message.find("object"), std::string::npos) << element.message;
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":"a","echo":true})").param, "echo");
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":"a","suffix":"end"})").param, "suffix");
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":"a","best_of":3})").param, "best_of");
  EXPECT_EQ(completion_error(R"({"model":"gpt2","prompt":"a","logprobs":5})").param, "logprobs");
  EXPECT_EQ(completion_error(R"({"prompt":"a"})").param, "model");
}

// ----------------------------------------------------------------------------------------------
// Errors

TEST(openai_api, error_body_has_openais_shape_with_nulls_for_empty_fields) {
  EXPECT_EQ(
      error_body(make_api_error(401, "Incorrect API key provided.")),
      R"({"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":null}})");
  EXPECT_EQ(error_body(make_api_error(400, "bad", "max_tokens", "invalid_type")),
            R"({"error":{"message":"bad","type":"invalid_request_error","param":"max_tokens","code":"invalid_type"}})");
  EXPECT_EQ(make_api_error(403, "x").type, "invalid_request_error");
  EXPECT_EQ(make_api_error(404, "x").type, "invalid_request_error");
  EXPECT_EQ(make_api_error(413, "x").type, "invalid_request_error");
  EXPECT_EQ(make_api_error(429, "x").type, "requests");
  EXPECT_EQ(make_api_error(429, "x", {}, "insufficient_quota").type, "insufficient_quota");
  EXPECT_EQ(make_api_error(503, "x").type, "server_error");
  EXPECT_EQ(make_api_error(503, "x").status, 503u);
}

TEST(openai_api, an_error_quoting_bytes_that_are_not_utf8_is_utf8_all_the_same) {
  // A request path or a backend's message in Latin-1: the JSON answer stays readable.
  const auto error = make_api_error(404, "no such endpoint: GET /caf\xE9", "caf\xE9");
  EXPECT_EQ(error.message, "no such endpoint: GET /caf\xEF\xBF\xBD");
  EXPECT_EQ(error.param, "caf\xEF\xBF\xBD");
  EXPECT_TRUE(valid_utf8(error_body(error)));
}

// ----------------------------------------------------------------------------------------------
// Prompt size and the context length

TEST(openai_api, estimate_prompt_tokens_follows_its_documented_formula) {
  completion_request request;
  request.messages = {{"system", std::string(9, 'a')}, {"user", std::string(10, 'b')}};
  // (ceil(9/3) + 6) + (ceil(10/3) + 6) + 3 = 9 + 10 + 3
  EXPECT_EQ(estimate_prompt_tokens(request), 22u);
  request.messages.clear();
  EXPECT_EQ(estimate_prompt_tokens(request), 3u);

  completion_request completion;
  completion.kind = request_kind::completion;
  completion.prompt = std::string(31, 'x');
  EXPECT_EQ(estimate_prompt_tokens(completion), 11u + 3u);
  completion.prompt.clear();
  EXPECT_EQ(estimate_prompt_tokens(completion), 3u);

  // Multi-byte text counts bytes, not characters: "é" is 2 bytes, "日" is 3.
  completion.prompt = "\xC3\xA9\xE6\x97\xA5";
  EXPECT_EQ(estimate_prompt_tokens(completion), 2u + 3u);
}

TEST(openai_api, estimate_is_above_a_real_tokenizers_count_for_english) {
  // "The quick brown fox jumps over the lazy dog." is 10 tokens for cl100k and Llama 3.
  completion_request request;
  request.kind = request_kind::completion;
  request.prompt = "The quick brown fox jumps over the lazy dog.";
  EXPECT_GE(estimate_prompt_tokens(request), 10u + 1u);
}

TEST(openai_api, check_context_names_both_numbers_like_openai) {
  completion_request request;
  request.messages = {{"user", std::string(3 * 100, 'a')}};  // 100 + 6 + 3 = 109 tokens
  ASSERT_EQ(estimate_prompt_tokens(request), 109u);
  request.max_tokens = 1000;
  EXPECT_TRUE(check_context(request, 1109).has_value());
  const auto refused = check_context(request, 1108);
  ASSERT_FALSE(refused.has_value());
  const api_error& error = refused.error();
  EXPECT_EQ(error.status, 400u);
  EXPECT_EQ(error.type, "invalid_request_error");
  EXPECT_EQ(error.code, "context_length_exceeded");
  EXPECT_EQ(error.param, "messages");
  EXPECT_EQ(error.message.rfind("This model's maximum context length is 1108 tokens. However, you requested 1109 "
                                "tokens (109 in the messages, 1000 in the completion). Please reduce the length "
                                "of the messages or completion.",
                                0),
            0u)
      << error.message;
}

TEST(openai_api, without_max_tokens_at_least_one_completion_token_must_remain) {
  completion_request request;
  request.kind = request_kind::completion;
  request.prompt = std::string(3 * 97, 'a');  // 97 + 3 = 100 tokens
  EXPECT_TRUE(check_context(request, 101).has_value());
  const auto refused = check_context(request, 100);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, "context_length_exceeded");
  EXPECT_EQ(refused.error().param, "prompt");
  EXPECT_NE(refused.error().message.find("maximum context length is 100 tokens"), std::string::npos);
  EXPECT_NE(refused.error().message.find("resulted in 100 tokens"), std::string::npos) << refused.error().message;
}

TEST(openai_api, an_unknown_context_length_always_passes) {
  completion_request request;
  request.messages = {{"user", std::string(100'000, 'a')}};
  request.max_tokens = 131072;
  EXPECT_TRUE(check_context(request, 0).has_value());
}

// ----------------------------------------------------------------------------------------------
// The body sent to the provider's backend

json::object parsed(const std::string& text) {
  json::value value = json::parse(text);
  EXPECT_TRUE(value.is_object()) << text;
  return value.is_object() ? value.get_object() : json::object{};
}

TEST(openai_api, upstream_body_carries_the_request_and_never_the_user_or_extension) {
  const auto request = chat(R"({"model":"llama-3-8b","messages":[{"role":"developer","content":"Be brief."},
      {"role":"user","content":"Hi"}],"max_tokens":50,"temperature":0.5,"top_p":0.9,"seed":-3,"stop":["x","y"],
      "presence_penalty":1,"frequency_penalty":0.25,"user":"secret-user","stream":false,
      "x_gpustream":{"quality":"ultra","conversation_id":"c"}})");
  const std::string text = upstream_body(request);
  EXPECT_EQ(text.find("secret-user"), std::string::npos) << text;
  EXPECT_EQ(text.find("x_gpustream"), std::string::npos) << text;
  const json::object body = parsed(text);
  EXPECT_EQ(body.at("model"), "llama-3-8b");
  EXPECT_EQ(body.at("messages"), json::parse(R"([{"role":"system","content":"Be brief."},
                                                   {"role":"user","content":"Hi"}])"));
  EXPECT_EQ(body.at("max_tokens"), 50);
  EXPECT_EQ(body.at("temperature").to_number<double>(), 0.5);
  EXPECT_EQ(body.at("top_p").to_number<double>(), 0.9);
  EXPECT_EQ(body.at("presence_penalty").to_number<double>(), 1.0);
  EXPECT_EQ(body.at("frequency_penalty").to_number<double>(), 0.25);
  EXPECT_EQ(body.at("seed"), -3);
  EXPECT_EQ(body.at("stop"), json::parse(R"(["x","y"])"));
  EXPECT_EQ(body.at("stream"), true);  // always streamed upstream, whatever the client asked
  EXPECT_EQ(body.at("stream_options"), json::parse(R"({"include_usage":true})"));
  EXPECT_EQ(body.size(), 11u) << text;
}

TEST(openai_api, upstream_body_leaves_out_parameters_not_given) {
  const std::string text = upstream_body(chat(chat_body("")));
  EXPECT_EQ(text, R"({"model":"llama-3-8b","messages":[{"role":"user","content":"Hi"}],"stream":true,)"
                  R"("stream_options":{"include_usage":true}})");
}

TEST(openai_api, upstream_body_continues_a_chat_after_failover) {
  auto request = chat(chat_body(R"("max_tokens":100)"));
  const json::object body = parsed(upstream_body(request, "The answer so far", 30));
  EXPECT_EQ(body.at("messages"), json::parse(R"([{"role":"user","content":"Hi"},
                                                   {"role":"assistant","content":"The answer so far"}])"));
  EXPECT_EQ(body.at("max_tokens"), 70);
  EXPECT_EQ(body.at("continue_final_message"), true) << "vLLM continues the assistant message only when told";
  EXPECT_EQ(body.at("add_generation_prompt"), false) << "vLLM refuses it with continue_final_message";
  // A first attempt asks for neither.
  EXPECT_FALSE(parsed(upstream_body(request)).contains("continue_final_message"));
  EXPECT_FALSE(parsed(upstream_body(request)).contains("add_generation_prompt"));
  // More tokens produced than asked for (counts differ between agents): at least one remains.
  EXPECT_EQ(parsed(upstream_body(request, "x", 100)).at("max_tokens"), 1);
  EXPECT_EQ(parsed(upstream_body(request, "x", 500)).at("max_tokens"), 1);
  // Without max_tokens the backend decides; nothing is invented.
  EXPECT_FALSE(parsed(upstream_body(chat(chat_body("")), "x", 5)).contains("max_tokens"));
}

TEST(openai_api, upstream_body_continues_the_clients_own_trailing_assistant_message) {
  // A prefill: the answer so far continues it, never as a second assistant turn in a row.
  const auto request = chat(R"({"model":"m","messages":[{"role":"user","content":"Count"},
                                                       {"role":"assistant","content":"Sure:"}]})");
  const json::object body = parsed(upstream_body(request, " 1, 2", 2));
  EXPECT_EQ(body.at("messages"), json::parse(R"([{"role":"user","content":"Count"},
                                                   {"role":"assistant","content":"Sure: 1, 2"}])"));
  EXPECT_EQ(body.at("continue_final_message"), true);
  // The first attempt sends the client's messages as they are.
  EXPECT_EQ(parsed(upstream_body(request)).at("messages").as_array().back().at("content"), "Sure:");
}

TEST(openai_api, upstream_body_continues_a_completion_by_extending_the_prompt) {
  auto request = parse_completion_request(R"({"model":"gpt2","prompt":"Once upon","max_tokens":10})", limits);
  ASSERT_TRUE(request.has_value());
  const json::object body = parsed(upstream_body(*request, " a time", 2));
  EXPECT_EQ(body.at("prompt"), "Once upon a time");
  EXPECT_EQ(body.at("max_tokens"), 8);
  EXPECT_FALSE(body.contains("messages"));
  EXPECT_EQ(parsed(upstream_body(*request)).at("prompt"), "Once upon");
}

// ----------------------------------------------------------------------------------------------
// Responses

const response_meta chat_meta{request_kind::chat, "j1", "llama-3-8b", 1700000000};
const response_meta completion_meta{request_kind::completion, "j2", "gpt2", 1700000001};

TEST(openai_api, chat_chunks_have_openais_exact_shape) {
  EXPECT_EQ(chunk_json(chat_meta, "Hel", true),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"logprobs":null,)"
            R"("finish_reason":null}]})");
  EXPECT_EQ(chunk_json(chat_meta, "lo", false),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{"content":"lo"},"logprobs":null,"finish_reason":null}]})");
  EXPECT_EQ(final_chunk_json(chat_meta, "stop"),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]})");
}

TEST(openai_api, a_reasoning_models_thinking_streams_as_reasoning_content) {
  EXPECT_EQ(reasoning_chunk_json(chat_meta, "6 \"times\" 7", true),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"6 \"times\" 7"},"logprobs":null,)"
            R"("finish_reason":null}]})");
  EXPECT_EQ(reasoning_chunk_json(chat_meta, "so", false),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{"reasoning_content":"so"},"logprobs":null,"finish_reason":null}]})");
}

TEST(openai_api, chunks_escape_whatever_the_model_and_the_text_hold) {
  // The per-token chunk is written by hand, not through json::object: every awkward character in
  // the text, the model name and the id must still come back intact through a JSON parser.
  const std::vector<std::string> texts = {"", "plain", "say \"hi\"", "back\\slash", "line\nbreak\r\t",
                                          std::string("nul\0byte", 8), "\x01\x1f control", "caf\xc3\xa9 \xe2\x82\xac",
                                          "</script>"};
  const response_meta odd_chat{request_kind::chat, "j\"3", "model \"x\"\n", 1700000002};
  const response_meta odd_completion{request_kind::completion, "j4\\", "m\x02", 1700000003};
  for (const auto& text : texts) {
    for (const bool first : {true, false}) {
      const auto chat_chunk = json::parse(chunk_json(odd_chat, text, first)).as_object();
      EXPECT_EQ(chat_chunk.at("id"), "chatcmpl-j\"3");
      EXPECT_EQ(chat_chunk.at("model"), "model \"x\"\n");
      const auto& delta = chat_chunk.at("choices").as_array().at(0).at("delta").as_object();
      EXPECT_EQ(delta.contains("role"), first);
      if (!text.empty() || first) {
        EXPECT_EQ(delta.at("content").as_string(), text) << "chat, first=" << first;
      } else {
        EXPECT_TRUE(delta.empty());
      }
      const auto completion_chunk = json::parse(chunk_json(odd_completion, text, first)).as_object();
      EXPECT_EQ(completion_chunk.at("id"), "cmpl-j4\\");
      EXPECT_EQ(completion_chunk.at("model"), "m\x02");
      EXPECT_EQ(completion_chunk.at("choices").as_array().at(0).at("text").as_string(), text);
    }
  }
}

TEST(openai_api, completion_chunks_have_openais_exact_shape) {
  EXPECT_EQ(chunk_json(completion_meta, " time", true),
            R"({"id":"cmpl-j2","object":"text_completion","created":1700000001,"model":"gpt2",)"
            R"("choices":[{"index":0,"text":" time","logprobs":null,"finish_reason":null}]})");
  EXPECT_EQ(final_chunk_json(completion_meta, "length"),
            R"({"id":"cmpl-j2","object":"text_completion","created":1700000001,"model":"gpt2",)"
            R"("choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}]})");
}

const ad_info sample_ad{"imp-1", "camp-7", "GPU Cloud", "Rent an H100", "https://gw.example/a/c/imp-1"};

TEST(openai_api, the_ad_is_its_own_content_chunk_with_the_documented_text) {
  EXPECT_EQ(ad_text(sample_ad), "\n\nSponsored: GPU Cloud \xE2\x80\x94 Rent an H100  https://gw.example/a/c/imp-1");
  EXPECT_EQ(ad_chunk_json(chat_meta, sample_ad, false),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{"content":"\n\nSponsored: GPU Cloud )"
            "\xE2\x80\x94"
            R"( Rent an H100  https://gw.example/a/c/imp-1"},"logprobs":null,"finish_reason":null}]})");
  // After an empty answer the ad is the first chunk, and carries the role.
  EXPECT_NE(ad_chunk_json(chat_meta, sample_ad, true).find(R"("delta":{"role":"assistant","content":"\n\nSponsored)"),
            std::string::npos);
}

TEST(openai_api, usage_chunk_and_extension_have_the_exact_shape) {
  const response_extension extension{"prov-3", events::quality_tier::standard, 1, sample_ad};
  EXPECT_EQ(
      usage_chunk_json(chat_meta, token_usage{12, 34}, extension),
      R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
      R"("choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46},)"
      R"("x_gpustream":{"provider_id":"prov-3","quality":"standard","failover":1,"ad":{"impression_id":"imp-1",)"
      R"("campaign_id":"camp-7","title":"GPU Cloud","text":"Rent an H100","url":"https://gw.example/a/c/imp-1"}}})");
  EXPECT_EQ(usage_chunk_json(completion_meta, token_usage{1, 2}),
            R"({"id":"cmpl-j2","object":"text_completion","created":1700000001,"model":"gpt2","choices":[],)"
            R"("usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}})");
  // Totals do not overflow 32 bits.
  EXPECT_NE(usage_chunk_json(chat_meta, token_usage{4294967295u, 1}).find("\"total_tokens\":4294967296"),
            std::string::npos);
}

TEST(openai_api, final_chunk_can_carry_usage_and_extension) {
  const response_extension extension{"prov-3", events::quality_tier::standard, 0, std::nullopt};
  EXPECT_EQ(final_chunk_json(chat_meta, "stop", token_usage{5, 6}, extension),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],)"
            R"("usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11},)"
            R"("x_gpustream":{"provider_id":"prov-3","quality":"standard","failover":0}})");
}

TEST(openai_api, a_backends_finish_reason_reaches_the_client_as_one_of_openais) {
  for (const char* openai : {"stop", "length", "tool_calls", "content_filter", "function_call"}) {
    EXPECT_EQ(client_finish_reason(openai), openai);
  }
  for (const char* other : {"max_tokens", "model_length"}) EXPECT_EQ(client_finish_reason(other), "length") << other;
  // Other servers' ends, none at all, and the platform's own in-band "error" are a plain stop.
  for (const char* other : {"", "eos", "eos_token", "stop_sequence", "end_turn", "error", "Stop", "abort"}) {
    EXPECT_EQ(client_finish_reason(other), "stop") << other;
  }
}

TEST(openai_api, the_in_band_stream_error_ends_the_choice_with_finish_reason_error) {
  const api_error error = make_api_error(503, "All providers for llama-3-8b failed.", "", "all_providers_failed");
  EXPECT_EQ(error_chunk_json(chat_meta, error, token_usage{0, 0}),
            R"({"id":"chatcmpl-j1","object":"chat.completion.chunk","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"error"}],)"
            R"("usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0},)"
            R"("error":{"message":"All providers for llama-3-8b failed.","type":"server_error","param":null,)"
            R"("code":"all_providers_failed"}})");
}

TEST(openai_api, whole_responses_have_openais_exact_shape) {
  const response_extension plain{"prov-3", events::quality_tier::low, 0, std::nullopt};
  EXPECT_EQ(response_json(chat_meta, "Hello!", "stop", token_usage{9, 2}, plain),
            R"({"id":"chatcmpl-j1","object":"chat.completion","created":1700000000,"model":"llama-3-8b",)"
            R"("choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"logprobs":null,)"
            R"("finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11},)"
            R"("x_gpustream":{"provider_id":"prov-3","quality":"low","failover":0}})");
  EXPECT_EQ(response_json(completion_meta, " upon a time", "length", token_usage{3, 4}, plain),
            R"({"id":"cmpl-j2","object":"text_completion","created":1700000001,"model":"gpt2",)"
            R"("choices":[{"index":0,"text":" upon a time","logprobs":null,"finish_reason":"length"}],)"
            R"("usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7},)"
            R"("x_gpustream":{"provider_id":"prov-3","quality":"low","failover":0}})");
}

TEST(openai_api, a_whole_chat_answer_carries_its_thinking_as_reasoning_content) {
  const response_extension plain{"prov-3", events::quality_tier::low, 0, std::nullopt};
  const json::object body = parsed(response_json(chat_meta, "42", "stop", token_usage{9, 5}, plain, "6 times 7"));
  const auto& message = body.at("choices").at(0).at("message").as_object();
  EXPECT_EQ(message.at("content").as_string(), "42");
  EXPECT_EQ(message.at("reasoning_content").as_string(), "6 times 7");
  EXPECT_FALSE(parsed(response_json(chat_meta, "42", "stop", token_usage{9, 1}, plain))
                   .at("choices").at(0).at("message").as_object().contains("reasoning_content"))
      << "none without thinking";
}

TEST(openai_api, a_whole_free_tier_response_appends_the_ad_after_the_models_text) {
  const response_extension with_ad{"prov-3", events::quality_tier::low, 0, sample_ad};
  const json::object body = parsed(response_json(chat_meta, "Hello!", "stop", token_usage{9, 2}, with_ad));
  EXPECT_EQ(body.at("choices").at(0).at("message").at("content").as_string(), "Hello!" + ad_text(sample_ad));
  EXPECT_EQ(body.at("x_gpustream").at("ad").at("url"), "https://gw.example/a/c/imp-1");
}

TEST(openai_api, models_list_has_the_exact_shape) {
  const std::vector<model_listing> models{{"llama-3-8b", 1700000000, 8192, 3, 100000, 250000},
                                          {"gpt2", 1700000005, 0, 1, 5, 5}};
  EXPECT_EQ(
      models_json(models),
      R"({"object":"list","data":[)"
      R"({"id":"llama-3-8b","object":"model","created":1700000000,"owned_by":"gpustream",)"
      R"("x_gpustream":{"context_length":8192,"providers_online":3,"price_per_mtok_min_micros":100000,)"
      R"("price_per_mtok_max_micros":250000}},)"
      R"({"id":"gpt2","object":"model","created":1700000005,"owned_by":"gpustream",)"
      R"("x_gpustream":{"context_length":null,"providers_online":1,"price_per_mtok_min_micros":5,"price_per_mtok_max_micros":5}}]})");
  EXPECT_EQ(models_json({}), R"({"object":"list","data":[]})");
  EXPECT_EQ(model_json(models[1]),
            R"({"id":"gpt2","object":"model","created":1700000005,"owned_by":"gpustream",)"
            R"("x_gpustream":{"context_length":null,"providers_online":1,"price_per_mtok_min_micros":5,"price_per_mtok_max_micros":5}})");
}

TEST(openai_api, sse_framing) {
  EXPECT_EQ(sse_event(R"({"a":1})"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(sse_done, "data: [DONE]\n\n");
}

TEST(openai_api, strings_are_escaped_so_any_text_stays_one_valid_sse_line) {
  // Quotes, backslashes, line breaks, tabs, control characters, a NUL, non-ASCII and an emoji.
  const std::string nasty =
      std::string("say \"hi\"\\ \n line2\r\t\x01\x1f") + '\0' + "end \xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x98\x80 </script>";
  const response_meta meta{request_kind::chat, "j\"1\n", "m\x02", 1};
  const std::string chunk = chunk_json(meta, nasty, false);
  EXPECT_EQ(chunk.find_first_of(std::string("\n\r\t\x01\x02\x1f") + '\0'), std::string::npos) << chunk;
  EXPECT_NE(chunk.find(R"(say \"hi\"\\ \n line2\r\t\u0001\u001f\u0000end )"), std::string::npos) << chunk;
  const json::object back = parsed(chunk);
  EXPECT_EQ(back.at("choices").at(0).at("delta").at("content"), json::string(nasty.data(), nasty.size()));
  EXPECT_EQ(back.at("id"), "chatcmpl-j\"1\n");
  EXPECT_EQ(back.at("model"), "m\x02");
  EXPECT_EQ(sse_event(chunk).size(), chunk.size() + 8);  // no line break inside, so sse_event accepts it

  const std::string error = error_body(make_api_error(400, nasty, "p\"", "c\n"));
  EXPECT_EQ(error.find('\n'), std::string::npos);
  EXPECT_EQ(parsed(error).at("error").at("message"), json::string(nasty.data(), nasty.size()));

  completion_request request;
  request.model = "m";
  request.messages = {{"user", nasty}};
  request.stop = {"\n\"\x01"};
  const json::object upstream = parsed(upstream_body(request, nasty));
  EXPECT_EQ(upstream.at("messages").at(0).at("content"), json::string(nasty.data(), nasty.size()));
  EXPECT_EQ(upstream.at("messages").at(1).at("content"), json::string(nasty.data(), nasty.size()));
  EXPECT_EQ(upstream.at("stop").at(0), "\n\"\x01");
}

TEST(openai_api, parsed_text_round_trips_through_escapes) {
  const auto request =
      chat(R"({"model":"m","messages":[{"role":"user","content":"a\"b\\c\nd\u0001\u00e9\ud83d\ude00"}]})");
  ASSERT_EQ(request.messages.size(), 1u);
  EXPECT_EQ(request.messages[0].content, "a\"b\\c\nd\x01\xC3\xA9\xF0\x9F\x98\x80");
}

}  // namespace
}  // namespace gpustream::gateway
