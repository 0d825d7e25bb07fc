// The engine: one exported sampler .onnx run through ONNX Runtime's C API.
//
// ONNX Runtime is dlopen'ed at run time (never linked), so the same build runs with the CPU or
// the GPU wheel's library. We compile against the ORT_API_VERSION of the headers found at build
// time and ask the library for exactly that API table: newer libraries keep older tables.
#include <dlfcn.h>
#include <glob.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "error.hpp"
#include "fewstep.h"
#include "json.hpp"
#include "onnxruntime_c_api.h"

namespace fewstep_impl {
namespace {

// ---- The ONNX Runtime library: loaded once per process and kept (ORT does not support being
// unloaded; its env is a process-wide singleton anyway).
struct Ort {
  const OrtApi* api = nullptr;
  OrtEnv* env = nullptr;
  std::string path;
};

std::mutex g_ort_mutex;
Ort* g_ort = nullptr;  // intentionally never freed: lives until the process exits

// The pip-installed ONNX Runtime next to this library: libfewstep (or the _C module it is linked into)
// lies in site-packages/fewstep/lib/ (or fewstep/), the onnxruntime / onnxruntime-gpu wheel's library in
// site-packages/onnxruntime/capi/. Looks in this library's directory and up to three levels above it for
// onnxruntime/capi/libonnxruntime.so*; "" when there is none (a system install, a dev build).
std::string sibling_ort_library() {
  Dl_info info{};
  if (!dladdr(reinterpret_cast<const void*>(&sibling_ort_library), &info) || !info.dli_fname) return "";
  // Canonical: a library found through fewstep-run's RUNPATH is named fewstep/bin/../lib/libfewstep.so.
  char* real = realpath(info.dli_fname, nullptr);
  if (!real) return "";
  std::string dir = real;
  std::free(real);
  for (int up = 0; up < 4; ++up) {
    const size_t slash = dir.find_last_of('/');
    if (slash == std::string::npos) return "";
    dir.erase(slash);  // the parent (first pass: the library's own directory)
    std::string pattern;  // the directory escaped: only our own '*' is a wildcard
    for (const char c : dir) {
      if (c == '*' || c == '?' || c == '[' || c == '\\') pattern += '\\';
      pattern += c;
    }
    pattern += "/onnxruntime/capi/libonnxruntime.so*";
    glob_t g{};
    std::string hit;
    if (glob(pattern.c_str(), 0, nullptr, &g) == 0 && g.gl_pathc > 0) hit = g.gl_pathv[0];  // sorted: .so.1 < .so.1.x
    globfree(&g);
    if (!hit.empty()) return hit;
    if (dir.empty()) return "";
  }
  return "";
}

// Which ONNX Runtime: the caller's (params.ort_library), else $FEWSTEP_ORT_LIBRARY, else the pip-installed
// onnxruntime package beside this library, else the dynamic loader's libonnxruntime.so.
const Ort& ort(const char* requested) {
  std::string path = requested ? requested : "";
  if (path.empty()) {
    const char* env = std::getenv("FEWSTEP_ORT_LIBRARY");
    path = env && *env ? env : sibling_ort_library();
    if (path.empty()) path = "libonnxruntime.so";
  }
  std::lock_guard<std::mutex> lock(g_ort_mutex);
  if (g_ort) {
    if (requested && *requested && path != g_ort->path)
      throw Error(FEWSTEP_ERR_BACKEND, "ONNX Runtime is already loaded from " + g_ort->path +
                                           "; one process can use one library (asked for " + path + ")");
    return *g_ort;
  }
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib)
    throw Error(FEWSTEP_ERR_BACKEND,
                "cannot load ONNX Runtime (" + path + "): " + dlerror() +
                    "; install the onnxruntime (or onnxruntime-gpu) Python package (found by itself when fewstep is "
                    "pip-installed in the same environment) or point FEWSTEP_ORT_LIBRARY at its "
                    "onnxruntime/capi/libonnxruntime.so.*");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(lib, "OrtGetApiBase"));
  if (!get_base) throw Error(FEWSTEP_ERR_BACKEND, path + " is not ONNX Runtime (no OrtGetApiBase)");
  const OrtApi* api = get_base()->GetApi(ORT_API_VERSION);
  if (!api)
    throw Error(FEWSTEP_ERR_BACKEND, "ONNX Runtime " + std::string(get_base()->GetVersionString()) +
                                         " at " + path + " is older than the C API version " +
                                         std::to_string(ORT_API_VERSION) + " fewstep was built with");
  OrtEnv* env = nullptr;
  // FATAL only: every error reaches the caller as a status with ORT's message; its own logger would print
  // the same text to stderr a second time (and break the CLIs' one-line errors).
  if (OrtStatus* st = api->CreateEnv(ORT_LOGGING_LEVEL_FATAL, "fewstep", &env)) {
    const std::string msg = api->GetErrorMessage(st);
    api->ReleaseStatus(st);
    throw Error(FEWSTEP_ERR_BACKEND, "ONNX Runtime CreateEnv failed: " + msg);
  }
  g_ort = new Ort{api, env, path};
  return *g_ort;
}

// ORT's message on one line (an execution provider's may span many: OpenVINO's does): line breaks and the
// indentation after them become one space.
std::string one_line(const char* msg) {
  std::string out;
  bool gap = false;
  for (const char* p = msg ? msg : ""; *p; ++p) {
    if (*p == '\n' || *p == '\r') {
      gap = true;
    } else if (gap && (*p == ' ' || *p == '\t')) {
      continue;
    } else {
      if (gap && !out.empty()) out += ' ';
      gap = false;
      out += *p;
    }
  }
  return out;
}

// ONNX Runtime's message on one line without its build's source locations: ORT prefixes what went wrong with
// "/onnxruntime_src/.../file.cc:51 Namespace::Function(args) [ONNXRuntimeError] : 1 : FAIL : file.cc:1876 Function "
// (a missing or truncated external-data file read ~300 characters before its point).
std::string ort_message(const char* msg) {
  // A scan rather than std::regex: libstdc++'s regex recurses per character, and the message may quote a
  // hostile model's names at any length; cut to 4 KiB first, so the erasing below stays cheap whatever it quotes.
  std::string s = one_line(msg);
  if (s.size() > 4096) s.resize(4096), s += "...";
  const std::string tag = "[ONNXRuntimeError] : ";
  for (size_t at; (at = s.find(tag)) != std::string::npos;) {  // "[ONNXRuntimeError] : 1 : FAIL : "
    size_t e = at + tag.size();
    for (int field = 0; field < 2 && e < s.size(); ++field) {
      const size_t sep = s.find(" : ", e);
      if (sep == std::string::npos) break;
      e = sep + 3;
    }
    s.erase(at, e - at);
  }
  for (const char* ext : {".cc:", ".cpp:", ".h:"}) {  // "[path/]file.cc:123 Function[(args)] "
    for (size_t at = 0; (at = s.find(ext, at)) != std::string::npos;) {
      size_t e = at + std::strlen(ext), d = e;
      while (e < s.size() && std::isdigit(static_cast<unsigned char>(s[e]))) ++e;
      if (e == d || e >= s.size() || s[e] != ' ') {
        at = e;
        continue;
      }
      size_t b = at;
      while (b > 0 && s[b - 1] != ' ') --b;
      size_t f = ++e;
      while (f < s.size() && (std::isalnum(static_cast<unsigned char>(s[f])) || s[f] == '_' || s[f] == ':' ||
                              s[f] == '~'))
        ++f;
      if (f < s.size() && s[f] == '(') {  // its parameters, which may nest: std::function<bool(const T&)>
        size_t g = f;
        for (int depth = 0; g < s.size(); ++g) {
          depth += s[g] == '(' ? 1 : s[g] == ')' ? -1 : 0;
          if (depth == 0) break;
        }
        if (g < s.size()) f = g + 1;
      }
      if (f > e && f < s.size() && s[f] == ' ') e = f + 1;  // the function's name, when one follows
      s.erase(b, e - b);
      at = b;
    }
  }
  return s;
}

