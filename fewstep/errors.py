"""The base class of user errors: the CLI prints their message (no traceback) and exits 2."""


class FewstepError(ValueError):
    pass
