"""The continual-pretraining packing experiment of keel issues 3, 16 and 30 (docs/results/packing.md): CT vs
BFD vs SP on documents mostly shorter than a row, SP without its sliding window (r = 0), BFD and SP at equal
distinct tokens, and a replay arm (issue 15): 80% new domain, 20% original data. SP packs at the paper's
overlap scaled to the row: extra capacity c = 50 L / 2048 (6 at L = 256; issue 30). Ten seeds; every
comparison is paired by seed against CT (and SP against BFD and against SP r = 0), with a 95% interval and
TOST at EQUIVALENCE_MARGIN, fixed before the runs (tools/experiments/stats.py).

Eight stages; each training stage is one multirun of pretrain/main.py per arm:
1. pack: the standard library's test files cut at their functions and methods (`stdlib:tests-defs`
   train split) packed with every method by `tools/pack.py --compare` (SP at --extra-capacity 6), and SP
   again at r = 0; the original domain (`stdlib:code` train split) packed concat for replay; and the fixed validation
   sets, the val splits of both domains packed one document piece per row (data/validation.py), at the
   paths conf/experiment/cpt_packing.yaml and cpt_replay.yaml name.
2. pretrain: one small GPT on `stdlib:code`:
       python pretrain/main.py +experiment=cpt_pretrain
3. init: the pretrained model measured on the validation set (one step at a negligible learning rate):
       python pretrain/main.py +experiment=cpt_packing run_dir=runs/cpt_packing/init trainer.max_steps=1 \
           lr.warmup_steps=0 optim.lr=1e-12 optim.weight_decay=0
4. cpt: every method and seed continued from the same pretrained weights, one Hydra multirun into
   runs/cpt_packing (the preset's hydra.sweep.dir), --jobs runs at once:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=cpt_packing \
           data.pack_method=concat,bfd,sp seed=1,2,3,4,5,6,7,8,9,10
5. replay: the replay arm from the same pretrained weights, every seed, one multirun into runs/cpt_packing/replay:
       python pretrain/main.py -m hydra/launcher=local hydra.launcher.n_jobs=2 +experiment=cpt_replay seed=1,...,10
6. ablation: SP with r = 0 (data.path=PREFIX.sp-r0), every seed.
7. distinct: SP for as many steps as give it CT's distinct corpus tokens (its duplicated and truncated
   tokens cost distinct tokens per row), from the packed sets' statistics.
8. report: every run's metrics.jsonl aggregated into JSON and a PNG: the new domain's validation loss
   (val_loss) and the original domain's (val_loss/code: forgetting) per arm, paired against CT, and each
   packed set's truncation, duplication, padding and split documents.

    python tools/experiments/cpt_experiment.py                  # every stage
    python tools/experiments/cpt_experiment.py --dry-run        # print the commands only
    python tools/experiments/cpt_experiment.py --stage report   # re-aggregate existing runs
    python tools/experiments/cpt_experiment.py --stage pretrain continual --concurrent  # stages 3-7 side by side

A training stage whose runs have all completed is skipped (--force reruns it from scratch); otherwise it
runs whole: keel resumes a killed run from its last checkpoint, and a completed run ends at once. A stage
refuses SP sets packed at another extra capacity (--stage pack repacks them).
Sequence length, validation rows and data paths come from the presets (pretrain.config.compose_config).
Equal training tokens: every continual run but the "-distinct" arms takes max_steps x global_batch_size rows
of seq_len tokens, whatever the method (rows x L, padding and SP's duplicated tokens included).
The learning rate and schedule are cpt_packing.yaml's, set before these seeds ran; nothing was tuned on them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from data.config import DataConfig
from pretrain.rundir import pyplot, write_json
from tools.experiments import ExperimentError
from tools.experiments.cli import chosen_stages, driver_parser, guarded
from tools.experiments.provenance import results_provenance
from tools.experiments.runs import NoRuns, Run, by_arm, completed, load_runs, per_seed
from tools.experiments.stages import ROOT, TrainingStage, launch, print_commands, run_stage, with_overrides
from tools.experiments.stats import paired, summarize
from tools.experiments.tables import mean_std

METHODS = ("concat", "bfd", "sp")
BASELINE = "concat"  # every arm is compared with CT, seed by seed
SP_R0 = "sp-r0"  # SP without its sliding window: tools/pack.py --method sp --overlap-ratio 0
DISTINCT = ("sp",)  # also run at CT's distinct corpus tokens (arm "sp-distinct"): SP's duplicates and
# truncation cost it distinct tokens per row; BFD's padding is too small here to change its step count
REPLAY = "replay"  # the arm trained on data.sources: new domain and replay of the original
ARMS = (*METHODS, SP_R0, *(f"{m}-distinct" for m in DISTINCT), REPLAY)
SEEDS = tuple(range(1, 11))
# SP's extra bin capacity c at the paper's share of a row: c = 50 at L = 2048 (2.4% of a row), scaled with L.
# The first re-run kept c = 50 at L = 256 (19.5% of a row), and SP truncated 8.8% of the corpus.
PAPER_EXTRA_CAPACITY, PAPER_SEQ_LEN = 50, 2048
# TOST margin (nats of final validation loss), fixed before the c-scaled runs: arms within ±0.015 of each
# other are called equivalent when both one-sided paired t-tests reject at 5% (stats.Paired.equivalence).
# 0.015 nats is 1.5% in perplexity, the paper's smallest SP-over-BFD gain on News (GPT-2: 10.28 -> 10.13,
# 0.0147 nats; Llama-1B 0.044), so equivalence here says SP does not beat BFD by as much as the paper saw
# there; it cannot rule out a gain as small as Qwen's on Med (6.47 -> 6.43, 0.006). With the first re-run's
# spread of SP - BFD (per-seed std 0.0125), 10 seeds give the 90% interval a half-width of about 0.007.
EQUIVALENCE_MARGIN = 0.015
CORPUS = "stdlib:tests-defs"  # the new domain: packed from its train split, validated on its val split
ORIGINAL = "stdlib:code"  # the pretraining domain: replayed from its train split, validated on its val split
FORGETTING = "val_loss/code"  # the original domain's validation loss (data.val_sets name "code")
INIT_RUN = "init"  # the pretrained model's validation loss, before continual pretraining
STAGES = ("pack", "pretrain", "init", "cpt", REPLAY, "ablation", "distinct", "report")  # replay first: issue 15
CONTINUAL = ("init", "cpt", REPLAY, "ablation", "distinct")  # --stage continual: they need only the pretrained model


# --- The experiment's settings, from the presets ----------------------------------------------------
@dataclass(frozen=True)
class Setup:
    data: DataConfig  # cpt_packing's (the tokenizer and its vocabulary)
    seq_len: int
    val_rows: int  # eval_batches x global_batch_size: the whole validation set, once per evaluation
    train: dict[str, Path]  # method -> packed training set (data.path)
    pack_prefix: Path  # tools/pack.py --compare --output: it writes PREFIX.<method>
    val: Path  # the split-packed validation set (data.val_path)
    pretrain_dir: Path  # cpt_packing's init_from
    cpt_dir: Path  # the continual runs' folder: run_dir's parent, and the preset's hydra.sweep.dir
    replay_train: Path  # the original domain's packed training set (cpt_replay's replay source)
    original_val: Path  # the original domain's split-packed validation set (data.val_sets "code")
    steps: int  # trainer.max_steps of every arm at equal rows

    @property
    def sp_r0(self) -> Path:
        return self.pack_prefix.with_name(f"{self.pack_prefix.name}.{SP_R0}")


def setup(methods: tuple[str, ...] = METHODS, overrides: tuple[str, ...] = ()) -> Setup:
    """The settings conf/experiment/cpt_packing.yaml gives each method, with the driver's --set overrides
    (which may change the held-out share and the validation rows, as the GPU section does)."""
    from pretrain.config import compose_config

    cfgs = {m: compose_config(["+experiment=cpt_packing", *overrides, f"data.pack_method={m}"]) for m in methods}
    train = {m: Path(cfg.data.path) for m, cfg in cfgs.items()}
    prefixes = {str(path).removesuffix(f".{m}") for m, path in train.items()}
    if len(prefixes) != 1 or any(not str(path).endswith(f".{m}") for m, path in train.items()):
        raise ExperimentError("conf/experiment/cpt_packing.yaml: data.path must be PREFIX.${data.pack_method}, "
                              f"the names tools/pack.py --compare writes; it gives {sorted(map(str, train.values()))}")
    cfg = cfgs[methods[0]]
    val_rows = cfg.trainer.eval_batches * cfg.trainer.global_batch_size
    replay = {s.name: Path(s.path) for s in compose_config(["+experiment=cpt_replay", *overrides]).data.sources}
    return Setup(data=cfg.data, seq_len=cfg.data.seq_len, val_rows=val_rows, train=train,
                 pack_prefix=Path(prefixes.pop()), val=Path(cfg.data.val_path), pretrain_dir=Path(cfg.init_from),
                 cpt_dir=Path(cfg.run_dir).parent, replay_train=replay["code"],
                 original_val=Path(next(v.path for v in cfg.data.val_sets if f"val_loss/{v.name}" == FORGETTING)),
                 steps=cfg.trainer.max_steps)


# --- The commands -------------------------------------------------------------------------------------
def extra_capacity(seq_len: int) -> int:
    """SP's bin capacity beyond L at the paper's share of a row: 50 tokens per 2048 (6 at L = 256)."""
    return max(1, round(PAPER_EXTRA_CAPACITY * seq_len / PAPER_SEQ_LEN))


def _pack(s: Setup, corpus: str, tokenizer: Path) -> list[str]:
    """tools/pack.py on a corpus's training split (data.val_percent of its files held out)."""
    return ["tools/pack.py", "--input", f"{corpus}:train", "--val-percent", f"{s.data.val_percent:g}",
            "--tokenizer", str(tokenizer), "--seq-len", str(s.seq_len), "--overwrite", "--no-progress"]


