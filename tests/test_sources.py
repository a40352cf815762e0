"""Weighted sources: the per-epoch apportionment, precompute of several sources through one
job array (each source its own dataset, assembled by the task that finishes it), and the
job records that resubmit and report on such an array."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentforge.config import resolve
from latentforge.data import latents as lat
from latentforge.data import precompute, synth
from latentforge.data.sources import epoch_counts, open_dataset, sources_of


def test_epoch_counts_follow_the_weights_and_sum_exactly():
    assert epoch_counts([1000], [5.0]) == [1000]  # one source: one pass per epoch, whatever its weight
    assert epoch_counts([1000], [1.0], 300) == [300]
    assert epoch_counts([900, 100], [1.0, 1.0]) == [500, 500]  # the small source repeats 5x
    assert epoch_counts([10, 10, 10], [1.0, 1.0, 1.0], 100) == [34, 33, 33]  # largest remainder, earlier first
    assert sum(epoch_counts([7, 3, 11], [0.3, 2.0, 1.7], 1001)) == 1001
    with pytest.raises(ValueError, match=r"data.sources\[1\]"):
        epoch_counts([10, 0], [1.0, 1.0])


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    synth.write_shards(root / "rawA", 30, 10, 32, seed=0, max_aspect=2.0)
    synth.write_shards(root / "rawB", 16, 8, 32, seed=1)
    return root


def overrides(root: Path, out: str) -> list[str]:
    return [f"run_root={root}", f"data.latent_dir={root / out}", "data.precompute_workers=0",
            "data.latent_samples_per_shard=4", "data.bucket_max_ratio=2",
            f"data.sources=[{{name: web, raw_shards: '{root}/rawA/*.tar', weight: 3}}, "
            f"{{name: curated, raw_shards: '{root}/rawB/*.tar', latent_dir: '{root / out}-curated'}}]"]


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_job_array_over_two_sources_equals_one_task(two_sources: Path) -> None:
    from latentforge.launch import records

    one = resolve("tiny", None, overrides(two_sources, "one"))
    srcs = sources_of(one)
    assert [s.name for s in srcs] == ["web", "curated"]
    assert srcs[0].latent_dir == two_sources / "one" / "web" and srcs[1].latent_dir == two_sources / "one-curated"
    out = precompute.run(one)
    assert out["seen"] == 46 and len(out["manifests"].split(", ")) == 2

    three = resolve("tiny", None, overrides(two_sources, "three"))
    work = [(s.latent_dir, s.raw_shards) for s in sources_of(three)]
    assert [len(g) for g in records.task_work(work, 3)] == [2, 2, 1]  # 3 + 2 raw shards, in config order
    results = [precompute.run(three, task_index=2, num_tasks=3)]
    assert records.incomplete_tasks(Path("unused"), "", 3, work) == [0, 1]
    assert not (sources_of(three)[1].latent_dir / lat.MANIFEST).exists()  # task 1 holds the rest of curated
    results += [precompute.run(three, task_index=i, num_tasks=3) for i in (0, 1)]
    assert records.incomplete_tasks(Path("unused"), "", 3, work) == []
    assert sum(r.get("seen", 0) for r in results) == 46
    for a, b in zip(sources_of(one), sources_of(three)):
        assert dir_bytes(a.latent_dir) == dir_bytes(b.latent_dir)
    assert precompute.verify(three) == []
    rec = {"latent_dir": str(three.resolved_latent_dir), "raw_shards": "",
           "sources": [{"latent_dir": str(d), "raw_shards": spec} for d, spec in work]}
    assert records.precompute_work(rec) == work

    # Training and eval see both sources, their buckets, and the held-out parts of each.
    from latentforge.data.encoders import build_encoders

    ds = open_dataset(three, build_encoders(three))
    assert {p["source"] for p in ds.train_parts} == {0, 1} and all(Path(p["file"]).is_absolute()
                                                                  for p in ds.train_parts)
    assert len(ds.heldout_parts) == 2 and ds.loader_sources() == [{"name": "web", "weight": 3.0},
                                                                   {"name": "curated", "weight": 1.0}]
    assert sum(b["count"] for b in ds.buckets) == 46 and len(ds.buckets) > 1
    manifest = json.loads((sources_of(three)[0].latent_dir / lat.MANIFEST).read_text())
    assert manifest["identity"]["buckets"] == [[40, 24], [32, 32], [24, 40]]
