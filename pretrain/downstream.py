"""keel as an lm-evaluation-harness model: downstream tasks scored on a keel GPT directly, no export.

`KeelLM` is lm-eval's `TemplateLM` over a bare KeelGPT (this rank's tensor-parallel share of its pipeline
stage) and the checkpoint's own tokenizer. `run_tasks` hands it to `lm_eval.simple_evaluate`.

Its conventions are those of lm-eval's Hugging Face backend, so that an exported folder scores the same:
- text is encoded as keel encodes a training document: with BOS first when the tokenizer's template adds
  one (Hugging Face tokenizers), without when it does not (keel's sentencepiece models);
- an empty context, and the first window of a rolling log-likelihood, is conditioned on BOS when the
  tokenizer adds one, else on EOD, which precedes every document in keel's packed data;
- generation stops at EOD or at any of the request's `until` strings; greedy unless the request samples.
Data-parallel ranks split the requests (lm-eval's rank and world size are the DP group's); the TP and PP
ranks of one replica run the same requests. Log-likelihoods run at any TP and PP: the forward is megatron's
schedule, as validation's, the last stage gathers the TP ranks' logits and sends each token's score to the
other stages. Generation (keel's KV-cache decoding) runs at any TP and needs PP = 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.errors import require_extra

require_extra("lm_eval", "eval")

from lm_eval.api.model import TemplateLM  # noqa: E402  (after the one-line check above)
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from models.config import ConfigError  # noqa: E402

NOT_METRICS = ("alias", "sample_len")  # lm-eval's per-task entries that are no score
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "until", "max_gen_toks"}  # what keel's decoding takes


class KeelLM(TemplateLM):
    """A keel GPT and its tokenizer as lm-eval's model. `group`: the data-parallel process group whose
    ranks share the requests (None: this process alone)."""

    def __init__(self, gpt: torch.nn.Module, tokenizer, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256, seed: int = 1234, group=None):
        super().__init__()
        self.gpt, self.keel_tokenizer = gpt, tokenizer
        self._max_length, self.batch_size, self._max_gen_toks = max_length, batch_size, max_gen_toks
        self._device = next(gpt.parameters()).device
        self.group = group
        if group is not None and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(group), dist.get_world_size(group)
        self.generator = torch.Generator().manual_seed(seed)  # sampled generation, the same on every TP rank
        bos = tokenizer.bos
        self.adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]

    # ---- what lm-eval asks of a model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.keel_tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.keel_tokenizer.bos if self.adds_bos else self.keel_tokenizer.eod

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.keel_tokenizer.encode(string)
        if add_special_tokens is False and self.adds_bos and ids[:1] == [self.keel_tokenizer.bos]:
            return ids[1:]
        return ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.keel_tokenizer.decode(ids)

    # ---- log-likelihoods --------------------------------------------------------------------------
    @torch.no_grad()
    def token_scores(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row, log p(row[j + 1] | row[:j + 1]) (fp32) and whether row[j + 1] is the most likely
        token, [b, longest - 1] each, on every rank of the model's replica. Rows are right-padded, which a
        causal model never sees from the real tokens. The forward is megatron's schedule, as validation's:
        at PP > 1 the batch goes through the stages in PP micro-batches, and the last stage sends the scores
        to the others."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        from models.attention.common import tp_group, tp_size
        from pretrain.trainer import run_schedule

        # 1. rows right-padded, then as many pad rows as make PP micro-batches of one size
        pp, pad = ps.get_pipeline_model_parallel_world_size(), self.keel_tokenizer.pad
        width, micro = max(map(len, rows)), -(-len(rows) // pp)
        padded = [r + [pad] * (width - len(r)) for r in rows] + [[pad] * width] * (micro * pp - len(rows))
        tokens = torch.tensor(padded, device=self.device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        positions = torch.arange(width - 1, device=self.device).expand(micro, -1)

        def forward_step(data_iterator, model):
            return model(next(data_iterator), positions, None), None  # no loss: the schedule keeps the logits

        # 2. the last stage's logits, the vocabulary-parallel shards gathered, scored against the targets
        outputs = run_schedule(self.gpt, forward_step, list(inputs.split(micro)), width - 1, micro, forward_only=True)
        scores = torch.zeros(2, *targets.shape, device=self.device)
        if ps.is_pipeline_last_stage():
            logits = torch.cat(outputs)
            if tp_size() > 1:
                logits = gather_from_tensor_model_parallel_region(logits, group=tp_group())
            logprobs = torch.log_softmax(logits[..., :self.gpt.unpadded_vocab_size].float(), dim=-1)
            scores[0] = logprobs.gather(-1, targets[..., None])[..., 0]
            scores[1] = logprobs.argmax(-1) == targets
        if pp > 1:
            dist.broadcast(scores, ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group())
        return scores[0, :len(rows)], scores[1, :len(rows)].bool()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) for each
        (key, context ids, continuation ids); the longest inputs first, batch_size rows per forward."""
        # 1. each request as one row: context + continuation, the last max_length + 1 kept
        rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logprobs, greedy = self.token_scores([rows[i] for i in batch])
            # 2. the continuation's tokens are the last ones each row predicts
            for row_logprobs, row_greedy, i in zip(logprobs, greedy, batch):
                key, _, cont = requests[i]
                end = len(rows[i]) - 1
                n = min(len(cont), end)
                out[i] = (float(row_logprobs[end - n:end].sum()), bool(row_greedy[end - n:end].all()))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in windows of max_length tokens (lm-eval's rolling windows)."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            tokens = self.tok_encode(text)
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, predicted))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations from keel's KV-cache decoding (models/inference), batched among requests that
        share their generation settings; each cut at EOD and at the first of its `until` strings."""
        from megatron.core import parallel_state as ps

        from models.inference import generate, right_pad

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise ConfigError("generation tasks need pipeline parallel size 1 (keel has no pipeline-parallel "
                              "decoding); score them with --pp 1, log-likelihood tasks at any --pp")
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            settings = self.decoding(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                budget = self.max_length - settings["max_gen_toks"]
                contexts = [self.tok_encode(requests[i].args[0])[-budget:] or [self.prefix_token_id] for i in batch]
                prompt, lengths = right_pad(contexts, pad=self.keel_tokenizer.pad, device=self.device)
                tokens = generate(self.gpt, prompt, settings["max_gen_toks"], settings["temperature"],
                                  settings["top_k"], self.generator, eos=self.eot_token_id, lengths=lengths,
                                  pad=self.keel_tokenizer.pad)
                steps = tokens.shape[1] - prompt.shape[1]
                for i, row, n in zip(batch, tokens.tolist(), lengths.tolist()):
                    out[i] = self.continuation(row[n:n + steps], settings["until"])
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def decoding(self, gen_kwargs: dict) -> dict:
        """A request's generation settings as keel's decoding takes them; one line for any it cannot honour."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unknown = sorted(set(kwargs) - SAMPLING_KEYS)
        if unknown:
            raise ConfigError(f"generation settings {unknown} are not supported by keel's decoding (it takes "
                              f"{sorted(SAMPLING_KEYS)}); remove them from the task's generation_kwargs")
        if kwargs["max_gen_toks"] >= self.max_length:
            raise ConfigError(f"max_gen_toks={kwargs['max_gen_toks']} leaves no room for a context in the model's "
                              f"{self.max_length} positions; lower the task's max_gen_toks")
        sampled = bool(kwargs["do_sample"])
        return {"max_gen_toks": kwargs["max_gen_toks"], "until": handle_stop_sequences(kwargs.get("until"), None),
                "temperature": float(kwargs.get("temperature") or 1.0) if sampled else 0.0,
                "top_k": kwargs.get("top_k") if sampled else None}

    def continuation(self, new: list[int], until: list[str]) -> str:
        """New tokens up to EOD, decoded, cut before the first stop string."""
        if self.eot_token_id in new:
            new = new[:new.index(self.eot_token_id)]
        text = self.tok_decode(new)
        for stop in until:
            text = text.split(stop)[0]
        return text

    # ---- data-parallel ranks share the requests ----------------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dist.get_global_rank(self.group, dst), group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


