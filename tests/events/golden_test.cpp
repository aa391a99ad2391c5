// Proves old event payloads stay decodable: every golden file decodes to its example; codec errors are clean.

#include <gtest/gtest.h>

#include <capnp/message.h>
#include <capnp/schema.h>
#include <capnp/serialize.h>

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "events/codec.hpp"
#include "events/event.hpp"
#include "events/schema/events.capnp.h"
#include "tests/events/event_examples.hpp"

namespace gpustream::events {
namespace {

namespace fs = std::filesystem;

const fs::path golden_directory = GPUSTREAM_GOLDEN_DIR;

fs::path golden_path(event_type type) {
  return golden_directory / (std::string(type_name(type)) + ".bin");
}

std::optional<std::string> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::span<const std::byte> as_bytes(const std::string& text) {
  return std::as_bytes(std::span(text.data(), text.size()));
}

/// "userCreated" -> "user_created".
std::string snake_case(std::string_view camel) {
  std::string snake;
  for (char c : camel) {
    if (std::isupper(static_cast<unsigned char>(c))) {
      snake += '_';
      snake += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    } else {
      snake += c;
    }
  }
  return snake;
}

TEST(event_catalog, examples_cover_every_type_in_order) {
  const auto examples = event_examples();
  ASSERT_EQ(examples.size(), event_type_count);
  for (event_type type = 0; type < event_type_count; ++type) {
    EXPECT_EQ(type_of(examples[type]), type) << "example " << type;
  }
}

TEST(event_catalog, type_names_match_the_schema_union) {
  const auto fields = capnp::Schema::from<schema::Event>().getUnionFields();
  ASSERT_EQ(fields.size(), event_type_count);
  for (const auto field : fields) {
    const auto type = static_cast<event_type>(field.getProto().getDiscriminantValue());
    EXPECT_EQ(type_name(type), snake_case(field.getProto().getName().cStr()));
  }
  EXPECT_EQ(type_name(event_type_count), "unknown");
}

TEST(event_golden, one_file_per_type) {
  std::size_t files = 0;
  for (const auto& entry : fs::directory_iterator(golden_directory)) {
    if (entry.is_regular_file() && entry.path().extension() == ".bin") ++files;
  }
  EXPECT_EQ(files, event_type_count) << "in " << golden_directory;
}

TEST(event_golden, every_golden_file_decodes_to_its_example) {
  const auto examples = event_examples();
  for (event_type type = 0; type < event_type_count; ++type) {
    SCOPED_TRACE(std::string(type_name(type)));
    const auto bytes = read_file(golden_path(type));
    ASSERT_TRUE(bytes.has_value()) << "missing " << golden_path(type)
                                   << "; run gpustream_golden_writer " << golden_directory;
    auto decoded = decode_payload(type, as_bytes(*bytes));
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == examples[type]) << "decoded value differs from the example";
  }
}

TEST(event_golden, every_evolved_golden_file_decodes_to_its_example) {
  // The later shape of a type decodes as written, and its first shape (above) still decodes to
  // the first example: the fields added since read as their defaults.
  for (const auto& example : evolved_examples()) {
    SCOPED_TRACE(example.name);
    const fs::path path = golden_directory / "evolved" / (example.name + ".bin");
    const auto bytes = read_file(path);
    ASSERT_TRUE(bytes.has_value()) << "missing " << path << "; run gpustream_golden_writer " << golden_directory;
    auto decoded = decode_payload(type_of(example.value), as_bytes(*bytes));
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == example.value) << "decoded value differs from the example";
    EXPECT_FALSE(*decoded == event_examples()[type_of(example.value)]) << "the example adds nothing";
  }
}

TEST(event_codec, round_trip_of_every_evolved_example) {
  for (const auto& example : evolved_examples()) {
    SCOPED_TRACE(example.name);
    const std::string bytes = encode_payload(example.value);
    auto decoded = decode_payload(type_of(example.value), as_bytes(bytes));
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == example.value);
    for (std::size_t size = 0; size < bytes.size(); ++size) {
      ASSERT_FALSE(decode_payload(type_of(example.value), as_bytes(bytes).first(size)).has_value())
          << "cut to " << size << " bytes";
    }
  }
}

