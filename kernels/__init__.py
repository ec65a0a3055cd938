"""Kernels of modcompile: Triton kernels and their pure-torch references.

Installed as ``modcompile.kernels``. Every Triton kernel here has a torch reference of the same
contract in :mod:`modcompile.kernels.reference`; the references are the CPU execution path and the
ground truth of the tests.
"""
