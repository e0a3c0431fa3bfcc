"""Measure how fast VesuviusStream feeds a DataLoader, next to the alternatives.

In one run, on the same store and DataLoader settings, it measures:

1. the store's decode rate: every chunk read once, in order, by one process and by
   as many as there are workers (the limits);
2. naive per-sample slicing: ``array[z:z+d, y:y+h, x:x+w]`` for each random block;
3. the same reads through tensorstore, if it is installed (``pip install tensorstore``);
4. VesuviusStream with its defaults, yielding items (collated by the DataLoader)
   and yielding whole batches (``batch_size``, ``DataLoader(batch_size=None)``);

then the time to the first item of the first and the last of 64 shards
(samples_per_epoch 1e9, or the positions there are), that of the last of 3
ranks resuming what 64 shards left (merge_state_dicts), grid inference with a
trivial model alone and with ``VesuviusStream.writer`` writing a 2D map
(scale 4 and 1), and VesuviusStream with labels with and without
``positive_fraction=0.5``: the store's own labels (a converter group's),
synthetic 2D ink labels (about 5 % of the pixels, a few areas) on the
synthetic store or when ``--synthetic-labels`` asks, else none (those rows are
skipped); with the synthetic labels, over two copies of the volume, with
``positive_fraction=0.5``, today's rule next to ``min_positive_fraction``,
``ignore_label`` and weights (the counting pass when the dataset is built, and
the streaming rate); and the counting pass with a 2D and a 3D mask at 1/8 of
the volume's resolution next to one at full resolution, the 2D one also over a
volume 8 times taller and wider (16384x16384 for the synthetic store: a large
segment).

For each it prints samples/s and MB/s delivered, the ratio to naive, the fraction
of the limits, read amplification (bytes decoded / bytes delivered), distinct
256x256 (y, x) tiles per batch, and the peak RSS of the process that
measures plus its DataLoader workers: each measurement runs in a child
process of its own, so that none counts the memory of another. It then
prints where VesuviusStream's time goes, per sample, in both forms: decoding
and cutting in the workers (read from the stream's own per-process counters,
``streamer._COUNTERS``), collate + transfer in the DataLoader (as many ready
blocks, or empty shared-memory batches, through the same DataLoader).

    python benchmark.py                       # synthetic 65x2048x2048 uint16 store
    python benchmark.py segment.zarr --block 26 64 64 --workers 2 --batch-size 32
    python benchmark.py https://host/scroll.zarr/0 --block 64 64 64   # a remote store
    python benchmark.py --latency 20          # the synthetic store over HTTP, +20 ms a request
    python benchmark.py --converter           # converter.py vs tifffile + zarr

With no store given it builds, once, a synthetic CT-like store (smooth field
plus noise; chunks 16x256x256, zstd) in the system's temporary directory and
reuses it; ``--clean`` deletes it. Peak RSS needs the optional package psutil
(``pip install psutil``); URLs and ``--latency`` need fsspec and aiohttp.
"""

import argparse
import contextlib
import functools
import glob
import http.server
import importlib.util
import inspect
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import tifffile
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import streamer
from streamer import VesuviusStream

SYNTHETIC_SHAPE = (65, 2048, 2048)
SYNTHETIC_CHUNKS = (16, 256, 256)
TILE = 256
TENSORSTORE = "tensorstore per-sample"      # the name of its row


