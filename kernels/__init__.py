"""Triton kernels of rcar_fast, installed as ``rcar_fast.kernels`` (never a top-level package).

Empty in this release: the fused Triton kernels are the subject of a later issue; until then
``rcar_fast.backend_status()["triton"]`` says so.
"""
