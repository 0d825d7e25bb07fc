// fewstep-run: sample an exported engine from the command line. Uses only the public C++ wrapper.
//   fewstep-run ENGINE --seed S --n N [--class C|none] [--guidance W] [--noise Z.npy] [--input NAME=X.npy]...
//               [--embeddings E.safetensors] --out X.npy
//               [--threads T] [--provider cpu|cuda|tensorrt|openvino] [--device D] [--cuda-graph]
//               [--cache-dir DIR] [--ort-library PATH] [--bench N]
// Exit codes, as `fewstep`: 0 ok; 2 bad input (arguments, files, the engine, the ONNX Runtime library or
// provider); 3 the result is not finite (nothing written); 1 an internal error (a bug).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fewstep.hpp"

namespace {

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kHelp =
    "usage: fewstep-run ENGINE [--seed S] [--n N] [--class C|none] [--guidance W] [--noise Z.npy] [--out X.npy]\n"
    "                   [--input NAME=FILE.npy]... [--embeddings FILE.safetensors]\n"
    "                   [--threads T] [--provider cpu|cuda|tensorrt|openvino] [--device D] [--cuda-graph]\n"
    "                   [--cache-dir DIR] [--ort-library PATH] [--bench N]\n"
    "Samples N images from an exported fewstep engine with Philox seed S (default 0; N: the noise file's, else 1).\n"
    "--out gets the engine's output, float32: 'sample' [N, *sample_shape], or 'image' [N, 3, H, W] for an engine\n"
    "exported with --decode (the success line names it).\n"
    "Without --class a class-conditional engine draws classes 0,1,2,... in turn (like `fewstep sample`);\n"
    "--class none samples unconditionally (the null label). --version prints the library version.\n"
    "--input NAME=FILE.npy (repeatable): a named input of the engine (e.g. encoder_hidden_states), float32 or\n"
    "int64 of the engine's shape at this N; without --n / --noise, N is its leading size.\n"
    "--embeddings FILE.safetensors: named inputs from a safetensors file (F32 / I64; tensor name = input name).\n"
    "Exit codes: 0 ok, 2 bad input, 3 the result is not finite (nothing written), 1 internal error.\n"
    "--bench N: time N more runs after one warm-up and print p50/p90/p99 latency and samples/s.\n"
    "ONNX Runtime: --ort-library, else $FEWSTEP_ORT_LIBRARY, else the onnxruntime package beside libfewstep,\n"
    "else libonnxruntime.so on the search path. --provider openvino needs the onnxruntime-openvino build's library.\n";

long long parse_int(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end || errno) throw Usage(std::string(what) + " must be an integer, got '" + s + "'");
  return v;
}

double parse_float(const std::string& s, const char* what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end || !std::isfinite(v)) throw Usage(std::string(what) + " must be a finite number, got '" + s + "'");
  return v;
}

// A .npy array as read: shape, dtype (float32 or int64) and the values (8-byte aligned storage).
struct Npy {
  std::vector<long long> shape;
  fewstep_dtype dtype = FEWSTEP_DTYPE_FLOAT32;
  std::vector<int64_t> storage;
  size_t count = 0;
  const float* f32() const { return reinterpret_cast<const float*>(storage.data()); }
};

