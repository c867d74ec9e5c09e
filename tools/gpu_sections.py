"""The sections of tools/gpu_check.py: what each runs on a lent GPU, as a table of time-boxed steps.

A section is a function of the call's settings (Check) that returns a Section: its steps, each a name, a limit
and the argv PY runs from the repository root, and the folders it starts from, keeps and copies. Its
docstring says what it checks (`bash tools/gpu_check.sh --list`); tools/gpu_check.py runs them.

The claim sections (41-54; 47-49 and 50-54 split issue 38's long designs, 43 + 46 the width design) call the
experiments' drivers in tools/experiments/, whose training runs go many at once with trainer.compile=false:
their models are a few million parameters, too small to gain from compiling, and 16-18 runs compiling at once
(inductor starts min(32, cores) workers each) would spend their time box. They score at least VAL_TOKENS
validation tokens per set (44: as many as its prose source allows), holding out more of the files than the
CPU runs; the overrides that give that are queried before the section's steps (`--validation`, at most
QUERY_LIMIT seconds, outside the step budgets). Scored once, after the last step: the reports read final
losses, and thousands of small evaluation batches would cost a run more than its training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

ROOT = Path(__file__).resolve().parents[1]
QUERY_LIMIT = 60
VAL_TOKENS = 1048576
MOE_VAL_TOKENS = 262144  # section 44: what its prose source allows (its docstring says why)
SITE = "/tmp/site"  # where the carried wheels go
STEP_ENV = {"PYTHONPATH": f"{SITE}:{ROOT}", "PYTHONUNBUFFERED": "1", "KEEL_CACHE": "/tmp/keel-cache",
            "PYTHONWARNINGS": "ignore", "KEEL_DEBUG": "1", "HYDRA_FULL_ERROR": "1"}
MODEL_286M = ("+experiment=demo", "model.num_layers=24", "model.hidden_size=1024", "model.head_dim=64",
              "model.max_seq_len=1024", "data.seq_len=1024", "trainer.global_batch_size=16",
              "trainer.micro_batch_size=8")
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider")
CLAIM = ("trainer.compile=false",)  # every claim section's training runs (the module docstring says why)


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # SIGINT at limit_s x TIME_SCALE, SIGKILL KILL_GRACE seconds later
    argv: tuple[str, ...]  # run by PY from the repository root


@dataclass(frozen=True)
class Section:
    title: str
    steps: tuple[Step, ...]
    fresh: tuple[str, ...] = ()  # run folders removed first: a rerun on a warm machine trains again
    keep: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # OUT/NAME.tgz <- folders, no checkpoints
    copies: Mapping[str, str] = field(default_factory=dict)  # file -> OUT/NAME after the steps
    steps_log: Path | None = None  # None: the call's


class NoValidation(Exception):
    """A section's validation overrides could not be queried: the section is skipped."""


@dataclass
class Check:
    """One call's settings (from the environment), and what the sections ask of it."""

    env: Mapping[str, str]
    dry: bool = False  # describe the sections only: no query runs (tests/tools/test_gpu_check.py)

    def knob(self, name: str, default: str) -> str:
        return self.env.get(name) or default

    @property
    def py(self) -> str:
        return self.knob("PY", sys.executable)

    @property
    def out(self) -> Path:
        return Path(self.knob("OUT", "/tmp/keel-gpu-out"))

    @property
    def precision(self) -> str:
        return self.knob("PRECISION", "bf16")

    @property
    def rehearsal(self) -> bool:
        return self.knob("REHEARSAL", "0") == "1"

    @property
    def time_scale(self) -> float:
        return float(self.knob("TIME_SCALE", "1"))

    @property
    def steps_log(self) -> Path:
        return Path(self.knob("STEPS_LOG", str(self.out / "steps.jsonl")))

    def words(self, name: str, default: str = "") -> tuple[str, ...]:
        """A knob holding several words (extra overrides, rates, seeds)."""
        return tuple(self.knob(name, default).split())

    def validation(self, percent: int, fill: float, *overrides: str, most: int | None = None) -> tuple[str, ...]:
        """The overrides that give a preset's runs at least VAL_TOKENS validation tokens per set (`most` where
        that is fewer: what the sources hold), the same rows for every seed and arm, holding out `percent`% of the
        files; `fill`: the share of a validation row that is text (1 for concat-packed sets)."""
        if self.dry:
            return f"data.val_percent={percent}", "trainer.eval_batches=1", "trainer.eval_interval=1"
        tokens = int(self.knob("VAL_TOKENS", str(VAL_TOKENS)))  # a CPU trial may score fewer
        tokens = str(min(tokens, most) if most else tokens)
        argv = [self.py, "-m", "tools.gpu_check", "--validation", tokens, str(percent), str(fill), *overrides]
        try:
            proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **STEP_ENV}, capture_output=True, text=True,
                                  timeout=QUERY_LIMIT)
        except subprocess.TimeoutExpired:
            raise NoValidation(f"no validation overrides for {' '.join(overrides)} in {QUERY_LIMIT}s") from None
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines:
            raise NoValidation(f"no validation overrides for {' '.join(overrides)}: {proc.stderr.strip()[-500:]}")
        return tuple(lines[-1].split())


