"""The error every solver builder raises for a request it cannot serve (its own module: builders and the
registry both import it)."""


class SolverError(ValueError):
    pass
