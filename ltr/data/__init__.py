"""ShareGPT first-turn pairs with answer lengths in the served model's tokens, splits and traces; the
served-traffic log (the served model's own answer lengths)."""

from ltr.data.served_log import (
    ServedLogConfig,
    ServedLogWriter,
    ServedRecord,
    log_extra_args,
    read_served_log,
    record_from_request,
)
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
    "write_trace", "ServedLogConfig", "ServedLogWriter", "ServedRecord", "log_extra_args", "read_served_log",
    "record_from_request",
]
