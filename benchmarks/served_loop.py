"""The served-traffic loop on this machine: serve ShareGPT prompts with the real served model, log them,
retrain the predictor on the log, hot-swap it in, and compare on held-out served traffic.

    python benchmarks/served_loop.py [--prompts 700 --samples 2 --max-tokens 128 --budget-s 900]

1. **Serve.** The local service as `python -m deployments.local` starts it on this machine (fitted engine
   layout, default policy, the shipped predictor or `--serve-artifact` at its serving length), plus the
   served-traffic log with the predictor's input text (`served_log`, ingress `log_text`). The official
   `openai` client sends each ShareGPT prompt (first turns of the val + test conversations: the shipped
   predictor never trained on them; with `--turns later`, later turns sent with the conversation before
   them, which a prompt-only predictor such as the shipped one scores, logs and retrains on by the last user
   message, and one trained on rendered conversations by the conversation) `--samples` times (a prompt
   outside the held-out slice `--train-samples` times) as a chat request, sampled (`--temperature`, default
   1.0, and `--top-p`, a seed per request, `--max-tokens`), `--concurrency` at a time, until every prompt is
   served or `--budget-s` runs out. `--train-split-prompts N` adds up to N prompts from the ShareGPT *train*
   split's conversations, served last and only where they fall in the log's train slice: more served labels to
   retrain on, while the held-out slice stays val + test prompts that no predictor trained on.
2. **Retrain.** `ltr train-predictor --data LOG --init SERVED --censored RULE` on the log's train slice
   (split by conversation hash, `record_slice`; runs from before the log recorded it, by the hash of the served
   predictor's input: the held-out slice is never trained on), once per `--censored` rule (how answers
   cut at max_tokens train); the first rule's artifact is the one swapped in.
3. **Swap.** Held-out prompts are served once more; after a quarter of them, a `serve deploy`-style update
   gives the Predictor the retrained artifact. Every request must succeed; the log says which version
   scored each.
4. **Compare** on the held-out slice of the phase-1 log (every sample of every held-out prompt): the
   censor-aware Kendall tau (`ltr.predictor.live_quality`) of the shipped, the served (if another) and the
   retrained predictor's scores, each on its own input for the request, against the served model's own
   lengths, and the ceiling measured the same way: one sample's length ranking the other's. Intervals: 95%
   bootstrap over held-out prompts (paired for the gains).

Writes benchmarks/results/<out>.json (command inside, `summary` with tau_shipped, tau_retrained,
tau_gain_vs_shipped, tau_ceiling; `work_dir`, the kept served log and artifacts) and <out>.png.

`--from-run RESULTS_JSON [--work DIR]` skips serving and swapping: it retrains that run's kept phase-1 records
(copied out of its log, which also holds phase 3) with this invocation's retraining flags (another `--censored`
rule, learning rate, epochs, `--train-average-epochs`) and repeats step 4 on the same held-out slice, the run's
swapped-in artifact beside the new ones (paired gains, `tau_gain_retrained_<rule>_vs_retrained`), so a
retraining recipe can be compared without serving the log again (1.5-2 hours on this machine).

`--pool RESULTS_JSON [RESULTS_JSON ...]` neither serves nor retrains: it scores kept runs of one setting (other
seeds) on their held-out slices again and reports the mean of each statistic over the runs, its 95% interval
resampling each run's prompts on their own, and each run's value (one run alone: its own summary again).
`--from-run` results of one recipe pool the same way, their artifacts beside the ones their runs swapped in.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(REPO))

from ltr.predictor.train import CENSORING_RULES, TrainConfig  # noqa: E402

PREDICTOR_SETTINGS = {"max_length": 256}   # the Predictor deployment's serving default
#: The flags of the retraining: what `--from-run` takes from its own invocation (all else is the run's).
RETRAIN_FLAGS = ("epochs", "train_lr", "train_head_lr", "train_max_length", "train_list_size",
                 "train_average_epochs", "censored")
#: Flags a kept run's results may lack, as the runs from before them ran: the log split by the served
#: predictor's input, before it recorded each request's conversation (`record_slice`).
FLAGS_BEFORE_RECORDED = {"split_by": "input"}
#: The flags runs of one setting may differ in (`--pool`).
NOT_THE_SETTING = ("seed", "out", "port", "from_run", "work", "pool")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=700, help="distinct ShareGPT prompts to serve")
    p.add_argument("--turns", choices=("first", "later"), default="first",
                   help="first user turns, or later turns sent with the conversation before them")
    p.add_argument("--samples", type=int, default=2,
                   help="sampled answers per held-out prompt (>= 2: the ceiling), and per prompt the retraining "
                        "sees unless --train-samples says otherwise")
    p.add_argument("--train-samples", type=int, default=None,
                   help="sampled answers per prompt outside the held-out slice (default: --samples); 1 spends the "
                        "serving budget on more distinct prompts to retrain on")
    p.add_argument("--train-split-prompts", type=int, default=0,
                   help="up to this many more prompts from the ShareGPT train split's conversations, served after "
                        "the others (--train-samples times each) and only if they fall in the log's train slice")
    p.add_argument("--max-tokens", type=int, default=128, help="answer cap (a capped answer is censored)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of every request")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share of every request")
    p.add_argument("--max-prompt-tokens", type=int, default=128,
                   help="prompts longer than this (message text in all) are skipped (keeps CPU work affordable)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--budget-s", type=float, default=900.0, help="stop sending phase-1 requests after this")
    p.add_argument("--holdout", type=float, default=0.25, help="held-out share of prompts (by prompt hash)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-lr", type=float, default=TrainConfig.lr,
                   help="backbone learning rate of the retraining (`ltr train-predictor --lr`)")
    p.add_argument("--train-head-lr", type=float, default=TrainConfig.head_lr,
                   help="head learning rate of the retraining (`ltr train-predictor --head-lr`)")
    p.add_argument("--train-max-length", type=int, default=128, help="MiniLM tokens per prompt in retraining")
    p.add_argument("--train-list-size", type=int, default=64,
                   help="answers per ListMLE list in retraining (smaller: more steps on a small log)")
    p.add_argument("--train-average-epochs", action="store_true",
                   help="retraining also tries the mean of its epochs' weights (`ltr train-predictor "
                        "--average-epochs`)")
    p.add_argument("--censored", nargs="+", choices=CENSORING_RULES, default=["lower-bound"],
                   help="how answers cut at max_tokens train (`ltr train-predictor --censored`): one retrained "
                        "artifact per rule, all compared; the first is swapped in")
    p.add_argument("--serve-artifact", type=Path, default=None,
                   help="predictor artifact to serve in phase 1 and retrain from (default: the shipped one), e.g. "
                        "one trained on rendered conversations (`ltr train-predictor --turns`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default="served_loop")
    p.add_argument("--from-run", type=Path, default=None, metavar="RESULTS_JSON",
                   help="no serving: retrain that run's kept phase-1 log again with this invocation's retraining "
                        "flags (--epochs, --train-*, --censored; all other flags are the run's) and compare on "
                        "the same held-out slice, next to the artifact the run swapped in")
    p.add_argument("--work", type=Path, nargs="+", default=None,
                   help="with --from-run or --pool: the run's kept work dir, one per run in --pool's order "
                        "(default: the one each results JSON names)")
    p.add_argument("--pool", type=Path, nargs="+", default=None, metavar="RESULTS_JSON",
                   help="no serving, no retraining: kept runs of one setting (other seeds) compared together, the "
                        "mean of their held-out taus and gains with a bootstrap interval over each run's prompts")
    args = p.parse_args(argv)
    if args.pool and args.from_run:
        p.error("--pool and --from-run are two different modes: give one")
    kept_runs = args.pool or ([args.from_run] if args.from_run else [])
    if args.work and len(args.work) != len(kept_runs):
        p.error("--work goes with --from-run (one dir) or --pool (one dir per run)")
    if args.samples < 2:
        p.error("--samples must be >= 2 (the ceiling compares two answers to one prompt)")
    if len(set(args.censored)) < len(args.censored):
        p.error("--censored names a rule twice")
    if not args.temperature > 0:
        p.error("--temperature must be > 0 (the answers are sampled: two of them measure the ceiling)")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.train_samples is None:
        args.train_samples = args.samples
    args.split_by = "conversation"   # how the log is split (`record_slice`); see FLAGS_BEFORE_RECORDED
    for name in ("prompts", "max_tokens", "concurrency", "epochs", "train_list_size", "train_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.train_split_prompts < 0:
        p.error("--train-split-prompts must be >= 0")
    return args


def pick_conversations(count: int | None, max_prompt_tokens: int, seed: int, turns: str,
                       sides: tuple[str, ...] = ("val", "test")) -> list[list[dict]]:
    """Chat requests (OpenAI messages) from the conversations of the split `sides` (by default val and test,
    which the shipped predictor never trained on), shuffled: "first" turns (one
    user message each, distinct), or "later" turns (the conversation before the turn and its user message;
    one turn per ShareGPT conversation, drawn at random, so that no held-out request shares its history
    with one the retraining saw, and distinct last user messages), at most `max_prompt_tokens` served-model
    tokens of message text in all. `count` None: all there are."""
    rng = random.Random(seed)
    if turns == "first":
        from ltr.data import load_pairs, split_pairs

        splits = split_pairs(load_pairs())
        prompts = sorted({p.prompt for side in sides for p in getattr(splits, side)
                          if p.prompt.strip() and p.prompt_len <= max_prompt_tokens})
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    else:
        from transformers import AutoTokenizer

        from ltr.data.conversations import load_turns, split_turns
        from ltr.models import prepare_model

        splits, _ = split_turns(load_turns())
        by_last: dict[str, tuple[str, list[dict]]] = {}
        side_turns = [t for side in sides for t in getattr(splits, side)]
        for turn in sorted(side_turns, key=lambda t: (t.conv_id, t.index)):
            messages = turn.messages()
            if (turn.history and turn.prompt.strip() and turn.prompt not in by_last
                    and sum(len(m["content"]) for m in messages) <= 8 * max_prompt_tokens):
                by_last[turn.prompt] = (turn.base_id, messages)
        candidates = list(by_last.values())
        counts = AutoTokenizer.from_pretrained(prepare_model())(
            [m["content"] for _, messages in candidates for m in messages], add_special_tokens=False)["input_ids"]
        sizes = np.cumsum([0] + [len(messages) for _, messages in candidates])
        by_conversation: dict[str, list[list[dict]]] = defaultdict(list)
        for (base_id, messages), start, end in zip(candidates, sizes, sizes[1:]):
            if sum(len(ids) for ids in counts[start:end]) <= max_prompt_tokens:
                by_conversation[base_id].append(messages)
        conversations = [rng.choice(turns_of) for turns_of in by_conversation.values()]
    rng.shuffle(conversations)
    if count is None:
        return conversations
    if len(conversations) < count:
        raise SystemExit(f"only {len(conversations)} {turns}-turn requests of <= {max_prompt_tokens} tokens, "
                         f"--prompts {count}")
    return conversations[:count]


@dataclass
class LoopRequests:
    """Phase 1's requests, and what the comparison needs to read their log records."""

    prompts: list[list[dict]]                 # val / test conversations, then any train-split ones
    held_out_ids: set[int]                    # indices of `prompts` in the log's held-out slice
    conversation_of: dict[str, list[dict]]    # a logged text (served input or last user message) -> its chat
    train_only: frozenset[str]                # every text a train-split prompt can be logged by


