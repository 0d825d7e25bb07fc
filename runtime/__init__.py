"""fewstep.runtime: the Plan, the reference executor, denoisers, solvers and noise."""

from .plan import FORMAT, Plan, PlanError, Row

__all__ = ["FORMAT", "InputError", "Plan", "PlanError", "Row", "sample"]


def __getattr__(name: str):
    # The executor imports torch (1–5 s to start); `fewstep --version` and `fewstep run` on an engine (the C++
    # runtime) never need it.
    if name in ("InputError", "sample"):
        from . import executor

        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