# --- The sections -----------------------------------------------------------------------------------------
def section_triage(c: Check) -> Section:
    """everything pending on a GPU in one call of at most 9 minutes, run before any other section until it has
    run once: the GPU-only tests (compiled decode kernel, CUDA-graph steps, compiled layers), decoding at batch
    32 x 16k for GQA, MQA, GTA, GLA and MLA (Triton; SDPA for GQA and MQA, with the backend that ran), the 755M
    step against compiled plain PyTorch and a torch.profiler summary of it; $OUT/triage.json and
    $OUT/triage.md (a section for BENCHMARKS.md) collect it all. REHEARSAL=1 runs the same steps at CPU shapes."""
    t, preset = c.out / "triage", "755M"
    shapes = ("--preset", "memory-bound", "--batch", "32", "--contexts", "16384", "--device", "cuda", "--dtype", "bf16")
    if c.rehearsal:
        preset, shapes = "cpu", ("--batch", "2", "--contexts", "64", "--device", "cpu", "--dtype", "fp32")
    precision = f"trainer.precision={c.precision}"
    return Section("triage: GPU-only tests, decoding at batch 32 x 16k, the 755M step against compiled plain "
                   "PyTorch, its profile", steps_log=t / "steps.jsonl", steps=(
        Step("versions", 10, ("tools/triage_report.py", "--versions", str(c.out))),
        # 1. what only a GPU runs: the compiled decode kernel, CUDA-graph steps, compiled layers with block masks
        Step("GPU-only tests", 130, (*PYTEST, f"--junitxml={t / 'tests.xml'}", "tests/models/test_decode_kernels.py",
                                     "tests/models/test_decode.py", "tests/pretrain/test_compile.py")),
        # 2. decoding where reading the cache is the cost: the Triton kernel for five types, then torch's SDPA
        Step("decode", 85, ("tools/bench_decode.py", *shapes, "--steps", "10", "--types", "gqa", "mqa", "gta", "gla",
                            "mla", "--save", str(t / "decode.json"))),
        Step("decode sdpa", 30, ("tools/bench_decode.py", *shapes, "--steps", "10", "--types", "gqa", "mqa",
                                 "--kernel", "sdpa", "--save", str(t / "decode_sdpa.json"))),
        # 3. the step at 755M against compiled plain PyTorch, then where keel's step spends its time
        Step("step", 115, ("tools/bench_step.py", "--preset", preset, "--steps", "8", "--json", str(t / "step.json"),
                           precision)),
        Step("profile", 70, ("tools/profile_step.py", "--preset", preset, "--steps", "3", "--json",
                             str(t / "profile.json"), precision)),
        Step("report", 10, ("tools/triage_report.py", str(c.out)))))


def section_10(c: Check) -> Section:
    """install and smoke: versions, then megatron-core's GPTModel with megatron DDP, the distributed optimizer
    and bf16 training the smoke model"""
    return Section("10. smoke: megatron-core GPTModel + DDP + distributed optimizer, bf16", fresh=("/tmp/runs/smoke",),
                   steps=(
        Step("smoke", 120, ("pretrain/main.py", "+experiment=smoke", "run_dir=/tmp/runs/smoke",
                            "optim.distributed=true", f"trainer.precision={c.precision}", "trainer.max_steps=30",
                            "trainer.progress=false")),
        Step("smoke losses", 15, ("-m", "tools.gpu_check", "--run-summary", "/tmp/runs/smoke")),
        Step("tests", 150, (*PYTEST, "tests/pretrain/test_cpu_compat.py", "tests/models/test_gpt.py"))))


