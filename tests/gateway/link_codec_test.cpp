// The provider link codec: every frame survives a round trip, every limit is enforced with a clear
// error, and garbage, truncated, oversize or randomly mutated input is refused without crashing.
#include "gateway/link_codec.hpp"

#include "base/text.hpp"
#include "gateway/link.capnp.h"

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace gpustream::gateway::link {
namespace {

events::gpu_info example_gpu() {
  return {.name = "NVIDIA GeForce RTX 4090",
          .memory_bytes = 25'757'220'864,
          .compute_capability_major = 8,
          .compute_capability_minor = 9};
}

events::model_offer example_model(std::string name) {
  return {.model_name = std::move(name),
          .context_length_tokens = 131'072,
          .quantisation = "Q4_K_M",
          .input_price_micros_per_mtok = 150'000,
          .output_price_micros_per_mtok = 600'000,
          .max_concurrency = 4};
}

hello example_hello() {
  return {.agent_version = "gpustream 0.1.0",
          .backend = events::backend_kind::openai,
          .backend_url = "http://127.0.0.1:1234/v1",
          .gpus = {example_gpu(), example_gpu()},
          .models = {example_model("llama-3.1-8b-instruct"), example_model("qwen2.5-7b")},
          .max_concurrency = 8};
}

/// One example of every frame type, in the variant's order.
std::vector<frame> every_frame() {
  return {
      example_hello(),
      heartbeat{.active_jobs = 3,
                .queued_jobs = 1,
                .load_percent = 75,
                .health_percent = 99,
                .tokens_per_second_milli = 123'456'789,
                .draining = true},
      delta{.job_id = "job-42", .text = "Grüße, 世界 🙂", .attempt = 2, .reasoning = true},
      done{.job_id = "job-42",
           .finish_reason = "stop",
           .completion_tokens_counted = 64,
           .prompt_tokens_reported = 12,
           .completion_tokens_reported = 64,
           .ttft_us = 8'500,
           .total_us = -1,
           .attempt = 2},
      job_error{.job_id = "job-43",
                .tokens_so_far = 7,
                .message = "backend answered 503",
                .upstream_fault = true,
                .attempt = 3},
      welcome{.provider_id = "prov-1",
              .heartbeat_interval_ms = 5'000,
              .delta_batches = true,
              .reasoning_deltas = true,
              .model_updates = true},
      offer{.job_id = "job-44",
            .kind = job_kind::completion,
            .request_json = R"({"model":"m","prompt":"hi","stream":true})",
            .attempt = 4},
      cancel{.job_id = "job-44"},
      deltas{.items = {delta{.job_id = "job-42", .text = "Grüße", .attempt = 1}, delta{.job_id = "job-45", .text = ""},
                       delta{.job_id = "job-43", .text = "hmm", .attempt = 3, .reasoning = true},
                       delta{.job_id = "job-42", .text = ", 世界 🙂"}}},
      advertise{.models = {example_model("qwen2.5-7b"), example_model("mistral-7b")}},
  };
}

template <class T>
T with_job_id(std::string id) {
  T f;
  f.job_id = std::move(id);
  return f;
}

frame round_trip(const frame& f, const codec_limits& limits = {}) {
  const auto bytes = encode(f);
  auto decoded = decode(bytes, limits);
  if (!decoded) {
    ADD_FAILURE() << frame_name(f) << ": " << decoded.error().message;
    return f;
  }
  return *decoded;
}

decode_error decode_failure(const frame& f, const codec_limits& limits = {}) {
  const auto bytes = encode(f);
  auto decoded = decode(bytes, limits);
  if (decoded) {
    ADD_FAILURE() << frame_name(f) << " decoded although it should not";
    return {};
  }
  return decoded.error();
}

TEST(link_codec, every_frame_round_trips) {
  const auto frames = every_frame();
  ASSERT_EQ(frames.size(), std::variant_size_v<frame>);
  for (std::size_t i = 0; i < frames.size(); ++i) {
    ASSERT_EQ(frames[i].index(), i) << "every_frame() must list the frames in the variant's order";
    EXPECT_EQ(round_trip(frames[i]), frames[i]) << frame_name(frames[i]);
  }
}

TEST(link_codec, a_job_error_says_which_of_three_causes_it_had) {
  for (const auto& [upstream_fault, request_rejected] :
       {std::pair{true, false}, std::pair{false, true}, std::pair{false, false}}) {
    const frame f = job_error{.job_id = "job-43", .tokens_so_far = 0, .message = "backend http_status 400",
                              .upstream_fault = upstream_fault, .attempt = 1, .request_rejected = request_rejected};
    EXPECT_EQ(round_trip(f), f) << upstream_fault << request_rejected;
  }
}

TEST(link_codec, empty_and_default_frames_round_trip) {
  for (const frame& f : {frame{hello{}}, frame{heartbeat{}}, frame{welcome{}}, frame{advertise{}}}) {
    EXPECT_EQ(round_trip(f), f) << frame_name(f);
  }
}

TEST(link_codec, frame_names_are_the_wire_names) {
  EXPECT_EQ(frame_name(frame{job_error{}}), "job_error");
  EXPECT_EQ(frame_name(frame{cancel{}}), "cancel");
}

TEST(link_codec, unaligned_input_decodes) {
  for (std::size_t text_bytes : {10u, 20'000u}) {  // below and above the stack copy's size
    const frame f = delta{.job_id = "j", .text = std::string(text_bytes, 'x')};
    const auto bytes = encode(f);
    std::vector<std::uint8_t> shifted(bytes.size() + 1);
    std::copy(bytes.begin(), bytes.end(), shifted.begin() + 1);
    auto decoded = decode(std::span(shifted).subspan(1), {});
    ASSERT_TRUE(decoded) << decoded.error().message;
    EXPECT_EQ(*decoded, f);
  }
}

TEST(link_codec, largest_allowed_fields_round_trip) {
  const codec_limits limits;
  frame big_delta = delta{.job_id = std::string(limits.job_id_bytes_max, 'j'),
                          .text = std::string(limits.text_bytes_max, 'a')};
  EXPECT_EQ(round_trip(big_delta), big_delta);
  hello full = example_hello();
  full.gpus.assign(limits.gpus_max, example_gpu());
  full.models.clear();
  for (std::size_t i = 0; i < limits.models_max; ++i) {
    full.models.push_back(example_model(std::string(limits.name_bytes_max - 4, 'm') +
                                        std::to_string(1000 + i)));
  }
  EXPECT_EQ(round_trip(full), frame{full});
}

// --- limits -----------------------------------------------------------------------------------

TEST(link_codec, oversize_frame_is_too_large_and_maps_to_1009) {
  codec_limits limits;
  limits.frame_bytes_max = 256;
  const auto error = decode_failure(delta{.job_id = "j", .text = std::string(300, 'a')}, limits);
  EXPECT_EQ(error.code, decode_errc::too_large);
  EXPECT_NE(error.message.find("256"), std::string::npos) << error.message;
  EXPECT_EQ(websocket_close_code(error.code), 1009);
}

TEST(link_codec, a_frame_whose_pointers_share_one_text_cannot_decode_to_many_times_its_size) {
  // A crafted `deltas` frame: the first item's text is 60 KiB, every other item's text pointer is
  // patched to point at that same text. Cap'n Proto allows it (the pointers are valid); a decoder
  // bounded only by an absolute traversal limit would turn these ~80 KiB into ~24 MiB of strings.
  constexpr unsigned items = 400;
  constexpr std::size_t text_bytes = 60 * 1024;
  capnp::MallocMessageBuilder message(1u << 14);  // one segment: pointers stay within it
  auto list = message.initRoot<schema::Frame>().initDeltas().initItems(items);
  const std::string text(text_bytes, 'a');
  for (unsigned i = 0; i < items; ++i) {
    list[i].setJobId("j");
    list[i].setText(i == 0 ? text : "");
  }
  ASSERT_EQ(message.getSegmentsForOutput().size(), 1u);
  auto words = capnp::messageToFlatArray(message);
  const auto as_bytes = [&words] {
    const auto raw = words.asBytes();
    return std::vector<std::uint8_t>(raw.begin(), raw.end());
  };
  ASSERT_TRUE(decode(as_bytes(), {})) << "the frame before patching decodes";

  // Word 0 is the segment table; the segment's words follow.
  auto* segment = reinterpret_cast<unsigned char*>(words.begin() + 1);
  const std::size_t segment_words = words.size() - 1;
  const auto* text_at = reinterpret_cast<const capnp::word*>(list[0].getText().begin());
  const auto* segment_start = message.getSegmentsForOutput()[0].begin();
  const auto text_word = static_cast<std::int64_t>(text_at - segment_start);
  std::size_t patched = 0;
  for (std::size_t index = 0; index < segment_words; ++index) {
    std::uint64_t word = 0;
    std::memcpy(&word, segment + index * sizeof word, sizeof word);
    // A list pointer (kind 1) of bytes (element size 2) holding one element: an empty text's NUL.
    const bool empty_text = (word & 3u) == 1 && ((word >> 32) & 7u) == 2 && (word >> 35) == 1;
    if (!empty_text) continue;
    const std::int64_t offset = text_word - static_cast<std::int64_t>(index + 1);
    const std::uint64_t shared = 1u | (static_cast<std::uint64_t>(offset & 0x3fffffff) << 2) |
                                 (std::uint64_t{2} << 32) |
                                 (static_cast<std::uint64_t>(text_bytes + 1) << 35);
    std::memcpy(segment + index * sizeof shared, &shared, sizeof shared);
    ++patched;
  }
  ASSERT_EQ(patched, items - 1);
  const auto bytes = as_bytes();
  ASSERT_LT(bytes.size(), 100u * 1024);

  const auto decoded = decode(bytes, {});
  ASSERT_FALSE(decoded) << "decoded " << std::get<deltas>(*decoded).items.size() << " deltas of "
                        << std::get<deltas>(*decoded).items.back().text.size() << " bytes from "
                        << bytes.size() << " bytes";
  EXPECT_EQ(decoded.error().code, decode_errc::malformed);
  EXPECT_NE(decoded.error().message.find("traversal"), std::string::npos) << decoded.error().message;
  EXPECT_EQ(websocket_close_code(decoded.error().code), 1002);
}

TEST(link_codec, job_ids_are_bounded_and_non_empty) {
  const codec_limits limits;
  const std::string long_id(limits.job_id_bytes_max + 1, 'j');
  for (const frame& f : {frame{with_job_id<delta>(long_id)}, frame{with_job_id<done>(long_id)},
                         frame{with_job_id<job_error>(long_id)}, frame{with_job_id<offer>(long_id)},
                         frame{with_job_id<cancel>(long_id)}}) {
    const auto error = decode_failure(f);
    EXPECT_EQ(error.code, decode_errc::over_limit) << frame_name(f);
    EXPECT_NE(error.message.find("job_id"), std::string::npos) << error.message;
    EXPECT_NE(error.message.find("129 bytes"), std::string::npos) << error.message;
    EXPECT_EQ(websocket_close_code(error.code), 1008);
  }
  for (const frame& f : {frame{delta{}}, frame{done{}}, frame{job_error{}}, frame{offer{}},
                         frame{cancel{}}}) {
    const auto error = decode_failure(f);
    EXPECT_EQ(error.code, decode_errc::invalid_field) << frame_name(f);
    EXPECT_NE(error.message.find("empty job id"), std::string::npos) << error.message;
  }
}

TEST(link_codec, delta_text_is_bounded) {
  const codec_limits limits;
  const auto error =
      decode_failure(delta{.job_id = "j", .text = std::string(limits.text_bytes_max + 1, 'a')});
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("delta.text"), std::string::npos) << error.message;
}

TEST(link_codec, delta_batches_are_bounded_non_empty_and_checked_item_by_item) {
  codec_limits limits;
  limits.batch_deltas_max = 3;
  deltas batch;
  for (int i = 0; i < 3; ++i) batch.items.push_back(delta{.job_id = "j" + std::to_string(i), .text = "x"});
  EXPECT_EQ(round_trip(batch, limits), frame{batch});

  batch.items.push_back(delta{.job_id = "j3", .text = "x"});
  auto error = decode_failure(batch, limits);
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("4 deltas, more than the 3 allowed"), std::string::npos) << error.message;

  error = decode_failure(deltas{}, limits);
  EXPECT_EQ(error.code, decode_errc::invalid_field);
  EXPECT_NE(error.message.find("deltas.items: empty"), std::string::npos) << error.message;

  const deltas bad_item{.items = {delta{.job_id = "j", .text = "ok"}, delta{.job_id = "", .text = "x"}}};
  error = decode_failure(bad_item, limits);
  EXPECT_EQ(error.code, decode_errc::invalid_field);
  const deltas long_item{.items = {delta{.job_id = "j", .text = std::string(limits.text_bytes_max + 1, 'a')}}};
  error = decode_failure(long_item, limits);
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("delta.text"), std::string::npos) << error.message;
}

