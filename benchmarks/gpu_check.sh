#!/usr/bin/env bash
# GPU check (< 5 min on one H100-class GPU):
#   1. CUDA results against CPU on moderately sized random data: NCA loss, gradient and memory
#      update (both exp paths, a margin, a bf16 bank, autocast), kNN search and classification;
#   2. the GPU benchmark lines: nca_step.py --device cuda --scale both, knn.py --device cuda.
# Exit status 1 if any check fails. Target: the ImageNet-scale step within bank + 1 GB of GPU
# memory (see the nca_step summary's targets_met).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   DEVICE=cpu SKIP_BENCH=1 bash benchmarks/gpu_check.sh   # dry run of the checks (CPU vs CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
DEVICE="${DEVICE:-cuda}"
export DEVICE

echo "== correctness: $DEVICE vs cpu"
"$PYTHON" - <<'EOF'
import math
import os
import sys

import torch
import torch.nn.functional as F

from snca import MemoryBank, knn_classify, nca_loss
from snca.knn import knn_search

device = os.environ["DEVICE"]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False")
if device.startswith("cuda"):
    print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__,
          "| float32 matmul precision:", torch.get_float32_matmul_precision())
    # TF32 would change results at the 1e-3 level: the checks need full float32 products.
    assert torch.get_float32_matmul_precision() == "highest", "set float32 matmul precision to 'highest'"
failures = []


def check(name, value, limit):
    ok = value <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} (limit {limit:g})")
    if not ok:
        failures.append(name)


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- NCA
n, c, b, d = 200_000, 100, 256, 128
gen = torch.Generator().manual_seed(0)
labels = torch.randint(0, c, (n,), generator=gen)
idx = torch.randperm(n, generator=gen)[:b]
feats = F.normalize(torch.randn(b, d, generator=gen), dim=1)
for dtype in (torch.float32, torch.bfloat16):
    cpu_bank = MemoryBank(labels, dim=d, num_classes=c, dtype=dtype, generator=torch.Generator().manual_seed(1))
    dev_bank = MemoryBank(labels, dim=d, num_classes=c, dtype=dtype, generator=torch.Generator().manual_seed(1), device=device)
    tag = str(dtype).removeprefix("torch.")
    check(f"initial bank equal [{tag}]", rel(dev_bank.slots.float(), cpu_bank.slots.float()), 0.0)
    # T = 0.05: fixed-shift path; T = 0.02: running-max path; a margin; a small chunk on the device.
    for temperature, margin, chunk in ((0.05, 0.0, None), (0.02, 0.1, None), (0.05, 0.1, 3000)):
        v_cpu = feats.detach().clone().requires_grad_()
        v_dev = feats.detach().clone().to(device).requires_grad_()
        loss_cpu = nca_loss(v_cpu, idx, cpu_bank, temperature, margin)
        loss_dev = nca_loss(v_dev, idx.to(device), dev_bank, temperature, margin, chunk_size=chunk)
        loss_cpu.backward()
        loss_dev.backward()
        what = f"[{tag} T={temperature} margin={margin} chunk={chunk}]"
        check(f"loss rel diff {what}", rel(loss_dev.detach(), loss_cpu.detach()), 1e-5)
        check(f"gradient rel diff {what}", rel(v_dev.grad, v_cpu.grad), 1e-4)
    cpu_bank.update(feats, idx)
    dev_bank.update(feats.to(device), idx.to(device))
    limit = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 storage: one rounding of the new slots
    check(f"memory update max abs diff [{tag}]", rel(dev_bank.slots.float(), cpu_bank.slots.float()), limit)

# Inside an autocast region the statistics stay float32: same loss as outside it.
bank = MemoryBank(labels, dim=d, num_classes=c, generator=torch.Generator().manual_seed(1), device=device)
v = feats.to(device)
plain = nca_loss(v, idx.to(device), bank, 0.05)
with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
    inside = nca_loss(v, idx.to(device), bank, 0.05)
check("autocast loss rel diff", rel(inside.detach().float(), plain.detach()), 1e-6)

# Queries without a slot (labels given instead of indices).
no_slot_cpu = nca_loss(feats, None, MemoryBank(labels, dim=d, num_classes=c, generator=torch.Generator().manual_seed(1)), 0.05, labels=labels[idx])
no_slot_dev = nca_loss(feats.to(device), None, bank, 0.05, labels=labels[idx].to(device))
check("loss without own slots rel diff", rel(no_slot_dev.detach(), no_slot_cpu.detach()), 1e-5)

# --------------------------------------------------------------------------- kNN
g, q, k = 200_000, 1000, 30
gallery = F.normalize(torch.randn(g, d, generator=gen), dim=1)
queries = F.normalize(torch.randn(q, d, generator=gen), dim=1)
exclude = torch.randint(-1, g, (q,), generator=gen)
for excl in (None, exclude):
    s_cpu, i_cpu = knn_search(queries, gallery, k, exclude=excl)
    s_dev, i_dev = knn_search(queries.to(device), gallery.to(device), k, exclude=None if excl is None else excl.to(device))
    what = "[leave-one-out]" if excl is not None else ""
    check(f"knn similarities max abs diff {what}", float((s_dev.cpu() - s_cpu).abs().max()), 1e-5)
    same = (i_dev.cpu().sort(1).values == i_cpu.sort(1).values).all(1)
    # Differing sets are allowed only through ties at the k-th similarity.
    bad = 0
    for row in torch.nonzero(~same).flatten().tolist():
        diff = sorted(set(i_dev[row].tolist()) ^ set(i_cpu[row].tolist()))
        exact = gallery[diff].double() @ queries[row].double()
        bad += int(bool(((exact - float(s_cpu[row, -1])).abs() > 1e-5).any()))
    check(f"knn queries with different neighbours beyond ties {what}", bad, 0)
    if excl is not None:
        hits = (i_dev.cpu() == excl[:, None]).any(1) & (excl >= 0)
        check("knn excluded rows returned", int(hits.sum()), 0)
gallery_labels = torch.randint(0, 10, (g,), generator=gen)
r_cpu = knn_classify(queries, gallery, gallery_labels, k=[1, 30], sigma=0.05)
r_dev = knn_classify(queries.to(device), gallery.to(device), gallery_labels.to(device), k=[1, 30], sigma=0.05)
for kk in (1, 30):
    agree = float((r_dev[kk].predictions[:, 0].cpu() == r_cpu[kk].predictions[:, 0]).float().mean())
    check(f"knn_classify k={kk} top-1 prediction disagreement", 1.0 - agree, 0.002)
    check(f"knn_classify k={kk} scores max abs diff", float((r_dev[kk].scores.cpu() - r_cpu[kk].scores).abs().max()), 1e-4)

if failures:
    sys.exit(f"gpu_check: {len(failures)} check(s) failed: {failures}")
print("all correctness checks passed")
EOF

if [[ -n "${SKIP_BENCH:-}" ]]; then exit 0; fi
echo "== benchmark: one NCA step ($DEVICE)"
"$PYTHON" benchmarks/nca_step.py --device "$DEVICE" --scale both --repeats 5
echo "== benchmark: exact kNN ($DEVICE)"
"$PYTHON" benchmarks/knn.py --device "$DEVICE" --repeats 3
