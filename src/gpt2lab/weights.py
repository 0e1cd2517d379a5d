"""Where the base weights come from: OpenAI's mirrors, Hugging Face, a local file or a seeded init.

:func:`fetch_weights` is the ``fetch_weights`` stage's library call: it downloads the chosen
source into the shared download cache and converts it into the canonical folder.
"""

from __future__ import annotations

from pathlib import Path

from gpt2lab.checkpoint import CheckpointError, random_checkpoint
from gpt2lab.convert import convert_checkpoint
from gpt2lab.errors import Gpt2labError
from gpt2lab.fetch import DownloadError, fetch_cached
from gpt2lab.fileio import cache_dir
from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.presets import HF_REPOS, OPENAI_SIZES, PRESETS

OPENAI_MIRRORS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{size}/{file}",
)
OPENAI_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.meta",
    "model.ckpt.data-00000-of-00001",
    "encoder.json",
    "vocab.bpe",
)
HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
HF_FILES = ("config.json", "model.safetensors")


class WeightsUnavailableError(Gpt2labError, RuntimeError):
    """Pretrained weights could not be downloaded from any source."""


def _download_all(urls: dict[str, list[str]], folder: Path, params: WeightsParams) -> None:
    for name, sources in urls.items():
        try:  # a file already in the cache is kept; another process fetching it is waited for
            fetch_cached(sources, folder / name, timeout_s=params.timeout_s, retries=params.retries)
        except DownloadError as err:
            raise WeightsUnavailableError(
                f"cannot download {name} (no internet?); tried {', '.join(sources)}"
            ) from err


def fetch_weights(model: ModelParams, weights: WeightsParams, seed: int, out_dir: str | Path) -> Path:
    """Produce the canonical checkpoint folder for the chosen model and source."""
    if weights.source == "random":
        return random_checkpoint(model.to_config(), seed, out_dir)
    if weights.source == "local":
        return convert_checkpoint(Path(weights.path).expanduser(), out_dir)
    if model.overrides_size:
        raise CheckpointError("model size overrides only apply to weights.source: random")
    if weights.source == "openai":
        size = OPENAI_SIZES[model.name]
        folder = cache_dir() / "openai" / size
        urls = {f: [m.format(size=size, file=f) for m in OPENAI_MIRRORS] for f in OPENAI_FILES}
    else:
        folder = cache_dir() / "hf" / model.name
        urls = {f: [HF_URL.format(repo=HF_REPOS[model.name], file=f)] for f in HF_FILES}
    _download_all(urls, folder, weights)
    return convert_checkpoint(folder, out_dir, expected=PRESETS[model.name])
