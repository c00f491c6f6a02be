"""Planted bugs in retrieval (metrics, two-stage search), the release's encoders and checkpoints,
the command line and the hypothesis settings, each with the tests that must catch it.
Format: tests/mutants/run.py."""

RT = "rcar_fast/app/retrieval.py"
ENC = "rcar_fast/app/encoders.py"
CLI = "rcar_fast/app/cli.py"
T_RET = "tests/test_retrieval.py"
T_CK = "tests/test_checkpoint.py"
T_CLI = "tests/test_cli.py"
T_HYP = "tests/test_hypothesis.py"

CHUNKS = f"{T_RET}::test_metrics_past_one_chunk_match_the_release_loops"
NORMS = f"{T_CK}::test_each_norm_option_alone_is_read_and_skips_only_its_l2n"
TIES_2S = f"{T_RET}::test_two_stage_ties_count_against_the_match"
TIES_EXP = [f"{T_RET}::test_expected_ties_on_a_constant_matrix",
            f"{T_RET}::test_expected_ties_average_every_tie_order"]

MUTANTS = [
    # (a) the chunk offset of the recall ranks
    dict(name="ranks: i2t chunk offset dropped (rows past the first chunk use image 0's captions)",
         file=RT, old="img_idx = torch.arange(r0, r0 + n)", new="img_idx = torch.arange(0, n)",
         tests=[CHUNKS]),
    dict(name="ranks: t2i chunk offset dropped (captions past the first chunk use caption 0's image)",
         file=RT, old="gt = torch.arange(c0, c0 + n) // k", new="gt = torch.arange(0, n) // k",
         tests=[CHUNKS]),
    dict(name="ranks: i2t chunks overlap (each reads the rows of the first chunk)",
         file=RT, old="rows = sims[r0:r0 + chunk]", new="rows = sims[:chunk][:n_i - r0]",
         tests=[CHUNKS]),

    # (b) the release's no_imgnorm / no_txtnorm options
    dict(name="checkpoint: no_txtnorm read from the no_imgnorm key",
         file=ENC, old='no_txtnorm=opt.get("no_txtnorm", False)', new='no_txtnorm=opt.get("no_imgnorm", False)',
         tests=[NORMS]),
    dict(name="checkpoint: no_imgnorm read from the no_txtnorm key",
         file=ENC, old='no_imgnorm=opt.get("no_imgnorm", False)', new='no_imgnorm=opt.get("no_txtnorm", False)',
         tests=[NORMS]),
    dict(name="checkpoint: the text encoder built with the image encoder's norm option",
         file=ENC, old="config.num_layers, config.use_bi_gru, config.no_txtnorm)",
         new="config.num_layers, config.use_bi_gru, config.no_imgnorm)", tests=[NORMS]),
    dict(name="checkpoint: text encoder always l2-normalises (no_txtnorm ignored)",
         file=ENC, old="return out if self.no_txtnorm else l2norm(out)", new="return l2norm(out)",
         tests=[NORMS]),
    dict(name="checkpoint: image encoder never l2-normalises (no_imgnorm inverted)",
         file=ENC, old="return features if self.no_imgnorm else l2norm(features)",
         new="return l2norm(features) if self.no_imgnorm else features", tests=[NORMS]),
    dict(name="checkpoint: save_checkpoint writes no_txtnorm as no_imgnorm's value",
         file=ENC, old='"no_txtnorm": c.no_txtnorm,', new='"no_txtnorm": c.no_imgnorm,', tests=[NORMS]),

    # (c) ties in two-stage search count against the match
    dict(name="two-stage: prefilter ties resolved in the match's favour (i2t, dropped matches)",
         file=RT, old="rank_out = kc + ((P >= best_p[:, None]) & outside).sum(dim=1)",
         new="rank_out = kc + ((P > best_p[:, None]) & outside).sum(dim=1)", tests=[TIES_2S]),
    dict(name="two-stage: prefilter ties resolved in the match's favour (t2i, dropped matches)",
         file=RT, old="rank_out = ki + ((Pt >= own_p) & outside).sum(dim=1)",
         new="rank_out = ki + ((Pt > own_p) & outside).sum(dim=1)", tests=[TIES_2S]),
    dict(name="two-stage: prefilter ties at the cut resolved in the match's favour",
         file=RT, old="tie_key = is_own.to(torch.uint8)", new="tie_key = (~is_own).to(torch.uint8)",
         tests=[TIES_2S]),
    dict(name="two-stage: ties at the cut left to topk",
         file=RT, old="    if rows.numel():\n        sub = P[rows]", new="    if False:\n        sub = P[rows]",
         tests=[TIES_2S]),
    dict(name="two-stage: re-ranking ties resolved in the match's favour (i2t)",
         file=RT, old="rank_in = (torch.where(gt_c, -math.inf, r_c) >= best_in[:, None]).sum(dim=1)",
         new="rank_in = (torch.where(gt_c, -math.inf, r_c) > best_in[:, None]).sum(dim=1)", tests=[TIES_2S]),
    dict(name="two-stage: re-ranking ties resolved in the match's favour (t2i)",
         file=RT, old="rank_in = (torch.where(gt_i, -math.inf, r_i) >= best_in[:, None]).sum(dim=1)",
         new="rank_in = (torch.where(gt_i, -math.inf, r_i) > best_in[:, None]).sum(dim=1)", tests=[TIES_2S]),
    dict(name="metrics: exhaustive ties resolved in the match's favour (i2t)",
         file=RT, old="return ahead + tied\n", new="return ahead\n",
         tests=[f"{T_RET}::test_ties_count_against_the_match"]),

    # (f) the expected tie rule
    dict(name="ties expected: tied own captions ignored (g / 2 instead of g / (m + 1))",
         file=RT, old="tied.double() / (tied_own.double() + 1.0)", new="tied.double() / 2.0", tests=TIES_EXP),
    dict(name="ties expected: R@K as if one own item tied",
         file=RT, old="(tied - j) / (tied + own - j).clamp(min=1.0)", new="(tied - j) / (tied + 1 - j).clamp(min=1.0)",
         tests=TIES_EXP),
    dict(name="ties expected: R@K of the expected rank (rank < K) instead of P(rank < K)",
         file=RT, old="        recalls.append(100.0 * float(p.mean()))",
         new="        recalls.append(100.0 * float((_ranks_from_counts(counts, ties) < K).double().mean()))",
         tests=TIES_EXP),
    dict(name="ties: the CLI ignores --ties",
         file=CLI, old="rec = recall_metrics(sims, cpi, ties=args.ties)", new="rec = recall_metrics(sims, cpi)",
         tests=[f"{T_CLI}::test_eval_ties_expected_reports_the_expected_recall"]),

    # (d) the command line's user errors
    dict(name="cli: --device not checked against the machine (cuda without a GPU)",
         file=CLI, old="    if not torch.cuda.is_available():\n        raise argparse.ArgumentTypeError",
         new="    if False:\n        raise argparse.ArgumentTypeError",
         tests=[f"{T_CLI}::test_eval_device_without_a_gpu_is_one_line",
                f"{T_CLI}::test_eval_device_cuda_without_a_gpu_from_a_subprocess"]),
    dict(name="cli: argparse errors print the usage block and exit the process",
         file=CLI, old="    def error(self, message):\n        raise UsageError",
         new="    def _unused_error(self, message):\n        raise UsageError",
         tests=[f"{T_CLI}::test_eval_argument_errors_are_one_line"]),
    dict(name="bench: arguments passed on unchecked",
         file="bench/suite.py", old="    message = argument_error(argv)\n", new="    message = None\n",
         tests=[f"{T_CLI}::test_bench_argument_errors_are_one_line"]),
    dict(name="cli: the backend's refusal of a dtype not caught",
         file=CLI, old="    except (ValueError, TypeError, OSError) as exc:   # files, shapes, splits: one line",
         new="    except (TypeError, OSError) as exc:   # files, shapes, splits: one line",
         tests=[f"{T_CLI}::test_eval_bf16_triton_under_the_interpreter_is_refused"]),

    dict(name="cli: the cost of the tie rule not reported",
         file=CLI, old='if tied > 0 and args.ties == "pessimistic":', new="if False:",
         tests=[f"{T_CLI}::test_eval_ties_expected_reports_the_expected_recall"]),
    dict(name="cli: features of another size than the checkpoint's img_dim not named",
         file=CLI, old="        if model.config.img_dim != split.images.shape[2]:",
         new="        if False:", tests=[f"{T_CLI}::test_eval_argument_errors_are_one_line"]),

    # (g) hypothesis examples are the same on every run
    dict(name="hypothesis: examples drawn at random (derandomize off)",
         file=T_HYP, old="derandomize=True, database=None,", new="derandomize=False, database=None,",
         tests=[f"{T_HYP}::test_every_hypothesis_test_here_is_deterministic",
                f"{T_HYP}::test_the_same_examples_on_every_run"]),
    dict(name="hypothesis: module import fails without hypothesis (no importorskip)",
         file=T_HYP, old='pytest.importorskip("hypothesis")\n', new="\n",
         tests=[f"{T_HYP}::test_module_skips_cleanly_without_hypothesis"]),
]
