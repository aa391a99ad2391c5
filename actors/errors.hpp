#pragma once
/// Domain and storage errors as caf::error values (categories "domain" and "storage"), so that a
/// refused command or a failed append reaches the requester's error handler with its code and
/// message intact, and back again.

#include <caf/error.hpp>

#include <optional>
#include <string>

#include "domain/aggregate.hpp"
#include "storage/error.hpp"

namespace caf {
class actor_system_config;
}

namespace gpustream::actors {

inline constexpr caf::atom_value domain_category = caf::atom("domain");
inline constexpr caf::atom_value storage_category = caf::atom("storage");

[[nodiscard]] caf::error make_error(const domain::error& failure);
[[nodiscard]] caf::error make_error(const storage::error& failure);

/// The domain error carried by `failure`, if it is one.
[[nodiscard]] std::optional<domain::error> domain_error_of(const caf::error& failure);
/// The storage error carried by `failure`, if it is one.
[[nodiscard]] std::optional<storage::error> storage_error_of(const caf::error& failure);

/// "domain.insufficient_funds: <message>", "storage.io_error: <message>", or CAF's own rendering.
[[nodiscard]] std::string describe(const caf::error& failure);

/// Teaches a CAF config to render both categories (system.render(err)).
void add_error_categories(caf::actor_system_config& config);

}  // namespace gpustream::actors
