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
  FEWSTEP_ERR_INTERNAL = 4          /* a bug in fewstep; please report it */
} fewstep_status;

/* Library version, "MAJOR.MINOR.PATCH" (the Python package's __version__). Never NULL. */
FEWSTEP_API const char* fewstep_version(void);

/* A static, human-readable name for `status`; unknown codes give "unknown fewstep status".
 * Never NULL. */
FEWSTEP_API const char* fewstep_status_string(fewstep_status status);

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

#ifdef __cplusplus
}
#endif
#endif /* FEWSTEP_H */