def loop_requests(args: argparse.Namespace, serve_artifact: Path) -> LoopRequests:
    """The requests of phase 1 for `args` (its seed, turns, prompt counts), deterministic, so that a kept
    run's log can be read again (`--from-run`)."""
    from ltr.data.served_log import text_sha256
    from ltr.predictor.model import RankPredictor
    from ltr.predictor.render import conversation_text, last_user_text
    from ltr.predictor.train import served_slice

    prompts = pick_conversations(args.prompts, args.max_prompt_tokens, args.seed, args.turns)
    # What the served predictor scores for each (the log's text, whose hash splits the log).
    served_input = RankPredictor.from_pretrained(serve_artifact).for_serving(PREDICTOR_SETTINGS["max_length"]).chat_input
    # The conversation behind each logged text: the served predictor's input, or the last user message
    # (what the ingress logs for a request the predictor did not score; unique per conversation here).
    conversation_of: dict[str, list[dict]] = {}

    def held_out(prompt: list[dict]) -> bool:
        """In the held-out slice, split as the log is (`ltr.predictor.train.record_slice`): by the hash of the
        conversation's text, or in runs from before the log recorded it, of the text the served predictor scores."""
        key = conversation_text(prompt) if args.split_by == "conversation" else served_input(prompt)
        return served_slice(text_sha256(key)) < args.holdout

    held_out_ids = set()
    for i, prompt in enumerate(prompts):
        conversation_of.setdefault(served_input(prompt), prompt)
        conversation_of.setdefault(last_user_text(prompt), prompt)
        if held_out(prompt):
            held_out_ids.add(i)
    train_only: set[str] = set()
    if args.train_split_prompts:
        # Train-split prompts for the retraining only: those that would land in the log's held-out slice are
        # skipped, as is any whose text a val / test prompt already has.
        extra = []
        for prompt in pick_conversations(None, args.max_prompt_tokens, args.seed, args.turns, sides=("train",)):
            if len(extra) == args.train_split_prompts:
                break
            scored_text, last_message = served_input(prompt), last_user_text(prompt)
            if not held_out(prompt) and scored_text not in conversation_of and last_message not in conversation_of:
                conversation_of[scored_text] = conversation_of[last_message] = prompt
                train_only |= {scored_text, last_message}
                extra.append(prompt)
        print(f"{len(extra)} train-split prompts added (train slice only)", flush=True)
        prompts += extra
    return LoopRequests(prompts, held_out_ids, conversation_of, frozenset(train_only))


