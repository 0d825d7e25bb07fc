"""The Plan: DESIGN §2's worked examples, exact JSON round trip, strict validation, executor."""

import json
import math

import numpy as np
import pytest
import torch

from fewstep.runtime import Plan, PlanError, Row, sample
from fewstep.runtime.executor import InputError
from fewstep.runtime.gmm import GMM
from fewstep.runtime.plan import MAX_HISTORY
from fewstep.runtime.schedules import edm
from fewstep.runtime.solvers import build
from fewstep.runtime.solvers.trace import Trace


def manual(plan: Plan, den, z, noise=None):
    """The Plan semantics written out with explicit indices (independent of executor.py)."""
    x = plan.sigma_init * z
    h = {}
    ns = 0
    for e, r in enumerate(plan.rows):
        u = r.a * x
        for k in range(1, len(r.p) + 1):
            if r.coef_p(k):
                u = u + r.coef_p(k) * h[e - k]
        d = den(u, torch.full((z.shape[0],), r.sigma, dtype=z.dtype))
        h[e] = d - r.s * u
        xn = r.c * x
        for k in range(len(r.q)):
            if r.coef_q(k):
                xn = xn + r.coef_q(k) * h[e - k]
        if r.g:
            xn = xn + r.g * noise[ns]
            ns += 1
        x = xn
    return x


@pytest.fixture(scope="module")
def gmm():
    return GMM.random(dim=3, k=4, seed=1)


# --- DESIGN §2 worked examples --------------------------------------------------------


def test_ddim_row():
    s = edm(6, 0.002, 80)
    plan = build("ddim", 6, 0.002, 80)
    assert plan.history == 0
    for i, r in enumerate(plan.rows):
        assert r.sigma == s[i] and r.a == 1.0 and r.p == () and r.g == 0.0
        # ≤ 4 float64 roundings a side; 1 − σ'/σ cancels by ≤ 1/(1 − 0.31) on this grid: ≤ 8·1.5·u ≈ 1.3e-15 (×8)
        assert math.isclose(r.c, s[i + 1] / s[i], rel_tol=1e-14, abs_tol=1e-300)
        assert math.isclose(r.q[0], 1 - s[i + 1] / s[i], rel_tol=1e-14)


def test_d_ddim_data_form(gmm):
    """D-DDIM: DDIM rows with q_0 += λ_i, q_1 −= λ_i add λ_i·(D_i − D_{i−1}) to each update."""
    base = build("ddim", 5, 0.002, 80)
    lam = [0.0, 0.1, -0.2, 0.05, 0.3]
    rows = [r if i == 0 else Row(sigma=r.sigma, a=r.a, c=r.c, q=(r.q[0] + lam[i], -lam[i]))
            for i, r in enumerate(base.rows)]
    plan = Plan("d-ddim", base.sigma_init, rows)
    assert plan.history == 1
    z = torch.randn(64, 3, dtype=torch.float64)
    # the same thing by hand: DDIM plus λ·(D_i − D_{i−1})
    def by_hand(lam):
        x = base.sigma_init * z
        prev = None
        for i, r in enumerate(base.rows):
            d = gmm(x, torch.full((64,), r.sigma, dtype=torch.float64))
            x = r.c * x + r.q[0] * d + (lam[i] * (d - prev) if i else 0)
            prev = d
        return x

    # Another association of one update: the executor rounds q_0 + λ and sums c·x + (q_0 + λ)·D_i − λ·D_{i−1}
    # (5 roundings), by_hand c·x + q_0·D_i + λ·(D_i − D_{i−1}) (6); each ≤ u·Σ|terms| ≤ u·2.6·σ_init·max|z|
    # (|c| ≤ 1, |q_0 + λ| ≤ 1.3, |λ| ≤ 0.3 counted twice; |x|, |D| ≤ σ_init·max|z|), carried to the output with gain
    # ≤ 1 (c ≤ 1; the GMM's Jacobian, as in peers.rounding_bound) over the 5 rows: rows·11·u·that, ×2 safety.
    atol = 2 * len(base.rows) * 11 * 2.0**-53 * 2.6 * base.sigma_init * float(z.abs().max())
    torch.testing.assert_close(sample(plan, gmm, z), by_hand(lam), rtol=0, atol=atol)
    # …and it can fail: the last λ off by 1e-6 relative moves the sample by ≈ 3e-7·|D_4 − D_3|, far above atol
    off = by_hand(lam[:-1] + [lam[-1] * (1 + 1e-6)])
    assert float((sample(plan, gmm, z) - off).abs().max()) > atol


def test_edm_heun_step_rows():
    s = edm(4, 0.002, 80)
    plan = build("heun", 7, 0.002, 80)
    second = plan.rows[1]
    assert second.sigma == s[1]
    # The Trace forms a = 1 + (σ_1 − σ_0)·(1/σ_0) and p in ≤ 8 float64 roundings of terms ≤ 1, and a = 0.12 is
    # what is left of 1 − 0.88 (cancellation 1/a = 8.2): ≤ 8·8.2·u = 7.3e-15 relative; 1e-13 is 14× that
    assert math.isclose(second.a, s[1] / s[0], rel_tol=1e-13)
    assert math.isclose(second.p[0], 1 - s[1] / s[0], rel_tol=1e-13)
    first = plan.rows[0]
    assert (first.a, first.c, first.q) == (1.0, 1.0, (0.0,))  # the predictor leaves x alone