def synthetic_store(shape=SYNTHETIC_SHAPE, chunks=SYNTHETIC_CHUNKS, directory=None):
    """Path of a cached synthetic CT-like uint16 store, built on first use.

    Intensities: a bright sheet around the middle layer with smooth fibre-like
    modulation, on a darker background, plus Gaussian noise, so that it
    compresses like a scan rather than like random bytes.
    """
    directory = directory or tempfile.gettempdir()
    name = "vesuvius_benchmark_{}_{}.zarr".format("x".join(map(str, shape)),
                                                  "x".join(map(str, chunks)))
    path = os.path.join(directory, name)
    if os.path.exists(path):
        return path
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    array = zarr.create_array(partial, shape=shape, chunks=chunks, dtype="uint16")
    rng = np.random.default_rng(0)
    depth, height, width = shape
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    fibres = (np.sin(x / 9.0 + 3 * np.sin(y / 150.0)) * np.sin(y / 13.0) * 0.5 + 0.5)
    relief = 4 * np.sin(x / 300.0) * np.cos(y / 210.0)        # the sheet is not flat
    for z0 in range(0, depth, chunks[0]):
        z = np.arange(z0, min(z0 + chunks[0], depth), dtype=np.float32)[:, None, None]
        sheet = np.exp(-((z - depth / 2 - relief) / (depth / 6)) ** 2)
        slab = 9000 + sheet * (22000 + 9000 * fibres)
        slab += rng.normal(0, 1200, slab.shape).astype(np.float32)
        array[z0:z0 + len(z)] = np.clip(slab, 0, 65535).astype(np.uint16)
    os.replace(partial, path)
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files over HTTP/1.1 (keep-alive), ``latency`` seconds late, without logging."""

    protocol_version = "HTTP/1.1"
    latency = 0.0

    def do_GET(self):
        # Each request waits in its own thread, like a network round trip.
        time.sleep(self.latency)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory, latency=0.0, handler=QuietHandler):
    """Serve ``directory`` over HTTP on 127.0.0.1 from a thread; yield the root URL."""
    handler = functools.partial(type("Handler", (handler,), {"latency": latency}),
                                directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


class NaiveBlocks(IterableDataset):
    """The baseline: one zarr read per random block (with coordinates)."""

    def __init__(self, path, block, samples):
        self.path, self.block, self.samples = path, block, samples

    def __iter__(self):
        array = self.open()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        rng = np.random.default_rng(worker)
        limits = [s - b + 1 for s, b in zip(array.shape, self.block)]
        d, h, w = self.block
        for _ in range(worker, self.samples, workers):
            z, y, x = (int(rng.integers(limit)) for limit in limits)
            yield (torch.from_numpy(self.read(array, np.s_[z:z + d, y:y + h, x:x + w])),
                   torch.tensor((0, z, y, x)))

    def open(self):
        """The volume, opened in the worker."""
        return open_volume(self.path)

    def read(self, array, box):
        """``array[box]`` as a numpy array."""
        return array[box]


class TensorstoreBlocks(NaiveBlocks):
    """The same reads (same positions), through tensorstore: a fast per-sample loader."""

    def open(self):
        import tensorstore     # optional: only this row needs it
        array = open_volume(self.path)
        where = "/".join(filter(None, [self.path.rstrip("/"), array.path]))
        return tensorstore.open({
            "driver": "zarr3" if array.metadata.zarr_format == 3 else "zarr",
            "kvstore": where if "://" in where else {"driver": "file", "path": where}},
            read=True).result()

    def read(self, array, box):
        """``array[box]`` as a numpy array, read by tensorstore."""
        return array[box].read().result()


def open_volume(path):
    node = zarr.open(path, mode="r")
    return node["volume"] if isinstance(node, zarr.Group) else node


def synthetic_slices(shape=(65, 2048, 3072), directory=None):
    """Folder of a cached synthetic TIFF stack (00.tif ...), built on first use."""
    directory = directory or tempfile.gettempdir()
    path = os.path.join(directory, "vesuvius_benchmark_slices_{}".format(
        "x".join(map(str, shape))))
    if os.path.exists(path):
        return path
    store = zarr.open_array(synthetic_store(shape), mode="r")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    for z in range(shape[0]):
        tifffile.imwrite(os.path.join(partial, f"{z:02d}.tif"), store[z])
    os.replace(partial, path)
    return path


# tifffile reads the whole stack, zarr writes it: what the converter must beat.
WHOLE_STACK = """
import glob, sys, tifffile, zarr
stack = tifffile.imread(sorted(glob.glob(sys.argv[1] + "/*.tif")))
zarr.create_array(sys.argv[2], shape=stack.shape, chunks=(16, 256, 256),
                  dtype=stack.dtype)[:] = stack
"""


def timed_process(command):
    """Run a command; return (seconds, PeakRSS of it).

    Sampled, because getrusage would count this process's memory at fork.
    """
    with PeakRSS(interval=0.02, mine=False) as rss:
        start = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - start
    return seconds, rss


def benchmark_converter():
    """converter.py next to tifffile-read + zarr-write, on the same stack."""
    src = synthetic_slices()
    stack_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    print(f"stack {src}: {len(os.listdir(src))} slices, {stack_bytes / 2**20:.0f} MB\n")
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as out:
        runs = (("converter.py", [sys.executable, os.path.join(here, "converter.py"), src,
                                  os.path.join(out, "c.zarr"), "--quiet"]),
                ("tifffile+zarr", [sys.executable, "-c", WHOLE_STACK, src,
                                   os.path.join(out, "w.zarr")]))
        print(f"{'':15}{'seconds':>8}{'MB/s':>8}{'peak RSS':>12}{'of input':>10}")
        for name, command in runs:
            seconds, rss = timed_process(command)
            print(f"{name:15}{seconds:8.1f}{stack_bytes / seconds / 2**20:8.0f}"
                  f"{rss.peak / 2**20:9.0f} MB{rss.peak / stack_bytes:10.2f}")


def decoded_bytes(array, starts, shape):
    """Bytes zarr decodes to read a box: every chunk the box overlaps, whole."""
    total = 1
    for start, size, chunk, extent in zip(starts, shape, array.chunks, array.shape):
        first, last = start // chunk, (start + size - 1) // chunk
        # Edge chunks are stored whole as well, so each counts as a full chunk.
        total *= (last - first + 1) * chunk
    return total * array.dtype.itemsize


class PeakRSS:
    """Peak resident memory of this process (unless not ``mine``) and its children."""

    def __init__(self, interval=0.05, mine=True):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil, self.interval, self.mine, self.peak = psutil, interval, mine, 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.psutil:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self):
        me = self.psutil.Process()
        total = 0
        for process in [me] * self.mine + me.children(recursive=True):
            try:
                total += process.memory_info().rss
            except self.psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def __exit__(self, *exc):
        self._stop.set()
        if self.psutil:
            self._thread.join()
            self._sample()          # a run shorter than the interval has one sample too

    def __str__(self):
        if not self.psutil:
            return "n/a (pip install psutil)"
        return f"{self.peak / 2**30:.2f} GiB"


def measure_decode_limit(path, passes=3):
    """Seconds (best of ``passes``) and bytes to decode the whole store, slab by slab.

    The best pass is the most demanding limit to compare against.
    """
    array = open_volume(path)
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for z0 in range(0, array.shape[0], array.chunks[0]):
            array[z0:z0 + array.chunks[0]]
        times.append(time.perf_counter() - start)
    return min(times), math.prod(array.shape) * array.dtype.itemsize


def run_loader(dataset, batch_size, workers):
    """Consume one epoch; return (seconds, first batch seconds, samples, coords per batch,
    peak RSS).

    A dataset that makes its own batches (``batched``: VesuviusStream's batch
    form) goes through ``DataLoader(batch_size=None)``. The time includes
    start-up (worker processes, first regions): a loader pays it every epoch
    unless its workers persist.
    """
    loader = DataLoader(dataset, batch_size=None if batched(dataset) else batch_size,
                        num_workers=workers,
                        multiprocessing_context=start_method() if workers else None)
    coords = []
    with PeakRSS() as rss:
        start = time.perf_counter()
        for batch in loader:
            batch_coords = batch[-1]
            if not coords:
                first_batch = time.perf_counter() - start
            coords.append(batch_coords)
        seconds = time.perf_counter() - start
    return seconds, first_batch, sum(len(c) for c in coords), coords, rss


def batched(dataset):
    """Whether ``dataset`` yields whole batches (VesuviusStream's ``batch_size``)."""
    return getattr(dataset, "batch_size", None) is not None


def start_method():
    """How the benchmark's processes (children, DataLoader workers) start: as the
    platform starts them (fork on Linux, which is cheap), but by spawn with zarr's
    zarrs codec pipeline, which hangs in a forked process."""
    return "spawn" if streamer._zarrs_pipeline() else None


def in_fresh_process(function, *args):
    """``function(*args)``, run in a child process; raises what it raised.

    Every measurement runs in a child of the main process, which decodes
    nothing itself: no measurement's memory (and forked workers' copies of it)
    counts in the next one's peak RSS.
    """
    context = multiprocessing.get_context(start_method())
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(send, function, args))
    child.start()
    send.close()
    try:
        failed, result = receive.recv()
    except EOFError:            # it died without a word
        failed, result = True, "(no traceback: the process died)"
    child.join()
    if failed:
        raise RuntimeError(f"{function.__name__} failed in its process (exit code "
                           f"{child.exitcode}):\n{result}")
    return result


