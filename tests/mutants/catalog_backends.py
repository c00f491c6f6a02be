"""Planted bugs in the backends, the block planner, RAR dropout, the self-test and "auto",
empty grids and the CUDA tanh, each with the tests that must catch it. Format: tests/mutants/run.py."""

PLAN = "rcar_fast/_plan.py"
FUSED = "rcar_fast/_fused.py"
TB = "rcar_fast/torch_backend.py"
DROP = "rcar_fast/dropout.py"
BK = "rcar_fast/backends.py"
OPS = "rcar_fast/ops.py"
ST = "rcar_fast/_selftest.py"

MEM = "tests/test_memory.py::test_peak_within_budget"
MEM_TORCH = [f"{MEM}[torch-t2i]", f"{MEM}[torch-i2t]"]
MEM_CPP = [f"{MEM}[cpp-t2i]", f"{MEM}[cpp-i2t]"]
FIXED = "tests/test_dropout.py::test_training_matches_reference_with_fixed_masks"
SELF = "tests/test_selftest.py"

MUTANTS = [
    # peak memory: the blocks and the budget
    dict(name="plan: blocks 64x over the memory budget",
         file=PLAN, old="    return max(1, budget // per_pair)", new="    return max(1, 64 * budget // per_pair)",
         tests=MEM_TORCH),
    dict(name="fused backends: the caller's memory budget ignored (always the default)",
         file=FUSED, old="    if memory_budget is None:\n        memory_budget = ops.default_budget_gpu",
         new="    if True:\n        memory_budget = ops.default_budget_gpu", tests=MEM_CPP),
    dict(name="torch backend: training without block checkpointing (the whole grid's intermediates kept)",
         file=TB, old="            s = torch.utils.checkpoint.checkpoint(_block_scores, *block_args, False, None,\n"
                      "                                                  use_reentrant=False, preserve_rng_state=True)",
         new="            s = _block_scores(*block_args, False, None)", tests=MEM_TORCH),
    dict(name="torch backend: training blocks planned with the inference buffer count",
         file=TB, old="LIVE_WIDE_BUFFERS_TRAIN = 17", new="LIVE_WIDE_BUFFERS_TRAIN = 4", tests=MEM_TORCH),
    dict(name="fused backends: training blocks planned with the inference buffer count",
         file=FUSED, old="LIVE_WIDE_BUFFERS_TRAIN = 6", new="LIVE_WIDE_BUFFERS_TRAIN = 2", tests=MEM_CPP),
    # RAR dropout
    dict(name="dropout: keep-masks without the 1/(1-p) rescale",
         file=DROP, old="    scale = 1.0 / (1.0 - RAR_DROPOUT)\n    return", new="    scale = 1.0\n    return",
         tests=["tests/test_dropout.py::test_random_masks_rate_and_scale"]),
    dict(name="dropout: rate p kept instead of 1-p",
         file=DROP, old="    keep_k = torch.rand(n_i, n_c, lq, width, device=device) >= RAR_DROPOUT",
         new="    keep_k = torch.rand(n_i, n_c, lq, width, device=device) < RAR_DROPOUT",
         tests=["tests/test_dropout.py::test_random_masks_rate_and_scale"]),
    dict(name="fused backends: dropout applied without its rescale (masks cast to 0/1)",
         file=FUSED, old="    return keep_k.contiguous(), keep_g.contiguous()",
         new="    return (keep_k > 0).to(E.dtype).contiguous(), (keep_g > 0).to(E.dtype).contiguous()",
         tests=[f"{FIXED}[cpp-coop_rcar-2-t2i-one block]"]),
    dict(name="fused backends: every RAR step of coop_rcar draws step 0's masks",
         file=FUSED, old="tuple(w[t:t + 1] for w in rar_w), training, t, pairs)",
         new="tuple(w[t:t + 1] for w in rar_w), training, 0, pairs)",
         tests=[f"{FIXED}[cpp-coop_rcar-2-t2i-one block]"]),
    dict(name="torch backend: i2t masks not moved to block layout (images and captions swapped)",
         file=TB, old="        if attn_type == \"i2t\":      # pair grid (images, captions) -> block (captions, images)\n"
                      "            keep_k, keep_g = keep_k.transpose(0, 1), keep_g.transpose(0, 1)\n        return keep_k, keep_g",
         new="        return keep_k.reshape(B, P, Lq, S), keep_g.reshape(B, P, S)",
         tests=[f"{FIXED}[torch-coop_rcar-2-i2t-one block]"]),
    dict(name="reference: dropout masks of caption 0 for every caption",
         file="rcar_fast/reference.py", old="torch.arange(n_i), torch.tensor([j]), lq, s, E.dtype, E.device)",
         new="torch.arange(n_i), torch.tensor([0]), lq, s, E.dtype, E.device)",
         tests=[f"{FIXED}[torch-coop_rcar-2-t2i-one block]"]),
    # self-test and auto
    dict(name="auto: the self-test result ignored",
         file=BK, old="and _auto_takes(name, dtype) and _passes_selftest(name, device, dtype):",
         new="and _auto_takes(name, dtype):",
         tests=[f"{SELF}::test_failing_backend_is_caught_and_auto_falls_back_with_one_warning"]),
    dict(name="self-test: forward error compared against a 100x looser tolerance",
         file=ST, old="    if not fwd_err <= row.forward_tol:", new="    if not fwd_err <= 100 * row.forward_tol:",
         tests=[f"{SELF}::test_failing_backend_is_caught_and_auto_falls_back_with_one_warning"]),
    dict(name="self-test: RCAR_FAST_SELFTEST=0 ignored",
         file=BK, old='    return os.environ.get("RCAR_FAST_SELFTEST", "1") != "0"', new="    return True",
         tests=[f"{SELF}::test_selftest_can_be_turned_off"]),
    dict(name="self-test: not cached (runs on every call of auto)",
         file=BK, old="    if key not in _SELFTEST:", new="    if True:",
         tests=[f"{SELF}::test_selftest_runs_once_per_backend_device_dtype"]),
    dict(name="auto: cuda picked for float64",
         file=BK, old='    if backend == "cuda" and dtype not in (torch.float32, torch.float16, torch.bfloat16):',
         new='    if False:', tests=[f"{SELF}::test_auto_never_picks_a_backend_that_cannot_take_the_dtype"]),
    dict(name="triton: bf16 accepted under the interpreter",
         file=BK, old='    if backend == "triton" and dtype == torch.bfloat16 and _interpreting():', new="    if False:",
         tests=[f"{SELF}::test_triton_refuses_bf16_under_the_interpreter"]),
    # empty grids, tanh
    dict(name="empty grid: zeros not connected to the inputs (backward raises)",
         file=OPS, old="        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():",
         new="        if False:", tests=["tests/test_api.py::test_empty_grid_keeps_autograd"]),
    dict(name="tanh: the CPU's four-pass sigmoid trick on every device",
         file=TB, old='    if x.device.type != "cpu":\n        return torch.tanh_(x)', new='    if False:\n        return torch.tanh_(x)',
         tests=["tests/test_api.py::test_tanh_is_one_op_off_the_cpu"]),
]