def retrain(args: argparse.Namespace, log_dir: Path, serve_artifact: Path, outputs: dict[str, Path]) -> dict[str, float]:
    """`ltr train-predictor` on the log's train slice from `serve_artifact`, once per censoring rule into
    `outputs[rule]`; seconds per rule."""
    from ltr.cli import main as ltr_main

    seconds = {}
    for rule, output in outputs.items():
        started = time.monotonic()
        train_argv = ["train-predictor", "--data", str(log_dir), "--init", str(serve_artifact),
                      "--censored", rule, "--holdout", str(args.holdout), "--val-fraction",
                      str(args.val_fraction), "--epochs", str(args.epochs), "--lr", str(args.train_lr),
                      "--head-lr", str(args.train_head_lr), "--max-length",
                      str(args.train_max_length), "--list-size", str(args.train_list_size),
                      "--seed", str(args.seed), "--output", str(output)]
        if args.train_average_epochs:
            train_argv.append("--average-epochs")
        if ltr_main(train_argv) != 0:
            raise SystemExit(f"train-predictor --censored {rule} failed")
        seconds[f"retrain_{rule}_s"] = time.monotonic() - started
    return seconds


def retrain_report(outputs: dict[str, Path]) -> dict[str, dict]:
    """Each retrained artifact's training command, best epoch and taus (from its metadata)."""
    report = {}
    for rule, output in outputs.items():
        meta = json.loads((output / "config.json").read_text())["metadata"]
        report[output.name] = {"censored": rule, "command": meta.get("command"),
                               "best_epoch": meta["history"].get("best_epoch"),
                               "best_val_tau": meta["history"].get("best_val_tau"), "test": meta.get("test")}
    return report


