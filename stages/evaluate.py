"""DVC stage: score models/classifier on every split; write the headline metrics (a DVC metric),
the details (counts, confusion matrices), predictions and plots."""

from gpt2lab.evaluate import evaluate_classifier, write_outputs
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage

CLASSIFIER = "models/classifier"
DATA = "data/prepared"
METRICS = "metrics/eval.json"
DETAILS = "metrics/eval_details.json"
PREDICTIONS = "metrics/predictions.csv"
PLOTS = "metrics/plots"


def main() -> None:
    params = load_params()
    e = params.eval
    result = evaluate_classifier(CLASSIFIER, DATA, batch_size=e.batch_size, precision=e.precision, threshold=e.threshold,
                                 device=e.device, progress=True)  # fmt: skip
    write_outputs(result, METRICS, PREDICTIONS, PLOTS, DETAILS)
    m = result["metrics"]
    scores = ", ".join(f"{s} F1 {m[s]['f1']:.4f} accuracy {m[s]['accuracy']:.4f}" for s in ("test", "train"))
    random = "" if m["base_pretrained"] else " (random base)"
    print(f"evaluate: {scores}{random}; wrote {METRICS}, {DETAILS}, {PREDICTIONS}, {PLOTS}/")


if __name__ == "__main__":
    run_stage(main)
