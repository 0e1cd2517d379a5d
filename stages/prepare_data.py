"""DVC stage: parse, balance and split data/raw/ into data/prepared/{train,validation,test}.csv + stats.json."""

import json

from gpt2lab.dataset import SPLITS, STATS_FILE, prepare_data
from gpt2lab.fileio import write_atomic
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage

RAW = "data/raw/SMSSpamCollection.tsv"
OUT = "data/prepared"


def main() -> None:
    params = load_params()
    data = params.data
    stats = prepare_data(RAW, OUT, seed=params.seed, balance=data.balance, dedupe=data.dedupe,
                         train_frac=data.train_frac, validation_frac=data.validation_frac)  # fmt: skip
    write_atomic(f"{OUT}/{STATS_FILE}", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    rows = " / ".join(f"{name} {stats[name]['rows']}" for name in SPLITS)
    print(f"prepare_data: wrote {OUT}/{{{','.join(SPLITS)}}}.csv ({rows}) and {OUT}/{STATS_FILE}")


if __name__ == "__main__":
    run_stage(main)
