"""Device-dependent settings (ftlab.utils.devices): bf16 only where the GPU has it; ``auto`` loader workers and
pinned memory on a CUDA device, neither on CPU; bad values refused with the key named."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from ftlab.utils import devices
from ftlab.utils.errors import ConfigError

from conftest import compose_cfg, tiny_text_overrides


def _trainer(device: str, num_devices: int = 1) -> SimpleNamespace:
    """What the data modules read of their trainer."""
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)),
        num_devices=num_devices,
        current_epoch=0,
        world_size=1,
        global_rank=0,
    )


@pytest.fixture
def gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(devices, "_bf16_supported", lambda: False)


def test_bf16_falls_back_to_fp16_mixed_on_a_gpu_without_it(gpu_without_bf16, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        assert devices.resolve_precision("bf16-mixed", "gpu") == "16-mixed"
    assert "Tesla T4" in caplog.text and "16-mixed" in caplog.text
    assert devices.resolve_precision("32-true", "gpu") == "32-true"  # only bf16 is changed
    assert (
        devices.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    )  # a CPU run asked for it: its choice


def test_bf16_is_kept_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "_bf16_supported", lambda: True)
    assert devices.resolve_precision("bf16-mixed", "gpu") == "bf16-mixed"


def test_train_builds_the_trainer_with_the_resolved_precision(
    gpu_without_bf16, reviews_csv, tmp_path, monkeypatch
) -> None:
    import ftlab.train as train_mod

    built: list[object] = []
    real = train_mod.instantiate

    def spy(node, *args, **kwargs):
        if "precision" in kwargs:
            built.append(kwargs["precision"])
            raise RuntimeError("stop after building the trainer")
        return real(node, *args, **kwargs)

    monkeypatch.setattr(train_mod, "instantiate", spy)
    overrides = tiny_text_overrides(reviews_csv, tmp_path) + ["trainer=gpu", "trainer.accelerator=gpu"]
    with pytest.raises(RuntimeError, match="stop after"):
        train_mod.train(compose_cfg(overrides, tmp_path / "run"))
    assert built == ["16-mixed"]


def test_auto_loader_settings_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 16)
    assert devices.loader_settings("auto", "auto", None) == dict(
        num_workers=0, persistent_workers=False, pin_memory=False
    )
    assert devices.loader_settings("auto", "auto", _trainer("cpu")) == dict(
        num_workers=0, persistent_workers=False, pin_memory=False
    )
    assert devices.loader_settings("auto", "auto", _trainer("cuda")) == dict(
        num_workers=4, persistent_workers=True, pin_memory=True
    )
    # 8 GPUs on 16 cores: one worker each, not 4 (32 worker processes would oversubscribe the CPU)
    assert devices.loader_settings("auto", "auto", _trainer("cuda", 8))["num_workers"] == 1
    # explicit values are kept as given, on any device
    assert devices.loader_settings(2, False, _trainer("cuda")) == dict(
        num_workers=2, persistent_workers=True, pin_memory=False
    )
    assert devices.loader_settings(0, True, _trainer("cpu"))["pin_memory"] is True


def _loader_in_a_loky_worker() -> tuple[list[int], str]:
    """In a joblib/loky worker: the batches of a 2-worker loader with ftlab's settings, and how a loader with
    torch's default context fares there."""
    from torch.utils.data import DataLoader

    from ftlab.utils import devices as worker_devices

    loader = DataLoader(list(range(6)), batch_size=2, **worker_devices.loader_settings(2, False, None))
    batches = [int(x) for batch in loader for x in batch]
    try:
        list(DataLoader(list(range(6)), batch_size=2, num_workers=2))
        plain = "ok"
    except Exception as error:  # noqa: BLE001 - reported to the test, which names what it expects
        plain = f"{type(error).__name__}: {error}"
    return batches, plain


