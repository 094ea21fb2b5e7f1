"""ShareGPT first-turn pairs with answer lengths in the served model's tokens, splits and traces."""

from ltr.data.sharegpt import (
    DataError,
    Pair,
    Splits,
    iter_sharegpt_records,
    load_pairs,
    read_trace,
    split_pairs,
    write_trace,
)

__all__ = [
    "DataError", "Pair", "Splits", "iter_sharegpt_records", "load_pairs", "read_trace", "split_pairs",
    "write_trace",
]
