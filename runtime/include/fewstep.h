/* fewstep C API.
 *
 * Plain C (C99 and C++), every symbol prefixed fewstep_ / FEWSTEP_. Functions that can fail
 * return a fewstep_status; no C++ exception crosses this API.
 */
#ifndef FEWSTEP_H
#define FEWSTEP_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32) && defined(FEWSTEP_SHARED)
#  ifdef FEWSTEP_BUILDING
#    define FEWSTEP_API __declspec(dllexport)
#  else
#    define FEWSTEP_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define FEWSTEP_API __attribute__((visibility("default")))
#else
#  define FEWSTEP_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes. FEWSTEP_OK is 0; every error is non-zero. */
typedef enum fewstep_status {
  FEWSTEP_OK = 0,
  FEWSTEP_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, non-positive size, ... */
  FEWSTEP_ERR_OUT_OF_RANGE = 2,     /* a value outside its documented range */
  FEWSTEP_ERR_BUFFER_TOO_SMALL = 3, /* an output buffer shorter than the result */
  FEWSTEP_ERR_INTERNAL = 4,         /* a bug in fewstep; please report it */
  FEWSTEP_ERR_IO = 5,               /* a file cannot be opened or read */
  FEWSTEP_ERR_INVALID_ENGINE = 6,   /* not a fewstep engine: unreadable ONNX, missing or bad metadata */
  FEWSTEP_ERR_BACKEND = 7,          /* ONNX Runtime cannot be loaded, or failed (message in fewstep_last_error) */
  FEWSTEP_ERR_UNSUPPORTED = 8,      /* an execution provider the ONNX Runtime library does not have */
  FEWSTEP_ERR_NONFINITE = 9         /* the run produced NaN or inf (a plan coefficient or guidance far out
                                       of range); `out` holds them and must not be used */
} fewstep_status;

/* Library version, "MAJOR.MINOR.PATCH" (the Python package's __version__). Never NULL. */
FEWSTEP_API const char* fewstep_version(void);

/* A static, human-readable name for `status`; unknown codes give "unknown fewstep status".
 * Never NULL. */
FEWSTEP_API const char* fewstep_status_string(fewstep_status status);

/* The message of the last error on the calling thread (thread-local; every function that returns
 * an error status sets it, successful calls leave it alone), "" if none. Valid until the next
 * fewstep call on this thread. Never NULL. */
FEWSTEP_API const char* fewstep_last_error(void);

/* ---- Noise ---------------------------------------------------------------------------------
 * The one Gaussian noise generator of every fewstep runtime; runtime/noise.py is the numpy
 * reference and gives bit-identical float32 values.
 *
 * Generator: Philox4x32-10 (Salmon et al. 2011; Random123 constants: multipliers 0xD2511F53,
 * 0xCD9E8D57, Weyl key increments 0x9E3779B9, 0xBB67AE85, 10 rounds), key = (seed & 0xffffffff,
 * seed >> 32).
 * Streams: element n (flattened, row-major) of sample i in stream s comes from counter
 * (n/4 mod 2^32, n/4 >> 32, i, s), output word n % 4. Sample indices are absolute, so a sample's
 * noise does not depend on the batch it is drawn in. Stream 0 is the initial z; stream 1 + j is
 * the noise of the j-th stochastic plan row.
 * Box–Muller on the word pairs (w0, w1) and (w2, w3) of each block, in double, rounded to float
 * once: u1 = (w0 + 0.5)*2^-32, u2 = (w1 + 0.5)*2^-32, r = sqrt(-2 ln u1),
 * n0 = r cos(2 pi u2), n1 = r sin(2 pi u2); likewise n2, n3 from (w2, w3). */

/* Philox4x32-10 block function: out[0..3] = Philox(counter[0..3], key[0..1]).
 * Returns FEWSTEP_ERR_INVALID_ARGUMENT if a pointer is NULL. */
FEWSTEP_API fewstep_status fewstep_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);