def _sp(s: Setup) -> list[str]:
    """SP's extra capacity, scaled to the row length."""
    return ["--extra-capacity", str(extra_capacity(s.seq_len))]


def pack_argv(s: Setup, tokenizer: Path) -> list[str]:
    return [*_pack(s, CORPUS, tokenizer), *_sp(s), "--compare", "--output", str(s.pack_prefix)]


def pack_replay_argv(s: Setup, tokenizer: Path) -> list[str]:
    return [*_pack(s, ORIGINAL, tokenizer), "--method", "concat", "--output", str(s.replay_train)]


def pack_sp_r0_argv(s: Setup, tokenizer: Path) -> list[str]:
    return [*_pack(s, CORPUS, tokenizer), *_sp(s), "--method", "sp", "--overlap-ratio", "0", "--output",
            str(s.sp_r0)]


def pretrain_argv() -> list[str]:
    return ["pretrain/main.py", "+experiment=cpt_pretrain"]


def init_argv(s: Setup) -> list[str]:
    # one step at a negligible learning rate: the pretrained weights, evaluated
    return ["pretrain/main.py", "+experiment=cpt_packing", f"run_dir={s.cpt_dir / INIT_RUN}", "trainer.max_steps=1",
            "lr.warmup_steps=0", "optim.lr=1e-12", "optim.weight_decay=0"]


