#include "gateway/link_codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <array>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "base/ensure.hpp"
#include "base/text.hpp"
#include "events/capnp_values.hpp"
#include "gateway/link.capnp.h"

namespace gpustream::gateway::link {

namespace {

// -------------------------------------------------------------------------------------------------
// Text and enums.

using events::capnp_values::to_std;
using events::capnp_values::to_wire;

decode_error failure(decode_errc code, std::string message) { return {code, std::move(message)}; }

decode_error too_many_deltas(std::size_t count, const codec_limits& limits) {
  return failure(decode_errc::over_limit, "deltas.items: " + std::to_string(count) + " deltas, more than the " +
                                              std::to_string(limits.batch_deltas_max) + " allowed");
}

schema::BackendKind to_wire(events::backend_kind kind) {
  static_assert(static_cast<unsigned>(schema::BackendKind::BUILTIN) ==
                static_cast<unsigned>(events::backend_kind::builtin));
  return static_cast<schema::BackendKind>(static_cast<std::uint16_t>(kind));
}

schema::JobKind to_wire(job_kind kind) {
  static_assert(static_cast<unsigned>(schema::JobKind::COMPLETION) ==
                static_cast<unsigned>(job_kind::completion));
  return static_cast<schema::JobKind>(static_cast<std::uint16_t>(kind));
}

// -------------------------------------------------------------------------------------------------
// Writing.

void write(schema::GpuInfo::Builder b, const events::gpu_info& v) { events::capnp_values::write_gpu_info(b, v); }
void write(schema::ModelOffer::Builder b, const events::model_offer& v) {
  events::capnp_values::write_model_offer(b, v);
}

unsigned list_size(std::size_t size) {
  GPUSTREAM_ENSURE(size < (std::size_t{1} << 29));  // capnp's limit on list elements
  return static_cast<unsigned>(size);
}

void write(schema::Frame::Builder root, const hello& f) {
  auto b = root.initHello();
  b.setAgentVersion(to_wire(f.agent_version));
  b.setBackend(to_wire(f.backend));
  b.setBackendUrl(to_wire(f.backend_url));
  auto gpus = b.initGpus(list_size(f.gpus.size()));
  for (unsigned i = 0; i < f.gpus.size(); ++i) write(gpus[i], f.gpus[i]);
  auto models = b.initModels(list_size(f.models.size()));
  for (unsigned i = 0; i < f.models.size(); ++i) write(models[i], f.models[i]);
  b.setMaxConcurrency(f.max_concurrency);
}

void write(schema::Frame::Builder root, const heartbeat& f) {
  auto b = root.initHeartbeat();
  b.setActiveJobs(f.active_jobs);
  b.setQueuedJobs(f.queued_jobs);
  b.setLoadPercent(f.load_percent);
  b.setHealthPercent(f.health_percent);
  b.setTokensPerSecondMilli(f.tokens_per_second_milli);
  b.setDraining(f.draining);
}

void write(schema::Delta::Builder b, const delta& f) {
  b.setJobId(to_wire(f.job_id));
  b.setText(to_wire(f.text));
  b.setAttempt(f.attempt);
  b.setReasoning(f.reasoning);
}

void write(schema::Frame::Builder root, const delta& f) { write(root.initDelta(), f); }

void write(schema::Frame::Builder root, const deltas& f) {
  auto items = root.initDeltas().initItems(static_cast<unsigned>(f.items.size()));
  for (unsigned i = 0; i < f.items.size(); ++i) write(items[i], f.items[i]);
}

void write(schema::Frame::Builder root, const done& f) {
  auto b = root.initDone();
  b.setJobId(to_wire(f.job_id));
  b.setFinishReason(to_wire(f.finish_reason));
  b.setCompletionTokensCounted(f.completion_tokens_counted);
  b.setPromptTokensReported(f.prompt_tokens_reported);
  b.setCompletionTokensReported(f.completion_tokens_reported);
  b.setTtftUs(f.ttft_us);
  b.setTotalUs(f.total_us);
  b.setAttempt(f.attempt);
}

void write(schema::Frame::Builder root, const job_error& f) {
  auto b = root.initJobError();
  b.setJobId(to_wire(f.job_id));
  b.setTokensSoFar(f.tokens_so_far);
  b.setMessage(to_wire(f.message));
  b.setUpstreamFault(f.upstream_fault);
  b.setAttempt(f.attempt);
  b.setRequestRejected(f.request_rejected);
}

void write(schema::Frame::Builder root, const welcome& f) {
  auto b = root.initWelcome();
  b.setProviderId(to_wire(f.provider_id));
  b.setHeartbeatIntervalMs(f.heartbeat_interval_ms);
  b.setDeltaBatches(f.delta_batches);
  b.setReasoningDeltas(f.reasoning_deltas);
  b.setModelUpdates(f.model_updates);
}

void write(schema::Frame::Builder root, const offer& f) {
  auto b = root.initOffer();
  b.setJobId(to_wire(f.job_id));
  b.setKind(to_wire(f.kind));
  b.setRequestJson(to_wire(f.request_json));
  b.setAttempt(f.attempt);
}

void write(schema::Frame::Builder root, const cancel& f) { root.initCancel().setJobId(to_wire(f.job_id)); }

void write(schema::Frame::Builder root, const advertise& f) {
  auto models = root.initAdvertise().initModels(list_size(f.models.size()));
  for (unsigned i = 0; i < f.models.size(); ++i) write(models[i], f.models[i]);
}

// -------------------------------------------------------------------------------------------------
// Reading. Structure errors throw kj::Exception (caught in decode_words); list sizes and enumerants
// are checked here, before anything big is copied; string checks are validate()'s.

using read_result = expected<frame, decode_error>;

events::gpu_info read(schema::GpuInfo::Reader r) { return events::capnp_values::read_gpu_info(r); }
events::model_offer read(schema::ModelOffer::Reader r) { return events::capnp_values::read_model_offer(r); }

decode_error too_many_models(std::string_view field, std::size_t count, const codec_limits& limits) {
  return failure(decode_errc::over_limit, std::string(field) + ": " + std::to_string(count) + " models, more than the " +
                                              std::to_string(limits.models_max) + " allowed");
}

read_result read_hello(schema::Hello::Reader r, const codec_limits& limits) {
  const auto gpus = r.getGpus();
  if (gpus.size() > limits.gpus_max) {
    return unexpected{failure(decode_errc::over_limit,
                              "hello.gpus: " + std::to_string(gpus.size()) +
                                  " GPUs, more than the " + std::to_string(limits.gpus_max) +
                                  " allowed")};
  }
  const auto models = r.getModels();
  if (models.size() > limits.models_max) return unexpected{too_many_models("hello.models", models.size(), limits)};
  const auto backend = static_cast<std::uint16_t>(r.getBackend());
  if (backend > static_cast<std::uint16_t>(events::backend_kind::builtin)) {
    return unexpected{failure(decode_errc::invalid_field,
                              "hello.backend: unknown backend kind " + std::to_string(backend))};
  }
  hello f{.agent_version = to_std(r.getAgentVersion()),
          .backend = static_cast<events::backend_kind>(backend),
          .backend_url = to_std(r.getBackendUrl()),
          .gpus = {},
          .models = {},
          .max_concurrency = r.getMaxConcurrency()};
  f.gpus.reserve(gpus.size());
  for (auto gpu : gpus) f.gpus.push_back(read(gpu));
  f.models.reserve(models.size());
  for (auto model : models) f.models.push_back(read(model));
  return frame{std::move(f)};
}

delta read_delta(schema::Delta::Reader r) {
  return delta{.job_id = to_std(r.getJobId()),
               .text = to_std(r.getText()),
               .attempt = r.getAttempt(),
               .reasoning = r.getReasoning()};
}

read_result read_deltas(schema::Deltas::Reader r, const codec_limits& limits) {
  const auto items = r.getItems();
  if (items.size() > limits.batch_deltas_max) return unexpected{too_many_deltas(items.size(), limits)};
  deltas f;
  f.items.reserve(items.size());
  for (const auto item : items) f.items.push_back(read_delta(item));
  return frame{std::move(f)};
}

read_result read_advertise(schema::Advertise::Reader r, const codec_limits& limits) {
  const auto models = r.getModels();
  if (models.size() > limits.models_max) return unexpected{too_many_models("advertise.models", models.size(), limits)};
  advertise f;
  f.models.reserve(models.size());
  for (auto model : models) f.models.push_back(read(model));
  return frame{std::move(f)};
}

read_result read_offer(schema::Offer::Reader r) {
  const auto kind = static_cast<std::uint16_t>(r.getKind());
  if (kind > static_cast<std::uint16_t>(job_kind::completion)) {
    return unexpected{
        failure(decode_errc::invalid_field, "offer.kind: unknown job kind " + std::to_string(kind))};
  }
  return frame{offer{.job_id = to_std(r.getJobId()),
                     .kind = static_cast<job_kind>(kind),
                     .request_json = to_std(r.getRequestJson()),
                     .attempt = r.getAttempt()}};
}

read_result read_root(schema::Frame::Reader root, const codec_limits& limits) {
  switch (root.which()) {
    case schema::Frame::HELLO:
      return read_hello(root.getHello(), limits);
    case schema::Frame::HEARTBEAT: {
      const auto r = root.getHeartbeat();
      return frame{heartbeat{.active_jobs = r.getActiveJobs(),
                             .queued_jobs = r.getQueuedJobs(),
                             .load_percent = r.getLoadPercent(),
                             .health_percent = r.getHealthPercent(),
                             .tokens_per_second_milli = r.getTokensPerSecondMilli(),
                             .draining = r.getDraining()}};
    }
    case schema::Frame::DELTA:
      return frame{read_delta(root.getDelta())};
    case schema::Frame::DELTAS:
      return read_deltas(root.getDeltas(), limits);
    case schema::Frame::DONE: {
      const auto r = root.getDone();
      return frame{done{.job_id = to_std(r.getJobId()),
                        .finish_reason = to_std(r.getFinishReason()),
                        .completion_tokens_counted = r.getCompletionTokensCounted(),
                        .prompt_tokens_reported = r.getPromptTokensReported(),
                        .completion_tokens_reported = r.getCompletionTokensReported(),
                        .ttft_us = r.getTtftUs(),
                        .total_us = r.getTotalUs(),
                        .attempt = r.getAttempt()}};
    }
    case schema::Frame::JOB_ERROR: {
      const auto r = root.getJobError();
      return frame{job_error{.job_id = to_std(r.getJobId()),
                             .tokens_so_far = r.getTokensSoFar(),
                             .message = to_std(r.getMessage()),
                             .upstream_fault = r.getUpstreamFault(),
                             .attempt = r.getAttempt(),
                             .request_rejected = r.getRequestRejected()}};
    }
    case schema::Frame::WELCOME: {
      const auto r = root.getWelcome();
      return frame{welcome{.provider_id = to_std(r.getProviderId()),
                           .heartbeat_interval_ms = r.getHeartbeatIntervalMs(),
                           .delta_batches = r.getDeltaBatches(),
                           .reasoning_deltas = r.getReasoningDeltas(),
                           .model_updates = r.getModelUpdates()}};
    }
    case schema::Frame::OFFER:
      return read_offer(root.getOffer());
    case schema::Frame::CANCEL:
      return frame{cancel{.job_id = to_std(root.getCancel().getJobId())}};
    case schema::Frame::ADVERTISE:
      return read_advertise(root.getAdvertise(), limits);
  }
  return unexpected{failure(
      decode_errc::unknown_frame,
      "unknown frame type " + std::to_string(static_cast<unsigned>(root.which())) +
          " (this build knows 0 to " + std::to_string(std::variant_size_v<frame> - 1) +
          "); the peer probably runs a newer gpustream")};
}

read_result decode_words(kj::ArrayPtr<const capnp::word> words, const codec_limits& limits) {
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = limits.traversal_per_frame_word * words.size();
    capnp::FlatArrayMessageReader reader(words, options);
    if (reader.getEnd() != words.end()) {
      const auto trailing = static_cast<std::size_t>(words.end() - reader.getEnd());
      return unexpected{failure(decode_errc::malformed,
                                std::to_string(trailing) + " words after the frame's message")};
    }
    return read_root(reader.getRoot<schema::Frame>(), limits);
  } catch (const kj::Exception& problem) {
    return unexpected{failure(decode_errc::malformed,
                              std::string("not a valid frame: ") + problem.getDescription().cStr())};
  }
}

// -------------------------------------------------------------------------------------------------
// Field checks.

/// Checks one string field: length, then UTF-8. `field` names it for the message.
expected<void, decode_error> check_text(std::string_view field, const std::string& value,
                                        std::size_t bytes_max) {
  if (value.size() > bytes_max) {
    return unexpected{failure(decode_errc::over_limit,
                              std::string(field) + ": " + std::to_string(value.size()) +
                                  " bytes, more than the " + std::to_string(bytes_max) +
                                  " allowed")};
  }
  if (!valid_utf8(value)) {
    return unexpected{failure(decode_errc::invalid_field, std::string(field) + ": not valid UTF-8")};
  }
  return {};
}

/// check_text, and no control characters (valid_name): what the coordinator logs and lists.
expected<void, decode_error> check_name(std::string_view field, const std::string& value, std::size_t bytes_max) {
  if (auto r = check_text(field, value, bytes_max); !r) return r;
  if (has_control_character(value)) {
    return unexpected{failure(decode_errc::invalid_field, std::string(field) + ": holds a control character")};
  }
  return {};
}

expected<void, decode_error> check_job_id(std::string_view field, const std::string& value,
                                          const codec_limits& limits) {
  if (value.empty()) {
    return unexpected{failure(decode_errc::invalid_field, std::string(field) + ": empty job id")};
  }
  return check_name(field, value, limits.job_id_bytes_max);
}

/// The first failing check of a list of them, or success.
template <class... Checks>
expected<void, decode_error> first_failure(Checks&&... checks) {
  expected<void, decode_error> result;
  // Short-circuits: later checks are not evaluated once one fails.
  (void)((result = checks(), result.has_value()) && ...);
  return result;
}

/// The names of offered models (`field`: "hello.models", "advertise.models").
expected<void, decode_error> check_models(std::string_view field, const std::vector<events::model_offer>& models,
                                          const codec_limits& limits) {
  const std::string name_field = std::string(field) + ".model_name";
  for (const auto& model : models) {
    if (auto r = check_name(name_field, model.model_name, limits.name_bytes_max); !r) return r;
    if (model.model_name.empty()) return unexpected{failure(decode_errc::invalid_field, name_field + ": empty")};
    if (auto r = check_name(std::string(field) + ".quantisation", model.quantisation, limits.name_bytes_max); !r) {
      return r;
    }
  }
  return {};
}

expected<void, decode_error> check(const hello& f, const codec_limits& limits) {
  if (f.gpus.size() > limits.gpus_max) {
    return unexpected{failure(decode_errc::over_limit,
                              "hello.gpus: " + std::to_string(f.gpus.size()) +
                                  " GPUs, more than the " + std::to_string(limits.gpus_max) +
                                  " allowed")};
  }
  if (f.models.size() > limits.models_max) return unexpected{too_many_models("hello.models", f.models.size(), limits)};
  if (auto r = check_name("hello.agent_version", f.agent_version, limits.name_bytes_max); !r) return r;
  if (auto r = check_name("hello.backend_url", f.backend_url, limits.url_bytes_max); !r) return r;
  for (const auto& gpu : f.gpus) {
    if (auto r = check_name("hello.gpus.name", gpu.name, limits.name_bytes_max); !r) return r;
  }
  return check_models("hello.models", f.models, limits);
}

expected<void, decode_error> check(const advertise& f, const codec_limits& limits) {
  if (f.models.size() > limits.models_max) {
    return unexpected{too_many_models("advertise.models", f.models.size(), limits)};
  }
  return check_models("advertise.models", f.models, limits);
}

expected<void, decode_error> check(const heartbeat&, const codec_limits&) { return {}; }

expected<void, decode_error> check(const delta& f, const codec_limits& limits) {
  return first_failure([&] { return check_job_id("delta.job_id", f.job_id, limits); },
                       [&] { return check_text("delta.text", f.text, limits.text_bytes_max); });
}

expected<void, decode_error> check(const deltas& f, const codec_limits& limits) {
  if (f.items.empty()) return unexpected{failure(decode_errc::invalid_field, "deltas.items: empty")};
  if (f.items.size() > limits.batch_deltas_max) return unexpected{too_many_deltas(f.items.size(), limits)};
  for (const auto& item : f.items) {
    if (auto r = check(item, limits); !r) return r;
  }
  return {};
}

expected<void, decode_error> check(const done& f, const codec_limits& limits) {
  return first_failure(
      [&] { return check_job_id("done.job_id", f.job_id, limits); },
      [&] { return check_name("done.finish_reason", f.finish_reason, limits.name_bytes_max); });
}

expected<void, decode_error> check(const job_error& f, const codec_limits& limits) {
  return first_failure(
      [&] { return check_job_id("job_error.job_id", f.job_id, limits); },
      [&] { return check_text("job_error.message", f.message, limits.message_bytes_max); });
}

expected<void, decode_error> check(const welcome& f, const codec_limits& limits) {
  return check_name("welcome.provider_id", f.provider_id, limits.name_bytes_max);
}

expected<void, decode_error> check(const offer& f, const codec_limits& limits) {
  return first_failure(
      [&] { return check_job_id("offer.job_id", f.job_id, limits); },
      [&] {
        return check_text("offer.request_json", f.request_json, limits.request_json_bytes_max);
      });
}

expected<void, decode_error> check(const cancel& f, const codec_limits& limits) {
  return check_job_id("cancel.job_id", f.job_id, limits);
}

/// Frames up to this many bytes are copied to an aligned stack buffer when unaligned.
constexpr std::size_t unaligned_stack_bytes_max = 4096;

/// First segment size of the encoder: most frames (deltas, heartbeats) fit in one allocation.
constexpr unsigned encode_first_segment_words = 128;

}  // namespace