// .npy (format 1.0/2.0) of little-endian float32 or int64, C order. `what` names the file in messages.
Npy read_npy(const std::string& path, const std::string& what) {
  struct stat st{};
  if (stat(path.c_str(), &st) != 0) throw Usage("cannot open " + what + " " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw Usage(what + " " + path + ": not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Usage("cannot open " + what + " " + path);
  char magic[8];
  if (!f.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw Usage(path + ": not a .npy file");
  uint32_t hlen = 0;
  unsigned char b[4] = {0, 0, 0, 0};
  const int nb = magic[6] == 1 ? 2 : 4;
  if (!f.read(reinterpret_cast<char*>(b), nb)) throw Usage(path + ": truncated .npy header");
  for (int i = nb - 1; i >= 0; --i) hlen = (hlen << 8) | b[i];
  if (hlen > (1u << 20)) throw Usage(path + ": .npy header too long");
  std::string h(hlen, '\0');
  if (!f.read(&h[0], hlen)) throw Usage(path + ": truncated .npy header");
  Npy a;
  if (h.find("'descr': '<i8'") != std::string::npos) a.dtype = FEWSTEP_DTYPE_INT64;
  else if (h.find("'descr': '<f4'") == std::string::npos)
    throw Usage(path + ": " + what + " must be float32 (<f4) or int64 (<i8)");
  if (h.find("'fortran_order': False") == std::string::npos) throw Usage(path + ": " + what + " must be C-ordered");
  const size_t p = h.find("'shape': (");
  if (p == std::string::npos) throw Usage(path + ": .npy header without shape");
  std::stringstream ss(h.substr(p + 10, h.find(')', p) - p - 10));
  std::string tok;
  size_t n = 1;
  while (std::getline(ss, tok, ',')) {
    tok.erase(std::remove(tok.begin(), tok.end(), ' '), tok.end());
    if (tok.empty()) continue;
    a.shape.push_back(parse_int(tok, "npy shape"));
    if (a.shape.back() < 0 || (a.shape.back() && n > (size_t(1) << 40) / size_t(a.shape.back())))
      throw Usage(path + ": bad shape");
    n *= size_t(a.shape.back());
  }
  // The header's promise against the file's size before allocating (a header may claim 10^11 values).
  const size_t item = a.dtype == FEWSTEP_DTYPE_INT64 ? 8 : 4;
  if (uint64_t(n) * item > uint64_t(st.st_size)) throw Usage(path + ": truncated .npy data (the header "
                                                                 "promises more values than the file holds)");
  a.count = n;
  a.storage.resize((n * item + 7) / 8);
  if (!f.read(reinterpret_cast<char*>(a.storage.data()), std::streamsize(n * item)))
    throw Usage(path + ": truncated .npy data");
  return a;
}

// Nesting depth of JSON text outside strings; the safetensors header is refused past 64 levels before any
// parser sees it (a hostile header may nest 10^6 deep).
int json_depth(const std::string& t) {
  int depth = 0, worst = 0;
  bool in_str = false;
  for (size_t i = 0; i < t.size(); ++i) {
    const char ch = t[i];
    if (in_str) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_str = false;
    } else if (ch == '"') in_str = true;
    else if (ch == '[' || ch == '{') worst = std::max(worst, ++depth);
    else if (ch == ']' || ch == '}') --depth;
  }
  return worst;
}

// The tensors of a .safetensors file (8-byte little-endian header length, JSON header, data), each F32 or I64,
// as named arrays. Every size and offset is checked against the file before anything is read or allocated.
std::vector<std::pair<std::string, Npy>> read_safetensors(const std::string& path) {
  const std::string what = "embeddings file " + path;
  struct stat st{};
  if (stat(path.c_str(), &st) != 0) throw Usage("cannot open " + what + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw Usage(what + ": not a regular file");
  std::ifstream f(path, std::ios::binary);
  unsigned char lb[8];
  if (!f || !f.read(reinterpret_cast<char*>(lb), 8)) throw Usage(what + ": not a .safetensors file (too short)");
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | lb[i];
  const uint64_t size = uint64_t(st.st_size);
  if (hlen > (uint64_t(1) << 24) || 8 + hlen > size)
    throw Usage(what + ": not a .safetensors file (header length " + std::to_string(hlen) + ")");
  std::string h(size_t(hlen), '\0');
  if (!f.read(&h[0], std::streamsize(hlen))) throw Usage(what + ": truncated header");
  if (json_depth(h) > 64) throw Usage(what + ": header nested too deeply");
  const nlohmann::json j = nlohmann::json::parse(h, nullptr, false);
  if (j.is_discarded() || !j.is_object()) throw Usage(what + ": the header is not a JSON object");
  const uint64_t data_size = size - 8 - hlen;
  // Every entry is checked first and read after: tensors may not share bytes (safetensors' own rule), so what is
  // read is at most the file, however many entries the header lists.
  struct Entry {
    std::string name;
    Npy a;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, t] : j.items()) {
    if (name == "__metadata__") continue;
    const std::string w = what + ": tensor '" + name.substr(0, 64) + "'";
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      throw Usage(w + ": needs dtype, shape and data_offsets");
    const nlohmann::json &dt = t["dtype"], &shape = t["shape"], &off = t["data_offsets"];
    Npy a;
    if (dt == "I64") a.dtype = FEWSTEP_DTYPE_INT64;
    else if (dt != "F32") throw Usage(w + " is " + dt.dump() + "; fewstep-run reads F32 and I64 tensors");
    if (!shape.is_array() || shape.size() > 16) throw Usage(w + ": bad shape");
    uint64_t n = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t(1) << 40) ||
          (d.get<uint64_t>() && n > (uint64_t(1) << 40) / d.get<uint64_t>()))
        throw Usage(w + ": bad shape");
      a.shape.push_back((long long)d.get<uint64_t>());
      n *= d.get<uint64_t>();
    }
    const uint64_t item = a.dtype == FEWSTEP_DTYPE_INT64 ? 8 : 4;
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Usage(w + ": bad data_offsets");
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size || end - begin != n * item)
      throw Usage(w + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                  ") do not fit its shape and the file");
    a.count = size_t(n);
    entries.push_back({name, std::move(a), begin, end});
  }
  std::vector<const Entry*> by_offset;
  for (const Entry& e : entries) by_offset.push_back(&e);
  std::stable_sort(by_offset.begin(), by_offset.end(), [](const Entry* x, const Entry* y) { return x->begin < y->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end)
      throw Usage(what + ": tensors '" + by_offset[i - 1]->name.substr(0, 64) + "' and '" +
                  by_offset[i]->name.substr(0, 64) + "' share bytes");
  std::vector<std::pair<std::string, Npy>> out;
  for (Entry& e : entries) {
    const uint64_t bytes = e.end - e.begin;
    e.a.storage.resize(size_t((bytes + 7) / 8));
    f.seekg(std::streamoff(8 + hlen + e.begin));
    if (!f.read(reinterpret_cast<char*>(e.a.storage.data()), std::streamsize(bytes)))
      throw Usage(what + ": tensor '" + e.name.substr(0, 64) + "': truncated");
    out.emplace_back(std::move(e.name), std::move(e.a));
  }
  return out;
}

