"""The usage commands on real data (mnist5k): `snca predict`, `snca index ...`, `snca neighbors`,
with a small checkpoint trained here (snca's NCALoss + MemoryBank, a few steps) and saved in
the agreed checkpoint format. Bad inputs: missing / unreadable / non-image files, a model
that does not match the index, an empty gallery. The neighbour page is opened in headless
Chromium and its screenshot checked. Runs trained on base classes only or on coarse labels
(`fit`, one tiny epoch) must show their own class names everywhere."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snca import MemoryBank, NCALoss
from snca.checkpoint import load_run, save_checkpoint
from snca.cli import main
from snca.config import config_to_dict, load_config
from snca.data import MNIST_CLASSES, build_dataset, build_transforms
from snca.models import build_model

torch.set_num_threads(1)  # the test machine is shared: one thread avoids oversubscription

SUBSET = 600
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _train_checkpoint(path: Path, seed: int, loss: str = "nca") -> None:
    """A real (tiny) NCA training run: small_cnn on a 600-image subset of mnist5k, 6 steps."""
    ds = build_dataset("mnist5k", "train", transform=build_transforms("mnist5k", train=False), subset=SUBSET, seed=0)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.manual_seed(seed)
    model = build_model("small_cnn", low_dim=32, in_chans=1)
    bank = MemoryBank(ds.targets, dim=32, generator=torch.Generator().manual_seed(seed))
    criterion = NCALoss(bank, temperature=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for a in range(0, len(x), 100):
        idx = perm[a : a + 100]
        loss_value = criterion(model(x[idx]), idx)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    cfg = load_config(recipe=None, overrides=dict(dataset="mnist5k", subset=SUBSET, arch="small_cnn", low_dim=32,
                                                  image_size=28, epochs=1, loss=loss))
    facts = {"in_chans": 1, "image_size": 28, "num_classes": 10, "class_names": list(MNIST_CLASSES), "class_split": None,
             "num_train": SUBSET}
    save_checkpoint(path, {
        "config": config_to_dict(cfg), "facts": facts, "model": model.state_dict(),
        "memory": bank.state_dict() if loss == "nca" else None, "classifier": None, "epoch": 1, "metrics": [],
    })


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("usage")
    _train_checkpoint(root / "a.pt", seed=0)
    _train_checkpoint(root / "b.pt", seed=1)
    state = torch.load(root / "a.pt", weights_only=True)
    state["config"]["objective"]["loss"], state["memory"] = "softmax", None
    save_checkpoint(root / "softmax.pt", state)
    test = build_dataset("mnist5k", "test")
    images = {}
    for digit in range(6):
        i = int(torch.nonzero(test.targets == digit)[0])
        p = root / f"digit{digit}.png"
        test.raw_item(i).save(p)
        images[digit] = p
    (root / "notes.txt").write_text("this is not an image\n")
    (root / "truncated.png").write_bytes(images[0].read_bytes()[:90])
    return {"root": root, "images": images}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def reference_answer(ckpt: Path, image: Path, gallery: torch.Tensor, labels: torch.Tensor, k: int, sigma: float):
    """Independent path: PIL -> numpy normalisation -> model -> float64 NumPy search and vote."""
    model = load_run(ckpt).model
    a = np.asarray(Image.open(image).convert("L"), dtype=np.float64) / 255.0
    x = torch.from_numpy(((a - MNIST_MEAN) / MNIST_STD).astype(np.float32))[None, None]
    with torch.no_grad():
        q = model(x).double().numpy()[0]
    g = gallery.double().numpy()
    sims = g @ q / np.linalg.norm(g, axis=1)
    idx = np.argsort(-sims, kind="stable")[:k]
    scores = np.zeros(int(labels.max()) + 1)
    for j in idx:
        scores[int(labels[j])] += np.exp(sims[j] / sigma)
    return idx, sims[idx], scores / scores.sum()


# ----------------------------------------------------------------------------- predict
def test_predict_with_memory_gallery_matches_reference(env, capsys):
    root, images = env["root"], env["images"]
    code, out, err = cli(capsys, "predict", root / "a.pt", images[3], images[5], "--k", 10, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == [str(images[3]), str(images[5])]
    bank = load_run(root / "a.pt").memory
    train = build_dataset("mnist5k", "train", subset=SUBSET, seed=0)
    for r, digit in zip(results, (3, 5), strict=True):
        idx, sims, scores = reference_answer(root / "a.pt", images[digit], bank.features_by_index(), bank.labels, 10, 0.05)
        assert [n["id"] for n in r["neighbors"]] == [f"mnist5k:train:{int(train.source_indices[j])}" for j in idx]
        np.testing.assert_allclose([n["similarity"] for n in r["neighbors"]], sims, atol=1e-4)
        assert [n["label"] for n in r["neighbors"]] == [str(int(bank.labels[j])) for j in idx]
        assert r["prediction"] == str(int(scores.argmax())) and r["score"] == pytest.approx(scores.max(), abs=1e-4)


def test_predict_reports_each_bad_file_and_answers_the_rest(env, capsys):
    root, images = env["root"], env["images"]
    missing = root / "nowhere.png"
    code, out, err = cli(capsys, "predict", root / "a.pt", images[1], root / "notes.txt", missing, root / "truncated.png", images[2])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("snca: error: ") for line in lines)
    assert "notes.txt" in lines[0] and "cannot identify image" in lines[0]
    assert "nowhere.png" in lines[1] and "no such image file" in lines[1]
    assert "truncated.png" in lines[2]
    # Text output: one header line per good image, then k neighbour lines.
    headers = [line for line in out.splitlines() if not line.startswith(" ")]
    assert [h.split(":")[0] for h in headers] == [str(images[1]), str(images[2])]
    assert re.match(r".*: \S+ \(score [01]\.\d{3}\)$", headers[0])
    assert len(out.splitlines()) == 2 * (1 + 20)
    # JSON lists the failures too.
    code, out, _ = cli(capsys, "predict", root / "a.pt", images[1], root / "notes.txt", "--json", "--k", 3)
    data = json.loads(out)
    assert code == 1 and len(data["results"]) == 1 and data["failed"][0]["image"] == str(root / "notes.txt")


def test_predict_usage_errors(env, capsys):
    root, images = env["root"], env["images"]
    code, _, err = cli(capsys, "predict", root / "softmax.pt", images[1])
    assert code == 2 and "no memory bank" in err and "--gallery" in err
    code, _, err = cli(capsys, "predict", root / "missing.pt", images[1])
    assert code == 2 and "does not exist" in err
    (root / "garbage.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = cli(capsys, "predict", root / "garbage.pt", images[1])
    assert code == 2 and "garbage.pt" in err and err.count("\n") == 1
    code, _, err = cli(capsys, "predict", root / "a.pt", images[1], "--gallery", root)
    assert code == 2 and "not a gallery index" in err


def test_predict_a_directory_of_images(env, capsys, tmp_path):
    """A directory stands for the image files in it, sorted by name; a directory without any is a
    failure of its own, the other images are still answered."""
    images = env["images"]
    folder = tmp_path / "photos"
    folder.mkdir()
    for digit in (4, 1, 2):
        shutil.copy(images[digit], folder / f"img{digit}.png")
    (folder / "readme.txt").write_text("not an image\n")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "sub").mkdir()
    (tmp_path / "nothing").mkdir()
    code, out, err = cli(capsys, "predict", env["root"] / "a.pt", folder, "--k", 3, "--json")
    assert code == 0, err
    assert [r["image"] for r in json.loads(out)["results"]] == [str(folder / f"img{d}.png") for d in (1, 2, 4)]
    code, out, err = cli(capsys, "predict", env["root"] / "a.pt", tmp_path / "nothing", images[3], "--k", 3, "--json")
    assert code == 1 and "nothing" in err and "without image files" in err
    assert [r["image"] for r in json.loads(out)["results"]] == [str(images[3])]


# ----------------------------------------------------------------------------- index
def test_index_build_add_remove_query(env, capsys, tmp_path):
    root, images = env["root"], env["images"]
    idx = tmp_path / "idx"
    code, out, err = cli(capsys, "index", "build", root / "a.pt", "--out", idx)
    assert code == 0, err and f"{SUBSET} images, 10 classes" in out
    code, out, _ = cli(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    assert info["size"] == SUBSET and info["classes"] == {str(d): SUBSET // 10 for d in range(10)}
    assert info["model"]["checkpoint"] == str((root / "a.pt").resolve()) and len(info["model"]["weights_sha256"]) == 64

    # The index's answers equal an independent search over features of the same images.
    code, out, _ = cli(capsys, "index", "query", idx, images[4], "--k", 5, "--json")
    answer = json.loads(out)["results"][0]
    model = load_run(root / "a.pt").model
    train = build_dataset("mnist5k", "train", subset=SUBSET, seed=0)
    with torch.no_grad():
        feats = model(torch.stack([train[i][0] for i in range(len(train))]))
    ref_idx, ref_sims, scores = reference_answer(root / "a.pt", images[4], feats, train.targets, 5, 0.05)
    assert [n["id"] for n in answer["neighbors"]] == [f"mnist5k:train:{int(train.source_indices[j])}" for j in ref_idx]
    np.testing.assert_allclose([n["similarity"] for n in answer["neighbors"]], ref_sims, atol=1e-4)
    assert answer["prediction"] == str(int(scores.argmax()))
    # predict --gallery gives the same answer as index query.
    code, out, _ = cli(capsys, "predict", root / "a.pt", images[4], "--gallery", idx, "--k", 5, "--json")
    assert json.loads(out)["results"][0] == answer

    # A new class from a folder (one subfolder per class; a bad file is reported, not fatal).
    folder = tmp_path / "new"
    (folder / "squiggle").mkdir(parents=True)
    (folder / "blob & <co>").mkdir()
    shutil.copy(images[0], folder / "squiggle" / "s1.png")
    shutil.copy(images[1], folder / "squiggle" / "s2.png")
    shutil.copy(images[2], folder / "blob & <co>" / "b1.png")
    shutil.copy(root / "notes.txt", folder / "blob & <co>" / "broken.png")
    code, out, err = cli(capsys, "index", "add", idx, "--from-folder", folder)
    assert code == 1 and "broken.png" in err and "added 3 images" in out and "new classes: blob & <co>, squiggle" in out
    code, out, _ = cli(capsys, "index", "query", idx, images[0], "--k", 1, "--json")
    top = json.loads(out)["results"][0]
    assert top["neighbors"][0]["label"] == "squiggle" and top["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert top["neighbors"][0]["id"] == str((folder / "squiggle" / "s1.png").resolve())
    code, out, _ = cli(capsys, "index", "add", idx, "--images", images[5], "--label", "five-ish")
    assert code == 0 and "new classes: five-ish" in out

    # Remove by id (as typed or resolved) and by class.
    code, out, _ = cli(capsys, "index", "remove", idx, "--ids", folder / "squiggle" / "s1.png")
    assert code == 0 and "removed 1 images" in out
    code, out, _ = cli(capsys, "index", "remove", idx, "--label", "five-ish")
    assert code == 0 and "removed 1 images" in out
    code, out, _ = cli(capsys, "index", "info", idx, "--json")
    info = json.loads(out)
    assert info["size"] == SUBSET + 2 and info["classes"]["squiggle"] == 1 and info["classes"]["five-ish"] == 0
    code, _, err = cli(capsys, "index", "remove", idx, "--ids", "no-such-id")
    assert code == 2 and "not in the gallery" in err


def test_index_refuses_another_model_and_empty_gallery(env, capsys, tmp_path):
    root, images = env["root"], env["images"]
    idx = tmp_path / "idx"
    assert cli(capsys, "index", "build", root / "a.pt", "--out", idx, "--subset", 100)[0] == 0
    for argv in (
        ("index", "add", idx, "--images", images[1], "--label", "x", "--checkpoint", root / "b.pt"),
        ("index", "query", idx, images[1], "--checkpoint", root / "b.pt"),
        ("predict", root / "b.pt", images[1], "--gallery", idx),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "was built with the model" in err and "b.pt" in err, argv
    # The index was not touched by the refused add.
    assert json.loads(cli(capsys, "index", "info", idx, "--json")[1])["size"] == 100
    # Building over an existing index is refused, as is an unknown backend.
    code, _, err = cli(capsys, "index", "build", root / "a.pt", "--out", idx)
    assert code == 2 and "already holds an index" in err
    code, _, err = cli(capsys, "index", "build", root / "a.pt", "--out", tmp_path / "x", "--backend", "annoy")
    assert code == 2 and "unknown backend" in err

    empty = tmp_path / "empty"
    code, out, _ = cli(capsys, "index", "build", root / "a.pt", "--out", empty, "--empty")
    assert code == 0 and "0 images" in out
    code, _, err = cli(capsys, "index", "query", empty, images[1])
    assert code == 2 and "empty" in err
    code, _, err = cli(capsys, "predict", root / "a.pt", images[1], "--gallery", empty)
    assert code == 2 and "gallery is empty" in err
    # Filling it makes it usable.
    assert cli(capsys, "index", "add", empty, "--images", images[1], images[2], "--label", "some")[0] == 0
    code, out, _ = cli(capsys, "index", "query", empty, images[2], "--json", "--k", 2)
    assert code == 0 and json.loads(out)["results"][0]["prediction"] == "some"


def test_index_faiss_backend(env, capsys, tmp_path):
    root, images = env["root"], env["images"]
    assert cli(capsys, "index", "build", root / "a.pt", "--out", tmp_path / "t")[0] == 0
    code, out, err = cli(capsys, "index", "build", root / "a.pt", "--out", tmp_path / "f", "--backend", "faiss-hnsw")
    assert code == 0, err and "backend faiss-hnsw" in out
    assert (tmp_path / "f" / "faiss.index").is_file()
    answers = [json.loads(cli(capsys, "index", "query", tmp_path / d, images[3], "--json", "--k", 5)[1]) for d in ("t", "f")]
    exact, approx = (a["results"][0] for a in answers)
    assert exact["prediction"] == approx["prediction"]
    assert exact["neighbors"][0]["id"] == approx["neighbors"][0]["id"]


# ----------------------------------------------------------------------------- neighbors
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the HTML test: apt-get install chromium")


def _chromium_run(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'chrome-profile'}", *extra, page.resolve().as_uri(),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _screenshot(page: Path, tmp: Path) -> Image.Image:
    shot = tmp / "shot.png"
    proc = _chromium_run(page, tmp, f"--screenshot={shot}", "--window-size=1400,900")
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot)
    img.load()
    return img.convert("RGB")


def _count_color(img: Image.Image, hex_color: str) -> int:
    rgb = np.asarray(img).astype(int)
    target = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - target).sum(axis=2) <= 12).sum())


def test_neighbors_page_png_and_chromium_screenshot(env, capsys, tmp_path):
    from snca.viz import MATCH_COLOR, MISMATCH_COLOR

    root = env["root"]
    out_dir = tmp_path / "nb"
    code, out, err = cli(
        capsys, "neighbors", root / "a.pt", "--queries", 3, "--compare", root / "b.pt", "--raw-pixels",
        "--gallery-subset", 200, "--out", out_dir,
    )
    assert code == 0, err
    data = json.loads((out_dir / "neighbors.json").read_text())
    methods = ["nca (a)", "nca (b)", "raw pixels"]
    assert list(data["precision"]) == methods and len(data["queries"]) == 3
    for q in data["queries"]:
        for m in methods:
            nbs = q["neighbors"][m]
            assert len(nbs) == 20 and all(n["match"] == (n["label"] == q["label"]) for n in nbs)
            assert [n["similarity"] for n in nbs] == sorted((n["similarity"] for n in nbs), reverse=True)
    page = (out_dir / "index.html").read_text()
    # Self-contained: every image is an inline PNG, nothing is fetched.
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == 3 * 3 * 21 and all(s.startswith("data:image/png;base64,") for s in srcs)
    Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1]))).verify()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    grid = Image.open(out_dir / "neighbors.png")
    assert grid.width > 21 * 56 and grid.height > 9 * 56
    assert _count_color(grid.convert("RGB"), MATCH_COLOR) > 1000

    shot = _screenshot(out_dir / "index.html", tmp_path)
    assert shot.size == (1400, 900)
    pixels = np.asarray(shot)
    assert (pixels.std(axis=(0, 1)) > 20).all()  # not a blank page
    assert _count_color(shot, MATCH_COLOR) > 500  # the images and their frames were drawn
    assert _count_color(shot, MISMATCH_COLOR) + _count_color(shot, MATCH_COLOR) > 2000


def test_neighbors_escapes_labels_and_ids(tmp_path):
    from snca.viz import NeighborRow, Tile, write_grid, write_html

    evil = "<script>document.title='pwned'</script>"
    img = Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8))
    rows = [NeighborRow(
        Tile(img, evil, id='q "1" & <b>'),
        [("nca <i>", [Tile(img, evil, id="x.png\"><script>alert(1)</script>", similarity=0.5, match=True),
                      Tile(img, "ok", id="y", similarity=0.25, match=False)])],
    )]
    page = write_html(rows, tmp_path / "p.html", title=evil)
    text = page.read_text()
    assert "<script" not in text and "&lt;script&gt;" in text and "&quot;&gt;&lt;script&gt;" in text
    write_grid(rows, tmp_path / "p.png")
    proc = _chromium_run(page, tmp_path, "--dump-dom")
    dom = proc.stdout
    assert "<title>&lt;script&gt;document.title='pwned'&lt;/script&gt;</title>" in dom, proc.stderr[-2000:]
    assert "<script" not in dom and "<title>pwned</title>" not in dom  # shown as text, never run
    shot = _screenshot(page, tmp_path)
    assert (np.asarray(shot).std(axis=(0, 1)) > 10).all()


def test_neighbors_bad_input(env, capsys, tmp_path):
    root = env["root"]
    code, _, err = cli(capsys, "neighbors", root / "a.pt", "--query-ids", 99999, "--out", tmp_path)
    assert code == 2 and "out of range" in err
    code, _, err = cli(capsys, "neighbors", root / "nope.pt", "--out", tmp_path)
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "neighbors", root / "a.pt", "--k", 0, "--out", tmp_path)
    assert code == 2 and "--k" in err


# ----------------------------------------------------------------------------- the run's class names
BASE = ["5", "6", "7", "8", "9"]  # novel 0-4: numbered names ("0".."4") would be the novel classes' names
COARSE = ["loops", "strokes", "curves"]  # snca.data.DIGIT_COARSE_GROUPS


@pytest.fixture(scope="module")
def label_runs(tmp_path_factory):
    """Two tiny real runs (fit, one epoch on 400 digits): one on base classes only, one on
    coarse labels."""
    from snca.train import fit

    root = tmp_path_factory.mktemp("labels")
    common = dict(dataset="mnist5k", subset=400, test_subset=100, epochs=1, batch_size=32, progress="off", plot=False,
                  out_dir=str(root))
    runs = {}
    for name, extra in (("base", {"novel_classes": ["0", "1", "2", "3", "4"]}), ("coarse", {"label_set": "coarse"})):
        run = fit(overrides={**common, **extra}, run_dir=root / name, log=lambda *_: None)
        runs[name] = run.run_dir
    return runs


@pytest.mark.parametrize("kind", ["base", "coarse"])
def test_base_class_and_coarse_runs_show_their_class_names(label_runs, env, capsys, tmp_path, kind):
    """predict (memory and index galleries), index build (features and memory) and neighbors on
    a run trained on base classes / coarse labels name the run's classes, never numbers and
    never a class the run did not train on."""
    run_dir, names = label_runs[kind], BASE if kind == "base" else COARSE
    images = [env["images"][d] for d in range(6)]
    assert load_run(run_dir).class_names == names

    code, out, err = cli(capsys, "predict", run_dir, *images, "--k", 5, "--json")
    assert code == 0, err
    results = json.loads(out)["results"]
    assert len(results) == 6
    for r in results:
        assert r["prediction"] in names and set(r["class_scores"]) <= set(names)
        assert all(n["label"] in names for n in r["neighbors"])
        assert all(n["id"].startswith("mnist5k:train:") for n in r["neighbors"])

    label_set = "coarse" if kind == "coarse" else "fine"
    train = build_dataset("mnist5k", "train", label_set=label_set, subset=400, seed=0)
    full = build_dataset("mnist5k", "train", label_set=label_set)
    for source in ("features", "memory"):
        idx = tmp_path / source
        code, out, err = cli(capsys, "index", "build", run_dir, "--out", idx, "--source", source)
        assert code == 0, err
        info = json.loads(cli(capsys, "index", "info", idx, "--json")[1])
        assert list(info["classes"]) == names
        kept = train.targets >= 5 if kind == "base" else torch.ones(len(train), dtype=torch.bool)
        assert info["size"] == int(kept.sum())
        assert info["classes"] == {n: int((train.targets == train.classes.index(n)).sum()) for n in names}
        code, out, err = cli(capsys, "predict", run_dir, *images, "--gallery", idx, "--k", 5, "--json")
        assert code == 0, err
        for r in json.loads(out)["results"]:
            assert r["prediction"] in names and all(n["label"] in names for n in r["neighbors"])
            # ids name the images of the full split, with the labels they have there
            for n in r["neighbors"]:
                j = int(n["id"].rsplit(":", 1)[1])
                assert full.classes[int(full.targets[j])] == n["label"]

    out_dir = tmp_path / "nb"
    code, out, err = cli(capsys, "neighbors", run_dir, "--queries", 4, "--k", 5, "--raw-pixels", "--out", out_dir)
    assert code == 0, err
    data = json.loads((out_dir / "neighbors.json").read_text())
    assert len(data["queries"]) == 4
    for q in data["queries"]:
        assert q["label"] in names
        for nbs in q["neighbors"].values():
            assert len(nbs) == 5 and all(n["label"] in names for n in nbs)
