"""DVC stage: fetch the SMS Spam Collection into data/raw/ from the first source whose sha256 matches."""

from gpt2lab.fetch import download_dataset
from gpt2lab.params import load_params
from gpt2lab.stage import run_stage

OUT = "data/raw/SMSSpamCollection.tsv"  # with source.json beside it


def main() -> None:
    params = load_params()
    data = params.data
    record = download_dataset(data.sources, data.sha256, OUT, timeout_s=data.timeout_s, retries=data.retries)
    print(f"download_data: wrote {OUT} ({record['bytes']} bytes) from {record['source']}")


if __name__ == "__main__":
    run_stage(main)