/* Standard-normal noise: writes batch*per_sample floats to out, row b (per_sample consecutive
 * floats) being sample first_sample + b of `stream` under `seed`.
 *   seed          any 64-bit value.
 *   stream        < 2^32 (0 = z, 1 + j = stochastic row j), else FEWSTEP_ERR_OUT_OF_RANGE.
 *   first_sample  first absolute sample index; first_sample + batch <= 2^32, else
 *                 FEWSTEP_ERR_OUT_OF_RANGE.
 *   batch         >= 1, per_sample >= 1 (elements per sample), else FEWSTEP_ERR_INVALID_ARGUMENT;
 *                 batch*per_sample must fit in size_t, else FEWSTEP_ERR_OUT_OF_RANGE.
 *   out, out_len  capacity in floats; out_len < batch*per_sample gives
 *                 FEWSTEP_ERR_BUFFER_TOO_SMALL, out == NULL FEWSTEP_ERR_INVALID_ARGUMENT.
 * Nothing is written unless FEWSTEP_OK is returned. Thread-safe (no global state). */
FEWSTEP_API fewstep_status fewstep_randn(uint64_t seed, uint64_t stream, uint64_t first_sample, int64_t batch,
                                         int64_t per_sample, float* out, size_t out_len);


/* ---- Engines ---------------------------------------------------------------------------------
 * An engine is one exported sampler .onnx (the whole plan unrolled, see export/ and the contract
 * in DESIGN §7) run through ONNX Runtime's C API. ONNX Runtime is loaded at run time (dlopen), so
 * the same fewstep build runs on the CPU or the GPU build of ONNX Runtime. */

typedef struct fewstep_engine fewstep_engine; /* opaque; fewstep_engine_load / fewstep_engine_free */

typedef enum fewstep_provider {
  FEWSTEP_PROVIDER_CPU = 0,      /* ONNX Runtime's CPU execution provider */
  FEWSTEP_PROVIDER_CUDA = 1,     /* CUDA EP (needs the onnxruntime-gpu library), CPU fallback for other nodes */
  FEWSTEP_PROVIDER_TENSORRT = 2, /* TensorRT EP, then CUDA, then CPU for nodes TensorRT does not take */
  FEWSTEP_PROVIDER_OPENVINO = 3  /* OpenVINO EP on device_type "CPU" (needs the onnxruntime-openvino build's
                                    library, e.g. FEWSTEP_ORT_LIBRARY=.../onnxruntime/capi/libonnxruntime.so.*),
                                    ONNX Runtime's CPU EP for nodes OpenVINO does not take. intra_op_threads
                                    also sets OpenVINO's own thread count (num_of_threads). */
} fewstep_provider;

/* Load-time parameters. Always start from fewstep_default_params() and change fields, so code
 * keeps compiling and meaning the same when fields are added. */
typedef struct fewstep_engine_params {
  int32_t intra_op_threads;     /* threads inside one operator; 0 = ONNX Runtime's default (one per core),
                                   1 = run on the calling thread. Default 0. */
  int32_t inter_op_threads;     /* threads across independent operators; 0 = default. Default 0. */
  fewstep_provider provider;    /* execution provider. Default FEWSTEP_PROVIDER_CPU. */
  int32_t device_id;            /* CUDA device ordinal for CUDA / TensorRT; ignored on the CPU and OpenVINO.
                                   Default 0. */
  int32_t cuda_graph;           /* non-zero: capture the run in a CUDA graph (CUDA / TensorRT providers;
                                   fixed shapes, so one batch size per engine). Default 0. */
  const char* engine_cache_dir; /* TensorRT engine + timing cache directory; NULL = no cache. Default NULL.
                                   Copied during fewstep_engine_load. */
  const char* ort_library;      /* path of libonnxruntime.so to dlopen; NULL = the environment variable
                                   FEWSTEP_ORT_LIBRARY, else the onnxruntime Python package installed
                                   beside this libfewstep (pip: site-packages/onnxruntime/capi/), else
                                   "libonnxruntime.so" on the loader's search path. The first library
                                   loaded in a process stays loaded: later loads must name the same
                                   file (or NULL). Default NULL. */
} fewstep_engine_params;

