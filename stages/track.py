"""DVC stage: log this execution's results (every stage's) as one MLflow run with the model."""

from gpt2lab.stage import run_stage
from gpt2lab.tracking import PipelineFiles, log_pipeline_run

RECORD = "models/mlflow_run.json"
FILES = PipelineFiles(
    # Headline numbers only: test/f1, ..., training/examples_per_s, generation/tokens_per_s.
    metrics={"training/": "metrics/train.json", "generation/": "metrics/generate.json"},
    scores="metrics/eval_details.json",
    score_keys=("f1", "accuracy", "precision", "recall", "roc_auc"),  # per split; not the counts
    # Each pair under one prefix, so MLflow groups it: loss/train beside loss/val.
    curves={
        "metrics/train_curve.tsv": {"train_loss": "loss/train", "val_loss": "loss/val",
                                    "train_acc": "accuracy/train", "val_acc": "accuracy/val"},  # fmt: skip
        "metrics/train_steps.tsv": {"loss": "step/loss", "lr": "step/lr"},
    },
    datasets={split: f"data/prepared/{split}.csv" for split in ("train", "validation", "test")},
    artifacts={
        "metrics": ["metrics/train.json", "metrics/train_details.json", "metrics/eval.json",
                    "metrics/eval_details.json", "metrics/generate.json", "metrics/samples.json",
                    "metrics/predictions.csv", "data/prepared/stats.json"],  # fmt: skip
        "plots": ["metrics/train_curve.tsv", "metrics/train_steps.tsv", "metrics/train_plots", "metrics/plots"],
    },
    raw_dir="data/raw",
    base_dir="models/base",
    classifier_dir="models/classifier",
)


def main() -> None:
    run = log_pipeline_run(FILES, RECORD)
    print(f"track: MLflow run {run['run_id']} ({run['run_name']}) in {run['tracking_uri']}; model {run['model_uri']}")
    print(f"track: registered as version {run['model_version']} of {run['registered_model']}; serve it with:")
    print(f"  {run['serve']}")


if __name__ == "__main__":
    run_stage(main)
