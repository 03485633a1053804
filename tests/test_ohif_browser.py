"""OHIF in a real browser: the OHIF v3 build that ships in the monailabel wheel (served at /ohif/ by our server,
DICOMweb through the server's /proxy/dicom to a private Orthanc) opens a DICOM film in headless Chromium, the
page makes the MONAI Label panel's infer call and puts the answer into an OHIF labelmap as the panel does;
the segmentation must show where the server put it. Screenshot: test-artifacts/ohif_left_lung.png.

Why not click through the MONAI Label panel itself: the bundled "monai-label" mode only has an MPR (3D
volume) hanging protocol, which a single-frame radiograph never matches, so its viewports stay empty; the
basic viewer shows films. The SEG that label saving stores is listed in OHIF's study browser; OHIF 3.10's SEG
loader refuses SEGs without plane orientation (it compares with a default it invents for films without
ImageOrientationPatient), so it is not opened here (README, DICOMweb / PACS)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO
from PIL import Image
from test_dicomweb_orthanc import OHIF_PARAMS, infer, pacs, server  # noqa: F401 - module fixtures


ARTIFACTS = REPO / "test-artifacts"

VIEWPORT_READY = """(() => { const s = window.services; if (!s) return 0;
  const vp = s.viewportGridService.getActiveViewportId();
  const v = vp && s.cornerstoneViewportService.getCornerstoneViewport(vp);
  return v ? v.getImageIds().length : 0; })()"""

# What OHIF's MONAI Label panel does on "Run": POST /infer with its params, parse the NRRD, copy the data
# into the labelmap of the displayed series (MonaiLabelPanel.updateView), for a stack viewport.
RUN_INFER = """(async () => {
  const s = window.services, cs = window.cornerstone, tools = window.cornerstoneTools;
  const vp = s.viewportGridService.getActiveViewportId();
  const ds = s.displaySetService.getActiveDisplaySets().find(d => d.SeriesInstanceUID === %(series)s);
  const form = new FormData();
  form.append('params', JSON.stringify(%(params)s));
  const r = await fetch('/infer/xray_textseg?image=' + ds.SeriesInstanceUID + '&output=image',
                        {method: 'POST', body: form});
  if (r.status !== 200) return {status: r.status, text: await r.text()};
  const buf = new Uint8Array(await r.arrayBuffer());
  let i = 0; while (i + 1 < buf.length && !(buf[i] === 10 && buf[i + 1] === 10)) i++;
  const data = buf.slice(i + 2);
  const segId = await s.segmentationService.createLabelmapForDisplaySet(ds,
      {label: 'xray_textseg', segments: {1: {label: 'left lung', active: true}}});
  await s.segmentationService.addSegmentationRepresentation(vp, {segmentationId: segId});
  const seg = s.segmentationService.getSegmentation(segId);
  const image = cs.cache.getImage(seg.representationData.Labelmap.imageIds[0]);
  image.voxelManager.getScalarData().set(data);
  tools.segmentation.triggerSegmentationEvents.triggerSegmentationDataModified(segId);
  return {status: r.status, rows: image.rows, columns: image.columns, bytes: data.length,
          labelled: image.voxelManager.getScalarData().reduce((n, v) => n + (v > 0), 0),
          segments: s.segmentationService.getSegmentations().map(x => Object.values(x.segments).map(g => g && g.label))};
})()"""

# screen position of the film's first and last pixel centres, in CSS pixels of the page
IMAGE_ON_SCREEN = """(() => { const s = window.services;
  const v = s.cornerstoneViewportService.getCornerstoneViewport(s.viewportGridService.getActiveViewportId());
  const d = v.getImageData(), rect = v.element.getBoundingClientRect();
  const [rows, cols] = [d.dimensions[1], d.dimensions[0]];
  const at = ij => { const c = v.worldToCanvas(d.imageData.indexToWorld([ij[0], ij[1], 0]));
                     return [rect.left + c[0], rect.top + c[1]]; };
  return {first: at([0, 0]), last: at([cols - 1, rows - 1]), rows, cols, dpr: window.devicePixelRatio}; })()"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from browser import Chromium, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium not found (apt-get install chromium, or set CHROMIUM)")
    root = tmp_path_factory.mktemp("chromium")
    b = Chromium(binary, root / "profile", log=root / "chromium.log")
    try:
        yield b
    finally:
        b.close()