def section_20(c: Check) -> Section:
    """step speed: compiled against eager losses, then keel vs plain PyTorch (eager and compiled): ms,
    tokens/s, MFU and peak memory at 286M and 755M, and the monitors' cost"""
    precision = f"trainer.precision={c.precision}"
    return Section("20. step speed: compiled against eager losses (20 steps, bf16), then keel against plain PyTorch "
                   "eager and compiled, with the monitors' cost (286M, 755M)", steps=(
        Step("compile test", 75, (*PYTEST, "tests/pretrain/test_compile.py")),
        Step("step 286M", 95, ("tools/bench_step.py", "--preset", "286M", "--steps", "8", precision)),
        Step("step 755M", 115, ("tools/bench_step.py", "--preset", "755M", "--steps", "8", precision))))


def section_21(c: Check) -> Section:
    """checkpoints: synchronous against background (checkpoint.async_save) saves"""
    return Section("21. checkpoints: how long a synchronous and a background save hold training up (286M)", steps=(
        Step("checkpoint saves", 240, ("tools/bench_checkpoint.py", "--saves", "3", *MODEL_286M)),))


def section_22(c: Check) -> Section:
    """step speed at about 1.5B parameters, and the monitors' parts at 286M"""
    return Section("22. step speed at about 1.5B parameters (one GPU: bf16 weights, fp32 main parameters and Adam), "
                   "and the monitors' parts (286M)", steps=(
        Step("step 1.5B", 195, ("tools/bench_step.py", "--preset", "1.5B", "--steps", "6",
                                f"trainer.precision={c.precision}")),
        Step("monitors", 95, ("tools/profile_monitor.py", *MODEL_286M))))


def section_30(c: Check) -> Section:
    """decoding: the split-K Triton kernel and the CUDA-graph step against the PyTorch path, then tokens/s and
    HBM bandwidth per attention type (bench_decode.py --preset memory-bound)"""
    bench = ("tools/bench_decode.py", "--preset", "memory-bound", "--device", "cuda", "--dtype", "bf16", "--steps",
             "10")
    return Section("30. decoding: kernel checks, then tokens/s and HBM bandwidth at 4 x 2048, batch 32 then 64, "
                   "4k-32k, bf16", steps=(
        # from a cold cache: about 30 Triton specialisations, 12 CUDA-graph captures and 45 model builds
        Step("decode tests", 120, (*PYTEST, "tests/models/test_decode_kernels.py", "tests/models/test_decode.py")),
        # rows print as measured (batch 32 first), so a cut-off run still logs the batch-32 figures
        Step("decode", 140, bench),
        # torch's own SDPA for grouped heads, against the Triton kernel above, at the point
        Step("decode sdpa", 25, (*bench, "--types", "gqa", "mqa", "--batch", "32", "--contexts", "16384",
                                 "--kernel", "sdpa"))))


def section_40(c: Check) -> Section:
    """experiments: MoE on the alltoall dispatcher, the spectral bound and monitors, the demo (bf16)"""
    return Section("40. experiments in bf16: MoE on the alltoall dispatcher, the spectral bound with monitors, the "
                   "demo", fresh=("/tmp/runs/moe", "/tmp/runs/spec", "/tmp/runs/demo"),
                   copies={"/tmp/runs/moe/metrics.jsonl": "moe_metrics.jsonl",
                           "/tmp/runs/demo/metrics.jsonl": "demo_metrics.jsonl"}, steps=(
        Step("moe", 105, ("pretrain/main.py", "+experiment=moe_specialization", "run_dir=/tmp/runs/moe",
                          "model.moe.ortho_loss=0.1", "model.moe.var_loss=0.1", "trainer.max_steps=40",
                          "trainer.eval_interval=20", "trainer.progress=false")),
        Step("spectral", 65, ("pretrain/main.py", "+experiment=smoke", "run_dir=/tmp/runs/spec",
                              "optim.spectral.enabled=true", "logging.monitors.interval=5", "trainer.progress=false")),
        Step("demo", 115, ("pretrain/main.py", "+experiment=demo", "run_dir=/tmp/runs/demo",
                           "trainer.progress=false"))))