@dataclass
class TaskResults:
    """What lm-eval returned (on the group's first rank; None on the others) and how long it took."""

    results: dict | None
    seconds: float

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Each task's numeric metrics, flat: `{prefix}{task}/{metric}` (lm-eval's ",none" filter name dropped)."""
        flat = {}
        for task, values in (self.results or {}).get("results", {}).items():
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in NOT_METRICS:
                    name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
                    flat[f"{prefix}{task}/{name}"] = float(value)
        return flat


def task_manager(tasks: list[str]):
    """lm-eval's TaskManager: its own task index only when a task is named (indexing every one of its
    tasks takes tens of seconds); task YAML paths need none of it. A path that does not exist is one line."""
    from lm_eval.tasks import TaskManager

    paths = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError(f"task file {p} not found; pass an lm-eval task name or the path of a task YAML")
    folders = sorted({str(Path(p).parent) for p in paths}) or None
    return TaskManager(include_defaults=len(paths) < len(tasks), include_path=folders)


def run_tasks(lm: KeelLM, tasks: list[str], limit: int | float | None = None, num_fewshot: int | None = None,
              bootstrap_iters: int = 100000, manager=None, log_samples: bool = False) -> TaskResults:
    """`tasks` (lm-eval names or task YAML paths) scored by lm-eval on `lm`. lm-eval's global seeds are
    left alone: the training RNG of a run evaluated in the loop must not change."""
    import lm_eval

    t0 = time.perf_counter()
    resolved = [str(Path(t).resolve()) if t.endswith((".yaml", ".yml")) else t for t in tasks]
    results = lm_eval.simple_evaluate(
        model=lm, tasks=resolved, limit=limit, num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, task_manager=manager or task_manager(tasks), random_seed=None, numpy_random_seed=None,
        torch_random_seed=None)
    return TaskResults(results, time.perf_counter() - t0)