TEST(link_codec, request_json_is_bounded) {
  codec_limits limits;
  limits.request_json_bytes_max = 100;
  const auto error = decode_failure(offer{.job_id = "j", .request_json = std::string(101, ' ')}, limits);
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("offer.request_json"), std::string::npos) << error.message;
  // The default admits a body just under the frame limit.
  const frame big = offer{.job_id = "j", .request_json = std::string((1 << 20) - 1024, ' ')};
  EXPECT_EQ(round_trip(big), big);
}

TEST(link_codec, hello_lists_are_bounded) {
  const codec_limits limits;
  hello too_many_models = example_hello();
  too_many_models.models.assign(limits.models_max + 1, example_model("m"));
  auto error = decode_failure(too_many_models);
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("65 models"), std::string::npos) << error.message;

  hello too_many_gpus = example_hello();
  too_many_gpus.gpus.assign(limits.gpus_max + 1, example_gpu());
  error = decode_failure(too_many_gpus);
  EXPECT_EQ(error.code, decode_errc::over_limit);
  EXPECT_NE(error.message.find("17 GPUs"), std::string::npos) << error.message;
}

TEST(link_codec, names_and_urls_are_bounded) {
  const codec_limits limits;
  const std::string long_name(limits.name_bytes_max + 1, 'n');
  std::vector<std::pair<frame, std::string>> cases;
  hello h = example_hello();
  h.agent_version = long_name;
  cases.emplace_back(h, "hello.agent_version");
  h = example_hello();
  h.gpus[1].name = long_name;
  cases.emplace_back(h, "hello.gpus.name");
  h = example_hello();
  h.models[1].model_name = long_name;
  cases.emplace_back(h, "hello.models.model_name");
  h = example_hello();
  h.models[0].quantisation = long_name;
  cases.emplace_back(h, "hello.models.quantisation");
  h = example_hello();
  h.backend_url = std::string(limits.url_bytes_max + 1, 'u');
  cases.emplace_back(h, "hello.backend_url");
  cases.emplace_back(welcome{.provider_id = long_name}, "welcome.provider_id");
  cases.emplace_back(advertise{.models = {example_model(long_name)}}, "advertise.models.model_name");
  cases.emplace_back(advertise{.models = std::vector<events::model_offer>(limits.models_max + 1, example_model("m"))},
                     "advertise.models: 65 models");
  cases.emplace_back(done{.job_id = "j", .finish_reason = long_name}, "done.finish_reason");
  cases.emplace_back(
      job_error{.job_id = "j", .message = std::string(limits.message_bytes_max + 1, 'e')},
      "job_error.message");
  for (const auto& [f, field] : cases) {
    const auto error = decode_failure(f);
    EXPECT_EQ(error.code, decode_errc::over_limit) << field;
    EXPECT_NE(error.message.find(field), std::string::npos) << error.message;
  }
}

