"""DMD2 (issue 14): the distribution-matching generator on an exact Gaussian mixture, its resume, its
Plans through sample / export / run, the CLI, and the precision / recall metric.

Digits quality is measured in benchmarks/dmd2_quality.py; the digits runs here are a few steps at a tiny
batch (mechanics only).
"""

import json
import math

import numpy as np
import pytest
import torch
from inproc import run  # noqa: E402
from torch import nn
from torch.nn import functional as F

from fewstep.runtime import noise as fnoise
from fewstep.runtime import sample
from fewstep.runtime.denoisers import EDMDenoiser
from fewstep.runtime.digits_net import GuidedDenoiser
from fewstep.runtime.gmm import GMM
from fewstep.runtime.models import bundle_steps, load
from fewstep.runtime.solvers import build
from fewstep.training import dmd2, metrics

WIDTH = 64  # the 2-D test networks' hidden width


# --- precision / recall: known answers on constructed sets -------------------------------------------
def test_precision_recall_known_answers():
    # 1-D, k = 1. Real {0, 1, 3}: radii 1, 1, 2. Generated {2.5, 10}: radii 7.5, 7.5.
    # 2.5 is within 2 of 3 (inside), 10 is in no real ball → precision 1/2; every real point is within
    # 7.5 of 2.5 → recall 1.
    p, r = metrics.precision_recall(np.array([[2.5], [10.0]]), np.array([[0.0], [1.0], [3.0]]), k=1)
    assert (p, r) == (0.5, 1.0)
    # Identical sets: every point lies on a point of the other set (distance exactly 0) → 1, 1.
    a = np.random.default_rng(0).standard_normal((50, 4))
    assert metrics.precision_recall(a, a, k=3) == (1.0, 1.0)
    # A far translate: no ball reaches the other set → 0, 0.
    assert metrics.precision_recall(a + 100.0, a, k=3) == (0.0, 0.0)
    # Mode collapse: real = two clusters 1000 apart (40 and 60 points), generated = the first cluster's
    # points exactly → precision 1, recall 40/100 (the generated radii, ≤ the cluster's diameter, never
    # reach the second cluster).
    b = np.random.default_rng(1).standard_normal((60, 4)) + 1000.0
    p, r = metrics.precision_recall(a[:40], np.concatenate([a[:40], b]), k=3)
    assert p == 1.0 and r == pytest.approx(0.4, abs=1e-15)
    with pytest.raises(ValueError, match="more than k"):
        metrics.precision_recall(a[:3], a, k=3)


def test_eval_json_reports_precision_and_recall(capsys):
    res = json.loads(run(capsys, "eval", "--model", "digits", "--solver", "heun", "--nfe", 5, "--n", 10,
                         "--json").stdout)
    assert 0.0 <= res["precision"] <= 1.0 and 0.0 <= res["recall"] <= 1.0


