// fewstep C++ API: a header-only RAII wrapper over the C API in fewstep.h. Errors become
// fewstep::Error exceptions here, on the caller's side of the C boundary.
#ifndef FEWSTEP_HPP
#define FEWSTEP_HPP

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fewstep.h"

namespace fewstep {

// A failed C call: status() is the code, what() the message from fewstep_last_error().
class Error : public std::runtime_error {
 public:
  Error(fewstep_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  fewstep_status status() const noexcept { return status_; }

 private:
  fewstep_status status_;
};

inline void check(fewstep_status status) {
  if (status != FEWSTEP_OK) {
    const char* msg = fewstep_last_error();
    throw Error(status, msg && *msg ? msg : fewstep_status_string(status));
  }
}

// Load-time options; defaults are fewstep_default_params(). Strings are owned here.
struct EngineOptions {
  int intra_op_threads = 0;
  int inter_op_threads = 0;
  fewstep_provider provider = FEWSTEP_PROVIDER_CPU;
  int device_id = 0;
  bool cuda_graph = false;
  std::string engine_cache_dir;  // empty = none
  std::string ort_library;       // empty = FEWSTEP_ORT_LIBRARY, else the pip package's, else libonnxruntime.so

  fewstep_engine_params to_c() const {
    fewstep_engine_params p = fewstep_default_params();
    p.intra_op_threads = intra_op_threads;
    p.inter_op_threads = inter_op_threads;
    p.provider = provider;
    p.device_id = device_id;
    p.cuda_graph = cuda_graph ? 1 : 0;
    p.engine_cache_dir = engine_cache_dir.empty() ? nullptr : engine_cache_dir.c_str();
    p.ort_library = ort_library.empty() ? nullptr : ort_library.c_str();
    return p;
  }
};

// One named input tensor for Engine::sample_inputs. The name and shape are copied; the data stays the
// caller's and must outlive the call.
struct Input {
  std::string name;
  std::vector<int64_t> shape;
  fewstep_dtype dtype;
  const void* data;
  Input(std::string n, std::vector<int64_t> s, const float* d)
      : name(std::move(n)), shape(std::move(s)), dtype(FEWSTEP_DTYPE_FLOAT32), data(d) {}
  Input(std::string n, std::vector<int64_t> s, const int64_t* d)
      : name(std::move(n)), shape(std::move(s)), dtype(FEWSTEP_DTYPE_INT64), data(d) {}
};

// One input as the engine declares it (fewstep_engine_input_info); -1 in shape = the batch.
struct InputInfo {
  std::string name;
  std::vector<int64_t> shape;
  fewstep_dtype dtype;
  fewstep_input_source source;
};

// The engine's output (fewstep_engine_output_info): "sample" [batch, *sample_shape], or "image"
// [batch, 3, H, W] for a --decode engine; -1 in shape = the batch. per_sample: floats one sample writes.
struct OutputInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t per_sample;
};

// One loaded engine; movable, not copyable. sample() may be called from many threads at once.
class Engine {
 public:
  explicit Engine(const std::string& path, const EngineOptions& options = {}) {
    const fewstep_engine_params p = options.to_c();
    fewstep_engine* e = nullptr;
    check(fewstep_engine_load(path.c_str(), &p, &e));
    handle_.reset(e);
    check(fewstep_engine_get_info(e, &info_));
    check(fewstep_engine_output_info(e, &output_));
  }

  const fewstep_engine_info& info() const noexcept { return info_; }
  std::vector<int64_t> sample_shape() const { return {info_.sample_shape, info_.sample_shape + info_.ndim}; }
  OutputInfo output() const {
    return {output_.name, std::vector<int64_t>(output_.shape, output_.shape + output_.ndim), output_.per_sample};
  }
  // The output's shape at `batch` (its first entry, the batch, replaced).
  std::vector<int64_t> output_shape(int64_t batch) const {
    std::vector<int64_t> s(output_.shape, output_.shape + output_.ndim);
    s[0] = batch;
    return s;
  }
  // A metadata_props value, or "" if absent.
  std::string metadata(const std::string& key) const {
    const char* v = fewstep_engine_metadata(handle_.get(), key.c_str());
    return v ? v : "";
  }