def section_41(c: Check) -> Section:
    """warmup-free claim (docs/results/warmup_free.md) in bf16: AdamW, AdamW + warmup 120 and the spectral bound
    (τ 0.05, the CPU's choices) at lr 1e-2 and 3e-2 on the reported seeds 1-3, all 18 runs at once on the GPU
    (tools/experiments/warmup_free_experiment.py), then the paired report. WF_LRS, WF_SEEDS, WF_STEPS and
    WF_JOBS shrink it to try it on a CPU first."""
    steps = c.knob("WF_STEPS", "300")
    val = c.validation(15, 1, "+experiment=warmup_free_adamw_warmup", f"trainer.max_steps={steps}")
    driver = ("tools/experiments/warmup_free_experiment.py", "--warmup", "120", "--tau", "0.05",
              "--lrs", *c.words("WF_LRS", "1e-2 3e-2"), "--seeds", *c.words("WF_SEEDS", "1 2 3"))
    runs = ("--set", f"trainer.precision={c.precision}", *CLAIM, *val,
            *((f"trainer.max_steps={steps}",) if steps != "300" else ()))  # 300: the presets' (folder names stay short)
    return Section("41. warmup-free in bf16: AdamW, AdamW + warmup 120, the spectral bound (τ 0.05) at lr 1e-2 and "
                   "3e-2, seeds 1-3", keep={"warmup_free_runs": ("runs/warmup_free",)}, steps=(
        Step("runs", 230, (*driver, "--stage", "reported", "--concurrent", "--jobs", c.knob("WF_JOBS", "12"), *runs)),
        Step("report", 60, (*driver, "--stage", "report", "--out", str(c.out), "--name", "warmup_free_gpu"))))


def section_42(c: Check) -> Section:
    """packing claim (docs/results/packing.md) in bf16: the CPU's driver and presets, every arm and seed (CT,
    BFD, SP, SP at r = 0, SP at CT's distinct tokens, replay; seeds 1-10), then the paired report. Every
    training run in bf16, PACK_JOBS of them at once on the GPU; PACK_SET (overrides for every run) and PACK_JOBS
    shrink it to try it on a CPU first (a trainer.max_steps there also shortens the distinct arm, which the
    report then takes for SP)."""
    # 30% of the files held out: each domain's split then holds 1M tokens of text (5% holds 275k and 106k); a
    # validation row is one document piece, on the CPU about half text and half padding
    val = c.validation(30, 0.45, "+experiment=cpt_packing")
    driver = ("tools/experiments/cpt_experiment.py", "--jobs", c.knob("PACK_JOBS", "16"), "--set",
              f"trainer.precision={c.precision}", *CLAIM, *val, *c.words("PACK_SET"))
    return Section("42. packing in bf16: CT, BFD, SP, SP at r = 0, SP at CT's distinct tokens and replay, seeds "
                   "1-10, one pretrained model", keep={"packing_runs": ("runs/cpt_pretrain", "runs/cpt_packing")},
                   steps=(
        Step("pack", 95, (*driver, "--stage", "pack")),
        # every stage after pretrain needs only the pretrained model: they run side by side
        Step("training", 165, (*driver, "--stage", "pretrain", "continual", "--concurrent")),
        Step("report", 25, (*driver, "--stage", "report", "--json", str(c.out / "packing_gpu.json"), "--png",
                            str(c.out / "packing_gpu.png")))))


