// Writes the golden payload file of every example event whose file does not exist yet; never overwrites.
//
// Usage: gpustream_golden_writer <golden directory>
// Golden files are frozen once committed: old bytes must stay decodable forever, so an existing file
// is never touched, even when the example it came from has changed since.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "events/codec.hpp"
#include "events/event.hpp"
#include "tests/events/event_examples.hpp"

namespace {

namespace fs = std::filesystem;
using namespace gpustream::events;

enum class write_outcome { written, kept, failed };

/// Writes `bytes` to `path` unless something already exists there.
write_outcome write_if_absent(const fs::path& path, const std::string& bytes) {
  std::error_code error;
  if (fs::exists(path, error)) return write_outcome::kept;
  if (error) {
    std::fprintf(stderr, "cannot inspect %s: %s\n", path.c_str(), error.message().c_str());
    return write_outcome::failed;
  }
  // Write to a temporary name and rename, so that a crash never leaves a half-written golden file.
  const fs::path temporary = path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) {
      std::fprintf(stderr, "cannot write %s\n", temporary.c_str());
      return write_outcome::failed;
    }
  }
  fs::rename(temporary, path, error);
  if (error) {
    std::fprintf(stderr, "cannot rename %s to %s: %s\n", temporary.c_str(), path.c_str(),
                 error.message().c_str());
    return write_outcome::failed;
  }
  return write_outcome::written;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <golden directory>\n", argc > 0 ? argv[0] : "gpustream_golden_writer");
    return 2;
  }
  const fs::path directory = argv[1];
  std::error_code error;
  fs::create_directories(directory, error);
  if (error) {
    std::fprintf(stderr, "cannot create %s: %s\n", directory.c_str(), error.message().c_str());
    return 1;
  }
  int written = 0;
  int kept = 0;
  int failed = 0;
  std::vector<std::pair<fs::path, event>> files;
  for (const event& example : event_examples()) {
    files.emplace_back(directory / (std::string(type_name(type_of(example))) + ".bin"), example);
  }
  fs::create_directories(directory / "evolved", error);
  if (error) {
    std::fprintf(stderr, "cannot create %s: %s\n", (directory / "evolved").c_str(), error.message().c_str());
    return 1;
  }
  for (const auto& example : evolved_examples()) {
    files.emplace_back(directory / "evolved" / (example.name + ".bin"), example.value);
  }
  for (const auto& [path, example] : files) {
    const std::string bytes = encode_payload(example);
    switch (write_if_absent(path, bytes)) {
      case write_outcome::written:
        std::printf("wrote %s (%zu bytes)\n", path.c_str(), bytes.size());
        ++written;
        break;
      case write_outcome::kept:
        ++kept;
        break;
      case write_outcome::failed:
        ++failed;
        break;
    }
  }
  std::printf("%d written, %d already present and kept, %d failed\n", written, kept, failed);
  return failed == 0 ? 0 : 1;
}
