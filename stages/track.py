"""DVC stage: log this execution's results (every stage's) as one MLflow run with the model."""

from gpt2lab.stage import run_stage
from gpt2lab.tracking import PipelineFiles, log_pipeline_run

RECORD = "models/mlflow_run.json"
FILES = PipelineFiles(
    metrics={"data": "data/prepared/stats.json", "train": "metrics/train.json", "eval": "metrics/eval.json",
             "generate": "metrics/generate.json"},  # fmt: skip
    curves={"": "metrics/train_curve.tsv", "step/": "metrics/train_steps.tsv"},
    artifacts={
        "metrics": ["metrics/train.json", "metrics/eval.json", "metrics/generate.json", "metrics/predictions.csv",
                    "data/prepared/stats.json"],  # fmt: skip
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