TEST(event_codec, round_trip_of_every_example) {
  for (const event& example : event_examples()) {
    const event_type type = type_of(example);
    SCOPED_TRACE(std::string(type_name(type)));
    const std::string bytes = encode_payload(example);
    ASSERT_EQ(bytes.size() % 8, 0u);
    auto decoded = decode_payload(type, as_bytes(bytes));
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == example);
  }
}

TEST(event_codec, default_values_round_trip) {
  // All-default values take the shortest wire form (zeroed words, null pointers); digests are the
  // exception: a null Data is not 32 bytes, so defaults carry a zero digest, written explicitly.
  for (event_type type = 0; type < event_type_count; ++type) {
    SCOPED_TRACE(std::string(type_name(type)));
    event value = event_examples()[type];
    std::visit([](auto& alternative) { alternative = std::decay_t<decltype(alternative)>{}; }, value);
    auto decoded = decode_payload(type, as_bytes(encode_payload(value)));
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == value);
  }
}

TEST(event_codec, unaligned_input_decodes_the_same) {
  for (const event& example : event_examples()) {
    const event_type type = type_of(example);
    SCOPED_TRACE(std::string(type_name(type)));
    const std::string bytes = encode_payload(example);
    std::string shifted = "x" + bytes;  // std::string data is aligned, so +1 is not
    const auto unaligned = as_bytes(shifted).subspan(1);
    ASSERT_NE(reinterpret_cast<std::uintptr_t>(unaligned.data()) % 8, 0u);
    auto decoded = decode_payload(type, unaligned);
    ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
    EXPECT_TRUE(*decoded == example);
  }
}

TEST(event_codec, large_unaligned_input_decodes_the_same) {
  // Above the stack-copy size, the unaligned path copies to the heap.
  campaign_created big = std::get<campaign_created>(event_examples()[20]);
  big.text.assign(5000, 'z');
  const std::string bytes = encode_payload(big);
  ASSERT_GT(bytes.size(), 4096u);
  const std::string shifted = "abc" + bytes;
  auto decoded = decode_payload(type_of(big), as_bytes(shifted).subspan(3));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().message;
  EXPECT_TRUE(*decoded == event{big});
}

TEST(event_codec, wrong_type_number_is_a_type_mismatch) {
  const auto examples = event_examples();
  for (event_type type = 0; type < event_type_count; ++type) {
    const event_type other = static_cast<event_type>((type + 1) % event_type_count);
    const std::string bytes = encode_payload(examples[type]);
    auto decoded = decode_payload(other, as_bytes(bytes));
    ASSERT_FALSE(decoded.has_value()) << type_name(type);
    EXPECT_EQ(decoded.error().code, decode_errc::type_mismatch);
    EXPECT_NE(decoded.error().message.find(std::string(type_name(type))), std::string::npos)
        << decoded.error().message;
  }
}

TEST(event_codec, unknown_type_number_is_reported_as_newer) {
  const std::string bytes = encode_payload(event_examples()[0]);
  for (event_type type : {event_type_count, event_type{1000}, event_type{65535}}) {
    auto decoded = decode_payload(type, as_bytes(bytes));
    ASSERT_FALSE(decoded.has_value());
    EXPECT_EQ(decoded.error().code, decode_errc::unknown_type);
    EXPECT_NE(decoded.error().message.find(std::to_string(type)), std::string::npos);
    EXPECT_NE(decoded.error().message.find("newer"), std::string::npos);
  }
}

void expect_malformed(event_type type, std::span<const std::byte> bytes, const std::string& what) {
  auto decoded = decode_payload(type, bytes);
  ASSERT_FALSE(decoded.has_value()) << what;
  EXPECT_EQ(decoded.error().code, decode_errc::malformed) << what << ": " << decoded.error().message;
  EXPECT_FALSE(decoded.error().message.empty());
}

TEST(event_codec, truncated_payload_is_malformed) {
  for (const event& example : event_examples()) {
    const event_type type = type_of(example);
    const std::string bytes = encode_payload(example);
    for (std::size_t size = 0; size < bytes.size(); ++size) {
      expect_malformed(type, as_bytes(bytes).first(size),
                       std::string(type_name(type)) + " cut to " + std::to_string(size) + " bytes");
    }
  }
}

TEST(event_codec, trailing_words_are_malformed) {
  const std::string bytes = encode_payload(event_examples()[0]) + std::string(8, '\0');
  expect_malformed(0, as_bytes(bytes), "one extra word");
}

