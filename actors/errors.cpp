#include "actors/errors.hpp"

#include <caf/actor_system_config.hpp>
#include <caf/message.hpp>

namespace gpustream::actors {

namespace {

std::string context_text(const caf::error& failure) {
  const auto& context = failure.context();
  if (context.size() == 1 && context.match_element<std::string>(0)) {
    return context.get_as<std::string>(0);
  }
  return {};
}

std::string_view storage_code_name(storage::errc code) {
  switch (code) {
    case storage::errc::invalid_argument: return "invalid_argument";
    case storage::errc::wrong_expected_version: return "wrong_expected_version";
    case storage::errc::event_id_conflict: return "event_id_conflict";
    case storage::errc::corruption: return "corruption";
    case storage::errc::io_error: return "io_error";
    case storage::errc::no_space: return "no_space";
    case storage::errc::incompatible_format: return "incompatible_format";
    case storage::errc::overloaded: return "overloaded";
    case storage::errc::closed: return "closed";
    case storage::errc::key_taken: return "key_taken";
  }
  return "unknown";
}

/// CAF treats code 0 as "no error", and both enums start at 0: shift by one on the way in.
std::uint8_t to_caf_code(auto code) { return static_cast<std::uint8_t>(static_cast<int>(code) + 1); }

template <class Enum>
Enum from_caf_code(std::uint8_t code) {
  return static_cast<Enum>(code - 1);
}

}  // namespace

caf::error make_error(const domain::error& failure) {
  return caf::error(to_caf_code(failure.code), domain_category,
                    caf::make_message(failure.message));
}

caf::error make_error(const storage::error& failure) {
  return caf::error(to_caf_code(failure.code), storage_category,
                    caf::make_message(failure.message));
}

std::optional<domain::error> domain_error_of(const caf::error& failure) {
  if (!failure || failure.category() != domain_category) return std::nullopt;
  return domain::error{from_caf_code<domain::errc>(failure.code()), context_text(failure)};
}

std::optional<storage::error> storage_error_of(const caf::error& failure) {
  if (!failure || failure.category() != storage_category) return std::nullopt;
  return storage::error{from_caf_code<storage::errc>(failure.code()), context_text(failure)};
}

std::string describe(const caf::error& failure) {
  if (auto d = domain_error_of(failure)) {
    return "domain." + std::string(domain::to_string(d->code)) + ": " + d->message;
  }
  if (auto s = storage_error_of(failure)) {
    return "storage." + std::string(storage_code_name(s->code)) + ": " + s->message;
  }
  return caf::to_string(failure);
}

void add_error_categories(caf::actor_system_config& config) {
  // The renderer rebuilds the error and reuses describe(), so both spell it the same way.
  const auto render = [](std::uint8_t code, caf::atom_value category, const caf::message& context) {
    return describe(caf::error(code, category, context));
  };
  config.add_error_category(domain_category, render);
  config.add_error_category(storage_category, render);
}

}  // namespace gpustream::actors
