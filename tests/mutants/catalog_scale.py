"""Planted bugs in exact multi-process scoring and top-k search, each with the tests that must
catch it. Format: tests/mutants/run.py."""

DS = "rcar_fast/app/distributed.py"
SR = "rcar_fast/app/search.py"
RT = "rcar_fast/app/retrieval.py"
T_DS = "tests/test_distributed.py"
T_SR = "tests/test_search.py"
CLI = "rcar_fast/app/cli.py"
T_CLI = "tests/test_cli_scale.py"

MUTANTS = [
    dict(name="distributed: the gathered shares placed in the wrong order (positions not per rank)",
         file=DS, old="        pos[q] += t.pairs", new="        pos[0] += t.pairs",
         tests=[f"{T_DS}::test_every_process_gets_the_one_process_matrix[2]"]),
    dict(name="distributed: owners not deterministic across processes (by the process's own rank)",
         file=DS, old="    order = sorted(range(len(costs)), key=lambda k: (-costs[k], k))",
         new="    order = sorted(range(len(costs)), key=lambda k: (-costs[k], -k if dist.is_initialized() and dist.get_rank() else k))",
         tests=[f"{T_DS}::test_every_process_gets_the_one_process_matrix[3]"]),
    dict(name="distributed: a failure kept to the failing process (the others wait or return)",
         file=DS, old="    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_comm_device(group))",
         new="    failed = torch.tensor([0], dtype=torch.int64, device=_comm_device(group))",
         tests=[f"{T_DS}::test_a_failing_process_fails_every_process_without_hanging"]),
    dict(name="retrieval: tiles depend on the process count (a single process's bits differ)",
         file=RT, old="                              max(MIN_TILE_PAIRS, n_i * n_c // MIN_TILES))",
         new="                              max(MIN_TILE_PAIRS, n_i * n_c // MIN_TILES) * (2 if __import__('torch.distributed').distributed.is_initialized() else 1))",
         tests=[f"{T_DS}::test_every_process_gets_the_one_process_matrix[2]"]),
    dict(name="search: ties broken by the higher gallery id",
         file=SR, old="    order = torch.argsort(key_ids, dim=1, stable=True)", new="    order = torch.argsort(-key_ids, dim=1, stable=True)",
         tests=[f"{T_SR}::test_topk_equals_the_exhaustive_topk"]),
    dict(name="search: the running list not merged with the new chunk (last chunk only)",
         file=SR, old="            top = merge_topk(torch.cat([top[0], s], 1), torch.cat([top[1], ids.expand(n_q, -1)], 1), k)\n            stats.chunks",
         new="            top = merge_topk(s, ids.expand(n_q, -1).clone(), k)\n            stats.chunks",
         tests=[f"{T_SR}::test_topk_equals_the_exhaustive_topk"]),
    dict(name="search: each process keeps its own list (no merge across processes)",
         file=SR, old="    if group is None:\n        return top\n    world", new="    if True:\n        return top\n    world",
         tests=[f"{T_SR}::test_several_processes_merge_exactly"]),
    dict(name="search: the gallery's shares overlap between processes",
         file=SR, old="    return start, start + base + (1 if rank < extra else 0)",
         new="    return start, min(n, start + base + 2)",
         tests=[f"{T_SR}::test_several_processes_merge_exactly"]),
    dict(name="search: the gallery read through a memory map kept whole (chunks not bounded)",
         file=SR, old="        while pos < stop:\n", new="        size = max(size, stop - start)\n        while pos < stop:\n",
         tests=[f"{T_SR}::test_memory_does_not_grow_with_the_gallery"]),
    # the command line under torchrun (tests/test_cli_scale.py)
    dict(name="eval under torchrun: rank 1 prints too",
         file=CLI, old="    say = print if main_rank else _quiet", new="    say = print",
         tests=[f"{T_CLI}::test_eval_two_processes_print_the_one_process_recall"]),
    dict(name="eval under torchrun: the group not passed to score_all (every process scores everything)",
         file=CLI, old='desc=f"{tag}scoring", group=group) for s in sub]', new='desc=f"{tag}scoring") for s in sub]',
         tests=[f"{T_CLI}::test_eval_two_processes_print_the_one_process_recall"]),
    dict(name="eval under torchrun: a loading error kept to the failing process (no agreement)",
         file=CLI, old='    with distributed.together(group, "eval"):', new='    with distributed.together(None, "eval"):',
         tests=[f"{T_CLI}::test_eval_failure_on_one_rank_stops_every_rank_with_one_line[loading]"]),
    dict(name="search command under torchrun: the merge drops the other processes' lists",
         file=SR, old="    return merge_topk(torch.cat(scores, dim=1), torch.cat(ids, dim=1), k)",
         new="    return merge_topk(scores[0], ids[0], k)",
         tests=[f"{T_CLI}::test_search_two_processes_merge_exactly_and_rank_0_alone_writes"]),
    dict(name="search under torchrun: a scoring error kept to the failing process (no agreement)",
         file=SR, old='    with together(group, "search"), contextlib.closing(bar):',
         new='    with together(None, "search"), contextlib.closing(bar):',
         tests=[f"{T_CLI}::test_search_failure_on_one_rank_stops_both"]),
]
