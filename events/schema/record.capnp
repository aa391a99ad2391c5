@0xd01418bffdd8bea3;
# The envelope of every stored event. Never renumber or reuse an ordinal; only append fields.
# On disk a record is this message as a flat array followed by the CRC32C of those bytes
# (4 bytes, little-endian).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("gpustream::events::schema");

struct Record {
  stream @0 :Text;          # aggregate stream id, e.g. "user-42", "ledger"
  version @1 :UInt64;       # position within the stream, gapless from 1
  position @2 :UInt64;      # global position, gapless from 1, total order of the log
  eventIdHigh @3 :UInt64;   # idempotency key (128 bits), high half
  eventIdLow @4 :UInt64;    # low half
  recordedAtUs @5 :Int64;   # microseconds since the Unix epoch, set by the store when appended
  type @6 :UInt16;          # the payload's Event union tag (see events.capnp)
  payload @7 :Data;         # an Event message as a flat array
}
