"""fewstep.runtime: the Plan, the reference executor, denoisers, solvers and noise."""

from .executor import InputError, sample
from .plan import FORMAT, Plan, PlanError, Row

__all__ = ["FORMAT", "InputError", "Plan", "PlanError", "Row", "sample"]
