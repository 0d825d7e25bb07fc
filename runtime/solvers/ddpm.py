"""Placeholder: being written."""
def ddpm(sigmas): raise NotImplementedError
