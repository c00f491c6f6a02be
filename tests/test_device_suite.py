"""bench/device_suite.sh in its dry-run mode: stage order, caps, deadline, signals, files.

The dry run replaces each stage's command by a stub that prints it and sleeps (or hangs, or
fails) under the real `timeout` with the real caps and deadline arithmetic, so no GPU, pip or
python -m bench is needed; each test takes a few seconds at most (the hang test ~15 s).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_suite.sh")
MUST = ["env", "build", "row_cuda", "row_triton", "row_torch", "pytest_cuda", "pytest_triton"]
REST = ["profile", "memcheck_cuda", "racecheck_cuda", "h100_base", "h100_cuda", "h100_triton", "r1000_fp32",
        "r1000_bf16", "compile"]
ORDER = MUST + REST + ["summary"]
#: "== [1.2s] row_cuda: <what> (cap 64 s): timeout -s INT -k 3 64 <command>"
HEADER = re.compile(r"^== \[[\d.]+s\] (\w+): (.*) \(cap ([\d.]+) s\): "
                    r"timeout -s (\w+) -k ([\d.]+) ([\d.]+) (.*)$")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and GNU timeout")


def run_dry(tmp_path, **env_vars):
    """Run the script in dry-run mode with OUT=tmp_path/out: (stdout lines, stage rows, out dir,
    wall seconds). Stage rows: {name: dict(kind, start, cap, kill, used, exit, result)}."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DRY_", "CAP_"))
           and k not in ("TORCH_CUDA_ARCH_LIST", "ONLY", "MAX_JOBS", "DEADLINE_S")}
    env.update(DRY_RUN="1", DRY_STAGE_S="0.02", OUT=str(out))
    env.update({k: str(v) for k, v in env_vars.items()})
    deadline = float(env.get("DEADLINE_S", 300))
    t0 = time.monotonic()
    # a session of its own: a script that fails to cut a stub must not leave it behind
    p = subprocess.Popen(["bash", SCRIPT], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = p.communicate(timeout=deadline + 10)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"device_suite.sh ran past DEADLINE_S={deadline:g} + 10 s")
    wall = time.monotonic() - t0
    assert p.returncode == 0, stdout
    rows = {}
    table = (out / "stages.txt").read_text().splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("stage "))
    for line in table[head + 1:]:
        name, kind, start, cap, kill, used, rc, result = line.split(None, 7)
        num = lambda s: None if s == "-" else float(s)   # noqa: E731
        rows[name] = dict(kind=kind, start=num(start), cap=num(cap), kill=num(kill),
                          used=num(used), exit=rc, result=result)
    return stdout.splitlines(), rows, out, wall


def headers(lines):
    """{stage: (what, cap, signal, kill, timeout's duration, command)} in the order they ran."""
    found = {}
    for line in lines:
        m = HEADER.match(line)
        if m:
            name, what, cap, sig, kill, dur, cmd = m.groups()
            found[name] = (what, float(cap), sig, float(kill), float(dur), cmd)
    return found


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return run_dry(tmp_path_factory.mktemp("suite"))


def test_stage_order(default_run):
    lines, rows, _, _ = default_run
    assert list(headers(lines)) == ORDER
    assert list(rows) == ORDER
    # the 1000 x 5000 bf16 matrix: one process per backend, cuda, triton, torch, each announced
    h = headers(lines)
    for backend in ("cuda", "triton", "torch"):
        what, *_, cmd = h[f"row_{backend}"]
        assert what.startswith(f"starting row {backend}")
        assert cmd.endswith(f"--backends {backend}")
        for arg in ("-m bench --device cuda", "--images 1000 --captions 5000", "--dtype bfloat16",
                    "--configs coop_rcar:2", "--directions t2i"):
            assert arg in cmd


def test_every_stage_has_a_cap_and_the_caps_fit_the_deadline(default_run):
    lines, rows, _, wall = default_run
    for name, (_, cap, _, kill, duration, _) in headers(lines).items():
        assert cap == duration > 0 and kill > 0, name        # the cap is what timeout gets
        assert rows[name]["cap"] == cap and rows[name]["kill"] == kill
        assert rows[name]["start"] + cap + kill <= 300, name  # no stage may end past the deadline
    # the plan: start-up + every must stage's cap and kill grace + the summary's + the tables at
    # the end <= DEADLINE_S
    plan = next(line for line in lines if line.startswith("== plan: "))
    terms = dict(re.findall(r"(\w+) ([\d.]+(?:\+[\d.]+)?)(?= \+| =)", plan))
    assert list(terms) == ["start"] + MUST + ["summary", "end"]
    total = sum(sum(float(x) for x in v.split("+")) for v in terms.values())
    assert total <= 300
    assert float(re.search(r"= ([\d.]+) s of DEADLINE_S 300", plan).group(1)) == pytest.approx(total)
    assert all(rows[n]["exit"] == "0" for n in ORDER) and wall < 300


def test_pytest_stages_use_sigint_and_name_failures(default_run):
    h = headers(default_run[0])
    for backend in ("cuda", "triton"):
        _, _, sig, kill, _, cmd = h[f"pytest_{backend}"]
        assert (sig, kill) == ("INT", 10)
        assert re.search(rf"-m pytest tests -m gpu -k {backend} .*-v -rfE", cmd)
    assert h["build"][2] == "TERM" and h["row_cuda"][2] == "INT"


