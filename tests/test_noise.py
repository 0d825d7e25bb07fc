"""The shared noise generator: Philox4x32-10 + Box–Muller, numpy (runtime/noise.py) vs C++ (fewstep._C, fewstep.h)."""

import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fewstep import _C
from fewstep.runtime import noise

ROOT = Path(__file__).resolve().parents[1]

# Random123 kat_vectors, philox4x32 10: counter[4], key[2] -> output[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

SEEDS = [0, 1, 2**32 - 1, 2**32, 0x0123456789ABCDEF, 2**64 - 1]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# ---- Philox known answers -------------------------------------------------------------------


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_kat_numpy(ctr, key, expected):
    out = noise.philox4x32_10(np.array(ctr, np.uint32), np.array(key, np.uint32))
    assert out.dtype == np.uint32
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_kat_cpp(ctr, key, expected):
    assert _C.philox4x32_10(list(ctr), list(key)) == expected


def test_philox_numpy_vectorised_matches_rows():
    ctr = np.array([c for c, _, _ in KAT], np.uint32)
    key = np.array([k for _, k, _ in KAT], np.uint32)
    assert np.array_equal(noise.philox4x32_10(ctr, key), np.array([e for _, _, e in KAT], np.uint32))
    # one key broadcast over many counters == the C++ block function word for word
    ctr = np.random.default_rng(0).integers(0, 2**32, (64, 4), dtype=np.uint64).astype(np.uint32)
    out = noise.philox4x32_10(ctr, np.array([0xA4093822, 0x299F31D0], np.uint32))
    for c, o in zip(ctr, out):
        assert _C.philox4x32_10([int(v) for v in c], [0xA4093822, 0x299F31D0]) == tuple(int(v) for v in o)


# ---- The spec, from an independent scalar implementation -------------------------------------


def _philox_py(ctr, key):
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