// Turn an OrtStatus into an Error (and release it).
void check(const OrtApi* api, OrtStatus* st, const char* what, fewstep_status code = FEWSTEP_ERR_BACKEND) {
  if (!st) return;
  const std::string msg = std::string(what) + ": " + ort_message(api->GetErrorMessage(st));
  api->ReleaseStatus(st);
  throw Error(code, msg);
}

// RAII for the ORT handles we hold only during load.
template <class T>
struct Owned {
  T* p = nullptr;
  void (*release)(T*) = nullptr;
  explicit Owned(void (*r)(T*)) : release(r) {}
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
  ~Owned() {
    if (p) release(p);
  }
};

// AllocatorFree returns a status (always null in practice); release it so nothing leaks.
void afree(const OrtApi* api, OrtAllocator* alloc, void* p) {
  if (OrtStatus* st = api->AllocatorFree(alloc, p)) api->ReleaseStatus(st);
}

struct InputSpec {
  std::string name;
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;  // -1 (or another negative) = dynamic
};

// One input of the engine as its contract declares it (checked against the graph at load).
struct EngineInput {
  std::string name;
  int32_t dtype = FEWSTEP_DTYPE_FLOAT32;  // fewstep_dtype (= the ONNX element type code)
  std::vector<int64_t> shape;             // -1 = the batch
  int32_t source = FEWSTEP_INPUT_REQUIRED;
  uint64_t fixed_count = 1;               // product of the non-batch sizes, <= kMaxValues
};

// The engine's one output: 'sample' [batch, *sample_shape] (the latents), or what the contract lists, e.g.
// 'image' [batch, 3, H, W] of an engine with the VAE decoder appended (`fewstep export --decode`).
struct EngineOutput {
  std::string name = "sample";
  std::vector<int64_t> shape;  // [-1 (the batch) or the fixed batch, *per-sample sizes]
  int64_t per_sample = 0;      // product of the per-sample sizes: the floats one sample writes
};

// 2^31 values (8 GiB of float32 per buffer) is far past any real sampler and keeps every size in range.
constexpr uint64_t kMaxValues = uint64_t(1) << 31;

}  // namespace
}  // namespace fewstep_impl

// The handle behind fewstep_engine*. Immutable after load, so concurrent fewstep_sample calls
// share it safely (OrtApi::Run is thread-safe on one session).
struct fewstep_engine {
  const OrtApi* api = nullptr;
  OrtSession* session = nullptr;
  OrtMemoryInfo* cpu = nullptr;
  std::map<std::string, std::string> metadata;
  std::string compute_dtype, plan_json, contract_json;
  fewstep_engine_info info{};
  bool has_noise = false, has_labels = false, has_guidance = false;
  std::vector<fewstep_impl::EngineInput> inputs;  // the contract's order (z [noise] [class_labels] [guidance] if unlisted)
  std::vector<fewstep_input_info> input_infos;    // the same, for fewstep_engine_input_info (names point into inputs)
  std::vector<const char*> input_names;           // inputs[i].name, for OrtApi::Run
  fewstep_impl::EngineOutput output;              // checked against the graph at load
  fewstep_output_info output_info{};              // the same, for fewstep_engine_output_info (name points into output)
  const char* output_name = "sample";             // output.name, for OrtApi::Run

  ~fewstep_engine() {
    if (session) api->ReleaseSession(session);
    if (cpu) api->ReleaseMemoryInfo(cpu);
  }
};

namespace fewstep_impl {
namespace {

std::string read_all_metadata(const OrtApi* api, OrtSession* session, fewstep_engine* e) {
  OrtAllocator* alloc = nullptr;
  check(api, api->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions", FEWSTEP_ERR_INTERNAL);
  Owned<OrtModelMetadata> meta(api->ReleaseModelMetadata);
  check(api, api->SessionGetModelMetadata(session, &meta.p), "SessionGetModelMetadata", FEWSTEP_ERR_INVALID_ENGINE);
  char** keys = nullptr;
  int64_t nkeys = 0;
  check(api, api->ModelMetadataGetCustomMetadataMapKeys(meta.p, alloc, &keys, &nkeys), "reading metadata_props",
        FEWSTEP_ERR_INVALID_ENGINE);
  // Copy every key/value into std::string first, then free ORT's buffers whatever happens.
  std::string err;
  for (int64_t k = 0; k < nkeys; ++k) {
    char* value = nullptr;
    if (err.empty()) {
      if (OrtStatus* st = api->ModelMetadataLookupCustomMetadataMap(meta.p, alloc, keys[k], &value)) {
        err = api->GetErrorMessage(st);
        api->ReleaseStatus(st);
      } else if (value) {
        e->metadata[keys[k]] = value;
      }
    }
    if (value) afree(api, alloc, value);
    afree(api, alloc, keys[k]);
  }
  if (keys) afree(api, alloc, keys);
  return err;
}

std::vector<InputSpec> session_inputs(const OrtApi* api, OrtSession* session, bool outputs) {
  OrtAllocator* alloc = nullptr;
  check(api, api->GetAllocatorWithDefaultOptions(&alloc), "GetAllocatorWithDefaultOptions", FEWSTEP_ERR_INTERNAL);
  size_t n = 0;
  check(api, outputs ? api->SessionGetOutputCount(session, &n) : api->SessionGetInputCount(session, &n),
        "reading the graph's inputs/outputs", FEWSTEP_ERR_INVALID_ENGINE);
  std::vector<InputSpec> specs;
  for (size_t i = 0; i < n; ++i) {
    InputSpec spec{};
    char* name = nullptr;
    check(api, outputs ? api->SessionGetOutputName(session, i, alloc, &name)
                       : api->SessionGetInputName(session, i, alloc, &name),
          "reading a graph input name", FEWSTEP_ERR_INVALID_ENGINE);
    spec.name = name;
    afree(api, alloc, name);
    Owned<OrtTypeInfo> ti(api->ReleaseTypeInfo);
    check(api, outputs ? api->SessionGetOutputTypeInfo(session, i, &ti.p) : api->SessionGetInputTypeInfo(session, i, &ti.p),
          "reading a graph input type", FEWSTEP_ERR_INVALID_ENGINE);
    const OrtTensorTypeAndShapeInfo* tinfo = nullptr;
    check(api, api->CastTypeInfoToTensorInfo(ti.p, &tinfo), "graph input type", FEWSTEP_ERR_INVALID_ENGINE);
    if (!tinfo) throw Error(FEWSTEP_ERR_INVALID_ENGINE, "graph input/output " + spec.name + " is not a tensor");
    check(api, api->GetTensorElementType(tinfo, &spec.type), "graph input dtype", FEWSTEP_ERR_INVALID_ENGINE);
    size_t nd = 0;
    check(api, api->GetDimensionsCount(tinfo, &nd), "graph input rank", FEWSTEP_ERR_INVALID_ENGINE);
    spec.dims.resize(nd);
    if (nd) check(api, api->GetDimensions(tinfo, spec.dims.data(), nd), "graph input shape", FEWSTEP_ERR_INVALID_ENGINE);
    specs.push_back(std::move(spec));
  }
  return specs;
}

[[noreturn]] void bad_contract(const std::string& path, const std::string& why) {
  throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": fewstep.contract: " + why);
}

// A JSON number as a double (integers beyond 2^53 round, as every number did in the old reader); NaN if not a number.
double num(const Json* v) { return v && v->is_number() ? v->get<double>() : std::nan(""); }

int64_t json_int(const Json* v, const std::string& path, const char* key, int64_t lo, int64_t hi) {
  const double x = num(v);
  if (!(x >= double(lo) && x <= double(hi)) || x != std::floor(x))
    bad_contract(path, std::string(key) + " must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return int64_t(x);
}

// The plan the engine carries (fewstep.plan metadata, handed to embedders as plan_json) must be a valid
// fewstep.plan/1 whose rows are the ones baked into the graph: as many as the contract's nfe, with as many
// stochastic rows (g != 0) as noise slices, every number finite and every sigma > 0.
void check_plan(const std::string& path, const std::string& text, const fewstep_engine_info& info) {
  const auto bad = [&](const std::string& why) {
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": fewstep.plan: " + why);
  };
  const Json p = parse_json(text, (path + ": fewstep.plan").c_str());
  const Json* fmt = member(p, "format");
  if (!fmt || !fmt->is_string() || fmt->get_ref<const std::string&>() != "fewstep.plan/1") bad("not a fewstep.plan/1");
  const auto number = [&](const Json* v, const std::string& where, bool positive) {
    const double x = num(v);
    if (!std::isfinite(x) || (positive && x <= 0))
      bad(where + (positive ? " must be a finite number > 0" : " must be a finite number"));
    return x;
  };
  number(member(p, "sigma_init"), "sigma_init", true);
  const Json* rows = member(p, "rows");
  if (!rows || !rows->is_array() || rows->empty()) bad("rows must be a non-empty list");
  if (int64_t(rows->size()) != info.nfe)
    bad("has " + std::to_string(rows->size()) + " rows, the contract says nfe " + std::to_string(info.nfe));
  int32_t stochastic = 0;
  for (size_t i = 0; i < rows->size(); ++i) {
    const Json& r = (*rows)[i];
    const std::string w = "rows[" + std::to_string(i) + "]";
    if (!r.is_object()) bad(w + " must be an object");
    number(member(r, "sigma"), w + ".sigma", true);
    for (const char* k : {"a", "c"}) number(member(r, k), w + "." + k, false);
    for (const char* k : {"g", "s"})
      if (const Json* v = member(r, k)) number(v, w + "." + k, false);
    for (const char* k : {"p", "q"}) {
      const Json* l = member(r, k);
      if (!l && std::strcmp(k, "p") == 0) continue;
      if (!l || !l->is_array() || l->size() > 11) bad(w + "." + k + " must be a list of at most 11 numbers");
      for (size_t j = 0; j < l->size(); ++j) number(&(*l)[j], w + "." + k + "[" + std::to_string(j) + "]", false);
    }
    const Json* gd = member(r, "guidance");
    if (gd && !gd->is_null()) number(gd, w + ".guidance", false);
    const Json* g = member(r, "g");
    if (g && num(g) != 0.0) ++stochastic;  // g, when present, was checked finite above
  }
  if (stochastic != info.n_stochastic)
    bad(std::to_string(stochastic) + " stochastic rows, the contract says n_stochastic " +
        std::to_string(info.n_stochastic));
}

// The metadata entry `key`, or null when the engine has none.
const std::string* meta(const fewstep_engine* e, const char* key) {
  const auto it = e->metadata.find(key);
  return it == e->metadata.end() ? nullptr : &it->second;
}

// fewstep.format and fewstep.kind say this is a sampler engine we can read; keeps the contract and plan
// texts (handed to embedders as they are) and returns the parsed contract.
Json read_header(fewstep_engine* e, const std::string& path) {
  const std::string* format = meta(e, "fewstep.format");
  if (!format)
    throw Error(FEWSTEP_ERR_INVALID_ENGINE,
                path + ": an ONNX model without fewstep metadata (no fewstep.format); export it with `fewstep export`");
  if (*format != "fewstep.engine/1")
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": fewstep.format is \"" + *format +
                                                "\"; this runtime reads fewstep.engine/1");
  const std::string* kind = meta(e, "fewstep.kind");
  if (!kind || *kind != "sampler")
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": fewstep.kind is " + (kind ? "\"" + *kind + "\"" : "missing") +
                                                "; only sampler engines can be sampled (a step graph runs one evaluation)");
  const std::string* contract = meta(e, "fewstep.contract");
  if (!contract) throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": fewstep.contract metadata missing");
  e->contract_json = *contract;
  if (const std::string* plan = meta(e, "fewstep.plan")) e->plan_json = *plan;
  Json c = parse_json(*contract, (path + ": fewstep.contract").c_str());
  if (!c.is_object()) bad_contract(path, "not a JSON object");
  return c;
}

