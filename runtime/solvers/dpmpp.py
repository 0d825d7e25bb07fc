"""Placeholder: being written."""
def dpmpp_2m(sigmas): raise NotImplementedError
def dpmpp_3m(sigmas): raise NotImplementedError