  // Into a caller's buffer of out_len floats (batch * output().per_sample needed). labels / guidance /
  // z: nullptr or batch (batch * info().per_sample for z) values; see fewstep_sample_from.
  void sample(uint64_t seed, int64_t batch, const int64_t* labels, const float* guidance, float* out, size_t out_len,
              const float* z = nullptr) const {
    check(fewstep_sample_from(handle_.get(), seed, batch, z, labels, guidance, out, out_len));
  }

  // Convenience: a new vector of batch * output().per_sample floats.
  std::vector<float> sample(uint64_t seed, int64_t batch, const std::vector<int64_t>& labels = {},
                            const std::vector<float>& guidance = {}) const {
    std::vector<float> out(out_size(batch));
    sample(seed, batch, labels.empty() ? nullptr : labels.data(), guidance.empty() ? nullptr : guidance.data(),
           out.data(), out.size());
    return out;
  }

  // The engine's inputs in the contract's order (z and noise included; see fewstep_input_source).
  std::vector<InputInfo> inputs() const {
    std::vector<InputInfo> v;
    const size_t n = fewstep_engine_input_count(handle_.get());
    for (size_t i = 0; i < n; ++i) {
      fewstep_input_info ii{};
      check(fewstep_engine_input_info(handle_.get(), i, &ii));
      v.push_back({ii.name, std::vector<int64_t>(ii.shape, ii.shape + ii.ndim), fewstep_dtype(ii.dtype),
                   fewstep_input_source(ii.source)});
    }
    return v;
  }

  // From named inputs into a caller's buffer; see fewstep_sample_inputs.
  void sample_inputs(uint64_t seed, int64_t batch, const std::vector<Input>& inputs, float* out, size_t out_len) const {
    std::vector<fewstep_input> c;
    c.reserve(inputs.size());
    for (const Input& in : inputs) c.push_back({in.name.c_str(), in.shape.data(), in.shape.size(), in.dtype, in.data});
    check(fewstep_sample_inputs(handle_.get(), seed, batch, c.data(), c.size(), out, out_len));
  }

  // Convenience: a new vector of batch * output().per_sample floats.
  std::vector<float> sample_inputs(uint64_t seed, int64_t batch, const std::vector<Input>& inputs) const {
    std::vector<float> out(out_size(batch));
    sample_inputs(seed, batch, inputs, out.data(), out.size());
    return out;
  }

  fewstep_engine* get() const noexcept { return handle_.get(); }

 private:
  // Floats of the output at `batch` (0 for batch < 1, which the C call refuses); past the runtime's 2^31 values
  // per run refused here, before allocating.
  size_t out_size(int64_t batch) const {
    const uint64_t per = uint64_t(output_.per_sample);
    if (batch < 1) return 0;
    if (uint64_t(batch) > (uint64_t(1) << 31) / per)
      throw Error(FEWSTEP_ERR_OUT_OF_RANGE, "batch " + std::to_string(batch) + " x " + std::to_string(per) +
                                                " values per sample is more than the 2^31 values one run may hold");
    return size_t(batch) * size_t(per);
  }
  struct Free {
    void operator()(fewstep_engine* e) const noexcept { fewstep_engine_free(e); }
  };
  std::unique_ptr<fewstep_engine, Free> handle_;
  fewstep_engine_info info_{};
  fewstep_output_info output_{};
};

// Noise from the shared Philox generator (see fewstep_randn).
inline std::vector<float> randn(uint64_t seed, int64_t batch, int64_t per_sample, uint64_t stream = 0,
                                uint64_t first_sample = 0) {
  std::vector<float> out(size_t(batch > 0 ? batch : 0) * size_t(per_sample > 0 ? per_sample : 0));
  check(fewstep_randn(seed, stream, first_sample, batch, per_sample, out.data(), out.size()));
  return out;
}

inline std::string version() { return fewstep_version(); }

}  // namespace fewstep

#endif  // FEWSTEP_HPP