/* The defaults documented field by field above. */
FEWSTEP_API fewstep_engine_params fewstep_default_params(void);

/* Load the engine at `path`. params NULL = defaults. On FEWSTEP_OK *out is a new engine, to be
 * released with fewstep_engine_free; on any error *out is NULL and fewstep_last_error says why.
 *   FEWSTEP_ERR_INVALID_ARGUMENT  path or out NULL, a params field out of its range
 *   FEWSTEP_ERR_IO                path missing or unreadable
 *   FEWSTEP_ERR_INVALID_ENGINE    not ONNX, or ONNX without valid fewstep metadata (fewstep.format
 *                                 "fewstep.engine/1", kind "sampler", a contract matching the graph)
 *   FEWSTEP_ERR_BACKEND           ONNX Runtime library not found / too old, or session creation failed
 *   FEWSTEP_ERR_UNSUPPORTED       the provider asked for is not in the ONNX Runtime library
 * Thread-safe. */
FEWSTEP_API fewstep_status fewstep_engine_load(const char* path, const fewstep_engine_params* params,
                                               fewstep_engine** out);

/* Release an engine and everything it owns. NULL is a no-op. No call on `engine` may be running. */
FEWSTEP_API void fewstep_engine_free(fewstep_engine* engine);

#define FEWSTEP_MAX_DIMS 8

/* The engine's input contract (from its metadata, checked against the graph at load). */
typedef struct fewstep_engine_info {
  int32_t ndim;                          /* rank of one sample (e.g. 3 for C×H×W), 1..FEWSTEP_MAX_DIMS */
  int64_t sample_shape[FEWSTEP_MAX_DIMS]; /* the first ndim entries are the shape of one sample */
  int64_t per_sample;                    /* floats per sample of z: the product of sample_shape (the output's
                                            size: fewstep_engine_output_info) */
  int64_t fixed_batch;                   /* the only batch the engine takes; 0 = any batch >= 1 */
  int32_t nfe;                           /* network evaluations in the plan */
  int32_t n_stochastic;                  /* plan rows that draw fresh noise (S) */
  int32_t num_classes;                   /* class labels 0..num_classes-1; 0 = not class-conditional */
  int32_t null_label;                    /* label meaning "no class" (classifier-free); -1 = none */
  int32_t guidance_input;                /* non-zero: the engine takes a CFG scale per sample */
  double sigma_init;                     /* sigma of the initial noise: x = sigma_init * z */
  const char* compute_dtype;             /* "float32" | "float16" | "bfloat16" (inside the graph) */
  const char* plan_json;                 /* the plan (fewstep.plan/1 JSON) baked into the graph */
  const char* contract_json;             /* metadata fewstep.contract, verbatim */
} fewstep_engine_info;

/* Fill *out with the contract of `engine`. The strings belong to the engine and live as long as it.
 * FEWSTEP_ERR_INVALID_ARGUMENT if a pointer is NULL. */
FEWSTEP_API fewstep_status fewstep_engine_get_info(const fewstep_engine* engine, fewstep_engine_info* out);

/* A metadata_props value of the engine's ONNX file (e.g. "fewstep.teacher_hash"), owned by the
 * engine; NULL if the key is absent or an argument is NULL. */
FEWSTEP_API const char* fewstep_engine_metadata(const fewstep_engine* engine, const char* key);

