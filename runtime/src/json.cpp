#include "json.hpp"

#include "error.hpp"

namespace fewstep_impl {

namespace {

constexpr int kMaxDepth = 64;  // as the Python loader: deeper nesting is not a contract

// Deepest [ / { nesting of `s`, brackets inside strings skipped; stops counting past `limit`. A
// linear pre-scan so a 100k-deep text is refused before any parser sees it, whatever the parser does.
size_t nesting(const std::string& s, size_t limit) {
  size_t depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (in_string) {
      if (c == '\\') ++i;  // the escaped character cannot end the string
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest && (deepest = depth) > limit) return deepest;
    } else if ((c == ']' || c == '}') && depth) {
      --depth;
    }
  }
  return deepest;
}

}  // namespace

Json parse_json(const std::string& text, const char* what) {
  if (nesting(text, kMaxDepth) > size_t(kMaxDepth))
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, std::string(what) + ": malformed JSON (nested too deeply: more than " +
                                                std::to_string(kMaxDepth) + " levels of [ and {)");
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    // "[json.exception.parse_error.101] parse error at line 1, column 7: syntax error ...": drop the tag
    std::string msg = e.what();
    const size_t tag = msg.find("] ");
    if (msg.rfind("[json.exception.", 0) == 0 && tag != std::string::npos) msg.erase(0, tag + 2);
    throw Error(FEWSTEP_ERR_INVALID_ENGINE,
                std::string(what) + ": malformed JSON (" + msg + "; byte " + std::to_string(e.byte) + ")");
  } catch (const Json::exception& e) {  // parse() throws parse_error only; anything else is still bad input
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, std::string(what) + ": malformed JSON (" + e.what() + ")");
  }
}

}  // namespace fewstep_impl