def test_dmd2_multistep_rows(gmm):
    """Consistency / DMD2 multi-step: predict x̂, re-noise to the next σ with fresh noise."""
    sig = [80.0, 2.0, 0.5]
    tr = Trace(sig[0])
    x = tr.x
    for i, s in enumerate(sig):
        d = tr.eval(x, s)
        nxt = sig[i + 1] if i + 1 < len(sig) else 0.0
        x = tr.update(d, noise=nxt)
    plan = tr.plan("dmd2-3")
    for i, r in enumerate(plan.rows):
        assert (r.c, r.q, r.a) == (0.0, (1.0,), 1.0)
        assert r.g == (sig[i + 1] if i + 1 < len(sig) else 0.0)
    assert plan.stochastic_rows == [0, 1]
    z = torch.randn(8, 3, dtype=torch.float64)
    noise = torch.randn(2, 8, 3, dtype=torch.float64)
    # a = 1, s = 0, c = 0, q = (1,): the executor and manual() do the same float64 ops in the same order, and
    # the products by 0 and 1 are exact, so the results are bit-equal (no tolerance to derive)
    torch.testing.assert_close(sample(plan, gmm, z, noise=noise), manual(plan, gmm, z, noise), rtol=0, atol=0)
    assert not torch.equal(sample(plan, gmm, z, noise=noise.flip(0)), manual(plan, gmm, z, noise))


def test_one_step_student(gmm):
    plan = Plan("one-step", 80.0, [Row(sigma=80.0, a=1.0, c=0.0, q=(1.0,))])
    z = torch.randn(5, 3, dtype=torch.float64)
    out = sample(plan, gmm, z)
    # x = 80·z, u = x, x' = 0·x + 1·D: the same σ tensor and input, exact products by 0 and 1: bit-equal
    torch.testing.assert_close(out, gmm(80.0 * z, torch.full((5,), 80.0, dtype=torch.float64)), rtol=0, atol=0)


# --- JSON -----------------------------------------------------------------------------


def test_round_trip_exact(tmp_path):
    plan = build("heun", 9, 0.002, 80).replace(provenance={"teacher_hash": "sha256:ab", "fit_seconds": 0.1})
    rows = list(plan.rows)
    rows[2] = Row(sigma=1 / 3, a=0.1 + 0.2, p=(math.pi,), c=1e-300, q=(2 / 3, -1e-17, 5e300), g=0.5,
                  guidance=2.5, s=1.0)
    plan = plan.replace(rows=tuple(rows))
    path = tmp_path / "p.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan
    assert back.to_json() == plan.to_json()
    assert json.loads(path.read_text())["format"] == "fewstep.plan/1"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left behind


def _plan_dict():
    return build("heun", 3, 0.002, 80).to_dict()


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(format="fewstep.plan/0"), "plan.format"),
        (lambda d: d.pop("sigma_init"), "plan.sigma_init"),
        (lambda d: d.update(sigma_init=-1.0), "plan.sigma_init"),
        (lambda d: d.update(rows=[]), "plan.rows"),
        (lambda d: d["rows"][1].update(sigma=0.0), "plan.rows[1].sigma"),
        (lambda d: d["rows"][1].update(q=[1.0, "x"]), "plan.rows[1].q[1]"),
        (lambda d: d["rows"][2].pop("c"), "plan.rows[2].c"),
        (lambda d: d["rows"][0].update(p=[0.5]), "plan.rows[0].p[0]"),
        (lambda d: d["rows"][1].update(q=[0.0] * (MAX_HISTORY + 2)), "plan.rows[1].q"),
        (lambda d: d["rows"][1].update(p=[0.0] * (MAX_HISTORY + 1)), "plan.rows[1].p"),
        (lambda d: d["rows"][1].update(g=-0.1), "plan.rows[1].g"),
        (lambda d: d["rows"][1].update(bogus=1), "plan.rows[1]"),
        (lambda d: d.update(extra=1), "plan"),
        (lambda d: d["rows"][1].update(a=True), "plan.rows[1].a"),
        (lambda d: d["rows"][1].update(guidance="2"), "plan.rows[1].guidance"),
    ],
)
def test_validation_names_the_field(mutate, field):
    d = _plan_dict()
    mutate(d)
    with pytest.raises(PlanError) as exc:
        Plan.from_dict(d)
    assert str(exc.value).startswith(field)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_nan_in_json_rejected(bad):
    text = _plan_dict()
    s = json.dumps(text).replace('"c": ', f'"c": {bad}, "zz": ', 1)
    with pytest.raises(PlanError, match="not a valid number|not finite"):
        Plan.from_json(s)


def test_malformed_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "a.json")
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError):
        Plan.load(tmp_path / "b.json")
    with pytest.raises(PlanError, match="expected a JSON object"):
        Plan.from_json("[1, 2]")