/* Draw `batch` samples with seed `seed`: z = fewstep_randn(seed, stream 0), the noise of stochastic
 * row j from stream 1 + j, sample index = position in the batch -- the same values the Python
 * runtime uses, so the result equals `fewstep sample ... --seed seed` run through this engine.
 *   batch     >= 1 (and == fixed_batch if the engine has one), <= 2^32.
 *   labels    int64[batch] class labels in 0..num_classes-1 or the null label; NULL = the null label
 *             for every sample (unconditional; FEWSTEP_ERR_INVALID_ARGUMENT if the engine has none).
 *             Must be NULL for an engine that is not class-conditional.
 *   guidance  float[batch] CFG scales W (finite); NULL = 1 (plain conditional). Must be NULL or all
 *             1 for an engine without a guidance input.
 *   out       float[out_len] receives batch * per_sample floats of the output, sample-major, row-major;
 *             per_sample of fewstep_engine_output_info (equal to fewstep_engine_info's for a latent
 *             "sample" output, larger for an "image" of a --decode engine).
 * Returns FEWSTEP_OK; FEWSTEP_ERR_INVALID_ARGUMENT (NULL engine/out, bad batch, labels or guidance),
 * FEWSTEP_ERR_OUT_OF_RANGE (a label out of range, batch over 2^32), FEWSTEP_ERR_BUFFER_TOO_SMALL,
 * FEWSTEP_ERR_BACKEND (the run failed), FEWSTEP_ERR_NONFINITE (the result holds NaN or inf: try a smaller
 * guidance). On error `out` may be partly written. An engine with conditioning inputs (see
 * fewstep_sample_inputs) refuses this call: FEWSTEP_ERR_INVALID_ARGUMENT naming the missing input.
 * Thread-safe: any number of threads may sample from one engine at once; the results do not
 * depend on it. */
FEWSTEP_API fewstep_status fewstep_sample(fewstep_engine* engine, uint64_t seed, int64_t batch, const int64_t* labels,
                                          const float* guidance, float* out, size_t out_len);

/* As fewstep_sample, but with a given initial z (float[batch * per_sample], standard normal,
 * e.g. read from a .npy; NULL = from the seed as above). The stochastic rows' noise still comes
 * from `seed`, as in `fewstep sample --noise FILE`. */
FEWSTEP_API fewstep_status fewstep_sample_from(fewstep_engine* engine, uint64_t seed, int64_t batch, const float* z,
                                               const int64_t* labels, const float* guidance, float* out,
                                               size_t out_len);

/* ---- Named inputs ------------------------------------------------------------------------------
 * An engine's inputs are the ones its contract lists (fewstep.contract "inputs", checked against the graph
 * at load): z [batch, *sample_shape] and, with stochastic rows, noise [n_stochastic, batch, *sample_shape],
 * both drawn from the seed; class_labels int64 [batch] and guidance float32 [batch] for class-conditional
 * and CFG-scale engines; and any conditioning tensors of the model (e.g. encoder_hidden_states float32
 * [batch, 77, 768], text_embeds, time_ids, their negative_* twins for classifier-free guidance). */

/* Element types of inputs and the output: the ONNX TensorProto codes. */
typedef enum fewstep_dtype {
  FEWSTEP_DTYPE_FLOAT32 = 1,
  FEWSTEP_DTYPE_INT64 = 7
} fewstep_dtype;

/* Where an input's values come from. */
typedef enum fewstep_input_source {
  FEWSTEP_INPUT_REQUIRED = 0,  /* the caller gives it, exactly once (class_labels, guidance, conditioning) */
  FEWSTEP_INPUT_SEED = 1,      /* z: Philox stream 0 of the seed unless the caller gives it */
  FEWSTEP_INPUT_SEED_ONLY = 2  /* noise: always Philox streams 1.. of the seed; giving it is an error */
} fewstep_input_source;

/* Rank bound of any input: noise is [n_stochastic, batch, *sample_shape]. */
#define FEWSTEP_MAX_INPUT_DIMS (FEWSTEP_MAX_DIMS + 2)

/* One input as the engine declares it. */
typedef struct fewstep_input_info {
  const char* name;                          /* owned by the engine, lives as long as it */
  int32_t ndim;                              /* 0..FEWSTEP_MAX_INPUT_DIMS */
  int64_t shape[FEWSTEP_MAX_INPUT_DIMS];     /* the first ndim entries; -1 = the batch */
  int32_t dtype;                             /* a fewstep_dtype */
  int32_t source;                            /* a fewstep_input_source */
} fewstep_input_info;

