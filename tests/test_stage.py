"""Node-local staging: copies verified once per node, a kill mid-copy and a full disk (real SIGKILL, real
EFBIG), two processes staging at once, data.stage in the config."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from amodal.config import ConfigError, DataConfig, load_config
from amodal.data.dataset import ShardDataset
from amodal.data.format import PackOptions, ShardError, read_manifest, sha256_file
from amodal.data.pack import pack
from amodal.data.read import verify_shards
from amodal.data.sources import SyntheticSource
from amodal.data.stage import MARKER, stage_base, stage_data, stage_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A 'shared' shard folder; raw crops, so that its 3 train shards (~1 MB each) take several blocks."""
    root = tmp_path_factory.mktemp("shared")
    pack(root, {"train": SyntheticSource("train", 12), "val": SyntheticSource("val", 4),
                "test": SyntheticSource("test", 2)}, shard_size=4, progress=False,
         options=PackOptions(image_codec="raw", map_codec="raw"))
    return root


def staged_dir(shared: Path, base: Path) -> Path:
    return base / f"amodal-shards-{read_manifest(shared)['fingerprint'][:16]}"


def intact(dest: Path, splits) -> bool:
    """Every shard of splits in dest has its manifest's size and sha256 (verify_shards, less the
    shards of other splits that were not asked for)."""
    m = read_manifest(dest)
    return all(sha256_file(dest / e["file"]) == e["sha256"] for s in splits for e in m["splits"][s]["shards"])


def child(code: str, **kw) -> subprocess.Popen:
    """A real Python process running code (the test's own checkout on its path)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_stage_copies_verified_shards_once(shared, tmp_path):
    first = stage_shards(shared, ["train", "val"], tmp_path)
    dest = staged_dir(shared, tmp_path)
    assert first.root == dest and sorted(first.copied) == [f"train-0000{i}.h5" for i in range(3)] + ["val-00000.h5"]
    assert not (dest / "test-00000.h5").exists()  # only the splits asked for
    a, b = ShardDataset(shared, "train"), ShardDataset(dest, "train")
    assert a.fingerprint == b.fingerprint and a.keys() == b.keys()
    assert all(a[i]["image"].equal(b[i]["image"]) for i in (0, 11))
    again = stage_shards(shared, ["train"], tmp_path)
    assert again.root == dest and again.copied == [] and "reading" in again.note
    # another split later joins the same copy
    assert stage_shards(shared, ["test"], tmp_path).copied == ["test-00000.h5"]
    assert verify_shards(dest) == []


def test_a_damaged_shared_shard_is_refused_by_name(shared, tmp_path):
    import shutil

    root = tmp_path / "shared"
    shutil.copytree(shared, root)
    with open(root / "val-00000.h5", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ShardError, match=r"val-00000.h5: sha256 .* does not match the manifest"):
        stage_shards(root, ["val"], tmp_path / "local")
    dest = staged_dir(root, tmp_path / "local")
    assert not (dest / "val-00000.h5").exists() and not list(dest.glob("*.tmp-*"))
    (root / "test-00000.h5").unlink()
    with pytest.raises(ShardError, match=r"test-00000.h5: missing shard \(listed in .*manifest.json\)"):
        stage_shards(root, ["test"], tmp_path / "local")


def test_a_copy_killed_mid_file_is_redone(shared, tmp_path):
    """SIGKILL while a shard is half written (the child blocks in its progress callback after the first
    block): no entry in staged.json, a temporary file left; the next stage deletes it and copies again."""
    proc = child(f"""
        import sys, time
        from amodal.data import stage
        stage.CHUNK = 1 << 16  # several blocks per shard
        def progress(name, done, total):
            if name == "train-00001.h5" and done < total:
                print("mid", flush=True)
                time.sleep(60)
        stage.stage_shards({str(shared)!r}, ["train"], {str(tmp_path)!r}, progress=progress)
    """)
    try:
        assert proc.stdout.readline() == "mid\n", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    dest = staged_dir(shared, tmp_path)
    (tmp,) = dest.glob("train-00001.h5.tmp-*")
    assert 0 < tmp.stat().st_size < (shared / "train-00001.h5").stat().st_size
    assert not (dest / "train-00001.h5").exists()
    again = stage_shards(shared, ["train"], tmp_path)
    assert again.copied == ["train-00001.h5", "train-00002.h5"]  # train-00000 was finished before the kill
    assert not list(dest.glob("*.tmp-*")) and intact(dest, ["train"])


def test_a_full_disk_falls_back_to_the_shared_folder(shared, tmp_path):
    """A real EFBIG: the child may write files of at most 600 kB (RLIMIT_FSIZE, SIGXFSZ ignored), less
    than a shard. It reads the shared folder, warns once, leaves no partial file; with room, it stages."""
    proc = child(f"""
        import resource, signal
        from amodal.config import DataConfig
        from amodal.data.stage import stage_data
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
        staged = stage_data(DataConfig(root={str(shared)!r}, stage={str(tmp_path)!r}), ["train"])
        print(staged.root, staged.fell_back)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == [str(shared), "True"]
    assert err.count("warning:") == 1 and "File too large" in err and "reading" in err
    dest = staged_dir(shared, tmp_path)
    assert not list(dest.glob("*.tmp-*")) and not (dest / MARKER).exists()
    staged = stage_data(DataConfig(root=str(shared), stage=str(tmp_path)), ["train"])
    assert staged.root == dest and not staged.fell_back and len(staged.copied) == 3


