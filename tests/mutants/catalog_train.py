"""Planted bugs in training (rcar_fast/app/train*.py: the loss, the recipe, the augmentation,
checkpoints and resume, the processes' shares of the global batch), each with the tests that
must catch it. Format: tests/mutants/run.py.

    python tests/mutants/run.py -k train"""

TR = "rcar_fast/app/train.py"
TD = "rcar_fast/app/train_dist.py"
TA = "rcar_fast/app/train_data.py"
T1 = "tests/test_train.py"
T2 = "tests/test_train_distributed.py"

FORMULA = f"{T1}::test_loss_is_the_release_formula"
SCHEDULE = f"{T1}::test_run_folder_metrics_and_schedule"
RESUME = f"{T1}::test_resume_continues_the_same_run_bit_for_bit"
RATES = f"{T1}::test_augmentation_rates_are_the_release_s"
SHARES = f"{T2}::test_processes_give_one_process_s_loss_gradients_and_step"

MUTANTS = [
    # the loss
    dict(name="train loss: the hinge without the diagonal masked (each pair is its own negative)",
         file=TR, old="    cost_s = cost_s.masked_fill(eye, 0)\n    cost_im = cost_im.masked_fill(eye, 0)\n",
         new="", tests=[FORMULA]),
    dict(name="train loss: max-violation takes each image's hardest caption twice (max over rows for both)",
         file=TR, old="cost_im = cost_im.max(0)[0]", new="cost_im = cost_im.max(1)[0]", tests=[FORMULA]),
    dict(name="train loss: the caption direction compared with the image's own score",
         file=TR, old="cost_im = (margin + scores - diag[None, :]).clamp(min=0)",
         new="cost_im = (margin + scores - diag[:, None]).clamp(min=0)", tests=[FORMULA]),

    # the recipe
    dict(name="train recipe: max-violation never switched on (VSE0 for ever)",
         file=TR, old="return epoch >= self.config.warmup_epochs", new="return False", tests=[SCHEDULE]),
    dict(name="train recipe: warm-up one epoch too long",
         file=TR, old="return epoch >= self.config.warmup_epochs", new="return epoch > self.config.warmup_epochs",
         tests=[SCHEDULE]),
    dict(name="train recipe: the learning rate never decays",
         file=TR, old="(0.1 if epoch >= self.config.lr_update else 1.0)", new="1.0", tests=[SCHEDULE]),
    dict(name="train recipe: a non-finite loss not caught (the step goes on)",
         file=TR, old="        if not math.isfinite(total):\n", new="        if False:\n",
         tests=[f"{T1}::test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint"]),
    dict(name="train recipe: parameters the forward never uses left trainable (DDP waits for their gradients)",
         file=TR, old="    if model.sim_enc.regulator == \"only_rcr\":\n        names += [",
         new="    if False:\n        names += [",
         tests=[f"{T1}::test_unused_parameters_are_exactly_those_without_a_gradient"]),

    # the augmentation and the vocabulary
    dict(name="train augmentation: 15% of the words picked instead of 20%",
         file=TA, old="AUG_PICK = 0.20", new="AUG_PICK = 0.15", tests=[RATES]),
    dict(name="train augmentation: random tokens and deletions swapped",
         file=TA, old="keep = ~(picked & (q >= AUG_MASK + AUG_RANDOM))",
         new="keep = ~(picked & (q >= AUG_MASK) & (q < AUG_MASK + AUG_RANDOM))", tests=[RATES]),
    dict(name="train vocabulary: <mask> takes the last word's index",
         file=TA, old="words[MASK] = max(len(words), vocab.max_index + 1)", new="words[MASK] = vocab.max_index",
         tests=[f"{T1}::test_mask_token_is_appended_as_the_release_does"]),

    # checkpoints and resume
    dict(name="train checkpoint: state dict saved without DataParallel's module. prefix",
         file=TR, old='"model": {"module." + k: v for k, v in self.model.state_dict().items()},',
         new='"model": dict(self.model.state_dict()),',
         tests=[f"{T1}::test_checkpoint_is_the_release_s_format_and_loads_back"]),
    dict(name="train resume: the optimizer's state not restored",
         file=TR, old='                self.optimizer.load_state_dict(ckpt["optimizer"])\n',
         new="                pass\n", tests=[RESUME]),
    dict(name="train resume: dropout's RNG not reseeded per epoch (a resumed run draws other masks)",
         file=TR, old="        torch.manual_seed(torch_seed(c.seed, epoch, self.rank, 0xD0))", new="        pass",
         tests=[RESUME]),
    dict(name="train resume: the epoch counter restarts at 0",
         file=TR, old='self.start_epoch = int(ckpt.get("epoch", 0))', new="self.start_epoch = 0", tests=[RESUME]),

    # many processes
    dict(name="train dist: gathered image embeddings detached (no gradient from other processes' captions)",
         file=TD, old="return _GatherRows.apply(x, list(counts))", new="return _GatherRows.apply(x.detach(), list(counts))",
         tests=[SHARES]),
    dict(name="train dist: gather's backward keeps only this process's gradient (no sum over processes)",
         file=TD, old="        grad = grad.contiguous().clone()\n        dist.all_reduce(grad)\n        o, n = ctx.rows",
         new="        grad = grad.contiguous().clone()\n        o, n = ctx.rows", tests=[SHARES]),
    dict(name="train dist: every process adds every row's hardest negative (counted W times)",
         file=TD, old="return row_max[o:o + n].sum() + cost_im.max(0)[0].sum()",
         new="return row_max.sum() + cost_im.max(0)[0].sum()", tests=[SHARES]),
    dict(name="train dist: the local loss not scaled by the process count (DDP averages the gradients)",
         file=TR, old="(loss * self.world).backward() if self.world > 1 else loss.backward()", new="loss.backward()",
         tests=[SHARES]),
    dict(name="train dist: BatchNorm statistics per process, not over the global batch",
         file=TD, old="            module.__class__ = SyncBatchNorm1d", new="            pass", tests=[SHARES]),
    dict(name="train dist: a set-up error on one process not shared (the others wait in a collective)",
         file=TR, old="            error, exc = _one_line(e), e", new="            raise",
         tests=[f"{T2}::test_a_set_up_error_on_one_process_is_reported_once_and_ends_every_process"]),
]