std::string_view frame_name(const frame& f) noexcept {
  static constexpr std::array<std::string_view, std::variant_size_v<frame>> names = {
      "hello", "heartbeat", "delta", "done", "job_error", "welcome", "offer", "cancel", "deltas", "advertise"};
  return names[f.index()];
}

std::uint16_t websocket_close_code(decode_errc code) noexcept {
  switch (code) {
    case decode_errc::too_large:
      return 1009;
    case decode_errc::malformed:
    case decode_errc::unknown_frame:
      return 1002;
    case decode_errc::over_limit:
    case decode_errc::invalid_field:
      return 1008;
  }
  return 1002;
}

std::vector<std::uint8_t> encode(const frame& f) {
  capnp::MallocMessageBuilder message(encode_first_segment_words);
  auto root = message.initRoot<schema::Frame>();
  std::visit([&root](const auto& value) { write(root, value); }, f);
  std::vector<std::uint8_t> bytes(capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word));
  kj::ArrayOutputStream out(kj::arrayPtr(reinterpret_cast<kj::byte*>(bytes.data()), bytes.size()));
  capnp::writeMessage(out, message);
  GPUSTREAM_ENSURE(out.getArray().size() == bytes.size());
  return bytes;
}

expected<void, decode_error> validate(const frame& f, const codec_limits& limits) {
  return std::visit([&limits](const auto& value) { return check(value, limits); }, f);
}

