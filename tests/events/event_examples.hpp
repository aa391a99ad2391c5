#pragma once
/// One example of every event type, for the golden files and the codec tests.

#include <vector>

#include "events/event.hpp"

namespace gpustream::events {

/// One example per event type, in type-number order (element i has type i). Every field holds a
/// non-default, distinctive value (non-empty strings, non-zero numbers, lists of two or more,
/// enumerants other than the first), so that a field dropped or renumbered on the wire changes the
/// decoded value. The values are frozen: the golden files were written from them.
[[nodiscard]] std::vector<event> event_examples();

}  // namespace gpustream::events
