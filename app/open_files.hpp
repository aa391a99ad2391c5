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

/// The connections the gateway may hold under an open-files limit of `files`, leaving the rest
/// to the store: `files` less open_files_reserve, or less a quarter of `files` when the limit is
/// too low for the whole reserve (1,024 files: 768 connections, 256 kept).
[[nodiscard]] constexpr std::uint64_t connections_within(std::uint64_t files) noexcept {
  const std::uint64_t kept = files / 4 < open_files_reserve ? files / 4 : open_files_reserve;
  return files > kept ? files - kept : 1;
}

}  // namespace gpustream::app
