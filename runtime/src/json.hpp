// Internal: a small strict JSON reader for the engine's metadata (fewstep.contract). Inputs come
// from files users hand us, so it never trusts them: bounded depth, every error an Error.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace fewstep_impl {

struct Json {
  enum Type { Null, Bool, Number, String, Array, Object } type = Null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::map<std::string, Json> obj;

  // The member `key` of an object, or nullptr (also when this is not an object).
  const Json* get(const std::string& key) const;
};

// Parse `text` (one JSON value, surrounding whitespace allowed); throws fewstep_impl::Error
// (FEWSTEP_ERR_INVALID_ENGINE) naming `what` on malformed input.
Json parse_json(const std::string& text, const char* what);

}  // namespace fewstep_impl
