"""DVC stage: fine-tune the spam classifier on models/base; write models/classifier/ and its metrics."""

from gpt2lab.cli import run_stage
from gpt2lab.config import load_params
from gpt2lab.tracking import stage_run
from gpt2lab.train import remove_checkpoint, train_classifier, write_outputs

BASE = "models/base"
DATA = "data/prepared"
OUT = "models/classifier"
CHECKPOINTS = "models/train-checkpoint"  # not a stage output: DVC must not delete it before a resume
METRICS = "metrics/train.json"
CURVE = "metrics/train_curve.tsv"
PLOTS = "metrics/train_plots"


def main() -> None:
    params = load_params(sections=["lora", "train"])
    with stage_run("train") as run:  # on success it also logs METRICS, CURVE and PLOTS (see dvc.yaml)
        result = train_classifier(
            BASE, DATA, OUT, params.lora, params.train, params.seed, checkpoint_dir=CHECKPOINTS, progress=True
        )
        write_outputs(result, METRICS, CURVE, PLOTS)
        run.log_curves(result["history"]["steps"], prefix="step/", exclude=("epoch",))
        run.log_curves(result["history"]["eval"], exclude=("epoch", "examples_seen"))
        run.log_classifier(OUT, BASE)
    remove_checkpoint(CHECKPOINTS)  # only now that all is saved and logged: a kill before this resumes
    m = result["metrics"]
    print(
        f"train: {m['mode']} {m['trainable_params']:,}/{m['total_params']:,} params trained, "
        f"val accuracy {m['val_accuracy']:.4f}, {m['examples_per_s']:.1f} examples/s, "
        f"{m['wall_time_s']:.0f} s; wrote {OUT}/, {METRICS}, {CURVE}, {PLOTS}/"
    )


if __name__ == "__main__":
    run_stage(main)
