"""A team's setup end to end: one MLflow server on a real PostgreSQL with proxied artifacts, the smoke
pipeline and two queued experiments logging to it at once, the Model Registry (a version per run, the
champion alias served from outside the repository), base checkpoints stored once, a server stopped
mid-run, and a shared DVC remote with a bare git remote: a second clone pulls the experiment and
reproduces it without running a stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import requests

from tests.e2e.repo import IMPORT_HOOK, Repo, clone, executed, start_queue, wait_for_queue
from tests.helpers import MESSAGES, MlflowServer, free_port, wait_until_serving

QUEUED = ("q-rank2", "q-rank8")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _serve_champion(url: str, outside: Path, env: dict[str, str]) -> tuple[list, list]:
    """(what POST /invocations answers, what `gpt2lab classify --json` prints) for models:/gpt2lab-spam@champion,
    both run from ``outside`` (no repository there), the store named only by MLFLOW_TRACKING_URI."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/gpt2lab-spam@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = outside.parent / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            cmd, cwd=outside, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}", log)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": {"text": MESSAGES}}, timeout=120)
        assert answer.status_code == 200, answer.text
        served = answer.json()["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    done = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "classify", "--json", "--model",
                           "models:/gpt2lab-spam@champion", *MESSAGES], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=300, check=True)  # fmt: skip
    return served, json.loads(done.stdout)