void write_npy(const std::string& path, const std::vector<long long>& shape, const float* data, size_t n) {
  std::string dims;
  for (long long d : shape) dims += std::to_string(d) + ", ";
  if (shape.size() > 1) dims.resize(dims.size() - 1);  // "(4, 1, 8, 8)" but "(4,)"
  if (shape.size() > 1) dims.pop_back();
  std::string h = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  // A unique temporary file beside the target (mkstemp), renamed over it when complete: never half a
  // file, never someone else's file, and removed on every error path; messages name the target only.
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  std::string tmpl = dir + (dir.back() == '/' ? "" : "/") + "." + base + ".XXXXXX";
  std::vector<char> tmp(tmpl.begin(), tmpl.end());
  tmp.push_back('\0');
  const int fd = mkstemp(tmp.data());
  if (fd < 0) throw fewstep::Error(FEWSTEP_ERR_IO, "cannot write " + path + ": " + std::strerror(errno));
  FILE* f = fdopen(fd, "wb");
  bool ok = f != nullptr;
  if (ok) {
    const unsigned short len = static_cast<unsigned short>(h.size());
    const char lb[2] = {char(len & 0xff), char(len >> 8)};
    ok = std::fwrite("\x93NUMPY\x01\x00", 1, 8, f) == 8 && std::fwrite(lb, 1, 2, f) == 2 &&
         std::fwrite(h.data(), 1, h.size(), f) == h.size() &&
         std::fwrite(data, sizeof(float), n, f) == n && std::fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = (std::fclose(f) == 0) && ok;
  } else {
    close(fd);
  }
  const mode_t mask = umask(0);
  umask(mask);
  if (!ok || chmod(tmp.data(), 0666 & ~mask) != 0 || std::rename(tmp.data(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.data());
    throw fewstep::Error(FEWSTEP_ERR_IO, "cannot write " + path + ": " + std::strerror(err));
  }
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);  // linear interpolation, as numpy's default
  const size_t lo = size_t(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

// A seed: decimal digits only, < 2^64 (strtoll would refuse the upper half, strtoull take "-1").
uint64_t parse_seed(const std::string& s) {
  uint64_t v = 0;
  if (s.empty()) throw Usage("--seed must be an integer in [0, 2^64), got ''");
  for (char ch : s) {
    if (ch < '0' || ch > '9' || v > (UINT64_MAX - uint64_t(ch - '0')) / 10)
      throw Usage("--seed must be an integer in [0, 2^64), got '" + s + "'");
    v = v * 10 + uint64_t(ch - '0');
  }
  return v;
}

// What the command line asks for.
struct Args {
  std::string engine_path, out_path, noise_path;
  uint64_t seed = 0;
  long long batch = 0, bench = 0;  // batch 0: the noise file's N, else 1
  bool has_class = false, has_guidance = false, null_class = false;
  long long cls = 0;
  double guidance = 1.0;
  std::vector<std::pair<std::string, std::string>> inputs;  // --input NAME=FILE.npy, in order
  std::string embeddings_path;                               // --embeddings FILE.safetensors
  fewstep::EngineOptions opt;
};

// Parse argv into `a`; false when --help or --version was answered (nothing more to do).
bool parse_args(int argc, char** argv, Args& a) {
  fewstep::EngineOptions& opt = a.opt;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kHelp, stdout);
      return false;
    } else if (arg == "--version") {
      std::printf("fewstep-run %s\n", fewstep_version());
      return false;
    } else if (arg == "--seed") a.seed = parse_seed(next());
    else if (arg == "--n") a.batch = parse_int(next(), "--n");
    else if (arg == "--batch") {  // the old spelling of --n
      std::fputs("fewstep-run: warning: --batch is deprecated; use --n\n", stderr);
      a.batch = parse_int(next(), "--n");
    } else if (arg == "--class") {
      const std::string c = next();
      a.has_class = true;
      if (c == "none") a.null_class = true;
      else a.cls = parse_int(c, "--class");
    }
    else if (arg == "--guidance") a.has_guidance = true, a.guidance = parse_float(next(), "--guidance");
    else if (arg == "--noise") a.noise_path = next();
    else if (arg == "--embeddings") a.embeddings_path = next();
    else if (arg == "--input") {
      const std::string v = next();
      const size_t eq = v.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == v.size())
        throw Usage("--input must be NAME=FILE.npy, got '" + v + "'");
      a.inputs.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    }
    else if (arg == "--out") a.out_path = next();
    else if (arg == "--threads") {
      const long long t = parse_int(next(), "--threads");
      if (t < 0 || t > 1 << 20) throw Usage("--threads must be in [0, 2^20], got " + std::to_string(t));
      opt.intra_op_threads = int(t);
    }
    else if (arg == "--device") opt.device_id = int(parse_int(next(), "--device"));
    else if (arg == "--cuda-graph") opt.cuda_graph = true;
    else if (arg == "--cache-dir") opt.engine_cache_dir = next();
    else if (arg == "--ort-library") opt.ort_library = next();
    else if (arg == "--bench") a.bench = parse_int(next(), "--bench");
    else if (arg == "--provider") {
      const std::string p = next();
      if (p == "cpu") opt.provider = FEWSTEP_PROVIDER_CPU;
      else if (p == "cuda") opt.provider = FEWSTEP_PROVIDER_CUDA;
      else if (p == "tensorrt") opt.provider = FEWSTEP_PROVIDER_TENSORRT;
      else if (p == "openvino") opt.provider = FEWSTEP_PROVIDER_OPENVINO;
      else throw Usage("--provider must be cpu, cuda, tensorrt or openvino, got '" + p + "'");
    } else if (!arg.empty() && arg[0] == '-') throw Usage("unknown option " + arg);
    else if (a.engine_path.empty()) a.engine_path = arg;
    else throw Usage("unexpected argument " + arg);
  }
  if (a.engine_path.empty()) throw Usage("no ENGINE given");
  if (a.bench < 0) throw Usage("--bench must be >= 0");
  if (a.out_path.empty() && a.bench == 0) throw Usage("give --out X.npy (or --bench N)");
  return true;
}

