"""DVC stage: sample continuations of params.yaml's prompts from models/base/ into metrics/generate.json."""

import json

from gpt2lab.fileio import write_atomic
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage
from gpt2lab.textgen import generate_samples

MODEL = "models/base"
OUT = "metrics/generate.json"


def main() -> None:
    params = load_params()
    result = generate_samples(MODEL, params.generate)
    write_atomic(OUT, json.dumps(result, indent=2) + "\n")
    for s in result["samples"]:
        print(f"generate: {s['prompt']!r} -> {s['completion']!r} ({s['tokens_per_s']} tokens/s)")
    print(f"generate: wrote {OUT}")


if __name__ == "__main__":
    run_stage(main)