def _element_py(seed, sample, stream, n):
    """Element n of `sample` in `stream`, straight from the written spec (math = the C library)."""
    w = _philox_py((n // 4 & 0xFFFFFFFF, n // 4 >> 32, sample, stream), (seed & 0xFFFFFFFF, seed >> 32))
    j = n % 4
    u1, u2 = (w[j & 2] + 0.5) * 2.0**-32, (w[(j & 2) + 1] + 0.5) * 2.0**-32
    r = math.sqrt(-2.0 * math.log(u1))
    return np.float32(r * (math.cos if j % 2 == 0 else math.sin)(2.0 * math.pi * u2))


def test_layout_matches_spec():
    for seed, stream, first in [(0, 0, 0), (2**64 - 1, 3, 17), (2**32, 2**32 - 1, 2**32 - 2)]:
        x = noise.randn(seed, 2, (3, 3), stream, first)
        for b in range(2):
            expect = np.array([_element_py(seed, first + b, stream, n) for n in range(9)], np.float32)
            assert same_bits(x[b].reshape(-1), expect)
    assert same_bits(_C.randn(2**64 - 1, 2, (3, 3), 3, 17), noise.randn(2**64 - 1, 2, (3, 3), 3, 17))


def test_known_values():
    # Regression pins (float32 bit patterns): a change here changes every seeded sample fewstep has produced.
    pins = {
        (0, 0, 0): [0x3F7DBB33, 0xBF6CB6B0, 0xBF1E1B9F, 0xBEF6D1B2],
        (2**64 - 1, 7, 2**32 - 1): [0x3FAFFC90, 0x3F970ACB, 0xBFE67018, 0xBF06FB70],
    }
    for (seed, stream, first), bits in pins.items():
        for gen in (noise.randn, _C.randn):
            x = gen(seed, 1, (4,), stream, first)
            assert x.view(np.uint32)[0].tolist() == bits
    # printed to 7 decimals: each is within half a unit of the last digit (5e-8) of the float32 value
    np.testing.assert_allclose(noise.randn(0, 1, (4,))[0], [0.9911377, -0.9246626, -0.617609, -0.4820686], atol=5e-8)


# ---- numpy vs C++ -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,), (3, 5, 7), ()])
def test_cpp_bit_identical_to_numpy(seed, shape):
    for batch, stream, first in [(1, 0, 0), (3, 1, 5), (8, 2**32 - 1, 2**32 - 8)]:
        a = noise.randn(seed, batch, shape, stream, first)
        b = _C.randn(seed, batch, shape, stream=stream, first_sample=first)
        assert a.shape == (batch, *shape)
        assert same_bits(a, b), (seed, shape, batch, stream, first)
        assert np.array_equal(a, b)


def test_cpp_bit_identical_large():
    # ~1M values per seed: log/cos/sin come from different libraries (numpy SIMD vs libm).
    for seed in (7, 2**63 + 11):
        assert same_bits(noise.randn(seed, 4, (250_007,), 2), _C.randn(seed, 4, (250_007,), 2))


# ---- Batch independence and layout -------------------------------------------------------------


@pytest.mark.parametrize("gen", [noise.randn, _C.randn], ids=["numpy", "cpp"])
def test_sample_independent_of_batch(gen):
    seed, shape = 2**40 + 3, (2, 4099)
    big = gen(seed, 8, shape, 1, 100)
    for i in range(8):
        assert same_bits(big[i : i + 1], gen(seed, 1, shape, 1, 100 + i))
    # a sub-batch starting in the middle is the same slice
    assert same_bits(big[3:6], gen(seed, 3, shape, 1, 103))


def test_elements_depend_only_on_flat_index():
    big = noise.randn(5, 2, (4099,))
    assert same_bits(noise.randn(5, 2, (7,)), big[:, :7])
    assert same_bits(noise.randn(5, 2, (1,)), big[:, :1])
    assert same_bits(noise.randn(5, 2, (3, 5)).reshape(2, 15), big[:, :15])


def test_draw_streams():
    z, eps = noise.draw(9, 3, (2, 5), 3, first_sample=4)
    assert z.shape == (3, 2, 5) and eps.shape == (3, 3, 2, 5)
    assert z.dtype == eps.dtype == np.float32
    assert same_bits(z, noise.randn(9, 3, (2, 5), 0, 4))
    for j in range(3):
        assert same_bits(eps[j], _C.randn(9, 3, (2, 5), 1 + j, 4))
    z0, none = noise.draw(9, 3, (2, 5), 0, first_sample=4)
    assert same_bits(z0, z) and none.shape == (0, 3, 2, 5)


def test_seeds_streams_samples_differ():
    base = noise.randn(0, 2, (64,))
    others = [
        noise.randn(1, 2, (64,)),
        noise.randn(2**32, 2, (64,)),  # key high word only
        noise.randn(0, 2, (64,), stream=1),
        noise.randn(0, 2, (64,), first_sample=2),
    ]
    for o in others:
        assert np.mean(o == base) < 0.05
    assert np.mean(base[0] == base[1]) < 0.05


# ---- Statistics -------------------------------------------------------------------------------


def test_statistics():
    n = 1_000_000
    x = noise.randn(1234, 4, (n // 4,), stream=2).astype(np.float64).reshape(-1)
    # 5-sigma bounds of the sample moments of N(0, 1): Var(mean)=1/n, Var(x^2)=2, Var(x^4)=96.
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(np.mean(x**2) - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(x**3)) < 5 * math.sqrt(15 / n)
    assert abs(np.mean(x**4) - 3) < 5 * math.sqrt(96 / n)
    # CDF at fixed points vs Φ (a coarse Kolmogorov–Smirnov substitute), binomial 5-sigma.
    for t in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):
        p = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        assert abs(np.mean(x < t) - p) < 5 * math.sqrt(p * (1 - p) / n), t
    # Box–Muller with u1 >= 2^-33 bounds |x| by sqrt(66 ln 2) ≈ 6.76.
    assert np.abs(x).max() < math.sqrt(66 * math.log(2))
    # Neighbouring elements (same block / pair, and across blocks), samples and streams uncorrelated.
    y = x.reshape(4, -1)
    pairs = [(x[:-1], x[1:]), (x[0::4], x[2::4]), (x[:-4], x[4:]), (y[0], y[1])]
    other = noise.randn(1234, 1, (n // 4,), stream=3).astype(np.float64)[0]
    pairs.append((y[0], other))
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


# ---- Argument validation ------------------------------------------------------------------------

BAD = [
    dict(seed=-1),
    dict(seed=2**64),
    dict(seed=1.0),
    dict(seed=True),
    dict(batch=0),
    dict(batch=-2),
    dict(shape=(0,)),
    dict(shape=(3, -1)),
    dict(shape=(2.0,)),
    dict(shape="ab"),
    dict(stream=2**32),
    dict(stream=-1),
    dict(first_sample=2**32 - 2, batch=3),
    dict(first_sample=-1),
]


@pytest.mark.parametrize("gen", [noise.randn, _C.randn], ids=["numpy", "cpp"])
@pytest.mark.parametrize("bad", BAD, ids=[str(b) for b in BAD])
def test_bad_arguments(gen, bad):
    args = dict(seed=1, batch=2, shape=(3,), stream=0, first_sample=0) | bad
    with pytest.raises(ValueError):
        gen(**args)


def test_boundary_arguments_accepted():
    assert noise.randn(2**64 - 1, 2, 3, 2**32 - 1, 2**32 - 2).shape == (2, 3)
    assert _C.randn(np.uint64(2**64 - 1), np.int64(2), [3], 2**32 - 1, 2**32 - 2).shape == (2, 3)
    for gen in (noise.randn, _C.randn):
        assert gen(np.uint64(3), np.int32(2), np.array([2, 3]), np.uint8(1)).shape == (2, 2, 3)
        assert gen(3, 2, np.int64(5)).shape == (2, 5)
        with pytest.raises(ValueError):
            gen(3, 2, np.array([[2, 3]]))
    with pytest.raises(ValueError, match="n_stochastic"):
        noise.draw(0, 1, (2,), -1)


# ---- The C API from C, without Python ------------------------------------------------------------

C_MAIN = r"""
#include <stdio.h>
#include "fewstep.h"
int main(void) {
  float out[2 * 7];
  uint32_t ctr[4] = {0, 0, 0, 0}, key[2] = {0, 0}, w[4];
  if (fewstep_philox4x32_10(ctr, key, w) != FEWSTEP_OK) return 1;
  printf("%08x %08x %08x %08x\n", w[0], w[1], w[2], w[3]);
  if (fewstep_randn(18446744073709551615ull, 3, 10, 2, 7, out, 14) != FEWSTEP_OK) return 2;
  for (int i = 0; i < 14; ++i) printf("%.9g ", out[i]);
  printf("\n%d %d %d %d %d\n", fewstep_randn(1, 0, 0, 2, 7, out, 13), fewstep_randn(1, 4294967296ull, 0, 1, 1, out, 1),
         fewstep_randn(1, 0, 4294967295ull, 2, 1, out, 2), fewstep_randn(1, 0, 0, 0, 1, out, 1),
         fewstep_randn(1, 0, 0, 1, 1, NULL, 1));
  printf("%s|%s|%s\n", fewstep_status_string(FEWSTEP_ERR_BUFFER_TOO_SMALL), fewstep_status_string(FEWSTEP_OK),
         fewstep_version());
  return 0;
}
"""


@pytest.mark.skipif(not (shutil.which("cc") and shutil.which("c++")), reason="needs a C and a C++ compiler")
def test_c_api_from_plain_c(tmp_path):
    """fewstep.h compiles as strict C99 and the core links into a C program with no Python."""
    inc, src = ROOT / "runtime" / "include", ROOT / "runtime" / "src"
    if not (inc / "fewstep.h").is_file():
        pytest.skip("C sources not present (installed package without the repository)")
    objs = []
    for cpp in (src / "version.cpp", src / "status.cpp", src / "philox.cpp"):  # the noise core only
        obj = tmp_path / (cpp.stem + ".o")
        flags = ["-std=c++17", "-O2", "-ffp-contract=off", '-DFEWSTEP_VERSION="test"']
        subprocess.run(["c++", *flags, f"-I{inc}", "-c", str(cpp), "-o", str(obj)], check=True)
        objs.append(str(obj))
    (tmp_path / "main.c").write_text(C_MAIN)
    exe = tmp_path / "main"
    subprocess.run(
        [
            "cc",
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            f"-I{inc}",
            "-c",
            str(tmp_path / "main.c"),
            "-o",
            str(tmp_path / "main.o"),
        ],
        check=True,
    )
    subprocess.run(["c++", str(tmp_path / "main.o"), *objs, "-lm", "-o", str(exe)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    assert lines[0] == "6627e8d5 e169c58d bc57ac4c 9b00dbd8"
    got = np.array([float(v) for v in lines[1].split()], np.float32).reshape(2, 7)
    assert same_bits(got, noise.randn(2**64 - 1, 2, (7,), 3, 10))  # %.9g round-trips float32
    assert [int(v) for v in lines[2].split()] == [3, 2, 2, 1, 1]
    assert lines[3] == "output buffer too small|ok|test"
