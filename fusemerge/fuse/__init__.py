"""Pairwise knowledge fusion (FuseChat): teacher pass -> alignment -> MinCE fusion training."""
