"""Training loop shared by `ltr train-predictor` and the quality benchmark.

One step = one (or more) lists of `list_size` random training prompts; the objective picks the loss:
ListMLE on the list (ours), MSE on standardised log length (pointwise baseline) or cross-entropy over
10 length buckets (S3-style baseline). The model is selected on validation Kendall's tau.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ltr.predictor.evaluate import ranking_report
from ltr.predictor.losses import known_pairs_loss, listmle_loss, risk_set_loss
from ltr.predictor.model import PredictorConfig, RankPredictor, fit_calibration

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """What the predictor learns from: the prompt text and the length of the answer it got."""

    prompt: str
    prompt_len: int   # SmolLM2 tokens (prompt-length baseline)
    output_len: int   # SmolLM2 tokens (label)
    #: Served traffic: the answer was cut (max_tokens, abort), so output_len is a lower bound.
    censored: bool = False


@dataclass
class ExampleSplits:
    train: list[Example]
    val: list[Example]
    test: list[Example]


@dataclass
class TrainConfig:
    """Optimisation settings (the model's own shape lives in `PredictorConfig`)."""

    epochs: int = 8
    list_size: int = 64
    lists_per_step: int = 1
    lr: float = 5e-4           # LoRA adapters / backbone (use ~5e-5 for a full fine-tune)
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.06
    patience: int = 3          # epochs without a better validation tau before stopping
    seed: int = 0
    device: str = "cpu"
    limit_train: int = 0       # first N training examples only (0 = all); for smoke tests
    censored: str = "lower-bound"   # served traffic: how an answer cut at max_tokens trains (CENSORING_RULES)
    #: Also try the mean of the weights at every epoch's end (a small noisy log: epochs tie on validation and
    #: each overfits its own way); kept where it ranks validation better than the best epoch.
    average_epochs: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_censoring_rule(self.censored)


def load_examples(data_dir: Path | None = None) -> ExampleSplits:
    """The conversation-disjoint ShareGPT splits: from `ltr.data`, or from {train,val,test}.jsonl traces."""
    if data_dir is None:
        from ltr.data import load_pairs, split_pairs

        splits = split_pairs(load_pairs())
        conv = lambda ps: [Example(p.prompt, p.prompt_len, p.output_len) for p in ps]  # noqa: E731
        return ExampleSplits(conv(splits.train), conv(splits.val), conv(splits.test))
    from ltr.data import read_trace

    parts = {}
    for name in ("train", "val", "test"):
        rows = read_trace(Path(data_dir) / f"{name}.jsonl")
        parts[name] = [Example(r["prompt"], int(r["prompt_len"]), int(r["output_len"])) for r in rows]
    return ExampleSplits(**parts)


def load_turn_examples(tokenizer: Any, max_length: int, limit_train: int = 0) -> tuple[ExampleSplits, str]:
    """Every clean ShareGPT turn (`ltr.data.conversations`: hygiene and the conversation-disjoint split),
    as `turn_examples` renders it, and the served model's chat template, which the artifact must carry
    to render requests the same way. `limit_train`: render only the first N training turns."""
    from transformers import AutoTokenizer

    from ltr.data.conversations import load_turns, split_turns
    from ltr.models import prepare_model

    splits, _ = split_turns(load_turns())
    served = AutoTokenizer.from_pretrained(prepare_model())
    render = partial(turn_examples, served_tokenizer=served, tokenizer=tokenizer, max_length=max_length)
    train = splits.train[:limit_train] if limit_train else splits.train
    return ExampleSplits(render(train), render(splits.val), render(splits.test)), served.chat_template


def turn_examples(turns: Sequence[Any], served_tokenizer: Any, tokenizer: Any, max_length: int) -> list[Example]:
    """Each turn's input rendered as the server renders that chat (`render.chat_input`: the served model's
    chat template over the history, cut from the left to `max_length` tokens of the predictor's
    `tokenizer`); `prompt_len` is the user turn's length in served-model tokens."""
    from ltr.predictor.render import chat_input

    template = served_tokenizer.chat_template
    prompt_ids = served_tokenizer([t.prompt for t in turns], add_special_tokens=False)["input_ids"] if turns else []
    return [Example(chat_input(t.messages(), template, tokenizer, max_length), len(ids), t.output_len)
            for t, ids in zip(turns, prompt_ids)]


def as_one_message_chats(examples: Sequence[Example], render: Callable[[list], str]) -> list[Example]:
    """First-turn prompts as the chat endpoint receives them (one user message), rendered by `render`: how a
    chat-template artifact is compared on today's first-turn test set."""
    return [replace(e, prompt=render([{"role": "user", "content": e.prompt}])) for e in examples]


#: How an answer cut at max_tokens trains: as its observed length (a tie at the cap with the other cut
#: ones), left out, or as a lower bound: in the risk sets of `risk_set_loss`, or in the known pairs of
#: `known_pairs_loss` (these two: ListMLE objective only, whose one-score head they train).
CENSORING_RULES = ("lower-bound", "drop", "risk-set", "known-pairs")
_CENSOR_AWARE_LOSSES = {"risk-set": risk_set_loss, "known-pairs": known_pairs_loss}


def _check_censoring_rule(rule: str) -> None:
    if rule not in CENSORING_RULES:
        raise ValueError(f"censored must be one of {', '.join(CENSORING_RULES)}, not {rule!r}")


#: Served-log records that are no label at all: the client or the server ended them, not the model or its cap.
_NOT_LABELS = ("abort", "error")


def served_slice(sha256: str) -> float:
    """Where a prompt falls in [0, 1), from its hash: the same prompt always lands in the same split."""
    return int(sha256[:13], 16) / 16**13


def record_slice(record: Any) -> float:
    """Where a served-log record falls: by its conversation's hash, so that every turn of a conversation,
    scored or not, lands in one slice; in logs from before that was recorded, by its input hash (a request
    the predictor did not score was logged by its last user message, not by what the predictor reads, and
    could fall elsewhere than the conversation's scored turns), or its text's where the log has none."""
    from ltr.data.served_log import text_sha256

    return served_slice(record.conversation_sha256 or record.input_sha256 or text_sha256(record.text))


def load_served_examples(log: Path, censored: str = "lower-bound", holdout: float = 0.2,
                         val_fraction: float = 0.1,
                         read_chat: Callable[[list[dict[str, str]]], str] | None = None) -> ExampleSplits:
    """Splits of a served-traffic log (`ltr.data.served_log`) by conversation (`record_slice`): test = the first
    `holdout`, val = the next `val_fraction` (model selection, calibration), train = the rest.

    A chat logged with its messages is read through `read_chat` (the renderer of the artifact being trained
    or evaluated, `RankPredictor.chat_input`), so that it trains and is scored on what that artifact reads
    when serving it, whatever the served artifact read or if none scored it; other records by their text.

    The test slice keeps every record (its tau is censor-aware). In train and val an answer the model
    ended is an exact label; one cut at max_tokens (or by vLLM's repetition check) is a lower bound,
    used as its observed length with `censored="lower-bound"` (right in rank against every shorter
    exact answer, and exact when all requests share one max_tokens), kept as a lower bound with
    "risk-set" or "known-pairs" (the training loss then uses it as one) or left out with "drop"; aborted
    and failed requests are left out of both.
    """
    from ltr.data.served_log import read_served_log

    _check_censoring_rule(censored)
    if not (0 < holdout < 1 and 0 < val_fraction < 1 and holdout + val_fraction < 1):
        raise ValueError(f"holdout ({holdout}) and val_fraction ({val_fraction}) must be in (0, 1), sum < 1")
    parts: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    records = without_text = 0
    for record in read_served_log(log):
        records += 1
        if record.text is None:
            without_text += 1
            continue
        where = record_slice(record)
        text = read_chat(record.messages) if read_chat is not None and record.messages else record.text
        example = Example(text, record.prompt_tokens, record.output_tokens, record.censored)
        if where < holdout:
            parts["test"].append(example)
        elif record.finish_reason in _NOT_LABELS or (record.censored and censored == "drop"):
            continue
        else:
            parts["val" if where < holdout + val_fraction else "train"].append(example)
    if records and without_text == records:
        raise ValueError(f"{log}: the served-traffic log has only hashes of the predictor's input, no text "
                         f"({records} records); training and evaluation need the rendered text, which is "
                         "logged only when the operator opts in (ingress setting `log_text: true`)")
    if not records:
        raise ValueError(f"{log}: the served-traffic log has no records")
    return ExampleSplits(**parts)


def write_truncated_splits(out_dir: Path, max_length: int = 512, backbone_path: Path | None = None) -> Path:
    """Write the splits as traces whose prompts are cut just past `max_length` MiniLM tokens.

    What the predictor sees is unchanged, and the files stay small enough to travel to a training machine.
    """
    import dataclasses

    from transformers import AutoTokenizer

    from ltr.data import load_pairs, split_pairs, write_trace
    from ltr.predictor.model import default_backbone_path

    tok = AutoTokenizer.from_pretrained(backbone_path or default_backbone_path())
    splits = split_pairs(load_pairs())
    keep = max_length + 8  # a few spare tokens so re-tokenising the cut text gives the same first max_length
    for name in ("train", "val", "test"):
        pairs = getattr(splits, name)
        enc = tok([p.prompt for p in pairs], truncation=True, max_length=keep, return_offsets_mapping=True,
                  add_special_tokens=False)
        cut = [dataclasses.replace(p, answer="", prompt=p.prompt[: offs[-1][1]] if offs else p.prompt)
               for p, offs in zip(pairs, enc["offset_mapping"])]
        write_trace(cut, Path(out_dir) / f"{name}.jsonl")
    return Path(out_dir)


def _batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of random, disjoint lists (an incomplete last list is dropped)."""
    perm = rng.permutation(n)
    return [perm[i: i + size] for i in range(0, n - size + 1, size)]


class _Objective(nn.Module):
    """Loss of one step for the configured objective."""

    def __init__(self, config: PredictorConfig, train_lengths: np.ndarray, generator: torch.Generator,
                 censored: str = "lower-bound") -> None:
        super().__init__()
        _check_censoring_rule(censored)
        self.censor_aware_loss = _CENSOR_AWARE_LOSSES.get(censored)
        if self.censor_aware_loss is not None and config.objective != "listmle":
            raise ValueError(f"censored answers as lower bounds ({censored}) need the listmle objective, not "
                             f"{config.objective!r}")
        self.config, self.generator = config, generator
        log_len = np.log1p(train_lengths)
        self.mu, self.sigma = float(log_len.mean()), float(log_len.std() + 1e-6)
        if config.objective == "buckets" and not config.bucket_edges:
            qs = np.linspace(0, 1, config.n_buckets + 1)[1:-1]
            config.bucket_edges = np.quantile(train_lengths, qs).tolist()

    def forward(self, raw: Tensor, lengths: Tensor, censored: Tensor, list_size: int) -> Tensor:
        if self.censor_aware_loss is not None:
            return self.censor_aware_loss(raw.view(-1, list_size), lengths.view(-1, list_size).float(),
                                          censored.view(-1, list_size))
        if self.config.objective == "listmle":
            return listmle_loss(raw.view(-1, list_size), lengths.view(-1, list_size).float(),
                                generator=self.generator)
        if self.config.objective == "regression":
            target = (torch.log1p(lengths.float()) - self.mu) / self.sigma
            return nn.functional.mse_loss(raw, target)
        edges = torch.tensor(self.config.bucket_edges, device=lengths.device, dtype=torch.float32)
        return nn.functional.cross_entropy(raw, torch.bucketize(lengths.float(), edges, right=True))


def train_predictor(model_config: PredictorConfig, train_config: TrainConfig, data: ExampleSplits,
                    backbone_path: Path | None = None, init: Path | None = None) -> tuple[RankPredictor, dict]:
    """Train, keep the epoch with the best validation tau, fit the token calibration on val.

    `init`: fine-tune this artifact instead of a fresh head and adapters; its own config (shape,
    objective, bucket edges) replaces `model_config`, except for the input window (`max_length`) and the
    chat template, which shape no weight and are taken from `model_config`. The artifact itself is a
    candidate (epoch 0): a fine-tune that ranks validation no better than where it started is not kept.
    Returns the predictor (on `train_config.device`) and a history dict for metadata/benchmarks.
    """
    from tqdm.auto import tqdm

    tc, started = train_config, time.perf_counter()
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    generator = torch.Generator().manual_seed(tc.seed)
    device = torch.device(tc.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    train = data.train[: tc.limit_train] if tc.limit_train else data.train
    if len(train) < tc.list_size * tc.lists_per_step or not data.val:
        raise ValueError(f"need at least {tc.list_size * tc.lists_per_step} training and 1 validation example")
    if init is None:
        model = RankPredictor(model_config, backbone_path=backbone_path).to(device)
    else:
        model = RankPredictor.from_pretrained(init, device=tc.device, backbone_path=backbone_path)
        model.config = replace(model.config, max_length=model_config.max_length,
                               chat_template=model_config.chat_template)
    train_ids = model.tokenize([e.prompt for e in train])
    val_ids = model.tokenize([e.prompt for e in data.val])
    train_len = np.array([e.output_len for e in train], dtype=np.float64)
    val_len = np.array([e.output_len for e in data.val], dtype=np.float64)
    train_censored = np.array([e.censored for e in train], dtype=bool)
    val_censored = np.array([e.censored for e in data.val], dtype=bool)
    objective = _Objective(model.config, train_len, generator, censored=tc.censored)

    def val_tau(scores: np.ndarray) -> float:
        """Validation tau; censor-aware where served answers were cut (pairs of unknown order left out)."""
        tau = ranking_report(scores, val_len, censored=val_censored if val_censored.any() else None)["kendall_tau"]
        return -math.inf if tau is None else tau

    frozen = model.config.finetune == "frozen"
    train_feats = val_feats = None
    if frozen:  # the backbone never changes: embed once, train only the head
        train_feats, val_feats = _embed_all(model, train_ids), _embed_all(model, val_ids)

    head_params = list(model.head.parameters())
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": head_params, "lr": tc.head_lr}]
    if body_params:
        groups.append({"params": body_params, "lr": tc.lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=tc.weight_decay)
    step_size = tc.list_size * tc.lists_per_step
    steps_per_epoch = len(train) // step_size
    total = steps_per_epoch * tc.epochs
    warmup = max(1, int(tc.warmup_frac * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def val_scores() -> np.ndarray:
        if frozen:
            model.eval()
            with torch.no_grad():
                out = model.reduce(model.head_scores(val_feats.to(device))).cpu().numpy()
            model.train()
            return out.astype(np.float64)
        return model.score_ids(val_ids, batch_size=128)

    history: dict = {"epochs": [], "val_tau": [], "train_loss": []}
    best_tau, best_state, best_epoch, stale = -math.inf, None, 0, 0
    epoch_states: list[dict[str, Tensor]] = []
    if init is not None:
        best_tau = history["init_val_tau"] = val_tau(val_scores())
        best_state = copy.deepcopy(model.trainable_state_dict())
    bar = tqdm(total=total, disable=not tc.progress, desc=f"{model.config.objective}/{model.config.finetune}",
               unit="step", dynamic_ncols=True)
    model.train()
    for epoch in range(1, tc.epochs + 1):
        losses = []
        for idx in _batches(len(train), step_size, rng):
            lengths = torch.as_tensor(train_len[idx], device=device)
            censored = torch.as_tensor(train_censored[idx], device=device)
            with autocast:
                if frozen:
                    raw = model.head_scores(train_feats[idx].to(device))
                else:
                    raw = model(*model.collate([train_ids[i] for i in idx], device))
            loss = objective(raw.float(), lengths, censored, tc.list_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}", best_val_tau=f"{best_tau:.3f}")
        tau = val_tau(val_scores())
        history["epochs"].append(epoch)
        history["val_tau"].append(tau)
        history["train_loss"].append(float(np.mean(losses)))
        logger.info("epoch %d: train loss %.4f, val tau %.4f", epoch, np.mean(losses), tau)
        if tc.average_epochs:
            epoch_states.append(copy.deepcopy(model.trainable_state_dict()))
        if tau > best_tau:
            best_tau, best_epoch, stale = tau, epoch, 0
            best_state = copy.deepcopy(model.trainable_state_dict())
        else:
            stale += 1
            if stale >= tc.patience:
                break
    bar.close()
    if epoch_states:
        averaged = mean_state(epoch_states)
        model.load_state_dict(averaged, strict=False)
        history["averaged_val_tau"] = averaged_tau = val_tau(val_scores())
        logger.info("mean of %d epochs' weights: val tau %.4f (best epoch %d: %.4f)", len(epoch_states),
                    averaged_tau, best_epoch, best_tau)
        if averaged_tau > best_tau:
            best_tau, best_epoch, best_state = averaged_tau, f"mean of epochs 1-{len(epoch_states)}", averaged
    model.load_state_dict(best_state, strict=False)
    model.eval()
    val = val_scores()
    model.config.calibration = fit_calibration(val, val_len)
    history.update(best_epoch=best_epoch, best_val_tau=val_tau(val),
                   train_seconds=round(time.perf_counter() - started, 1), n_train=len(train),
                   train_config=asdict(tc), init=None if init is None else str(init))
    return model, history


def mean_state(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The element-wise mean of several checkpoints of one model (a uniform weight average)."""
    return {name: torch.stack([s[name].float() for s in states]).mean(0).to(states[0][name].dtype)
            for name in states[0]}


@torch.no_grad()
def _embed_all(model: RankPredictor, ids: Sequence[Sequence[int]], batch_size: int = 64) -> Tensor:
    """Pooled frozen-backbone embeddings (length-sorted batches), returned on CPU in input order."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), model.backbone.config.hidden_size)
    for s in range(0, len(order), batch_size):
        chunk = order[s: s + batch_size]
        out[chunk] = model.embed(*model.collate([ids[i] for i in chunk], device)).float().cpu()
    model.train()
    return out