def _send_result(send, function, args):
    try:
        send.send((False, function(*args)))
    except BaseException:
        send.send((True, traceback.format_exc()))


def loader_row(path, dataset, args):
    """One epoch of ``dataset`` (in a fresh process): samples/s, first batch (s),
    bytes decoded per sample (per-sample loaders; else None), tiles per batch, peak RSS."""
    seconds, first_batch, samples, coords, rss = run_loader(dataset, args.batch_size,
                                                            args.workers)
    decoded = None
    if isinstance(dataset, NaiveBlocks):
        array = open_volume(path)
        decoded = sum(decoded_bytes(array, c[1:].tolist(), dataset.block)
                      for batch in coords for c in batch) / samples
    return (samples / seconds, first_batch, decoded, tiles_per_batch(coords, dataset.block),
            str(rss))


class Counted(IterableDataset):
    """A VesuviusStream whose iterations add what they spent to ``spent``: a row per
    DataLoader worker (shared memory) of its counts (``COUNTED``): seconds decoding,
    seconds cutting, bytes decoded, batches made fresh and in reused buffers, read
    from the stream's own counters (``streamer._COUNTERS``, one per
    process) before and after the worker's epoch."""

    def __init__(self, stream, spent):
        self.stream, self.spent, self.batch_size = stream, spent, stream.batch_size

    def __iter__(self):
        info = get_worker_info()
        before = streamer._COUNTERS.snapshot()
        yield from self.stream
        after = streamer._COUNTERS.snapshot()
        self.spent[0 if info is None else info.id] += torch.tensor(
            [after[name] - before[name] for name in COUNTED], dtype=torch.float64)


COUNTED = ("decode_seconds", "cut_seconds", "decoded_bytes", "fresh_batches",
           "buffered_batches")


class ReadyBlocks(IterableDataset):
    """Blocks made once and yielded again: what collate + transfer alone cost. With
    ``batch_size``, whole batches made as the batch form makes them before cutting into
    them (``streamer._batch_memory``: reused shared-memory buffers, or fresh ones when
    none is free), left empty: the cost of passing them."""

    def __init__(self, block, dtype, samples, batch_size=None):
        self.block, self.dtype, self.samples = block, dtype, samples
        self.batch_size = batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        block = torch.zeros(self.block, dtype=self.dtype)
        coords = torch.zeros(4, dtype=torch.int64)
        if self.batch_size is None:
            for _ in range(worker, self.samples, workers):
                yield block.clone(), coords
            return
        parts = [(torch.empty(0, dtype=self.dtype).numpy().dtype, self.block)]
        size = self.batch_size
        for _ in range(worker, self.samples // size, workers):
            batch, buffer = streamer._batch_memory(parts, size, size, info is not None, True)
            coords = (torch.zeros(size, 4, dtype=torch.int64),)
            yield ((*batch, *coords) if buffer is None else
                   streamer._buffered(tuple(batch), coords, buffer, (parts, size, size)))


def decode_slabs(path, slabs):
    """(start, end) perf_counter of decoding ``slabs`` (z ranges) of the store."""
    array = open_volume(path)
    start = time.perf_counter()
    for z0, z1 in slabs:
        array[z0:z1]
    return start, time.perf_counter()


def measure_parallel_limit(path, array, processes):
    """Seconds for ``processes`` processes to decode the store, disjoint slabs each.

    Slabs of whole chunk layers, dealt in turn; the span from the first start
    to the last end (CLOCK_MONOTONIC, shared by the processes).
    """
    import concurrent.futures
    depth = array.chunks[0]
    slabs = [(z, min(z + depth, array.shape[0])) for z in range(0, array.shape[0], depth)]
    with concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(decode_slabs, [path] * processes, [[]] * processes))     # start-up
        spans = list(pool.map(decode_slabs, [path] * processes,
                              [slabs[p::processes] for p in range(processes)]))
    return max(end for _, end in spans) - min(start for start, _ in spans)