def test_nan_in_constructed_plan():
    with pytest.raises(PlanError, match=r"plan.rows\[0\].c: not finite"):
        Plan("x", 1.0, [Row(sigma=1.0, c=float("nan"))])


# --- executor -------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows,k", [(6, 4), (13, MAX_HISTORY)])
def test_executor_matches_manual_with_history_and_noise(gmm, n_rows, k):
    rng = np.random.default_rng(0)
    rows = []
    for e in range(n_rows):
        rows.append(Row(sigma=float(10 / (e + 1)), a=float(rng.uniform(0.5, 1.5)),
                        p=tuple(float(v) for v in rng.normal(size=min(e, k)) / k), c=float(rng.uniform(0, 1)),
                        q=tuple(float(v) for v in rng.normal(size=min(e, k) + 1) / k), g=float(e % 2) * 0.3,
                        s=float(e % 3 == 0)))
    plan = Plan("random", 10.0, rows)
    assert plan.history == k and plan.stochastic_rows == list(range(1, n_rows, 2))
    z = torch.randn(16, 3, dtype=torch.float64)
    noise = torch.randn(len(plan.stochastic_rows), 16, 3, dtype=torch.float64)
    # manual() does the executor's float64 ops in the same order (equal bit for bit today); a reordered update sums
    # ≤ 2k + 3 terms of size ≤ 1.5·σ_init·max|z| per row in another order: ≤ rows·(2k + 3)·u·that, ×2
    atol = 2 * n_rows * (2 * k + 3) * 2.0**-53 * 1.5 * plan.sigma_init * float(z.abs().max())
    torch.testing.assert_close(sample(plan, gmm, z, noise=noise), manual(plan, gmm, z, noise), rtol=0, atol=atol)


def test_executor_noise_errors(gmm):
    plan = build("ddpm", 3, 0.002, 80)
    z = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="stochastic"):
        sample(plan, gmm, z)
    with pytest.raises(InputError, match="slice"):
        sample(plan, gmm, z, noise=torch.randn(5, 4, 3, dtype=torch.float64))
    with pytest.raises(InputError, match="shape"):
        sample(plan, gmm, z, noise=torch.randn(len(plan.stochastic_rows), 4, 2, dtype=torch.float64))


def test_trace_refuses_long_history():
    tr = Trace(10.0)
    x = tr.x
    ds = []
    for i in range(13):
        ds.append(tr.eval(x, 14.0 - i))
        x = tr.update(0.5 * x + 0.5 * ds[-1])
    assert MAX_HISTORY == 10
    tr.eval(x + 0.1 * ds[3], 1.0)  # D_3 is 10 rows back: the oldest entry K = 10 allows
    with pytest.raises(PlanError, match="longer history"):
        tr.eval(x + ds[1], 0.5)  # D_1 is 12 rows back


def test_guidance_row_overrides_caller():
    calls = []

    def den(x, sigma, cond=None, guidance=None):
        calls.append(guidance)
        return x * 0

    plan = Plan("g", 1.0, [Row(sigma=1.0, guidance=3.0), Row(sigma=0.5)])
    sample(plan, den, torch.zeros(2, 1), cond=torch.zeros(2, dtype=torch.long), guidance=2.0)
    assert calls == [3.0, 2.0]


def test_every_solver_builds_at_every_small_nfe():
    """Every registry solver gives exactly NFE rows for NFE 1..10, or a SolverError naming why."""
    from fewstep.runtime.solvers import SolverError, solvers

    for name in solvers():
        for nfe in range(1, 11):
            for sched in ("edm", "logsnr", "vp"):
                try:
                    plan = build(name, nfe, 0.002, 80, schedule=sched)
                except SolverError as exc:
                    assert "NFE" in str(exc)
                    continue
                assert plan.nfe == nfe and plan.history <= 4
                last = plan.rows[-1]
                if last.s == 0.0 and name != "plms":  # PLMS ends on an Adams–Bashforth step, not on D
                    assert last.c == 0.0  # x ← D: round-off must not leave a 1e-17·x term


def test_peer_solver_names_resolve():
    """k-diffusion and diffusers names give the fewstep solver their peer test checks them against."""
    from fewstep.runtime.solvers import SolverError, get

    want = {"sample_euler": "ddim", "euler": "ddim", "sample_heun": "heun", "dpmpp_2m": "dpmpp-2m",
            "sample_dpmpp_2m": "dpmpp-2m", "DPM++2M": "dpmpp-2m", "ipndm": "ipndm", "DDIMScheduler": "ddim",
            "EulerDiscreteScheduler": "ddim", "HeunDiscreteScheduler": "heun",
            "DPMSolverMultistepScheduler": "dpmpp-2m",
            "UniPCMultistepScheduler": "unipc", "DEISMultistepScheduler": "deis-3", "DDPMScheduler": "ddpm",
            "deis-2": "deis-2"}
    assert {k: get(k).name for k in want} == want
    with pytest.raises(SolverError, match="fewstep solvers"):
        get("sample_lms")  # k-diffusion's LMS is not PLMS: no alias rather than a wrong one