TEST(link_codec, invalid_fields_are_refused) {
  const std::string bad_utf8_samples[] = {"\xff", "a\xc3", "\xc0\xaf", "\xed\xa0\x80",
                                          "\xf4\x90\x80\x80", "\xe0\x80\x80"};
  for (const auto& bad : bad_utf8_samples) {
    const auto error = decode_failure(delta{.job_id = "j", .text = "ok " + bad});
    EXPECT_EQ(error.code, decode_errc::invalid_field);
    EXPECT_NE(error.message.find("UTF-8"), std::string::npos) << error.message;
  }
  hello unknown_backend = example_hello();
  unknown_backend.backend = static_cast<events::backend_kind>(9);
  auto error = decode_failure(unknown_backend);
  EXPECT_EQ(error.code, decode_errc::invalid_field);
  EXPECT_NE(error.message.find("backend"), std::string::npos) << error.message;

  error = decode_failure(offer{.job_id = "j", .kind = static_cast<job_kind>(5), .request_json = "{}"});
  EXPECT_EQ(error.code, decode_errc::invalid_field);
  EXPECT_NE(error.message.find("offer.kind"), std::string::npos) << error.message;

  hello unnamed_model = example_hello();
  unnamed_model.models[0].model_name.clear();
  error = decode_failure(unnamed_model);
  EXPECT_EQ(error.code, decode_errc::invalid_field);
}

