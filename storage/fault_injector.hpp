#pragma once
/// Switches that make the store's real RocksDB files fail, for tests: the store opens RocksDB on a
/// FileSystem wrapper that consults these flags on every write and sync. Lifting a fault lets the
/// store recover on its next append.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>

namespace gpustream::storage {

class fault_injector {
 public:
  /// Every Sync/Fsync of a file fails with an I/O error while set.
  void set_fail_sync(bool on) noexcept { fail_sync_.store(on); }
  /// Every Sync/Fsync of a write-ahead log file (RocksDB's *.log) fails with an I/O error while
  /// set, and only those: a recovery that runs meanwhile writes its tables and MANIFEST soundly.
  void set_fail_log_syncs(bool on) noexcept { fail_log_syncs_.store(on); }
  /// Every append to a file fails with "no space left on device" while set.
  void set_no_space(bool on) noexcept { no_space_.store(on); }

  /// Every Sync/Fsync of a file takes this much longer while set: a slow disk. Default: none.
  void set_sync_delay(std::chrono::milliseconds delay) noexcept { sync_delay_ms_.store(delay.count()); }

  /// Every Sync/Fsync of a file waits, from hold_syncs() until release_syncs(): a disk stuck for
  /// exactly as long as a test needs, whatever the machine's speed.
  void hold_syncs() {
    std::lock_guard lock(hold_mutex_);
    held_ = true;
  }
  void release_syncs() {
    {
      std::lock_guard lock(hold_mutex_);
      held_ = false;
    }
    released_.notify_all();
  }
  /// hold_syncs() for a scope: released at its end, also when a test's assertion leaves early.
  class held_syncs {
   public:
    explicit held_syncs(fault_injector& faults) : faults_(faults) { faults_.hold_syncs(); }
    ~held_syncs() { faults_.release_syncs(); }
    held_syncs(const held_syncs&) = delete;
    held_syncs& operator=(const held_syncs&) = delete;

   private:
    fault_injector& faults_;
  };
  [[nodiscard]] held_syncs hold_syncs_in_scope() { return held_syncs(*this); }

  /// Returns once syncs are not held (at once when they are not).
  void wait_while_held() {
    std::unique_lock lock(hold_mutex_);
    released_.wait(lock, [this] { return !held_; });
  }

  /// Called after every successful Sync/Fsync (and rename of a synced file) with the file's path
  /// and how many of its bytes are now durable: lets a test simulate a power cut by cutting files
  /// back to their durable length. Set before the store opens. Default: none.
  using sync_observer = std::function<void(const std::string& path, std::uint64_t durable_bytes)>;
  void set_sync_observer(sync_observer observer) { observer_ = std::move(observer); }
  [[nodiscard]] const sync_observer& observer() const noexcept { return observer_; }

  /// Whether a Sync/Fsync of the file at `path` fails now.
  [[nodiscard]] bool fail_sync(std::string_view path) const noexcept {
    return fail_sync_.load() || (fail_log_syncs_.load() && path.ends_with(".log"));
  }
  [[nodiscard]] std::chrono::milliseconds sync_delay() const noexcept {
    return std::chrono::milliseconds(sync_delay_ms_.load());
  }
  [[nodiscard]] bool no_space() const noexcept { return no_space_.load(); }

 private:
  std::atomic<bool> fail_sync_{false};
  std::atomic<bool> fail_log_syncs_{false};
  std::atomic<bool> no_space_{false};
  std::atomic<std::int64_t> sync_delay_ms_{0};
  std::mutex hold_mutex_;
  std::condition_variable released_;
  bool held_ = false;
  sync_observer observer_;
};

}  // namespace gpustream::storage
