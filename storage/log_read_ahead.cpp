#include "storage/log_read_ahead.hpp"

#include <cstring>
#include <string>

#include "storage/keys.hpp"

namespace gpustream::storage {

log_read_ahead::log_read_ahead(std::unique_ptr<rocksdb::Iterator> iterator, std::uint64_t max)
    : iterator_(std::move(iterator)), max_(max), reader_([this] { read(); }) {}

log_read_ahead::~log_read_ahead() {
  {
    std::lock_guard lock(mutex_);
    stopped_ = true;
  }
  space_.notify_all();
  reader_.join();
}

std::unique_ptr<log_read_ahead::batch> log_read_ahead::fresh_batch() {
  std::lock_guard lock(mutex_);
  if (spare_.empty()) return std::make_unique<batch>();
  auto b = std::move(spare_.back());
  spare_.pop_back();
  b->words.clear();
  b->entries.clear();
  b->failure.reset();
  return b;
}

void log_read_ahead::read() {
  std::uint64_t read_count = 0;
  bool more = true;
  while (more) {
    auto b = fresh_batch();
    while (b->entries.size() < batch_records_max && read_count < max_ && iterator_->Valid()) {
      const auto key = iterator_->key();
      if (key.size() != 8) {
        b->failure = error{errc::corruption, "global index key is not 8 bytes"};
        break;
      }
      const auto value = iterator_->value();
      const std::size_t first_word = b->words.size();
      b->words.resize(first_word + (value.size() + 7) / 8);
      std::memcpy(b->words.data() + first_word, value.data(), value.size());
      b->entries.push_back({keys::load_be64(key.ToStringView()), first_word, value.size()});
      ++read_count;
      iterator_->Next();
    }
    if (const auto status = iterator_->status(); !b->failure && !status.ok()) {
      b->failure = error{status.IsCorruption() ? errc::corruption : errc::io_error,
                         "scanning the log: " + status.ToString()};
    }
    more = !b->failure && read_count < max_ && iterator_->Valid();
    std::unique_lock lock(mutex_);
    space_.wait(lock, [&] { return stopped_ || queue_.size() < batches_ahead_max; });
    if (stopped_) return;
    queue_.push_back(std::move(b));
    done_ = !more;
    ready_.notify_one();
  }
}

std::unique_ptr<log_read_ahead::batch> log_read_ahead::next() {
  std::unique_lock lock(mutex_);
  ready_.wait(lock, [&] { return done_ || !queue_.empty(); });
  if (queue_.empty()) return nullptr;
  auto b = std::move(queue_.front());
  queue_.pop_front();
  space_.notify_one();
  return b;
}

void log_read_ahead::recycle(std::unique_ptr<batch> used) {
  std::lock_guard lock(mutex_);
  spare_.push_back(std::move(used));
}

}  // namespace gpustream::storage