def phase1_request_ids(log_dir: Path, run: dict) -> set[str]:
    """A kept run's phase-1 records. Its log holds phase 1 (which ended within `serve_s` of its first
    record), then, after the retraining (`retrain_*_s`), phase 3: cut halfway through the retraining."""
    from ltr.data.served_log import read_served_log

    records = list(read_served_log(log_dir))
    retrain_s = sum(v for k, v in run["timings_s"].items() if k.startswith("retrain_"))
    cut = min(r.time for r in records) + run["timings_s"]["serve_s"] + retrain_s / 2
    ids = {r.request_id for r in records if r.time <= cut}
    if len(ids) != run["phase1"]["logged"]:
        raise SystemExit(f"{log_dir}: {len(ids)} records before the retraining, the run logged "
                         f"{run['phase1']['logged']} in phase 1: not that run's log?")
    return ids


@dataclass
class KeptRun:
    """A finished run, read back from its results JSON and kept work dir."""

    results: Path
    run: dict                      # its results JSON
    work: Path
    args: argparse.Namespace       # its flags (with `retraining` flags replaced, where given)
    serve_artifact: Path
    requests: LoopRequests
    phase1_ids: set[str]

    @property
    def log_dir(self) -> Path:
        return self.work / "served-log"

    def score_held_out(self, **retrained: Path) -> HeldOut:
        """Its held-out slice scored by its predictors (the swapped-in one as "retrained") and `retrained`."""
        swapped_in = {"retrained": self.work / "retrained"}
        predictors = loop_predictors(self.args, self.serve_artifact, {**swapped_in, **retrained})
        return score_held_out(self.log_dir, self.phase1_ids, predictors, self.requests.conversation_of,
                              self.args.holdout, self.requests.train_only)


def loop_predictors(args: argparse.Namespace, serve_artifact: Path, retrained: dict[str, Path]) -> dict[str, Path]:
    """The predictors a run compares: the shipped one, the served one (when phase 1 served another), `retrained`."""
    from ltr.predictor.model import shipped_artifact_dir

    return {"shipped": shipped_artifact_dir(), **({"served": serve_artifact} if args.serve_artifact else {}),
            **retrained}


def kept_run(results: Path, work: Path | None = None, retraining: dict | None = None) -> KeptRun:
    """The run behind `results` (its log in `work`, default the dir it names), its flags overridden by `retraining`."""
    from ltr.predictor.model import shipped_artifact_dir

    run = json.loads(results.read_text())
    work = work or Path(run.get("work_dir", ""))
    if not (work / "served-log").is_dir():
        raise SystemExit(f"{work / 'served-log'}: no served log of {results} (give the run's kept work dir with "
                         "--work)")
    merged = argparse.Namespace(**{**FLAGS_BEFORE_RECORDED, **run["args"], **(retraining or {})})
    serve_artifact = Path(merged.serve_artifact) if merged.serve_artifact else shipped_artifact_dir()
    return KeptRun(results, run, work, merged, serve_artifact, loop_requests(merged, serve_artifact),
                   phase1_request_ids(work / "served-log", run))


def rerun(args: argparse.Namespace, command: str) -> int:
    """`--from-run`: retrain a kept run's phase-1 log again with this invocation's retraining flags and
    compare on the same held-out slice as the run (paired with its swapped artifact); no serving, no swap."""
    kept = kept_run(args.from_run, args.work and args.work[0], {name: getattr(args, name) for name in RETRAIN_FLAGS})
    rerun_dir = kept.work / f"rerun-{args.out}"
    outputs = {rule: rerun_dir / f"retrained_{rule}" for rule in args.censored}
    timings = retrain(kept.args, phase1_log(kept, rerun_dir / "phase1-log"), kept.serve_artifact, outputs)
    summary = compare(kept.score_held_out(**{output.name: output for output in outputs.values()}))
    result = {"command": command, "from_run": {"results": str(args.from_run), "command": kept.run["command"],
                                               "work_dir": str(kept.work)},
              "args": {**vars(kept.args), "from_run": str(args.from_run)}, "summary": summary, "timings_s": timings,
              "retrain": retrain_report(outputs),
              "artifacts": {output.name: str(output) for output in outputs.values()}}
    write_results(args.out, result, kept.run["args"]["censored"][0], run_sampling(kept.run))
    return 0


def phase1_log(kept: KeptRun, directory: Path) -> Path:
    """A copy of the kept run's log with its phase-1 records only: what its retraining saw. The whole log also
    holds phase 3 (held-out prompts served again), whose requests sent unscored are logged by their last user
    message, which hashes into the train and validation slices."""
    from ltr.data.served_log import ServedLogConfig, ServedLogWriter, read_served_log

    shutil.rmtree(directory, ignore_errors=True)
    writer = ServedLogWriter(ServedLogConfig(str(directory), writer_id="phase1"))
    for record in read_served_log(kept.log_dir):
        if record.request_id in kept.phase1_ids:
            writer.write(record)
    writer.close()
    return directory


