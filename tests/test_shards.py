"""Shard specs: braces, globs, list files, URLs; job-array splits; names; opening."""

from __future__ import annotations

import pytest

from latentforge.data import shards


def _touch(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(n.encode())
    return [str(folder / n) for n in names]


def test_braces_and_globs(tmp_path):
    paths = _touch(tmp_path / "s", ["00002.tar", "00000.tar", "00001.tar", "00003.tar", "notes.md"])
    want = sorted(p for p in paths if p.endswith(".tar"))
    assert shards.expand_shards(f"{tmp_path}/s/{{00000..00003}}.tar") == want
    assert shards.expand_shards(f"{tmp_path}/s/*.tar") == want  # sorted, not directory order
    assert shards.expand_shards(f"{tmp_path}/s/{{00001,00003}}.tar") == [want[1], want[3]]


def test_separated_lists_mix_forms_and_keep_order(tmp_path):
    a = _touch(tmp_path / "a", ["x.tar", "y.tar"])
    b = _touch(tmp_path / "b", ["00000.tar", "00001.tar"])
    spec = f"{a[1]}, {tmp_path}/b/{{00000..00001}}.tar  {a[0]}"
    assert shards.expand_shards(spec) == [a[1], *b, a[0]]
    assert shards.expand_shards(f"{a[0]}::{a[1]}") == a
    # A sequence's items are whole: a path with a space works there.
    spaced = _touch(tmp_path / "with space", ["z.tar"])
    assert shards.expand_shards([spaced[0], a[0]]) == [spaced[0], a[0]]


def test_list_files_resolve_relative_paths_against_their_folder(tmp_path, monkeypatch):
    local = _touch(tmp_path / "data" / "shards", ["00000.tar", "00001.tar", "00002.tar"])
    other = _touch(tmp_path / "elsewhere", ["far.tar"])
    (tmp_path / "data" / "train.txt").write_text(
        "# training shards\n\nshards/{00000..00001}.tar\n" + other[0] + "\n  https://host/x/00009.tar  \n")
    (tmp_path / "data" / "more").write_text("shards/00002.tar\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative to the list file, not the cwd
    assert shards.expand_shards(str(tmp_path / "data" / "train.txt")) == [
        local[0], local[1], other[0], "https://host/x/00009.tar"]
    assert shards.expand_shards("@" + str(tmp_path / "data" / "more")) == [local[2]]


def test_remote_urls_pass_through_brace_expanded(tmp_path):
    assert shards.expand_shards("s3://bucket/d/{000..001}.tar,gs://b/x.tar") == [
        "s3://bucket/d/000.tar", "s3://bucket/d/001.tar", "gs://b/x.tar"]
    # A pipe: command keeps its spaces.
    assert shards.expand_shards("pipe:curl -s http://h/{0..1}.tar") == [
        "pipe:curl -s http://h/0.tar", "pipe:curl -s http://h/1.tar"]
    assert shards.expand_shards(["pipe:cat /a b.tar", "http://h/a.tar"]) == ["pipe:cat /a b.tar", "http://h/a.tar"]


@pytest.mark.parametrize("spec, match", [
    ("{tmp}/nothing/*.tar", r"nothing/\*\.tar"),
    ("{tmp}/s/{{00000..00005}}.tar", r"3 of 6 shard paths do not exist"),
    ("{tmp}/s/00000.tar,{tmp}/s/00000.tar", "listed twice"),
    ("{tmp}/missing.txt", "missing.txt: shard list file not found"),
    ("  ", "names no shards"),
    ("ftp://host/x.tar", "unsupported URL scheme 'ftp'"),
    ("{tmp}/s/{{0..2", "brace"),
])
def test_bad_specs_are_value_errors_naming_the_pattern(tmp_path, spec, match):
    _touch(tmp_path / "s", ["00000.tar", "00001.tar", "00002.tar"])
    with pytest.raises(ValueError, match=match):
        shards.expand_shards(spec.format(tmp=tmp_path))


def test_split_for_task_is_contiguous_and_balanced():
    urls = [f"{i}.tar" for i in range(10)]
    parts = [shards.split_for_task(urls, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sum(parts, []) == urls
    many = [shards.split_for_task(urls[:2], i, 4) for i in range(4)]
    assert many == [["0.tar"], ["1.tar"], [], []]
    assert shards.split_for_task(urls, 0, 1) == urls
    with pytest.raises(ValueError, match="task_index"):
        shards.split_for_task(urls, 3, 3)
    with pytest.raises(ValueError, match="num_tasks"):
        shards.split_for_task(urls, 0, 0)


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8"}, (4, 8)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, (2, 3)),
    ({"SLURM_ARRAY_TASK_ID": "20", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "30",
      "SLURM_ARRAY_TASK_STEP": "10"}, (2, 4)),
])
def test_task_from_env(monkeypatch, env, want):
    for k in ("ID", "COUNT", "MIN", "MAX", "STEP"):
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{k}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert shards.task_from_env() == want


@pytest.mark.parametrize("env, match", [
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_ID: expected an integer"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "not task 0..3"),
    ({"SLURM_ARRAY_TASK_ID": "4"}, "SLURM_ARRAY_TASK_COUNT"),
])
def test_task_from_env_errors(monkeypatch, env, match):
    for k in ("ID", "COUNT", "MIN", "MAX", "STEP"):
        monkeypatch.delenv(f"SLURM_ARRAY_TASK_{k}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        shards.task_from_env()


@pytest.mark.parametrize("url, name", [
    ("/data/shards/00017.tar", "00017"),
    ("rel/00001.tar.gz", "00001"),
    ("s3://bucket/laion/part-3.tgz", "part-3"),
    ("https://host/x/00005.tar?sig=abc&x=1", "00005"),
    ("pipe:aws s3 cp s3://b/00042.tar -", "00042"),
    ("pipe:curl -s 'http://h/a b/00043.tar'", "00043"),
    ("/d/weird name!.tar", "weird_name_"),
    ("/d/data.v2.tar", "data.v2"),
])
def test_shard_name(url, name):
    assert shards.shard_name(url) == name


def test_shard_name_of_an_opaque_pipe_is_a_stable_hash():
    a = shards.shard_name("pipe:make-shard --index 3")
    assert a == shards.shard_name("pipe:make-shard --index 3") != shards.shard_name("pipe:make-shard --index 4")
    assert a.startswith("pipe-")


def test_open_shard_local_file_and_pipe(tmp_path):
    p = tmp_path / "a.tar"
    p.write_bytes(b"0123456789" * 1000)
    with shards.open_shard(str(p)) as f:
        assert f.read() == p.read_bytes()
    with shards.open_shard(f"file://{p}") as f:
        assert f.read() == p.read_bytes()
    f = shards.open_shard(f"pipe:cat {p}")
    try:
        assert f.read() == p.read_bytes()
    finally:
        f.close()