def _width(c: Check) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sections 43 and 46: (the validation overrides, the width driver with every run's overrides)."""
    val = c.validation(15, 1, "+experiment=width_sweep")
    return val, ("tools/experiments/width_experiment.py", "--concurrent", "--jobs", c.knob("WIDTH_JOBS", "4"),
                 "--set", f"trainer.precision={c.precision}", *CLAIM, *val, *c.words("WIDTH_SET"))


def section_43(c: Check) -> Section:
    """width claim (docs/results/width_scaling.md) in bf16, part 1 of 2 (run `43 46` in one call): the LR grid
    at widths 32-512 on seeds 1-3, widened until every optimum is bracketed, then the fit. One multirun per
    width, all at once, WIDTH_JOBS runs each. The driver resumes from the runs on disk, so section 46 finishes
    what this one's time box cut off. WIDTH_SET and WIDTH_JOBS shrink it to try it on a CPU first."""
    val, driver = _width(c)
    return Section("43. width in bf16 (1 of 2): the LR grid at widths 32-512, seeds 1-3, widened until every "
                   "optimum is bracketed", steps=(
        Step("prepare", 45, ("-m", "tools.gpu_check", "--prepare", "+experiment=width_sweep", *val)),
        Step("grid", 215, (*driver, "--stage", "grid")),
        Step("fit", 25, ("tools/experiments/width_experiment.py", "--stage", "fit"))))


def section_46(c: Check) -> Section:
    """width claim, part 2 of 2: the grid finished if 43 ran out of time, the fit, the transfer to width 768 on
    seeds 4-6 (the fitted rule and 0.42 against an LR search), then the paired report"""
    _, driver = _width(c)
    return Section("46. width in bf16 (2 of 2): the grid's rest, the fit, the transfer to width 768 on seeds 4-6, "
                   "the report", keep={"width_runs": ("runs/width",)}, steps=(
        Step("grid", 65, (*driver, "--stage", "grid")),
        Step("fit", 25, (*driver, "--stage", "fit")),
        Step("transfer", 145, (*driver, "--stage", "transfer")),
        Step("report", 45, (*driver, "--stage", "report", "--out", str(c.out), "--name", "width_gpu"))))


def section_44(c: Check) -> Section:
    """MoE claim (docs/results/moe.md) in bf16: pretrain with the auxiliary loss only, continue it with aux only,
    + L_o, + L_v and + both at the β and γ the CPU's tuning seeds chose apart (docs/results/moe.json, not chosen
    again), seeds 1-5 at once, paired report. Its validation sets are as large as issue 37's prose source
    allows, not VAL_TOKENS: at 30% of the names held out, val_loss's set scores MOE_VAL_TOKENS (262k tokens,
    2x the CPU's), code-nodoc's as many, and prose's the 72 whole batches its held-out side holds (147k tokens).
    The driver's rule (moe_experiment.check_validation_rows) that a source's set hold at least half the rows
    val_loss scores caps it: measured on 2026-12-07 with Python 3.12.1's standard library, the 30% split holds
    1165 prose rows of 128 tokens (149k), 6888 code-nodoc rows (882k) and 8052 mixed (1.03M), so at most 2330
    rows (145 batches, 297k tokens); MOE_VAL_TOKENS keeps 12% under that for another Python's standard library,
    and the pack step refuses in one line if one holds fewer. Holding out more of prose would leave it too little
    to train on (30% leaves 483k training tokens, repeated about 2.5 times in pretraining).
    MOE_PRETRAIN_STEPS, MOE_STEPS and MOE_SET (overrides for every run) shrink it to try it on a CPU first."""
    pre_steps, steps = c.knob("MOE_PRETRAIN_STEPS", "1200"), c.knob("MOE_STEPS", "500")
    pre = c.validation(30, 1, "+experiment=moe_pretrain", f"trainer.max_steps={pre_steps}", most=MOE_VAL_TOKENS)
    cont = c.validation(30, 1, "+experiment=moe_continue", f"trainer.max_steps={steps}", most=MOE_VAL_TOKENS)
    driver = ("tools/experiments/moe_experiment.py", "--coeffs-from", "docs/results/moe.json")
    runs = (f"trainer.precision={c.precision}", *CLAIM, *c.words("MOE_SET"))
    return Section("44. MoE in bf16: pretrain (aux loss only), then aux only, + L_o, + L_v, + both (β and γ from "
                   "docs/results/moe.json) on seeds 1-5", keep={"moe_runs": ("runs/moe_pretrain", "runs/moe_continue")},
                   steps=(
        Step("pack", 65, (*driver, "--stage", "pack", "--set", *pre)),
        Step("pretrain", 75, (*driver, "--stage", "pretrain", "--set", *runs, *pre, f"trainer.max_steps={pre_steps}",
                              f"checkpoint.interval={pre_steps}")),
        Step("continue", 105, (*driver, "--stage", "continue", "--concurrent", "--jobs", "3", "--set", *runs, *cont,
                               f"trainer.max_steps={steps}")),
        Step("report", 35, (*driver, "--stage", "report", "--out", str(c.out), "--name", "moe_gpu", "--set", *cont))))


def _attention(c: Check, preset: str, *flags: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sections 45 and 47-49: (the validation overrides of `preset`, the attention driver with `flags` and every
    run's overrides)."""
    val = c.validation(15, 1, f"+experiment={preset}")
    return val, ("tools/experiments/attention_experiment.py", *flags, "--set", f"trainer.precision={c.precision}",
                 *CLAIM, *val, *c.words("ATTN_SET"))


def section_45(c: Check) -> Section:
    """GTA/GLA claim (docs/results/attention.md) in bf16: six types at head dim 128, the LR tuned per type on
    seed 100, every type at its rate on seeds 1-3, then the paired report. The CPU's driver and preset, ATTN_JOBS
    runs at once per multirun (the compare stage's multiruns, one per chosen rate, all at once); ATTN_SET and
    ATTN_JOBS shrink it to try it on a CPU first."""
    val, driver = _attention(c, "attention_d128", "--concurrent", "--jobs", c.knob("ATTN_JOBS", "18"))
    return Section("45. GTA/GLA in bf16: six types at head dim 128, LR tuned per type on seed 100, then seeds 1-3 at "
                   "each type's rate", keep={"attention_runs": ("runs/attention_d128",)}, steps=(
        Step("prepare", 55, ("-m", "tools.gpu_check", "--prepare", "+experiment=attention_d128", *val)),
        Step("tune", 105, (*driver, "--stage", "tune")),
        Step("choice", 10, (*driver, "--stage", "report-choice")),
        Step("compare", 85, (*driver, "--stage", "compare")),
        Step("report", 20, (*driver, "--stage", "report", "--out", str(c.out), "--name", "attention_gpu"))))


ATTENTION_LONG_PARTS = 3  # sections 47-49
WARMUP_LONG_PARTS = 5  # sections 50-54


def _long_parts(part: int, parts: int, prepare: tuple[str, ...], tune: tuple[str, ...],
                training: tuple[str, ...], report: tuple[str, ...]) -> tuple[Step, ...]:
    """The steps of part `part` of a design split over `parts` sections: the first prepares the packed sets and
    tunes; each later one runs every training stage in order (the driver skips a finished stage at once and
    resumes an unfinished one); the last one then reports."""
    if part == 1:
        return Step("prepare", 45, prepare), Step("tune", 245, tune)
    if part < parts:
        return (Step("training", 290, training),)
    return Step("training", 235, training), Step("report", 50, report)


def _part(part: int, parts: int) -> str:
    what = "prepare, tune" if part == 1 else "the training stages resumed" + (", report" if part == parts else "")
    return f"{part} of {parts}: {what}"


def section_attention_long(c: Check, part: int) -> Section:
    """Issue 38's registered attention design (preregistration.ATTENTION_LONG, docs/preregistration.md) in bf16,
    in ATTENTION_LONG_PARTS consecutive sections (47-49): GQA, GTA, GLA, MLA with and without QK-norm at 480
    steps, each rate chosen on tuning seeds 100 and 101 from 5e-4, 1e-3, 2e-3 (extended past an edge, at most
    twice), then every arm on seeds 1-15 and the report's TOST at the registered 0.03 nats. The CPU's driver
    (`--design long`) and preset; its multiruns one after another, ATTN_JOBS (15) runs at once each: the tune
    stage is one multirun of 30 runs, and each arm's 15 seeds fill one wave of the compare stage.
    Estimate, never run on a GPU: a step of these 2-layer models is bound by the host (Python, kernel launches),
    about 60 ms with 15 runs at once on 16 cores; with a run's start (about 25 s) and its one evaluation of 1M
    tokens (512 batches, about 10 s), a wave of 15 runs takes about 65 s. Tune: 2 waves; each extension round
    (at most 2) starts the grid's finished runs again too, which end at once after their start: about 2 minutes
    a round; compare: 5 waves (75 runs); 8-13 minutes in all, three sections with the prepare and report. 47
    prepares and tunes; 48 and 49 run the training stages in order, each resumed where the last box cut it off
    (a finished stage is skipped at once, a run resumes from its last checkpoint, every 120 steps); 49 then
    reports. If 49's box ends before the compare stage does, run 49 again.
    Each section keeps the run folders ($OUT/attention_long_runs.tgz, without checkpoints): a later call on a
    fresh machine resumes only from them, unpacked at the repository root and carried (runs/attention_d128_long;
    a run cut off there starts again). ATTN_SET (overrides for every run) and ATTN_JOBS shrink it to try it on a
    CPU first; the arms, rates and seeds are the registered ones, with no knob."""
    val, driver = _attention(c, "attention_d128_long", "--design", "long", "--jobs", c.knob("ATTN_JOBS", "15"))
    steps = _long_parts(part, ATTENTION_LONG_PARTS, ("-m", "tools.gpu_check", "--prepare",
                                                     "+experiment=attention_d128_long", *val),
                        (*driver, "--stage", "tune"), (*driver, "--stage", "tune", "report-choice", "compare"),
                        (*driver, "--stage", "report", "--out", str(c.out), "--name", "attention_long_gpu"))
    return Section(f"{46 + part}. attention, issue 38's long design in bf16 ({_part(part, ATTENTION_LONG_PARTS)}): "
                   "GQA, GTA, GLA, MLA with and without QK-norm, 480 steps, seeds 1-15",
                   keep={"attention_long_runs": ("runs/attention_d128_long",)}, steps=steps)


def section_warmup_long(c: Check, part: int) -> Section:
    """Issue 38's registered warmup-free design (preregistration.WARMUP_LONG, docs/preregistration.md) in bf16, in
    WARMUP_LONG_PARTS consecutive sections (50-54): 3000 steps; on tuning seeds 100 and 101 AdamW + warmup's
    length (30-1000) and the bound's τ (0.02-0.2) at lr 1e-2 and AdamW without warmup's rate (1e-3-1e-2), then
    the rate at the chosen length and τ (3e-3-3e-2), each grid extended past an edge at most twice; then each
    method at its choice on seeds 1-10 and the report's TOST at the registered 0.02 nats. The CPU's driver
    (`--design long`: its --lrs, --seeds, --warmup and --tau do not apply) and presets; a stage's multiruns at
    once, WF_JOBS (10) runs each (22 runs at once in tune, 30 in reported).
    Estimate, never run on a GPU: a step of this 4-layer model is bound by the host, about 60 ms with up to 16
    runs at once on 16 cores (more at once share the cores); with a run's start (about 25 s) and its one
    evaluation of 1M tokens (about 10 s) a wave of up to 16 runs of 3000 steps takes about 215 s. Tune: 22 runs,
    about 300 s; tune-lr: 8 new runs, one wave; reported: 30 runs, two waves' time; each extension round (at
    most two per grid) one wave more: about 23 minutes with one round for tune and one for tune-lr, 31 at the
    most: five sections. 50 prepares and tunes; 51-54 run the training stages in order, each resumed where the
    last box cut it off (a finished stage is skipped at once, a run resumes from its last checkpoint, every 250
    steps); 54 then reports. If 54's box ends before the reported stage does, run 54 again. Each section keeps
    the run folders ($OUT/warmup_free_long_runs.tgz, without checkpoints): a later call on a fresh machine
    resumes only from them, unpacked at the repository root and carried (runs/warmup_free_long; a run cut off
    there starts again). WF_SET (overrides for every run) and WF_JOBS shrink it to try it on a CPU first; the
    grids and seeds are the registered ones, with no knob. A run folder is named by its overrides, in at most 255
    bytes: about 215 here, so a trial's WF_SET names little more than trainer.max_steps."""
    preset = "warmup_free_long_adamw_warmup"
    val = c.validation(15, 1, f"+experiment={preset}")
    driver = ("tools/experiments/warmup_free_experiment.py", "--design", "long", "--concurrent", "--jobs",
              c.knob("WF_JOBS", "10"), "--set", f"trainer.precision={c.precision}", *CLAIM, *val, *c.words("WF_SET"))
    steps = _long_parts(part, WARMUP_LONG_PARTS, ("-m", "tools.gpu_check", "--prepare", f"+experiment={preset}", *val),
                        (*driver, "--stage", "tune"), (*driver, "--stage", "tune", "tune-lr", "reported"),
                        (*driver, "--stage", "report", "--out", str(c.out), "--name", "warmup_free_long_gpu"))
    return Section(f"{49 + part}. warmup-free, issue 38's long design in bf16 ({_part(part, WARMUP_LONG_PARTS)}): "
                   "AdamW, AdamW + warmup, the spectral bound, 3000 steps, seeds 1-10",
                   keep={"warmup_free_long_runs": ("runs/warmup_free_long",)}, steps=steps)


SECTIONS: dict[str, Callable[[Check], Section]] = {
    "triage": section_triage, "10": section_10, "20": section_20, "21": section_21, "22": section_22,
    "30": section_30, "40": section_40, "41": section_41, "42": section_42, "43": section_43, "44": section_44,
    "45": section_45, "46": section_46,
    **{str(46 + part): partial(section_attention_long, part=part) for part in range(1, ATTENTION_LONG_PARTS + 1)},
    **{str(49 + part): partial(section_warmup_long, part=part) for part in range(1, WARMUP_LONG_PARTS + 1)}}