def pool(args: argparse.Namespace, command: str) -> int:
    """`--pool`: kept runs (other seeds of one setting) compared together: the mean of their held-out
    statistics, each run's prompts resampled on their own for the interval; no serving, no retraining."""
    runs = {results: json.loads(results.read_text()) for results in args.pool}
    flags = [{**FLAGS_BEFORE_RECORDED, **run["args"]} for run in runs.values()]
    differing = sorted(name for name in set().union(*flags) - set(NOT_THE_SETTING)
                       if len({json.dumps(f.get(name), sort_keys=True) for f in flags}) > 1)
    if differing:
        raise SystemExit(f"--pool: the runs differ in {', '.join(differing)}; pool runs of one setting (other seeds)")
    kept = {results: pooled_run(results, run, work)
            for (results, run), work in zip(runs.items(), args.work or [None] * len(runs))}
    summary = pooled({results.stem: run.score_held_out(**reruns) for results, (run, reruns) in kept.items()})
    result = {"command": command, "runs": [{"results": str(results), "command": runs[results]["command"],
                                            "work_dir": str(run.work), "summary": runs[results]["summary"]}
                                           for results, (run, _) in kept.items()],
              "summary": summary}
    first = next(iter(kept.values()))[0].run
    write_results(args.out, result, first["args"]["censored"][0], run_sampling(first))
    return 0


def pooled_run(results: Path, run: dict, work: Path | None) -> tuple[KeptRun, dict[str, Path]]:
    """A run to pool (`run`, read from `results`): an end-to-end run as it is; a `--from-run` rerun as the run it
    retrained (with the rerun's retraining flags), its artifacts compared next to the one the run swapped in."""
    if "from_run" not in run:
        return kept_run(results, work), {}
    if "artifacts" not in run:
        raise SystemExit(f"{results}: a --from-run result from before its artifacts were recorded; run it again")
    retraining = {name: run["args"][name] for name in RETRAIN_FLAGS}
    kept = kept_run(Path(run["from_run"]["results"]), work or Path(run["from_run"]["work_dir"]), retraining)
    return kept, {name: Path(path) for name, path in run["artifacts"].items()}


def run_sampling(run: dict) -> dict:
    return {k: run["args"][k] for k in ("max_tokens", "temperature", "top_p")}


