"""Fit the shipped predictor's length distribution (``ltr.scheduling.length_distribution``) on the validation split.

    python -m ltr.predictor.length_distribution            # writes ltr/artifacts/predictor/length_distribution.json

Split scores are cached under the cache dir, keyed by the predictor's weights and config, so the simulator
study (which scores the test split) and this command share one scoring pass per split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ltr.models import cache_dir
from ltr.predictor.model import CONFIG_NAME, WEIGHTS_NAME, load_shipped_predictor, shipped_artifact_dir
from ltr.scheduling.length_distribution import SHIPPED_PATH, fit_length_distribution


def shipped_split_scores(split: str) -> tuple[np.ndarray, list]:
    """(shipped predictor scores, pairs) of one split ("val" or "test"), computed once and cached."""
    from ltr.data import load_pairs, split_pairs

    pairs = getattr(split_pairs(load_pairs()), split)
    artifact = shipped_artifact_dir()
    digest = hashlib.sha256((artifact / WEIGHTS_NAME).read_bytes() + (artifact / CONFIG_NAME).read_bytes())
    path = cache_dir() / "scores" / f"{digest.hexdigest()[:16]}-{split}-{len(pairs)}.npy"
    if path.is_file():
        return np.load(path), pairs
    scores = np.asarray(load_shipped_predictor().score([p.prompt for p in pairs]), dtype=float)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, scores)
    tmp.replace(path)
    return scores, pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bins", type=int, default=10, help="score bins (validation-score quantiles)")
    ap.add_argument("--levels", type=int, default=16, help="length quantile intervals per bin")
    ap.add_argument("--pooled-levels", type=int, default=64, help="length quantile intervals of the pooled tail")
    ap.add_argument("--output", type=Path, default=SHIPPED_PATH)
    args = ap.parse_args(argv)
    scores, pairs = shipped_split_scores("val")
    dist = fit_length_distribution(scores, [p.output_len for p in pairs], args.bins, args.levels, args.pooled_levels)
    command = "python -m ltr.predictor.length_distribution " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {**dist.to_mapping(), "n_val": len(pairs), "command": command.strip()}
    args.output.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
