// Internal: the engine's metadata (fewstep.contract, fewstep.plan) parsed by nlohmann/json. Inputs
// come from files users hand us, so nothing is trusted: nesting depth is bounded before parsing,
// and every malformed text becomes an Error (no nlohmann exception leaves parse_json).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace fewstep_impl {

using Json = nlohmann::json;

// Parse `text` (one JSON value, surrounding whitespace allowed; strict RFC 8259: no NaN / Infinity
// literals, valid UTF-8); throws fewstep_impl::Error (FEWSTEP_ERR_INVALID_ENGINE) naming `what` on
// malformed input or nesting deeper than 64.
Json parse_json(const std::string& text, const char* what);

// The member `key` of an object, or nullptr (also when `v` is not an object).
inline const Json* member(const Json& v, const char* key) {
  if (!v.is_object()) return nullptr;
  const auto it = v.find(key);
  return it == v.end() ? nullptr : &*it;
}

}  // namespace fewstep_impl