TEST(link_codec, names_with_control_characters_are_refused) {
  // The coordinator logs and lists them: a line break would forge a log line, or a model id.
  std::vector<std::pair<frame, std::string>> cases;
  for (const std::string& bad : std::vector<std::string>{"m\n2026-12-07 info link: provider=p1 online", "m\r",
                                                          "m\x1b[2J", "m\x7f", std::string("m\0x", 3)}) {
    hello h = example_hello();
    h.models[1].model_name = bad;
    cases.emplace_back(h, "hello.models.model_name");
    h = example_hello();
    h.gpus[0].name = bad;
    cases.emplace_back(h, "hello.gpus.name");
    h = example_hello();
    h.agent_version = bad;
    cases.emplace_back(h, "hello.agent_version");
    cases.emplace_back(advertise{.models = {example_model(bad)}}, "advertise.models.model_name");
    cases.emplace_back(done{.job_id = bad, .finish_reason = "stop"}, "done.job_id");
  }
  for (const auto& [f, field] : cases) {
    const auto error = decode_failure(f);
    EXPECT_EQ(error.code, decode_errc::invalid_field) << field;
    EXPECT_NE(error.message.find(field + ": holds a control character"), std::string::npos) << error.message;
  }
  hello fine = example_hello();
  fine.models[0].model_name = "qwen2.5:7b-instruct \u00e9\u4e2d";  // spaces and non-ASCII letters are names
  EXPECT_TRUE(validate(fine, {}));
}

