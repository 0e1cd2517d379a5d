"""DVC stage: fetch the pretrained GPT-2 (or a seeded random init) into models/base/."""

from gpt2lab.params import load_params
from gpt2lab.stage import run_stage
from gpt2lab.weights import WeightsUnavailableError, fetch_weights

OUT = "models/base"


def main() -> None:
    params = load_params()
    try:
        path = fetch_weights(params.model, params.weights, params.seed, OUT)
    except WeightsUnavailableError as err:
        raise WeightsUnavailableError(f"{err}. For an offline run use `make smoke`.") from err
    note = "; RANDOM weights: every result of this run is a smoke check only" if params.weights.source == "random" else ""
    print(f"fetch_weights: wrote {path} (source {params.weights.source}, model {params.model.name}){note}")


if __name__ == "__main__":
    run_stage(main)