/* Number of inputs of `engine` (z and noise included), 0 for NULL. */
FEWSTEP_API size_t fewstep_engine_input_count(const fewstep_engine* engine);

/* Input `index` (0 .. count-1, in the contract's order) into *out. FEWSTEP_ERR_INVALID_ARGUMENT for a NULL
 * pointer, FEWSTEP_ERR_OUT_OF_RANGE for an index past the count. */
FEWSTEP_API fewstep_status fewstep_engine_input_info(const fewstep_engine* engine, size_t index,
                                                     fewstep_input_info* out);

/* The engine's output as it declares it (fewstep.contract "outputs", checked against the graph at load; a
 * contract without the list means "sample" [batch, *sample_shape]): "sample", the latents, for a sampler;
 * "image" [batch, 3, H, W] for an engine exported with the VAE decoder appended (`fewstep export --decode`).
 * Every sampling call writes batch * per_sample floats of it to `out`, sample-major, row-major: size out_len
 * from per_sample here, not from fewstep_engine_info (whose sample_shape and per_sample are the latents',
 * the shape of z). */
typedef struct fewstep_output_info {
  const char* name;                          /* owned by the engine, lives as long as it */
  int32_t ndim;                              /* 2..FEWSTEP_MAX_DIMS + 1 (the batch, then one sample's sizes) */
  int64_t shape[FEWSTEP_MAX_INPUT_DIMS];     /* the first ndim entries; shape[0] = -1 (any batch) or fixed_batch */
  int32_t dtype;                             /* a fewstep_dtype: FEWSTEP_DTYPE_FLOAT32 */
  int64_t per_sample;                        /* floats per sample: the product of shape[1..ndim-1] */
} fewstep_output_info;

/* The output of `engine` into *out. FEWSTEP_ERR_INVALID_ARGUMENT for a NULL pointer. */
FEWSTEP_API fewstep_status fewstep_engine_output_info(const fewstep_engine* engine, fewstep_output_info* out);

/* One named tensor given to fewstep_sample_inputs. Nothing is copied: the caller keeps name, shape and
 * data alive for the call. */
typedef struct fewstep_input {
  const char* name;      /* an input of the engine (fewstep_engine_input_info) */
  const int64_t* shape;  /* ndim sizes; must equal the declared shape with -1 replaced by the batch */
  size_t ndim;
  int32_t dtype;         /* a fewstep_dtype, equal to the declared one */
  const void* data;      /* row-major float or int64_t values, as many as the shape holds */
} fewstep_input;

/* Draw `batch` samples with seed `seed` from the given named inputs: every FEWSTEP_INPUT_REQUIRED input
 * of the engine exactly once, z optionally (standard normal; absent = from the seed, as fewstep_sample),
 * noise never. Every float input must be finite; class_labels must be classes or the null label.
 * fewstep_sample and fewstep_sample_from are this call with class_labels (NULL = the null label) and
 * guidance (NULL = 1) filled in.
 *   FEWSTEP_ERR_INVALID_ARGUMENT  NULL engine/out, inputs NULL with n_inputs > 0, bad batch; an unknown,
 *                                 repeated or missing input name, a wrong dtype, rank or shape, NULL data
 *                                 or shape, NaN or inf in a float input (fewstep_last_error names it)
 *   FEWSTEP_ERR_OUT_OF_RANGE      a label out of range; batch over 2^32, or an input (or the output) of
 *                                 more than 2^31 values at this batch
 *   FEWSTEP_ERR_BUFFER_TOO_SMALL, FEWSTEP_ERR_BACKEND, FEWSTEP_ERR_NONFINITE  as fewstep_sample.
 * Thread-safe as fewstep_sample. */
FEWSTEP_API fewstep_status fewstep_sample_inputs(fewstep_engine* engine, uint64_t seed, int64_t batch,
                                                 const fewstep_input* inputs, size_t n_inputs, float* out,
                                                 size_t out_len);

#ifdef __cplusplus
}
#endif
#endif /* FEWSTEP_H */