def grid_argv(jobs: int, methods=METHODS, seeds=SEEDS) -> list[str]:
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            "+experiment=cpt_packing", f"data.pack_method={','.join(methods)}", f"seed={','.join(map(str, seeds))}"]


def ablation_argv(s: Setup, jobs: int, seeds=SEEDS) -> list[str]:
    return [*grid_argv(jobs, ("sp",), seeds), f"data.path={s.sp_r0}", f"hydra.sweep.dir={s.cpt_dir / SP_R0}"]


def distinct_steps(s: Setup, method: str) -> int:
    """Steps at which `method` sees as many distinct corpus tokens as CT does in s.steps (packing stats)."""
    per_row = {m: distinct_tokens_per_row(Path(f"{s.train[m]}.json")) for m in (BASELINE, method)}
    return math.ceil(s.steps * per_row[BASELINE] / per_row[method])


def distinct_tokens_per_row(meta: Path) -> float:
    """Corpus tokens per row, counting SP's duplicated tokens once and padding not at all."""
    if not meta.exists():
        raise ExperimentError(f"{meta} not found; run the pack stage first (--stage pack)")
    stats = json.loads(meta.read_text())["stats"]
    return (stats["content_tokens"] - stats["duplicated_share"] * stats["corpus_tokens"]) / stats["rows"]


