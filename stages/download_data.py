"""DVC stage: fetch the SMS Spam Collection into data/raw/ from the first source whose sha256 matches."""

from gpt2lab.cli import run_stage
from gpt2lab.config import load_params
from gpt2lab.data import download_dataset
from gpt2lab.tracking import stage_run

OUT = "data/raw"


def main() -> None:
    params = load_params(sections=["data"])
    with stage_run("download_data") as run:
        record = download_dataset(params.data, OUT)
        run.set_tags({"data.source": record["source"]})
    print(f"download_data: wrote {OUT}/{record['file']} ({record['bytes']} bytes) from {record['source']}")


if __name__ == "__main__":
    run_stage(main)
