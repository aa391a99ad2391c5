#include "actors/persistence.hpp"

#include <chrono>

#include "base/ensure.hpp"
#include "events/codec.hpp"

namespace gpustream::actors {

namespace {

/// splitmix64's finaliser: spreads every input bit over the whole word.
std::uint64_t mix(std::uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

/// FNV-1a over the bytes, from a given basis.
std::uint64_t fnv1a(std::string_view bytes, std::uint64_t basis) noexcept {
  std::uint64_t hash = basis;
  for (const char c : bytes) {
    hash ^= static_cast<unsigned char>(c);
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

}  // namespace

std::int64_t system_clock_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

events::event_id derive_event_id(std::string_view stream, std::uint64_t version) {
  events::event_id id{mix(fnv1a(stream, 0xcbf29ce484222325ULL) ^ version),
                      mix(fnv1a(stream, 0x84222325cbf29ce4ULL) + version)};
  if (id.is_nil()) id.low = 1;  // the nil id is reserved; 2^-128 odds, but cheap to rule out
  return id;
}

storage::stream_append make_stream_append(const std::string& stream, std::uint64_t version,
                                          const std::vector<events::event>& batch) {
  storage::stream_append append{stream, version, {}};
  append.events.reserve(batch.size());
  for (const auto& event : batch) {
    ++version;
    append.events.push_back(
        {derive_event_id(stream, version), events::type_of(event), events::encode_payload(event)});
  }
  return append;
}

}  // namespace gpustream::actors
