"""The data path at scale: bounded open files per rank, store layout and format, O(N) manifests,
preprocessing that survives a kill, a stream without repeats, and data made ready by `launch`.

Sizes are the issue's: 2,000 tiny volumes for the low-`ulimit` run, 114,000 ids (OpenMind) for the
index and manifest checks; the volumes are tiny so the counts, not the voxels, cost the time.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO

from ds_simclr.cli import main
from ds_simclr.data.manifest import load_manifest
from ds_simclr.data.preprocess import finished_images, preprocess
from ds_simclr.data.sampling import EpochStream, epoch_stream, repeated_pairs
from ds_simclr.data.store import FORMAT_NAME, OpenVolumes, PatchStore, volume_file, write_index
from ds_simclr.data.synthetic import tiny_volume, write_tiny_collection, write_tiny_store
from ds_simclr.errors import DataError

OPENMIND = 114_000


def store_files_open(pid: int | str, store: Path) -> tuple[int, int]:
    """(file descriptors, memory maps) of process `pid` that point into `store`."""
    root = str(store.resolve())
    fds = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(root)
        except OSError:  # closed meanwhile
            pass
    with open(f"/proc/{pid}/maps") as maps:
        mapped = sum(root in line for line in maps)
    return fds, mapped


# --------------------------------------------------------------------------- open volumes


def test_reader_threads_keep_at_most_max_open_volumes_and_read_correctly(tmp_path: Path) -> None:
    store = write_tiny_store(tmp_path / "store", 60, edge=10)
    ps = PatchStore(store, max_open=5)
    seen, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(store_files_open("self", store))
            time.sleep(0.001)

    def read(worker: int, errors: list) -> None:
        rng = np.random.default_rng(worker)
        for _ in range(150):
            k = int(rng.integers(60))
            start = tuple(int(s) for s in rng.integers(-3, 6, size=3))
            want = np.full((8, 8, 8), 0.0, np.float16)
            vol = tiny_volume(k, 10).astype(np.float16)
            lo = [max(s, 0) for s in start]
            hi = [min(s + 8, 10) for s in start]
            want[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = vol[tuple(slice(a, b) for a, b in zip(lo, hi))]
            if not np.array_equal(ps.read_patch(k, start, 8), want):
                errors.append((k, start))

    errors: list = []
    sampler = threading.Thread(target=sample)
    sampler.start()
    readers = [threading.Thread(target=read, args=(w, errors)) for w in range(6)]
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    sampler.join()
    assert not errors
    assert max(fds for fds, _ in seen) <= 5 and max(maps for _, maps in seen) <= 5
    assert max(maps for _, maps in seen) >= 2  # the sampler saw reading happen
    assert ps.open_volumes <= 5
    ps.close()
    assert ps.open_volumes == 0 and store_files_open("self", store) == (0, 0)


def test_a_lent_volume_stays_open_and_a_full_pool_waits_for_one_to_come_back() -> None:
    opened: list[int] = []
    pool = OpenVolumes(2, lambda key: opened.append(key) or np.full(3, key))
    got = threading.Event()

    def other() -> None:
        with pool.use(2) as vol:
            assert vol[0] == 2
            got.set()

    with pool.use(1) as vol:
        thread = threading.Thread(target=other)
        thread.start()
        assert not got.wait(0.3)  # the one volume that fits is lent: volume 2 must wait
        assert vol[0] == 1 and opened == [1]
    thread.join(10)
    assert got.is_set() and opened == [1, 2] and len(pool) == 1
    with pool.use(2):
        assert opened == [1, 2]  # reused, not reopened


def test_a_failed_open_reaches_every_waiting_thread_and_is_retried() -> None:
    calls: list[int] = []

    def opener(key: int) -> np.ndarray:
        calls.append(key)
        if len(calls) == 1:
            raise OSError("flaky disk")
        return np.zeros(1)

    pool = OpenVolumes(2, opener)
    with pytest.raises(OSError, match="flaky"):
        with pool.use(7):
            pass
    assert len(pool) == 0
    with pool.use(7) as vol:
        assert vol.shape == (1,)
    assert calls == [7, 7]


# --------------------------------------------------------------------------- store layout and format


def test_store_folders_stay_small_at_openmind_scale() -> None:
    folders = Counter(volume_file(f"OpenMind__Dataset{k % 800:03d}__sub-{k:06d}__ses-1__T1w").rsplit("/", 1)[0] for k in range(OPENMIND))
    assert len(folders) == 256
    assert max(folders.values()) * 2 < 1500  # volume + sidecar per image: ~900 entries per folder


def test_opening_the_index_of_114k_volumes_takes_little_memory(tmp_path: Path) -> None:
    modalities = ["T1w", "T2w", "FLAIR"] * (OPENMIND // 3)
    ids = [f"OpenMind__Dataset{k % 800:03d}__sub-{k:06d}__ses-1__{m}" for k, m in enumerate(modalities)]
    write_index(tmp_path, ids, [(180, 220, 190)] * OPENMIND, [-1.5] * OPENMIND, modalities)
    del modalities
    del ids
    tracemalloc.start()
    store = PatchStore(tmp_path, ["T1w", "FLAIR"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(store) == 2 * OPENMIND // 3 and store.modality(1) == "FLAIR" and store.shape(5) == (180, 220, 190)
    assert store.id(1) == "OpenMind__Dataset002__sub-000002__ses-1__FLAIR"
    assert peak < 40e6, f"{peak / 1e6:.1f} MB"  # the bound is 200 MB per rank


def test_an_older_or_unknown_store_format_is_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text(json.dumps({"format": "ds_simclr-store/1", "images": []}))
    with pytest.raises(DataError, match="is older than") as err:
        PatchStore(tmp_path)
    assert err.value.hint == f"rebuild it: ds_simclr data preprocess MANIFEST {tmp_path} --overwrite"
    (tmp_path / "store.json").write_text(json.dumps({"format": "ds_simclr-store/9"}))
    with pytest.raises(DataError, match=f"not the format this version reads \\({FORMAT_NAME}\\)"):
        PatchStore(tmp_path)


def test_a_store_that_changed_after_indexing_names_the_volume(tmp_path: Path) -> None:
    store = write_tiny_store(tmp_path / "s", 3, edge=6)
    from ds_simclr.data.store import write_volume

    write_volume(store, "Synthetic__v000001", np.zeros((6, 6, 7)))
    with pytest.raises(DataError, match=r"the index says float16 \[6, 6, 6\]") as err:
        PatchStore(store).read_patch(1, (0, 0, 0), 4)
    assert "Synthetic__v000001.npy" in err.value.where
    old = sorted(store.glob("index-*.npz"))
    write_index(store, ["a"], [(1, 1, 1)], [0.0], ["T1w"])
    assert not any(p.exists() for p in old) and len(list(store.glob("index-*.npz"))) == 1


# --------------------------------------------------------------------------- manifests and preprocessing


def test_duplicate_ids_are_found_in_linear_time_at_openmind_scale(tmp_path: Path) -> None:
    subjects = {f"sub-{k:06d}": {"sessions": {"ses-1": {"images": [{"name": "t1.nii.gz", "image_path": f"v/{k}.nii.gz", "modality": "T1w"}]}}} for k in range(OPENMIND)}
    subjects[f"sub-{OPENMIND - 1:06d}"]["sessions"]["ses-1"]["images"].append({"name": "t1.nii", "image_path": "x.nii", "modality": "T1w"})
    path = tmp_path / "pretrain_data.json"
    path.write_text(json.dumps({"collection_index": 1, "collection_name": "C", "datasets": {"D": {"dataset_index": "D", "subjects": subjects}}}))
    del subjects
    started = time.monotonic()
    with pytest.raises(DataError, match="two images share the id C__D__sub-113999__ses-1__t1") as err:
        load_manifest(path, check_files=False)
    took = time.monotonic() - started
    assert err.value.where.endswith("sessions.ses-1.images[1]") and "images[0]" in err.value.message
    assert took < 60, f"{took:.0f} s: the all-pairs search took minutes at this size"


def test_preprocessing_killed_midway_resumes_from_its_finished_images(tmp_path: Path) -> None:
    manifest = write_tiny_collection(tmp_path / "raw", 300, edge=8)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "ds_simclr.cli", "data", "preprocess", str(manifest), str(store), "-j", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(store.glob("images/*/*.json"))) < 40:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "store.json").exists()  # incomplete: nothing may train from it
    with pytest.raises(DataError, match="no store.json"):
        PatchStore(store)
    finished = finished_images(store)
    assert 40 <= len(finished) < 300
    report = preprocess(manifest, store, jobs=2, progress=False)
    assert set(report.reused) == finished and len(report.processed) == 300 - len(finished)
    assert len(PatchStore(store)) == 300
    on_disk = json.loads((store / "report.json").read_text())
    assert on_disk["store_size"] == 300 and len(on_disk["reused"]) == len(finished)
    assert len([p for p in store.rglob("*") if ".tmp" in p.name]) <= 1  # what the killed process was writing
    assert len(json.loads((store / "fingerprint.json").read_text())) == 300


# --------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("size", [7, 64, 65, 100, 1000, 2003])
@pytest.mark.parametrize("batch", [8, 64, 120])
def test_no_volume_twice_in_a_global_batch_while_the_dataset_is_large_enough(size: int, batch: int) -> None:
    steps = 20
    stream = epoch_stream(size, steps * batch, batch, seed=5, epoch=3)
    for step in range(steps):
        distinct = len(set(stream[step * batch : (step + 1) * batch].tolist()))
        assert batch - distinct == repeated_pairs(size, batch)  # 0 when size >= batch
    for k in range(len(stream) // size):  # every volume once per pass
        assert sorted(stream[k * size : (k + 1) * size].tolist()) == list(range(size))
    same = EpochStream(size, steps * batch, batch, seed=5)
    assert [same.index(3, s) for s in range(0, steps * batch, 7)] == stream[::7].tolist()


def test_the_old_straddling_batches_are_gone() -> None:
    """N = 1,000, B = 120: a batch straddling two permutations repeated 0.24 volumes per batch on average."""
    stream = epoch_stream(1000, 275 * 120, 120, seed=0, epoch=0)
    repeats = [120 - len(set(stream[s : s + 120].tolist())) for s in range(0, len(stream), 120)]
    assert sum(repeats) == 0


# --------------------------------------------------------------------------- data made ready by launch


def test_launch_says_how_many_pairs_repeat_a_volume_when_the_store_is_small(tmp_path: Path) -> None:
    from ds_simclr.launch import describe_data, make_plan, prepare_data
    from ds_simclr.specload import load_spec

    store = write_tiny_store(tmp_path / "store", 5, edge=6)
    spec = load_spec(REPO / "ds_configs" / "quickstart.yaml", ["data.demo=false", f"data.store={store}", f"output_dir={tmp_path}"])
    lines: list[str] = []
    cluster = make_plan(spec, env={})[1].cluster
    assert describe_data(spec, cluster) == f"data         store {store} (ready, 5 volumes)"
    prepare_data(spec, cluster, echo=lines.append)
    assert lines == [
        "the store has 5 volumes, fewer than the global batch of 16 pairs: 11 pairs of every step repeat a volume"
        " (false negatives for NT-Xent); more volumes or a smaller batch avoid it"
    ]


def test_launch_on_several_nodes_refuses_to_preprocess_and_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    manifest = write_tiny_collection(tmp_path / "raw", 2)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    sets = [f"output_dir={tmp_path / 'runs'}", "data.demo=false", f"data.manifest={manifest}", f"data.store={tmp_path / 'store'}",
            "distributed.nodes=auto", "distributed.procs_per_node=auto"]
    args = ["launch", str(REPO / "ds_configs" / "quickstart.yaml"), *[a for s in sets for a in ("--set", s)]]
    command = f"ds_simclr data preprocess {manifest} {tmp_path / 'store'} -j N"
    assert main([*args, "--dry-run"]) == 0
    assert f"launch refuses on 2 nodes; run `{command}` first" in capsys.readouterr().out
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has 2 nodes" in err and command in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "store").exists()


def test_train_on_an_incomplete_store_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    (store / "images").mkdir(parents=True)  # e.g. a preprocessing that was killed
    spec = yaml.safe_load((REPO / "ds_configs" / "quickstart.yaml").read_text())
    spec["data"] = {"store": str(store)}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "spec.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"spec.yaml: data.store: {store}: not a complete preprocessed store (no store.json)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_under_ulimit_256_train_on_2000_volumes_preprocessed_by_launch(tmp_path: Path) -> None:
    """`ulimit -n 256`, 2,000 volumes all read, a 3 s collective time-out, preprocessing longer (~11 s in CI).

    Before: +1 descriptor and +1 map per volume read (the run died with EMFILE); rank 0 preprocessed
    while rank 1 waited in a collective that timed out.
    """
    volumes, batch, steps, timeout_min = 2000, 64, 32, 0.05
    write_tiny_collection(tmp_path / "raw", volumes, edge=8)
    spec = {
        "name": "scale", "seed": 1, "output_dir": "runs",
        "data": {"manifest": "raw/pretrain_data.json", "store": "store", "patch_size": 16, "num_workers": 2},
        "views": {"output_size": 16, "crop_min": 8},
        "model": {"encoder": "resenc_tiny", "head_hidden": 32, "head_out": 16, "head_layers": 2},
        "optimizer": {"lr": 0.001}, "schedule": {"warmup_steps": 0},
        "train": {"global_batch": batch, "steps_per_epoch": 40, "max_steps": steps, "precision": "fp32"},
        "distributed": {"launcher": "torchrun", "nodes": 1, "procs_per_node": 2, "timeout_minutes": timeout_min},
        "checkpoint": {"every_steps": 1000, "keep_last": 1},
        "logging": {"wandb_mode": "disabled", "log_every": 8},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store, run, log = tmp_path / "store", tmp_path / "runs" / "scale", tmp_path / "launch.log"

    def low_ulimit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    from ds_simclr.launch import rank_pids

    cmd = [sys.executable, "-m", "ds_simclr.cli", "launch", str(tmp_path / "spec.yaml")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=low_ulimit)
    samples: dict[int, list[tuple[int, int, int, int]]] = {}  # pid -> (store fds, store maps, all fds, all maps)
    deadline = time.monotonic() + 400
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in rank_pids(run) if run.is_dir() else []:
            try:
                before = len(os.listdir(f"/proc/{pid}/fd"))
                fds, maps = store_files_open(pid, store)
                total_fds = len(os.listdir(f"/proc/{pid}/fd"))
                total_maps = len(Path(f"/proc/{pid}/maps").read_text().splitlines())
            except OSError:  # the rank ended meanwhile
                continue
            if total_fds != before:  # e.g. the loader closing every volume at the end: counts of two moments
                continue
            samples.setdefault(pid, []).append((fds, maps, total_fds, total_maps))
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    text = log.read_text()
    assert proc.wait() == 0, text[-3000:]
    seconds = float(re.search(rf"launch: {volumes} preprocessed, 0 reused, 0 skipped in ([\d.]+) s", text).group(1))
    assert seconds > 2 * timeout_min * 60, "preprocessing must take longer than the collective time-out"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [8, 16, 24, 32]
    stream = EpochStream(volumes, 40 * batch, batch, seed=1)
    assert {stream.index(0, s) for s in range(steps * batch)} == set(range(volumes))  # every volume was read
    assert len(samples) == 2, samples.keys()
    for pid, rows in samples.items():
        reading = [row for row in rows if row[0] > 0]  # once the loader has opened a volume
        assert max(row[0] for row in rows) <= 64 and max(row[1] for row in rows) <= 64  # data.max_open_files
        assert len(reading) >= 10 and max(row[1] for row in reading) >= 16  # the sampler saw the reading
        # above the rank's own baseline (what it holds besides volumes), the counts stay under the bound
        base_fds, base_maps = min(r[2] - r[0] for r in reading), min(r[3] - r[1] for r in reading)
        top_fds, top_maps = max(r[2] for r in reading), max(r[3] for r in reading)
        print(f"rank pid {pid}: {len(rows)} samples; volume fds <= {max(r[0] for r in rows)}, volume maps <= "
              f"{max(r[1] for r in rows)}; all fds {base_fds} + <= {top_fds - base_fds}, all maps {base_maps} + <= {top_maps - base_maps}")
        # the rank's own files come and go by a descriptor or two (a metrics line appended, a /proc read):
        # measured 65 once; a volume a rank kept open would add one per volume read (2,000 here)
        assert top_fds - base_fds <= 64 + 2
        others = [r[2] - r[0] for r in reading]
        assert max(others) - min(others) <= 4  # what the rank holds besides volumes does not grow with reading
