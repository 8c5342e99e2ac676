"""Fault injection: each failure path of the command line ends in one line (``snca: error: ...``,
exit status 2 for the user's input), and nothing already written is lost.

Read-only locations and full disks are real where the test can make them: as root, a mount
namespace (``unshare -m``) with a read-only bind mount or a small tmpfs, and the command runs
in a child process inside it; as another user, ``chmod 555``. Only where neither is possible
(root without namespaces) are the write calls patched to fail as a full disk fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_cli import TINY, assert_one_line_error, run_cli, write_folder

import snca.train.trainer as trainer_module
from snca.checkpoint import load_checkpoint, save_checkpoint
from snca.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


NAMESPACES = _namespaces_work()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny NCA run (1 epoch, 600 Fashion-MNIST images), its directory readable by anyone."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run_dir)]) == 0
    return run_dir


def run_cli_in_child(argvs: list[list[str]], mount: str = "", timeout: float = 120) -> list[tuple[int, str]]:
    """Run ``snca`` commands in one child interpreter (inside a mount namespace after ``mount``,
    a shell command, when given): [(exit status, stderr)] per command."""
    driver = textwrap.dedent("""
        import contextlib, io, json, sys
        from snca.cli import main
        out = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            out.append((code, err.getvalue()))
        print(json.dumps(out))
    """)
    cmd = [sys.executable, "-c", driver, json.dumps([[str(a) for a in argv] for argv in argvs])]
    if mount:
        cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


# ---------------------------------------------------------------------- 1. unwritable outputs
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, trained, capsys, monkeypatch):
    """train, extract, index build and neighbors on a read-only directory: one line naming the
    location, from the check made before data or models are loaded (not from a failed write)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    argvs = [
        ["train", *TINY, "--epochs", "1", "--run-dir", ro / "run"],
        ["extract", trained, "--out", ro / "feats.npz"],
        ["index", "build", trained, "--out", ro / "index"],
        ["neighbors", trained, "--out", ro / "page", "--queries", "2"],
    ]
    if NAMESPACES:
        results = run_cli_in_child(argvs, mount=f"mount --bind -o ro {ro} {ro}")
        cause = "read-only"
    elif os.geteuid() != 0:
        ro.chmod(0o555)
        results = [run_cli(capsys, *argv)[::2] for argv in argvs]
        ro.chmod(0o755)
        cause = "permission denied"
    else:  # root without mount namespaces: every file created under ro fails as on a read-only mount
        import snca.files

        real_mkstemp = snca.files.tempfile.mkstemp

        def read_only_mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
            if dir is not None and Path(dir).resolve().is_relative_to(ro.resolve()):
                raise OSError(errno.EROFS, "Read-only file system")
            return real_mkstemp(*args, dir=dir, **kwargs)

        monkeypatch.setattr(snca.files.tempfile, "mkstemp", read_only_mkstemp)
        results = [run_cli(capsys, *argv)[::2] for argv in argvs]
        monkeypatch.undo()
        cause = "read-only"
    for code, err in results:
        assert_one_line_error(code, err, "cannot write the", str(ro), cause)
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------------- 2. full disk
def test_full_disk_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    """Epoch 1's last.pt fits, epoch 2's does not: one line that says the disk is full, where,
    and that the previous last.pt is intact; it still loads and holds epoch 1."""
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = ["train", *TINY, "--epochs", "2", "--set", "val_every=0", "--run-dir", disk / "run"]
    if NAMESPACES:
        # The checkpoint is ~1.7 MB; 2.6 MB holds one, not the second beside it.
        script = f"mount -t tmpfs -o size=2600k tmpfs {disk}"
        driver = textwrap.dedent(f"""
            import json, sys, contextlib, io, torch
            from snca.cli import main
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main({json.dumps([str(a) for a in argv])})
            epoch = torch.load("{disk}/run/last.pt", weights_only=True)["epoch"]
            print(json.dumps([code, err.getvalue(), epoch, sorted(p.name for p in __import__("pathlib").Path("{disk}/run").iterdir())]))
        """)
        proc = subprocess.run(["unshare", "-m", "sh", "-c", f'{script} && exec "$@"', "sh", sys.executable, "-c", driver],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        code, err, epoch, files = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        real_save, calls = torch.save, []

        def save_then_fill_the_disk(obj, f, *args, **kwargs):  # the second checkpoint meets a full disk
            calls.append(1)
            if len(calls) == 2:
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save_then_fill_the_disk)
        code, _, err = run_cli(capsys, *argv)
        monkeypatch.setattr(torch, "save", real_save)
        epoch = load_checkpoint(disk / "run" / "last.pt")["epoch"]
        files = sorted(p.name for p in (disk / "run").iterdir())
    assert_one_line_error(code, err, "no space left on the device", str(disk / "run" / "last.pt"), "previous last.pt is intact")
    assert epoch == 1
    assert not [f for f in files if f.endswith(".tmp")], files  # no partial file left behind


