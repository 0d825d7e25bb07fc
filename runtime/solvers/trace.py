"""Compile a solver written as ordinary linear algebra into Plan rows.

A builder runs its algorithm on symbolic vectors (`Lin`: float64 coefficients over the
initial noise z, the history entries h_e and the fresh noises ε_e) instead of tensors::

    tr = Trace(sigmas[0])
    x = tr.x
    for i in range(n):
        d = tr.eval(x, sigmas[i])                 # one network evaluation, returns D_i
        x = tr.update(x + (sigmas[i+1] - sigmas[i]) * (x - d) / sigmas[i])
    plan = tr.plan("euler")

Every evaluation point and state must be ``a·x + (the last ≤ MAX_HISTORY history entries)``; the
trace solves for the row coefficients and refuses (naming the row) anything a bounded
history cannot express. This keeps each builder as short as the paper's pseudo-code and
makes the rewrite of past states (DESIGN §2) mechanical instead of per-solver algebra.
"""

from __future__ import annotations

from typing import Any

from ..plan import MAX_HISTORY, Plan, PlanError, Row

_Z = ("z",)
# A term is round-off when |coefficient × magnitude| ≤ _TOL × the largest such term. Not looser: a rewritten past
# state's terms decay geometrically and cancel (O(80) terms summing to an O(1) state): at 1e-9 the dropped tail
# of iPNDM with data-form D-ODE at 10 NFE broke test_past_state_corrections_compile_at_10_nfe. The algebra's own
# round-off is ~1e-16.
_TOL = 1e-12


class Lin:
    """A linear combination of symbols with float64 coefficients."""

    __slots__ = ("t",)

    def __init__(self, t: dict | None = None):
        self.t = {k: v for k, v in (t or {}).items() if v != 0.0}

    def __add__(self, o: Lin) -> Lin:
        t = dict(self.t)
        for k, v in o.t.items():
            t[k] = t.get(k, 0.0) + v
        return Lin(t)

    def __sub__(self, o: Lin) -> Lin:
        return self + (-1.0) * o

    def __mul__(self, s: float) -> Lin:
        s = float(s)
        return Lin({k: v * s for k, v in self.t.items()})

    __rmul__ = __mul__

    def __truediv__(self, s: float) -> Lin:
        return self * (1.0 / float(s))

    def __neg__(self) -> Lin:
        return self * -1.0

    def coef(self, k) -> float:
        return self.t.get(k, 0.0)

    def scale(self, mag: dict | None = None) -> float:
        """max |coefficient × the symbol's typical magnitude| (``mag``, default 1)."""
        m = mag or {}
        return max((abs(v) * m.get(k, 1.0) for k, v in self.t.items()), default=0.0)


def _h(e: int):
    return ("h", e)


def _eps(e: int):
    return ("eps", e)


