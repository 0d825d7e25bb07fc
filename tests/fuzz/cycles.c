/* ASan / LSan driver: N cycles of load / sample / free on a good engine plus every error path
 * (missing file, garbage, truncated file, bad arguments), each on the C API only. Any invalid
 * access aborts under AddressSanitizer; anything not freed is reported by LeakSanitizer at exit.
 *   cycles GOOD.onnx BAD_FILE... -- N */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fewstep.h"

static int fail(const char* what) {
  fprintf(stderr, "cycles: %s: %s\n", what, fewstep_last_error());
  return 1;
}

int main(int argc, char** argv) {
  int i, k, nbad = 0, cycles = 0;
  const char* bad[64];
  static float out[4096];
  fewstep_engine_info info;
  fewstep_output_info oi;
  fewstep_engine_params p = fewstep_default_params();
  p.intra_op_threads = 1;
  for (i = 2; i < argc; ++i) {
    if (!strcmp(argv[i], "--") && i + 1 < argc) {
      cycles = atoi(argv[i + 1]);
      break;
    }
    if (nbad < 64) bad[nbad++] = argv[i];
  }
  if (argc < 2 || cycles < 1) {
    fprintf(stderr, "usage: cycles GOOD.onnx BAD... -- N\n");
    return 2;
  }

  for (k = 0; k < cycles; ++k) {
    fewstep_engine* e = NULL;
    int64_t labels[4] = {0, 1, 2, 3}, wrong[4] = {0, 1, 99, 3};
    float g[4] = {1.5f, 1.5f, 1.5f, 1.5f};
    if (fewstep_engine_load(argv[1], &p, &e) != FEWSTEP_OK) return fail("load");
    fewstep_engine_get_info(e, &info);
    if (fewstep_engine_output_info(e, &oi) != FEWSTEP_OK || oi.per_sample < 1 ||
        (!strcmp(oi.name, "sample") && oi.per_sample != info.per_sample) ||
        fewstep_engine_output_info(e, NULL) != FEWSTEP_ERR_INVALID_ARGUMENT)
      return fail("output info");
    if ((size_t)(4 * oi.per_sample) > 4096) return fail("engine too large for this driver");
    if (fewstep_sample(e, (uint64_t)k, 4, info.num_classes ? labels : NULL, info.guidance_input ? g : NULL, out,
                       4096) != FEWSTEP_OK)
      return fail("sample");
    /* error paths must not leak either */
    if (fewstep_sample(e, 0, 4, NULL, NULL, out, 3) != FEWSTEP_ERR_BUFFER_TOO_SMALL) return fail("short buffer");
    if (fewstep_sample(e, 0, 0, NULL, NULL, out, 4096) != FEWSTEP_ERR_INVALID_ARGUMENT) return fail("batch 0");
    if (info.num_classes && fewstep_sample(e, 0, 4, wrong, NULL, out, 4096) != FEWSTEP_ERR_OUT_OF_RANGE)
      return fail("bad label");
    { /* the generic path (fewstep_sample_inputs), its listing and its error paths */
      int64_t bshape[1] = {4};
      fewstep_input in[2];
      fewstep_input_info ii;
      size_t j, n = fewstep_engine_input_count(e);
      in[0].name = "class_labels", in[0].shape = bshape, in[0].ndim = 1, in[0].dtype = FEWSTEP_DTYPE_INT64;
      in[0].data = labels;
      in[1] = in[0];
      in[1].name = "nope";
      for (j = 0; j < n; ++j)
        if (fewstep_engine_input_info(e, j, &ii) != FEWSTEP_OK) return fail("input info");
      if (info.num_classes && !info.guidance_input &&
          fewstep_sample_inputs(e, (uint64_t)k, 4, in, 1, out, 4096) != FEWSTEP_OK)
        return fail("sample_inputs");
      if (fewstep_sample_inputs(e, 0, 4, in + 1, 1, out, 4096) != FEWSTEP_ERR_INVALID_ARGUMENT)
        return fail("unknown input");
      if (fewstep_sample_inputs(e, 0, 4, in, 0, out, 4096) == FEWSTEP_OK && info.num_classes)
        return fail("missing input");
    }
    fewstep_engine_free(e);
    e = (fewstep_engine*)1;
    if (fewstep_engine_load(bad[k % (nbad ? nbad : 1)], &p, &e) == FEWSTEP_OK || e != NULL) return fail("bad file loaded");
  }
  printf("cycles: %d ok\n", cycles);
  return 0;
}
