"""HTTP latency and load on the real MONAI Label server with our app (started like the end-to-end tests, with
``tests/server.py``), in one run.

    python benchmarks/server_load.py --out docs/perf/server_load.json [--clients 1 4 16] [--refine on|off]

Measures, on 127.0.0.1:

* start-up time and server RSS (the server process and its children) idle, under load and at the end;
* ``cold``: a study not requested before (read, encode, decode, NIfTI answer), p50/p95;
* ``warm, repeated prompt``: the same study and prompt again (every embedding cached);
* ``warm, new prompt``: another structure on a study whose whole film is encoded, a clinician's few seconds
  later (the look-ahead has segmented the film's other labels; ``--conf look_ahead=false`` to compare);
* ``second prompt at once``: another structure sent as soon as the first answer arrived, while the
  look-ahead still runs; ``cold, previous film's look-ahead running``: a new study in that moment (what
  the look-ahead costs a clinician who is faster than it);
* N concurrent clients (closed loop, each sends its next request when the last one answered) on warm
  studies: requests/s, p50/p95 latency, error count;
* the embedding cache shared by active learning and infer: ``/activelearning/uncertainty`` scores images
  with the served predictor, then an infer on the chosen image reports a cache hit for its whole film;
* prefetch: the next film active learning proposes is warmed in the background (film encoded, the last
  prompt's labels segmented); the first prompt on it after the warm-up (``--conf prefetch=false`` to compare).

``--new-films N`` measures one case instead: N clients at once, each uploading a film the server has not seen
(``file=``, uncached), while ``/info/`` is polled: each answer's latency and the order answers arrive in (do they
leave as they are ready, or all at the end?), 503s from the infer queue, ``/info/``'s latency meanwhile and the
queue it shows. ``--repo PATH`` starts the server of another checkout (e.g. the commit before a change).

Requests use ``output=all`` (label NIfTI + params, what the viewers get); the params carry the server-side
latency, reported beside the client-side one. Background scoring is off (``MONAI_LABEL_AUTO_UPDATE_SCORING
=false``): its subprocess would load a second model and compete for the CPU during the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import REPO, machine_info, rss_mb, summary, table, write_json

sys.path.insert(0, str(REPO / "tests"))
from server import Server

CHEST = ["left lung", "right lung", "heart", "left clavicle", "right clavicle"]


def infer(client, image: str, prompt: str, timeout: float = 600) -> tuple[float, int, dict]:
    """One infer request; returns (client seconds, status, params of the answer or {'error': ...})."""
    t = time.perf_counter()
    try:
        r = client.post("/infer/xray_textseg", params={"image": image, "output": "all"},
                        data={"params": json.dumps({"prompt": prompt})}, timeout=timeout)
        dt = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        return time.perf_counter() - t, 0, {"error": f"{type(exc).__name__}: {exc}"}
    if r.status_code != 200:
        return dt, r.status_code, {"error": r.text[:300]}
    return dt, 200, multipart_params(r)


def multipart_params(response) -> dict:
    """The ``params`` JSON part of MONAI Label's multipart answer."""
    ctype = response.headers.get("content-type", "")
    if "boundary=" not in ctype:
        return {}
    boundary = ctype.split("boundary=")[1].strip('"').encode()
    for chunk in response.content.split(b"--" + boundary):
        head, _, body = chunk.partition(b"\r\n\r\n")
        if b'name="params"' in head:
            return json.loads(body.strip())
    return {}


def run_clients(url: str, n: int, requests: int, images: list[str], prompt: str) -> tuple[list[float], list[str], float]:
    """``n`` closed-loop clients, ``requests`` each, started together; (latencies of answered requests, errors,
    elapsed seconds)."""
    import httpx

    lat: list[float] = []
    errs: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n + 1)

    def worker(k: int):
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            for j in range(requests):
                dt, status, params = infer(c, images[(k + j) % len(images)], prompt)
                with lock:
                    if status == 200:
                        lat.append(dt)
                    else:
                        errs.append(f"{status} {params.get('error', '')[:120]}")

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for w in workers:
        w.start()
    barrier.wait()
    t_start = time.perf_counter()
    for w in workers:
        w.join()
    return lat, errs, time.perf_counter() - t_start


