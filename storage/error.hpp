#pragma once
/// The closed set of ways a store operation can fail, each with a message a person can act on.

#include <string>

namespace gpustream::storage {

enum class errc {
  invalid_argument,        ///< the request itself is wrong (bad stream id, nil event id, over a limit)
  wrong_expected_version,  ///< optimistic concurrency: the stream moved on since the caller read it
  event_id_conflict,       ///< an event id is already recorded, but not as part of this same append
  corruption,              ///< a stored record failed its CRC or could not be decoded
  /// The disk failed (fsync, write, read). The append was not acknowledged, but its outcome is
  /// unknown: its bytes may have reached the log and reappear once the store reopens. Retry it
  /// unchanged (same event ids): the retry then either writes it or finds it written.
  io_error,
  no_space,                ///< the disk is full; as io_error, retry unchanged once there is room
  incompatible_format,     ///< the data directory was written by another store format version
  overloaded,              ///< too many appends queued; retry later
  closed,                  ///< the store is shutting down
  key_taken,               ///< a unique key the append claims was claimed by an earlier append
};

struct error {
  errc code;
  std::string message;
};

}  // namespace gpustream::storage