// sample_shape: 1..FEWSTEP_MAX_DIMS positive sizes whose product (per_sample) stays below 2^40.
void parse_sample_shape(const Json& c, const std::string& path, fewstep_engine_info& info) {
  const Json* shape = member(c, "sample_shape");
  if (!shape || !shape->is_array() || shape->empty() || shape->size() > FEWSTEP_MAX_DIMS)
    bad_contract(path, "sample_shape must be a list of 1.." + std::to_string(FEWSTEP_MAX_DIMS) + " sizes");
  info.ndim = int32_t(shape->size());
  info.per_sample = 1;
  for (int d = 0; d < info.ndim; ++d) {
    info.sample_shape[d] = json_int(&(*shape)[size_t(d)], path, "sample_shape entries", 1, int64_t(1) << 31);
    if (info.per_sample > (int64_t(1) << 40) / info.sample_shape[d]) bad_contract(path, "sample_shape too large");
    info.per_sample *= info.sample_shape[d];
  }
}

// The contract's other fields; an optional field that is present must be well-formed.
void parse_contract_fields(const Json& c, const std::string& path, fewstep_engine* e) {
  fewstep_engine_info& info = e->info;
  info.nfe = int32_t(json_int(member(c, "nfe"), path, "nfe", 0, 1 << 20));
  info.n_stochastic = int32_t(json_int(member(c, "n_stochastic"), path, "n_stochastic", 0, 1 << 20));
  const Json* nc = member(c, "num_classes");
  info.num_classes = (!nc || nc->is_null()) ? 0 : int32_t(json_int(nc, path, "num_classes", 1, 1 << 30));
  const Json* nl = member(c, "null_label");
  info.null_label = (!nl || nl->is_null()) ? -1 : int32_t(json_int(nl, path, "null_label", 0, 1 << 30));
  const Json* gi = member(c, "guidance_input");
  if (gi && !gi->is_boolean()) bad_contract(path, "guidance_input must be true or false");
  info.guidance_input = gi && gi->get<bool>();
  const Json* si = member(c, "sigma_init");
  const double sigma_init = num(si);
  if (si && (!std::isfinite(sigma_init) || sigma_init <= 0)) bad_contract(path, "sigma_init must be a finite number > 0");
  info.sigma_init = si ? sigma_init : 0.0;
  const Json* cd = member(c, "compute_dtype");
  const std::string dtype = cd && cd->is_string() ? cd->get<std::string>() : "";
  if (cd && dtype != "float32" && dtype != "float16" && dtype != "bfloat16")
    bad_contract(path, "compute_dtype must be \"float32\", \"float16\" or \"bfloat16\"");
  e->compute_dtype = cd ? dtype : "float32";
}

const InputSpec* find_spec(const std::vector<InputSpec>& v, const char* name) {
  for (const auto& s : v)
    if (s.name == name) return &s;
  return nullptr;
}

// The graph tensor `name` exists with dtype `type` and shape [lead dims..., *sample_shape] (class_labels and
// guidance: the lead dims only); a dynamic dimension matches any size.
void expect_tensor(const std::string& path, const fewstep_engine_info& info, const InputSpec* s, const char* name,
                   ONNXTensorElementDataType type, size_t lead) {
  if (!s) bad_contract(path, std::string("the graph has no input/output '") + name + "'");
  if (s->type != type) bad_contract(path, std::string("'") + name + "' has the wrong dtype");
  const size_t want = lead + (std::strcmp(name, "class_labels") && std::strcmp(name, "guidance") ? size_t(info.ndim) : 0);
  if (s->dims.size() != want) bad_contract(path, std::string("'") + name + "' has rank " + std::to_string(s->dims.size()) +
                                                     ", expected " + std::to_string(want));
  for (size_t d = lead; d < want; ++d)
    if (s->dims[d] >= 0 && s->dims[d] != info.sample_shape[d - lead])
      bad_contract(path, std::string("'") + name + "' shape does not match sample_shape");
}

