"""`chatlora studio`'s API: runs started as separate `chatlora train` processes, watched, stopped,
resumed and deleted; ids that could reach outside the runs directory refused; the key on every route;
two studios on one runs directory."""

import json
import os
import time

import pytest
from fastapi.testclient import TestClient

from chatlora.studio.app import build_app
from chatlora.studio.runs import RunsDir


def client(root, api_key=None):
    return TestClient(build_app(RunsDir(root), api_key), base_url="http://127.0.0.1")


def settings(index_dir, tiny_data, **train):
    return {"model.path": str(index_dir), "data.path": str(tiny_data), "data.held_out_fraction": 0.1,
            **{f"train.{k}": v for k, v in train.items()}}


def wait_for(c, run_id, states, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = c.get(f"/api/runs/{run_id}").json()
        if got["state"] in states:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{run_id} still {got['state']}: {got.get('log', '')[-2000:]}")


@pytest.mark.slow   # a run, its evaluation and its export, each a process
def test_a_run_from_start_to_finish(tmp_path, index_dir, tiny_data):
    c = client(tmp_path / "runs")
    r = c.post("/api/runs", json={"id": "r1", "config": settings(index_dir, tiny_data, max_steps=3, eval_every=1)})
    assert r.status_code == 201 and r.json()["command"].startswith("chatlora train --output ")
    assert "--set train.max_steps=3" in r.json()["command"]
    done = wait_for(c, "r1", ("finished", "failed"))
    assert done["state"] == "finished" and done["step"] == 3 and done["loss"] is not None, done
    assert "max_steps: 3" in done["config_yaml"]
    assert [r["id"] for r in c.get("/api/runs").json()["runs"]] == ["r1"]
    with c.stream("GET", "/api/runs/r1/events") as events:
        text = "".join(events.iter_text())
    metrics = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {\"step\"")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3] and "event: status" in text
    assert c.get("/api/runs/r1/metrics").json()["rows"] == metrics
    assert c.post("/api/runs", json={"id": "r1", "config": {}}).status_code == 409   # the id is taken
    # chat: `chatlora serve`'s own route for the run, the same reply as that server gives
    body = {"messages": [{"role": "user", "content": "你是谁？"}], "temperature": 0, "max_tokens": 6}
    reply = c.post("/api/runs/r1/serve/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    from chatlora.config import ServeConfig
    from chatlora.rundir import load_run, load_tuned_model
    from chatlora.serve.app import Server
    from chatlora.serve.app import build_app as serve_app

    run = load_run(str(tmp_path / "runs" / "r1"))
    with TestClient(serve_app(Server(run, load_tuned_model(run), ServeConfig())), base_url="http://127.0.0.1") as s:
        direct = s.post("/v1/chat/completions", json=body).json()
    assert reply.json()["choices"][0]["message"] == direct["choices"][0]["message"]
    assert c.post("/api/runs/r1/serve/v1/chat/completions", json={"messages": []}).status_code == 400
    assert c.get("/api/runs/r1").json()["system_prompt"] is None
    # evaluation and export, each its own process
    assert c.post("/api/runs/r1/export", json={"format": "zip"}).status_code == 400
    assert c.post("/api/runs/r1/eval", json={"limit": 0}).status_code == 400
    assert c.post("/api/runs/r1/eval", json={"limit": 2}).status_code == 202
    assert c.post("/api/runs/r1/export", json={"format": "gguf", "quant": "f16"}).status_code == 202
    for kind in ("eval", "export"):
        deadline = time.monotonic() + 180
        while (state := c.get(f"/api/runs/r1/{kind}").json())["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert state["state"] == "finished", state
    evaluation = c.get("/api/runs/r1/eval").json()["report"]
    assert evaluation["examples"] == 2 and set(evaluation["models"]) == {"base", "tuned"}
    file = c.get("/api/runs/r1/export/file")
    assert file.status_code == 200 and file.content[:4] == b"GGUF" and "r1-f16-" in file.headers["content-disposition"]
    assert c.delete("/api/runs/r1").json() == {"id": "r1", "deleted": True}
    assert not (tmp_path / "runs" / "r1").exists() and c.get("/api/runs/r1").status_code == 404


def test_stop_resume_and_a_second_studio(tmp_path, index_dir, tiny_data):
    """A second studio on the same runs directory sees the run the first started and can stop it;
    the run stops with a checkpoint (SIGTERM), resumes from it, and cannot be deleted while running."""
    first, second = client(tmp_path / "runs"), client(tmp_path / "runs")
    config = settings(index_dir, tiny_data, max_steps=100000, save_every=0, eval_every=0)
    assert first.post("/api/runs", json={"id": "long", "config": config}).status_code == 201
    running = wait_for(second, "long", ("running",))
    assert running["pid"] != os.getpid()
    assert second.delete("/api/runs/long").status_code == 409
    assert second.post("/api/runs/long/resume").status_code == 409
    assert second.post("/api/runs/long/stop").status_code == 202
    stopped = wait_for(first, "long", ("stopped", "failed"))
    assert stopped["state"] == "stopped" and "checkpoint" in stopped["message"]
    step = stopped["step"]
    assert first.post("/api/runs/long/resume").status_code == 202
    wait_for(first, "long", ("running",))
    deadline = time.monotonic() + 60
    while first.get("/api/runs/long").json()["step"] <= step and time.monotonic() < deadline:
        time.sleep(0.3)
    assert first.get("/api/runs/long").json()["step"] > step   # it went on from the checkpoint
    assert first.post("/api/runs/long/stop").status_code == 202
    assert wait_for(first, "long", ("stopped", "failed"))["state"] == "stopped"
    assert first.post("/api/runs/long/stop").status_code == 409


def test_a_run_that_fails_before_training_shows_why(tmp_path, index_dir, huanhuan_rows):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n', encoding="utf-8")
    c = client(tmp_path / "runs")
    assert c.post("/api/runs", json={"id": "bad", "config": {"model.path": str(index_dir),
                                                               "data.path": str(bad)}}).status_code == 201
    failed = wait_for(c, "bad", ("failed", "finished"))
    assert failed["state"] == "failed" and f"{bad}:1: output: missing" in failed["message"]
    assert c.post("/api/runs/bad/resume").status_code == 400   # nothing to resume from


def test_bad_ids_and_settings_are_refused(tmp_path):
    runs = tmp_path / "runs"
    c = client(runs)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.yaml").write_text("{}")
    runs.mkdir(exist_ok=True)
    (runs / "link").symlink_to(outside)
    for run_id in ("..", ".studio", "a b", "x" * 65, "-rf", "link"):
        r = c.get(f"/api/runs/{run_id}")
        assert r.status_code in (400, 404), (run_id, r.status_code)
        assert c.delete(f"/api/runs/{run_id}").status_code in (400, 404)
    assert c.get("/api/runs/link").status_code == 400 and outside.exists()
    assert c.get("/api/runs/%2E%2E%2Foutside").status_code in (400, 404)
    assert c.get("/api/runs/nothing").status_code == 404
    assert c.post("/api/runs/a%20b/serve/v1/chat/completions", json={}).status_code == 400
    assert c.post("/api/runs/nothing/serve/v1/chat/completions", json={}).status_code == 409
    r = c.post("/api/runs", json={"id": "../escape", "config": {}})
    assert r.status_code == 400 and "run id" in r.json()["error"]["message"]
    r = c.post("/api/runs", json={"id": "ok", "config": {"train.learning_rate": 5, "train.nonsense": 1}})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "train.learning_rate" in message and "train.nonsense" in message
    assert c.post("/api/runs", content=b"[1,2", headers={"content-type": "application/json"}).status_code == 400
    assert not (runs / "ok").exists() and not (runs / "escape").exists() and not (tmp_path / "escape").exists()
    assert c.post("/api/runs/nothing/stop").status_code == 404


def test_the_key_guards_every_route(tmp_path):
    c = client(tmp_path / "runs", api_key="s3cret")
    for method, path in (("GET", "/"), ("GET", "/api/runs"), ("GET", "/api/config"), ("POST", "/api/runs"),
                         ("POST", "/api/data/check"), ("GET", "/api/runs/x/events"), ("DELETE", "/api/runs/x")):
        assert c.request(method, path).status_code == 401, path
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_form_and_the_data_check(tmp_path, index_dir, tiny_data):
    c = client(tmp_path / "runs")
    fields = {f["key"]: f for f in c.get("/api/config").json()["fields"]}
    assert fields["train.learning_rate"]["type"] == "float" and "AdamW" in fields["train.learning_rate"]["doc"]
    assert fields["model.template"]["choices"] == ["auto", "index", "self-llm"]
    assert fields["train.report_to"]["type"] == "list" and "serve.port" not in fields
    good = c.post("/api/data/check", json={"config": {"model.path": str(index_dir), "data.path": str(tiny_data)}}).json()
    assert good["ok"] and good["report"]["examples_kept"] == 31
    spans = good["examples"][0]["spans"]
    assert any(s["supervised"] for s in spans) and not spans[0]["supervised"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\nnot json\n', encoding="utf-8")
    r = c.post("/api/data/check", json={"config": {"model.path": str(index_dir), "data.path": str(bad)}}).json()
    assert not r["ok"] and f"{bad}:2: output: missing" in r["error"] and f"{bad}:3:1: malformed JSON" in r["error"]
    assert "<title>chatlora studio</title>" in c.get("/").text
    assert "smollm2-demo" in [m["id"] for m in c.get("/api/models").json()["models"]]   # the offline demo model
    from chatlora.models.hub import dataset_dir

    (dataset_dir("someone/listed") / "data").mkdir(parents=True)
    (dataset_dir("someone/listed") / "data" / "train.jsonl").write_text('{"instruction": "q", "output": "a"}\n')
    assert {"id": "someone/listed", "data": "hf:someone/listed", "path": str(dataset_dir("someone/listed"))} \
        in c.get("/api/datasets").json()["datasets"]


def test_uploaded_data_is_kept_under_a_new_name(tmp_path, index_dir):
    c = client(tmp_path / "runs")
    rows = '{"instruction": "q", "output": "a"}\n'.encode()
    first = c.post("/api/data/upload?name=mine.jsonl", content=rows).json()["path"]
    second = c.post("/api/data/upload?name=mine.jsonl", content=rows).json()["path"]
    assert first != second and open(first, "rb").read() == rows
    assert str(tmp_path / "runs" / ".studio" / "uploads") in first
    checked = c.post("/api/data/check", json={"config": {"model.path": str(index_dir), "data.path": first}}).json()
    assert checked["ok"] and checked["report"]["rows_read"] == 1
    for name in ("../x.jsonl", "x.exe", "", ".hidden.jsonl"):
        assert c.post(f"/api/data/upload?name={name}", content=rows).status_code == 400, name
    assert c.post("/api/data/upload?name=empty.csv", content=b"").status_code == 400


def test_the_studio_command(tmp_path):
    """`chatlora studio` serves the runs directory on loopback, refuses a public address without a key
    (exit 2, one line, no traceback), and stops on SIGTERM."""
    import signal
    import subprocess
    import sys

    import httpx
    from helpers import free_port

    refused = subprocess.run([sys.executable, "-m", "chatlora", "studio", "--runs-dir", str(tmp_path / "r"),
                              "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "CHATLORA_API_KEY"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "key" in refused.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chatlora", "studio", "--runs-dir", str(tmp_path / "runs"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
            except httpx.TransportError:
                time.sleep(0.2)
        assert health == {"status": "ok", "runs_dir": str((tmp_path / "runs").resolve())}
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").json() == {"runs": []}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (0, -signal.SIGTERM) and "chatlora studio: runs in" in out


def test_downloads_from_the_hub_run_as_processes_and_report_their_end(tmp_path, monkeypatch):
    """The page's Download buttons: `chatlora download` as its own process (offline here, so it fails
    with chatlora's message), its state and log; a download an earlier studio started is judged by
    the cache; ids and kinds checked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CHATLORA_CACHE", str(tmp_path / "cache"))
    c = client(tmp_path / "runs")
    assert c.get("/api/downloads", params={"id": "someone/data", "kind": "dataset"}).json() == {"state": "none"}
    for bad in ({"id": "../etc", "kind": "dataset"}, {"id": "a/b/c", "kind": "model"}, {"id": "a/b", "kind": "x"}):
        r = c.post("/api/downloads", json=bad)
        assert r.status_code == 400, bad
    r = c.post("/api/downloads", json={"id": "someone/data", "kind": "dataset"})
    assert r.status_code == 202 and r.json()["command"] == "chatlora download someone/data --dataset"
    deadline = time.monotonic() + 120
    while (got := c.get("/api/downloads", params={"id": "someone/data", "kind": "dataset"}).json())["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert got["state"] == "failed" and "chatlora: error: could not download someone/data" in got["log"], got
    assert "Traceback" not in got["log"]
    assert c.get("/api/runs").json()["runs"] == []    # a download is not a run
    # started by an earlier studio (its process is gone): finished once the cache holds the files
    runs = RunsDir(tmp_path / "runs")
    record = runs.root / ".studio" / "_download.model.someone--model.json"
    record.write_text(json.dumps({"pid": 2 ** 22 + 12345, "command": "chatlora download someone/model"}))
    assert runs.download_state("someone/model", dataset=False)["state"] == "failed"
    target = tmp_path / "cache" / "models" / "someone" / "model"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert runs.download_state("someone/model", dataset=False)["state"] == "finished"
