"""Every Triton kernel configuration the launchers pick for the standard shapes, and each
kernel's argument types: what the compile report (bench/resources.py) compiles. The block sizes
come from the launchers' own choosers (kernels/*: attention_config, attention_bwd_config,
scores_config, rar_config), never from here, so a changed chooser changes what is compiled.

Standard shapes (SPEC.md): d = 1024, s = 256; t2i captions of up to 16, 32 or 64 words against
R = 36 regions, i2t the regions as queries against captions of up to 16, 32 or 64 words. Every
block size the launchers can pick (query and context rows up to MAX_ROWS = 64) appears here.
"""

from __future__ import annotations

from types import SimpleNamespace

#: (Lq, Lc) of the standard attention launches
STANDARD_SHAPES = ((16, 36), (32, 36), (64, 36), (36, 16), (36, 32), (36, 64))
#: RAR's query rows of the standard launches (t2i captions, i2t regions)
RAR_ROWS = (16, 32, 36, 64)
DTYPES = ("bf16", "fp16", "fp32")
D, S = 1024, 256


def _module(name: str):
    """rcar_fast.kernels.<name> (loaded through the triton backend, which also finds kernels/ in
    a source checkout run without an install)."""
    import importlib

    from rcar_fast.backends.triton_kernels import load_kernels
    return importlib.import_module(f"{load_kernels().__name__}.{name}")


def launch_options(cfg: dict) -> dict:
    """Pops the launch options (num_warps, num_stages, maxnreg) out of a launcher's config dict."""
    return {k: cfg.pop(k) for k in ("num_warps", "num_stages", "maxnreg")}


def _unique(items):
    out = []
    for it in items:
        if it not in out:
            out.append(it)
    return out


def attention_configs(config, forms=({},)):
    """(dtype, constexprs, launch options) of the attention launches for the standard shapes;
    ``config``: the launcher's block-size chooser (forward or first backward kernel), called
    with each of ``forms``' extra arguments (the forward: grouped on the grid, one pair paired)."""
    attention = _module("attention")
    MODE_ATTENDED, MODE_ALIGNMENT = attention.MODE_ATTENDED, attention.MODE_ALIGNMENT

    def gen():
        for dtype in DTYPES:
            for Lq, Lc in STANDARD_SHAPES:
                for mode in (MODE_ATTENDED.value, MODE_ALIGNMENT.value):
                    for has_state in (False, True):
                        for form in forms:
                            cfg = config(dtype != "fp32", Lq, Lc, D, S if mode == MODE_ALIGNMENT.value else D, mode,
                                         **form)
                            launch = launch_options(cfg)
                            cfg.update(HAS_F=has_state, HAS_LAM=has_state, MODE=mode, IEEE=dtype == "fp32")
                            yield dtype, cfg, launch
    return _unique(gen())


def gram_configs():
    """The Gram matrix kernel's launches: one per context block size of the standard shapes."""
    attention = _module("attention")
    bcs = sorted({attention.attention_config(True, Lq, Lc, D, S, 1)["BC"] for Lq, Lc in STANDARD_SHAPES})

    def gen():
        for dtype in DTYPES:
            for BC in bcs:
                cfg = attention.gram_config(dtype != "fp32", BC, D)
                launch = launch_options(cfg)
                cfg.update(IEEE=dtype == "fp32")
                yield dtype, cfg, launch
    return _unique(gen())


def attention_bwd_scores_configs():
    """The second backward kernel's launches: one per first-kernel launch."""
    bwd = _module("attention_bwd")
    attention_bwd_config, scores_config = bwd.attention_bwd_config, bwd.scores_config

    def gen():
        for dtype, cfg, launch in attention_configs(attention_bwd_config):
            sc = scores_config(dict(cfg, **launch))
            yield (dtype, dict(BQ=sc["BQ"], BC=sc["BC"], BD=sc["BD"], HAS_F=cfg["HAS_F"], HAS_LAM=cfg["HAS_LAM"],
                               NEED_DF=cfg["HAS_F"], IEEE=cfg["IEEE"]), launch_options(sc))
    return _unique(gen())