def distinct_argvs(s: Setup, jobs: int, seeds=SEEDS) -> list[list[str]]:
    out = []
    for m in DISTINCT:
        n = distinct_steps(s, m)
        out.append([*grid_argv(jobs, (m,), seeds), f"trainer.max_steps={n}", f"checkpoint.interval={n}",
                    f"hydra.sweep.dir={s.cpt_dir / f'{m}-distinct'}"])
    return out


def replay_argv(jobs: int, seeds=SEEDS) -> list[str]:
    return ["pretrain/main.py", "-m", "hydra/launcher=local", f"hydra.launcher.n_jobs={jobs}",
            "+experiment=cpt_replay", f"seed={','.join(map(str, seeds))}"]


# --- Which runs exist ---------------------------------------------------------------------------------
def continual_runs(s: Setup) -> tuple[dict[str, dict[int, Run]], Run | None]:
    """(arm -> seed -> run, the init run or None) of the completed runs below cpt_dir."""
    runs = load_runs(s.cpt_dir)
    init = next((r for r in runs if r.name == INIT_RUN), None)
    return by_arm((r for r in runs if r.name != INIT_RUN), lambda r: arm_of(r, s.steps)), init


def arm_of(run: Run, steps: int) -> str:
    """The replay arm trains on a mixture (data.sources); the others are named by their packed set's
    suffix (concat, bfd, sp, sp-r0), plus "-distinct" when they ran longer than the `steps` of equal rows."""
    data = run.config["data"]
    if data.get("sources"):
        return REPLAY
    arm = str(data.get("path") or data["pack_method"]).rsplit(".", 1)[-1]
    return f"{arm}-distinct" if run.config.get("trainer", {}).get("max_steps", steps) > steps else arm


def arms_done(s: Setup, arms: tuple[str, ...]) -> bool:
    try:
        found, _ = continual_runs(s)
    except NoRuns:
        return False
    return all(seed in found.get(a, {}) for a in arms for seed in SEEDS)


def grid_done(s: Setup) -> bool:
    return arms_done(s, METHODS)


def grid_folders(s: Setup) -> list[Path]:
    own = {INIT_RUN, *ARMS[len(METHODS):]}  # the other stages' folders
    return [p for p in s.cpt_dir.glob("*") if p.is_dir() and p.name not in own]


def training_stages(s: Setup, jobs: int) -> dict[str, TrainingStage]:
    distinct = tuple(f"{m}-distinct" for m in DISTINCT)
    return {"pretrain": TrainingStage(lambda: [pretrain_argv()], lambda: completed(s.pretrain_dir),
                                      lambda: [s.pretrain_dir]),
            "init": TrainingStage(lambda: [init_argv(s)], lambda: completed(s.cpt_dir / INIT_RUN),
                                  lambda: [s.cpt_dir / INIT_RUN]),
            "cpt": TrainingStage(lambda: [grid_argv(jobs)], lambda: grid_done(s), lambda: grid_folders(s)),
            "ablation": TrainingStage(lambda: [ablation_argv(s, jobs)], lambda: arms_done(s, (SP_R0,)),
                                      lambda: [s.cpt_dir / SP_R0]),
            "distinct": TrainingStage(lambda: distinct_argvs(s, jobs), lambda: arms_done(s, distinct),
                                      lambda: [s.cpt_dir / a for a in distinct]),
            REPLAY: TrainingStage(lambda: [replay_argv(jobs)], lambda: arms_done(s, (REPLAY,)),
                                  lambda: [s.cpt_dir / REPLAY])}


