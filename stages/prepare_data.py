"""DVC stage: parse, balance and split data/raw/ into data/prepared/{train,validation,test}.csv."""

import json

from gpt2lab.cli import run_stage
from gpt2lab.config import load_params
from gpt2lab.data import RAW_FILE, SPLITS, prepare_data
from gpt2lab.download import write_atomic
from gpt2lab.tracking import stage_run

RAW = f"data/raw/{RAW_FILE}"
OUT = "data/prepared"
METRICS = "metrics/data.json"


def main() -> None:
    params = load_params(sections=["data"])
    with stage_run("prepare_data"):  # logs metrics/data.json (declared in dvc.yaml) when done
        metrics = prepare_data(RAW, OUT, params.data, params.seed)
        write_atomic(METRICS, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    rows = " / ".join(f"{name} {metrics[name]['rows']}" for name in SPLITS)
    print(f"prepare_data: wrote {OUT}/{{{','.join(SPLITS)}}}.csv ({rows}) and {METRICS}")


if __name__ == "__main__":
    run_stage(main)