// The starting noise from --noise: N x sample shape, finite; N sets the batch when --n did not.
Npy read_noise(const std::string& path, const fewstep_engine_info& info, long long& batch) {
  Npy z = read_npy(path, "noise file");
  if (z.dtype != FEWSTEP_DTYPE_FLOAT32) throw Usage(path + ": noise must be float32 (<f4)");
  if (batch == 0 && !z.shape.empty()) batch = z.shape[0];
  std::vector<long long> want{batch};
  want.insert(want.end(), info.sample_shape, info.sample_shape + info.ndim);
  if (z.shape != want) throw Usage(path + ": expected a float32 array of shape N x sample shape with N = --n");
  for (size_t i = 0; i < z.count; ++i)
    if (!std::isfinite(z.f32()[i])) throw Usage(path + ": contains NaN or inf");
  return z;
}

// --embeddings FILE.safetensors and --input NAME=FILE.npy, each read as it is; the C API checks names, dtypes,
// shapes and values against the engine. Without --n and --noise the batch is the leading size of the first
// (in the engine's order) given input whose leading dimension is the engine's batch.
std::vector<std::pair<std::string, Npy>> read_inputs(const Args& a, const fewstep::Engine& engine, long long& batch) {
  std::vector<std::pair<std::string, Npy>> out;
  if (!a.embeddings_path.empty()) out = read_safetensors(a.embeddings_path);
  const size_t from_file = out.size();
  for (const auto& [name, path] : a.inputs) {
    for (size_t i = 0; i < from_file; ++i)
      if (out[i].first == name) throw Usage("--input " + name + ": the embeddings file holds '" + name + "' too");
    out.emplace_back(name, read_npy(path, "input file for '" + name + "'"));
  }
  const std::vector<fewstep::InputInfo> declared = engine.inputs();
  for (const fewstep::InputInfo& d : declared)  // the engine's order: the first batch-led input sets N
    for (const auto& [name, x] : out)
      if (batch == 0 && d.name == name && !d.shape.empty() && d.shape[0] < 0 && !x.shape.empty()) batch = x.shape[0];
  return out;
}