// A name as it may appear in a one-line message: at most 64 characters, control bytes as '?'.
std::string printable(const std::string& name) {
  std::string out;
  for (const char ch : name.substr(0, 64)) out += (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ? '?' : ch;
  return name.size() > 64 ? out + "..." : out;
}

std::string dtype_name(int32_t t) { return t == FEWSTEP_DTYPE_INT64 ? "int64" : "float32"; }

// "[batch, 77, 768]"; with batch > 0 the batch entries are replaced by it.
std::string shape_text(const std::vector<int64_t>& dims, int64_t batch = 0) {
  std::string s = "[";
  for (size_t d = 0; d < dims.size(); ++d)
    s += (d ? ", " : "") + (dims[d] < 0 ? (batch > 0 ? std::to_string(batch) : std::string("batch"))
                                        : std::to_string(dims[d]));
  return s + "]";
}

// The inputs z [noise] [class_labels] [guidance] implied by the contract's other fields; the graph must have
// them with those dtypes and shapes (checked here, as before contracts listed their inputs). Sets fixed_batch.
std::vector<EngineInput> implied_inputs(fewstep_engine* e, const std::string& path, const std::vector<InputSpec>& graph) {
  fewstep_engine_info& info = e->info;
  const InputSpec* z = find_spec(graph, "z");
  expect_tensor(path, info, z, "z", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1);
  info.fixed_batch = z->dims[0] > 0 ? z->dims[0] : 0;
  const int64_t b = info.fixed_batch ? info.fixed_batch : -1;
  const std::vector<int64_t> ss(info.sample_shape, info.sample_shape + info.ndim);
  std::vector<EngineInput> out;
  std::vector<int64_t> zs{b};
  zs.insert(zs.end(), ss.begin(), ss.end());
  out.push_back({"z", FEWSTEP_DTYPE_FLOAT32, zs, FEWSTEP_INPUT_SEED, 1});
  if (info.n_stochastic > 0) {
    const InputSpec* nz = find_spec(graph, "noise");
    expect_tensor(path, info, nz, "noise", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 2);
    if (nz->dims[0] >= 0 && nz->dims[0] != info.n_stochastic) bad_contract(path, "'noise' has the wrong number of rows");
    std::vector<int64_t> ns{info.n_stochastic};
    ns.insert(ns.end(), zs.begin(), zs.end());
    out.push_back({"noise", FEWSTEP_DTYPE_FLOAT32, ns, FEWSTEP_INPUT_SEED_ONLY, 1});
  }
  if (info.num_classes > 0) {
    expect_tensor(path, info, find_spec(graph, "class_labels"), "class_labels", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, 1);
    out.push_back({"class_labels", FEWSTEP_DTYPE_INT64, {b}, FEWSTEP_INPUT_REQUIRED, 1});
  }
  if (info.guidance_input) {
    // Exporters before issue 19 listed a guidance input for plans that fix W on every row, whose graph reads
    // none (ONNX drops an unread input): name the fix rather than only the mismatch.
    if (!find_spec(graph, "guidance"))
      bad_contract(path, "the contract lists a 'guidance' input the graph does not have (a plan that fixes W on "
                         "every row, exported by an older fewstep: export it again)");
    expect_tensor(path, info, find_spec(graph, "guidance"), "guidance", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1);
    out.push_back({"guidance", FEWSTEP_DTYPE_FLOAT32, {b}, FEWSTEP_INPUT_REQUIRED, 1});
  }
  for (EngineInput& in : out)
    for (const int64_t d : in.shape) in.fixed_count *= uint64_t(d < 0 ? 1 : d);
  return out;
}

// The "name" of a listed input or output. Printable names only: every message that names one stays one line.
std::string listed_name(const Json& j, const std::string& path, const std::string& where) {
  const Json* name = member(j, "name");
  if (!name || !name->is_string() || name->get_ref<const std::string&>().empty() ||
      name->get_ref<const std::string&>().size() > 256 || printable(name->get<std::string>()) != name->get<std::string>())
    bad_contract(path, where + ".name must be a non-empty string of at most 64 printable characters");
  return name->get<std::string>();
}

// Entry i of the contract's "inputs": {name, dtype "float32" | "int64", shape of "batch" and sizes >= 1}.
EngineInput parse_listed_input(const Json& j, const std::string& path, size_t i) {
  const std::string where = "inputs[" + std::to_string(i) + "]";
  if (!j.is_object()) bad_contract(path, where + " must be an object {name, dtype, shape}");
  EngineInput in;
  in.name = listed_name(j, path, where);
  const std::string w = where + " ('" + printable(in.name) + "')";
  const Json* dt = member(j, "dtype");
  const std::string dts = dt && dt->is_string() ? dt->get<std::string>() : "";
  if (dts != "float32" && dts != "int64") bad_contract(path, w + ": dtype must be \"float32\" or \"int64\"");
  in.dtype = dts == "int64" ? FEWSTEP_DTYPE_INT64 : FEWSTEP_DTYPE_FLOAT32;
  const Json* shape = member(j, "shape");
  if (!shape || !shape->is_array() || shape->size() > FEWSTEP_MAX_INPUT_DIMS)
    bad_contract(path, w + ": shape must be a list of at most " + std::to_string(FEWSTEP_MAX_INPUT_DIMS) +
                           " entries, each \"batch\" or a size");
  for (size_t d = 0; d < shape->size(); ++d) {
    const Json& v = (*shape)[d];
    if (v.is_string() && v.get_ref<const std::string&>() == "batch") {
      in.shape.push_back(-1);
      continue;
    }
    in.shape.push_back(json_int(&v, path, (w + ": shape entries").c_str(), 1, int64_t(kMaxValues)));
    if (in.fixed_count > kMaxValues / uint64_t(in.shape.back()))
      bad_contract(path, w + ": shape holds more than 2^31 values per sample");
    in.fixed_count *= uint64_t(in.shape.back());
  }
  return in;
}

// A listed conditioning input against the graph's: same dtype and rank, and every static graph size equal
// to the contract's (a "batch" entry only where the engine's batch is fixed to that size).
void check_against_graph(const std::string& path, const EngineInput& in, const InputSpec* g, int64_t fixed_batch) {
  const std::string w = "input '" + printable(in.name) + "'";
  if (!g) bad_contract(path, "lists " + w + ", which the graph does not have");
  if (int32_t(g->type) != in.dtype) bad_contract(path, w + " is " + dtype_name(in.dtype) + " but not in the graph");
  if (g->dims.size() != in.shape.size())
    bad_contract(path, w + " has rank " + std::to_string(in.shape.size()) + ", the graph's " +
                           std::to_string(g->dims.size()));
  for (size_t d = 0; d < in.shape.size(); ++d) {
    if (g->dims[d] < 0) continue;
    const int64_t want = in.shape[d] < 0 ? fixed_batch : in.shape[d];
    if (g->dims[d] != want) bad_contract(path, w + " has shape " + shape_text(in.shape) + ", the graph's differs");
  }
}

// The engine's inputs: the contract's "inputs" list when present (every graph input, once, in that order),
// else the implied ones. A listed z / noise / class_labels / guidance must be the implied one exactly;
// every other listed input is a conditioning tensor the caller gives.
void bind_inputs(fewstep_engine* e, const std::string& path, const Json& c, const std::vector<InputSpec>& graph) {
  const std::vector<EngineInput> implied = implied_inputs(e, path, graph);
  const Json* listed = member(c, "inputs");
  std::vector<EngineInput>& inputs = e->inputs;
  if (!listed) {
    inputs = implied;
  } else {
    if (!listed->is_array() || listed->size() > 256) bad_contract(path, "inputs must be a list of at most 256 inputs");
    for (size_t i = 0; i < listed->size(); ++i) {
      EngineInput in = parse_listed_input((*listed)[i], path, i);
      for (const EngineInput& prev : inputs)
        if (prev.name == in.name) bad_contract(path, "inputs lists '" + printable(in.name) + "' twice");
      const EngineInput* imp = nullptr;
      for (const EngineInput& x : implied)
        if (x.name == in.name) imp = &x;
      const bool reserved = in.name == "z" || in.name == "noise" || in.name == "class_labels" || in.name == "guidance";
      if (reserved && !imp)
        bad_contract(path, "inputs lists '" + in.name + "', which n_stochastic / num_classes / guidance_input rule out");
      if (imp) {
        if (imp->dtype != in.dtype || imp->shape != in.shape)
          bad_contract(path, "inputs lists '" + in.name + "' as " + dtype_name(in.dtype) + " " + shape_text(in.shape) +
                                 ", the engine's is " + dtype_name(imp->dtype) + " " + shape_text(imp->shape));
        in.source = imp->source;
      } else {
        check_against_graph(path, in, find_spec(graph, in.name.c_str()), e->info.fixed_batch);
      }
      inputs.push_back(std::move(in));
    }
    for (const EngineInput& x : implied) {
      bool found = false;
      for (const EngineInput& in : inputs) found = found || in.name == x.name;
      if (!found) bad_contract(path, "inputs does not list '" + x.name + "'");
    }
  }
  if (graph.size() != inputs.size())
    bad_contract(path, "the graph has " + std::to_string(graph.size()) + " inputs, the contract names " +
                           std::to_string(inputs.size()));
  for (const EngineInput& in : inputs) {
    e->has_noise = e->has_noise || in.name == "noise";
    e->has_labels = e->has_labels || in.name == "class_labels";
    e->has_guidance = e->has_guidance || in.name == "guidance";
  }
  for (const EngineInput& in : inputs) {  // inputs is final: the names' storage no longer moves
    fewstep_input_info ii{};
    ii.name = in.name.c_str();
    ii.ndim = int32_t(in.shape.size());
    std::copy(in.shape.begin(), in.shape.end(), ii.shape);
    ii.dtype = in.dtype;
    ii.source = in.source;
    e->input_infos.push_back(ii);
    e->input_names.push_back(in.name.c_str());
  }
}

// The engine's output: the contract's "outputs" (one float32 tensor [batch, *sizes]; the batch entry as the
// inputs write it: "batch", or the fixed batch) or, for a contract without the list, 'sample'
// [batch, *sample_shape]. 'sample' is always the latents: any other shape for it is refused. The graph must
// have that output with that dtype, rank and every static size. Sizes are bounded before any product:
// at most FEWSTEP_MAX_DIMS sizes per sample, each and their product <= 2^31.
void bind_output(fewstep_engine* e, const std::string& path, const Json& c, const std::vector<InputSpec>& graph) {
  const fewstep_engine_info& info = e->info;
  const int64_t b = info.fixed_batch ? info.fixed_batch : -1;
  std::vector<int64_t> latents{b};
  latents.insert(latents.end(), info.sample_shape, info.sample_shape + info.ndim);
  EngineOutput& out = e->output;
  const Json* listed = member(c, "outputs");
  if (!listed) {
    out.shape = latents;
    out.per_sample = info.per_sample;
  } else {
    if (!listed->is_array() || listed->size() != 1)
      bad_contract(path, "outputs must be a list of one output {name, dtype, shape}");
    const Json& j = (*listed)[0];
    if (!j.is_object()) bad_contract(path, "outputs[0] must be an object {name, dtype, shape}");
    out.name = listed_name(j, path, "outputs[0]");
    const std::string w = "outputs[0] ('" + out.name + "')";
    const Json* dt = member(j, "dtype");
    if (!dt || !dt->is_string() || dt->get_ref<const std::string&>() != "float32")
      bad_contract(path, w + ": dtype must be \"float32\"");
    const Json* shape = member(j, "shape");
    if (!shape || !shape->is_array() || shape->size() < 2 || shape->size() > FEWSTEP_MAX_DIMS + 1)
      bad_contract(path, w + ": shape must be the batch and 1.." + std::to_string(FEWSTEP_MAX_DIMS) + " sizes");
    const Json& lead = (*shape)[0];
    const bool dynamic = lead.is_string() && lead.get_ref<const std::string&>() == "batch";
    if (dynamic != (b < 0) || (!dynamic && num(&lead) != double(b)))
      bad_contract(path, w + ": the first shape entry must be " +
                             (b < 0 ? std::string("\"batch\"") : "the engine's fixed batch " + std::to_string(b)));
    out.shape = {b};
    uint64_t per_sample = 1;
    for (size_t d = 1; d < shape->size(); ++d) {
      out.shape.push_back(json_int(&(*shape)[d], path, (w + ": shape entries").c_str(), 1, int64_t(kMaxValues)));
      if (per_sample > kMaxValues / uint64_t(out.shape.back()))
        bad_contract(path, w + ": shape holds more than 2^31 values per sample");
      per_sample *= uint64_t(out.shape.back());
    }
    out.per_sample = int64_t(per_sample);
    if (out.name == "sample" && out.shape != latents)
      bad_contract(path, w + " has shape " + shape_text(out.shape) + ", but 'sample' is the latents " +
                             shape_text(latents) + " (sample_shape)");
  }
  const InputSpec* g = find_spec(graph, out.name.c_str());
  const std::string w = "output '" + out.name + "'";
  if (!g) bad_contract(path, "the graph has no " + w);
  if (g->type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) bad_contract(path, w + " is not float32 in the graph");
  if (g->dims.size() != out.shape.size())
    bad_contract(path, w + " has rank " + std::to_string(out.shape.size()) + ", the graph's " +
                           std::to_string(g->dims.size()));
  for (size_t d = 0; d < out.shape.size(); ++d)
    if (g->dims[d] >= 0 && g->dims[d] != out.shape[d])  // a static graph batch under a dynamic engine too
      bad_contract(path, w + " has shape " + shape_text(out.shape) + ", the graph's " + shape_text(g->dims) +
                             (out.name == "sample" ? " (sample_shape does not match the graph)" : ""));
  fewstep_output_info& oi = e->output_info;
  oi.name = out.name.c_str();
  oi.ndim = int32_t(out.shape.size());
  std::copy(out.shape.begin(), out.shape.end(), oi.shape);
  oi.dtype = FEWSTEP_DTYPE_FLOAT32;
  oi.per_sample = out.per_sample;
  e->output_name = out.name.c_str();
}

// Parse the metadata and check it against the graph; fills e->info and the input list.
void read_contract(fewstep_engine* e, const std::string& path, const std::vector<InputSpec>& inputs,
                   const std::vector<InputSpec>& outputs) {
  const Json c = read_header(e, path);
  parse_sample_shape(c, path, e->info);
  parse_contract_fields(c, path, e);
  if (!e->plan_json.empty()) check_plan(path, e->plan_json, e->info);
  // The graph must be what the contract says: these checks turn a mismatched file into a
  // clear load error instead of a failure (or worse, a silent misuse) at sample time.
  bind_inputs(e, path, c, inputs);
  bind_output(e, path, c, outputs);
  if (e->info.null_label >= 0 && e->info.num_classes > 0 && e->info.null_label < e->info.num_classes)
    bad_contract(path, "null_label must not be one of the classes 0..num_classes-1");
}

void append_provider(const OrtApi* api, OrtSessionOptions* so, const fewstep_engine_params& p, const std::string& lib) {
  if (p.provider == FEWSTEP_PROVIDER_OPENVINO) {
    // OpenVINO on the CPU in float32 (its CPU plugin would otherwise pick bf16 where the CPU has it, outside the
    // engine's export tolerance); its own thread pool runs the nodes it takes, so the thread count goes to it too.
    const std::string threads = std::to_string(p.intra_op_threads);
    std::vector<const char*> keys{"device_type", "precision"}, vals{"CPU", "FP32"};
    if (p.intra_op_threads) keys.push_back("num_of_threads"), vals.push_back(threads.c_str());
    if (OrtStatus* st = api->SessionOptionsAppendExecutionProvider_OpenVINO_V2(so, keys.data(), vals.data(), keys.size())) {
      const std::string msg = ort_message(api->GetErrorMessage(st));
      api->ReleaseStatus(st);
      throw Error(FEWSTEP_ERR_UNSUPPORTED,
                  "OpenVINO execution provider: not available in the ONNX Runtime library " + lib + " (" + msg +
                      "); it needs the onnxruntime-openvino build: point FEWSTEP_ORT_LIBRARY (or ort_library / "
                      "--ort-library) at its onnxruntime/capi/libonnxruntime.so.*");
    }
    return;
  }
  const std::string dev = std::to_string(p.device_id);
  if (p.provider == FEWSTEP_PROVIDER_TENSORRT) {
    OrtTensorRTProviderOptionsV2* trt = nullptr;
    check(api, api->CreateTensorRTProviderOptions(&trt), "TensorRT provider options", FEWSTEP_ERR_UNSUPPORTED);
    std::vector<const char*> keys{"device_id"}, vals{dev.c_str()};
    if (p.cuda_graph) keys.push_back("trt_cuda_graph_enable"), vals.push_back("1");
    if (p.engine_cache_dir) {
      keys.insert(keys.end(), {"trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                               "trt_timing_cache_path"});
      vals.insert(vals.end(), {"1", p.engine_cache_dir, "1", p.engine_cache_dir});
    }
    OrtStatus* st = api->UpdateTensorRTProviderOptions(trt, keys.data(), vals.data(), keys.size());
    if (!st) st = api->SessionOptionsAppendExecutionProvider_TensorRT_V2(so, trt);
    api->ReleaseTensorRTProviderOptions(trt);
    check(api, st, "TensorRT execution provider (needs onnxruntime-gpu with TensorRT)", FEWSTEP_ERR_UNSUPPORTED);
  }
  if (p.provider == FEWSTEP_PROVIDER_CUDA || p.provider == FEWSTEP_PROVIDER_TENSORRT) {
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    check(api, api->CreateCUDAProviderOptions(&cuda), "CUDA provider options", FEWSTEP_ERR_UNSUPPORTED);
    // With TensorRT in front, CUDA graphs are TensorRT's business.
    const char* graph = p.cuda_graph && p.provider == FEWSTEP_PROVIDER_CUDA ? "1" : "0";
    const char* keys[] = {"device_id", "enable_cuda_graph"};
    const char* vals[] = {dev.c_str(), graph};
    OrtStatus* st = api->UpdateCUDAProviderOptions(cuda, keys, vals, 2);
    if (!st) st = api->SessionOptionsAppendExecutionProvider_CUDA_V2(so, cuda);
    api->ReleaseCUDAProviderOptions(cuda);
    check(api, st, "CUDA execution provider (needs the onnxruntime-gpu library)", FEWSTEP_ERR_UNSUPPORTED);
  }
}

fewstep_engine* load(const char* path_c, const fewstep_engine_params& p) {
  const std::string path = path_c;
  if (p.intra_op_threads < 0 || p.inter_op_threads < 0 || p.device_id < 0 ||
      p.provider < FEWSTEP_PROVIDER_CPU || p.provider > FEWSTEP_PROVIDER_OPENVINO)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_engine_params: threads and device_id must be >= 0 and "
                                              "provider one of FEWSTEP_PROVIDER_CPU / _CUDA / _TENSORRT / _OPENVINO");
  // ONNX Runtime crashes (SIGSEGV) or hangs creating 10^5 threads; past 4x the cores threads only spin.
  const int cap = std::max(8, 4 * int(std::thread::hardware_concurrency()));
  if (p.intra_op_threads > cap || p.inter_op_threads > cap)
    throw Error(FEWSTEP_ERR_OUT_OF_RANGE, "fewstep_engine_params: at most " + std::to_string(cap) +
                                              " threads (4x this machine's cores), got " +
                                              std::to_string(std::max(p.intra_op_threads, p.inter_op_threads)));
  {  // Our own checks first: ORT's messages for a missing file are less direct, and opening a FIFO hangs.
    struct stat st{};
    if (stat(path.c_str(), &st) != 0)
      throw Error(FEWSTEP_ERR_IO, "cannot open engine file " + path + ": " + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) throw Error(FEWSTEP_ERR_IO, path + ": is a directory, not an engine file");
    if (!S_ISREG(st.st_mode)) throw Error(FEWSTEP_ERR_IO, path + ": not a regular file (a pipe, socket or device)");
    if (st.st_size == 0) throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": empty file (not an ONNX model)");
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(FEWSTEP_ERR_IO, "cannot open engine file " + path + ": " + std::strerror(errno));
  }
  const Ort& o = ort(p.ort_library);
  const OrtApi* api = o.api;
  Owned<OrtSessionOptions> so(api->ReleaseSessionOptions);
  check(api, api->CreateSessionOptions(&so.p), "CreateSessionOptions");
  if (p.intra_op_threads) check(api, api->SetIntraOpNumThreads(so.p, p.intra_op_threads), "SetIntraOpNumThreads");
  if (p.inter_op_threads) check(api, api->SetInterOpNumThreads(so.p, p.inter_op_threads), "SetInterOpNumThreads");
  append_provider(api, so.p, p, o.path);

  std::unique_ptr<fewstep_engine> e(new fewstep_engine);
  e->api = api;
  check(api, api->CreateSession(o.env, path.c_str(), so.p, &e->session), (path + ": not a loadable ONNX model").c_str(),
        FEWSTEP_ERR_INVALID_ENGINE);
  const std::string meta_err = read_all_metadata(api, e->session, e.get());
  if (!meta_err.empty()) throw Error(FEWSTEP_ERR_INVALID_ENGINE, path + ": cannot read metadata: " + meta_err);
  read_contract(e.get(), path, session_inputs(api, e->session, false), session_inputs(api, e->session, true));
  check(api, api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &e->cpu), "CreateCpuMemoryInfo");
  e->info.compute_dtype = e->compute_dtype.c_str();
  e->info.plan_json = e->plan_json.c_str();
  e->info.contract_json = e->contract_json.c_str();
  return e.release();
}

