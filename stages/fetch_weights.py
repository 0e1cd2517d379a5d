"""DVC stage: fetch the pretrained GPT-2 (or a seeded random init) into models/base/."""

from gpt2lab.cli import run_stage
from gpt2lab.config import load_params
from gpt2lab.tracking import stage_run
from gpt2lab.weights import WeightsUnavailableError, fetch_weights, read_config

OUT = "models/base"


def main() -> None:
    params = load_params(sections=["model", "weights"])
    with stage_run("fetch_weights") as run:
        try:
            path = fetch_weights(params.model, params.weights, params.seed, OUT)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(f"{err}. For an offline run use `make smoke`.") from err
        meta = read_config(path)
        run.set_tags({"base.sha256": meta["sha256"], "base.pretrained": meta.get("pretrained", False)})
    print(f"fetch_weights: wrote {path} (source {params.weights.source}, model {params.model.name})")


if __name__ == "__main__":
    run_stage(main)
