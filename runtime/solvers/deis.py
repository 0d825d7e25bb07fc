"""Placeholder: being written."""
def deis_2(sigmas): raise NotImplementedError
def deis_3(sigmas): raise NotImplementedError
