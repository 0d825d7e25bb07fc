#include "json.hpp"

#include <cstdlib>
#include <cstring>

#include "error.hpp"

namespace fewstep_impl {

const Json* Json::get(const std::string& key) const {
  if (type != Object) return nullptr;
  const auto it = obj.find(key);
  return it == obj.end() ? nullptr : &it->second;
}

namespace {

constexpr int kMaxDepth = 64;  // deeper nesting is not a contract; refusing it bounds the recursion

struct Parser {
  const std::string& s;
  const char* what;
  size_t i = 0;

  [[noreturn]] void fail(const char* msg) const {
    throw Error(FEWSTEP_ERR_INVALID_ENGINE,
                std::string(what) + ": malformed JSON (" + msg + " at offset " + std::to_string(i) + ")");
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool eat(char c) {
    ws();
    if (i < s.size() && s[i] == c) {
      ++i;
      return true;
    }
    return false;
  }
  void expect_word(const char* w) {
    const size_t n = std::strlen(w);
    if (s.compare(i, n, w) != 0) fail("unexpected token");
    i += n;
  }
  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xC0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += char(0xE0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    } else {
      out += char(0xF0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3F));
      out += char(0x80 | ((cp >> 6) & 0x3F));
      out += char(0x80 | (cp & 0x3F));
    }
  }
  unsigned hex4() {
    if (i + 4 > s.size()) fail("short \\u escape");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s[i++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string() {
    if (!eat('"')) fail("expected string");
    std::string out;
    while (true) {
      if (i >= s.size()) fail("unterminated string");
      const char c = s[i++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i >= s.size()) fail("unterminated escape");
      const char e = s[i++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < s.size() && s[i] == '\\' && s[i + 1] == 'u') {
            i += 2;
            const unsigned lo = hex4();
            if (lo < 0xDC00 || lo >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
  double number() {
    const size_t start = i;
    if (i < s.size() && s[i] == '-') ++i;
    while (i < s.size() && std::strchr("0123456789.eE+-", s[i]) && s[i] != '\0') ++i;
    const std::string tok = s.substr(start, i - start);
    if (tok.empty() || tok == "-") fail("bad number");
    char* end = nullptr;
    const double v = std::strtod(tok.c_str(), &end);
    if (end != tok.c_str() + tok.size()) fail("bad number");
    return v;
  }
  Json value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    ws();
    if (i >= s.size()) fail("unexpected end");
    Json v;
    const char c = s[i];
    if (c == '{') {
      ++i;
      v.type = Json::Object;
      if (eat('}')) return v;
      do {
        ws();
        std::string k = string();
        if (!eat(':')) fail("expected ':'");
        v.obj[std::move(k)] = value(depth + 1);
      } while (eat(','));
      if (!eat('}')) fail("expected '}'");
    } else if (c == '[') {
      ++i;
      v.type = Json::Array;
      if (eat(']')) return v;
      do v.arr.push_back(value(depth + 1));
      while (eat(','));
      if (!eat(']')) fail("expected ']'");
    } else if (c == '"') {
      v.type = Json::String;
      v.str = string();
    } else if (c == 't') {
      expect_word("true");
      v.type = Json::Bool;
      v.b = true;
    } else if (c == 'f') {
      expect_word("false");
      v.type = Json::Bool;
    } else if (c == 'n') {
      expect_word("null");
    } else if (c == 'N' || c == 'I') {  // Python's json.dumps writes NaN / Infinity
      expect_word(c == 'N' ? "NaN" : "Infinity");
      v.type = Json::Number;
      v.num = c == 'N' ? std::strtod("nan", nullptr) : std::strtod("inf", nullptr);
    } else {
      v.type = Json::Number;
      v.num = number();
    }
    return v;
  }
};

}  // namespace

Json parse_json(const std::string& text, const char* what) {
  Parser p{text, what};
  Json v = p.value(0);
  p.ws();
  if (p.i != text.size()) p.fail("trailing characters");
  return v;
}

}  // namespace fewstep_impl
