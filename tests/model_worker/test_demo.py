"""The README's main job (`make demo`) runs end to end on a fresh data dir."""

from model_worker.demo import main


def test_demo_builds_saves_reloads_and_generates(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "engram_mhc" in out and "generated (" in out
    for name in ("config.json", "model.safetensors", "engram_tables.safetensors", "tokenizer.json"):
        assert (tmp_path / "demo-model" / name).is_file()
