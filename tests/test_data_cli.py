"""`latentforge data inspect DIR` through `main([...])`: per-reason accounting of a
precompute, also part way through a job array, and a clear error for a non-dataset."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from PIL import Image

from latentforge.data import synth
from latentforge.launch.cli import main


def _rows(out: str) -> dict[str, int]:
    """{"seen": 12, "corrupt_image": 1, ...} from inspect's "name   count" lines."""
    return {w[0]: int(w[1]) for w in (line.split() for line in out.splitlines()) if len(w) == 2 and w[1].isdigit()}


def _bad_shard(path: Path) -> None:
    jpg = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(jpg, format="JPEG")
    members = [("a.jpg", jpg.getvalue()), ("a.txt", b"a red square"),
               ("b.jpg", b"\xff\xd8 broken"), ("b.txt", b"corrupt image"),
               ("c.jpg", jpg.getvalue())]  # no caption
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_data_inspect_counts_per_reason_during_and_after_a_job_array(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    synth.write_shards(raw, 8, 4, 16, seed=0)  # 00000.tar, 00001.tar
    _bad_shard(raw / "zz-bad.tar")
    d = tmp_path / "latents"
    ov = [f"run_root={tmp_path}", f"data.raw_shards={raw}/*.tar", f"data.latent_dir={d}", "data.resolution=16",
          "data.precompute_workers=0"]

    assert main(["precompute", *ov, "--task-index", "0", "--num-tasks", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "2 raw shards" in out and "NOT assembled yet" in out
    assert _rows(out) == {"seen": 8, "written": 8, "rejected": 0}

    assert main(["precompute", *ov, "--task-index", "1", "--num-tasks", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "3 raw shards" in out and "dataset manifest assembled" in out
    assert _rows(out) == {"seen": 11, "written": 9, "rejected": 2, "corrupt_image": 1, "missing_caption": 1}
    assert "check: written + rejected == seen" in out


def test_data_inspect_of_a_non_dataset_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no per-shard manifests" in err and str(tmp_path / "nowhere") in err
