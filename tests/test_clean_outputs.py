"""Safe outputs on shared disks (issue 23): files and folders honour the umask, and a run never
lands silently on top of another run."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from conftest import FIXTURE_SPEC
from diffprobe import DiffprobeError
from diffprobe._io import claim_output, publish_dir, temp_sibling_dir, write_json
from diffprobe.cli import main


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_outputs_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        building = temp_sibling_dir(tmp_path / "store", "building")
        write_json(building / "manifest.json", {})
        publish_dir(building, tmp_path / "store")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "store" / "manifest.json").stat().st_mode) == file_mode


def test_a_run_is_never_written_over_another(tmp_path, cifar_small, capsys):
    """probe over a probe run is refused (--overwrite replaces it); a sweep into a probe run, or a
    probe into a sweep, is refused; a sweep rerun continues its own run; a folder of other files is refused."""
    run = tmp_path / "run"
    claim_output(run, "probe")
    (run / "metrics.json").write_text("{}")
    with pytest.raises(DiffprobeError, match="already holds a probe run: choose another folder, or pass --overwrite"):
        claim_output(run, "probe")
    with pytest.raises(DiffprobeError, match="holds a probe run: a sweep run there would mix its files"):
        claim_output(run, "sweep", resumable=True)
    claim_output(run, "probe", overwrite=True)
    assert not (run / "metrics.json").exists() and (run / ".diffprobe-run").read_text().strip() == "probe"
    legacy = tmp_path / "old-sweep"  # a sweep from before the mark: known by its sweep.csv
    legacy.mkdir()
    (legacy / "sweep.csv").write_text("t\n")
    claim_output(legacy, "sweep", resumable=True)
    with pytest.raises(DiffprobeError, match="holds a sweep run"):
        claim_output(legacy, "probe")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"")
    with pytest.raises(DiffprobeError, match="holds other files \\(cat.png\\)"):
        claim_output(other, "probe")

    sweep = tmp_path / "sweep"
    args = ["sweep", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "60", "--blocks", "13", "--t", "90", "--pool", "2",
            "--no-controls", "--out", str(sweep)]  # fmt: skip
    assert main(args) == 0 and main(args) == 0  # a rerun continues (its store resumes)
    probe = ["probe", str(sweep / "features"), "--t", "90", "--blocks", "13", "--pool", "2", "--epochs", "1"]
    assert main(probe + ["--out", str(sweep)]) == 2
    assert "holds a sweep run" in capsys.readouterr().err
    assert main(probe + ["--out", str(tmp_path / "p")]) == 0
    assert main(probe + ["--out", str(tmp_path / "p")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(probe + ["--out", str(tmp_path / "p"), "--overwrite"]) == 0


def test_quiet_and_rank_logging(cifar_small, tmp_path, capsys, monkeypatch):
    """--quiet: no bars, no information lines; a rank other than 0 under torchrun is quiet too, and
    its warnings carry its rank. --version prints the version."""
    args = ["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "20", "--blocks", "13", "--t", "90"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    loud = capsys.readouterr().err
    assert "%|" in loud  # the bars, as usual
    assert main(["--quiet", *args, "--out", str(tmp_path / "b")]) == 0
    assert "%|" not in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    from diffprobe.cli import console

    with console(False, False):
        import logging

        import tqdm.std

        assert tqdm.std.tqdm(range(2)).disable and logging.getLogger().level == logging.WARNING
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "diffprobe 0.2" in capsys.readouterr().out


def test_a_store_refused_for_one_changed_field_names_it_in_one_line(cifar_small, tmp_path, capsys):
    from latent_models import save_sd

    spec = f"diffusers:{save_sd(tmp_path / 'sd')}"
    args = ["extract", spec, "--data", str(cifar_small), "--limit", "20", "--blocks", "3", "--t", "90", "--out", str(tmp_path / "s")]
    assert main([*args, "-o", "prompt=a cat"]) == 0
    capsys.readouterr()
    assert main([*args, "-o", "prompt=a dog"]) == 2
    err = capsys.readouterr().err
    assert "backbone.config.prompt: 'a cat' vs 'a dog'" in err and err.count("\n") == 1 and len(err) < 600


def test_a_class_label_outside_the_model_is_refused_before_a_store_exists(cifar_small, tmp_path, capsys):
    from latent_models import save_dit

    spec = f"diffusers:{save_dit(tmp_path / 'dit')}"
    out = tmp_path / "s"
    assert main(["extract", spec, "--data", str(cifar_small), "--limit", "20", "--blocks", "3", "--t", "90", "--class-label", "5000",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "5000" in capsys.readouterr().err and not out.exists()


def test_notebook_reprs_are_short(fixture_backbone, cifar_small, tmp_path):
    from diffprobe import FeaturePlan, FeatureStore, Probe, extract
    from diffprobe.data import open_dataset

    data = open_dataset(str(cifar_small))
    store = extract(fixture_backbone, data, FeaturePlan(t=90, blocks=13, pools=2), tmp_path / "s", limit=20, progress=False)
    for thing in (fixture_backbone, data, store, FeaturePlan(t=90, blocks=13), Probe(), FeatureStore.open(tmp_path / "s")):
        text = repr(thing)
        assert len(text) < 300 and "\n" not in text, text
    assert "300 images, 10 classes" in repr(data) and "20 rows" in repr(store)


def test_one_process_unpacks_an_archive_the_others_wait(tmp_path, monkeypatch):
    """Ranks that open the same .tar at once: one unpacks it, the others wait and find the folder."""
    import tarfile
    import threading
    import time

    from diffprobe import data

    folder = tmp_path / "imgs" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("x")
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    monkeypatch.setenv("DIFFPROBE_CACHE", str(tmp_path / "cache"))
    calls, unpack = [], data._unpack

    def slow(*args):
        calls.append(1)
        time.sleep(0.3)
        return unpack(*args)

    monkeypatch.setattr(data, "_unpack", slow)
    found = []
    threads = [threading.Thread(target=lambda: found.append(data.unpack_archive(archive))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and (found[0] / "imgs" / "cat" / "a.txt").is_file()


def test_a_head_streams_a_store_bigger_than_its_memory_budget(cifar_small, tmp_path, monkeypatch):
    """Past $DIFFPROBE_MEMORY_BUDGET the rows are read from the store's memory map batch by batch:
    the same head, the same numbers as in memory."""
    import json

    import torch

    from diffprobe.features.store import FeatureKey, FeatureStore
    from diffprobe.probing import rows

    store_dir = tmp_path / "store"
    assert main(["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "120", "--blocks", "13", "--t", "90", "--pool", "2",
                 "--out", str(store_dir)]) == 0  # fmt: skip
    store = FeatureStore.open(store_dir)
    key = FeatureKey(90, 13, 2)
    monkeypatch.setenv("DIFFPROBE_MEMORY_BUDGET", "1K")
    streamed = rows.load_inputs(store, [key], __import__("numpy").arange(50))[0]
    assert isinstance(streamed, rows.StoreRows) and streamed.shape == (50, 256)
    in_memory = torch.from_numpy(store.load(key, __import__("numpy").arange(50)))
    assert torch.equal(streamed[torch.tensor([7, 3, 3, 49])], in_memory[[7, 3, 3, 49]]) and torch.equal(streamed[10:20], in_memory[10:20])
    assert all(torch.equal(a, b) for a, b in zip(rows.standardization(streamed), rows.standardization(in_memory)))
    probe = ["probe", str(store_dir), "--t", "90", "--blocks", "13", "--pool", "2", "--epochs", "3", "--head", "mlp"]
    assert main(probe + ["--out", str(tmp_path / "streamed")]) == 0
    monkeypatch.setenv("DIFFPROBE_MEMORY_BUDGET", "1G")
    assert main(probe + ["--out", str(tmp_path / "in-memory")]) == 0
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("streamed", "in-memory"))
    assert a["select"] == b["select"] and a["report"] == b["report"]


def test_difeed_mirror_size_message_names_the_valid_blocks(fixture_backbone):
    from diffprobe.probing.diffeed import DifFeed, mirror

    bb = fixture_backbone
    bottom = bb.bottleneck_block
    odd = [b for b in range(bottom + 1, bb.num_blocks + 1) if bb.blocks[b - 1].resolution != bb.blocks[mirror(bb, b) - 1].resolution]
    assert odd, "the fixture has a decoder block whose mirror differs in size (an upsampling block)"
    with pytest.raises(DiffprobeError, match=r"differ in size: --feedback-blocks can be [0-9, -]+ on this model"):
        DifFeed(bb, [odd[0]], bb.num_blocks, 1, torch.nn.Identity())


def test_every_flag_has_help_and_shows_its_default(capsys):
    import argparse

    from diffprobe.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings[-1] if a.option_strings else a.dest}" for name, p in sub.choices.items() for a in p._actions
               if a.help is None and not isinstance(a, argparse._HelpAction)]  # fmt: skip
    assert not missing
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "stratified train/selection/report split (default: 0)" in text


def test_piped_output_is_not_a_stream_of_redraws(cifar_small, tmp_path, capsys):
    """stderr that is not a terminal (a log file, CI): a bar draws when it starts and ends (and every
    30 s), not at every batch or postfix."""
    args = ["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "120", "--batch-size", "8", "--blocks", "13", "--t", "90",
            "--out", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 0
    lines = [part for part in capsys.readouterr().err.replace("\n", "\r").split("\r") if "extract" in part and "%|" in part]
    assert 1 <= len(lines) <= 4, lines  # 15 batches: once at the start, once at the end


def test_hub_log_lines_and_the_offline_error_come_once_and_whole(capfd, monkeypatch):
    """huggingface_hub's own handler prints its lines; ours must not print them a second time, and
    the offline error keeps the hub's whole message (it was cut at 160 characters)."""
    import logging

    from diffprobe.backbones.pipeline_parts import offline_error
    from diffprobe.cli import console

    with console(quiet=False, verbose=False):
        logging.getLogger("huggingface_hub").warning("Retrying in 8s [Retry 5/5].")
    err = capfd.readouterr().err
    assert err.count("Retrying in 8s") <= 1
    message = "An error happened while trying to locate the file on the Hub and we cannot find the requested files in the " \
              "local cache. Please check your connection and try again or make sure your Internet connection is on."
    line = str(offline_error("org/model", OSError(message)))
    assert message in line and "\n" not in line


def test_probe_online_takes_one_weight_decay(capsys):
    from diffprobe.cli import build_parser

    args = build_parser().parse_args(["probe-online", FIXTURE_SPEC, "--data", "x", "--out", "o", "--t", "10", "--blocks", "3", "--wd", "0.05"])
    assert args.wd == 0.05
    with pytest.raises(SystemExit):
        build_parser().parse_args(["probe-online", FIXTURE_SPEC, "--data", "x", "--out", "o", "--t", "10", "--blocks", "3", "--wd", "0.05,0.1"])
    assert "invalid float value" in capsys.readouterr().err