def shard_starts(path, block, samples, shards=64):
    """Seconds to the first item of the first and of the last of ``shards`` shards.

    The shards are ranks without workers (rank 63 of 64 is shard 63 of 64, as
    rank 7 of 8 with worker 7 of 8 is): built, then the first item read.
    """
    seconds = []
    for rank in (0, shards - 1):
        start = time.perf_counter()
        next(iter(VesuviusStream([path], *block, samples, rank=rank, world_size=shards)))
        seconds.append(time.perf_counter() - start)
    return seconds


def resumed_starts(path, block, samples, shards=64, ranks=3):
    """Seconds to the first item of the last of ``ranks`` ranks: of a fresh epoch, and of
    the rest of one whose ``shards`` shards delivered an item each (merged states)."""
    states = []
    for rank in range(shards):
        interrupted = VesuviusStream([path], *block, samples, rank=rank, world_size=shards)
        next(iter(interrupted))
        states.append(interrupted.state_dict())
    merged = VesuviusStream.merge_state_dicts(states)
    seconds = []
    for state in (None, merged):
        start = time.perf_counter()
        dataset = VesuviusStream([path], *block, samples, rank=ranks - 1, world_size=ranks)
        if state is not None:
            dataset.load_state_dict(state)
        next(iter(dataset))
        seconds.append(time.perf_counter() - start)
    return seconds


