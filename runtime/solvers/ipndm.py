"""Placeholder: being written."""
def ipndm(sigmas): raise NotImplementedError
def plms(sigmas): raise NotImplementedError
def plms_steps(nfe): return nfe