// The batch and the output buffer against the engine; returns the number of values one run writes (batch x the
// output's per-sample size: the latents', or the image's of a --decode engine).
size_t checked_size(const fewstep_engine* e, int64_t batch, const float* out, size_t out_len) {
  const fewstep_engine_info& info = e->info;
  const int64_t per_sample = e->output.per_sample;
  if (batch < 1) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "batch must be >= 1, got " + std::to_string(batch));
  if (batch > (int64_t(1) << 32))
    throw Error(FEWSTEP_ERR_OUT_OF_RANGE, "batch must be <= 2^32 (sample indices are 32-bit)");
  if (info.fixed_batch && batch != info.fixed_batch)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "this engine was exported for batch " + std::to_string(info.fixed_batch) +
                                                  ", got " + std::to_string(batch));
  if (!out) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "out is NULL");
  if (uint64_t(batch) > kMaxValues / uint64_t(per_sample))
    throw Error(FEWSTEP_ERR_OUT_OF_RANGE, "batch " + std::to_string(batch) + " x " + std::to_string(per_sample) +
                                              " values per sample is more than the 2^31 values one run may hold");
  const size_t n = size_t(batch) * size_t(per_sample);
  if (out_len < n)
    throw Error(FEWSTEP_ERR_BUFFER_TOO_SMALL, "out has room for " + std::to_string(out_len) + " floats, the batch needs " +
                                                  std::to_string(n));
  return n;
}