# --- Aggregation --------------------------------------------------------------------------------------
def aggregate(curves: dict[str, dict[int, dict[int, float]]], init_loss: float | None = None) -> dict:
    """Per method: final validation loss over seeds, and the curve (mean/min/max at each step).

    ``curves[method][seed][step] = val_loss``. Only steps every seed of a method evaluated are kept.
    """
    out = {}
    for method, by_seed in curves.items():
        steps = sorted(set.intersection(*(set(c) for c in by_seed.values()))) if by_seed else []
        if not steps:
            continue
        at_step = [[c[step] for c in by_seed.values()] for step in steps]
        curve = {"step": steps, "mean": [float(np.mean(v)) for v in at_step],
                 "min": [float(np.min(v)) for v in at_step], "max": [float(np.max(v)) for v in at_step]}
        final = summarize(by_seed[seed][steps[-1]] for seed in sorted(by_seed))
        final["perplexity_of_mean"] = math.exp(final["mean"])
        out[method] = {"seeds": sorted(by_seed), "final_step": steps[-1], "final_val_loss": final, "curve": curve}
        if init_loss is not None and steps[0] != 0:  # runs that validated before step 1 hold their own step 0
            out[method]["curve_with_init"] = {k: [0 if k == "step" else init_loss] + v for k, v in curve.items()}
    ranking = sorted(out, key=lambda m: out[m]["final_val_loss"]["mean"])
    return {"methods": out, "ranking_by_mean_final_val_loss": ranking}


def collect(arms: dict[str, dict[int, Run]], init: Run | None, key: str = "val_loss") -> tuple[dict, float | None]:
    """(arm -> seed -> step -> `key`, the init run's `key`) of the runs of `continual_runs`; `key` is
    val_loss (new domain) or FORGETTING (original domain)."""
    curves = {a: {seed: run.series(key) for seed, run in arms[a].items()} for a in ARMS if a in arms}
    return {a: c for a, c in curves.items() if any(c.values())}, init.last(key) if init else None


