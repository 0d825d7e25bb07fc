// Philox4x32-10 and Box–Muller: the C++ twin of runtime/noise.py (spec in fewstep.h).
// Bit-identity with numpy needs IEEE double arithmetic evaluated exactly as written: the build
// turns FMA contraction off and never uses -ffast-math for this file.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "error.hpp"
#include "fewstep.h"

namespace {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
constexpr int kRounds = 10;

inline void philox(const uint32_t in[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = in[0], c1 = in[1], c2 = in[2], c3 = in[3];
  uint32_t k0 = key[0], k1 = key[1];
  for (int r = 0; r < kRounds; ++r) {
    if (r) {  // the key is bumped between rounds, not before the first
      k0 += kW0;
      k1 += kW1;
    }
    const uint64_t p0 = uint64_t(kM0) * c0, p1 = uint64_t(kM1) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Same expression, same order as runtime/noise.py::_randn.
inline void box_muller(uint32_t a, uint32_t b, float* n0, float* n1) {
  constexpr double kTwoPow32Inv = 1.0 / 4294967296.0;
  constexpr double kTwoPi = 2.0 * 3.14159265358979323846;  // == 2.0 * math.pi exactly
  const double u1 = (double(a) + 0.5) * kTwoPow32Inv;
  const double u2 = (double(b) + 0.5) * kTwoPow32Inv;
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = kTwoPi * u2;
  *n0 = float(r * std::cos(theta));
  *n1 = float(r * std::sin(theta));
}

}  // namespace

extern "C" fewstep_status fewstep_philox4x32_10(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  if (!counter || !key || !out)
    return fewstep_impl::set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_philox4x32_10: NULL argument");
  philox(counter, key, out);
  return FEWSTEP_OK;
}

extern "C" fewstep_status fewstep_randn(uint64_t seed, uint64_t stream, uint64_t first_sample, int64_t batch,
                                        int64_t per_sample, float* out, size_t out_len) {
  using fewstep_impl::set_error;
  if (!out) return set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_randn: out is NULL");
  if (batch < 1 || per_sample < 1)
    return set_error(FEWSTEP_ERR_INVALID_ARGUMENT, "fewstep_randn: batch and per_sample must be >= 1");
  constexpr uint64_t k32 = uint64_t(1) << 32;  // sample index and stream are 32-bit counter words
  if (stream >= k32) return set_error(FEWSTEP_ERR_OUT_OF_RANGE, "fewstep_randn: stream must be < 2^32");
  if (first_sample > k32 || uint64_t(batch) > k32 - first_sample)
    return set_error(FEWSTEP_ERR_OUT_OF_RANGE, "fewstep_randn: first_sample + batch must be <= 2^32");
  if (uint64_t(per_sample) > std::numeric_limits<size_t>::max() / uint64_t(batch))
    return set_error(FEWSTEP_ERR_OUT_OF_RANGE, "fewstep_randn: batch * per_sample does not fit in size_t");
  const size_t per = size_t(per_sample), total = size_t(batch) * per;
  if (out_len < total)
    return set_error(FEWSTEP_ERR_BUFFER_TOO_SMALL, "fewstep_randn: out has room for " + std::to_string(out_len) +
                                                       " floats, " + std::to_string(total) + " are needed");

  const uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
  for (int64_t b = 0; b < batch; ++b) {
    float* row = out + size_t(b) * per;
    uint32_t ctr[4] = {0, 0, uint32_t(first_sample + uint64_t(b)), uint32_t(stream)};
    for (size_t n = 0; n < per; n += 4) {
      const uint64_t block = n / 4;
      ctr[0] = uint32_t(block);
      ctr[1] = uint32_t(block >> 32);
      uint32_t w[4];
      philox(ctr, key, w);
      float v[4];
      box_muller(w[0], w[1], &v[0], &v[1]);
      box_muller(w[2], w[3], &v[2], &v[3]);
      // The last block of a sample may be partial: its unused outputs are dropped, as in numpy.
      for (size_t j = 0; j < 4 && n + j < per; ++j) row[n + j] = v[j];
    }
  }
  return FEWSTEP_OK;
}