@pytest.mark.slow
def test_two_ranks_on_one_node_stage_once(shared, tmp_path):
    """Two processes stage at once: the first holds the lock after its first shard until the second has
    started staging; the second waits for it, then finds every shard listed and copies nothing."""
    go = tmp_path / "go"
    code = f"""
        import os, sys, time
        from amodal.data import stage
        def progress(name, done, total):
            if done == total and name == "train-00000.h5":
                print("holding the lock", flush=True)
                while not os.path.exists({str(go)!r}):
                    time.sleep(0.01)
        print("staging", flush=True)
        staged = stage.stage_shards({str(shared)!r}, ["train", "val"], {str(tmp_path / "node")!r}, progress=progress)
        print("done", staged.root, len(staged.copied), flush=True)
    """
    first = child(code)
    assert first.stdout.readline() == "staging\n" and first.stdout.readline() == "holding the lock\n", \
        first.stderr.read()
    second = child(code)
    assert second.stdout.readline() == "staging\n", second.stderr.read()
    time.sleep(0.3)  # the second is on the lock now
    go.write_text("")
    outs = [p.communicate(timeout=60) for p in (first, second)]
    assert all(p.returncode == 0 for p in (first, second)), [e for _, e in outs]
    dest = staged_dir(shared, tmp_path / "node")
    assert [o.split()[-3:] for o, _ in outs] == [["done", str(dest), "4"], ["done", str(dest), "0"]]
    assert intact(dest, ["train", "val"])


def test_where_to_stage(shared, tmp_path):
    other = tmp_path / "node"
    other.mkdir()
    assert stage_base("off", shared) is None
    assert stage_base(str(other), shared) == other
    assert stage_base("auto", shared, env={}) is None  # nowhere node-local known: read in place
    assert stage_base("auto", shared, env={"TMPDIR": str(other)}) is None  # same file system as the data
    assert stage_base("auto", shared, env={"SLURM_TMPDIR": "/proc", "TMPDIR": str(other)}) == Path("/proc")
    staged = stage_data(DataConfig(root=str(shared), stage="off"), ["train"])
    assert staged.root == shared and "in place" in staged.note and not staged.copied


def test_data_stage_is_checked_when_the_config_loads(tmp_path, monkeypatch):
    assert DataConfig().stage == "auto"
    assert load_config(None, ["data.stage=off"]).data.stage == "off"
    assert load_config(None, [f"data.stage={tmp_path}"]).data.stage == str(tmp_path)
    for bad in ("of", "", "scratch/stage"):
        with pytest.raises(ConfigError, match="data.stage = .*expected 'auto', 'off' or an absolute folder"):
            load_config(None, [f"data.stage='{bad}'"])
    # a variable of the node the job runs on is expanded there: one that is not set fails then
    cfg = load_config(None, ["data.stage='$NO_SUCH_VARIABLE_HERE/stage'", f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"data.stage = '\$NO_SUCH_VARIABLE_HERE/stage': .* not an absolute folder"):
        stage_data(cfg.data, ["train"])
    monkeypatch.setenv("AMODAL_TEST_STAGE", str(tmp_path / "node"))
    assert stage_base("$AMODAL_TEST_STAGE/x", tmp_path) == tmp_path / "node" / "x"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data.stage = .*file.*is not a folder"):
        load_config(None, [f"data.stage={tmp_path / 'file'}"])


@pytest.mark.slow
def test_training_reads_the_staged_copy_and_records_the_shared_folder(shared, tmp_path):
    from test_train_support import TINY

    from amodal.train import train

    cfg = load_config(None, [f"data.root={shared}", *TINY, f"data.stage={tmp_path / 'node'}", "train.steps=2",
                             "train.val_every=2"])
    assert train(cfg, tmp_path / "run").step == 2
    dest = staged_dir(shared, tmp_path / "node")
    assert sorted(p.name for p in dest.glob("*.h5")) == [f"train-0000{i}.h5" for i in range(3)] + ["val-00000.h5"]
    assert "staged 4 shards" in (tmp_path / "run" / "log.txt").read_text()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["root"] == str(shared)
