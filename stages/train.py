"""DVC stage: fine-tune the spam classifier on models/base; write models/classifier/ and its metrics."""

from gpt2lab.params import load_params
from gpt2lab.resume import checkpoints_root, remove_checkpoint
from gpt2lab.stage import run_stage
from gpt2lab.train import train_classifier, write_outputs

BASE = "models/base"
DATA = "data/prepared"
OUT = "models/classifier"
METRICS = "metrics/train.json"
DETAILS = "metrics/train_details.json"
CURVE = "metrics/train_curve.tsv"
STEPS = "metrics/train_steps.tsv"
PLOTS = "metrics/train_plots"


def main() -> None:
    params = load_params()
    result = train_classifier(BASE, DATA, OUT, params.lora, params.train, params.seed,
                              checkpoint_dir=checkpoints_root(), progress=True)  # fmt: skip
    write_outputs(result, METRICS, DETAILS, CURVE, PLOTS, STEPS)
    remove_checkpoint(result["checkpoint_dir"])  # only now that all is saved: a kill before this resumes
    m = result["metrics"]
    print(
        f"train: {m['mode']} {m['trainable_params']:,}/{m['total_params']:,} params trained, "
        f"val accuracy {m['val_accuracy']:.4f}{'' if m['base_pretrained'] else ' (random base)'}, "
        f"{m['examples_per_s']:.1f} examples/s, {m['wall_time_s']:.0f} s; wrote {OUT}/ and metrics/"
    )


if __name__ == "__main__":
    run_stage(main)