# --- the exact 2-D mixture ----------------------------------------------------------------------------
class MLP(nn.Module):
    """A small σ-conditioned MLP: ``net(x_in, t, cond)``; ``hidden`` is the GAN head's feature space."""

    def __init__(self, dim=2, width=WIDTH, fourier=16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(30.0), fourier // 2)), persistent=False)
        self.l1, self.l2, self.l3 = nn.Linear(dim + fourier, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, dim)

    def hidden(self, x, t):
        a = t.to(torch.float32).reshape(-1, 1) * self.freqs[None]
        h = F.silu(self.l1(torch.cat([x, a.cos(), a.sin()], 1)))
        return F.silu(self.l3(F.silu(self.l2(h))))

    def forward(self, x, t, cond=None):
        return self.out(self.hidden(x, t))


def gmm_problem(g: GMM, sd: float):
    data_x = g.sample_data(200_000, seed=7).float()
    den = EDMDenoiser(None, sigma_data=sd, sigma_min=g.sigma_min, sigma_max=g.sigma_max)

    def call(net, x, s, labels):
        den.model = net
        return den._denoise(x, s, None)

    def features(net, x, s, labels):
        c_in = (1 / (s.double() ** 2 + sd**2).sqrt()).float()[:, None]
        return net.hidden(x * c_in, s.double().log() / 4)

    def data(gen, b):
        return data_x[torch.randint(data_x.shape[0], (b,), generator=gen)], None

    return dmd2.Problem(call, call, features, lambda x, s, y: g(x, s, None), data, (2,), sd, g.sigma_min,
                        g.sigma_max)


@pytest.fixture(scope="module")
def gmm_teacher_net():
    """A network teacher for the exact mixture (G and μ_fake start from it, as DMD2 starts from the
    teacher): 400 Adam steps of EDM-weighted regression onto the exact posterior mean."""
    g = GMM.default()
    sd = float(g.sample_data(100_000, seed=3).pow(2).mean().sqrt())
    torch.manual_seed(0)
    net = MLP()
    den = EDMDenoiser(net, sigma_data=sd, sigma_min=g.sigma_min, sigma_max=g.sigma_max)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    x0 = g.sample_data(200_000, seed=5).float()
    for _ in range(400):
        x = x0[torch.randint(len(x0), (256,), generator=gen)]
        t = torch.rand(256, generator=gen, dtype=torch.float64).clamp_min(1e-4)
        s = dmd2.sigma_of_t(t, g.sigma_min, g.sigma_max).float()
        xs = x + s[:, None] * torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            target = g(xs.double(), s.double()).float()
        lam = ((s**2 + sd**2) / (s * sd) ** 2)[:, None]
        loss = (lam * (den(xs, s) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return g, sd, net


def _nets(teacher_net, seed=0):
    import copy

    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, 1), nn.Flatten(0))
    return dmd2.DMD2Nets(copy.deepcopy(teacher_net), copy.deepcopy(teacher_net), head).requires_grad_(True)


def _one_step_samples(p, nets, n, seed):
    z = torch.randn((n, 2), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return p.gen(nets.g, z * p.sigma_max, torch.full((n,), p.sigma_max), None).double()


def _mode_mass(g: GMM, x: torch.Tensor) -> np.ndarray:
    """Fraction of points nearest (Euclidean) to each component's mean: a fixed partition of the plane, so
    exact samples give its exact masses and points stranded between modes split between neighbours."""
    return np.bincount(torch.cdist(x.double(), g.means).argmin(1).numpy(), minlength=g.num_classes) / len(x)


N_EVAL = 4000


def test_gmm_one_step_generator_covers_every_mode(gmm_teacher_net, tmp_path):
    g, sd, tnet = gmm_teacher_net
    p = gmm_problem(g, sd)
    # The default two time-scale update (5 fake-score / classifier updates per generator update), 400
    # generator updates at batch 256.
    cfg = dmd2.DMD2Config(steps=1, iters=400, fake_updates=5, batch=256, lr=1e-3, warmup=30, ckpt_every=10**6)
    nets = _nets(tnet)
    x_init = _one_step_samples(p, nets, N_EVAL, seed=11)
    final, _, info = dmd2.train(nets, p, cfg, str(tmp_path / "run"), seed=0, record={}, progress=False)
    x = _one_step_samples(p, final, N_EVAL, seed=11)
    data = g.sample_data(N_EVAL, seed=99)
    # The teacher's own samples: EDM Heun at 35 NFE on the exact mixture, from the same number of z.
    z = torch.randn((N_EVAL, 2), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x_teacher = sample(build("heun", 35, g.sigma_min, g.sigma_max), g, z)
    w_teacher, w_gen, w_init = (metrics.sliced_w2(v, data) for v in (x_teacher, x, x_init))
    # Per-mode mass (nearest-mean partition) against the same partition's exact masses (2e5 exact samples:
    # Monte-Carlo error ≤ 0.001). Tolerance 0.065 = 4 binomial standard errors at N_EVAL (√(0.2·0.8/4000)
    # = 0.0063 for the largest cell → 0.025; a false failure from sampling alone has probability < 1e-4
    # per mode) + a 0.04 allowance for the one-step generator's own error (its samples stranded between
    # modes). A dropped mode (0.1 off) or one that lost two thirds of its mass fails.
    want = _mode_mass(g, g.sample_data(200_000, seed=5))
    got = _mode_mass(g, x)
    assert np.all(np.abs(got - want) <= 0.065), (got.round(3), want.round(3), info)
    # Sliced W2 against exact data: the teacher's 35-NFE samples sit at the finite-sample floor (~0.08 at
    # N_EVAL); the one-step generator must be within 0.1 of it (0.4 of a circle mode's std), while the
    # untrained generator (collapsed onto the data mean: W2 ≈ the data's RMS radius / √2 ≈ 1.3) is > 1.
    assert w_init > 1.0
    assert w_gen <= w_teacher + 0.1, (w_gen, w_teacher)


# --- the shared loop: an interrupted run resumes to the same weights ------------------------------------
def test_interrupted_run_resumes_bitwise(tmp_path):
    """12 loop steps (4 generator updates, 2 critic updates each), checkpoints every 5 (mid-cycle): an
    exception at step 7 (after the step-5 checkpoint), then the same call again, ends bitwise where the
    uninterrupted run ends. The phase comes from the step index, so the resumed run keeps the schedule."""
    g = GMM.default()
    p = gmm_problem(g, 1.5)
    cfg = dmd2.DMD2Config(steps=2, iters=4, fake_updates=2, batch=16, lr=1e-3, warmup=3, ckpt_every=5)

    def nets():
        torch.manual_seed(3)
        return _nets(MLP(), seed=4)

    a, _, _ = dmd2.train(nets(), p, cfg, str(tmp_path / "a"), seed=1, record={}, progress=False)
    calls = {"n": 0}
    data = p.data

    def failing(gen, b):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return data(gen, b)

    with pytest.raises(KeyboardInterrupt):
        dmd2.train(nets(), dmd2.Problem(**{**p.__dict__, "data": failing}), cfg, str(tmp_path / "b"), seed=1,
                   record={}, progress=False)
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["step"] == 5
    b, _, _ = dmd2.train(nets(), p, cfg, str(tmp_path / "b"), seed=1, record={}, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], v) for k, v in nets().state_dict().items())  # it trained


# --- digits: students + Plans through sample / export / run ------------------------------------------
def test_plans_are_predict_then_renoise():
    p1, p4 = dmd2.dmd2_plan(1, 0.002, 80.0), dmd2.dmd2_plan(4, 0.002, 80.0)
    assert p1.nfe == 1 and p1.sigma_init == 80.0 and p1.rows[0].c == 0.0 and p1.rows[0].q == (1.0,)
    assert p1.stochastic_rows == [] and p4.stochastic_rows == [0, 1, 2]
    s = [r.sigma for r in p4.rows]
    assert s[0] == 80.0 and all(a > b for a, b in zip(s, s[1:]))
    assert [r.g for r in p4.rows] == [*s[1:], 0.0] and all(r.c == 0.0 and r.guidance == 1.0 for r in p4.rows)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real (tiny) DMD2 bundle: 1-step then 4-step, one generator update each at batch 4."""
    root = tmp_path_factory.mktemp("dmd2")
    base = dmd2.DMD2Config(batch=4, fake_updates=1, ckpt_every=1)
    dmd2.train_bundle(str(root), base, [1, 4], [1, 1], progress=False)
    return root


def test_bundle_loads_samples_exports_and_runs(bundle, tmp_path, capsys):


    b = str(bundle)
    assert bundle_steps(b) == [1, 4]
    t = load(b, steps=4)
    assert isinstance(t.denoiser, GuidedDenoiser) and t.plans["deterministic"].name == "dmd2-4"
    assert t.plans["deterministic"].provenance["teacher_hash"] == t.content_hash
    p = run(capsys, "sample", "--model", b, "--nfe", 4, "--class", 3, "--n", 6, "--seed", 5, "--out", tmp_path / "s")
    assert "dmd2-4" in p.stdout
    x = np.load(tmp_path / "s" / "samples.npy")
    z, eps = fnoise.draw(5, 6, (1, 8, 8), 3)
    want = sample(t.plans["deterministic"], t.denoiser, torch.from_numpy(z), cond=torch.full((6,), 3),
                  noise=torch.from_numpy(eps))
    np.testing.assert_allclose(x, want.numpy(), rtol=0, atol=1e-5)  # the CLI's thread count may differ
    p = run(capsys, "export", "--model", b, "--nfe", 4, "--out", tmp_path / "e4.onnx", "--verify")
    assert p.stdout.strip().endswith(") ok"), p.stdout
    p = run(capsys, "run", tmp_path / "e4.onnx", "--batch", 6, "--seed", 5, "--class", 3, "--out", tmp_path / "r.npy")
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), x, rtol=0, atol=2e-4)
    from fewstep.training.bundle import ship

    files = ship(b, str(tmp_path / "ship"))
    assert all("train_state" not in f and "dmd2_nets" not in f for f in files)
    assert load(str(tmp_path / "ship"), steps=1).content_hash == load(b, steps=1).content_hash


def test_cli_bad_arguments(tmp_path, capsys):
    for args, msg in ((("--steps", "0"), "must be ≥ 1"), (("--steps", "1,x"), "comma-separated integers"),
                      (("--steps", "1,4", "--iters", "5,6,7"), "one count per student"),
                      (("--fake-updates", "0"), "--fake-updates must be ≥ 1"),
                      (("--guidance", "nan"), "--guidance must be finite"),
                      (("--gan-g", "-1"), "--gan-g must be"), (("--steps", "4,4"), "repeats"),
                      (("--teacher", tmp_path / "nope.safetensors"), "not found")):
        out = tmp_path / "o"
        p = run(capsys, "distill", "dmd2", "--out", out, *args, ok=False)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not out.exists()


# --- the shipped bundle ---------------------------------------------------------------------------------
def test_shipped_digits_dmd2_out_of_the_box(tmp_path, capsys):
    assert bundle_steps("digits-dmd2") == [1, 4]
    for n in (1, 4):
        t = load("digits-dmd2", steps=n)
        assert isinstance(t.denoiser, GuidedDenoiser) and t.plans["deterministic"].nfe == n
        p = run(capsys, "sample", "--model", "digits-dmd2", "--nfe", n, "--class", 7, "--n", 10,
                "--out", tmp_path / f"s{n}")
        assert f"dmd2-{n}" in p.stdout and (tmp_path / f"s{n}" / "grid.png").exists()
    # Quality of the shipped artifact (not a timing): the 1-step generator draws the requested class.
    res = json.loads(run(capsys, "eval", "--model", "digits-dmd2", "--nfe", 1, "--n", 60, "--json").stdout)
    assert res["nfe"] == 1 and res["class_accuracy"] >= 0.9, res
