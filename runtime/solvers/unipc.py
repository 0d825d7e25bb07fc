"""Placeholder: being written."""
def unipc_bh2(sigmas): raise NotImplementedError
