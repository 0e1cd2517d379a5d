"""DVC stage: check all of params.yaml before any other stage runs (every stage depends on its stamp).

A bad value (say `dvc exp run -S lora.rank=0`) stops the pipeline here, before DVC removes any
other stage's outputs to re-run it. The stamp's content never changes, so a passing check
re-runs nothing downstream.
"""

from gpt2lab.fileio import write_atomic
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage

STAMP = "data/params-valid"


def main() -> None:
    load_params()
    write_atomic(STAMP, "params.yaml is valid\n")


if __name__ == "__main__":
    run_stage(main)
