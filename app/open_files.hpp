#pragma once
/// The process's limit on open files, which bounds how many connections a server can accept.

#include <cstdint>

namespace gpustream::app {

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does at
/// start: a server holds one descriptor per connection, and the soft limit processes commonly
/// start with (1,024) is far below what the gateway accepts. Returns the soft limit now in force.
std::uint64_t raise_open_files_limit();

/// Descriptors `serve` keeps for itself besides its connections: the store's files, its
/// threads' event descriptors, a provider agent's backend connections on the same machine.
inline constexpr std::uint64_t open_files_reserve = 1'024;

}  // namespace gpustream::app
