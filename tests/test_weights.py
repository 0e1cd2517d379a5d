"""Where base weights come from: a clear line offline, the download cache used once."""

from __future__ import annotations

import pytest

from gpt2lab import weights
from gpt2lab.checkpoint import CheckpointError
from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.weights import WeightsUnavailableError, fetch_weights
from tests.conftest import TINY, make_hf_checkpoint
from tests.helpers import CORRUPTIONS, corrupt


def test_unreachable_source_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("gpt2lab.weights.OPENAI_MIRRORS", ("http://127.0.0.1:9/{size}/{file}",))
    with pytest.raises(WeightsUnavailableError, match="no internet"):
        fetch_weights(ModelParams(), WeightsParams(source="openai", retries=0, timeout_s=2), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hf_server(hf_tiny, tmp_path, monkeypatch):
    """The tiny Hugging Face files served over loopback HTTP as the hf source; yields the requests served."""
    import functools
    import http.server
    import threading

    _, folder = hf_tiny
    served: list[str] = []

    class Files(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            served.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Files, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("gpt2lab.weights.HF_URL", f"http://127.0.0.1:{server.server_address[1]}/{{file}}")
    yield served
    server.shutdown()
    server.server_close()


HF = WeightsParams(source="hf", retries=0, timeout_s=5)


def test_downloaded_checkpoint_is_cached_once_and_converted(hf_server, tmp_path, monkeypatch):
    """Files land in the cache (beside their lock and sha256 records) and are converted; fetching
    the same model again converts the cached files and downloads nothing."""
    monkeypatch.setitem(weights.PRESETS, "gpt2", TINY)  # the served files stand for gpt2
    first = fetch_weights(ModelParams(), HF, 0, tmp_path / "a")
    assert sorted(hf_server) == ["/config.json", "/model.safetensors"]
    second = fetch_weights(ModelParams(), HF, 0, tmp_path / "b")
    assert len(hf_server) == 2  # both files came from the cache
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    cached = sorted(p.name for p in (tmp_path / "cache" / "hf" / "gpt2").iterdir())
    assert cached == [".config.json.lock", ".config.json.sha256", ".model.safetensors.lock",
                      ".model.safetensors.sha256", "config.json", "model.safetensors"]  # fmt: skip


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_damaged_cached_download_is_fetched_again(hf_server, tmp_path, monkeypatch, caplog, kind):
    monkeypatch.setitem(weights.PRESETS, "gpt2", TINY)
    fetch_weights(ModelParams(), HF, 0, tmp_path / "a")
    cached = tmp_path / "cache" / "hf" / "gpt2" / "model.safetensors"
    _, other = make_hf_checkpoint(TINY, tmp_path / "other", seed=1)  # another model's file of the same name
    corrupt(cached, kind, other / "model.safetensors")
    with caplog.at_level("WARNING"):
        again = fetch_weights(ModelParams(), HF, 0, tmp_path / "b")
    assert "does not verify (sha256" in caplog.text and hf_server.count("/model.safetensors") == 2
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()


def test_a_checkpoint_of_another_size_is_not_accepted_as_the_named_model(hf_server, tmp_path):
    with pytest.raises(CheckpointError, match=r"has n_layer 2 \(expected 12\), n_embd 32 \(expected 768\)"):
        fetch_weights(ModelParams(), HF, 0, tmp_path / "a")  # gpt2 asked for, a 2-layer file served
    assert not (tmp_path / "a").exists()