def packing_stats(s: Setup) -> dict:
    """Per packed set: its statistics (truncation, padding, duplication, split documents), the corpus it was
    packed from, and SP's overlap ratio and extra capacity."""
    keys = ("rows", "corpus_tokens", "content_tokens", "padding_share", "duplicated_share", "truncated_share",
            "split_share", "pieces_per_row", "documents", "pieces_before_sampling")
    out = {}
    sets = [*s.train.items(), (SP_R0, s.sp_r0), ("val", s.val), (REPLAY, s.replay_train), ("original_val", s.original_val)]
    for name, prefix in sets:
        meta = Path(f"{prefix}.json")
        if meta.exists():
            m = json.loads(meta.read_text())
            out[name] = {"source": m.get("source"), **{k: m["stats"][k] for k in keys if k in m["stats"]}}
            if m.get("method") == "sp":
                out[name] |= {k: m["settings"][k] for k in ("overlap_ratio", "extra_capacity")}
    return out


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    colors = {"concat": "tab:blue", "bfd": "tab:orange", "sp": "tab:green", SP_R0: "tab:olive",
              "bfd-distinct": "tab:brown", "sp-distinct": "tab:cyan", REPLAY: "tab:red"}
    labels = {"concat": "CT", "bfd": "BFD", "sp": "SP", SP_R0: "SP r=0", "bfd-distinct": "BFD =distinct",
              "sp-distinct": "SP =distinct", REPLAY: "CT+20% replay"}
    fig, (ax, diffs, dots, forget) = plt.subplots(1, 4, figsize=(20, 4.2),
                                                 gridspec_kw={"width_ratios": [1.1, 1.1, 0.8, 1.1]})
    for i, (method, m) in enumerate(report["methods"].items()):
        c, color = m.get("curve_with_init", m["curve"]), colors.get(method)
        f = m["final_val_loss"]
        label = f"{labels.get(method, method)}: {mean_std(f['mean'], f['std'])} (n={f['n']})"
        ax.plot(c["step"], c["mean"], marker="o", ms=3, color=color, label=label)
        ax.fill_between(c["step"], c["min"], c["max"], color=color, alpha=0.2)
        if p := report.get("paired_vs_concat", {}).get(method):  # seed by seed against CT, with the 95% interval
            diffs.scatter([i] * len(p["diffs"]), p["diffs"], color=color, s=18, zorder=3)
            if p["interval95"]:
                lo, hi = p["interval95"]
                diffs.errorbar([i + 0.15], [p["mean"]], yerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="s",
                               color=color, capsize=4)
        dots.scatter([i] * f["n"], f["values"], color=color, s=18, zorder=3)
        dots.errorbar([i + 0.15], [f["mean"]], yerr=[f["std"]], fmt="s", color=color, capsize=4)
    ax.set_title("new-domain validation loss (stdlib:tests val)")
    ax.set_xlabel("continual-pretraining step (step 0: pretrained model)")
    ax.set_ylabel("validation loss (nats/token); band = min..max over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = list(report["methods"])
    diffs.axhline(0.0, color="tab:blue", lw=1)
    diffs.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    diffs.set_title("final validation loss minus CT's, per seed; mean and 95% interval")
    diffs.grid(alpha=0.3, axis="y")
    dots.set_xticks(range(len(names)), [labels.get(n, n) for n in names], fontsize=8)
    dots.set_xlim(-0.5, len(names) - 0.5)
    dots.set_title("final validation loss: seeds, mean ± std")
    dots.grid(alpha=0.3, axis="y")
    for arm, m in report.get("forgetting", {}).get("methods", {}).items():
        c = m.get("curve_with_init", m["curve"])
        forget.plot(c["step"], c["mean"], marker="o", ms=3, color=colors.get(arm), label=labels.get(arm, arm))
        forget.fill_between(c["step"], c["min"], c["max"], color=colors.get(arm), alpha=0.2)
    forget.set_title("original-domain validation loss (stdlib:code val): forgetting")
    forget.set_xlabel("continual-pretraining step")
    forget.grid(alpha=0.3)
    forget.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- The stages ---------------------------------------------------------------------------------------
def stage_pack(s: Setup, dry: bool, workers: int = 1) -> None:
    """The packed sets; `workers` (the driver's --jobs: the cores it may use) tokenize each corpus, which
    changes only the speed (tools/pack.py writes the same rows for any number)."""
    from data.prepare import ensure_tokenizer, tokenizer_path

    def packs(tokenizer: Path) -> list[list[str]]:
        return [[*argv(s, tokenizer), "--workers", str(workers)]
                for argv in (pack_argv, pack_sp_r0_argv, pack_replay_argv)]

    for argv in packs(tokenizer_path(s.data)):
        print("python " + " ".join(argv))
    validation = {CORPUS: s.val, ORIGINAL: s.original_val}
    for corpus, prefix in validation.items():
        print(f"(validation set) data.validation.pack_split_val({corpus}:val) -> {prefix}")
    if dry:
        return
    from data.corpus import stdlib_documents
    from data.validation import pack_split_val

    tokenizer = ensure_tokenizer(s.data)
    for argv in packs(tokenizer.path):
        launch(argv)
    for corpus, prefix in validation.items():
        documents = stdlib_documents(corpus.split(":")[1], "val", s.data.val_percent)
        meta = pack_split_val(documents, tokenizer, s.seq_len, prefix, s.val_rows, source=f"{corpus}:val")
        print(f"wrote {prefix} ({meta['rows']} rows of {meta['stats']['pieces_before_sampling']} pieces)")
    launch(["tools/pack.py", "--verify", *map(str, [*s.train.values(), s.sp_r0, s.replay_train, *validation.values()])])


def check_sp_capacity(s: Setup) -> None:
    """SP's packed sets hold the extra capacity this driver packs with: a set left from another c (the first
    re-run's c = 50) would otherwise train, or be reported, as this one."""
    want = extra_capacity(s.seq_len)
    for prefix in (s.train["sp"], s.sp_r0):
        meta = Path(f"{prefix}.json")
        if meta.exists() and (c := json.loads(meta.read_text())["settings"]["extra_capacity"]) != want:
            raise ExperimentError(f"{meta} was packed with SP extra capacity {c}, not {want} (50 tokens per 2048 of "
                                  "L); repack it: --stage pack")


def stage_training(name: str, s: Setup, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                   concurrent: bool = False) -> None:
    stage = training_stages(s, jobs)[name]
    if dry:  # the distinct arms' steps come from the packed sets, which may not exist yet
        print_commands(name, stage, overrides)
        return
    check_sp_capacity(s)
    run_stage(name, stage, force, launch, overrides, concurrent)


def stage_continual(s: Setup, jobs: int, dry: bool, force: bool, overrides: tuple[str, ...] = (),
                    concurrent: bool = False) -> None:
    """Every stage after pretrain (CONTINUAL) in order, or with `concurrent` the multiruns of those not done all
    at once: each needs only the pretrained model (a GPU with room for them all: tools/gpu_check.sh 42)."""
    if dry or not concurrent:
        for name in CONTINUAL:
            stage_training(name, s, jobs, dry, force, overrides)
        return
    stages = [training_stages(s, jobs)[name] for name in CONTINUAL]
    together = TrainingStage(lambda: [argv for st in stages if not st.done() for argv in st.argvs()],
                             lambda: all(st.done() for st in stages),
                             lambda: [folder for st in stages for folder in st.folders()])
    check_sp_capacity(s)
    run_stage("continual", together, force, launch, overrides, concurrent=True)


def paired_with_baseline(runs_by_arm: dict[str, dict[int, Run]], key: str, baseline: str = BASELINE,
                         arms: tuple[str, ...] = ARMS) -> dict:
    """arm -> its per-seed final `key` minus `baseline`'s, the mean, its 95% interval, TOST at
    EQUIVALENCE_MARGIN, and a verdict."""
    if baseline not in runs_by_arm:
        return {}
    final = {a: per_seed(runs, lambda r: r.last(key)) for a, runs in runs_by_arm.items()}
    return {arm: paired(final[baseline], final[arm]).as_dict(EQUIVALENCE_MARGIN)
            for arm in arms if arm in final and arm != baseline}


def commands(s: Setup, jobs: int, arms: Iterable[str], overrides: tuple[str, ...] = ()) -> list[str]:
    """The commands of the stages whose runs the report holds: the init run and each arm's multirun."""
    arms = set(arms)
    argvs = [init_argv(s), *([grid_argv(jobs)] if arms & set(METHODS) else [])]
    if SP_R0 in arms:
        argvs.append(ablation_argv(s, jobs))
    if any(a.endswith("-distinct") for a in arms):
        argvs += distinct_argvs(s, jobs)
    if REPLAY in arms:
        argvs.append(replay_argv(jobs))
    return ["python " + " ".join(with_overrides(a, overrides)) for a in argvs]


def stage_report(s: Setup, jobs: int, json_path: Path, png_path: Path, overrides: tuple[str, ...] = ()) -> dict:
    arms, init_run = continual_runs(s)  # read once: every number below comes from these runs
    check_sp_capacity(s)
    origin = results_provenance([*(r for runs in arms.values() for r in runs.values()), *filter(None, [init_run])])
    curves, init = collect(arms, init_run)
    pretrain = "python " + " ".join(with_overrides(pretrain_argv(), overrides))
    continual = commands(s, jobs, arms, overrides)  # reads the packed sets: once
    report = {"provenance": {**origin["provenance"], "experiment_commands": [pretrain, *continual]}}
    report.update(aggregate(curves, init))
    report["init_val_loss"] = init
    report["paired_vs_concat"] = paired_with_baseline(arms, "val_loss")  # the new domain: lower is better
    # the paper's own claim is SP ahead of BFD, not only of CT
    report["paired_vs_bfd"] = paired_with_baseline(arms, "val_loss", "bfd", ("sp", SP_R0, "sp-distinct"))
    report["paired_vs_sp_r0"] = paired_with_baseline(arms, "val_loss", SP_R0, ("sp",))  # what the sliding window adds
    report["forgetting"] = aggregate(*collect(arms, init_run, FORGETTING))  # the original domain, per arm
    report["forgetting"]["paired_vs_concat"] = paired_with_baseline(arms, FORGETTING)
    report["val_digests"] = origin["val_digests"]
    report["packing"] = packing_stats(s)
    report["setup"] = {
        "pretrain": pretrain,
        "continual": continual,
        "seq_len": s.seq_len, "validation_rows": s.val_rows, "seeds": list(SEEDS),
        "sp_extra_capacity": extra_capacity(s.seq_len), "equivalence_margin": EQUIVALENCE_MARGIN,
        "equal_tokens": "every continual run: max_steps x global_batch_size rows of seq_len tokens "
                        "(rows x L, padding and SP duplicates included)"}
    for name in ("cpt_pretrain", "cpt_packing", "cpt_replay"):
        p = ROOT / "conf" / "experiment" / f"{name}.yaml"
        report["setup"][f"{name}.yaml"] = p.read_text() if p.exists() else None
    res = s.pretrain_dir / "result.json"
    report["pretrain_result"] = json.loads(res.read_text()) if res.exists() else None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, report)
    if report["methods"]:
        plot(report, png_path)
    for method, m in report["methods"].items():
        f = m["final_val_loss"]
        print(f"{method:>7}: val loss {mean_std(f['mean'], f['std'])} (min {f['min']:.4f}, max {f['max']:.4f}, "
              f"n={f['n']}), ppl {f['perplexity_of_mean']:.3f}")
    for arm, m in report["forgetting"]["methods"].items():
        f = m["final_val_loss"]
        print(f"{arm:>7}: original-domain val loss {mean_std(f['mean'], f['std'])} (n={f['n']})")
    comparisons = (("concat", "val_loss", report["paired_vs_concat"]), ("bfd", "val_loss", report["paired_vs_bfd"]),
                   (SP_R0, "val_loss", report["paired_vs_sp_r0"]),
                   ("concat", FORGETTING, report["forgetting"]["paired_vs_concat"]))
    for baseline, key, pairs in comparisons:
        for arm, p in pairs.items():
            ci = f"[{p['interval95'][0]:+.4f}, {p['interval95'][1]:+.4f}]" if p["interval95"] else "no interval"
            tost = p["equivalence"]
            tost = f"; TOST ±{tost['margin']:g}: p = {tost['p_value']:.3g}, 90% [{tost['interval90'][0]:+.4f}, " \
                   f"{tost['interval90'][1]:+.4f}]" if tost else ""
            print(f"{arm:>12} - {baseline}: {key} {p['mean']:+.4f} {ci}{tost} over {len(p['seeds'])} seeds: "
                  f"{p['verdict']}")
    for arm, st in report["packing"].items():
        if "truncated_share" in st:
            c = f", r = {st['overlap_ratio']:g}, c = {st['extra_capacity']}" if "extra_capacity" in st else ""
            print(f"{arm:>12} ({', '.join(st['source']['inputs']) if st.get('source') else '?'}{c}): truncated "
                  f"{st['truncated_share']:.2%} of the corpus, duplicated {st['duplicated_share']:.2%}, padding "
                  f"{st['padding_share']:.3%} of the rows' tokens, split documents {st['split_share']:.1%}")
    print(f"init: {init}; wrote {json_path} and {png_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = driver_parser(__doc__, (*STAGES, "continual"))
    p.add_argument("--json", type=Path, default=Path("docs/results/cpt_packing.json"))
    p.add_argument("--png", type=Path, default=Path("docs/results/cpt_packing.png"))
    args = p.parse_args(argv)

    def run() -> None:
        os.chdir(ROOT)
        s = setup(overrides=tuple(args.overrides))
        for stage in chosen_stages(args, STAGES):
            if stage == "pack":
                stage_pack(s, args.dry_run, args.jobs)
            elif stage == "report":
                if not args.dry_run:
                    stage_report(s, args.jobs, args.json, args.png, args.overrides)
            elif stage == "continual":
                stage_continual(s, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)
            else:
                stage_training(stage, s, args.jobs, args.dry_run, args.force, args.overrides, args.concurrent)

    return guarded(run)


if __name__ == "__main__":
    raise SystemExit(main())
