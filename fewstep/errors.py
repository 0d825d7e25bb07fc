"""The base class of user errors: the CLI prints their message (no traceback) and exits 2."""


class FewstepError(ValueError):
    pass


class NonFiniteError(FewstepError):
    """A computation produced NaN or inf: nothing is written, the CLI exits 3."""


def check_finite(x, what: str, hint: str) -> None:
    """Refuse a result with NaN/inf in it, saying how many values and what to try."""
    import torch

    t = torch.as_tensor(x)
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NonFiniteError(f"{what}: {bad:,} of {t.numel():,} values are NaN or inf; {hint}")
