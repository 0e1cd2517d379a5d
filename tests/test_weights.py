"""Where base weights come from: a clear line offline, the download cache used once."""

from __future__ import annotations

import pytest

from gpt2lab.params import ModelParams, WeightsParams
from gpt2lab.weights import WeightsUnavailableError, fetch_weights


def test_unreachable_source_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("gpt2lab.weights.OPENAI_MIRRORS", ("http://127.0.0.1:9/{size}/{file}",))
    with pytest.raises(WeightsUnavailableError, match="no internet"):
        fetch_weights(ModelParams(), WeightsParams(source="openai", retries=0, timeout_s=2), 0, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_downloaded_checkpoint_is_cached_once_and_converted(hf_tiny, tmp_path, monkeypatch):
    """Hugging Face files served over loopback HTTP land in the cache (beside their lock files) and
    are converted; fetching the same model again converts the cached files and downloads nothing."""
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
    try:
        monkeypatch.setenv("GPT2LAB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr("gpt2lab.weights.HF_URL", f"http://127.0.0.1:{server.server_address[1]}/{{file}}")
        params = WeightsParams(source="hf", retries=0, timeout_s=5)
        first = fetch_weights(ModelParams(), params, 0, tmp_path / "a")
        assert sorted(served) == ["/config.json", "/model.safetensors"]
        second = fetch_weights(ModelParams(), params, 0, tmp_path / "b")
        assert len(served) == 2  # both files came from the cache
    finally:
        server.shutdown()
        server.server_close()
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    cached = sorted(p.name for p in (tmp_path / "cache" / "hf" / "gpt2").iterdir())
    assert cached == [".config.json.lock", ".model.safetensors.lock", "config.json", "model.safetensors"]
