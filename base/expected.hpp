#pragma once
/// A minimal `expected<T, E>`: a value or an error, never both. C++20 has no std::expected, and the
/// project needs only this much of it. Every layer defines its own closed error type for E.

#include <type_traits>
#include <utility>
#include <variant>

#include "base/ensure.hpp"

namespace gpustream {

/// Wraps an error so that `expected<T, E>` can be built from it unambiguously.
template <class E>
struct unexpected {
  E error;
};

template <class E>
unexpected(E) -> unexpected<E>;

template <class T, class E>
class [[nodiscard]] expected {
 public:
  expected()
    requires std::is_default_constructible_v<T>
      : storage_(std::in_place_index<0>) {}
  expected(T value) : storage_(std::in_place_index<0>, std::move(value)) {}
  template <class G>
  expected(unexpected<G> failure) : storage_(std::in_place_index<1>, std::move(failure.error)) {}

  bool has_value() const noexcept { return storage_.index() == 0; }
  explicit operator bool() const noexcept { return has_value(); }

  T& value() & {
    GPUSTREAM_ENSURE(has_value());
    return std::get<0>(storage_);
  }
  const T& value() const& {
    GPUSTREAM_ENSURE(has_value());
    return std::get<0>(storage_);
  }
  T&& value() && {
    GPUSTREAM_ENSURE(has_value());
    return std::get<0>(std::move(storage_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const E& error() const& {
    GPUSTREAM_ENSURE(!has_value());
    return std::get<1>(storage_);
  }
  E&& error() && {
    GPUSTREAM_ENSURE(!has_value());
    return std::get<1>(std::move(storage_));
  }

 private:
  std::variant<T, E> storage_;
};

/// `expected<void, E>`: success carries no value.
template <class E>
class [[nodiscard]] expected<void, E> {
 public:
  expected() = default;
  template <class G>
  expected(unexpected<G> failure) : error_(std::move(failure.error)), failed_(true) {}

  bool has_value() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return has_value(); }
  void value() const { GPUSTREAM_ENSURE(has_value()); }

  const E& error() const& {
    GPUSTREAM_ENSURE(failed_);
    return error_;
  }

 private:
  E error_{};
  bool failed_ = false;
};

}  // namespace gpustream
