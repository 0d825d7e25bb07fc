"""The Plan: the one IR every fewstep sampler compiles to (DESIGN §2).

A Plan has E evaluation rows over a state ``x`` and a history of the last K (≤ MAX_HISTORY = 10) entries::

    x = sigma_init · z
    for e in 0..E-1:
        u_e = a_e·x + Σ_{k=1..K} p_{e,k}·h_{e-k}          # where the network is evaluated
        d_e = D(u_e; σ_e, cond, w_e)                       # one network evaluation
        h_e = d_e − s_e·u_e                                # history entry (s_e = 0: the output)
        x   = c_e·x + Σ_{k=0..K} q_{e,k}·h_{e-k} + g_e·ε_e # ε_e fresh N(0, I) when g_e ≠ 0
    return x

``s`` extends DESIGN §2's row: methods written on past *noise predictions* (iPNDM, DEIS,
D-ODE's ε form) keep ``d_e − u_e = −σ_e·ε̂_e`` (s = 1) in the history instead of ``d_e``. Without it
their past states cannot be rewritten with a bounded history (each inversion reaches K
rows further back), so the fix belongs here, in the Plan, not in a solver branch
downstream. ``s`` defaults to 0 and is optional in the file.

K ≤ 10 makes every linear solver of up to 11 evaluations a Plan, whatever its recurrence: a correction
on a past *state* (IIA-DDIM's ε̂_{i−1} next to x̂_{i−1}, D-ODE in the other prediction form than the
solver's own) makes x_{e+1} depend on x_e and x_{e−1}, and rewriting x_{e−1} reaches back to h_0. Solvers
that do not need it keep their small K: every runtime sizes its history by ``plan.history``, not the bound.
(The bound was 4 until fewstep 0.1; every plan valid then is valid now.)

``p[k-1]`` multiplies ``h_{e-k}`` (k = 1..K); ``q[k]`` multiplies ``h_{e-k}`` (k = 0..K).
Lists may be shorter than K (missing entries are 0). ``guidance`` is the row's CFG scale
``w`` (D_u + w·(D_c − D_u)); ``None`` means "the scale the caller passes" (default 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .files import MAX_JSON_BYTES, FileError, atomic_write_bytes, atomic_write_text, parse_json, read_bytes  # noqa: F401 (atomic_write_*: long imported from here)

FORMAT = "fewstep.plan/1"
MAX_HISTORY = 10
# Rows a plan may have: far past the 1–10 fewstep is for, and small enough that validating,
# compiling and exporting a plan stays interactive.
MAX_ROWS = 1000


class PlanError(ValueError):
    """A plan that is malformed; the message names the offending field."""


@dataclass(frozen=True)
class Row:
    sigma: float
    a: float = 1.0
    p: tuple[float, ...] = ()
    c: float = 1.0
    q: tuple[float, ...] = (0.0,)
    g: float = 0.0
    guidance: float | None = None
    s: float = 0.0

    def coef_p(self, k: int) -> float:
        """Coefficient of h_{e-k} in u_e (k ≥ 1)."""
        return self.p[k - 1] if 1 <= k <= len(self.p) else 0.0

    def coef_q(self, k: int) -> float:
        """Coefficient of h_{e-k} in the x update (k ≥ 0)."""
        return self.q[k] if 0 <= k < len(self.q) else 0.0


@dataclass(frozen=True)
class Plan:
    name: str
    sigma_init: float
    rows: tuple[Row, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        validate(self)

    @property
    def nfe(self) -> int:
        """Network evaluations (a guided evaluation is one batched call)."""
        return len(self.rows)

    @property
    def history(self) -> int:
        """K: how many past history entries any row reads."""
        k = 0
        for r in self.rows:
            k = max(k, _last_nonzero(r.p) + 1, _last_nonzero(r.q))
        return k

    @property
    def stochastic_rows(self) -> list[int]:
        return [e for e, r in enumerate(self.rows) if r.g != 0.0]

    @property
    def sigmas(self) -> list[float]:
        return [r.sigma for r in self.rows]

    def replace(self, **kw) -> Plan:
        return dataclasses.replace(self, **kw)

    # -- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "sigma_init": self.sigma_init,
            "rows": [
                {
                    "sigma": r.sigma, "a": r.a, "p": list(r.p), "c": r.c, "q": list(r.q),
                    "g": r.g, "guidance": r.guidance, "s": r.s,
                }
                for r in self.rows
            ],
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        # repr-exact floats: json writes the shortest string that round-trips a float64.
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, obj: Any) -> Plan:
        if not isinstance(obj, dict):
            raise PlanError("plan: expected a JSON object")
        fmt = obj.get("format")
        if fmt != FORMAT:
            raise PlanError(f"plan.format: expected {FORMAT!r}, got {fmt!r}")
        known = {"format", "name", "sigma_init", "rows", "provenance"}
        extra = set(obj) - known
        if extra:
            raise PlanError(f"plan: unknown field(s) {sorted(extra)}")
        for key in ("name", "sigma_init", "rows"):
            if key not in obj:
                raise PlanError(f"plan.{key}: missing")
        if not isinstance(obj["name"], str):
            raise PlanError("plan.name: expected a string")
        prov = obj.get("provenance", {})
        if not isinstance(prov, dict):
            raise PlanError("plan.provenance: expected an object")
        th = prov.get("teacher_hash")
        if th is not None and not isinstance(th, str):
            raise PlanError("plan.provenance.teacher_hash: expected a string")
        rows_in = obj["rows"]
        if not isinstance(rows_in, list):
            raise PlanError("plan.rows: expected a list")
        if len(rows_in) > MAX_ROWS:
            raise PlanError(f"plan.rows: {len(rows_in):,} rows; a plan has at most {MAX_ROWS} "
                            f"(network evaluations; fewstep is for 1–10, solvers build up to {MAX_ROWS})")
        rows = [_row_from_dict(r, e) for e, r in enumerate(rows_in)]
        return cls(
            name=obj["name"],
            sigma_init=_number(obj["sigma_init"], "plan.sigma_init"),
            rows=tuple(rows),
            provenance=prov,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            obj = parse_json(text, "plan")
        except FileError as exc:
            raise PlanError(str(exc)) from None
        return cls.from_dict(obj)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            text = read_bytes(path, "plan file", MAX_JSON_BYTES)
        except FileError as exc:
            raise PlanError(str(exc)) from None
        try:
            return cls.from_json(text)
        except PlanError as exc:
            raise PlanError(f"{path}: {exc}") from None


_ROW_FIELDS = ("sigma", "a", "p", "c", "q", "g", "guidance", "s")


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanError(f"{where}: expected a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise PlanError(f"{where}: not finite ({v})")
    return v


def _row_from_dict(r: Any, e: int) -> Row:
    where = f"plan.rows[{e}]"
    if not isinstance(r, dict):
        raise PlanError(f"{where}: expected an object")
    extra = set(r) - set(_ROW_FIELDS)
    if extra:
        raise PlanError(f"{where}: unknown field(s) {sorted(extra)}")
    for key in ("sigma", "a", "c", "q"):
        if key not in r:
            raise PlanError(f"{where}.{key}: missing")
    lists = {}
    for key in ("p", "q"):
        v = r.get(key, [])
        if not isinstance(v, list):
            raise PlanError(f"{where}.{key}: expected a list")
        lists[key] = tuple(_number(x, f"{where}.{key}[{i}]") for i, x in enumerate(v))
    w = r.get("guidance")
    return Row(
        sigma=_number(r["sigma"], f"{where}.sigma"),
        a=_number(r["a"], f"{where}.a"),
        p=lists["p"],
        c=_number(r["c"], f"{where}.c"),
        q=lists["q"],
        g=_number(r.get("g", 0.0), f"{where}.g"),
        guidance=None if w is None else _number(w, f"{where}.guidance"),
        s=_number(r.get("s", 0.0), f"{where}.s"),
    )


def _last_nonzero(xs) -> int:
    """Index of the last non-zero entry, -1 when all are zero."""
    for i in range(len(xs) - 1, -1, -1):
        if xs[i] != 0.0:
            return i
    return -1


def validate(plan: Plan) -> None:
    """Raise PlanError naming the field unless the plan is well formed."""
    if not isinstance(plan.name, str) or not plan.name:
        raise PlanError("plan.name: expected a non-empty string")
    _check_finite(plan.sigma_init, "plan.sigma_init")
    if plan.sigma_init <= 0:
        raise PlanError(f"plan.sigma_init: must be > 0, got {plan.sigma_init}")
    if len(plan.rows) < 1:
        raise PlanError("plan.rows: a plan needs at least one row (E ≥ 1)")
    for e, r in enumerate(plan.rows):
        where = f"plan.rows[{e}]"
        if not isinstance(r, Row):
            raise PlanError(f"{where}: expected a Row")
        for key in ("sigma", "a", "c", "g", "s"):
            _check_finite(getattr(r, key), f"{where}.{key}")
        if r.guidance is not None:
            _check_finite(r.guidance, f"{where}.guidance")
        if r.sigma <= 0:
            raise PlanError(f"{where}.sigma: must be > 0, got {r.sigma}")
        if r.g < 0:
            raise PlanError(f"{where}.g: noise scale must be ≥ 0, got {r.g}")
        if len(r.p) > MAX_HISTORY:
            raise PlanError(f"{where}.p: at most {MAX_HISTORY} entries (K ≤ {MAX_HISTORY}), got {len(r.p)}")
        if len(r.q) > MAX_HISTORY + 1:
            raise PlanError(f"{where}.q: at most {MAX_HISTORY + 1} entries (K ≤ {MAX_HISTORY}), got {len(r.q)}")
        for i, v in enumerate(r.p):
            _check_finite(v, f"{where}.p[{i}]")
            if v != 0.0 and e - (i + 1) < 0:
                raise PlanError(f"{where}.p[{i}]: reads history entry {e - i - 1}, before the first row")
        for i, v in enumerate(r.q):
            _check_finite(v, f"{where}.q[{i}]")
            if v != 0.0 and e - i < 0:
                raise PlanError(f"{where}.q[{i}]: reads history entry {e - i}, before the first row")


def _check_finite(v: Any, where: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanError(f"{where}: expected a number, got {v!r}")
    if not math.isfinite(v):
        raise PlanError(f"{where}: not finite ({v})")