TEST(event_codec, garbage_never_crashes) {
  // Deterministic pseudo-random bytes (xorshift, fixed seed): each input must decode or fail cleanly.
  std::uint64_t state = 0x9e3779b97f4a7c15u;
  const auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  std::size_t failures = 0;
  for (int round = 0; round < 2000; ++round) {
    std::string bytes((1 + next() % 64) * 8, '\0');
    for (char& c : bytes) c = static_cast<char>(next());
    const auto type = static_cast<event_type>(next() % event_type_count);
    auto decoded = decode_payload(type, as_bytes(bytes));
    if (!decoded.has_value()) ++failures;
  }
  EXPECT_GT(failures, 0u);
}

TEST(event_codec, flipped_bytes_of_golden_payloads_never_crash) {
  // Every single-byte corruption of every example either decodes or fails with an error.
  for (const event& example : event_examples()) {
    const event_type type = type_of(example);
    const std::string bytes = encode_payload(example);
    for (std::size_t i = 0; i < bytes.size(); ++i) {
      std::string corrupt = bytes;
      corrupt[i] = static_cast<char>(corrupt[i] ^ 0xff);
      auto decoded = decode_payload(type, as_bytes(corrupt));
      if (!decoded.has_value()) {
        EXPECT_FALSE(decoded.error().message.empty());
      }
    }
  }
}

TEST(event_codec, unknown_enumerant_is_malformed) {
  // A newer gpustream may append an enumerant; this build must refuse it rather than invent a value.
  capnp::MallocMessageBuilder message;
  auto created = message.initRoot<schema::Event>().initUserCreated();
  created.setUserId("user-x");
  created.setTier(static_cast<schema::UserTier>(7));
  const auto words = capnp::messageToFlatArray(message);
  const auto bytes = words.asBytes();
  expect_malformed(0, std::as_bytes(std::span(bytes.begin(), bytes.size())), "tier 7");
}

TEST(event_codec, digest_of_wrong_size_is_malformed) {
  capnp::MallocMessageBuilder message;
  auto issued = message.initRoot<schema::Event>().initApiKeyIssued();
  const kj::byte short_hash[3] = {1, 2, 3};
  issued.setKeyHash(kj::arrayPtr(short_hash, 3));
  const auto words = capnp::messageToFlatArray(message);
  const auto bytes = words.asBytes();
  expect_malformed(1, std::as_bytes(std::span(bytes.begin(), bytes.size())), "3-byte digest");
}

TEST(event_codec, traversal_limit_stops_amplification) {
  // A list of 2^22 zero-sized structs takes no words on the wire, but capnp counts each element
  // against the traversal limit. 2^22 is under capnp's default limit (2^23 words) and over
  // payload_traversal_words_max, so this fails only if decode_payload sets its own limit.
  capnp::MallocMessageBuilder message;
  auto connected = message.initRoot<schema::Event>().initProviderConnected();
  connected.initGpus(1);
  auto words = capnp::messageToFlatArray(message);
  // Patch the list pointer of `gpus` to claim 2^28 elements of zero words: find the composite-list
  // tag word (element count in the offset field) and the list pointer's word count.
  auto bytes = words.asBytes();
  std::string patched(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
  bool patched_tag = false;
  for (std::size_t at = 8; at + 8 <= patched.size(); at += 8) {
    std::uint64_t word = 0;
    std::memcpy(&word, patched.data() + at, 8);
    // The tag of a one-element composite list of GpuInfo: offset 1 element, data 2 words, 1 pointer.
    const std::uint64_t tag = (std::uint64_t{1} << 2) | (std::uint64_t{2} << 32) | (std::uint64_t{1} << 48);
    if (word == tag) {
      const std::uint64_t huge = std::uint64_t{1} << 22;
      word = huge << 2;  // zero data words, zero pointers
      std::memcpy(patched.data() + at, &word, 8);
      patched_tag = true;
      break;
    }
  }
  ASSERT_TRUE(patched_tag);
  static_assert(payload_traversal_words_max < (std::uint64_t{1} << 22));
  auto decoded = decode_payload(6, as_bytes(patched));
  ASSERT_FALSE(decoded.has_value());
  EXPECT_EQ(decoded.error().code, decode_errc::malformed) << decoded.error().message;
}

}  // namespace
}  // namespace gpustream::events