def rar_configs(backward: bool):
    """RAR's launches (forward: the mean, or a step with or without dropout; backward: with or
    without dropout)."""
    rar = _module("rar")
    BWD_BLOCK_N, FWD_BLOCK_N, rar_config = rar.BWD_BLOCK_N, rar.FWD_BLOCK_N, rar.rar_config

    def gen():
        for dtype in DTYPES:
            for Lq in RAR_ROWS:
                for mean, has_drop in ((True, False), (False, False), (False, True)):
                    if backward and mean:
                        continue
                    cfg = rar_config(Lq, S, BWD_BLOCK_N if backward else FWD_BLOCK_N, dtype != "fp32",
                                     grouped=not backward)
                    launch = launch_options(cfg)
                    if not backward:
                        cfg.update(MEAN=mean)
                    cfg.update(HAS_DROP=has_drop, IEEE=dtype == "fp32")
                    yield dtype, cfg, launch
    return _unique(gen())


def rcr_configs(which: str):
    """The RCR step's two GEMM kernels (which "hidden": with and without the previous
    temperatures; "factors": with and without the previous factors) at s = 256, d = 1024 (their
    widths are compile-time constants)."""
    rcr = _module("rcr")

    def gen():
        for dtype in DTYPES:
            for has_state in (False, True):
                cfg = rcr.rcr_gemm_config(dtype != "fp32", S, which)
                launch = launch_options(cfg)
                dims = dict(S_DIM=S, H_DIM=2 * S, HS_DIM=S // 2) if which == "hidden" else dict(D=D, H_DIM=2 * S)
                cfg.update(dims, **{"HAS_LAM" if which == "hidden" else "HAS_F": has_state, "IEEE": dtype == "fp32"})
                yield dtype, cfg, launch
    return _unique(gen())


# ----------------------------------------------------------------------------- argument types

def _typed(dtype, pointers=(), fp32_pointers=(), ints=(), strides=(), **extra):
    sig = {n: f"*{dtype}" for n in pointers}
    sig.update({n: "*fp32" for n in fp32_pointers})
    sig.update({n: "i32" for n in ints})
    sig.update(extra)
    sig.update({n: "i64" for n in strides})
    return sig


def gram_signature(dtype):
    return _typed(dtype, ("c_ptr",), ("gram_ptr",), ("D",), clen_ptr="*i32", strides="sc_b sc_l sc_d".split())


def attention_fwd_signature(dtype):
    return _typed(dtype, ("q_ptr", "c_ptr", "f_ptr", "lam_ptr", "w_ptr", "bias_ptr", "out_ptr"), ("gram_ptr",),
                  ints=("P", "NG", "LQ_OUT", "D", "S_DIM"), qlen_ptr="*i32", clen_ptr="*i32", cidx_ptr="*i32",
                  lam_scalar="fp32", strides="sq_p sq_l sq_d sc_b sc_l sc_d sx_b sx_p sf_b sf_p sf_l sf_d sl_b sl_p sl_l sw_s sw_d "
                          "so_b so_p so_l so_x".split())


def attention_bwd_signature(dtype):
    return _typed(dtype, ("q_ptr", "c_ptr", "f_ptr", "lam_ptr", "w_ptr", "bias_ptr", "g_ptr"),
                  ("gram_ptr", "dq_ptr", "dc_ptr", "dw_ptr", "db_ptr", "dy_ptr", "dp_ptr"), ("P", "NG", "LQ", "D", "S_DIM"),
                  qlen_ptr="*i32", clen_ptr="*i32", cidx_ptr="*i32", lam_scalar="fp32",
                  strides="sq_p sq_l sq_d sc_b sc_l sc_d sx_b sx_p sf_b sf_p sf_l sf_d sl_b sl_p sl_l sw_s sw_d "
                          "sg_b sg_p sg_l sg_x".split())


def attention_bwd_scores_signature(dtype):
    return _typed(dtype, ("q_ptr", "c_ptr", "f_ptr", "lam_ptr"), ("dp_ptr", "dq_ptr", "dc_ptr", "df_ptr", "dlam_ptr"),
                  ("P", "LQ", "D"), qlen_ptr="*i32", clen_ptr="*i32", cidx_ptr="*i32", lam_scalar="fp32",
                  strides="sq_p sq_l sq_d sc_b sc_l sc_d sx_b sx_p sf_b sf_p sf_l sf_d sl_b sl_p sl_l".split())


def rar_fwd_signature(dtype):
    return _typed(dtype, ("e_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr", "mk_ptr", "mg_ptr"),
                  ("gate_ptr", "out_ptr"), ints=("P", "NG", "S_DIM", "t"), qlen_ptr="*i32",
                  strides="se_b se_p se_l se_s smk_b smk_p smk_l smk_s smg_b smg_p smg_s so_b so_p so_s".split())


def rcr_hidden_signature(dtype):
    return _typed(dtype, ("e_ptr", "w1_ptr", "b1_ptr", "ws1_ptr", "bs1_ptr", "ws2_ptr", "bs2_ptr", "lam_ptr", "h_ptr",
                          "lam_out_ptr"), ints=("N_ROWS", "P", "LQ"), qlen_ptr="*i32", lam_scalar="fp32")


def rcr_factors_gemm_signature(dtype):
    return _typed(dtype, ("h_ptr", "w2_ptr", "b2_ptr", "f_ptr", "out_ptr"), ints=("N_ROWS", "P", "LQ"),
                  qlen_ptr="*i32")


def rar_bwd_signature(dtype):
    return _typed(dtype, ("g_ptr", "e_ptr", "h_ptr", "wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr",
                          "mk_ptr", "mg_ptr"), ("de_ptr", "dkp_ptr", "dgp_ptr", "dwv_ptr"), ("P", "LQ", "S_DIM"),
                  qlen_ptr="*i32",
                  strides="sg_b sg_p sg_s se_b se_p se_l se_s sh_b sh_p sh_s smk_b smk_p smk_l smk_s "
                          "smg_b smg_p smg_s".split())


def kernels():
    """{report name: (launch_configs, signature, jit function)} of every Triton kernel."""
    attention, attention_bwd, rar, rcr = (_module(m) for m in ("attention", "attention_bwd", "rar", "rcr"))
    K = SimpleNamespace
    return {
        "gram": K(launch_configs=gram_configs, signature=gram_signature, fn=attention._gram_kernel),
        "attention_fwd": K(launch_configs=lambda: attention_configs(attention.attention_config,
                                                                    ({"grouped": True}, {"grouped": False})),
                           signature=attention_fwd_signature, fn=attention._attention_fwd_kernel),
        "attention_bwd": K(launch_configs=lambda: attention_configs(attention_bwd.attention_bwd_config,
                                                                    ({"grouped": True}, {"grouped": False})),
                           signature=attention_bwd_signature, fn=attention_bwd._attention_bwd_kernel),
        "attention_bwd_scores": K(launch_configs=attention_bwd_scores_configs,
                                  signature=attention_bwd_scores_signature,
                                  fn=attention_bwd._attention_bwd_scores_kernel),
        "rar_fwd": K(launch_configs=lambda: rar_configs(False), signature=rar_fwd_signature, fn=rar._rar_fwd_kernel),
        "rar_bwd": K(launch_configs=lambda: rar_configs(True), signature=rar_bwd_signature, fn=rar._rar_bwd_kernel),
        "rcr_hidden": K(launch_configs=lambda: rcr_configs("hidden"), signature=rcr_hidden_signature,
                        fn=rcr._rcr_hidden_kernel),
        "rcr_factors_gemm": K(launch_configs=lambda: rcr_configs("factors"), signature=rcr_factors_gemm_signature,
                              fn=rcr._rcr_factors_gemm_kernel),
    }