class Trace:
    def __init__(self, sigma_init: float):
        self.sigma_init = float(sigma_init)
        self.x = Lin({_Z: self.sigma_init})
        self._rows: list[dict] = []
        self._open: dict | None = None  # the row whose x-update is not fixed yet
        # Typical magnitude of each symbol, for telling round-off from a real term: z, ε ~ 1; h_e = D − s·u with
        # |D| ~ 1 and |u| ~ σ_e (an s = 1 entry is −σ_e·ε̂). A coefficient of 1e-8 on an entry of size 80 is not
        # round-off.
        self._mag: dict = {_Z: 1.0}

    @property
    def nfe(self) -> int:
        return len(self._rows) + (self._open is not None)

    def eval(self, u: Lin, sigma: float, *, s: float = 0.0, guidance: float | None = None) -> Lin:
        """Evaluate the network at ``u``; return the denoiser output D as a Lin.

        ``s`` chooses the history entry ``h = D − s·u`` (s = 1 keeps −σ·ε̂ for methods
        written on noise predictions); the returned D = h + s·u either way.
        """
        self._close()
        e = len(self._rows)
        a, p = self._express(u, self.x, window=range(1, MAX_HISTORY + 1), e=e, what="u")
        self._mag[_h(e)] = 1.0 + abs(float(s)) * float(sigma)
        self._open = {
            "e": e, "sigma": float(sigma), "a": a, "p": p, "guidance": guidance, "s": float(s),
            "c": 1.0, "q": [0.0], "g": 0.0, "x_before": self.x,
        }
        return Lin({_h(e): 1.0}) + float(s) * u

    def update(self, x: Lin, noise: float = 0.0) -> Lin:
        """Set the state after the latest evaluation to ``x + noise·ε`` and return it."""
        row = self._open
        if row is None:
            raise PlanError("trace: a state update needs a network evaluation before it")
        e = row["e"]
        if noise < 0:
            raise PlanError(f"trace: row {e}: noise scale must be ≥ 0")
        c, q = self._express(x, row["x_before"], window=range(0, MAX_HISTORY + 1), e=e, what="x")
        row.update(c=c, q=q, g=float(noise))
        new = x + (Lin({_eps(e): float(noise)}) if noise else Lin())
        self.x = new
        return new

    def plan(self, name: str, provenance: dict[str, Any] | None = None) -> Plan:
        self._close()
        rows = tuple(
            Row(sigma=r["sigma"], a=r["a"], p=tuple(r["p"]), c=r["c"], q=tuple(r["q"]),
                g=r["g"], guidance=r["guidance"], s=r["s"])
            for r in self._rows
        )
        return Plan(name=name, sigma_init=self.sigma_init, rows=rows, provenance=dict(provenance or {}))

    def _close(self):
        if self._open is not None:
            self._rows.append(self._open)
            self._open = None

    def _express(self, target: Lin, state: Lin, window: range, e: int, what: str):
        """Solve target = coef·state + Σ_{k∈window} w_k·h_{e−k}; return (coef, [w_k])."""
        recent = {_h(e - k) for k in window if e - k >= 0}
        if what == "x":
            recent.add(_eps(e))  # the row's own noise is added by update(), never expressed
        rest_t = {k: v for k, v in target.t.items() if k not in recent}
        rest_s = {k: v for k, v in state.t.items() if k not in recent}
        keys = set(rest_t) | set(rest_s)
        mag = self._mag
        m2 = {k: mag.get(k, 1.0) ** 2 for k in keys}
        ss = sum(v * v * m2[k] for k, v in rest_s.items())
        if target.t == state.t:
            coef = 1.0
        elif ss == 0.0:
            coef = 0.0
        else:  # least squares in the symbols' magnitudes; the check below then demands an exact fit
            coef = sum(rest_t.get(k, 0.0) * v * m2[k] for k, v in rest_s.items()) / ss
        scale = max(target.scale(mag), abs(coef) * state.scale(mag), 1.0)
        for k in keys:
            if abs(rest_t.get(k, 0.0) - coef * rest_s.get(k, 0.0)) * mag.get(k, 1.0) > _TOL * scale:
                raise PlanError(
                    f"trace: row {e}: {what} is not a·x plus the last {MAX_HISTORY} history "
                    f"entries (term {k} does not fit); this solver needs a longer history"
                )
        if abs(coef) * state.scale(mag) <= _TOL * scale:  # round-off, e.g. the step to σ = 0: make it exactly 0
            coef = 0.0
        resid = target - coef * state
        ws = [resid.coef(_h(e - k)) if e - k >= 0 else 0.0 for k in window]
        # Round-off from the symbolic algebra (~1e-17) must not read as a real history term.
        ws = [0.0 if abs(w) * mag.get(_h(e - k), 1.0) <= _TOL * scale else w for w, k in zip(ws, window)]
        while ws and ws[-1] == 0.0 and len(ws) > (1 if what == "x" else 0):
            ws.pop()
        return coef, ws