# ---------------------------------------------------------------------- 3. a stuck rank (DDP)
def _rank(rank: int, port: int, run_dir: Path, err_file: Path) -> None:
    import multiprocessing  # noqa: F401 - forked child: torch and snca are already imported

    code = 1
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SNCA_DIST_TIMEOUT="3")
        if Path("/sys/class/net/lo").exists():
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        if rank == 1:  # rank 1 freezes (kill -STOP) in the middle of epoch 1
            step = trainer_module.Trainer.train_step

            def train_step(self, group):
                if self.step_in_epoch == 2:
                    os.kill(os.getpid(), signal.SIGSTOP)
                return step(self, group)

            trainer_module.Trainer.train_step = train_step
        with open(err_file, "w") as fh:
            os.dup2(fh.fileno(), 2)
            sys.stderr = fh
            code = main(["train", "--dataset", "mnist5k", "--subset", "400", "--test-subset", "100", "--epochs", "1",
                         "--batch-size", "32", "--lr", "0.01", "--device", "cpu", "--no-progress", "--no-plot",
                         "--run-dir", str(run_dir)])
    finally:
        os._exit(code)


def test_a_stuck_rank_ends_the_other_with_one_line_naming_rank_and_step(tmp_path):
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fork = multiprocessing.get_context("fork")
    errs = [tmp_path / f"rank{r}.err" for r in range(2)]
    procs = [fork.Process(target=_rank, args=(r, port, tmp_path / "run", errs[r]), daemon=True) for r in range(2)]
    began = time.monotonic()
    for p in procs:
        p.start()
    procs[0].join(90)
    elapsed = time.monotonic() - began
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    err = errs[0].read_text()
    assert procs[0].exitcode == 2, err[-2000:]
    assert_one_line_error(2, err, "DistributedError" if "DistributedError" in err else "failed on rank 0 of 2",
                          "training step 3/", "of epoch 1", "rank 0 of 2", "within 3 s")
    assert elapsed < 60, elapsed


# ---------------------------------------------------------------------- 4. SIGTERM
def test_sigterm_stops_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "snca", "train", "--subset", "3000", "--test-subset", "100", "--batch-size", "32",
           "--lr", "0.05", "--epochs", "5", "--threads", "1", "--no-progress", "--no-plot", "--set", "val_every=0",
           "--set", "recompute_gallery=false", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:  # the first epoch is done and checkpointed when its line is printed
        if line.startswith("epoch 1/5"):
            break
    time.sleep(0.5)  # well into epoch 2 (about 1.5 s long)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("snca:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "terminated (SIGTERM) in epoch 2" in lines[0] and f"{run / 'last.pt'} holds epoch 1" in lines[0], lines[0]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    assert load_checkpoint(run / "interrupted.pt")["mid_epoch"] > 0


