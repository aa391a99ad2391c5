#pragma once
/// The closed set of reasons why bytes could not be turned back into an event or a record.

#include <string>

namespace gpustream::events {

enum class decode_errc {
  crc_mismatch,   ///< the stored CRC32C does not match the bytes: corruption on disk or in transit
  malformed,      ///< not a valid Cap'n Proto message of the expected shape (or over a limit)
  unknown_type,   ///< an event type this build does not know (written by a newer gpustream)
  type_mismatch,  ///< the envelope's type disagrees with the payload's union tag
};

struct decode_error {
  decode_errc code;
  /// What went wrong, for a person: names the type, offset or sizes involved.
  std::string message;
};

}  // namespace gpustream::events
