#include "events/record.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "events/crc32c.hpp"
#include "events/schema/record.capnp.h"

namespace gpustream::events {
namespace {

/// A record holds a handful of fields and one payload blob: a few words of pointers and the
/// payload's words. Bounds the work a hostile or corrupt message can cause.
constexpr std::uint64_t record_traversal_words_max = record_bytes_max / sizeof(capnp::word) + 64;

std::uint32_t load_le32(const std::byte* p) noexcept {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<std::uint32_t>(p[i]);
  return v;
}

void store_le32(char* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>((v >> (8 * i)) & 0xFFu);
}

decode_error malformed(std::string message) {
  return decode_error{decode_errc::malformed, std::move(message)};
}

/// Returns words to read `bytes` from: the bytes themselves when aligned, else a copy in `scratch`.
kj::ArrayPtr<const capnp::word> aligned_words(std::span<const std::byte> bytes,
                                              std::vector<std::uint64_t>& scratch) {
  static_assert(sizeof(std::uint64_t) == sizeof(capnp::word));
  const std::size_t count = bytes.size() / sizeof(capnp::word);
  if (reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(capnp::word) == 0) {
    return {reinterpret_cast<const capnp::word*>(bytes.data()), count};
  }
  scratch.resize(count);
  std::memcpy(scratch.data(), bytes.data(), count * sizeof(capnp::word));
  return {reinterpret_cast<const capnp::word*>(scratch.data()), count};
}

}  // namespace

std::string event_id::to_string() const {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[15 - i] = digits[(high >> (4 * i)) & 0xFu];
    out[31 - i] = digits[(low >> (4 * i)) & 0xFu];
  }
  return out;
}

void encode_record_into(const record_view& r, std::string& out) {
  // One zeroed segment sized for the whole record, reused by this thread: building allocates nothing.
  static_assert(sizeof(capnp::word) == 8);
  const std::size_t segment_words = record_segment_words(r.stream.size(), r.payload.size());
  thread_local std::vector<capnp::word> segment;
  if (segment.size() < segment_words) segment.resize(segment_words);
  std::memset(static_cast<void*>(segment.data()), 0, segment_words * sizeof(capnp::word));
  capnp::MallocMessageBuilder message(kj::arrayPtr(segment.data(), segment_words));
  auto builder = message.initRoot<schema::Record>();
  builder.setStream(capnp::Text::Reader(r.stream.data(), r.stream.size()));
  builder.setVersion(r.version);
  builder.setPosition(r.position);
  builder.setEventIdHigh(r.id.high);
  builder.setEventIdLow(r.id.low);
  builder.setRecordedAtUs(r.recorded_at_us);
  builder.setType(r.type);
  builder.setPayload(
      kj::arrayPtr(reinterpret_cast<const kj::byte*>(r.payload.data()), r.payload.size()));
  const std::size_t body_bytes = capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word);
  out.resize(body_bytes + record_crc_bytes);
  kj::ArrayOutputStream stream(kj::arrayPtr(reinterpret_cast<kj::byte*>(out.data()), body_bytes));
  capnp::writeMessage(stream, message);
  const auto crc = crc32c(std::as_bytes(std::span(out.data(), body_bytes)));
  store_le32(out.data() + body_bytes, crc);
}

std::string encode_record(const record& r) {
  std::string out;
  encode_record_into(record_view{r.stream, r.version, r.position, r.id, r.recorded_at_us, r.type,
                                 std::as_bytes(std::span(r.payload))},
                     out);
  return out;
}

expected<record_view, decode_error> decode_record_view(std::span<const std::byte> bytes,
                                                      std::vector<std::uint64_t>& scratch) {
  if (bytes.size() < record_crc_bytes + sizeof(capnp::word) ||
      (bytes.size() - record_crc_bytes) % sizeof(capnp::word) != 0) {
    return unexpected{malformed("record of " + std::to_string(bytes.size()) +
                                " bytes is not whole 8-byte words plus a 4-byte CRC")};
  }
  if (bytes.size() > record_bytes_max) {
    return unexpected{malformed("record of " + std::to_string(bytes.size()) +
                                " bytes exceeds record_bytes_max " + std::to_string(record_bytes_max))};
  }
  const auto body = bytes.first(bytes.size() - record_crc_bytes);
  const std::uint32_t stored = load_le32(bytes.data() + body.size());
  const std::uint32_t computed = crc32c(body);
  if (stored != computed) {
    char text[96];
    std::snprintf(text, sizeof text, "CRC32C mismatch: stored %08x, computed %08x over %zu bytes",
                  stored, computed, body.size());
    return unexpected{decode_error{decode_errc::crc_mismatch, text}};
  }
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = record_traversal_words_max;
    capnp::FlatArrayMessageReader message(aligned_words(body, scratch), options);
    const auto reader = message.getRoot<schema::Record>();
    const auto stream = reader.getStream();
    const auto payload = reader.getPayload();
    // The readers point into the words, which outlive `message`.
    return record_view{std::string_view(stream.cStr(), stream.size()),
                       reader.getVersion(),
                       reader.getPosition(),
                       event_id{reader.getEventIdHigh(), reader.getEventIdLow()},
                       reader.getRecordedAtUs(),
                       reader.getType(),
                       std::as_bytes(std::span(payload.begin(), payload.size()))};
  } catch (const kj::Exception& e) {
    return unexpected{malformed("record is not a valid Cap'n Proto message: " +
                                std::string(e.getDescription().cStr()))};
  }
}

expected<record, decode_error> decode_record(std::span<const std::byte> bytes) {
  std::vector<std::uint64_t> scratch;
  auto view = decode_record_view(bytes, scratch);
  if (!view) return unexpected{view.error()};
  return view->to_record();
}

}  // namespace gpustream::events