# ---------------------------------------------------------------------- 5. corrupt checkpoints
def _slots_entry(path: Path, rows: int, dim: int) -> tuple[int, int]:
    """(offset, size) in the file of the stored float32 memory slots (torch writes uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename and i.file_size == rows * dim * 4)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip_exponents(path: Path, rows: int, dim: int) -> None:
    """Set the top exponent bits of the first float of 5 slots: their norms become huge or inf."""
    offset, _ = _slots_entry(path, rows, dim)
    data = bytearray(path.read_bytes())
    for r in range(5):
        data[offset + r * dim * 4 + 3] |= 0x7F
    path.write_bytes(bytes(data))


def test_corrupt_but_loadable_checkpoints_are_refused(tmp_path, trained, capsys):
    state = load_checkpoint(trained / "last.pt")
    rows, dim = state["memory"]["slots"].shape
    # Bits flipped in the file: the digest written with it no longer matches.
    flipped = tmp_path / "flipped.pt"
    shutil.copy(trained / "last.pt", flipped)
    _flip_exponents(flipped, rows, dim)
    assert_one_line_error(*run_cli(capsys, "eval", flipped)[::2], "corrupt", "does not match the digest")
    # The same damage in a file without a digest: the slots are not unit vectors.
    no_digest = tmp_path / "no_digest.pt"
    torch.save({k: v for k, v in state.items() if k != "digest"}, no_digest)
    _flip_exponents(no_digest, rows, dim)
    assert_one_line_error(*run_cli(capsys, "eval", no_digest)[::2], "corrupt", "memory slots")
    # Well-formed files with impossible content, each refused by name.
    cases = {
        "slots NaN": (lambda s: s["memory"]["slots"][7].fill_(float("nan")), "NaN/Inf"),
        "slots scaled": (lambda s: s["memory"]["slots"].mul_(2), "not unit vectors"),
        "labels": (lambda s: s["memory"]["labels"].__setitem__(0, 10), "outside its 10 classes"),
        "weights": (lambda s: next(iter(s["model"].values())).view(-1)[0].fill_(float("inf")), "model weight"),
    }
    for name, (damage, needle) in cases.items():
        bad = {k: (v.copy() if isinstance(v, dict) else v) for k, v in load_checkpoint(trained / "last.pt").items()}
        damage(bad)
        path = save_checkpoint(tmp_path / f"{name.replace(' ', '_')}.pt", bad)
        assert_one_line_error(*run_cli(capsys, "eval", path)[::2], "corrupt", needle)
    # The original still loads: the checks do not refuse a good checkpoint.
    assert run_cli(capsys, "eval", trained / "last.pt", "--gallery", "memory")[0] == 0


# ---------------------------------------------------------------------- 6. degenerate training data
def test_training_sets_with_nothing_to_learn_are_refused(tmp_path, capsys):
    data = write_folder(tmp_path / "one", per_class_train=6, per_class_val=2)
    for extra in ("class1", "class2"):
        shutil.rmtree(data / "train" / extra)
        shutil.rmtree(data / "val" / extra)
    folder = ["--dataset", "folder", "--data-dir", data, "--set", "image_size=32", "--epochs", "1", "--batch-size", "4",
              "--no-progress", "--no-plot"]
    assert_one_line_error(*run_cli(capsys, "train", *folder, "--run-dir", tmp_path / "a")[::2], "1 class", "'class0'")
    assert_one_line_error(*run_cli(capsys, "train", "--subset", "5", "--epochs", "1", "--no-progress", "--no-plot",
                                   "--run-dir", tmp_path / "b")[::2], "no class of the training set has two images")
    # Some classes with one image: a warning, on one clean line, and the run goes on.
    code, _, err = run_cli(capsys, "train", "--subset", "15", "--test-subset", "50", "--batch-size", "8", "--epochs", "1",
                           "--no-progress", "--no-plot", "--run-dir", tmp_path / "c")
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if "single image" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("snca: warning: 5 class(es)"), err
    assert "UserWarning" not in err and "warnings.warn" not in err


# ---------------------------------------------------------------------- 7. a named --data-dir
def test_a_missing_data_dir_is_never_created(tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "x"
    code, _, err = run_cli(capsys, "train", *TINY, "--data-dir", missing, "--epochs", "1", "--run-dir", tmp_path / "r")
    assert_one_line_error(code, err, "does not exist", str(missing), "--download")
    assert not (tmp_path / "nonexistent").exists() and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- 8. small messages
def test_small_messages(tmp_path, trained, capsys, monkeypatch):
    # a non-finite learning rate is refused up front
    assert_one_line_error(*run_cli(capsys, "train", "--lr", "inf", "--run-dir", tmp_path / "inf")[::2], "lr")
    # k above the gallery size is capped, and says so
    code, out, err = run_cli(capsys, "eval", trained, "--k", "20000", "--gallery", "memory", "--json")
    assert code == 0
    assert err.strip() == "snca: note: k 20000 exceeds the 600 images of the memory gallery: capped to 600"
    row = json.loads(out)["results"][0]
    assert (row["k"], row["k_requested"]) == (600, 20000)
    # --subset on the test split is refused, not ignored
    assert_one_line_error(*run_cli(capsys, "extract", trained, "--split", "test", "--subset", "10", "--out",
                                   tmp_path / "f.npz")[::2], "--subset applies to the train split")
    # an interrupt in epoch 1, before any last.pt: it says so, and keeps the state in interrupted.pt
    step = trainer_module.Trainer.train_step

    def interrupted_step(self, group):
        if self.step_in_epoch == 2:
            raise KeyboardInterrupt
        return step(self, group)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", interrupted_step)
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--run-dir", tmp_path / "int")
    assert code == 130
    assert err.strip().startswith("snca: interrupted in epoch 1 (step 2/") and "no epoch completed yet" in err, err
    assert "holds epoch" not in err and not (tmp_path / "int" / "last.pt").exists()
    assert load_checkpoint(tmp_path / "int" / "interrupted.pt")["mid_epoch"] == 2


def test_a_skipped_image_is_one_clean_warning_line(tmp_path, capsys):
    data = write_folder(tmp_path / "data", per_class_train=6, per_class_val=2)
    (data / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "train", "--dataset", "folder", "--data-dir", data, "--set", "image_size=32",
                           "--epochs", "1", "--batch-size", "6", "--no-progress", "--no-plot", "--run-dir", tmp_path / "r")
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "unreadable" in ln]
    assert len(lines) == 1 and lines[0].startswith("snca: warning: skipped 1 unreadable image(s)"), err
    assert "UserWarning" not in err and "warnings.warn(" not in err
