#pragma once
/// One example of every event type, for the golden files and the codec tests.

#include <string>
#include <vector>

#include "events/event.hpp"

namespace gpustream::events {

/// One example per event type, in type-number order (element i has type i). Every field holds a
/// non-default, distinctive value (non-empty strings, non-zero numbers, lists of two or more,
/// enumerants other than the first), so that a field dropped or renumbered on the wire changes the
/// decoded value. The values are frozen: the golden files were written from them.
[[nodiscard]] std::vector<event> event_examples();

/// An example of a shape an event type took after its first golden file was written: a field a
/// later version added (job_completed's and job_cancelled's bill). Its golden file is
/// golden/evolved/<name>.bin, beside the type's first one, which must keep decoding as it did.
struct evolved_example {
  std::string name;
  event value;
};

/// Every evolved example, frozen like event_examples: every field non-default and distinctive.
[[nodiscard]] std::vector<evolved_example> evolved_examples();

}  // namespace gpustream::events