class RssMonitor(threading.Thread):
    """Samples the server's RSS (process tree) every ``period`` seconds; ``peak`` is the maximum seen."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.peak, self._stop_event = pid, period, 0.0, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            with contextlib.suppress(Exception):  # the process may be gone at the very end
                self.peak = max(self.peak, rss_mb(self.pid))
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="cold studies and warm repeats")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=8, help="requests per client per concurrency level")
    ap.add_argument("--prompt", default="left lung")
    ap.add_argument("--refine", choices=("on", "off"), default="on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: cores)")
    ap.add_argument("--data", default=None, help="folder of films (or with images/); default: sample chest films")
    ap.add_argument("--conf", nargs="*", default=[], help="extra app options NAME=VALUE")
    ap.add_argument("--skip-al", action="store_true", help="leave out the active-learning cache check")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--new-films", type=int, default=0, help="only the case of N clients with new films at once")
    ap.add_argument("--repo", default=None, help="checkout whose app the server runs (default: this one)")
    args = ap.parse_args(argv)
    if args.new_films:
        return new_films(args)

    machine = machine_info(args.device)
    src = Path(args.data) if args.data else REPO / "sample_data" / "images"
    if (src / "images").is_dir():
        src = src / "images"
    films = sorted(p for p in src.iterdir() if p.suffix.lower() in (".png", ".dcm", ".jpg", ".tif", ".tiff")
                   and (args.data or p.name.startswith("chest")))
    n_needed = args.repeats + 2
    if len(films) < n_needed:
        raise SystemExit(f"need {n_needed} films, found {len(films)} in {src}")
    tmp = Path(tempfile.mkdtemp(prefix="xray_textseg_load_"))
    studies = tmp / "studies"
    studies.mkdir()
    for f in films[: n_needed + 4]:  # a few spare films stay unrequested for the active-learning check
        shutil.copy(f, studies / f.name)  # copied to a temporary folder: the server writes its datastore there
    ids = [f.name.split(".")[0] for f in films[: n_needed + 4]]
    conf = {"adapter_dir": str(tmp / "adapters"), "refine": "true" if args.refine == "on" else "false",
            "device": args.device, "auto_train_after": "0"}
    conf.update(dict(kv.split("=", 1) for kv in args.conf))
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    threads = args.threads or os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(threads)

    t0 = time.perf_counter()
    srv = Server(studies, conf=conf, env=env, log=tmp / "server.log")
    samples: dict[str, list[float]] = {}
    server_side: dict[str, list[float]] = {}
    errors: list[str] = []
    result: dict = {"benchmark": "server_load", "machine": machine,
                    "config": {"refine": args.refine, "device": args.device, "server_threads": threads,
                               "prompt": args.prompt, "repeats": args.repeats, "clients": args.clients,
                               "requests_per_client": args.requests, "conf": conf, "films": ids}}
    monitor = None
    try:
        srv.wait_ready(timeout=600)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        result["rss_idle_mb"] = rss_mb(srv.proc.pid)
        monitor = RssMonitor(srv.proc.pid)
        monitor.start()
        client = srv.client
        print(f"server up in {result['startup_s']} s, RSS {result['rss_idle_mb']} MB, "
              f"loadavg {machine['loadavg_start']}", flush=True)

        def record(name, dt, status, params):
            if status != 200:
                errors.append(f"{name}: {status} {params.get('error', '')}")
                return
            samples.setdefault(name, []).append(dt)
            lat = params.get("latencies", {})
            if "request" in lat:
                server_side.setdefault(name, []).append(lat["request"])

        look_ahead_s: list[float] = []
        seen: list[dict] = [{}]

        def wait_idle():
            """Until the background warm-up (look-ahead, prefetch) is over: a clinician's reading time."""
            deadline, state = time.time() + 300, {}
            while time.time() < deadline:
                state = client.get("/info/").json().get("prefetch") or {}
                if state.get("status") != "running":
                    break
                time.sleep(0.1)
            if state.get("reason") == "look-ahead" and state.get("seconds") is not None and state != seen[-1]:
                look_ahead_s.append(state["seconds"])  # each finished look-ahead once
            seen.append(state)

        # the very first request also pays one-off allocations of the process
        record("first request after start", *infer(client, ids[0], args.prompt))
        others = [p for p in CHEST if p != args.prompt]
        cold_ids = ids[1: args.repeats + 1]
        for i, image in enumerate(cold_ids):
            wait_idle()
            record("cold (new study)", *infer(client, image, args.prompt))
            record("second prompt at once (look-ahead running)", *infer(client, image, others[i % len(others)]))
        for _ in range(args.repeats):
            wait_idle()
            record("warm, repeated prompt", *infer(client, cold_ids[0], args.prompt))
        for i in range(args.repeats):
            wait_idle()
            record("warm, new prompt", *infer(client, cold_ids[i % len(cold_ids)],
                                              others[(i + 1 + i // len(cold_ids)) % len(others)]))
        # two new studies back to back: the second arrives while the first one's look-ahead runs
        spare = ids[args.repeats + 4:]
        for a, b in zip(spare[::2], spare[1::2]):
            wait_idle()
            infer(client, a, args.prompt)
            record("cold, previous film's look-ahead running", *infer(client, b, args.prompt))
        wait_idle()
        result["look_ahead_s"] = look_ahead_s
        result["rss_after_sequential_mb"] = rss_mb(srv.proc.pid)

        # concurrent clients on warm studies (prompt already answered on them: all embeddings cached)
        warm_ids = cold_ids[: min(4, len(cold_ids))]
        conc_rows = []
        for n in args.clients:
            lat, errs, elapsed = run_clients(srv.url, n, args.requests, warm_ids, args.prompt)
            row = {"clients": n, "requests": n * args.requests, "errors": len(errs),
                   "req_per_s": round(len(lat) / elapsed, 2), **summary(lat), "rss_peak_mb": monitor.peak}
            conc_rows.append(row)
            errors.extend(f"{n} clients: {e}" for e in errs[:5])
            print(f"  {n} clients: {row['req_per_s']} req/s, p50 {row.get('p50_ms')} ms, p95 {row.get('p95_ms')} ms, "
                  f"errors {len(errs)}", flush=True)
        result["concurrency"] = conc_rows

        if not args.skip_al:
            # active learning scores unscored films with the served predictor (whole film, one encode each);
            # a first infer on a film that was scored but never requested then finds its whole-film embedding
            # in the same cache (a hit), and only the crop of the new structure is encoded
            prompt = "heart" if args.prompt != "heart" else "left lung"
            t = time.perf_counter()
            r = client.post("/activelearning/uncertainty", json={}, timeout=600)
            al_s = time.perf_counter() - t
            if r.status_code == 200:
                body = r.json()
                al = {"strategy_s": round(al_s, 2), "scored": body.get("scored"), "picked": body.get("id"),
                      "first_infer_on_unrequested_films": []}
                for film in ids[args.repeats + 1: args.repeats + 4]:
                    dt, status, params = infer(client, film, prompt)
                    al["first_infer_on_unrequested_films"].append(
                        {"film": film, "ms": round(dt * 1e3, 1), "cache": params.get("cache"), "status": status})
                al["whole_film_hits"] = sum(1 for f in al["first_infer_on_unrequested_films"]
                                            if (f["cache"] or {}).get("hits", 0) >= 1)
                result["active_learning"] = al
                print(f"  active learning scored {al['scored']} films in {al_s:.1f} s; first infer on "
                      f"{len(al['first_infer_on_unrequested_films'])} unrequested films: whole-film cache hits "
                      f"{al['whole_film_hits']} ({[f['cache'] for f in al['first_infer_on_unrequested_films']]})",
                      flush=True)
            else:
                errors.append(f"activelearning: {r.status_code} {r.text[:200]}")
            # prefetch: the film active learning proposes is encoded, and the last prompt's labels segmented,
            # in the background; the clinician's first prompt on it then comes from the result cache
            r = client.post("/activelearning/uncertainty", json={}, timeout=600)
            if r.status_code == 200 and r.json().get("id"):
                picked, deadline, state = r.json()["id"], time.time() + 300, {}
                while time.time() < deadline:
                    state = client.get("/info/").json().get("prefetch") or {}
                    if state.get("status") != "running":
                        break
                    time.sleep(0.2)
                dt, status, params = infer(client, picked, prompt)
                record("first prompt on the proposed film, after prefetch", dt, status, params)
                result["prefetch"] = {"film": picked, "state": state, "ms": round(dt * 1e3, 1),
                                      "cache": params.get("cache")}
                print(f"  prefetch of {picked}: {state}; first prompt {dt * 1e3:.0f} ms, cache {params.get('cache')}",
                      flush=True)
    finally:
        if monitor is not None:
            monitor.stop()
            result["rss_peak_mb"] = monitor.peak
        with contextlib.suppress(Exception):
            result["rss_end_mb"] = rss_mb(srv.proc.pid)
        log_tail = srv.log_tail(40)
        srv.stop()

    rows = []
    for name, v in samples.items():
        ss = summary(server_side.get(name, []))
        rows.append({"scenario": name, **summary(v), "server_p50_ms": ss.get("p50_ms"), "server_p95_ms": ss.get("p95_ms")})
    result["rows"] = rows
    result["errors"] = errors
    machine["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    four = next((r for r in result.get("concurrency", []) if r["clients"] == 4), None)
    result["targets"] = {
        "p95_4_clients_lt_300ms": None if not four or "p95_ms" not in four else four["p95_ms"] < 300,
        "rss_lt_2_5_gb": result.get("rss_peak_mb", 0) < 2.5 * 1024 if result.get("rss_peak_mb") else None,
    }
    print()
    print(table(rows, [("scenario", "scenario"), ("n", "n"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"),
                       ("server_p50_ms", "server-side p50 ms"), ("server_p95_ms", "server-side p95 ms")]))
    print()
    print(table(result.get("concurrency", []), [("clients", "clients"), ("requests", "requests"),
                                                ("errors", "errors"), ("req_per_s", "req/s"), ("p50_ms", "p50 ms"),
                                                ("p95_ms", "p95 ms"), ("rss_peak_mb", "server RSS peak MB")]))
    print(f"\nstart-up {result.get('startup_s')} s; server RSS idle {result.get('rss_idle_mb')} MB, peak "
          f"{result.get('rss_peak_mb')} MB, end {result.get('rss_end_mb')} MB; errors {len(errors)}; "
          f"load average {machine['loadavg_start']} -> {machine['loadavg_end']}")
    if errors:
        print("errors (first 10):\n  " + "\n  ".join(errors[:10]))
        print("server log tail:\n" + log_tail)
    write_json(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not errors else 1


def new_films(args) -> int:
    """N clients at once, each with a film the server never saw (see the module docstring)."""
    import io

    import httpx
    import server as server_module
    from PIL import Image

    from xray_textseg.sample_data import generate_cases, to_uint8

    if args.repo:
        server_module.REPO = Path(args.repo).resolve()
    machine = machine_info(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="xray_textseg_newfilms_"))
    (tmp / "studies").mkdir()
    shutil.copy(REPO / "sample_data" / "images" / "chest_000.png", tmp / "studies")
    films = []
    for case in generate_cases(args.new_films, 0, seed=99):
        buf = io.BytesIO()
        Image.fromarray(to_uint8(case.image)).save(buf, format="PNG")
        films.append(buf.getvalue())
    conf = {"adapter_dir": str(tmp / "adapters"), "device": args.device, "auto_train_after": "0",
            **dict(kv.split("=", 1) for kv in args.conf)}
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "OMP_NUM_THREADS": str(args.threads or os.cpu_count() or 1)}
    srv = Server(tmp / "studies", conf=conf, env=env, log=tmp / "server.log")
    answers: list[dict] = []
    info: list[dict] = []
    try:
        srv.wait_ready(timeout=600)
        with contextlib.suppress(Exception):  # warm the model once (not a new film's cost)
            infer(srv.client, "chest_000", args.prompt)
        barrier = threading.Barrier(args.new_films + 1)
        lock = threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=900) as c:
                barrier.wait()
                t = time.perf_counter()
                r = c.post("/infer/xray_textseg", params={"output": "json"},
                           data={"params": json.dumps({"prompt": args.prompt})},
                           files={"file": (f"new_{k}.png", films[k])})
                with lock:
                    answers.append({"client": k, "status": r.status_code, "s": round(time.perf_counter() - t, 2),
                                    "at": time.perf_counter(), "retry_after": r.headers.get("Retry-After")})

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.new_films)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        with httpx.Client(base_url=srv.url, timeout=900) as c:
            while any(t.is_alive() for t in threads):
                t = time.perf_counter()
                r = c.get("/info/")
                info.append({"s": round(time.perf_counter() - t, 3), "queue": r.json().get("infer_queue", {})
                             .get("in_flight") if r.status_code == 200 else None})
                time.sleep(0.5)
        for t in threads:
            t.join()
    finally:
        log_tail = srv.log_tail(20)
        srv.stop()
    ok = sorted(a["s"] for a in answers if a["status"] == 200)
    arrivals = sorted(a["at"] - t0 for a in answers if a["status"] == 200)
    result = {"benchmark": "server_load new films", "machine": machine, "repo": str(server_module.REPO),
              "clients": args.new_films, "conf": conf, "answered": len(ok),
              "statuses": {str(s): sum(a["status"] == s for a in answers) for s in {a["status"] for a in answers}},
              "latency": summary(ok), "first_answer_s": round(arrivals[0], 1) if arrivals else None,
              "last_answer_s": round(arrivals[-1], 1) if arrivals else None,
              "answers_in_first_half": sum(a < arrivals[-1] / 2 for a in arrivals) if arrivals else 0,
              "info_polls": len(info), "info_max_s": max((i["s"] for i in info), default=None),
              "info_queue_max": max((i["queue"] or 0 for i in info), default=None), "answers": answers}
    print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "machine")}, indent=1))
    if not ok:
        print(log_tail)
    write_json(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
