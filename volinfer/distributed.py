"""Chunked runs: Zarr in, Zarr out, block by block, in this process or on a Dask cluster.

The volume is split into blocks of whole output chunks (:mod:`volinfer.blocks`), so no two tasks ever write the
same chunk. Each task reads its tiles (with the halo they need) straight from the input chunks, runs them through a
model that its worker process compiled once (a per-process cache), writes its output chunks, then drops a completion
marker. A re-run skips blocks whose marker exists; a block whose worker died is simply run again (Dask retries it),
overwriting whatever partial chunks it left. Statistics for normalisation are gathered once, up front.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .blocks import Block, block_tiles, make_block_stitcher, plan_blocks
from .engine import RunReport, peak_rss_mb, run_tiles
from .errors import VolinferError
from .geometry import TileGrid
from .model import CompileOptions, TileModel
from .normalize import Normalizer
from .postprocess import OutputSpec
from .runsetup import resolve, scan_volume
from .journal import Journal
from .targets import OutputLock
from .zarr_io import (check_zarr_output, create_output, done_marker_dir, ome_attrs, open_zarr_array,
                      open_zarr_source)


@dataclass
class ZarrJob:
    """Everything a task needs, small and picklable (sent to every Dask worker)."""

    input: str
    output: str
    model: str
    tile: tuple[int, int, int]
    layout: str
    model_output: int
    options: dict[str, Any]
    overlap: tuple[int, int, int]
    multiple: int
    stitch: str
    sigma: float
    pad_mode: str
    spec: OutputSpec
    normalizer: Normalizer
    nan_fill: list[float] | None
    requests: int
    reuse_constant: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


_MODELS: dict[tuple, TileModel] = {}  # per worker process: compiled once, reused by every task


def _model(job: ZarrJob) -> TileModel:
    key = (job.model, job.tile, job.layout, job.model_output, tuple(sorted(job.options.items())))
    if key not in _MODELS:
        _MODELS[key] = TileModel(job.model, tile=job.tile, layout=job.layout, output=job.model_output,
                                 options=CompileOptions(**job.options))
    return _MODELS[key]


def _marker(job: ZarrJob, block: Block) -> Path:
    return done_marker_dir(job.output) / "_".join(map(str, block.index))


def run_block(job: ZarrJob, block: Block) -> dict[str, Any]:
    """One task: run the tiles touching ``block``, write its chunks, mark it done. Skips finished blocks."""
    marker = _marker(job, block)
    if marker.exists():
        return {"block": block.index, "skipped": True, "tiles": 0, "reused": 0, "busy_s": 0.0, "pid": os.getpid()}
    tm = _model(job)
    source, _ = open_zarr_source(job.input)
    grid = TileGrid.build(source.shape, job.tile, [job.multiple] * 3, job.overlap,
                          "crop" if job.stitch == "crop" else "blend")
    stitcher = make_block_stitcher(grid, block, job.spec, job.stitch, job.sigma)
    tiles = list(block_tiles(grid, block))
    busy, n, reused = run_tiles(source, tm, job.spec, None, grid=grid, stitch=job.stitch,  # type: ignore[arg-type]
                                normalizer=job.normalizer, sigma=job.sigma, pad_mode=job.pad_mode,
                                requests=job.requests, progress=False, reuse_constant=job.reuse_constant,
                                nan_fill=job.nan_fill, tiles=tiles, stitcher=stitcher)
    out = open_zarr_array(job.output, mode="r+")
    region = tuple(slice(a, b) for a, b in block.box)
    if job.spec.out_channels == 1:
        out[region] = stitcher.out[0]
    else:
        out[(slice(None), *region)] = stitcher.out
    _sync_chunks(out, job.output, block)  # the data first, durably; only then the marker that says it is done
    marker.parent.mkdir(parents=True, exist_ok=True)
    with open(marker, "w") as f:
        f.write("done")
        f.flush()
        os.fsync(f.fileno())
    return {"block": block.index, "skipped": False, "tiles": n, "reused": reused, "busy_s": busy,
            "pid": os.getpid(), "peak_rss_mb": _own_peak_mb()}


def _sync_chunks(arr: Any, store: str, block: Block) -> None:
    """fsync the chunk files of ``block`` (local stores; a no-op where the key encoding is unknown)."""
    from itertools import product

    try:
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    except AttributeError:
        return
    chunks = arr.chunks[-3:]
    ranges = [range(a // c, -(-b // c)) for (a, b), c in zip(block.box, chunks)]
    lead = (0,) * (arr.ndim - 3)
    for idx in product(*ranges):
        try:
            fd = os.open(os.path.join(store, encode((*lead, *idx))), os.O_RDONLY)
        except OSError:
            continue  # a chunk equal to the fill value is not stored
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _own_peak_mb() -> float:
    """This process's own peak RSS: VmHWM belongs to the current address space, whereas ru_maxrss also carries the
    high-water mark of whatever process forked this one before exec (a Dask worker spawned from a big client)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return peak_rss_mb()


