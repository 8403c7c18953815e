"""ftlab-serve: a real server on a free loopback port answers as ftlab-predict does, refuses bad requests with a
one-line JSON error and keeps serving, and counts what it did in /metrics.

Two servers start (each in its own process group, stopped at the end): a text run through PyTorch with dynamic
batching, and an image run's ONNX export through ONNX Runtime.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ftlab.export import export
from ftlab.predict import predict
from ftlab.train import train

from conftest import CONF_DIR, compose_cfg, read_json, tiny_reviews, tiny_text_overrides

pytest.importorskip("litserve", reason="ftlab-serve needs the serve extra: pip install 'ftlab[serve]'")

TEXTS = [
    "a wonderful, moving film",
    "boring and far too long",
    "superb",
    "nothing works here",
    "funny and warm",
]
START_TIMEOUT_S = 300  # importing torch in the spawned worker is slow on a loaded 2-core machine


def entry_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_run_config(cfg, run_dir: Path) -> None:
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what a Hydra run writes; train() alone does not


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve_text")
    csv = tmp / "reviews.csv"
    tiny_reviews(12).to_csv(csv, index=False)
    cfg = compose_cfg(tiny_text_overrides(csv, tmp) + ["trainer.max_epochs=1"], tmp / "run")
    train(cfg)
    save_run_config(cfg, tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="module")
def image_export(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve_image")
    overrides = ["data=digits", "model=tiny_resnet", "model.backbone.input_size=16", "trainer.max_epochs=1"]
    overrides += ["trainer.accelerator=cpu", "trainer.devices=1", f"paths.cache_dir={tmp}/cache"]
    cfg = entry_cfg("train", [*overrides, "callbacks.progress_bar.kind=log", "data.max_train_examples=200"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
    train(cfg)
    save_run_config(cfg, tmp / "run")
    export(entry_cfg("export", [f"run={tmp / 'run'}", "format=onnx"]))
    return tmp / "run" / "export" / "onnx"


class Server:
    """``python -m ftlab.serving args`` on a free port of 127.0.0.1, stopped with its worker processes."""

    def __init__(self, args: list[str], log: Path):
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.log = log
        cmd = [sys.executable, "-m", "ftlab.serving", *args, f"port={self.url.rsplit(':', 1)[1]}"]
        with log.open("w") as out:  # its own session: the whole group is stopped at the end
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the server did not become healthy: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # LitServe shuts its workers down on Ctrl+C
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of the group is left


def start(args: list[str], log: Path) -> Iterator[Server]:
    server = Server(args, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def text_server(text_run: Path) -> Iterator[Server]:
    args = [f"run={text_run}", "batching.max_batch_size=8", "batching.max_wait_ms=50", "max_items=6"]
    # two model workers (one torch thread each) share LitServe's queue; /metrics adds up their batch counts
    yield from start([*args, "max_body_mb=0.05", "top_k=2", "workers=2", "threads=1"], text_run / "serve.log")


@pytest.fixture(scope="module")
def image_server(image_export: Path) -> Iterator[Server]:
    yield from start([f"export={image_export}", "batching.max_batch_size=1"], image_export / "serve.log")


def predicted(run: Path, inputs: str, out: Path) -> list[dict]:
    predict(entry_cfg("predict", [f"run={run}", f"inputs={inputs}", f"output={out}", "top_k=2"]))
    return [json.loads(line) for line in out.read_text().splitlines()]


def assert_same(got: list[dict], expected: list[dict], tolerance: float) -> None:
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        assert np.allclose(
            [t["probability"] for t in g["top_k"]], [t["probability"] for t in e["top_k"]], atol=tolerance
        )
        assert g["probability"] == pytest.approx(e["probability"], abs=tolerance)


def test_text_answers_equal_ftlab_predict_alone_and_batched(text_server, text_run, tmp_path):
    expected = predicted(text_run, json.dumps(TEXTS), tmp_path / "p.jsonl")
    answer = text_server.client.post("/predict", json={"inputs": TEXTS})
    assert answer.status_code == 200, answer.text
    assert_same(answer.json()["predictions"], expected, 1e-5)
    one = text_server.client.post("/predict", json={"inputs": TEXTS[2], "top_k": 1}).json()["predictions"]
    assert len(one) == 1 and one[0]["input"] == TEXTS[2] and len(one[0]["top_k"]) == 1
    assert one[0]["label"] == expected[2]["label"]
    # concurrent single-text requests are batched together (up to 8) and each gets its own answer
    before = batch_count(text_server.client.get("/metrics").text, "ftlab_serve_batch_requests_count")
    with ThreadPoolExecutor(len(TEXTS) * 2) as pool:
        posts = pool.map(lambda t: text_server.client.post("/predict", json={"inputs": t}), TEXTS * 2)
        rows = [p.json()["predictions"][0] for p in posts]
    assert_same(rows, expected * 2, 1e-5)
    after = batch_count(text_server.client.get("/metrics").text, "ftlab_serve_batch_requests_count")
    assert after - before < 10  # 10 requests in fewer forward passes


def batch_count(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"inputs": ["ok", ', 400, "not valid JSON"),
        ({"text": "x"}, 422, "unknown field 'text'"),
        ({"inputs": 5}, 422, "inputs must be a text or a list of texts, not int"),
        ({"inputs": ["ok", 3]}, 422, "inputs[1] must be a string"),
        ({"inputs": []}, 422, "inputs is an empty list"),
        ({"inputs": ["x"] * 7}, 422, "holds 7 items, more than this server's limit of 6"),
        ({"images": ["aGVsbG8="]}, 422, "this model takes texts: send inputs, not images"),
        ({"inputs": "x", "top_k": 0}, 422, "top_k"),
        ({"inputs": "x" * 60_000}, 413, "over this server's limit of 52428"),
    ],
)
def test_bad_requests_get_a_one_line_json_error_and_the_server_keeps_serving(
    text_server, body, status, message
):
    before = text_server.client.get("/metrics").text
    kwargs = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    answer = text_server.client.post("/predict", **kwargs)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert message in error and "\n" not in error
    after = text_server.client.get("/metrics").text
    counted = f'ftlab_serve_requests_total{{endpoint="/predict",status="{status}"}}'
    assert batch_count(after, counted) == batch_count(before, counted) + 1
    assert text_server.client.post("/predict", json={"inputs": "funny and warm"}).status_code == 200


def test_metadata_page_and_metrics(text_server, text_run):
    info = text_server.client.get("/metadata").json()
    recorded = read_json(text_run / "metrics.json")
    assert (
        info["task"] == "classification" and info["labels"] == ["neg", "pos"] and info["runtime"] == "pytorch"
    )
    assert info["test_metrics"]["test/acc"] == recorded["test/acc"] and info["serving"]["max_batch_size"] == 8
    assert info["serving"]["workers"] == 2
    assert text_server.client.get("/info").json()["server"]["workers_per_device"] == 2  # LitServe's own view
    page = text_server.client.get("/")
    assert page.status_code == 200 and '<textarea id="text"' in page.text and "/predict" in page.text
    names = ('ftlab_serve_request_seconds_count{endpoint="/predict"}', "ftlab_serve_batch_items_sum")
    before = text_server.client.get("/metrics").text
    assert text_server.client.post("/predict", json={"inputs": TEXTS[:3]}).status_code == 200
    after = text_server.client.get("/metrics").text
    assert [batch_count(after, n) - batch_count(before, n) for n in names] == [
        1,
        3,
    ]  # one request, 3 examples


@pytest.mark.slow  # trains an image run, exports it and starts a second server
def test_image_export_served_by_onnx_runtime_answers_as_ftlab_predict(image_server, image_export, tmp_path):
    from PIL import Image

    from ftlab.runs import rebuild

    run_dir = image_export.parents[1]
    dataset = rebuild.datamodule_for(rebuild.load_run(run_dir)).datasets["test"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.asarray(dataset.images[i]).squeeze()).save(folder / f"{i:02d}.png")
    expected = predicted(run_dir, str(folder), tmp_path / "p.jsonl")
    images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(folder.glob("*.png"))]
    answer = image_server.client.post("/predict", json={"images": images, "top_k": 2})
    assert answer.status_code == 200, answer.text
    got = answer.json()["predictions"]
    assert [r["input"] for r in got] == [f"images[{i}]" for i in range(4)]
    assert_same(got, expected, 1e-4)  # ONNX Runtime vs PyTorch: export checks logits within 1e-4
    assert image_server.client.get("/metadata").json()["runtime"] == "onnxruntime"
    bad = image_server.client.post(
        "/predict", json={"images": [images[0], base64.b64encode(b"not an image").decode()]}
    )
    assert bad.status_code == 422 and "images[1] is not an image that can be read" in bad.json()["error"]
    assert (
        image_server.client.post("/predict", json={"images": ["%%%"]})
        .json()["error"]
        .startswith("images[0] is not valid base64")
    )


def train_text_run(tmp: Path, table, overrides: list[str]) -> Path:
    csv = tmp / "table.csv"
    table.to_csv(csv, index=False)
    fast = ["trainer.max_epochs=1", "data.batch_size=16", "monitor=val/loss", "monitor_mode=min"]
    cfg = compose_cfg([*tiny_text_overrides(csv, tmp), *fast, *overrides], tmp / "run")
    train(cfg)
    save_run_config(cfg, tmp / "run")
    return tmp / "run"


def assert_rows_close(got, expected, tolerance: float = 1e-5) -> None:
    """Same keys, same strings and label sets, numbers within ``tolerance``."""
    if isinstance(expected, dict):
        assert set(got) == set(expected)
        for key in expected:
            assert_rows_close(got[key], expected[key], tolerance)
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_rows_close(g, e, tolerance)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=tolerance)
    else:
        assert got == expected


SENTENCES = [
    (["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"]),
    (["Mary", "visited", "Berlin", "today"], ["B-PER", "O", "B-LOC", "O"]),
    (["the", "film", "was", "long"], ["O", "O", "O", "O"]),
    (["Anna", "Smith", "left", "Rome"], ["B-PER", "I-PER", "O", "B-LOC"]),
]


def token_run(tmp: Path) -> Path:
    path = tmp / "tagged.jsonl"
    path.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in SENTENCES * 8))
    overrides = ["model=tiny_bert", "data=token_files", f"data.train_file={path}", "data.max_length=16"]
    overrides += [f"paths.cache_dir={tmp}/cache", "trainer.accelerator=cpu", "trainer.devices=1"]
    overrides += [
        "trainer.max_epochs=1",
        "callbacks.progress_bar.kind=log",
        "monitor=val/loss",
        "monitor_mode=min",
    ]
    cfg = compose_cfg(overrides, tmp / "run")
    train(cfg)
    save_run_config(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.parametrize("kind", ["pairs_regression", "multilabel", "token_classification"])
def test_batched_requests_of_other_tasks_decode_as_ftlab_predict(kind, tmp_path, monkeypatch):
    """The worker's side without HTTP: requests of a pair-regression, a multi-label and a token-classification run,
    batched together, answer what ftlab-predict writes."""
    from ftlab.serving import api as serving_api
    from ftlab.serving.source import Source

    reviews = tiny_reviews(12)
    table = reviews
    if kind == "token_classification":
        run = token_run(tmp_path)
        table = pd.DataFrame({"review": [" ".join(w) for w, _ in SENTENCES] + ["Paris in the  rain"]})
        expected = predicted(run, json.dumps(table["review"].tolist()), tmp_path / "p.jsonl")
    else:
        if kind == "pairs_regression":
            table = reviews.assign(
                other=reviews["review"].str.upper(), score=(reviews["stars"] == "pos") * 4.0 + 1
            )
            overrides = ["data.text_pair_column=other", "data.label_column=score", "data.task=regression"]
        else:
            tags = {"pos": "good|warm", "neg": "bad"}
            table = reviews.assign(tags=reviews["stars"].map(tags))
            overrides = ["data.label_column=tags", "data.task=multilabel"]
        run = train_text_run(tmp_path, table.drop(columns=["stars"]), overrides)
        table.iloc[:5].to_csv(tmp_path / "inputs.csv", index=False)
        expected = predicted(run, str(tmp_path / "inputs.csv"), tmp_path / "p.jsonl")

    pairs = kind == "pairs_regression"
    monkeypatch.setattr(serving_api, "RULES", serving_api.Rules(pairs=pairs, max_items=8))
    with pytest.raises(ValueError, match="pairs" if pairs else "single texts"):
        serving_api.PredictRequest(inputs="x", **({} if pairs else {"pairs": "y"}))
    texts, others = table["review"].tolist()[:5], table["other"].tolist()[:5] if pairs else None
    bodies = [{"inputs": texts[:2]}, {"inputs": texts[2]}, {"inputs": texts[3:]}]
    if pairs:
        for body, part in zip(bodies, (others[:2], others[2], others[3:]), strict=True):
            body["pairs"] = part
    api = serving_api.ServeAPI(Source(run), "cpu", 0, top_k=2, max_batch_size=4, max_wait_ms=1)
    api.setup("cpu")
    answers = api.predict([api.decode_request(serving_api.PredictRequest(**b)) for b in bodies])
    rows = [row for answer in answers for row in answer]
    assert [len(a) for a in answers] == [2, 1, 2]
    assert_rows_close(rows, expected)


def test_the_page_in_a_headless_browser_shows_the_label(text_server, text_run, tmp_path):
    """Chromium (Debian's chromium + chromium-driver) types a review into the page, submits it, reads the label."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_path):
        pytest.skip("no chromium / chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(text_server.url + "/")
        driver.find_element(By.ID, "text").send_keys(TEXTS[1])
        driver.find_element(By.ID, "submit").click()
        label = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "label").text)
        cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#probs td")]
    finally:
        driver.quit()
    expected = predicted(text_run, json.dumps(TEXTS[1:2]), tmp_path / "p.jsonl")[0]
    assert label == expected["label"]
    assert cells[0] == expected["label"] and float(cells[1]) == pytest.approx(
        expected["probability"], abs=1e-4
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "ftlab-serve needs run=<run folder>"),
        (["run=RUN", "port=80"], "port=80 must be a whole number from 1024 to 65535"),
        (["export=RUN"], "no export.json or compression.json in it"),
        (["run=RUN", "porrt=9000"], "ftlab-serve has no setting 'porrt'. Did you mean port?"),
        (["run=RUN", "device=gpu"], "ftlab-serve's device takes one of 'cpu', 'cuda'"),
    ],
)
def test_cli_mistakes_exit_2_with_one_paragraph(args, message, tmp_path):
    args = [a.replace("RUN", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "ftlab.serving", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