// The class labels of the legacy call: the caller's, or all null labels (filled into `own`) when none are
// given; null for an unconditional engine. Their range is checked on the generic path.
const int64_t* default_labels(const fewstep_engine* e, int64_t batch, const int64_t* labels_in,
                              std::vector<int64_t>& own) {
  const fewstep_engine_info& info = e->info;
  if (labels_in && !e->has_labels)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "labels given, but this engine is not class-conditional");
  if (!e->has_labels || labels_in) return labels_in;
  if (info.null_label < 0)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "this engine is class-conditional without a null label: pass labels");
  own.assign(size_t(batch), info.null_label);
  return own.data();
}

// The per-sample guidance scales of the legacy call: the caller's (finite; an engine without a guidance
// input takes only W = 1, which changes nothing), or W = 1 (filled into `own`) for an engine that reads them.
const float* default_guidance(const fewstep_engine* e, int64_t batch, const float* guidance_in,
                              std::vector<float>& own) {
  if (guidance_in) {
    for (int64_t i = 0; i < batch; ++i) {
      if (!std::isfinite(guidance_in[i]))
        throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "guidance of sample " + std::to_string(i) + " is not finite");
      if (!e->has_guidance && guidance_in[i] != 1.0f)
        throw Error(FEWSTEP_ERR_INVALID_ARGUMENT,
                    "this engine has no guidance input (its plan fixes W on every row, or the model has no "
                    "classifier-free guidance): pass no guidance");
    }
  }
  if (e->has_guidance && !guidance_in) {
    own.assign(size_t(batch), 1.0f);
    guidance_in = own.data();
  }
  return e->has_guidance ? guidance_in : nullptr;
}