def run_zarr(
    volume: str | Path,
    model: str | Path,
    output: str | Path,
    *,
    tile: Any = None,
    layout: str | None = None,
    model_output: str | int | None = None,
    overlap: Any = None,
    stitch: str | None = None,
    sigma: float = 0.125,
    pad_mode: str = "constant",
    kind: str = "labels",
    activation: str | None = None,
    channels: Sequence[int] | None = None,
    threshold: float = 0.5,
    prob_dtype: str = "float32",
    normalize: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    requests: int = 2,
    nan_value: float | None = None,
    reuse_constant: bool = True,
    block: int = 256,
    chunks: Sequence[int] | int | None = None,
    compression: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> RunReport:
    """Run a Zarr volume into a Zarr output, block by block: in this process, on a local Dask cluster of ``workers``
    processes, or on the Dask scheduler at ``scheduler``. Same options as :func:`volinfer.predict`.

    The output is checked and locked like every output (:mod:`volinfer.targets`); its run fingerprint (input and
    model by content, every setting that changes the output) is kept in the store, and ``resume`` refuses a
    different run."""
    check_zarr_output(output, [volume], overwrite, resume)
    with OutputLock(Path(output)):
        return _run_zarr(volume, model, output, tile=tile, layout=layout, model_output=model_output,
                         overlap=overlap, stitch=stitch, sigma=sigma, pad_mode=pad_mode, kind=kind,
                         activation=activation, channels=channels, threshold=threshold, prob_dtype=prob_dtype,
                         normalize=normalize, options=options, requests=requests, nan_value=nan_value,
                         reuse_constant=reuse_constant, block=block, chunks=chunks, compression=compression,
                         scheduler=scheduler, workers=workers, resume=resume, overwrite=overwrite,
                         progress=progress)


def run_journal(output: str | Path) -> Path:
    """Where a Zarr output keeps the fingerprint of the run that writes it."""
    return Path(output) / ".volinfer-run.json"


def _run_zarr(volume: Any, model: Any, output: Any, *, tile: Any, layout: Any, model_output: Any, overlap: Any,
              stitch: Any, sigma: float, pad_mode: str, kind: str, activation: Any, channels: Any, threshold: float,
              prob_dtype: str, normalize: Any, options: Any, requests: int, nan_value: Any, reuse_constant: bool,
              block: int, chunks: Any, compression: bool, scheduler: Any, workers: Any, resume: bool,
              overwrite: bool, progress: bool) -> RunReport:
    """:func:`run_zarr` once the output is checked and locked."""
    from .api import run_fingerprint

    t0 = time.perf_counter()
    options = {k: v for k, v in (options or {}).items() if v is not None}
    source, in_arr = open_zarr_source(volume)
    tm = TileModel(model, tile=tile, layout=layout, output=model_output, options=CompileOptions(**options),
                   compile=False)
    setup = resolve(tm, source.shape, source.channels, stitch=stitch, overlap=overlap, kind=kind,
                    activation=activation, keep=channels, threshold=threshold, prob_dtype=prob_dtype,
                    normalize=normalize)
    scan_volume(setup, tm, source, nan_value)
    stitch, spec, ov_vox, grid, normalizer = setup.stitch, setup.spec, setup.overlap, setup.grid, setup.normalizer
    if chunks is None:
        in_chunks = tuple(in_arr.chunks[-3:])
        chunk3 = in_chunks if max(in_chunks) >= 16 else (64, 64, 64)
    else:
        chunk3 = (int(chunks),) * 3 if isinstance(chunks, (int, np.integer)) else tuple(int(c) for c in chunks)
    journal = Journal(Path(output), run_fingerprint([Path(volume)], tm.path, dict(
        tile=tm.tile, layout=tm.layout, output=tm.output_index, overlap=ov_vox, stitch=stitch, sigma=sigma,
        pad_mode=pad_mode, kind=kind, activation=activation, channels=spec.channels, threshold=threshold,
        dtype=str(spec.dtype), normalization=normalizer.describe(), nan_value=nan_value,
        precision=options.get("precision", "f32"), chunks=chunk3, block=block, compression=compression,
        reuse_constant=reuse_constant)), path=run_journal(output))
    resuming = resume and Path(output).exists()
    if resuming:
        journal.check()  # before touching the store: a different input, model or setting is refused
    out_arr = create_output(output, source.shape, spec.out_channels, spec.dtype, chunk3, ome_attrs(in_arr),
                            compressor="zstd" if compression else None, overwrite=overwrite, resume=resume)
    if not resuming:
        journal.update(0, 0)
    out_arr.attrs.update({"volinfer": {"model": str(model), "stitch": stitch, "kind": kind, "tile": list(tm.tile),
                                       "overlap": list(ov_vox)}})
    if not resume:
        marker_dir = done_marker_dir(output)
        if marker_dir.exists():
            for m in marker_dir.iterdir():
                m.unlink()
    blocks = plan_blocks(source.shape, chunk3, (block,) * 3)
    job = ZarrJob(str(volume), str(output), str(model), tm.tile, tm.layout, tm.output_index, options, ov_vox,
                  tm.multiple, stitch, sigma, pad_mode, spec, normalizer, setup.nan_fill, requests, reuse_constant)
    results = _execute(job, blocks, scheduler, workers, progress)
    done = [r for r in results if not r["skipped"]]
    rep = RunReport(
        shape=source.shape, channels=source.channels, tile=tm.tile, grid=tuple(a.count for a in grid.axes),  # type: ignore[arg-type]
        tiles=sum(r["tiles"] for r in done), stitch=stitch, overlap=ov_vox, layout=tm.layout,
        device=options.get("device", "CPU"), precision=options.get("precision", "f32"), requests=requests,
        normalization=normalizer.describe(), output_kind=kind, output_dtype=str(spec.dtype),
        wall_s=time.perf_counter() - t0, infer_busy_s=sum(r["busy_s"] for r in done), peak_rss_mb=peak_rss_mb(),
        output=str(output))
    rep.extra["blocks"] = (f"{len(done)} run, {len(results) - len(done)} already complete, "
                           f"{len({r['pid'] for r in done})} process(es)")
    worker_peaks = [r["peak_rss_mb"] for r in done if "peak_rss_mb" in r]
    if worker_peaks:
        rep.extra["worker peak"] = f"{max(worker_peaks):.0f} MB (largest per-process peak RSS)"
    reused = sum(r["reused"] for r in done)
    if reused:
        rep.extra["constant"] = f"{reused} tiles were constant and reused one cached inference"
    return rep


def _execute(job: ZarrJob, blocks: list[Block], scheduler: str | None, workers: int | None,
             progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=len(blocks), unit="block", disable=not progress, desc="volinfer", leave=False)
    if scheduler is None and not workers:
        out = []
        for b in blocks:
            out.append(run_block(job, b))
            bar.update(1)
        bar.close()
        return out
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise VolinferError("--scheduler/--workers need Dask: pip install 'volinfer[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,  # type: ignore[arg-type]
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    try:
        futures = client.map(run_block, [job] * len(blocks), blocks, pure=False, retries=3)
        out = []
        for fut in as_completed(futures):
            out.append(fut.result())
            bar.update(1)
        return out
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