def test_loader_workers_start_inside_a_joblib_sweep_job() -> None:
    """hydra/launcher=parallel runs each job in a loky worker, whose default start method is loky's own: torch's
    loader workers cannot start through it, so an image-folder sweep (num_workers: 2) failed before its first batch.
    The loader settings name the platform's default context there (and nothing in an ordinary process)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    # in a fresh interpreter: a loky executor left alive in the test process (threads, a resource tracker) makes
    # later forks in this process (DataLoader workers, process pools) prone to deadlock
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); from joblib import Parallel, delayed; "
        "from test_devices import _loader_in_a_loky_worker as f; "
        "print(json.dumps(Parallel(n_jobs=2, backend='loky')(delayed(f)() for _ in range(1))))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [(batches, plain)] = json.loads(done.stdout.strip().splitlines()[-1])
    assert batches == [0, 1, 2, 3, 4, 5]
    assert "has no attribute 'env'" in plain  # the failure the explicit context avoids
    assert "multiprocessing_context" not in devices.loader_settings(2, False, None)


@pytest.mark.parametrize("data", ["text", "image"])
def test_data_modules_pin_and_use_workers_only_on_a_gpu(data, reviews_csv, tmp_path) -> None:
    if data == "text":
        overrides = tiny_text_overrides(reviews_csv, tmp_path)
    else:
        overrides = ["data=digits", "model=tiny_resnet", f"paths.cache_dir={tmp_path}/cache"]
    cfg = compose_cfg(overrides)
    assert cfg.data.num_workers == "auto" and cfg.data.pin_memory == "auto"  # the configs' default
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    cpu = datamodule.train_dataloader()
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)
    datamodule.trainer = _trainer("cuda")
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert loader.num_workers >= 1 and loader.pin_memory and loader.persistent_workers


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_workers=many", "data.num_workers='many' must be a number >= 0 or 'auto'"),
        ("data.num_workers=-1", "data.num_workers=-1 must be a number >= 0 or 'auto'"),
        ("data.pin_memory=yes", "data.pin_memory='yes' must be true, false or 'auto'"),
    ],
)
def test_bad_loader_settings_are_refused_with_the_key(override, message, reviews_csv, tmp_path) -> None:
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), override])
    backbone = instantiate(cfg.model.backbone)
    with pytest.raises(Exception) as err:
        instantiate(cfg.data, preprocessing=backbone.preprocessing)
    assert message in str(err.value)
    cause = err.value if isinstance(err.value, ConfigError) else err.value.__cause__
    assert isinstance(cause, ConfigError)


def test_pad_multiple_rounds_widths_up_to_the_cap_and_leaves_outputs_unchanged(reviews_csv, tmp_path) -> None:
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), "data.max_length=12"])
    assert cfg.data.pad_to_multiple_of == "auto"
    backbone = instantiate(cfg.model.backbone).eval()
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    datamodule.setup("fit")
    plain = datamodule.val_dataloader()  # no trainer: CPU, no rounding
    datamodule.trainer = _trainer("cuda")
    rounded = datamodule.val_dataloader()
    widths = set()
    for a, b in zip(plain, rounded, strict=True):
        width = b["input_ids"].shape[1]
        widths.add(width)
        assert width == 12 or width % 8 == 0, width  # a multiple of 8, at most max_length
        assert width >= a["input_ids"].shape[1]
        n = a["input_ids"].shape[1]
        assert torch.equal(b["input_ids"][:, :n], a["input_ids"]) and not b["attention_mask"][:, n:].any()
        with torch.no_grad():  # padding is masked: the same pooled features
            torch.testing.assert_close(backbone(b), backbone(a), atol=1e-5, rtol=1e-5)
    assert widths  # the tiny reviews are 5-10 tokens: rounded to 8 or capped at 12
    assert {b["input_ids"].shape[1] % 8 for b in plain} != {
        0
    }  # without rounding some widths are not multiples


def test_explicit_pad_multiple_applies_on_any_device(reviews_csv, tmp_path) -> None:
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), "data.pad_to_multiple_of=4"])
    backbone = instantiate(cfg.model.backbone)
    datamodule = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    assert {b["input_ids"].shape[1] % 4 for b in datamodule.train_dataloader()} == {0}


def test_bad_pad_multiple_is_refused_with_the_key(reviews_csv, tmp_path) -> None:
    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), "data.pad_to_multiple_of=0"])
    backbone = instantiate(cfg.model.backbone)
    with pytest.raises(Exception, match=r"data.pad_to_multiple_of=0 must be a number >= 1"):
        instantiate(cfg.data, preprocessing=backbone.preprocessing)


def test_cached_hidden_states_are_padded_like_the_text_batches(reviews_csv, tmp_path) -> None:
    """``feature_cache=prefix`` batches (cached hidden states) get the text module's width rounding on a GPU."""
    from ftlab.finetuning.feature_cache import (
        CachedFeatureDataModule,
        HiddenStateCollator,
        HiddenStateDataset,
    )

    cfg = compose_cfg([*tiny_text_overrides(reviews_csv, tmp_path), "data.max_length=12"])
    backbone = instantiate(cfg.model.backbone)
    source = instantiate(cfg.data, preprocessing=backbone.preprocessing)
    source.setup("fit")
    lengths = [5, 7, 11, 3]  # one example's hidden states per length, width 4
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    features = {
        split: HiddenStateDataset(torch.randn(sum(lengths), 4), offsets, torch.tensor([0, 1, 0, 1]))
        for split in ("train", "validation", "test")
    }
    cached = CachedFeatureDataModule(source, features, HiddenStateCollator(1))
    (cpu,) = list(cached.val_dataloader())
    assert cpu["hidden_states"].shape[1] == 11  # the longest, as computed
    cached.trainer = _trainer("cuda")
    (gpu,) = list(cached.val_dataloader())
    assert gpu["hidden_states"].shape[1] == 12  # rounded up to 16, capped at max_length
    assert (
        torch.equal(gpu["hidden_states"][:, :11], cpu["hidden_states"])
        and not gpu["attention_mask"][:, 11:].any()
    )
