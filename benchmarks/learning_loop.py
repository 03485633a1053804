"""The learning loop as clinicians use it, through the real server: saved chest labels in each realistic form,
one training run, then the served Dice per label on held-out films against the starter's.

    python benchmarks/learning_loop.py --saved ../shared/xray_pool/jsrt_chest --held-out ../shared/xray_real/jsrt_chest \
        --forms answer lungs_first clavicles_first layers identity_affine --out docs/perf/learning_loop.json

Each form starts a fresh server (starter adapter, auto-train after the last save) and saves ``--films`` films of
``--saved`` (films the starter never saw) as:

* ``answer``: the server's own answer to "left lung, right lung, heart, left clavicle, right clavicle", accepted as is
  (Slicer's Submit Label after an auto-segmentation);
* ``lungs_first``: the expert masks painted clavicles first, lungs and heart over them (the clavicles lose what lies
  under the lungs), as a Slicer label map (NIfTI (W, H, 1), RAS diag(-1, -1, 1));
* ``clavicles_first``: lungs and heart first, clavicles over them (the lung apices lose the clavicles);
* ``layers``: the expert masks with true overlaps, lungs and heart in one layer and the clavicles in another;
* ``identity_affine``: the expert masks as numpy writes them with an identity affine (read turned 180 degrees).

Reported per form: how many saves were accepted, the run's decision and gate figures, and the served Dice per label on
``--held-out`` films (never saved, never trained on) before and after. Nothing is written into the data folders.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import REPO, machine_info, write_json

sys.path.insert(0, str(REPO / "tests"))
from server import Server

from xray_textseg.io import load_mask
from xray_textseg.metrics import dice

LABELS = ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")
VALUES = {lab: i + 1 for i, lab in enumerate(LABELS)}
FORMS = ("answer", "lungs_first", "clavicles_first", "layers", "identity_affine")
SLICER_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def cases(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "images").glob("*.png")
                  if all((folder / "labels" / lab / p.name).is_file() for lab in LABELS))


def masks_of(folder: Path, case: str) -> dict[str, np.ndarray]:
    return {lab: load_mask(folder / "labels" / lab / f"{case}.png") > 0 for lab in LABELS}


def painted(masks: dict[str, np.ndarray], order: tuple[str, ...]) -> np.ndarray:
    lm = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for lab in order:
        lm[masks[lab]] = VALUES[lab]
    return lm


def nifti(data: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(np.ascontiguousarray(data), affine).to_bytes())


def label_file(form: str, masks: dict[str, np.ndarray]) -> bytes:
    if form == "lungs_first":
        return nifti(painted(masks, ("left_clavicle", "right_clavicle", "left_lung", "right_lung", "heart")).T[..., None],
                     SLICER_AFFINE)
    if form == "clavicles_first":
        return nifti(painted(masks, ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")).T[..., None],
                     SLICER_AFFINE)
    if form == "layers":
        lungs = painted(masks, ("left_lung", "right_lung", "heart"))
        clavicles = painted(masks, ("left_clavicle", "right_clavicle"))
        return nifti(np.stack([lungs.T, clavicles.T], -1)[:, :, None, :], SLICER_AFFINE)
    if form == "identity_affine":
        return nifti(painted(masks, ("left_lung", "right_lung", "heart", "left_clavicle", "right_clavicle")).T[..., None],
                     np.eye(4))
    raise ValueError(form)


def answer(server: Server, case: str, layers: bool = False) -> tuple[bytes, dict]:
    r = server.client.post("/infer/xray_textseg", params={"image": case, "output": "all"},
                           data={"params": json.dumps({"prompt": ", ".join(lab.replace("_", " ") for lab in LABELS),
                                                       "layers": layers})})
    r.raise_for_status()
    from test_server_e2e import _multipart

    parts = _multipart(r)
    return parts["image"], json.loads(parts["params"])


def served_dice(server: Server, folder: Path, held_out: list[str]) -> dict[str, float]:
    """Served Dice per label on the held-out films (one request per film, all five structures as layers)."""
    per: dict[str, list[float]] = {}
    for case in held_out:
        content, params = answer(server, case, layers=True)
        data = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(content)).dataobj)  # (X, Y, 1, K)
        truth = masks_of(folder, case)
        for k, lab in enumerate(params["label_names"]):  # layers in the answer's order
            layer = data[:, :, 0, k].T
            per.setdefault(lab, []).append(dice(layer == VALUES[lab], truth[lab]))
    return {lab: round(float(np.mean(v)), 4) for lab, v in sorted(per.items())}


def wait_for_run(server: Server, timeout: float) -> dict:
    deadline = time.time() + timeout
    stats: dict = {}
    while time.time() < deadline:
        stats = server.client.get("/info/").json().get("train_stats", {}).get("xray_textseg_train", {})
        if stats.get("status") == "skipped" or (stats.get("status") in ("done", "stopped") and stats.get("version")):
            return stats
        time.sleep(5)
    return {**stats, "status": "timeout"}


def run_form(form: str, saved: Path, saved_cases: list[str], held: Path, held_cases: list[str], work: Path,
             conf: dict[str, str], timeout: float = 3600) -> dict:
    studies = work / form / "studies"
    studies.mkdir(parents=True)
    for folder, names in ((saved, saved_cases), (held, held_cases)):
        for case in names:
            (studies / f"{case}.png").write_bytes((folder / "images" / f"{case}.png").read_bytes())
    srv = Server(studies, conf={"adapter_dir": str(work / form / "adapters"), "starter_adapter": "true",
                                "auto_train_after": str(len(saved_cases)), "train_extra_rounds": "0",
                                "look_ahead": "false", **conf}, log=work / form / "server.log",
                 env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    try:
        srv.wait_ready()
        before = served_dice(srv, held, held_cases)
        accepted, refused = 0, []
        info = json.dumps({"label_info": [{"name": lab.replace("_", " "), "idx": v} for lab, v in VALUES.items()]})
        for case in saved_cases:
            if form == "answer":
                content, params = answer(srv, case)
                info_form = json.dumps({"label_names": params["label_names"]})
            else:
                content, info_form = label_file(form, masks_of(saved, case)), info
            r = srv.client.put("/datastore/label", params={"image": case, "tag": "final"},
                               data={"params": info_form}, files={"label": ("label.nii.gz", content)})
            if r.status_code == 200:
                accepted += 1
            else:
                refused.append(f"{case}: {r.status_code} {r.json().get('detail', '')[:160]}")
        stats = wait_for_run(srv, timeout) if accepted >= 2 else {"status": "no run", "reason": "too few labels"}
        after = served_dice(srv, held, held_cases)
    finally:
        srv.stop()
    return {"form": form, "saved": len(saved_cases), "accepted": accepted, "refused": refused[:3],
            "run": {k: stats.get(k) for k in ("status", "version", "promoted", "decision", "gate", "agreement",
                                               "held_labels", "disagreement", "epochs_run", "seconds")},
            "before": before, "after": after,
            "change": {lab: round(after[lab] - before[lab], 4) for lab in before if lab in after}}


def table(results: list[dict]) -> str:
    lines = ["| form | saved / accepted | promoted | " + " | ".join(LABELS) + " |",
             "|---|---|---|" + "---|" * len(LABELS)]
    for r in results:
        cells = [f"{r['before'].get(lab, 0):.3f} -> {r['after'].get(lab, 0):.3f}" for lab in LABELS]
        lines.append(f"| {r['form']} | {r['saved']} / {r['accepted']} | {r['run'].get('promoted')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--saved", type=Path, required=True, help="folder of chest films + labels to save (unseen)")
    ap.add_argument("--held-out", type=Path, required=True, help="folder of chest films + labels to measure on")
    ap.add_argument("--films", type=int, default=20, help="films saved per form")
    ap.add_argument("--held", type=int, default=10, help="held-out films measured")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--exclude", type=Path, default=REPO / "lib" / "xray_textseg" / "starter" / "metadata.json",
                    help="adapter metadata whose train/val films are never used (default: the starter's)")
    ap.add_argument("--conf", nargs="*", default=[], help="extra app options NAME=VALUE (e.g. train_time_budget_min=6)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    meta = json.loads(args.exclude.read_text())
    seen = set(meta.get("train_names", [])) | set(meta.get("val_names", []))
    saved_cases = [c for c in cases(args.saved) if c not in seen][:args.films]
    held_cases = [c for c in cases(args.held_out) if c not in seen and c not in saved_cases][:args.held]
    conf = dict(kv.split("=", 1) for kv in args.conf)
    results = []
    with tempfile.TemporaryDirectory(prefix="learning_loop_") as tmp:
        for form in args.forms:
            t0 = time.time()
            res = run_form(form, args.saved, saved_cases, args.held_out, held_cases, Path(tmp), conf)
            res["minutes"] = round((time.time() - t0) / 60, 1)
            results.append(res)
            print(json.dumps(res, indent=1), flush=True)
    print(table(results))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "saved_films": saved_cases, "held_out": held_cases,
                              "conf": conf, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