// The dims of input `in` at `batch` (into `dims`) and its number of values; refused past kMaxValues before
// anything of that size exists.
size_t input_dims(const EngineInput& in, int64_t batch, std::vector<int64_t>& dims) {
  dims = in.shape;
  uint64_t count = in.fixed_count;
  for (int64_t& d : dims) {
    if (d >= 0) continue;
    d = batch;
    if (count > kMaxValues / uint64_t(batch))
      throw Error(FEWSTEP_ERR_OUT_OF_RANGE, "input '" + in.name + "' " + shape_text(in.shape, batch) +
                                                " holds more than the 2^31 values one run may hold");
    count *= uint64_t(batch);
  }
  return size_t(count);
}

std::string input_names_text(const fewstep_engine* e) {
  std::string s;
  for (const EngineInput& in : e->inputs)
    if (in.source != FEWSTEP_INPUT_SEED_ONLY) s += (s.empty() ? "" : ", ") + in.name;
  return s;
}

// Match the caller's named inputs to the engine's: given[i] is the caller's tensor for input i, or null.
std::vector<const fewstep_input*> match_inputs(const fewstep_engine* e, const fewstep_input* inputs, size_t n_inputs) {
  if (n_inputs && !inputs)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "inputs is NULL but n_inputs is " + std::to_string(n_inputs));
  std::vector<const fewstep_input*> given(e->inputs.size(), nullptr);
  for (size_t k = 0; k < n_inputs; ++k) {
    const char* name = inputs[k].name;
    if (!name) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "inputs[" + std::to_string(k) + "].name is NULL");
    size_t i = 0;
    while (i < e->inputs.size() && e->inputs[i].name != name) ++i;
    if (i == e->inputs.size())
      throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "unknown input '" + printable(name) + "': this engine takes " +
                                                    input_names_text(e));
    if (e->inputs[i].source == FEWSTEP_INPUT_SEED_ONLY)
      throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "input '" + e->inputs[i].name +
                                                    "' cannot be given: the stochastic rows' noise comes from the seed");
    if (given[i]) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "input '" + e->inputs[i].name + "' given twice");
    given[i] = &inputs[k];
  }
  for (size_t i = 0; i < given.size(); ++i)
    if (!given[i] && e->inputs[i].source == FEWSTEP_INPUT_REQUIRED)
      throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "missing input '" + e->inputs[i].name + "' (" +
                                                    dtype_name(e->inputs[i].dtype) + " " +
                                                    shape_text(e->inputs[i].shape) + ")");
  return given;
}

// One given tensor against its declaration at this batch: dtype, shape, data, and its values (finite floats;
// class labels in range). Fills `dims` with the shape to hand ONNX Runtime.
void check_input(const fewstep_engine* e, const EngineInput& in, const fewstep_input& t, int64_t batch,
                 std::vector<int64_t>& dims) {
  const std::string w = "input '" + in.name + "'";
  if (t.dtype != FEWSTEP_DTYPE_FLOAT32 && t.dtype != FEWSTEP_DTYPE_INT64)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, w + ": dtype " + std::to_string(t.dtype) +
                                                  " is neither FEWSTEP_DTYPE_FLOAT32 (1) nor FEWSTEP_DTYPE_INT64 (7)");
  if (t.dtype != in.dtype)
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, w + " must be " + dtype_name(in.dtype) + ", got " + dtype_name(t.dtype));
  const size_t count = input_dims(in, batch, dims);
  if (t.ndim && !t.shape) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, w + ": shape is NULL");
  // The caller's sizes are only compared, never multiplied: a huge claimed shape cannot overflow anything.
  bool same = t.ndim == dims.size();
  for (size_t d = 0; same && d < dims.size(); ++d) same = t.shape[d] == dims[d];
  if (!same) {
    const std::string got = t.ndim <= FEWSTEP_MAX_INPUT_DIMS
                                ? shape_text(std::vector<int64_t>(t.shape, t.shape + t.ndim))
                                : "rank " + std::to_string(t.ndim);
    throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, w + " has shape " + got + ", expected " + shape_text(in.shape, batch) +
                                                  " at batch " + std::to_string(batch));
  }
  if (!t.data && count) throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, w + ": data is NULL");
  if (in.dtype == FEWSTEP_DTYPE_FLOAT32) {
    const float* v = static_cast<const float*>(t.data);
    for (size_t i = 0; i < count; ++i)
      if (!std::isfinite(v[i]))
        throw Error(FEWSTEP_ERR_INVALID_ARGUMENT, "input " + in.name + " holds NaN or inf (value " +
                                                      std::to_string(i) + ")");
  } else if (in.name == "class_labels") {
    const fewstep_engine_info& info = e->info;
    const int64_t* l = static_cast<const int64_t*>(t.data);
    for (size_t i = 0; i < count; ++i)
      if ((l[i] < 0 || l[i] >= info.num_classes) && l[i] != info.null_label)
        throw Error(FEWSTEP_ERR_OUT_OF_RANGE,
                    "label " + std::to_string(l[i]) + " of sample " + std::to_string(i) + " is not in 0.." +
                        std::to_string(info.num_classes - 1) +
                        (info.null_label >= 0 ? " or the null label " + std::to_string(info.null_label) : ""));
  }
}

// The stochastic rows' noise, [n_stochastic, batch, *sample_shape]: row j is Philox stream 1 + j of `seed`.
std::vector<float> step_noise(const fewstep_engine_info& info, uint64_t seed, int64_t batch, size_t n) {
  std::vector<float> noise(n * size_t(info.n_stochastic));
  for (int32_t j = 0; j < info.n_stochastic; ++j)
    if (fewstep_randn(seed, uint64_t(1 + j), 0, batch, info.per_sample, noise.data() + n * size_t(j), n) != FEWSTEP_OK)
      throw Error(FEWSTEP_ERR_INTERNAL, "fewstep_randn failed for the noise");
  return noise;
}

// A pre-allocated output is written in place; if ORT had to give us a different buffer (a graph whose
// output shape depends on the data), it must still hold exactly the contract's shape at this batch before we copy.
void check_output_shape(const OrtApi* api, const OrtValue* value, const std::string& name,
                        const std::vector<int64_t>& shape) {
  Owned<OrtTensorTypeAndShapeInfo> ts(api->ReleaseTensorTypeAndShapeInfo);
  check(api, api->GetTensorTypeAndShape(value, &ts.p), "reading the output shape");
  size_t nd = 0;
  check(api, api->GetDimensionsCount(ts.p, &nd), "reading the output rank");
  std::vector<int64_t> got_dims(nd);
  if (nd) check(api, api->GetDimensions(ts.p, got_dims.data(), nd), "reading the output shape");
  if (got_dims != shape)
    throw Error(FEWSTEP_ERR_INVALID_ENGINE, "the graph's output '" + name + "' has shape " + shape_text(got_dims) +
                                                ", not the " + shape_text(shape) + " the contract promises (an output "
                                                "whose shape depends on the data)");
}

// Wrap the prepared buffers as tensors (no copies; data[i] with dims[i] for input i), run the session and
// leave the result (n = checked_size values) in `out`.
void run_session(fewstep_engine* e, int64_t batch, size_t n, const std::vector<const void*>& data,
                 const std::vector<std::vector<int64_t>>& dims, const std::vector<size_t>& counts, float* out) {
  const OrtApi* api = e->api;
  std::vector<int64_t> shape = e->output.shape;
  shape[0] = batch;
  const size_t k = e->inputs.size();
  std::vector<OrtValue*> values(k + 1, nullptr);  // the inputs, then the output
  struct Release {  // frees whatever was created, on every path out
    const OrtApi* api;
    std::vector<OrtValue*>& v;
    ~Release() {
      for (OrtValue* x : v)
        if (x) api->ReleaseValue(x);
    }
  } release{api, values};
  const auto wrap = [&](const void* p, size_t bytes, const std::vector<int64_t>& d, ONNXTensorElementDataType t,
                        OrtValue** v) {
    // ORT never writes through input tensors; the const_cast only satisfies the C signature.
    check(api, api->CreateTensorWithDataAsOrtValue(e->cpu, const_cast<void*>(p), bytes, d.data(), d.size(), t, v),
          "creating an input tensor");
  };
  for (size_t i = 0; i < k; ++i) {
    const bool i64 = e->inputs[i].dtype == FEWSTEP_DTYPE_INT64;
    wrap(data[i], counts[i] * (i64 ? sizeof(int64_t) : sizeof(float)), dims[i],
         i64 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &values[i]);
  }
  wrap(out, n * sizeof(float), shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &values[k]);
  check(api, api->Run(e->session, nullptr, e->input_names.data(), values.data(), k, &e->output_name, 1, &values[k]),
        "ONNX Runtime run failed");
  check_output_shape(api, values[k], e->output.name, shape);
  void* got = nullptr;
  check(api, api->GetTensorMutableData(values[k], &got), "reading the output");
  if (got != out) std::memcpy(out, got, n * sizeof(float));
}

