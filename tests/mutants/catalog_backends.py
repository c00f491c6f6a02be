"""Planted bugs in the pipeline, the kernel sets, the block planner, RAR dropout, the self-test
and "auto", empty grids and the CUDA tanh, each with the tests that must catch it. Format:
tests/mutants/run.py."""

PLAN = "rcar_fast/block_plan.py"
PIPE = "rcar_fast/pipeline.py"
TK = "rcar_fast/backends/torch_kernels.py"
EXT = "rcar_fast/backends/extension_kernels.py"
DROP = "rcar_fast/dropout.py"
BK = "rcar_fast/backends/__init__.py"
OPS = "rcar_fast/ops.py"
ST = "rcar_fast/_selftest.py"
TM = "rcar_fast/torch_math.py"

MEM = "tests/test_memory.py::test_peak_within_budget"
MEM_TORCH = [f"{MEM}[torch-t2i]", f"{MEM}[torch-i2t]"]
MEM_CPP = [f"{MEM}[cpp-t2i]", f"{MEM}[cpp-i2t]"]
FIXED = "tests/test_dropout.py::test_training_matches_reference_with_fixed_masks"
SELF = "tests/test_selftest.py"
FUSED = "tests/test_fused_backends.py"
RECOMP = "tests/test_rcr_recompute.py"
RECOMP_EQ = f"{RECOMP}::test_values_and_gradients_equal_plain_autograd"

GPU_BUDGET = ["tests/test_memory.py::test_default_budget_on_a_gpu_is_its_share_of_the_memory",
              "tests/test_roofline.py::test_models_plan_blocks_as_the_kernel_sets_do"]
CONTRACT = "rcar_fast/backends/contract.py"
GPU_RULE = "    return max(base, min(GPU_BUDGET_MAX, total_memory // GPU_BUDGET_SHARE))"

