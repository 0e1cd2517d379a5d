"""The DVC pipeline end to end in a temporary clone with real DVC and MLflow: an offline repro, the
smoke profile twice (the second restores every stage from DVC's run-cache), a no-op repro, what
`dvc status` lists after a code or param change, a param experiment, then the smoke profile
again (restored, not retrained), queued experiments, and the runs read back through MLflow's REST API."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.repo import IMPORT_HOOK, Repo, clone, executed, start_queue, wait_for_queue
from tests.helpers import wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("validate_params", "download_data", "prepare_data", "fetch_weights", "generate", "train", "evaluate",
          "track")
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
RESULT_NEUTRAL = {"src/gpt2lab/__init__.py", "src/gpt2lab/errors.py", "src/gpt2lab/stage.py"}
MODEL_STAGES = {name for name, stage in DVC_YAML["stages"].items() if "src/gpt2lab/model.py" in stage["deps"]}


# --------------------------------------------------------------------------- end to end


def _run_next_steps(repo: Repo, smoke_output: str) -> dict[str, tuple[int, str]]:
    """Run each command under the smoke run's "Next:" (servers: until they answer, then stopped);
    returns ``{command: (exit code, output)}``."""
    import requests

    steps = [line.split("    #")[0].strip() for line in smoke_output.split("\nNext:\n", 1)[1].splitlines()
             if line.startswith("  ")]  # fmt: skip
    results: dict[str, tuple[int, str]] = {}
    for command in steps:
        if command.startswith(("gpt2lab serve", "make ui")):
            port = 5001 if command.startswith("gpt2lab serve") else _free_port()
            env = {**repo.env, "UI_PORT": str(port), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            log = repo.root.parent / f"{command.split()[1]}.log"
            with open(log, "wb") as out:
                server = subprocess.Popen(["bash", "-c", command], cwd=repo.root, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:
                if command.startswith("gpt2lab serve"):
                    wait_until_serving(server, url, log)
                    reply = requests.post(f"{url}/invocations", timeout=60,
                                          json={"inputs": {"text": ["WIN a prize now", "see you at 6"]}})  # fmt: skip
                    code = 0 if reply.ok and len(reply.json()["predictions"]) == 2 else 1
                else:  # the MLflow UI: the run its URL names is there
                    wait_until_serving(server, url, log, path="/health")
                    run_id = re.search(r"/runs/(\w+)", smoke_output).group(1)
                    reply = requests.get(f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=60)
                    code = 0 if reply.ok else 1
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
            results[command] = (code, log.read_text())
        else:
            done = repo.run("bash", "-c", command, check=False, timeout=600)
            results[command] = (done.returncode, done.stdout + done.stderr)
    return results


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The user's path, once: offline repro, smoke, no-op repro, `-S lora.rank=4`, two queued runs."""
    base = tmp_path_factory.mktemp("pipeline")
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(IMPORT_HOOK)
    (base / "imports").mkdir()
    (base / "repo").mkdir()
    clone(base / "repo")
    repo = Repo(base / "repo", base / "hook", base / "imports")
    s: dict = {"repo": repo}
    committed = {f: (repo.root / f).read_bytes() for f in ("params.yaml", "dvc.lock")}

    # Offline with the committed params: fetch_weights cannot download GPT-2.
    s["offline"] = repo.dvc("repro", "fetch_weights", check=False)

    s["smoke"] = repo.smoke("smoke-base")
    s["workspace_unchanged"] = all((repo.root / f).read_bytes() == b for f, b in committed.items())
    s["git_status"] = repo.run("git", "status", "--porcelain").stdout
    # The new user's next hour: each next step the smoke run printed, as printed; then `make repro`.
    repo.use_this_venv()
    s["next_steps"] = _run_next_steps(repo, s["smoke"])
    repo.run("git", "checkout", "params.yaml", "dvc.lock")  # the undo the `dvc exp apply` step names
    s["repro_after_smoke"] = repo.run("make", "repro", check=False)
    repo.run("git", "checkout", "params.yaml", "dvc.lock")
    s["runs_after_smoke"] = set(repo.runs())
    s["smoke_again"] = repo.smoke("smoke-again")  # the same experiment: DVC restores every stage
    s["runs_after_smoke_again"] = set(repo.runs())

    repo.dvc("exp", "apply", "smoke-base")
    again = repo.dvc("repro")
    s["repro_again"] = again.stdout + again.stderr
    s["runs_after_repro"] = set(repo.runs())

    # What `dvc status` lists after a code change, and after result-neutral params.
    model = repo.root / "src/gpt2lab/model.py"
    source = model.read_text()
    model.write_text(source + "\n# an edit\n")
    s["status_model"] = repo.status()
    model.write_text(source)
    params = (repo.root / "params.yaml").read_text()
    edited = yaml.safe_load(params)
    edited["data"]["timeout_s"], edited["train"]["num_threads"] = 60, 1
    (repo.root / "params.yaml").write_text(yaml.safe_dump(edited))
    s["status_neutral"] = repo.status()
    (repo.root / "params.yaml").write_text(params)

    # A bad -S value: refused by the first stage, before DVC removes any output to re-run it.
    outputs = {f: (repo.root / f).read_bytes() for f in ("metrics/train.json", "models/classifier/head.safetensors")}
    runs_before = set(repo.runs())
    s["bad_value"] = repo.dvc("exp", "run", "-S", "lora.rank=0", check=False)
    s["outputs_kept"] = all((repo.root / f).read_bytes() == b for f, b in outputs.items())
    s["runs_after_bad_value"] = set(repo.runs()) - runs_before
    (repo.root / "params.yaml").write_text(params)

    rank4 = repo.dvc("exp", "run", "-S", "lora.rank=4", "-n", "rank4")
    s["rank4"] = rank4.stdout + rank4.stderr
    # The workspace now holds rank 4 (dvc.lock too); rank 16 again is smoke-base: restored, not trained.
    s["back_to_16"] = repo.smoke("back-to-16", "-S", "lora.rank=16")
    s["exp_show"] = repo.dvc("exp", "show", "--only-changed", "--no-pager", COLUMNS="120").stdout

    # The user keeps that result (commit), then queues variations of it.
    repo.run("git", "add", "-A")
    repo.run("git", "commit", "-qm", "smoke profile, rank 4")
    for rank in (2, 8):
        repo.dvc("exp", "run", "--queue", "-S", f"lora.rank={rank}", "-n", f"q-rank{rank}")
    start_queue(repo)
    try:
        s["queue"] = wait_for_queue(repo, ("q-rank2", "q-rank8"))
        s["queue_logs"] = {n: repo.dvc("queue", "logs", n, check=False).stdout for n in ("q-rank2", "q-rank8")}
    finally:
        repo.dvc("queue", "stop", "--kill", check=False)  # an idle worker would otherwise outlive the test
    s["runs"] = repo.runs()
    return s


