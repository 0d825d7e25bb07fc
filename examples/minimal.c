/* minimal.c: load a fewstep engine and write samples to a .npy file, using only the C API.
 *
 *   minimal ENGINE.onnx SEED BATCH OUT.npy
 *
 * ONNX Runtime: with fewstep pip-installed, libfewstep finds the onnxruntime package installed beside it;
 * $FEWSTEP_ORT_LIBRARY (e.g. some onnxruntime/capi/libonnxruntime.so.*) overrides that.
 * Class-conditional engines sample classes 0,1,2,... */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fewstep.h"

/* Write float32 data of the given shape as a NumPy .npy (format 1.0). Returns 0 on success. */
static int write_npy(const char* path, const int64_t* shape, int ndim, const float* data, size_t n) {
  char header[256];
  int len, i;
  FILE* f;
  len = snprintf(header, sizeof header, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
  for (i = 0; i < ndim; ++i) len += snprintf(header + len, sizeof header - (size_t)len, "%lld,", (long long)shape[i]);
  len += snprintf(header + len, sizeof header - (size_t)len, "), }");
  while ((10 + len + 1) % 64) header[len++] = ' '; /* pad so the data starts 64-byte aligned */
  header[len++] = '\n';
  f = fopen(path, "wb");
  if (!f) return -1;
  fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  fputc(len & 0xff, f);
  fputc(len >> 8, f);
  fwrite(header, 1, (size_t)len, f);
  fwrite(data, sizeof(float), n, f);
  return fclose(f) == 0 ? 0 : -1;
}

/* 1 if s is one or more decimal digits whose value fits in 64 bits */
static int parse_u64(const char* s, unsigned long long* v) {
  unsigned long long x = 0;
  if (!*s) return 0;
  for (; *s; ++s) {
    unsigned d;
    if (*s < '0' || *s > '9') return 0;
    d = (unsigned)(*s - '0');
    if (x > (ULLONG_MAX - d) / 10) return 0;
    x = x * 10 + d;
  }
  *v = x;
  return 1;
}

int main(int argc, char** argv) {
  fewstep_engine_params params;
  fewstep_engine* engine = NULL;
  fewstep_engine_info info;
  fewstep_output_info oi;
  fewstep_status st;
  int64_t batch, shape[1 + FEWSTEP_MAX_DIMS], *labels = NULL;
  unsigned long long seed, ubatch;
  float* out = NULL;
  size_t n;
  int i, rc = 1;

  if (argc != 5) {
    fprintf(stderr, "usage: %s ENGINE.onnx SEED BATCH OUT.npy\n", argv[0]);
    return 2;
  }
  /* strtoull takes "-1" as 2^64 - 1 and "abc" as 0: accept plain decimal digits only */
  if (!parse_u64(argv[2], &seed)) {
    fprintf(stderr, "SEED must be a decimal integer in [0, 2^64), got '%s'\n", argv[2]);
    return 2;
  }
  if (!parse_u64(argv[3], &ubatch) || ubatch < 1 || ubatch > (1ull << 31)) {
    fprintf(stderr, "BATCH must be an integer in [1, 2^31], got '%s'\n", argv[3]);
    return 2;
  }
  batch = (int64_t)ubatch;

  params = fewstep_default_params();
  params.intra_op_threads = 1; /* run on this thread: deterministic and light */
  st = fewstep_engine_load(argv[1], &params, &engine);
  if (st != FEWSTEP_OK) {
    fprintf(stderr, "load failed (%s): %s\n", fewstep_status_string(st), fewstep_last_error());
    return 1;
  }
  fewstep_engine_get_info(engine, &info);
  printf("fewstep %s: engine %s, NFE %d, %d stochastic rows, sample shape", fewstep_version(), argv[1], info.nfe,
         info.n_stochastic);
  for (i = 0; i < info.ndim; ++i) printf(" %lld", (long long)info.sample_shape[i]);
  printf("\n");

  /* the output's size, not the latents': a --decode engine returns images */
  fewstep_engine_output_info(engine, &oi);
  n = (size_t)batch * (size_t)oi.per_sample;
  out = (float*)malloc(n * sizeof(float));
  if (info.num_classes > 0) {
    labels = (int64_t*)malloc((size_t)batch * sizeof(int64_t));
    for (i = 0; labels && i < batch; ++i) labels[i] = i % info.num_classes;
  }
  if (!out || (info.num_classes > 0 && !labels)) {
    fprintf(stderr, "out of memory\n");
    goto done;
  }
  st = fewstep_sample(engine, (uint64_t)seed, batch, labels, NULL, out, n);
  if (st != FEWSTEP_OK) {
    fprintf(stderr, "sample failed (%s): %s\n", fewstep_status_string(st), fewstep_last_error());
    goto done;
  }
  shape[0] = batch;
  memcpy(shape + 1, oi.shape + 1, (size_t)(oi.ndim - 1) * sizeof(int64_t));
  if (write_npy(argv[4], shape, oi.ndim, out, n) != 0) {
    fprintf(stderr, "cannot write %s\n", argv[4]);
    goto done;
  }
  printf("wrote %lld samples (%s) to %s\n", (long long)batch, oi.name, argv[4]);
  rc = 0;
done:
  free(labels);
  free(out);
  fewstep_engine_free(engine);
  return rc;
}
