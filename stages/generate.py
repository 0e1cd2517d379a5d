"""DVC stage: sample continuations of params.yaml's prompts from models/base/: tokens/s into
metrics/generate.json (a DVC metric), the samples into metrics/samples.json."""

import json

from gpt2lab.fileio import write_atomic
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage
from gpt2lab.textgen import generate_samples

MODEL = "models/base"
METRICS = "metrics/generate.json"
SAMPLES = "metrics/samples.json"


def main() -> None:
    params = load_params()
    result = generate_samples(MODEL, params.generate, progress=True)
    write_atomic(METRICS, json.dumps({"tokens_per_s": result["tokens_per_s"]}, indent=2) + "\n")
    write_atomic(SAMPLES, json.dumps(result, indent=2) + "\n")
    first = result["samples"][0] if result["samples"] else {"prompt": "", "completion": ""}
    noise = ", random weights: noise" if not result["pretrained"] else ""
    print(f"generate: {len(result['samples'])} samples at {result['tokens_per_s']} tokens/s{noise}, e.g. "
          f"{first['prompt']!r} -> {first['completion'][:60]!r}; wrote {METRICS}, {SAMPLES}")


if __name__ == "__main__":
    run_stage(main)