def tiles_per_batch(coords, block):
    """Mean number of distinct (file, 256x256 tile of the block centre) per batch."""
    counts = []
    for batch in coords:
        centres = batch[:, 2:] + torch.tensor(block[1:]) // 2
        tiles = {(int(f), int(y) // TILE, int(x) // TILE)
                 for f, (y, x) in zip(batch[:, 0], centres)}
        counts.append(len(tiles))
    return sum(counts) / len(counts)


CACHE_PREFIX = "vesuvius_benchmark_"      # of everything cached in the temporary folder


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments: one line on stderr and exit status 2, before anything is built."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    parser = Parser(
        prog="benchmark.py", description=__doc__.split("\n\n")[0],
        epilog=f"The synthetic data are built once and kept for later runs in "
               f"{tempfile.gettempdir()} (the temporary folder; set TMPDIR to move it), as "
               f"{CACHE_PREFIX}*: the 65x2048x2048 store takes about 460 MB, the converter's "
               f"stack about 780 MB plus its store. --clean deletes them.")
    parser.add_argument("store", nargs="?", help="Zarr array or converter group, path or URL "
                        "(default: the synthetic 65x2048x2048 uint16 store, built on first use)")
    parser.add_argument("--latency", type=float, metavar="MS",
                        help="serve the (local) store over HTTP on 127.0.0.1 with MS "
                        "milliseconds added to each request, and read it from there "
                        "(default: read the store directly)")
    parser.add_argument("--shape", type=int, nargs=3, default=SYNTHETIC_SHAPE,
                        metavar=("Z", "Y", "X"), help="shape of the synthetic store, e.g. 11 "
                        "1000 1000 with --chunks 4 512 512 --block 8 64 64 for a small segment "
                        f"crop (default: {' '.join(map(str, SYNTHETIC_SHAPE))})")
    parser.add_argument("--zarrs", action="store_true",
                        help="decode with zarr's optional zarrs codec pipeline (pip install "
                        "zarrs), workers started by spawn (default: zarr's own pipeline)")
    parser.add_argument("--chunks", type=int, nargs=3, default=SYNTHETIC_CHUNKS,
                        metavar=("Z", "Y", "X"), help="chunks of the synthetic store "
                        f"(default: {' '.join(map(str, SYNTHETIC_CHUNKS))})")
    parser.add_argument("--block", type=int, nargs=3, default=(26, 64, 64),
                        metavar=("Z", "Y", "X"), help="block shape (default: 26 64 64)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="DataLoader batch size (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=1000, metavar="N",
                        help="batches in VesuviusStream's epoch (default: %(default)s)")
    parser.add_argument("--naive-batches", type=int, default=20, metavar="N",
                        help="batches read by naive slicing (default: %(default)s)")
    parser.add_argument("--samples-per-region", type=int, metavar="N",
                        help="VesuviusStream's samples_per_region (default: its own)")
    parser.add_argument("--region-mb", type=float, metavar="MB",
                        help="VesuviusStream's region_mb (default: its own, "
                        f"{inspect.signature(VesuviusStream).parameters['region_mb'].default:g})")
    parser.add_argument("--open-regions", type=int, metavar="N",
                        help="VesuviusStream's open_regions (default: its own, "
                        f"{inspect.signature(VesuviusStream).parameters['open_regions'].default})")
    parser.add_argument("--shard-samples", type=float, default=1e9, metavar="N",
                        help="samples_per_epoch (capped at the store's positions) when timing "
                             "the first item of shards 0 and 63 of 64 (default: %(default)g)")
    parser.add_argument("--synthetic-labels", action="store_true",
                        help="give a store without labels synthetic 2D ink labels for the "
                        "labelled rows (default: a store's own labels; the synthetic store "
                        "has synthetic ones)")
    parser.add_argument("--converter", action="store_true",
                        help="benchmark converter.py on a synthetic 65x2048x3072 stack instead")
    parser.add_argument("--clean", action="store_true",
                        help=f"delete the cached synthetic data ({CACHE_PREFIX}* in the "
                        "temporary folder) and exit")
    return parser


def check_args(parser, args):
    """Refuse bad options with one line (exit status 2) before anything is built or measured.

    VesuviusStream itself judges the block, the epoch and its own options, on
    the store or, for the synthetic store not yet built, on an unwritten
    in-memory array of its shape (which costs nothing).
    """
    for name, value, least in (("--workers", args.workers, 0),
                               ("--batch-size", args.batch_size, 1),
                               ("--batches", args.batches, 1),
                               ("--naive-batches", args.naive_batches, 1),
                               ("--chunks", min(args.chunks), 1),
                               ("--shape", min(args.shape), 1),
                               ("--latency", args.latency or 0, 0)):
        if value < least:
            parser.error(f"{name} must be >= {least}, got {value}")
    if args.latency is not None and args.store and "://" in args.store:
        parser.error("--latency serves a local store; give a path, not a URL")
    store = args.store or zarr.create_array({}, shape=tuple(args.shape),
                                            chunks=tuple(args.chunks), dtype="uint16")
    try:
        VesuviusStream([store], *args.block, samples_per_epoch=args.batches * args.batch_size,
                       **stream_options(args))
    except (OSError, ImportError, TypeError, ValueError) as error:
        parser.error(str(error))


def cached_data():
    """[(path, bytes on disk)] of the synthetic data cached in the temporary folder."""
    found = []
    for path in sorted(glob.glob(os.path.join(tempfile.gettempdir(), CACHE_PREFIX + "*"))):
        files = [os.path.join(folder, name) for folder, _, names in os.walk(path)
                 for name in names]
        found.append((path, sum(os.path.getsize(f) for f in files)))
    return found


def print_cached_data():
    for path, size in cached_data():
        print(f"cached: {path} ({size / 1e6:.0f} MB)")
    print("(kept for later runs; `python benchmark.py --clean` deletes them)\n")


def clean():
    found = cached_data()
    for path, size in found:
        shutil.rmtree(path)
        print(f"deleted {path} ({size / 1e6:.0f} MB)")
    if not found:
        print(f"nothing cached in {tempfile.gettempdir()}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clean:
        return clean()
    if args.converter:
        synthetic_slices()
        print_cached_data()
        return benchmark_converter()

    check_args(parser, args)
    if args.zarrs:
        try:
            import zarrs  # noqa: F401
        except ImportError:
            parser.error("--zarrs needs the optional package zarrs (pip install zarrs)")
        # The environment reaches spawned workers, the config this process.
        os.environ["ZARR_CODEC_PIPELINE__PATH"] = "zarrs.ZarrsCodecPipeline"
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    path = args.store
    if path is None:
        path = synthetic_store(tuple(args.shape), tuple(args.chunks))
        print_cached_data()
    if args.latency is None:
        return benchmark_stream(path, args)
    path = os.path.abspath(path)
    with serve(os.path.dirname(path), args.latency / 1000) as root:
        print(f"serving {path} on {root} with {args.latency:g} ms per request")
        benchmark_stream(f"{root}/{os.path.basename(path)}", args)


def benchmark_stream(path, args):
    """The measurements of the module docstring, printed as a table."""
    array = open_volume(path)
    block = tuple(args.block)
    block_bytes = math.prod(block) * array.dtype.itemsize
    print(f"store {path}: shape {array.shape}, chunks {array.chunks}, {array.dtype}")
    print(f"block {block}, batch {args.batch_size}, workers {args.workers}, "
          f"torch {torch.__version__}, zarr {zarr.__version__}, {os.cpu_count()} cores; "
          f"each measurement in a process of its own\n")

    seconds, nbytes = in_fresh_process(measure_decode_limit, path)
    limit = nbytes / seconds / block_bytes
    print(f"decode limit   {limit:8.0f} blocks/s  {nbytes / seconds / 2**20:7.0f} MB/s "
          f"(whole store, one process, best of 3 passes: {seconds:.2f} s)")
    processes = max(args.workers, 1)
    seconds = min(measure_parallel_limit(path, array, processes) for _ in range(3))
    parallel = nbytes / seconds / block_bytes
    print(f"{processes}-process limit {parallel:8.0f} blocks/s  {nbytes / seconds / 2**20:7.0f} "
          f"MB/s (whole store, disjoint slabs, best of 3 passes: {seconds:.2f} s)")
    if parallel < limit:
        # N processes decode at least what one does, unless other work takes the cores.
        print(f"  below the one-process limit: other processes took the cores meanwhile "
              f"(a loaded machine); 'of N-proc' uses the one-process limit")
        parallel = limit

    naive = NaiveBlocks(path, block, args.naive_batches * args.batch_size)
    stream, batches = (VesuviusStream([path], *block, return_coords=True,
                                      samples_per_epoch=args.batches * args.batch_size,
                                      batch_size=size, **stream_options(args))
                       for size in (None, args.batch_size))
    loaders = [("naive", naive), ("VesuviusStream", stream),
               ("VesuviusStream batches", batches)]
    if importlib.util.find_spec("tensorstore"):
        loaders.insert(1, (TENSORSTORE, TensorstoreBlocks(path, block, naive.samples)))
    else:
        print(f"{TENSORSTORE} row skipped: pip install tensorstore gives it\n")
    rows = [(name, *in_fresh_process(loader_row, path, dataset, args))
            for name, dataset in loaders]
    breakdowns = {name: in_fresh_process(stream_breakdown, dataset, array.dtype, args)
                  for name, dataset in (("items", stream), ("batches", batches))}

    naive_rate = rows[0][1]
    width = max(len(row[0]) for row in rows) + 2
    print(f"{'':{width}}{'samples/s':>10}{'MB/s':>8}{'x naive':>9}{'of limit':>10}"
          f"{'of N-proc':>10}{'read amp':>10}{'tiles/batch':>13}{'1st batch':>11}  peak RSS")
    for name, rate, first_batch, decoded, tiles, rss in rows:
        decoded = breakdowns["items"]["decoded"] if decoded is None else decoded
        print(f"{name:{width}}{rate:10.0f}{rate * block_bytes / 2**20:8.0f}"
              f"{rate / naive_rate:9.1f}{rate / limit:10.2f}{rate / parallel:10.2f}"
              f"{decoded / block_bytes:10.2f}{tiles:13.1f}{first_batch:10.2f}s  {rss}")
    first_batch = {row[0]: row[2] for row in rows}
    if TENSORSTORE in first_batch:
        print(f"first batch: VesuviusStream {first_batch['VesuviusStream']:.2f} s, "
              f"{TENSORSTORE} {first_batch[TENSORSTORE]:.2f} s "
              f"({first_batch['VesuviusStream'] / first_batch[TENSORSTORE]:.2f}x)")
    print("(VesuviusStream's read amp: bytes its workers decoded in a second epoch, as "
          "counted by the stream)\n\nper sample, VesuviusStream, a second epoch (from the "
          "stream's counters, summed over workers: decode, the reader threads' seconds; "
          "cut, the cutting threads' CPU seconds; collate + transfer: wall, as many ready "
          "blocks through the same DataLoader):")
    for name, breakdown in breakdowns.items():
        print(f"  {name}: decode {breakdown['decode'] * 1e6:.0f} us, cut "
              f"{breakdown['cut'] * 1e6:.0f} us, collate + transfer "
              f"{breakdown['transfer'] * 1e6:.0f} us; cut + collate + transfer "
              f"{(breakdown['cut'] + breakdown['transfer']) * 1e6:.0f} us; wall "
              f"{breakdown['wall'] * 1e6:.0f} us; {breakdown['tiles']:.1f} distinct "
              f"{TILE}x{TILE} tiles per batch"
              + ("" if breakdown["reused"] is None else
                 f"; {breakdown['reused']:.0%} of the batches cut into reused buffers"))

    box_shape = [r + b - 1 for r, b in zip(stream._sources[0].lattice.region, block)]
    floor = in_fresh_process(copy_seconds, block, array.dtype, box_shape)
    print(f"  one block copied alone (one process, CPU): contiguous {floor[0] * 1e6:.0f} us, "
          f"from a box of {tuple(box_shape)} in the CPU's cache {floor[1] * 1e6:.0f} us, "
          f"from such boxes in RAM at random corners {floor[2] * 1e6:.0f} us")

    samples = min(int(args.shard_samples), stream.capacity)
    first, last = in_fresh_process(shard_starts, path, block, samples)
    print(f"\nfirst item of shard 0 / shard 63 of 64, samples_per_epoch={samples:.0e}: "
          f"{first:.2f} s / {last:.2f} s ({last / first:.2f}x)")
    fresh, resumed = in_fresh_process(resumed_starts, path, block, samples)
    print(f"first item of rank 2 of 3, fresh / resuming what 64 shards left "
          f"(merge_state_dicts): {fresh:.2f} s / {resumed:.2f} s ({resumed / fresh:.2f}x)")

    print(f"\ngrid inference, stride (d, h/2, w/2), a trivial model (mean over z, pooled to "
          f"the scale) in the main process, best of 2 runs each:")
    best = {}               # of two rounds, taken in turn: a busy moment hits one run
    for _ in range(2):
        for scale in (None, 4, 1):
            rate, rss = in_fresh_process(grid_row, path, args, scale)
            best[scale] = max(best.get(scale, (0, "")), (rate, rss))
    alone = best[None][0]
    print(f"  grid stream alone       {alone:8.0f} blocks/s, peak RSS {best[None][1]}")
    for scale in (4, 1):
        rate, rss = best[scale]
        print(f"  + writer, 2D, scale={scale}   {rate:8.0f} blocks/s (the writer takes "
              f"{1 - rate / alone:5.1%} of the rate), peak RSS {rss}")

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Group) and "labels" in node:
        source, labels = path, node["labels"]
        print(f"\nwith the store's own labels {labels.shape}:")
    elif args.store is None or args.synthetic_labels:
        labels = synthetic_ink(array.shape[1:])
        source = {"volume": array, "labels": labels}
        print(f"\nwith synthetic 2D ink labels on {np.count_nonzero(labels) / labels.size:.1%} "
              f"of the pixels, in {INK_AREAS} areas"
              + (" (--synthetic-labels)" if args.store else " (the synthetic store's)") + ":")
    else:
        print("\nlabelled rows skipped: the store has no labels (--synthetic-labels adds "
              "synthetic 2D ink labels)")
        source = None
    balanced = {}
    for fraction in (None, 0.5) if source is not None else ():
        rate, inked, built, rss = in_fresh_process(ink_row, source, labels,
                                                   {"positive_fraction": fraction}, args)
        balanced[fraction] = rate
        print(f"  positive_fraction={fraction!s:5} {rate:8.0f} samples/s "
              f"({rate / naive_rate:.1f}x naive), {inked:5.1%} of the "
              f"blocks with ink, built in {built:.2f} s, peak RSS {rss}")
    if balanced:
        print(f"  0.5 / None: {balanced[0.5] / balanced[None]:.2f}")

    # Sampling as the field samples: a threshold, an ignore value, weights, coarse masks.
    if not isinstance(source, dict):
        print("\nthreshold, ignore, weights rows skipped: they label synthetic ink labels "
              "(the synthetic store's, or --synthetic-labels)")
    else:
        ignored = (labels == 0) & (synthetic_ink(labels.shape, seed=1) > 0)
        field_labels = np.where(ignored, np.uint8(2), labels)
        print(f"\nthreshold, ignore, weights: two copies of the volume, the ink labels plus "
              f"{np.count_nonzero(ignored) / labels.size:.1%} of the pixels labelled 2, "
              f"positive_fraction=0.5, {args.batches * args.batch_size} samples:")
        field = {}
        for name, options in (("today's rule, 'uniform'", {}), ("threshold, ignore, weights",
                                                               FIELD_OPTIONS)):
            rate, _, built, rss = in_fresh_process(
                ink_row, {"volume": array, "labels": field_labels}, field_labels,
                {"positive_fraction": 0.5, **options}, args, 2)
            field[name] = rate, built
            print(f"  {name:27} {rate:8.0f} samples/s, counting pass (built in) {built:.2f} s, "
                  f"peak RSS {rss}")
        (today, today_built), (options, options_built) = field.values()
        print(f"  ({', '.join(f'{k}={v}' for k, v in FIELD_OPTIONS.items())}) / today's: "
              f"counting pass {options_built / today_built:.2f}x, streaming "
              f"{options / today:.2f}x")
    print(f"\nmask at 1/{MASK_FACTOR} resolution vs full, counting pass (a build with the "
          f"mask after one without, no labels: the pass reads the mask only; median of 3 "
          f"processes each):")
    wide = (array.shape[0], *(WIDER * size for size in array.shape[1:]))
    for ndim, shape in ((2, array.shape), (3, array.shape), (2, wide)):
        built = {factor: statistics.median(
                     in_fresh_process(mask_build_seconds, shape, array.chunks, array.dtype,
                                      ndim, factor, args) for _ in range(3))
                 for factor in (1, MASK_FACTOR)}
        print(f"  {ndim}D mask: full {built[1]:.3f} s, 1/{MASK_FACTOR} "
              f"{built[MASK_FACTOR]:.4f} s ({built[MASK_FACTOR] / built[1]:.4f}x; the coarse "
              f"mask has 1/{MASK_FACTOR**ndim} of the voxels)"
              + ("" if shape == array.shape else f", over a volume of {shape}"))

    rates = {sources: in_fresh_process(many_sources_rate, sources) for sources in (30, 300)}
    print(f"\nmany small sources (numpy {MANY_SHAPE}, blocks {MANY_BLOCK}, {MANY_ITEMS} items, "
          f"no workers): 30 sources {rates[30]:.0f} items/s, 300 sources {rates[300]:.0f} "
          f"items/s ({rates[300] / rates[30]:.2f}x)")


def grid_row(path, args, scale):
    """One grid epoch with a trivial model (in a fresh process): blocks/s and peak RSS,
    with ``VesuviusStream.writer`` writing a 2D map at ``scale`` (None: no writer)."""
    depth, height, width = args.block
    grid = VesuviusStream([path], *args.block, None, "grid", return_coords=True,
                          stride=(depth, height // 2, width // 2), **stream_options(args))
    loader = DataLoader(grid, batch_size=args.batch_size, num_workers=args.workers,
                        multiprocessing_context=start_method() if args.workers else None)
    cell = scale or 1                   # the model averages cell x cell pixels
    folder = tempfile.mkdtemp(prefix="vesuvius_benchmark_map_")
    try:
        with PeakRSS() as rss:
            start = time.perf_counter()
            with (grid.writer([os.path.join(folder, "map.zarr")], scale=scale) if scale
                  else contextlib.nullcontext()) as out:
                for blocks, *_, coords in loader:
                    # numpy, not torch: torch's OpenMP threads hang in a process forked
                    # from one that used them (the test suite's).
                    mean = blocks.numpy().mean(1, dtype=np.float32)          # (B, h, w)
                    prediction = mean.reshape(len(mean), height // cell, cell, width // cell,
                                              cell).mean((2, 4))        # (B, h/s, w/s)
                    if out is not None:
                        out.add(prediction, coords)
            seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(folder)
    return len(grid) / seconds, str(rss)


MANY_SHAPE, MANY_BLOCK, MANY_ITEMS = (4, 32, 32), (2, 8, 8), 3000


def many_sources_rate(sources):
    """Items/s of one epoch over ``sources`` small numpy volumes, in this process."""
    dataset = VesuviusStream([np.zeros(MANY_SHAPE, np.uint8)] * sources, *MANY_BLOCK,
                             samples_per_epoch=MANY_ITEMS)
    start = time.perf_counter()
    count = sum(1 for _ in dataset)
    return count / (time.perf_counter() - start)


def stream_options(args):
    """VesuviusStream's reading options given on the command line (else its defaults)."""
    options = {"samples_per_region": args.samples_per_region, "region_mb": args.region_mb,
               "open_regions": args.open_regions}
    return {name: value for name, value in options.items() if value is not None}


WIDER = 8           # the 2D mask also over a volume this much taller and wider (y, x)
FIELD_OPTIONS = {"min_positive_fraction": 0.1, "ignore_label": 2, "sampling_method": (3, 1)}
MASK_FACTOR = 8


def ink_row(source, labels, options, args, copies=1):
    """VesuviusStream over ``copies`` of ``source``, whose labels are ``labels`` (2D or
    3D), with ``options`` (in a fresh process): samples/s, the share of blocks with ink
    (a nonzero label), seconds to build it, peak RSS."""
    start = time.perf_counter()
    dataset = VesuviusStream([source] * copies, *args.block,
                             return_coords=True, **options,
                             samples_per_epoch=args.batches * args.batch_size,
                             **stream_options(args))
    built = time.perf_counter() - start
    seconds, _, samples, coords, rss = run_loader(dataset, args.batch_size, args.workers)
    depth, height, width = args.block
    inked = sum(bool(np.any(labels[(slice(z, z + depth), slice(y, y + height),
                                    slice(x, x + width))[3 - labels.ndim:]]))
                for batch in coords for _, z, y, x in batch.tolist())
    return samples / seconds, inked / samples, built, str(rss)


def mask_build_seconds(volume_shape, chunks, dtype, ndim, factor, args):
    """Seconds to build VesuviusStream with a mask (in a fresh process, after a build
    without it) over a volume of ``volume_shape`` (``chunks``, ``dtype``; unwritten:
    building reads the mask only), so the seconds of the mask's counting pass: a
    (y, x) or (z, y, x) papyrus disc (zero in the first layers), at 1/``factor`` of
    the volume's resolution, or at full resolution as that one repeated."""
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=volume_shape, chunks=chunks,
                              dtype=dtype)
    shape = volume_shape[3 - ndim:]
    coarse = [-(-size // MASK_FACTOR) for size in shape]
    mask = synthetic_ink(coarse[-2:], areas=1, fraction=0.6) > 0
    if ndim == 3:
        mask = np.broadcast_to(mask, coarse).copy()
        mask[:coarse[0] // 4] = 0
    if factor == 1:
        for axis in range(ndim):
            mask = np.repeat(mask, MASK_FACTOR, axis=axis)
        mask = mask[tuple(slice(0, size) for size in shape)]
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    # A build without the mask first: what every stream's first build pays (its shared
    # epoch counter, zarr's event loop) is not the mask's.
    VesuviusStream([array], *args.block, samples_per_epoch=1, **stream_options(args))
    start = time.perf_counter()
    VesuviusStream([{"volume": array, "mask": mask}], *args.block, samples_per_epoch=1,
                   **stream_options(args))
    return time.perf_counter() - start


def copy_seconds(block, dtype, box_shape, copies=2000, seed=0):
    """CPU seconds to copy one ``block`` of ``dtype`` into a batch's row (in this
    process): from a contiguous array of its shape, from random corners of one box
    of ``box_shape`` (the stream's: in the CPU's last-level cache with the rows, if
    that holds 16 MB), and from random corners of such boxes, 256 MiB in all (as two
    workers' open boxes are: in RAM)."""
    rng = np.random.default_rng(seed)
    rows = np.ones((32, *block), dtype)          # written: no page faults while timed
    many = max(1, 2**28 // (math.prod(box_shape) * rows.itemsize))

    def seconds(boxes, shape):
        corners = [(rng.integers(len(boxes)), *(rng.integers(s - b + 1)
                                                for s, b in zip(shape, block)))
                   for _ in range(copies)]
        start = time.thread_time()
        for i, (box, *corner) in enumerate(corners):
            rows[i % len(rows)] = boxes[box][tuple(slice(c, c + b)
                                                   for c, b in zip(corner, block))]
        return (time.thread_time() - start) / copies
    return (seconds([np.ones(block, dtype)], block),
            seconds([np.ones(box_shape, dtype)], box_shape),
            seconds([np.ones(box_shape, dtype) for _ in range(many)], box_shape))


def stream_breakdown(stream, dtype, args):
    """Per sample (in a fresh process): the workers' seconds decoding and cutting and
    bytes decoded in an epoch (the stream's counters), and the DataLoader's own cost of
    collating and passing as many ready blocks (or batches, for the batch form) (a dict)."""
    spent = torch.zeros(max(args.workers, 1), len(COUNTED), dtype=torch.float64).share_memory_()
    seconds, _, samples, coords, _ = run_loader(Counted(stream, spent), args.batch_size,
                                                args.workers)
    decode, cut, decoded, fresh, reused = spent.sum(0).tolist()
    torch_dtype = torch.from_numpy(np.zeros(0, dtype.newbyteorder("="))).dtype
    ready = ReadyBlocks(stream.block, torch_dtype, samples, stream.batch_size)
    transfer = run_loader(ready, args.batch_size, args.workers)[0] / samples
    return {"wall": seconds / samples, "decode": decode / samples, "cut": cut / samples,
            "decoded": decoded / samples, "transfer": transfer,
            "tiles": tiles_per_batch(coords, stream.block),
            "reused": reused / (fresh + reused) if fresh + reused else None}


INK_AREAS = 6


def synthetic_ink(shape, areas=INK_AREAS, fraction=0.05, seed=0):
    """2D ink labels (0/255) on about ``fraction`` of the plane, in a few discs."""
    radius = math.sqrt(fraction * math.prod(shape) / (areas * math.pi))
    centres = np.random.default_rng(seed).uniform(radius, np.subtract(shape, radius),
                                                  (areas, 2))
    y, x = np.ogrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.uint8)
    for cy, cx in centres:
        labels[(y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2] = 255
    return labels


if __name__ == "__main__":
    main()