TEST(link_codec, validate_checks_frames_built_in_memory) {
  EXPECT_TRUE(validate(every_frame()[2], {}));
  const auto result = validate(delta{.job_id = "j", .text = "\xff"}, {});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, decode_errc::invalid_field);
}

// --- garbage ----------------------------------------------------------------------------------

TEST(link_codec, unknown_frame_type_is_refused) {
  auto bytes = encode(cancel{.job_id = "j"});
  // Single segment: 8 bytes of segment table, the root pointer, then Frame's data word whose first
  // 16 bits are the union tag (cancel = 7). Check the layout before patching it.
  ASSERT_GE(bytes.size(), 24u);
  ASSERT_EQ(bytes[16], 7);
  ASSERT_EQ(bytes[17], 0);
  bytes[16] = 42;
  const auto decoded = decode(bytes, {});
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, decode_errc::unknown_frame);
  EXPECT_NE(decoded.error().message.find("42"), std::string::npos) << decoded.error().message;
  EXPECT_EQ(websocket_close_code(decoded.error().code), 1002);
}

TEST(link_codec, garbage_is_malformed) {
  const std::vector<std::vector<std::uint8_t>> samples = {
      {},
      {1, 2, 3},
      std::vector<std::uint8_t>(8, 0),
      std::vector<std::uint8_t>(16, 0xff),
      std::vector<std::uint8_t>(64, 0xab),
  };
  for (const auto& sample : samples) {
    const auto decoded = decode(sample, {});
    ASSERT_FALSE(decoded) << sample.size() << " bytes";
    EXPECT_EQ(decoded.error().code, decode_errc::malformed) << decoded.error().message;
    EXPECT_FALSE(decoded.error().message.empty());
  }
}

