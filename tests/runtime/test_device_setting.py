"""ENGRAM_DEVICE puts the model worker on a device: "cpu" (the default) or "cuda[:N]". One torch cannot use
here is refused before anything loads, with one line naming the setting (this host has no GPU, so the CUDA
path itself is not run here)."""

from __future__ import annotations

import pytest
import torch

from model_worker.worker import ModelWorker, check_device
from runtime.local import DEMO_MODEL_DIR

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a CUDA GPU")


def test_the_worker_takes_cpu_and_refuses_devices_torch_cannot_use_here():
    check_device("cpu")
    for bad, says in (("meta", "runs on 'cpu' or 'cuda\\[:N\\]'"), ("not a device", "not a device torch knows")):
        with pytest.raises(ValueError, match=f"device: .*{says}"):
            check_device(bad)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA GPU"):
            check_device(f"cuda:{torch.cuda.device_count()}")


@NO_GPU
def test_cuda_without_a_gpu_is_refused_before_the_weights_load():
    with pytest.raises(ValueError, match="device: 'cuda' asked for, but torch sees no CUDA GPU here"):
        ModelWorker.from_pretrained(DEMO_MODEL_DIR, device="cuda")


@NO_GPU
def test_engram_run_with_cuda_on_a_cpu_host_is_one_error_line(tmp_path, redis_url, monkeypatch, capsys):
    from runtime.cli import main

    monkeypatch.setenv("ENGRAM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ENGRAM_REDIS_URL", redis_url)
    monkeypatch.setenv("ENGRAM_DEVICE", "cuda")
    assert main(["run", "What is 2 plus 2?"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the progress line, then the error
    assert [line for line in lines if line.startswith("error")] == lines[-1:], lines
    assert lines[-1].startswith("error: device: 'cuda' asked for, but torch sees no CUDA GPU here"), lines