MUTANTS = [
    # peak memory: the blocks and the budget
    dict(name="default GPU budget: no cap (an H200's 16th, 8.8 GB, past the 8 GiB ceiling)",
         file=CONTRACT, old=GPU_RULE,
         new="    return max(base, total_memory // GPU_BUDGET_SHARE)", tests=GPU_BUDGET),
    dict(name="default GPU budget: the kernel set's floor dropped (a 16 GB card gets 1 GiB)",
         file=CONTRACT, old=GPU_RULE,
         new="    return min(GPU_BUDGET_MAX, total_memory // GPU_BUDGET_SHARE)", tests=GPU_BUDGET[:1]),
    dict(name="default GPU budget: the device's memory ignored (always the kernel set's 2 GiB)",
         file=CONTRACT, old='        if device.type != "cuda":\n            return base\n',
         new='        if True:\n            return base\n', tests=GPU_BUDGET),
    dict(name="plan: blocks 64x over the memory budget",
         file=PLAN, old="    return max(1, budget // per_pair)", new="    return max(1, 64 * budget // per_pair)",
         tests=MEM_TORCH),
    dict(name="pipeline: the caller's memory budget ignored (always the backend's default)",
         file=PIPE, old="    if memory_budget is None:\n        memory_budget = ks.budget(img.device)",
         new="    if True:\n        memory_budget = ks.budget(img.device)", tests=MEM_CPP + MEM_TORCH),
    dict(name="pipeline: training without block checkpointing (every block's intermediates kept)",
         file=PIPE, old="    return torch.utils.checkpoint.checkpoint(cut, *block_args, False, use_reentrant=False, preserve_rng_state=True)",
         new="    return cut(*block_args, False)", tests=MEM_TORCH + MEM_CPP),
    dict(name="torch kernels: training blocks planned with the inference buffer count",
         file=TK, old="live_buffers=4, live_buffers_train=17,", new="live_buffers=4, live_buffers_train=4,",
         tests=MEM_TORCH),
    dict(name="cpp kernels: training blocks planned with a sixth of their buffers (a third of what they use)",
         file=EXT, old='budgets={"cpu": 96 * 2**20}, live_buffers=3, live_buffers_train=6,',
         new='budgets={"cpu": 96 * 2**20}, live_buffers=3, live_buffers_train=1,', tests=MEM_CPP),
    dict(name="pipeline: the fused RCR step used under autograd too (no gradient through RCR)",
         file=PIPE, old="    if ks.rcr is None or not inplace or E.device.type not in ks.rcr_devices:",
         new="    if ks.rcr is None or E.device.type not in ks.rcr_devices:",
         tests=["tests/test_parity.py::test_gradients_match_reference[coop_rcar-2-t2i]"]),
    # RCR's recomputing step under autograd (rcar_fast/torch_math.py, KernelSet.rcr_recompute)
    dict(name="pipeline: the recomputing RCR step taken at inference too",
         file=PIPE, old="    if not inplace and ks.rcr_recompute:", new="    if ks.rcr_recompute:",
         tests=[f"{FUSED}::test_fused_rcr_step_runs_at_inference_only[cpp]"]),
    dict(name="cpp kernels: training through plain autograd's RCR step (its activations kept)",
         file=EXT, old='live_buffers_train=6, rcr_recompute=True,\n                rcr=',
         new='live_buffers_train=6, rcr_recompute=False,\n                rcr=',
         tests=[f"{FUSED}::test_fused_rcr_step_runs_at_inference_only[cpp]",
                f"{RECOMP}::test_fused_backends_train_through_it_and_torch_does_not[cpp]"]),
    dict(name="rcr recompute: tanh's derivative left out of the output layer's gradient",
         file=TM, old="gm = gz.mul_(_slope(t))", new="gm = gz", tests=[RECOMP_EQ]),
    dict(name="rcr recompute: the hidden layer's derivative left out",
         file=TM, old="ga1 = (gm @ w2).mul_(_slope(h1))", new="ga1 = gm @ w2", tests=[RECOMP_EQ]),
    dict(name="rcr recompute: the factors' gradient not masked by the clamp",
         file=TM, old="                    dF[r0:r1] = gz\n", new="                    dF[r0:r1] = gF[r0:r1]\n",
         tests=[RECOMP_EQ]),
    dict(name="rcr recompute: the temperatures' gradient not masked by the relu",
         file=TM, old="go = torch.where(o > 0, glam, glam.new_zeros(()))", new="go = glam.clone()",
         tests=[RECOMP_EQ]),
    dict(name="rcr recompute: E's gradient without the temperatures' branch",
         file=TM, old="dE = ga2 @ ws1 if need[0] else None", new="dE = torch.zeros_like(E) if need[0] else None",
         tests=[RECOMP_EQ]),
    dict(name="rcr recompute: the backward recomputes with the scalar temperature (lam ignored)",
         file=TM, old=".add_(lam if lam is not None else ctx.lam_scalar)", new=".add_(ctx.lam_scalar)",
         tests=[RECOMP_EQ]),
    dict(name="rcr recompute: a weight's gradient from the last chunk only",
         file=TM, old="                gw1.addmm_(ga1.t(), e)", new="                gw1.copy_(ga1.t() @ e)",
         tests=[RECOMP_EQ]),
    dict(name="rcr recompute: chunks floor-divided (more than RCR_CHUNKS of them)",
         file=TM, old="    step = max(RCR_MIN_CHUNK_ROWS, -(-rows // RCR_CHUNKS))",
         new="    step = max(RCR_MIN_CHUNK_ROWS, rows // RCR_CHUNKS)", tests=[f"{RECOMP}::test_chunks_cover_every_row_once"]),
    dict(name="rcr recompute: the clamp's input saved for backward",
         file=TM, old="        ctx.save_for_backward(E, factors, lam, *weights)\n",
         new="        ctx.save_for_backward(E, factors, lam, *weights, Fn + 0)\n",
         tests=[f"{RECOMP}::test_saves_only_its_inputs"]),
    # RAR dropout
    dict(name="dropout: keep-masks without the 1/(1-p) rescale",
         file=DROP, old="width, device)\n    scale = 1.0 / (1.0 - RAR_DROPOUT)\n", new="width, device)\n    scale = 1.0\n",
         tests=["tests/test_dropout.py::test_random_masks_rate_and_scale"]),
    dict(name="dropout: rate p kept instead of 1-p",
         file=DROP, old="    keep_k = torch.rand(n_i, n_c, lq, width, device=device) >= RAR_DROPOUT",
         new="    keep_k = torch.rand(n_i, n_c, lq, width, device=device) < RAR_DROPOUT",
         tests=["tests/test_dropout.py::test_random_masks_rate_and_scale"]),
    dict(name="pipeline: dropout applied without its rescale (masks cast to 0/1)",
         file=PIPE, old="    return to_block_layout(keep_k, attn_type), to_block_layout(keep_g, attn_type)",
         new="    return (to_block_layout((keep_k > 0).to(E.dtype), attn_type),\n"
             "            to_block_layout((keep_g > 0).to(E.dtype), attn_type))",
         tests=[f"{FIXED}[cpp-coop_rcar-2-t2i-one block]"]),
    dict(name="pipeline: every RAR step of coop_rcar draws step 0's masks",
         file=PIPE, old="tuple(w[t:t + 1] for w in rar_w), training, t, pairs)",
         new="tuple(w[t:t + 1] for w in rar_w), training, 0, pairs)",
         tests=[f"{FIXED}[cpp-coop_rcar-2-t2i-one block]"]),
    dict(name="pipeline: i2t masks not moved to block layout (images and captions swapped)",
         file=PIPE, old="    return to_block_layout(keep_k, attn_type), to_block_layout(keep_g, attn_type)",
         new="    return keep_k.reshape(E.shape).contiguous(), keep_g.reshape(E.shape[:2] + E.shape[3:]).contiguous()",
         tests=[f"{FIXED}[torch-coop_rcar-2-i2t-one block]"]),
    dict(name="reference: dropout masks of caption 0 for every caption",
         file="rcar_fast/reference.py", old="torch.arange(n_i), torch.tensor([j]), lq, s, E.dtype, E.device)",
         new="torch.arange(n_i), torch.tensor([0]), lq, s, E.dtype, E.device)",
         tests=[f"{FIXED}[torch-coop_rcar-2-t2i-one block]"]),
    # self-test, auto, limits
    dict(name="auto: the self-test result ignored",
         file=BK, old="\n                    and _passes_selftest(name, device, dtype)):", new="):",
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
    dict(name="triton: pairs past its 64 rows accepted (the launcher's error only after work began)",
         file="rcar_fast/backends/triton_kernels.py", old="    if rows > MAX_ROWS:", new="    if rows > 10 * MAX_ROWS:",
         tests=[f"{SELF}::test_shape_limits_refuse_at_the_boundary_and_steer_auto"]),
    # empty grids, tanh, half-precision scores
    dict(name="empty grid: zeros not connected to the inputs (backward raises)",
         file=OPS, old="        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():",
         new="        if False:", tests=["tests/test_api.py::test_empty_grid_keeps_autograd"]),
    dict(name="tanh: the CPU's four-pass sigmoid trick on every device",
         file="rcar_fast/torch_math.py", old='    if x.device.type != "cpu":\n        return torch.tanh_(x)',
         new='    if False:\n        return torch.tanh_(x)', tests=["tests/test_api.py::test_tanh_is_one_op_off_the_cpu"]),
    dict(name="pipeline: half-precision scores rounded to their dtype (bf16 ties)",
         file=PIPE, old='    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype',
         new='    return dtype', tests=["tests/test_api.py::test_half_precision_scores_are_float32"]),
    # bench/profile.py: measured kernel time against the cost model
    dict(name="profile: the model's rows keep its launch costs (kernel times hold none)",
         file="bench/profile.py", old="        out[row] = (n + ln.count, s + ln.seconds() - ln.count * LAUNCH_S)",
         new="        out[row] = (n + ln.count, s + ln.seconds())",
         tests=["tests/test_profile.py::test_every_model_launch_lands_in_a_reachable_row[flickr30k-triton]"]),
    dict(name="profile: the model's cuBLAS lines summed into other, not the library GEMMs",
         file="bench/profile.py", old='    return "library GEMMs" if "(cuBLAS)" in launch else OTHER',
         new="    return OTHER",
         tests=["tests/test_profile.py::test_every_model_launch_lands_in_a_reachable_row[flickr30k-triton]"]),
    dict(name="profile: the GPU-side mirrors of CPU annotations counted as kernels",
         file="bench/profile.py", old='            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)',
         new="            if e.device_type == DeviceType.CUDA",
         tests=["tests/test_profile.py::test_kernel_events_keep_device_kernels_only"]),
    dict(name="profile: copies and memsets counted as kernels",
         file="bench/profile.py", old='            and not e.name.startswith(("Memcpy", "Memset"))]',
         new="            and True]",
         tests=["tests/test_profile.py::test_kernel_events_keep_device_kernels_only"]),
    # bench/device_suite.sh: the deadline
    dict(name="device suite: as-time-allows stages run into the second left for the tables",
         file="bench/device_suite.sh", old="    reserve=$(( SUMMARY_CAP + SUMMARY_GRACE + END_RESERVE ))",
         new="    reserve=$(( SUMMARY_CAP + SUMMARY_GRACE ))",
         tests=["tests/test_device_suite.py::test_hung_stages_are_cut_and_the_rest_runs_inside_the_deadline"]),
    # bench/roofline.py: the what-if of RCR's factors made on chip (a design not built)
    dict(name="roofline what-if: F's read in the attention left booked (its HBM round trip half gone)",
         file="bench/roofline.py", old="             hbm=pairs * Lq * 2 * s * e + 2 * s * d * e - pairs * Lq * d * e)",
         new="             hbm=pairs * Lq * 2 * s * e + 2 * s * d * e)",
         tests=["tests/test_roofline.py::test_rcr_on_chip_what_if_books_the_design"]),
    dict(name="roofline what-if: the F product over half of d",
         file="bench/roofline.py", old="    chunks = -(-d // BDF)\n", new="    chunks = -(-d // BDF) // 2\n",
         tests=["tests/test_roofline.py::test_rcr_on_chip_what_if_books_the_design"]),
    dict(name="roofline what-if: applied under autograd too",
         file="bench/roofline.py",
         old="    return bool(shape.rcr_on_chip) and not shape.training and shape.steps == 2 and t == 1",
         new="    return bool(shape.rcr_on_chip) and shape.steps == 2 and t == 1",
         tests=["tests/test_roofline.py::test_rcr_on_chip_what_if_books_the_design"]),
]
