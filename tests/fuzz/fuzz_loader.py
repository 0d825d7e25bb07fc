"""Bounded fuzz of the C++ engine loader (atheris): random files, mutated engines and mutated
fewstep.contract JSON through ``fewstep._C.Engine``. Every input must load or raise ValueError /
RuntimeError; a crash (signal) or any other exception fails the run.

    FEWSTEP_FUZZ_ENGINE=good.onnx python tests/fuzz/fuzz_loader.py -runs=500 -seed=1 -max_len=20000 CORPUS_DIR
"""

import collections
import os
import sys
import tempfile

import atheris
import numpy as np

from fewstep import _C

ENGINE = os.environ["FEWSTEP_FUZZ_ENGINE"]
GOOD = open(ENGINE, "rb").read()
TMP = os.path.join(tempfile.mkdtemp(prefix="fewstep_fuzz_"), "in.onnx")
ORT = _C.find_ort_library()
STATS = collections.Counter()  # outcomes per mode, printed every 50 inputs (libFuzzer exits without atexit)


def _with_contract(text: str) -> bytes:
    import onnx

    m = onnx.load_from_string(GOOD)
    for p in m.metadata_props:
        if p.key == "fewstep.contract":
            p.value = text
    return m.SerializeToString()


@atheris.instrument_func  # coverage feedback on the Python side of the target
def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    if STATS["inputs"] % 50 == 0:
        print("fuzz stats:", dict(sorted(STATS.items())), flush=True)
    if not data:
        return
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # arbitrary bytes
        blob = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 1:  # the good engine, truncated and with bytes overwritten
        cut = fdp.ConsumeIntInRange(0, len(GOOD))
        at = fdp.ConsumeIntInRange(0, max(0, cut - 1))
        patch = fdp.ConsumeBytes(64)
        blob = bytearray(GOOD[:cut])
        blob[at:at + len(patch)] = patch
        blob = bytes(blob)
    else:  # the good engine with a fuzzed contract (exercises our JSON reader and contract checks)
        blob = _with_contract(fdp.ConsumeBytes(fdp.remaining_bytes()).decode("utf-8", "replace"))
    with open(TMP, "wb") as f:
        f.write(blob)
    try:
        eng = _C.Engine(TMP, threads=1, ort_library=ORT)
    except (ValueError, RuntimeError) as exc:
        STATS[f"mode{mode}_rejected" + ("_contract" if "fewstep.contract" in str(exc) else "")] += 1
        return
    STATS[f"mode{mode}_loaded"] += 1
    info = eng.info
    labels = None if info["num_classes"] is None else np.zeros(2, np.int64)
    try:
        x = eng.sample(0, 2, labels=labels)
    except (ValueError, RuntimeError):
        return
    assert x.shape == (2, *info["sample_shape"])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
