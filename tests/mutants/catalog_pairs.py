"""Planted bugs in pair-list scoring (the attention's paired form, rcar_fast.ops.pair_scores), each
with the tests that must catch it. Format: tests/mutants/run.py (built here from rows of
(name, file, old, new, tests))."""

T = "tests/test_pair_scores.py"
OP = f"{T}::test_paired_attention_op_is_the_grid_at_the_listed_pairs"
OP_A = f"{OP}[triton-A,F=1-1,0,1]"
GRID = f"{T}::test_pair_scores_equal_the_grid"
TRAIN = f"{T}::test_train_mode_dropout_equals_the_grid"
PIPE = "rcar_fast/pipeline.py"

ROWS = [
    ("triton: the forward reads the context row of its output place b, not the pair's index",
     "kernels/attention.py",
     "    c_base = c_ptr + bc * sc_b + rc[:, None] * sc_l\n    f_base = f_ptr + b * sf_b + p0 * sf_p + r[:, None] * sf_l\n\n    # pass 1",
     "    c_base = c_ptr + b * sc_b + rc[:, None] * sc_l\n    f_base = f_ptr + b * sf_b + p0 * sf_p + r[:, None] * sf_l\n\n    # pass 1",
     [OP_A, f"{GRID}[triton-coop_rcar-2-t2i]"]),
    ("triton: the backward ignores the index for dcontext (accumulated at the output place)",
     "kernels/attention_bwd.py", "    dc_base = dc_ptr + bc * BC * D + rc[:, None] * D\n    dy_row",
     "    dc_base = dc_ptr + b * BC * D + rc[:, None] * D\n    dy_row",
     [OP_A, f"{OP}[triton-E,F,lam-1,1,1]"]),
    ("pipeline: RAR dropout masks named by the block-local position, not the global image", PIPE,
     "(images, captions, attn_type, True), cidx, score_w, gram)[0]",
     "(torch.arange(images.shape[0]), captions, attn_type, True), cidx, score_w, gram)[0]", [f"{TRAIN}[torch-t2i]"]),
    ("dropout: a fixed source asked with the list position instead of the image index", "rcar_fast/dropout.py",
     "k, g = _SOURCE(step, images[sel[:1]], captions[sel], lq, width, device)",
     "k, g = _SOURCE(step, sel[:1], captions[sel], lq, width, device)", [f"{TRAIN}[torch-i2t]"]),
    ("pipeline: i2t pairs pointed at the distinct captions by list position, not by caption", PIPE,
     "    return q, ql, c, cl, inv.to(torch.int32)",
     "    return q, ql, c, cl, (torch.arange(inv.shape[0], device=inv.device) % uniq.shape[0]).to(torch.int32)",
     [f"{GRID}[torch-coop_rcar-2-i2t]"]),
    ("torch: the paired context's lengths not gathered per pair (the first item's for all)",
     "rcar_fast/backends/torch_kernels.py",
     "context, clens = context.index_select(0, idx), clens.index_select(0, idx)",
     "context, clens = context.index_select(0, idx), clens[:1].expand(idx.shape[0])",
     [f"{OP}[torch-A,F=1-1,0,1]"]),
    ("dropout: the pair list's keep-masks without the 1/(1-p) rescale", "rcar_fast/dropout.py",
     "            keep_k[sel], keep_g[sel] = k[0], g[0]\n    scale = 1.0 / (1.0 - RAR_DROPOUT)",
     "            keep_k[sel], keep_g[sel] = k[0], g[0]\n    scale = 1.0",
     [f"{TRAIN}[torch-t2i]"]),
    ("retrieval: a tile's captions cut to its shortest caption", "rcar_fast/app/retrieval.py",
     "cap_t = cap[uc.to(cap.device), :int(lens_t.max())]", "cap_t = cap[uc.to(cap.device), :int(lens_t.min())]",
     [f"{T}::test_two_stage_pair_lists_give_the_per_caption_results[t2i]"]),
]

#: every name starts with "pairs/" (python tests/mutants/run.py -k pairs/ runs these)
MUTANTS = [dict(zip(("name", "file", "old", "new", "tests"), ("pairs/ " + row[0],) + row[1:])) for row in ROWS]