@pytest.mark.slow
def test_offline_repro_stops_with_one_clear_line(scenario: dict) -> None:
    done = scenario["offline"]
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make smoke" in errors[0] and "no internet" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_each_next_step_the_smoke_run_prints_works_as_printed(scenario: dict) -> None:
    steps = scenario["next_steps"]
    kinds = {" ".join(command.split()[:2]) for command in steps}
    assert {"gpt2lab classify", "gpt2lab generate", "gpt2lab serve", "gpt2lab promote", "make ui", "dvc exp"} <= kinds
    uses_model = [c for c in steps if c.startswith(("gpt2lab classify", "gpt2lab generate", "gpt2lab serve"))]
    assert all("runs:/" in c for c in uses_model), steps  # the experiment's MLflow model
    for command, (code, output) in steps.items():
        assert code == 0, f"{command}:\n{output[-3000:]}"
    (classified,) = [out for c, (_, out) in steps.items() if c.startswith("gpt2lab classify")]
    assert classified.splitlines()[0].split() == ["label", "P(spam)", "message"]
    (generated,) = [out for c, (_, out) in steps.items() if c.startswith("gpt2lab generate")]
    assert re.search(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", generated)


@pytest.mark.slow
def test_make_repro_after_smoke_runs_the_real_pipeline(scenario: dict) -> None:
    """After the smoke run (and `dvc exp apply`, undone as printed), `make repro` is the real pipeline:
    offline, it reaches fetch_weights and stops there with one line."""
    done = scenario["repro_after_smoke"]
    assert done.returncode != 0 and "Running stage 'fetch_weights'" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "make smoke" in errors[0], done.stderr


@pytest.mark.slow
def test_exp_show_fits_120_columns_with_the_rank_and_the_test_f1(scenario: dict) -> None:
    """The table fits 120 columns with the test F1 and the LoRA rank in view. (DVC's renderer gives the
    table 120 minus one character per column *before* folding, so in a clone whose committed dvc.lock
    lacks the model stages, their ~35 code deps narrow it and it may cut the header to "lor…".)"""
    table = scenario["exp_show"]
    lines = table.splitlines()
    assert lines and max(map(len, lines)) <= 120, table
    header = next(line for line in lines if "Experiment" in line)
    assert "test.f1" in header.split(), table
    start = header.index(" lor") + 1  # the params column is left-aligned under its header
    rank = {line.split("[")[1].split("]")[0]: line[start:].split()[0] for line in lines if "[" in line}
    assert rank["rank4"] == "4" and rank["smoke-base"] == "16", table


@pytest.mark.slow
def test_smoke_runs_the_whole_dag_offline_as_an_experiment(scenario: dict) -> None:
    assert executed(scenario["smoke"]) == set(STAGES), scenario["smoke"]
    assert scenario["workspace_unchanged"] and scenario["git_status"] == ""
    run = scenario["runs"]["smoke-base"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.exp_name"] == "smoke-base" and len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["gpt2lab.git_dirty"] == "false" and run.data.tags["base.pretrained"] == "false"
    assert run.data.params["weights.source"] == "random" and run.data.params["model.n_layer"] == "2"
    metrics = set(run.data.metrics)
    assert {"test/f1", "test/accuracy", "validation/roc_auc", "training/examples_per_s", "generation/tokens_per_s",
            "loss/train", "loss/val", "accuracy/train", "accuracy/val", "step/loss", "step/lr"} <= metrics  # fmt: skip
    assert not [m for m in metrics if "rows" in m or m.endswith(("/n", "/tp", "/fn", "/fp", "/tn"))], metrics
    prefixes = {m.split("/")[0] for m in metrics}
    assert prefixes == {"test", "validation", "train", "training", "generation", "loss", "accuracy", "step"}, metrics
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"sms-spam-train", "sms-spam-validation",
                                                                    "sms-spam-test"}  # fmt: skip
    assert run.outputs.model_outputs, "the trained classifier is logged as a model"


@pytest.mark.slow
def test_the_same_smoke_again_runs_no_stage_and_logs_no_run(scenario: dict) -> None:
    out = scenario["smoke_again"]
    assert executed(out) == set(), out
    restored = set(re.findall(r"Stage '(\w+)' is cached", out)) | set(re.findall(r"Stage '(\w+)' didn't change", out))
    assert restored == set(STAGES), out
    assert scenario["runs_after_smoke_again"] == scenario["runs_after_smoke"]


@pytest.mark.slow
def test_second_repro_of_the_same_params_runs_nothing(scenario: dict) -> None:
    assert executed(scenario["repro_again"]) == set(), scenario["repro_again"]
    assert "Data and pipelines are up to date" in scenario["repro_again"]
    # A no-op execution leaves no empty run behind.
    assert scenario["runs_after_repro"] == scenario["runs_after_smoke"]


@pytest.mark.slow
def test_status_lists_the_stages_a_change_can_affect(scenario: dict) -> None:
    assert set(scenario["status_model"]) == MODEL_STAGES, scenario["status_model"]
    assert {"download_data", "prepare_data"}.isdisjoint(MODEL_STAGES)
    assert scenario["status_neutral"] == {}, "data.timeout_s and train.num_threads change no result"


@pytest.mark.slow
def test_a_bad_value_stops_before_any_output_is_touched(scenario: dict) -> None:
    done = scenario["bad_value"]
    assert done.returncode != 0 and executed(done.stdout + done.stderr) == {"validate_params"}
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: lora.rank: invalid value 0; allowed: an integer > 0"], done.stderr
    assert scenario["outputs_kept"] and scenario["runs_after_bad_value"] == set()


@pytest.mark.slow
def test_rank_change_reruns_train_evaluate_and_track_only(scenario: dict) -> None:
    assert executed(scenario["rank4"]) == {"validate_params", "train", "evaluate", "track"}, scenario["rank4"]
    run = scenario["runs"]["rank4"]
    assert run.info.status == "FINISHED" and run.data.params["lora.rank"] == "4"
    # The stages that did not run are in the run too, so it compares with full runs.
    assert {"generation/tokens_per_s", "training/trainable_params", "test/f1"} <= set(run.data.metrics)


@pytest.mark.slow
def test_an_experiment_run_before_is_restored_not_retrained(scenario: dict) -> None:
    out = scenario["back_to_16"]
    assert executed(out) == set(), out
    assert "Stage 'train' is cached" in out and "Stage 'track' is cached" in out
    assert "back-to-16" not in scenario["runs"]  # its results are in smoke-base's run


@pytest.mark.slow
def test_queued_experiments_land_in_one_store_as_distinct_runs(scenario: dict) -> None:
    assert scenario["queue"] == {"q-rank2": "Success", "q-rank8": "Success"}, scenario["queue_logs"]
    runs = scenario["runs"]
    q2, q8 = runs["q-rank2"], runs["q-rank8"]
    assert q2.info.run_id != q8.info.run_id
    assert (q2.data.params["lora.rank"], q8.data.params["lora.rank"]) == ("2", "8")
    for run in (q2, q8):
        assert run.info.status == "FINISHED" and "generation/tokens_per_s" in run.data.metrics
        assert run.info.artifact_uri.startswith((scenario["repo"].root / "mlartifacts").as_uri())
    leftovers = list((scenario["repo"].root / ".dvc").rglob("mlflow.db")) + list((scenario["repo"].root / ".dvc").rglob("mlartifacts"))
    assert not leftovers, "a --queue/--temp run wrote a store inside its temporary copy"


@pytest.mark.slow
def test_deps_cover_what_each_stage_imported_at_run_time(scenario: dict) -> None:
    repo: Repo = scenario["repo"]
    logs = {p.stem: json.loads(p.read_text()) for p in repo.import_log.glob("*.json")}
    assert set(logs) == set(STAGES)
    for stage, files in logs.items():
        used = {Path(f).resolve().relative_to((repo.root / "src").resolve().parent).as_posix() for f in files}
        missing = used - set(DVC_YAML["stages"][stage]["deps"]) - RESULT_NEUTRAL
        assert not missing, f"{stage} imported {sorted(missing)} at run time; add them to its deps in dvc.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_rest_api_shows_the_experiment_run(scenario: dict) -> None:
    """Only MLflow's REST API, from a light server on loopback over the pipeline's store."""
    import requests

    repo: Repo = scenario["repo"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**repo.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{repo.db}"],
        cwd=repo.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(1)
        api = f"{url}/api/2.0/mlflow"
        exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "gpt2lab"}, timeout=30).json()
        found = requests.post(f"{api}/runs/search", timeout=30, json={
            "experiment_ids": [exp["experiment"]["experiment_id"]],
            "filter": "tags.`dvc.exp_name` = 'rank4'",
        }).json()["runs"]  # fmt: skip
        assert len(found) == 1
        run = found[0]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert params["lora.rank"] == "4" and params["train.epochs"] == "1"
        eval_json = json.loads((repo.root / "metrics/eval.json").read_text())  # the committed rank-4 result
        assert metrics["test/accuracy"] == pytest.approx(eval_json["test"]["accuracy"])
        run_id = run["info"]["run_id"]
        history = requests.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": "loss/val"},
                               timeout=30).json()["metrics"]  # fmt: skip
        assert len(history) >= 2 and len({m["step"] for m in history}) == len(history)

        def listing(path: str = "") -> set[str]:
            reply = requests.get(f"{api}/artifacts/list", params={"run_id": run_id, "path": path}, timeout=30).json()
            return {f["path"] for f in reply.get("files", [])}

        assert {"metrics", "plots", "params.yaml"} <= listing()
        assert {"metrics/eval.json", "metrics/generate.json", "metrics/train.json"} <= listing("metrics")
        assert "plots/roc.png" in listing("plots")
        samples = requests.get(f"{url}/get-artifact", params={"run_uuid": run_id, "path": "metrics/samples.json"},
                               timeout=30).json()["samples"]  # fmt: skip
        assert samples and samples[0]["prompt"]
        models = requests.post(f"{api}/logged-models/search", timeout=30,
                               json={"experiment_ids": [exp["experiment"]["experiment_id"]]}).json()  # fmt: skip
        assert run_id in {m["info"].get("source_run_id") for m in models.get("models", [])}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