def red_overlay(png, left: float, top: float, right: float, bottom: float) -> np.ndarray:
    """(y, x) screen pixels inside the box that OHIF painted with the first segment's red."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r - np.maximum(g, b) > 40) & (r > 90)
    ys, xs = np.nonzero(red)
    keep = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
    return np.stack([ys[keep], xs[keep]], axis=1)


def test_ohif_shows_the_infer_result_on_the_film(browser, server, pacs):  # noqa: F811 - imported fixtures
    film = pacs.films["chest_000_mono1"]  # MONOCHROME1: OHIF and our reader must agree on what is bright
    browser.navigate(f"{server.url}/ohif/viewer?StudyInstanceUIDs={film.study}&SeriesInstanceUIDs={film.series}")
    assert browser.wait_for(VIEWPORT_READY, timeout=240) == 1, "\n".join(browser.console()[-20:])

    result = browser.evaluate(RUN_INFER % {"series": json.dumps(film.series),
                                           "params": json.dumps({"prompt": "left lung", **OHIF_PARAMS})}, timeout=600)
    assert result["status"] == 200, result
    assert (result["rows"], result["columns"]) == film.shape and result["bytes"] == film.shape[0] * film.shape[1]
    assert result["segments"] == [["left lung"]]

    # the server's own answer for the same call: what the overlay must cover
    r = infer(server, film, "left lung", output="image", **OHIF_PARAMS)
    mask = np.frombuffer(r.content.split(b"\n\n", 1)[1], np.uint8).reshape(film.shape) == 1
    assert result["labelled"] == int(mask.sum()) > 0

    browser.wait_for("new Promise(r => setTimeout(() => r(true), 1500))")  # let the overlay render
    ARTIFACTS.mkdir(exist_ok=True)
    shot = browser.screenshot(ARTIFACTS / "ohif_left_lung.png")
    place = browser.evaluate(IMAGE_ON_SCREEN)
    scale = place["dpr"]
    (x0, y0), (x1, y1) = [[c * scale for c in p] for p in (place["first"], place["last"])]
    pixels = red_overlay(shot, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    assert len(pixels) > 500, f"no segmentation overlay on the film in {shot}"
    # screen -> film pixel coordinates; the overlay's extent must match the mask's (a flip or transpose
    # would move it to the other lung or turn it on its side)
    cols = (pixels[:, 1] - x0) / (x1 - x0) * (film.shape[1] - 1)
    rows = (pixels[:, 0] - y0) / (y1 - y0) * (film.shape[0] - 1)
    mask_rows, mask_cols = np.nonzero(mask)
    tolerance = 0.05 * film.shape[1]
    for got, want in ((np.percentile(cols, [1, 99]), np.percentile(mask_cols, [1, 99])),
                      (np.percentile(rows, [1, 99]), np.percentile(mask_rows, [1, 99]))):
        assert np.all(np.abs(got - want) < tolerance), f"overlay {got} vs mask {want} (screenshot {shot})"
    assert cols.mean() > film.shape[1] / 2  # the patient's left lung: image right


def test_ohif_lists_the_seg_stored_by_label_saving(browser, server, pacs):  # noqa: F811 - imported fixtures
    """A label saved through the server (OHIF's save_label call: label.bin) reaches OHIF's study browser from
    the PACS as a SEG series of the right film."""
    film = pacs.films["chest_000_mono2"]
    label_map = np.zeros(film.shape, np.uint8)
    label_map[64:320, 288:448] = 1
    r = server.client.put("/datastore/label", params={"image": film.series},
                          data={"params": json.dumps({"label_names": {"left_lung": 1}})},
                          files={"label": ("label.bin", label_map.tobytes())})
    assert r.status_code == 200, r.text
    browser.navigate(f"{server.url}/ohif/viewer?StudyInstanceUIDs={film.study}")
    segs = browser.wait_for("""(() => { const s = window.services; if (!s) return null;
      const segs = s.displaySetService.getActiveDisplaySets().filter(d => d.Modality === 'SEG');
      return segs.length ? segs.map(d => [d.SeriesDescription, d.referencedSeriesInstanceUID || null]) : null; })()""",
                            timeout=240)
    assert segs == [["xray_textseg label", film.series]], segs