@pytest.fixture(scope="module")
def team(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("team")
    for folder in ("hook", "imports", "a", "outside", "server"):
        (base / folder).mkdir()
    (base / "hook" / "sitecustomize.py").write_text(IMPORT_HOOK)
    clone(base / "a")
    repo = Repo(base / "a", base / "hook", base / "imports")
    s: dict = {"repo": repo, "base": base}

    # A shared git remote and DVC remote, committed so every clone (and experiment copy) has them.
    subprocess.run(["git", "init", "-q", "--bare", str(base / "origin.git")], check=True)
    repo.run("git", "remote", "add", "origin", str(base / "origin.git"))
    repo.dvc("remote", "add", "-d", "shared", str(base / "dvc-remote"))
    repo.run("git", "commit", "-qam", "shared DVC remote")
    repo.run("git", "push", "-q", "origin", "HEAD:refs/heads/main")

    artifacts = base / "server" / "artifacts"
    with MlflowServer(postgres, artifacts, base / "server" / "mlflow.log") as server:
        repo.env["MLFLOW_TRACKING_URI"] = server.url  # the only thing a client sets
        s["url"] = server.url
        s["smoke"] = repo.smoke("team-smoke")
        s["bytes_after_smoke"] = _bytes(artifacts)
        for rank, name in zip((2, 8), QUEUED):
            repo.smoke(name, "-S", f"lora.rank={rank}", "--", "--queue")
        start_queue(repo)
        try:
            s["queue"] = wait_for_queue(repo, QUEUED)
            s["queue_logs"] = {n: repo.dvc("queue", "logs", n, check=False).stdout for n in QUEUED}
        finally:
            repo.dvc("queue", "stop", "--kill", check=False)
        s["bytes_after_queue"] = _bytes(artifacts)
        client = mlflow.MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        experiment = client.get_experiment_by_name("gpt2lab")
        s["runs"] = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        s["artifacts"] = {name: {f.path for f in client.list_artifacts(run.info.run_id)}
                          for name, run in s["runs"].items()}  # fmt: skip
        s["versions"] = {v.run_id: v for v in client.search_model_versions("name = 'gpt2lab-spam'")}
        s["models"] = client.search_logged_models([experiment.experiment_id])

        champion = s["versions"][s["runs"]["q-rank8"].info.run_id].version
        s["promote"] = repo.run(sys.executable, "-m", "gpt2lab.cli", "promote", str(champion)).stdout
        s["champion"] = champion
        env = {k: v for k, v in repo.env.items() if k not in ("PYTHONPATH", "GPT2LAB_IMPORT_LOG")}
        env["PYTHONPATH"] = str(repo.root / "src")
        env["GPT2LAB_CACHE"] = str(base / "fresh-cache")  # another machine: the base comes from the server
        s["served"], s["classified"] = _serve_champion(server.url, base / "outside", env)

        s["push"] = repo.dvc("exp", "push", "origin", "team-smoke")

        server.stop()  # mid-run: the next experiment evaluates, then cannot log
        cmd = (sys.executable, "-m", "gpt2lab.cli", "smoke", "-n", "no-server", "-S", "eval.threshold=0.4")
        s["stopped"] = repo.run(*cmd, check=False)

    # A teammate's fresh clone: pull the experiment, reproduce it without running a stage.
    subprocess.run(["git", "clone", "-q", "-b", "main", str(base / "origin.git"), str(base / "b")], check=True)
    other = Repo(base / "b", base / "hook", base / "imports")
    other.run("git", "config", "user.name", "teammate")
    other.run("git", "config", "user.email", "teammate@gpt2lab")
    s["pull"] = other.dvc("exp", "pull", "origin", "team-smoke")
    other.dvc("exp", "apply", "team-smoke")
    done = other.dvc("repro")
    s["other_repro"] = done.stdout + done.stderr
    s["other"] = other
    return s


@pytest.mark.slow
def test_every_run_metric_artifact_and_model_lands_on_the_server(team: dict) -> None:
    assert team["queue"] == dict.fromkeys(QUEUED, "Success"), team["queue_logs"]
    runs = team["runs"]
    assert {"team-smoke", *QUEUED} <= set(runs)
    for name in ("team-smoke", *QUEUED):
        run = runs[name]
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert {"test/accuracy", "generation/tokens_per_s", "loss/val", "step/loss"} <= set(run.data.metrics)
        assert {"metrics", "plots", "params.yaml"} <= team["artifacts"][name]
        assert run.info.run_id in {m.source_run_id for m in team["models"]}
    assert (runs["q-rank2"].data.params["lora.rank"], runs["q-rank8"].data.params["lora.rank"]) == ("2", "8")
    leftovers = [p for p in team["repo"].root.rglob("mlflow.db*")] + list((team["base"] / "outside").rglob("*.db"))
    assert not leftovers, "everything goes to the server: no local store"


@pytest.mark.slow
def test_each_run_is_a_registered_version_and_the_champion_is_served(team: dict) -> None:
    versions = team["versions"]
    for name in ("team-smoke", *QUEUED):
        version = versions[team["runs"][name].info.run_id]
        assert version.tags["dvc.exp_name"] == name and version.tags["base.pretrained"] == "false"
        assert len(version.tags["git.commit"]) == 40 and "test.f1" in version.tags
    assert "registered as version" in team["smoke"] and "mlflow models serve -m models:/gpt2lab-spam/" in team["smoke"]
    assert team["promote"].startswith(f"models:/gpt2lab-spam@champion -> version {team['champion']} ")
    served, classified = team["served"], team["classified"]
    assert [s["label"] for s in served] == [c["label"] for c in classified]
    assert [s["spam_probability"] for s in served] == pytest.approx([c["spam_probability"] for c in classified], rel=1e-6)


@pytest.mark.slow
def test_a_second_experiment_on_the_same_base_adds_adapter_sized_bytes(team: dict) -> None:
    added = (team["bytes_after_queue"] - team["bytes_after_smoke"]) / len(QUEUED)
    first = team["bytes_after_smoke"]
    print(f"artifact bytes: first experiment {first}, each further one {added:.0f}")
    assert added < first / 4, (first, added)


@pytest.mark.slow
def test_a_stopped_server_fails_the_run_with_one_clear_line(team: dict) -> None:
    done = team["stopped"]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and team["url"] in errors[0] and "unreachable" in errors[0], done.stderr


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_experiment_and_reproduces_it_without_running(team: dict) -> None:
    out = team["other_repro"]
    assert executed(out) == set(), out
    other: Repo = team["other"]
    assert other.status() == {}
    assert (other.root / "models" / "classifier" / "adapter.safetensors").is_file()
    record = json.loads((other.root / "models" / "mlflow_run.json").read_text())
    assert record["run_id"] == team["runs"]["team-smoke"].info.run_id
