// Compile-time checks of the structs the Python side mirrors with ctypes (flashinfer_jit/abi.py).
// The generated sources assert each field's offset, size and type against the mirror
// (templates/abi_checks.jinja); field_slots() catches a C field the mirror lacks even where it
// would hide in padding. Host and device, no code.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

namespace fij {
namespace abi {

// Converts to anything: S{AnyField{}, ...} compiles with up to as many initializers as S has
// scalar slots (aggregate initialization elides the braces of array members).
struct AnyField {
  template <typename T>
  constexpr operator T() const noexcept;
};

template <typename S, typename Seq, typename = void>
struct initializable_with : std::false_type {};

template <typename S, size_t... I>
struct initializable_with<S, std::index_sequence<I...>, std::void_t<decltype(S{(void(I), AnyField{})...})>>
    : std::true_type {};

// True when aggregate S has exactly N scalar slots (fields, an array counting its elements).
template <typename S, size_t N>
constexpr bool field_slots() {
  return initializable_with<S, std::make_index_sequence<N>>::value &&
         !initializable_with<S, std::make_index_sequence<N + 1>>::value;
}

}  // namespace abi
}  // namespace fij