def deploy_predictor(settings: dict, app_args: dict) -> None:
    """What `serve deploy CONFIG` does with the predictor app: its settings become the Predictor
    deployment's `user_config`, which Serve applies in place (the hot swap), one replica at a time. The app's
    `args` (replicas, threads, CPUs) must stay as they were: changed, they would replace the replicas."""
    from ray.serve._private.api import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from deployments.local import PREDICTOR_APP_NAME

    config = {"applications": [{
        "name": PREDICTOR_APP_NAME, "route_prefix": None, "import_path": "deployments.app:build_predictor_app",
        "args": app_args, "deployments": [{"name": "Predictor", "user_config": settings}]}]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def start_service(log_dir: Path, port: int, predictor_settings: dict) -> tuple[str, dict]:
    """The local default service (deployments.local's layout and args) with the served-traffic log on and
    the Predictor's `predictor_settings`: its URL and the predictor app's args (for the swap)."""
    import psutil
    import ray
    from ray import serve
    from vllm.utils.torch_utils import available_cpu_count

    from deployments.app import build_app
    from deployments.local import APP_NAME, app_args, engine_layout, parse_args as local_args, predictor_args
    from ltr.models import prepare_model

    options = local_args(["--port", str(port)])
    cpus = available_cpu_count()
    layout = engine_layout(options, cpus, psutil.virtual_memory().total / 2**30, cpus)
    print(layout.describe(), flush=True)
    ray.init(address="local", _temp_dir=tempfile.mkdtemp(prefix="ltr-loop-bench-"), include_dashboard=False,
             num_cpus=cpus, logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    predictor = predictor_args(layout)
    deploy_predictor(predictor_settings, predictor)
    config = app_args(options, layout)
    config["model"] = str(prepare_model())
    config["served_log"] = {"directory": str(log_dir)}
    config["ingress"] = {**config["ingress"], "log_text": True}
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://127.0.0.1:{port}", predictor


async def serve_jobs(url: str, model: str, jobs: list[tuple[int, int, list[dict]]], sampling: dict,
                     concurrency: int, budget_s: float, during: Any = None) -> list[dict]:
    """Send (prompt id, sample, messages) chat requests with the openai client; one result dict each.
    Each is sampled with `sampling` (max_tokens, temperature, top_p) and its own `seed` (100 x prompt id +
    sample), so a served label can be regenerated.
    `during(done)` is awaited after each answer (phase 3 uses it to start the swap)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[dict] = []
    deadline = time.monotonic() + budget_s

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            prompt_id, sample, messages = queue.get_nowait()
            started = time.monotonic()
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=messages, seed=100 * prompt_id + sample, **sampling)
                answer = raw.parse()
                results.append({"prompt": prompt_id, "sample": sample, "ok": True,
                                "placement": raw.headers.get("x-ltr-placement"),
                                "fallback": raw.headers.get("x-ltr-fallback"),
                                "tokens": answer.usage.completion_tokens,
                                "finish": answer.choices[0].finish_reason, "latency_s": time.monotonic() - started})
            except openai.APIError as exc:
                results.append({"prompt": prompt_id, "sample": sample, "ok": False, "error": repr(exc)[:300]})
            if during is not None:
                await during(len(results))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return results


def wait_for_records(log_dir: Path, count: int, timeout_s: float = 60.0) -> list:
    from ltr.data.served_log import read_served_log

    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_served_log(log_dir))
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def tau(scores: np.ndarray, lengths: np.ndarray, censored: np.ndarray) -> float | None:
    from ltr.predictor.live_quality import censored_kendall_tau

    return censored_kendall_tau(scores, lengths, censored)["kendall_tau"]


def bootstrap(parts: list[tuple[list[np.ndarray], Callable]], resamples: int = 300,
              seed: int = 0) -> list[float] | None:
    """95% interval of the mean over `parts` of `stat(indices)`, each part (one run: `groups`, record
    indices per prompt, and `stat`) resampled over its own prompts; None when the statistic is undefined
    (no pair of known order, e.g. every answer cut at the cap)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        per_part = []
        for groups, stat in parts:
            picked = rng.integers(0, len(groups), len(groups))
            per_part.append(stat(np.concatenate([groups[i] for i in picked])))
        if all(value is not None for value in per_part):
            values.append(float(np.mean(per_part)))
    if not values:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


@dataclass
class HeldOut:
    """A run's held-out slice of its phase-1 log, each predictor's score of every record, and the
    statistics the comparison reports on it: name -> (groups of record indices, statistic of indices)."""

    records: int
    prompts: int
    censored_share: float
    mean_output_tokens: float
    stats: dict[str, tuple[list[np.ndarray], Callable]]
    by_answer_sample: dict[str, dict[str, float | None]]


def score_held_out(log_dir: Path, phase1_ids: set[str], predictors: dict[str, Path],
                   conversation_of: dict[str, list[dict]], holdout: float,
                   train_only: frozenset[str] = frozenset()) -> HeldOut:
    """The held-out slice of the phase-1 log, scored by each of `predictors` ("shipped", "retrained", any
    "retrained_<rule>", and "served" when phase 1 served another artifact); its statistics: each one's tau,
    the gains over the shipped one and (paired, the served labels' own share) of each retrained one over
    the served one, the ceiling and prompt length. Each predictor scores the held-out requests as it would
    serve them (its own `chat_input` of the conversation the logged text came from, `conversation_of`).
    Texts in `train_only` (train-split prompts) never count, even where the log put one in the held-out
    slice (logged by its last user message, unscored)."""
    from ltr.data.served_log import read_served_log
    from ltr.predictor.model import RankPredictor
    from ltr.predictor.train import record_slice

    records = [r for r in read_served_log(log_dir) if r.request_id in phase1_ids and r.finish_reason not in
               ("abort", "error") and record_slice(r) < holdout and r.text not in train_only]
    texts = sorted({r.text for r in records})
    scores = {}
    for name, artifact in predictors.items():
        model = RankPredictor.from_pretrained(artifact).for_serving(PREDICTOR_SETTINGS["max_length"])
        inputs = [model.chat_input(conversation_of[text]) for text in texts]
        by_text = dict(zip(texts, model.score(inputs, batch_size=64)))
        scores[name] = np.array([by_text[r.text] for r in records])
    lengths = np.array([r.output_tokens for r in records], dtype=np.int64)
    censored = np.array([r.censored for r in records], dtype=bool)
    prompt_tokens = np.array([r.prompt_tokens for r in records], dtype=np.float64)
    # A prompt's answers in an order unrelated to their lengths (hash of the request id): the log holds them
    # in finishing order, where the first is the shorter one, and pairing shorter with longer inflates the
    # ceiling (0.79 against 0.33 on one log) and splits the answers into a short and a long "sample".
    groups_of: dict[str, list[int]] = defaultdict(list)
    for i in sorted(range(len(records)), key=lambda i: hashlib.sha256(records[i].request_id.encode()).digest()):
        groups_of[records[i].text].append(i)
    groups = [np.array(v) for v in groups_of.values()]

    def tau_of(values: np.ndarray):
        return lambda idx: tau(values[idx], lengths[idx], censored[idx])

    def gain_over(name: str, baseline: str):
        def gain(idx: np.ndarray) -> float | None:
            a, b = tau_of(scores[name])(idx), tau_of(scores[baseline])(idx)
            return None if a is None or b is None else a - b
        return gain

    # Ceiling: for prompts with two answers, the first answer's length as the "score" of the second.
    pairs = [g[:2] for g in groups if len(g) >= 2]
    first, second = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def ceiling(idx: np.ndarray) -> float | None:
        return tau(lengths[first[idx]].astype(np.float64), lengths[second[idx]], censored[second[idx]])

    stats = {f"tau_{name}": (groups, tau_of(values)) for name, values in scores.items()}
    stats |= {(f"tau_gain_{name}_vs_shipped" if name != "retrained" else "tau_gain_vs_shipped"):
              (groups, gain_over(name, "shipped")) for name in scores if name != "shipped"}
    if "served" in scores:   # what the served labels add to the predictor they retrained
        stats |= {f"tau_gain_{name}_vs_served": (groups, gain_over(name, "served"))
                  for name in scores if name.startswith("retrained")}
    if "retrained" in scores:   # each other retraining against the one swapped in (paired)
        stats |= {f"tau_gain_{name}_vs_retrained": (groups, gain_over(name, "retrained"))
                  for name in scores if name.startswith("retrained_")}
    stats["tau_prompt_length"] = (groups, tau_of(prompt_tokens))
    stats["tau_ceiling"] = ([np.array([i]) for i in range(len(pairs))], ceiling)
    # Spread over answer samples: each model's tau against answer k of each prompt (in the order above) alone.
    by_sample: dict[str, dict[str, float | None]] = {}
    for k in range(2):
        idx = np.array([g[k] for g in groups if len(g) > k])
        by_sample[f"answer_{k}"] = {name: tau_of(scores[name])(idx) for name in scores}
    return HeldOut(len(records), len(groups), float(censored.mean()), float(lengths.mean()), stats, by_sample)


def compare(held: HeldOut) -> dict:
    """One run's summary: each statistic on the whole held-out slice, with its 95% bootstrap interval over
    prompts (paired for the gains)."""
    result = {"held_out_records": held.records, "held_out_prompts": held.prompts,
              "censored_share": held.censored_share, "mean_output_tokens": held.mean_output_tokens}
    for name, (groups, stat) in held.stats.items():
        result[name] = stat(np.concatenate(groups))
        result[f"{name}_ci95"] = bootstrap([(groups, stat)])
    result["by_answer_sample"] = held.by_answer_sample
    return result


def pooled(runs: dict[str, HeldOut]) -> dict:
    """Several runs' summary: each statistic they all have, as the mean of the runs' values, with a 95%
    bootstrap interval that resamples each run's prompts on its own; each run's value beside it."""
    names = [name for name in next(iter(runs.values())).stats if all(name in held.stats for held in runs.values())]
    result: dict[str, Any] = {"runs": len(runs), "held_out_records": sum(h.records for h in runs.values()),
                              "held_out_prompts": sum(h.prompts for h in runs.values())}
    per_run: dict[str, dict] = {run: {} for run in runs}
    for name in names:
        parts = [held.stats[name] for held in runs.values()]
        values = [stat(np.concatenate(groups)) for groups, stat in parts]
        for run, value in zip(runs, values):
            per_run[run][name] = value
        result[name] = None if None in values else float(np.mean(values))
        result[f"{name}_ci95"] = bootstrap(parts)
    result["per_run"] = per_run
    return result


def plot(summary: dict, path: Path, swapped_rule: str, sampling: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("tau_prompt_length", "prompt length", "#999"), ("tau_shipped", "shipped\npredictor", "#4c72b0"),
            ("tau_served", "served in\nphase 1", "#8172b3"),
            ("tau_retrained", f"retrained on\nthe log, {swapped_rule}", "#dd8452")]
    bars += [(name, f"retrained on\nthe log, {name.removeprefix('tau_retrained_')}", "#c44e52") for name in summary
             if name.startswith("tau_retrained_") and not name.endswith("_ci95")]
    bars.append(("tau_ceiling", "ceiling\n(answer vs answer)", "#55a868"))
    names, labels, colors = zip(*[bar for bar in bars if bar[0] in summary])
    values = [summary[n] or 0.0 for n in names]
    intervals = [summary[f"{n}_ci95"] or [v, v] for n, v in zip(names, values)]
    errors = np.array([[v - low, high - v] for v, (low, high) in zip(values, intervals)]).T
    fig, ax = plt.subplots(figsize=(max(9.5, 1.9 * len(names)), 4))   # room for each two-line label
    ax.bar(labels, values, yerr=errors, capsize=6, color=colors)
    ax.set_ylabel("censor-aware Kendall tau vs served lengths")
    gain = summary["tau_gain_vs_shipped"]
    runs = f"mean of {summary['runs']} runs, " if "runs" in summary else ""
    ax.set_title(f"Held-out served traffic ({runs}{summary['held_out_prompts']} prompts, {summary['held_out_records']} "
                 f"answers); retrained - shipped {'n/a' if gain is None else f'{gain:+.3f}'}\nanswers sampled at "
                 f"temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g}, max_tokens "
                 f"{sampling['max_tokens']}", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_results(out: str, result: dict, swapped_rule: str, sampling: dict) -> None:
    """benchmarks/results/<out>.json and <out>.png, and the summary on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result["summary"], RESULTS / f"{out}.png", swapped_rule, sampling)
    print(json.dumps(result["summary"], indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray import serve

    from deployments.local import PREDICTOR_APP_NAME
    from deployments.predictor import artifact_version
    from ltr.models import prepare_model
    from ltr.predictor.model import shipped_artifact_dir

    command = "python benchmarks/served_loop.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.from_run:
        return rerun(args, command)
    if args.pool:
        return pool(args, command)
    work = Path(tempfile.mkdtemp(prefix="ltr-served-loop-"))
    log_dir = work / "served-log"
    # One retrained artifact per rule; the first rule's is "retrained" (swapped in), others "retrained_<rule>".
    retrained_by_rule = {rule: work / ("retrained" if i == 0 else f"retrained_{rule}")
                         for i, rule in enumerate(args.censored)}
    retrained = retrained_by_rule[args.censored[0]]
    print(f"work dir (the served log, retrained artifacts; kept): {work}", flush=True)
    serve_artifact = args.serve_artifact or shipped_artifact_dir()
    serve_settings = {**PREDICTOR_SETTINGS, **({"artifact_dir": str(serve_artifact)} if args.serve_artifact else {})}
    requests = loop_requests(args, serve_artifact)
    prompts = requests.prompts
    model_name = prepare_model().name
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    url, predictor_app_args = start_service(log_dir, args.port, serve_settings)
    timings: dict[str, float] = {}
    try:
        # 1. serve, prompt-major so that a budget cut leaves whole prompts.
        jobs = [(i, k, prompt) for i, prompt in enumerate(prompts)
                for k in range(args.samples if i in requests.held_out_ids else args.train_samples)]
        started = time.monotonic()
        phase1 = asyncio.run(serve_jobs(url, model_name, jobs, sampling, args.concurrency, args.budget_s))
        timings["serve_s"] = time.monotonic() - started
        ok = [r for r in phase1 if r["ok"]]
        records = wait_for_records(log_dir, len(ok))
        print(f"phase 1: {len(ok)}/{len(phase1)} answered in {timings['serve_s']:.0f} s, {len(records)} logged",
              flush=True)

        # 2. retrain on the log's train slice, once per censoring rule.
        timings.update(retrain(args, log_dir, serve_artifact, retrained_by_rule))

        # 3. serve held-out prompts again, swapping the predictor a quarter of the way in.
        answered = {r["prompt"] for r in ok}
        held_out = sorted(requests.held_out_ids & answered)
        handle = serve.get_deployment_handle("Predictor", app_name=PREDICTOR_APP_NAME)
        new_version = artifact_version(retrained, PREDICTOR_SETTINGS["max_length"], False)
        swap: dict[str, Any] = {}

        async def maybe_swap(done: int) -> None:
            if "task" not in swap and done >= len(held_out) // 4:
                swap["sent_before"] = done
                swap["task"] = asyncio.create_task(asyncio.to_thread(
                    deploy_predictor, {**PREDICTOR_SETTINGS, "artifact_dir": str(retrained)}, predictor_app_args))

        async def phase3() -> list[dict]:
            results = await serve_jobs(url, model_name, [(i, args.samples, prompts[i]) for i in held_out],
                                       sampling, args.concurrency, float("inf"), maybe_swap)
            if "task" in swap:
                await swap["task"]
            return results

        started = time.monotonic()
        phase3_results = asyncio.run(phase3())
        timings["swap_phase_s"] = time.monotonic() - started
        deadline = time.monotonic() + 120
        while handle.status.remote().result()["version"] != new_version and time.monotonic() < deadline:
            time.sleep(0.5)
        all_records = wait_for_records(log_dir, len(records) + sum(r["ok"] for r in phase3_results))
        phase1_ids = {r.request_id for r in records}
        versions: dict[str, int] = defaultdict(int)
        for record in all_records:
            if record.request_id not in phase1_ids:
                versions[record.predictor_version or "none"] += 1
        swap_report = {"requests": len(phase3_results), "failed": sum(not r["ok"] for r in phase3_results),
                       "placements": dict(Counter(str(r.get("placement")) for r in phase3_results)),
                       "fallbacks": dict(Counter(r["fallback"] for r in phase3_results if r.get("fallback"))),
                       "sent_before_swap": swap.get("sent_before"), "logged_by_version": dict(versions),
                       "new_version": new_version, "predictor_status": handle.status.remote().result()}
        print(f"phase 3: {swap_report['requests']} requests, {swap_report['failed']} failed, versions "
              f"{dict(versions)}", flush=True)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()

    predictors = loop_predictors(args, serve_artifact, {output.name: output for output in retrained_by_rule.values()})
    summary = compare(score_held_out(log_dir, phase1_ids, predictors, requests.conversation_of, args.holdout,
                                     requests.train_only))
    result = {
        "command": command, "work_dir": str(work), "args": vars(args), "summary": summary, "timings_s": timings,
        "swap": swap_report,
        "phase1": {"sent": len(phase1), "answered": len(ok), "logged": len(records),
                   # "none": no predictor score reached the record (placed without one, its late score lost)
                   "logged_by_version": dict(Counter(r.predictor_version or "none" for r in records)),
                   "placements": dict(Counter(str(r.get("placement")) for r in ok)),
                   "fallbacks": dict(Counter(r["fallback"] for r in ok if r.get("fallback"))),
                   "finish_reasons": dict(Counter(str(r.get("finish")) for r in ok)),
                   "output_tokens_per_s": sum(r["tokens"] for r in ok) / timings["serve_s"]},
        "retrain": retrain_report(retrained_by_rule),
    }
    write_results(args.out, result, args.censored[0], sampling)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