expected<frame, decode_error> decode(std::span<const std::uint8_t> bytes,
                                     const codec_limits& limits) {
  if (bytes.size() > limits.frame_bytes_max) {
    return unexpected{failure(decode_errc::too_large,
                              "frame of " + std::to_string(bytes.size()) +
                                  " bytes, more than the " +
                                  std::to_string(limits.frame_bytes_max) + " allowed")};
  }
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0) {
    return unexpected{failure(decode_errc::malformed,
                              std::to_string(bytes.size()) +
                                  " bytes are not a whole, non-zero number of 8-byte words")};
  }
  const std::size_t word_count = bytes.size() / sizeof(capnp::word);
  auto parsed = [&]() -> read_result {
    const auto address = reinterpret_cast<std::uintptr_t>(bytes.data());
    if (address % alignof(capnp::word) == 0) {
      return decode_words({reinterpret_cast<const capnp::word*>(bytes.data()), word_count}, limits);
    }
    if (bytes.size() <= unaligned_stack_bytes_max) {
      alignas(capnp::word) std::array<std::uint8_t, unaligned_stack_bytes_max> copy;
      std::memcpy(copy.data(), bytes.data(), bytes.size());
      return decode_words({reinterpret_cast<const capnp::word*>(copy.data()), word_count}, limits);
    }
    auto copy = kj::heapArray<capnp::word>(word_count);
    std::memcpy(copy.begin(), bytes.data(), bytes.size());
    return decode_words({copy.begin(), copy.size()}, limits);
  }();
  if (!parsed) return parsed;
  if (auto checked = validate(*parsed, limits); !checked) return unexpected{checked.error()};
  return parsed;
}

}  // namespace gpustream::gateway::link