def test_build_is_for_one_architecture(tmp_path, default_run):
    _, _, _, _, _, cmd = headers(default_run[0])["build"]
    arch = re.search(r"TORCH_CUDA_ARCH_LIST=(\S+)", cmd).group(1)
    assert arch == "9.0a"     # an H200 (9.0) built as sm_90a: the wgmma kernels' code
    assert re.search(rf"MAX_JOBS={len(os.sched_getaffinity(0))} ", cmd)
    lines, *_ = run_dry(tmp_path, DRY_COMPUTE_CAP="8.6", ONLY="none")
    assert re.search(r"TORCH_CUDA_ARCH_LIST=8\.6 ", headers(lines)["build"][5])
    lines, *_ = run_dry(tmp_path, TORCH_CUDA_ARCH_LIST="9.0", ONLY="none")   # asked for: as asked
    assert re.search(r"TORCH_CUDA_ARCH_LIST=9\.0 ", headers(lines)["build"][5])


def test_hung_stages_are_cut_and_the_rest_runs_inside_the_deadline(tmp_path):
    # row_triton ignores SIGINT/SIGTERM (killed after the grace), pytest_cuda stops on SIGINT,
    # compile (as time allows) would hang past the deadline
    deadline = 15
    lines, rows, out, wall = run_dry(tmp_path, DEADLINE_S=deadline, DRY_HANG="pytest_cuda,compile",
                                     DRY_HANG_HARD="row_triton")
    rt, pc = rows["row_triton"], rows["pytest_cuda"]
    assert rt["exit"] == "137" and rt["cap"] <= rt["used"] <= rt["cap"] + rt["kill"] + 0.5
    assert pc["exit"] == "124" and pc["cap"] - 0.1 <= pc["used"] <= pc["cap"] + 0.5
    assert "DRY RUN [pytest_cuda]: got SIGINT" in (out / "pytest.log").read_text()
    assert rows["compile"]["exit"] == "124"
    for name in ("row_torch", "pytest_triton", "h100_base", "r1000_bf16", "summary"):
        assert rows[name]["exit"] == "0", name
    sm = rows["summary"]
    for name, r in rows.items():
        if r["cap"] is not None:
            assert r["start"] + r["cap"] + r["kill"] <= deadline, name
        if r["kind"] == "rest" and r["cap"] is not None:   # leaves the summary and 1 s for the end
            assert r["start"] + r["cap"] + r["kill"] <= deadline - sm["cap"] - sm["kill"] - 1.0, name
    assert wall < deadline   # from before bash starts to after it exits
    # the tables come last: the stage table after every stage, the short table after it
    last_stage = max(i for i, line in enumerate(lines) if line.startswith("== ["))
    table = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    short = next(i for i, line in enumerate(lines) if line.startswith("== short table"))
    assert last_stage < table < short and len(lines) - short <= 2


def test_a_failed_build_skips_the_cuda_stages_only(tmp_path):
    lines, rows, *_ = run_dry(tmp_path, DRY_FAIL="build")
    assert rows["build"]["exit"] == "1"
    for name in ("row_cuda", "pytest_cuda", "h100_cuda"):
        assert rows[name]["result"].startswith("skipped: no cuda backend"), name
    for name in ("row_triton", "row_torch", "pytest_triton", "h100_triton", "summary"):
        assert rows[name]["exit"] == "0", name


def test_only_picks_stages(tmp_path):
    _, rows, *_ = run_dry(tmp_path, ONLY="row_torch,pytest_*")
    assert list(rows) == ["env", "build", "row_torch", "pytest_cuda", "pytest_triton", "summary"]


def test_at_most_8_files_come_back(default_run):
    out = default_run[2]
    files = sorted(p.name for p in out.iterdir())
    assert 0 < len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    # every file the script names under $OUT is one of those the dry run created
    text = open(SCRIPT).read()
    named = set(re.findall(r'\$OUT/([\w.-]+)"', text))
    declared = set(re.search(r'^OUT_FILES="([^"]+)"', text, re.M).group(1).split())
    assert named <= declared == set(files)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_sanitize_stage_command(tmp_path, tool):
    """The sanitizer stages' subcommand, with a stand-in compute-sanitizer in CUDA_HOME that
    prints what it was given: the tool, exit 9 on an error, the libraries' API errors not
    reported, our GPU tests with the backward first under pytest's own timeout 8 s short of the
    cap, memcheck without PyTorch's caching allocator; exit 7 when no compute-sanitizer exists."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    fake = home / "bin" / "compute-sanitizer"
    fake.write_text('#!/bin/bash\necho "ARGS $*"\necho "CACHING ${PYTORCH_NO_CUDA_MEMORY_CACHING:-on}"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    env.update(PATH="/usr/bin:/bin", CUDA_HOME=str(home))
    out = subprocess.run(["bash", SCRIPT, "--sanitize-stage", tool, "45000"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    args = out.stdout.split("ARGS ", 1)[1].splitlines()[0].split()
    assert args[:8] == ["--tool", tool, "--error-exitcode", "9", "--print-limit", "20", "--report-api-errors", "no"]
    assert args[10:16] == ["timeout", "-s", "INT", "-k", "2", "37"]
    tests = [a for a in args if a.startswith("tests/test_gpu.py::")]
    assert tests[0] == "tests/test_gpu.py::test_selftest_passes" and len(tests) == 3
    assert args[args.index("-k", 16) + 1] == "cuda"
    assert ("CACHING 1" if tool == "memcheck" else "CACHING on") in out.stdout
    env.pop("CUDA_HOME")
    none = subprocess.run(["bash", SCRIPT, "--sanitize-stage", tool, "45000"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert none.returncode == 7 and "no compute-sanitizer" in none.stdout