TEST(link_codec, every_truncation_and_trailing_bytes_are_refused) {
  for (const frame& f : every_frame()) {
    const auto bytes = encode(f);
    for (std::size_t size = 0; size < bytes.size(); ++size) {
      const auto decoded = decode(std::span(bytes).first(size), {});
      ASSERT_FALSE(decoded) << frame_name(f) << " truncated to " << size << " bytes";
      EXPECT_EQ(decoded.error().code, decode_errc::malformed);
    }
    auto longer = bytes;
    longer.resize(bytes.size() + 8, 0);
    const auto decoded = decode(longer, {});
    ASSERT_FALSE(decoded) << frame_name(f) << " with a trailing word";
    EXPECT_NE(decoded.error().message.find("after the frame"), std::string::npos);
  }
}

/// Seeded fuzzing: random bytes and random mutations of valid frames never crash the decoder, and
/// whatever it accepts is valid and survives another round trip unchanged.
TEST(link_codec, random_bytes_and_mutations_never_crash) {
  std::uint64_t seed = std::random_device{}();
  if (const char* fixed = std::getenv("GPUSTREAM_TEST_SEED")) seed = std::strtoull(fixed, nullptr, 10);
  std::printf("link_codec fuzz seed: %llu (set GPUSTREAM_TEST_SEED to replay)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  const auto frames = every_frame();
  std::size_t accepted = 0;
  for (int round = 0; round < 20'000; ++round) {
    std::vector<std::uint8_t> bytes;
    if (round % 4 == 0) {
      bytes.resize(8 * (rng() % 32));
      for (auto& b : bytes) b = static_cast<std::uint8_t>(rng());
    } else {
      bytes = encode(frames[rng() % frames.size()]);
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int i = 0; i < flips; ++i) bytes[rng() % bytes.size()] = static_cast<std::uint8_t>(rng());
    }
    const auto decoded = decode(bytes, {});
    if (!decoded) {
      ASSERT_FALSE(decoded.error().message.empty()) << "seed " << seed << " round " << round;
      continue;
    }
    ++accepted;
    ASSERT_TRUE(validate(*decoded, {})) << "seed " << seed << " round " << round;
    const auto again = decode(encode(*decoded), {});
    ASSERT_TRUE(again) << "seed " << seed << " round " << round;
    ASSERT_EQ(*again, *decoded) << "seed " << seed << " round " << round;
  }
  std::printf("link_codec fuzz: %zu of 20000 inputs decoded\n", accepted);
}

}  // namespace
}  // namespace gpustream::gateway::link

namespace gpustream::gateway::link {
namespace {

TEST(link_codec, utf8_repaired_replaces_each_byte_that_starts_no_sequence_and_keeps_the_rest) {
  EXPECT_EQ(utf8_repaired("plain ascii"), "plain ascii");
  EXPECT_EQ(utf8_repaired("caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"), "caf\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80");
  EXPECT_EQ(utf8_repaired("caf\xE9!"), "caf\xEF\xBF\xBD!") << "Latin-1";
  EXPECT_EQ(utf8_repaired("cut \xC3"), "cut \xEF\xBF\xBD") << "a sequence cut at the end";
  EXPECT_EQ(utf8_repaired("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD") << "a surrogate";
  EXPECT_EQ(utf8_repaired("\xC0\xAF"), "\xEF\xBF\xBD\xEF\xBF\xBD") << "overlong";
  // What comes out passes the frame's own check.
  job_error e{.job_id = "j", .tokens_so_far = 0, .message = utf8_repaired("caf\xE9 \xC3"), .upstream_fault = true, .attempt = 1};
  EXPECT_TRUE(validate(frame{e}, codec_limits{}).has_value());
}

}  // namespace
}  // namespace gpustream::gateway::link