// One run from named inputs: check them all against the contract, draw z (unless given) and the noise from
// the seed, run, and refuse a result that is not finite.
void run_inputs(fewstep_engine* e, uint64_t seed, int64_t batch, const fewstep_input* inputs, size_t n_inputs,
                float* out, size_t out_len) {
  const size_t n = checked_size(e, batch, out, out_len);
  const std::vector<const fewstep_input*> given = match_inputs(e, inputs, n_inputs);
  const size_t k = e->inputs.size();
  std::vector<std::vector<int64_t>> dims(k);
  std::vector<size_t> counts(k);
  std::vector<const void*> data(k, nullptr);
  for (size_t i = 0; i < k; ++i) counts[i] = input_dims(e->inputs[i], batch, dims[i]);  // sizes first
  // z's values (the latents at this batch): within 2^31, as input_dims just checked for z.
  const size_t nz = size_t(batch) * size_t(e->info.per_sample);
  for (size_t i = 0; i < k; ++i) {
    if (given[i]) {
      check_input(e, e->inputs[i], *given[i], batch, dims[i]);
      data[i] = given[i]->data;
    }
  }
  std::vector<float> z, noise;
  for (size_t i = 0; i < k; ++i) {
    if (data[i]) continue;
    if (e->inputs[i].name == "z") {  // Philox stream 0 of the seed
      z.resize(nz);
      if (fewstep_randn(seed, 0, 0, batch, e->info.per_sample, z.data(), nz) != FEWSTEP_OK)
        throw Error(FEWSTEP_ERR_INTERNAL, "fewstep_randn failed for z");
      data[i] = z.data();
    } else if (e->inputs[i].name == "noise") {
      noise = step_noise(e->info, seed, batch, nz);
      data[i] = noise.data();
    }
  }
  run_session(e, batch, n, data, dims, counts, out);
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad += !std::isfinite(out[i]);
  if (bad)
    throw Error(FEWSTEP_ERR_NONFINITE, std::to_string(bad) + " of " + std::to_string(n) +
                                           " values of the result are NaN or inf: a plan coefficient or the guidance "
                                           "scale is far out of range (try a smaller guidance)");
}

// The legacy call (fewstep_sample_from): labels and guidance defaulted as documented, then the generic path.
void run(fewstep_engine* e, uint64_t seed, int64_t batch, const float* z_in, const int64_t* labels_in,
         const float* guidance_in, float* out, size_t out_len) {
  checked_size(e, batch, out, out_len);  // first: nothing is filled in for a refused batch
  std::vector<int64_t> own_labels;
  std::vector<float> own_guidance;
  const int64_t* labels = default_labels(e, batch, labels_in, own_labels);
  const float* guidance = default_guidance(e, batch, guidance_in, own_guidance);
  std::vector<fewstep_input> inputs;
  std::vector<std::vector<int64_t>> shapes;
  shapes.reserve(3);  // fewstep_input.shape points into these: no reallocation
  const auto add = [&](const char* name, int32_t dtype, const void* p) {
    for (const EngineInput& in : e->inputs)
      if (in.name == name) {
        shapes.emplace_back();
        input_dims(in, batch, shapes.back());
        inputs.push_back({in.name.c_str(), shapes.back().data(), shapes.back().size(), dtype, p});
      }
  };
  if (z_in) add("z", FEWSTEP_DTYPE_FLOAT32, z_in);
  if (labels) add("class_labels", FEWSTEP_DTYPE_INT64, labels);
  if (guidance) add("guidance", FEWSTEP_DTYPE_FLOAT32, guidance);
  run_inputs(e, seed, batch, inputs.data(), inputs.size(), out, out_len);
}

}  // namespace
}  // namespace fewstep_impl

extern "C" {

fewstep_engine_params fewstep_default_params(void) {
  fewstep_engine_params p;
  p.intra_op_threads = 0;
  p.inter_op_threads = 0;
  p.provider = FEWSTEP_PROVIDER_CPU;
  p.device_id = 0;
  p.cuda_graph = 0;
  p.engine_cache_dir = nullptr;
  p.ort_library = nullptr;
  return p;
}

fewstep_status fewstep_engine_load(const char* path, const fewstep_engine_params* params, fewstep_engine** out) {
  FEWSTEP_GUARD({
    if (out) *out = nullptr;
    if (!path || !out) return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_engine_load: path and out must not be NULL");
    *out = fewstep_impl::load(path, params ? *params : fewstep_default_params());
    return FEWSTEP_OK;
  })
}

void fewstep_engine_free(fewstep_engine* engine) { delete engine; }

fewstep_status fewstep_engine_get_info(const fewstep_engine* engine, fewstep_engine_info* out) {
  if (!engine || !out) return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_engine_get_info: NULL argument");
  *out = engine->info;
  return FEWSTEP_OK;
}

const char* fewstep_engine_metadata(const fewstep_engine* engine, const char* key) {
  if (!engine || !key) return nullptr;
  try {  // the std::string key may allocate: nothing may throw across the C API
    const auto it = engine->metadata.find(key);
    return it == engine->metadata.end() ? nullptr : it->second.c_str();
  } catch (...) {
    return nullptr;
  }
}

fewstep_status fewstep_sample_from(fewstep_engine* engine, uint64_t seed, int64_t batch, const float* z,
                                   const int64_t* labels, const float* guidance, float* out, size_t out_len) {
  FEWSTEP_GUARD({
    if (!engine) return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_sample: engine is NULL");
    fewstep_impl::run(engine, seed, batch, z, labels, guidance, out, out_len);
    return FEWSTEP_OK;
  })
}

fewstep_status fewstep_sample(fewstep_engine* engine, uint64_t seed, int64_t batch, const int64_t* labels,
                              const float* guidance, float* out, size_t out_len) {
  return fewstep_sample_from(engine, seed, batch, nullptr, labels, guidance, out, out_len);
}

fewstep_status fewstep_sample_inputs(fewstep_engine* engine, uint64_t seed, int64_t batch, const fewstep_input* inputs,
                                     size_t n_inputs, float* out, size_t out_len) {
  FEWSTEP_GUARD({
    if (!engine) return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_sample_inputs: engine is NULL");
    fewstep_impl::run_inputs(engine, seed, batch, inputs, n_inputs, out, out_len);
    return FEWSTEP_OK;
  })
}

size_t fewstep_engine_input_count(const fewstep_engine* engine) { return engine ? engine->input_infos.size() : 0; }

fewstep_status fewstep_engine_input_info(const fewstep_engine* engine, size_t index, fewstep_input_info* out) {
  if (!engine || !out)
    return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_engine_input_info: NULL argument");
  if (index >= engine->input_infos.size())
    return fewstep_impl::set_error(FEWSTEP_ERR_OUT_OF_RANGE, "fewstep_engine_input_info: index " + std::to_string(index) +
                                                                 " past the engine's " +
                                                                 std::to_string(engine->input_infos.size()) + " inputs");
  *out = engine->input_infos[index];
  return FEWSTEP_OK;
}

fewstep_status fewstep_engine_output_info(const fewstep_engine* engine, fewstep_output_info* out) {
  if (!engine || !out)
    return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_engine_output_info: NULL argument");
  *out = engine->output_info;
  return FEWSTEP_OK;
}

}  // extern "C"
