"""DVC stage: sample continuations of params.yaml's prompts from models/base/: tokens/s into
metrics/generate.json (a DVC metric), the samples into metrics/samples.json."""

from gpt2lab.params import load_params
from gpt2lab.stage import run_stage
from gpt2lab.textgen import generate_samples, write_outputs

MODEL = "models/base"
METRICS = "metrics/generate.json"
SAMPLES = "metrics/samples.json"


def main() -> None:
    params = load_params()
    result = generate_samples(MODEL, params.generate, progress=True)
    write_outputs(result, METRICS, SAMPLES)
    first = result["samples"][0] if result["samples"] else {"prompt": "", "completion": ""}
    noise = ", random weights: noise" if not result["pretrained"] else ""
    print(f"generate: {len(result['samples'])} samples at {result['tokens_per_s']} tokens/s{noise}, e.g. "
          f"{first['prompt']!r} -> {first['completion'][:60]!r}; wrote {METRICS}, {SAMPLES}")


if __name__ == "__main__":
    run_stage(main)