// One label per sample: --class C (or the null label for --class none); without --class a class-conditional
// engine draws classes 0,1,2,... in turn; empty for an unconditional engine.
std::vector<int64_t> class_labels(const Args& a, const fewstep_engine_info& info, long long batch) {
  std::vector<int64_t> labels;
  if (a.has_class) {
    if (!info.num_classes) throw Usage("--class given but this engine is not class-conditional");
    if (a.null_class && info.null_label < 0)
      throw Usage("--class none: this engine has no null label (no unconditional sampling)");
    long long cls = a.cls;
    if (a.null_class) cls = info.null_label;
    else if (cls < 0 || cls >= info.num_classes)
      throw Usage("--class must be in 0.." + std::to_string(info.num_classes - 1) + ", got " + std::to_string(cls));
    labels.assign(size_t(batch), cls);
  } else if (info.num_classes) {
    for (long long i = 0; i < batch; ++i) labels.push_back(i % info.num_classes);  // classes drawn evenly
  }
  return labels;
}

// --bench: time `runs` more calls of `once` (after the caller's warm-up) and print the latency percentiles.
template <class F>
void bench(const F& once, long long runs, long long batch, int nfe) {
  std::vector<double> ms;
  for (long long r = 0; r < runs; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    once();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  double total = 0;
  for (double t : ms) total += t;
  std::printf("fewstep-run bench: %lld runs, batch %lld, nfe %d\n", runs, batch, nfe);
  std::printf("latency ms: p50 %.4f  p90 %.4f  p99 %.4f\n", percentile(ms, 0.5), percentile(ms, 0.9),
              percentile(ms, 0.99));
  std::printf("samples/s: %.1f\n", double(batch) * double(runs) / (total / 1000.0));
}

int run(int argc, char** argv) {
  Args a;
  if (!parse_args(argc, argv, a)) return 0;
  const fewstep::Engine engine(a.engine_path, a.opt);
  const fewstep_engine_info& info = engine.info();
  long long batch = a.batch;
  Npy z;
  if (!a.noise_path.empty()) z = read_noise(a.noise_path, info, batch);
  const std::vector<std::pair<std::string, Npy>> given = read_inputs(a, engine, batch);
  if (batch == 0) batch = 1;
  if (batch < 1) throw Usage("--n must be >= 1");
  const fewstep::OutputInfo output = engine.output();  // the latents, or the image of a --decode engine
  if (uint64_t(batch) > (uint64_t(1) << 31) / uint64_t(output.per_sample))  // before the output is allocated
    throw Usage("--n " + std::to_string(batch) + ": more than the 2^31 values one run may hold");
  const auto named = [&](const char* name) {
    for (const auto& g : given)
      if (g.first == name) return true;
    return false;
  };
  if (named("class_labels") && a.has_class) throw Usage("--class and --input class_labels=... both given");
  if (named("guidance") && a.has_guidance) throw Usage("--guidance and --input guidance=... both given");
  if (named("z") && !a.noise_path.empty()) throw Usage("--noise and --input z=... both given");
  // Every run is one fewstep_sample_inputs call: the files' tensors, then class labels and guidance as
  // `fewstep sample` picks them (--class / classes in turn; --guidance or W = 1) unless given as files.
  std::vector<fewstep::Input> inputs;
  for (const auto& [name, x] : given) {
    const std::vector<int64_t> shape(x.shape.begin(), x.shape.end());
    if (x.dtype == FEWSTEP_DTYPE_INT64) inputs.emplace_back(name, shape, x.storage.data());
    else inputs.emplace_back(name, shape, x.f32());
  }
  if (z.count) inputs.emplace_back("z", std::vector<int64_t>(z.shape.begin(), z.shape.end()), z.f32());
  const std::vector<int64_t> labels = named("class_labels") ? std::vector<int64_t>{} : class_labels(a, info, batch);
  if (!labels.empty()) inputs.emplace_back("class_labels", std::vector<int64_t>{batch}, labels.data());
  std::vector<float> g;
  if (a.has_guidance && !info.guidance_input && a.guidance != 1.0)
    throw Usage("--guidance " + std::to_string(a.guidance) + ": this engine has no guidance input (its plan fixes W "
                "on every row, or the model has no classifier-free guidance)");
  if (info.guidance_input && !named("guidance")) g.assign(size_t(batch), a.has_guidance ? float(a.guidance) : 1.0f);
  if (!g.empty()) inputs.emplace_back("guidance", std::vector<int64_t>{batch}, g.data());

  const size_t n = size_t(batch) * size_t(output.per_sample);
  std::vector<float> out(n);
  const auto once = [&] { engine.sample_inputs(a.seed, batch, inputs, out.data(), out.size()); };
  const auto t0 = std::chrono::steady_clock::now();
  once();
  const double first_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  if (!a.out_path.empty()) {
    const std::vector<int64_t> dims = engine.output_shape(batch);
    const std::vector<long long> shape(dims.begin(), dims.end());
    std::string text;
    for (const long long d : shape) text += (text.empty() ? "" : ", ") + std::to_string(d);
    write_npy(a.out_path, shape, out.data(), n);
    std::printf("%lld samples at NFE %d in %.2f ms: %s [%s] -> %s\n", batch, info.nfe, first_ms, output.name.c_str(),
                text.c_str(), a.out_path.c_str());
  }
  if (a.bench > 0) bench(once, a.bench, batch, info.nfe);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Usage& e) {
    std::fprintf(stderr, "fewstep-run: error: %s\n", e.what());
    return 2;
  } catch (const fewstep::Error& e) {
    std::fprintf(stderr, "fewstep-run: error: %s\n", e.what());
    if (e.status() == FEWSTEP_ERR_NONFINITE) return 3;  // the result was not finite: nothing written
    return e.status() == FEWSTEP_ERR_INTERNAL ? 1 : 2;  // everything else is about the input or its setup
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "fewstep-run: error: out of memory (the inputs, the engine or --n need more than this "
                 "machine can allocate)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fewstep-run: error: %s\n", e.what());
    return 1;
  }
}
