"""DVC stage: score models/classifier on every split; write metrics, predictions and plots."""

from gpt2lab.cli import run_stage
from gpt2lab.config import load_params
from gpt2lab.evaluate import evaluate_classifier, write_outputs
from gpt2lab.tracking import stage_run

CLASSIFIER = "models/classifier"
DATA = "data/prepared"
METRICS = "metrics/eval.json"
PREDICTIONS = "metrics/predictions.csv"
PLOTS = "metrics/plots"


def main() -> None:
    params = load_params(sections=["eval"]).eval
    with stage_run("evaluate") as run:  # on success it also logs METRICS and the plots (see dvc.yaml)
        result = evaluate_classifier(
            CLASSIFIER, DATA, batch_size=params.batch_size, precision=params.precision, threshold=params.threshold
        )
        write_outputs(result, METRICS, PREDICTIONS, PLOTS)
        run.log_artifact(PREDICTIONS, "metrics")
    m = result["metrics"]
    scores = ", ".join(f"{s} accuracy {m[s]['accuracy']:.4f} F1 {m[s]['f1']:.4f}" for s in ("train", "test"))
    print(f"evaluate: {scores}; wrote {METRICS}, {PREDICTIONS}, {PLOTS}/")


if __name__ == "__main__":
    run_stage(main)
