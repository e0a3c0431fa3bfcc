"""Stream 3D blocks from Zarr volumes into PyTorch: chunk-aware, exact, sharded.

One file, one class: copy ``streamer.py`` into your project (it needs torch,
zarr>=3 and numpy) and use :class:`VesuviusStream` as the dataset of a
``torch.utils.data.DataLoader``::

    from torch.utils.data import DataLoader
    from streamer import VesuviusStream

    ds = VesuviusStream(["segment.zarr"], z_size=26, y_size=64, x_size=64,
                        samples_per_epoch=100_000)
    loader = DataLoader(ds, batch_size=32, num_workers=2)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for blocks, labels in loader:   # (32, 26, 64, 64) uint16, (32, 64, 64) uint8
            ...

See the class docstring for the guarantees and every argument.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import dataclasses
import email.utils
import fractions
import functools
import heapq
import hashlib
import itertools
import json
import math
import mmap
import multiprocessing.reduction
import os
import pickle
import platform
import random
import shutil
import socket
import sys
import threading
import time
import typing
import warnings
import weakref

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6
# Independent random streams of an epoch, derived from its key.
_REGION_ORDER, _POSITION_ORDER, _ROUNDING = range(3)
# Extra key parts of the streams of positive and negative positions.
_KIND_KEYS = {None: (), True: (1,), False: (2,)}
_METHODS = ('uniform', 'proportional', 'grid')
# Remote stores: attempts per request, first backoff and longest wait (s). The backoff
# doubles from 0.2 s with jitter, capped at 30 s or what Retry-After asks: 81 s in all.
_ATTEMPTS, _FIRST_BACKOFF, _LONGEST_WAIT = 10, 0.2, 30.0
# Seconds an HTTP(S) attempt may take (aiohttp.ClientTimeout's fields): in all, to
# connect, and between two reads of the answer (a server that accepts and never answers).
# So one request waits at most 10 x 60 s + 81 s = 681 s (870 s if every Retry-After asks
# 30 s), and one to a server that accepts and never answers 10 x 20 s + 81 s = 281 s.
_HTTP_TIMEOUT = {'total': 60, 'sock_connect': 10, 'sock_read': 20}
# What fsspec's info dates a remote file by (HTTP headers; S3's names).
_VERSION_KEYS = ('ETag', 'Last-Modified', 'LastModified')
# What fsspec needs, per URL scheme, beyond fsspec itself.
_URL_PACKAGES = {'http': 'aiohttp', 'https': 'aiohttp', 's3': 's3fs', 'gs': 'gcsfs',
                 'gcs': 'gcsfs'}
_METADATA_KEYS = ('zarr.json', '.zarray', '.zgroup', '.zattrs', '.zmetadata')
# First batch soon (see _Reader): in its first group a worker reads up to _FIRST_BLOCKS
# blocks (a typical batch) alone, straight from the store, before it decodes their
# boxes; not those of a box of at most _SMALL_BOX bytes, which decodes in milliseconds.
# What it gives (benchmark's store, batches of 32, 2 workers, 3 runs alternating, loaded
# machine): the first batch in 0.78 s (0.60-1.01) instead of 1.48 s (1.22-1.51); what it
# costs: those reads decode whole chunks for one block each, a few tenths of a second
# of a worker's first epoch.
_FIRST_BLOCKS, _SMALL_BOX = 32, 4 * 2**20
# A process forked from this one inherits it; a spawned one imports this module anew.
_IMPORTED_BY = os.getpid()
# glibc malloc in a DataLoader worker (see _keep_freed_memory): buffers of up to
# _MMAP_THRESHOLD come from the heap, and up to _TRIM_THRESHOLD of freed memory stays.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3           # mallopt's parameter numbers
_TRIM_THRESHOLD, _MMAP_THRESHOLD = 64 * 2**20, 32 * 2**20
_MALLOC_TUNED = set()                                  # pids where it was done
# The plan keeps a few numbers per region (counts, rates, a round's order): a volume whose
# regions would take more than _PLAN_BYTES is refused, asking for larger regions.
_PLAN_BYTES_PER_REGION, _PLAN_BYTES = 160, 2**30
# Counting a coarse mask holds 10-15 bytes per cell of its band at its peak (measured:
# the band, the bool hit arrays of every class combination, a float32 copy to contract):
# its bands are region_mb / _COARSE_COPIES cells, so that the pass stays within region_mb.
_COARSE_COPIES = 32
# The prediction writer (see _Writer): chunks of the outputs it makes (float32; 256 KiB
# or 1 MiB), and the bytes of open tiles' sums it holds in RAM before spilling to disk.
_TILE_2D, _TILE_3D = (256, 256), (64, 64, 64)
_FRONT_BYTES = 256 * 2**20


class VesuviusStream(IterableDataset):
    """Random (or raster, or grid) 3D blocks, with labels, from 3D volumes.

    An item is a tensor ``block`` of shape ``(z_size, y_size, x_size)`` in the
    source's own dtype (uint8 -> ``torch.uint8``, uint16 -> ``torch.uint16``),
    so that workers pass no more bytes than the data has; big-endian data
    (``>u2``) comes in native byte order. torch supports few
    operations on uint16 (conversion, indexing, stacking, not ``flip`` or
    ``max``): convert before computing, e.g. ``x.float() / 65535``, or
    ``x.to(torch.int32)`` (lossless) in a ``transform``. When the
    sources have labels an item is ``(block, label)``. With
    ``return_coords=True`` the item is a tuple whose last element is an int64
    tensor ``(file_index, z, y, x)``: the block's start corner in that volume's
    own index space, whose shape is ``ds.shapes[file_index]``. With
    ``batch_size=B`` it yields whole batches instead, for ``DataLoader(ds,
    batch_size=None)``: the batch a DataLoader with ``batch_size=B`` would
    collate from the items, made by cutting each block straight into it (see
    Args).

    Guarantees:

    * A *position* is a start corner at which the block fits inside the volume
      (inside ``z_range``, and touching the mask by the rule below). An epoch
      yields exactly ``samples_per_epoch`` items in total over all DataLoader
      workers and all DDP ranks, never the same position twice.
    * An epoch is one sequence, fixed by (sources, block size,
      samples_per_epoch, sampling_method, shuffle, seed, epoch) and the
      reading options (``region_mb``, ``open_regions``, ``samples_per_region``).
      Workers and ranks take disjoint, contiguous shares of it whose sizes
      differ by at most one: the epoch's positions are the same for any
      number of workers or ranks (and so is their order in raster and grid
      modes; random epochs mix each share's visits in turn). ``len(ds)`` is
      this rank's share (as ``DistributedSampler.__len__``), so that
      ``len(loader)`` counts the batches this rank yields; with
      ``batch_size=B``, ``ceil(share / B)``, its batches (each worker's last
      batch may be smaller, so with W workers a rank yields up to W - 1
      batches more, as a DataLoader batching the items does).
    * ``set_epoch(e)`` selects another epoch; the same ``(seed, e)`` always
      gives the same epoch. It reaches persistent DataLoader workers too.
    * Every position of a volume has the same chance to be in an epoch
      (with ``positive_fraction``: every position of its kind).
    * Memory and start-up time do not grow with the number of positions: the
      epoch is drawn with keyed bijections (Feistel networks), never from an
      index array, and any shard finds its share by arithmetic on visit
      lengths, so the last of 64 shards starts as soon as the first. The plan
      keeps a few numbers per region (about 100 bytes); decoded data is
      bounded per worker by ``region_mb`` (plus zarr's buffers for the chunks
      being decoded).
    * Resuming: ``state_dict()``/``load_state_dict()`` let torchdata's
      ``StatefulDataLoader`` continue an interrupted epoch exactly, batch for
      batch; with a plain DataLoader, ``set_epoch(e, skip_batches=B,
      batch_size=S)`` does the same after B batches (same ``num_workers``).
      With the dataset's ``batch_size`` a DataLoader batch is one of its
      batches, and both ways work alike. On another number of ranks or
      workers, ``merge_state_dicts`` of every rank's state, then
      ``load_state_dict`` of the result, yields exactly what the old shards
      had not handed to the training loop, each position once, in
      contiguous shares at most one apart.
      A state saved through JSON is accepted; one edited, or saved over
      other data (the mask's or labels' counts per region differ), is
      refused. Random augmentations in ``transform`` are not replayed.

    How it reads: the positions of each volume are partitioned into *regions*
    aligned to its chunk grid, each small enough that ``open_regions`` of them
    (plus the block's halo) fit in ``region_mb``, and shaped to waste little
    of the chunks they decode. An epoch visits regions in rounds, each round
    in a random order of its own; a visit takes the region's next
    ``samples_per_region`` positions (proportionally fewer for a smaller
    region, or one with less of the mask) from the region's own random
    permutation of its positions. The visits of all sources are merged into
    one sequence, and a worker takes those of its share ``open_regions`` at a
    time and yields their blocks in turn, so that consecutive items come from
    different places. A background thread per worker decodes each box once
    (a region's, shared by every visit of it in this group and the next), in
    the order they are first needed, and the next group's boxes while this
    one's are cut, within ``region_mb``; a worker's first few blocks are read
    alone, straight from the store, so that the first batch does not wait for
    the first group's boxes. Positions of one epoch are therefore clustered by
    region, which is what makes reading fast: lower ``samples_per_region`` for
    more spread, at more decoding per sample. A block is copied once from its
    decoded box: into an item (which collate then copies into a batch), or,
    with ``batch_size``, straight into its row of the batch.

    Sources and their layout: a source is a path or URL (str or
    ``os.PathLike``) to a Zarr array (format 2 or 3), or to a Zarr group with
    the arrays ``volume`` (z, y, x) and optionally ``labels`` and ``mask``
    (each (y, x) or (z, y, x)), which is what ``converter.py`` writes; an
    opened ``zarr.Array`` or ``zarr.Group``; a 3D ``numpy.ndarray``; or a dict
    ``{'volume': a, 'labels': b, 'mask': c}`` of numpy or zarr arrays, or of
    paths and URLs to Zarr arrays, opened as a list's sources are (with the
    same retries, cache and errors), e.g. ``{'volume': 'scroll.zarr/0',
    'mask': 'scroll.zarr/3'}`` (other keys are refused). Either all sources
    have labels or none, and all volumes (and all labels) have one dtype. The
    label of a block at (z, y, x) is ``labels[y:y+h, x:x+w]`` for 2D labels and
    ``labels[z:z+d, y:y+h, x:x+w]`` for 3D ones, in the labels' own dtype. The
    mask is nonzero where papyrus is; it may be coarser than the volume by an
    integer factor f per axis (ceil(size / f) voxels along it), e.g. a coarse
    level of the scroll's own pyramid, which is zero outside the scroll: a
    position is then judged as if each mask voxel were repeated f times along
    each axis (cropped to the volume), and only the coarse array is read. f
    comes from the OME-Zarr ``scale`` transforms when volume and mask are
    levels of one multiscale group given by path, else it is the smallest
    integer f that gives the mask's size. An OME-Zarr multiscale group (one
    with ``multiscales`` metadata) stands for its full-resolution level; a
    path to one level (``scroll.zarr/2``) reads that level.

    Read failures: a chunk that cannot be decoded (corrupt, truncated) raises
    ``OSError`` naming the source, the voxels being read and the chunk's key,
    with the decoder's error as its cause. A local store that vanishes
    (deleted, unmounted) raises ``FileNotFoundError`` at the next read, and
    one replaced or made again (another folder at its path) or whose array
    metadata was written (shape, dtype, chunks, codecs, even attributes)
    raises ``OSError`` saying what changed; a chunk missing from a store that
    is still there reads as the array's fill value, as Zarr defines. Chunks
    rewritten in place, the array folder's entries left as they were, are not
    detected. The same holds for the mask and labels read when the
    dataset is built. Volumes, labels and masks must hold bool, integer or
    float data (``TypeError`` otherwise).

    Remote sources: ``http(s)://``, ``s3://`` and other fsspec URLs are read
    through zarr's fsspec store (install ``fsspec aiohttp``, plus ``s3fs`` for
    S3); each DataLoader worker opens its own connections. Every request has a
    bounded wait: transient failures (HTTP 429 and 5xx, dropped connections,
    timeouts) are retried with exponential backoff, honouring Retry-After, and
    then raise ``OSError`` naming the URL; one request fails after about 11
    minutes at worst (HTTP attempts time out after 60 s; pass your own
    ``aiohttp.ClientTimeout`` as ``storage_options={'client_kwargs':
    {'timeout': ...}}`` for another bound). 401 and 403 raise
    ``PermissionError`` at once, a URL without Zarr metadata
    ``FileNotFoundError``, and a host that never answered (unknown name,
    refused connection) ``ConnectionError`` when the dataset is built.
    Versions: at the start of every iteration, in each worker, each remote
    array's metadata and ETag / Last-Modified are fetched again (one round
    trip); if the store no longer holds the version the dataset was built on,
    the iteration raises ``OSError`` naming the source, the URL and what
    changed: build the dataset again. A store replaced during an epoch is
    noticed at the next iteration. Ending an iteration (``break``, an error,
    Ctrl-C) cancels its remote requests in flight, so that it ends at once
    even while the server does not answer.

    Args:
        file_paths (list): the sources (see above).
        z_size, y_size, x_size (int): the block shape.
        samples_per_epoch (int or None): items per epoch in total over all
            workers and ranks, at most the number of positions. ``None`` in
            ``'grid'`` mode (every grid position), and only there.
        sampling_method (str or sequence): ``'uniform'`` (default): each
            sample picks a source uniformly at random (among those with
            positions left), then a position in it. ``'proportional'``:
            sources are picked with probability proportional to their number
            of positions, i.e. one permutation over the positions of all
            sources. ``'grid'``: every block of a regular grid with steps
            ``stride``, the last block along each axis shifted back to end at
            the border, so that every voxel (within ``z_range``) is covered;
            positions off the mask are skipped; region by region (z
            innermost, then along the shorter of y and x), for inference:
            see ``writer``. Or a
            sequence of weights, numbers >= 0, one per source: each source
            gives exactly its weight's share of ``samples_per_epoch`` in
            every epoch (``floor(n * w / sum(w))``, the samples left over one
            each to the largest fractional parts, ties to the lower source;
            so ``(3, 1)`` of 401 gives 301 and 100, ``(1, 1)`` 201 and 200), a
            weight of 0 none; a source asked for more positions than it has
            is refused when the dataset is built, with its counts.
        shuffle (bool): ``True`` (default) draws random positions. ``False``
            yields positions in raster order (z, then y, then x) within each
            source, sources in order, each source's share fixed by
            ``sampling_method`` (equal, proportional or weighted). Ignored by
            ``'grid'``.
            Meant for inspection: with a mask, each shard counts the mask's
            positions before its share once (the one plan that reads data).
        seed (int): the seed of every random choice, any int (seeds equal
            modulo 2**64 give the same epochs). Default 0.
        return_coords (bool): append the block's ``(file_index, z, y, x)``.
        z_range (tuple, optional): ``(start, end)``: draw blocks from layers
            [start, end) only, e.g. ``z_range=(17, 43), z_size=26`` for the 26
            central layers of a 65-layer segment. Coordinates stay those of the
            whole volume. Default: all layers.
        stride (tuple, optional): ``(sz, sy, sx)`` grid steps of ``'grid'``.
            Default: the block size (tiles that do not overlap). A stride
            larger than the block along an axis is refused (it would skip voxels).
        min_mask_fraction (float): a position is drawn only if at least this
            fraction of its block's footprint is inside the mask (the (y, x)
            footprint for a 2D mask, the whole block for a 3D one; voxels of
            the volume's resolution, for a coarse mask too), and always at
            least one voxel: the default 0 means the block touches papyrus, 1
            means it lies wholly on it.
        positive_fraction (float, optional): with labels, in random epochs:
            exactly ``round(f * samples_per_epoch)`` items of each epoch are
            *positive* (enough positive labels in the block's label
            footprint: see ``min_positive_fraction``), the rest negative, each
            kind drawn as a dataset of its own (sources chosen by
            ``sampling_method``, weights applying within each kind). Default
            None: labels play no part.
        min_positive_fraction (float): with ``positive_fraction``: a position
            is positive when at least ``max(1, ceil(f * footprint))`` voxels of
            its label footprint (``h * w`` for 2D labels, ``d * h * w`` for 3D)
            are positive, e.g. 0.01 as villa's 3D ink training. Default 0: at
            least one.
        ignore_label (int, optional): with ``positive_fraction``: label voxels
            of this value are not positive (a voxel is positive when nonzero
            and not ``ignore_label``), e.g. 2 for surface labels (0
            background, 1 surface, 2 ignore). Items' labels still come as
            stored. Default None.
        transform (callable, optional): applied to each item in the worker
            before coordinates are appended: ``transform(block)`` returns a
            block, or ``transform(block, label)`` a ``(block, label)`` pair
            (``None`` raises TypeError). With ``batch_size`` it is applied to
            each whole batch instead, ``(B, z, y, x)`` blocks and ``(B, ...)``
            labels, once per batch (write it for batches: a random choice
            made once applies to the whole batch).
        rank, world_size (int, optional): this process's DDP rank and the
            number of ranks. Default: read from ``torch.distributed`` when it
            is initialized (when this dataset is built), else 0 and 1.
        samples_per_region (int, optional): positions taken per visit of a
            whole region. Default: four times the voxels of the region's box
            (region plus halo) divided by the block's voxels.
        region_mb (float): decoded data per worker, in MiB. Regions are sized
            so that ``open_regions`` boxes fill it; the boxes being cut and
            those decoded ahead (volume and labels) count in this one budget:
            the next group's boxes are decoded as this group's are let go, or
            beside them while they fit. Default 128 (boxes of 8 MiB with
            ``open_regions=16``); more gives larger regions, so less decoding
            per sample, for more memory. Numpy sources are sliced as views and
            take none of it. Building the dataset reads the mask and labels in
            bands of at most this much too (whole layers, rows or runs of
            regions; a coarse mask's of 1/32 of it, see _COARSE_COPIES). With
            128**3 blocks on a whole scroll give 512 or more: the halo of such
            a block leaves room for regions of 64**3 positions only, millions
            of them, and the plan keeps about 160 bytes per region.
        open_regions (int): regions a worker interleaves: a batch of B
            consecutive items of a worker holds about B / open_regions blocks
            of each. Default 16 (a batch of 32 from 16 places).
        storage_options (dict, optional): fsspec options for URL sources, e.g.
            ``{'anon': True}`` for a public S3 bucket, or
            ``{'client_kwargs': {'headers': {...}}}`` for HTTP;
            ``{'client_kwargs': {'timeout': aiohttp.ClientTimeout(...)}}``
            replaces the HTTP timeout of each attempt (see Remote sources).
        cache_dir (str, optional): a local folder keeping every chunk fetched
            from URL sources (shared by workers, kept across runs, never
            evicted: delete it yourself). A cached chunk serves only the
            version of its array it came from (chunks are kept per digest of
            the URL, the array's path, its metadata document and the server's
            ETag / Last-Modified), so a store converted again is fetched anew;
            a server that dates nothing gets a warning, since its versions are
            then told apart by their metadata alone. Chunks read in parts
            (sharded stores) are not cached. A failed cache write (disk full)
            warns once and ends caching in that process; the read goes on.
        batch_size (int, optional): yield whole batches of this many items
            (each worker's last one may be smaller), for ``DataLoader(ds,
            batch_size=None, num_workers=...)``: a list in the DataLoader's
            batch layout (``[blocks, labels, coords]`` with what the items
            hold; the blocks alone as a tensor), the same batches a DataLoader
            with ``batch_size`` collates from the items, item for item. Each
            block is cut straight into its batch, in shared memory in a
            DataLoader worker, so that its bytes are copied once on their way
            to the training loop; without a ``transform``, a worker reuses
            that memory (up to 6 batches' worth) once nothing refers to a
            batch it held any more, in either process, which saves more than
            the copy: keeping a batch's blocks or labels (not only its coords)
            keeps its memory, and a loop that keeps many batches gets fresh
            memory for the next ones. A batch stays as it was however long it
            is kept (a process forked meanwhile gets its own copy). The fast
            form. Default None: items.

    Example::

        def augment(block, label):              # runs in the DataLoader workers
            block = block.float() / 65535       # uint16 has few torch ops
            if torch.rand(()) < 0.5:
                block, label = block.flip(-1), label.flip(-1)
            return block, label

        ds = VesuviusStream(["a.zarr", "b.zarr"], 26, 64, 64, samples_per_epoch=50_000,
                            z_range=(17, 43), transform=augment, return_coords=True)
        loader = DataLoader(ds, batch_size=32, num_workers=2)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for blocks, labels, coords in loader:   # coords: (32, 4) int64
                ...                                 # blocks: float32 in [0, 1]

        # Inference: every block of a grid, predictions blended into a Zarr map.
        grid = VesuviusStream(["a.zarr"], 26, 64, 64, None, 'grid',
                              z_range=(17, 43), stride=(26, 32, 32), return_coords=True)
        with grid.writer(["a_ink.zarr"], scale=4) as out:
            for blocks, coords in DataLoader(grid, batch_size=64, num_workers=2):
                out.add(model(blocks), coords)          # (64, 16, 16)

        # Resume an interrupted epoch (pip install torchdata).
        from torchdata.stateful_dataloader import StatefulDataLoader
        loader = StatefulDataLoader(ds, batch_size=32, num_workers=2)
        ...                                         # save loader.state_dict() with the model
        loader.load_state_dict(saved)               # in the new process
        ds.set_epoch(saved_epoch)
        for blocks, labels, coords in loader:       # the rest of that epoch
            ...

        # On other GPUs or workers: every rank's loader.state_dict(), merged.
        merged = VesuviusStream.merge_state_dicts(states)   # e.g. all_gather_object
        ds.load_state_dict(merged)                  # any rank, world_size, num_workers
        loader = DataLoader(ds, batch_size=32, num_workers=6)

    .. warning::
        Call ``set_epoch(epoch)`` before each epoch, as with
        ``DistributedSampler``; otherwise every epoch repeats the same
        positions.
    """

    def __init__(self, file_paths, z_size, y_size, x_size, samples_per_epoch,
                 sampling_method='uniform', shuffle=True, seed=0,
                 return_coords=False, *, z_range=None, stride=None,
                 min_mask_fraction=0.0, positive_fraction=None, min_positive_fraction=0.0,
                 ignore_label=None, transform=None, rank=None, world_size=None,
                 samples_per_region=None, region_mb=128, open_regions=16,
                 storage_options=None, cache_dir=None, batch_size=None):
        super().__init__()
        if isinstance(file_paths, (str, os.PathLike, dict, np.ndarray, zarr.Array, zarr.Group)):
            raise TypeError(
                f"file_paths must be a list of sources, got a single "
                f"{type(file_paths).__name__}; wrap it in a list: [source]")
        file_paths = list(file_paths)
        if not file_paths:
            raise ValueError("file_paths is empty: give at least one Zarr path, "
                             "zarr.Array or 3D numpy array")
        block = tuple(_positive_int(name, value) for name, value in
                      (('z_size', z_size), ('y_size', y_size), ('x_size', x_size)))
        if not isinstance(sampling_method, str):
            sampling_method = _weights(sampling_method, len(file_paths))
        elif sampling_method not in _METHODS:
            raise ValueError(f"sampling_method must be one of {', '.join(map(repr, _METHODS))}, "
                             f"or one weight per source, got {sampling_method!r}")
        grid = sampling_method == 'grid'
        if stride is not None:
            if not grid:
                raise ValueError("stride applies to sampling_method='grid' only")
            if not (isinstance(stride, (tuple, list)) and len(stride) == 3):
                raise TypeError(f"stride must be a tuple (sz, sy, sx), got {stride!r}")
            stride = tuple(_positive_int('stride', s) for s in stride)
            if any(s > b for s, b in zip(stride, block)):
                # Blocks further apart than their size leave voxels between them.
                raise ValueError(f"stride {stride} is larger than the block {block} along an "
                                 f"axis: 'grid' covers every voxel only with a stride <= the "
                                 f"block")
        if z_range is not None:
            if not (isinstance(z_range, (tuple, list)) and len(z_range) == 2
                    and all(map(_is_int, z_range))):
                raise TypeError(f"z_range must be a tuple (start, end) of ints, got {z_range!r}")
            z_range = tuple(map(int, z_range))
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        seed = int(seed)
        if not (_is_number(min_mask_fraction) and 0 <= min_mask_fraction <= 1):
            raise ValueError(f"min_mask_fraction must be a number in [0, 1], "
                             f"got {min_mask_fraction!r}")
        min_mask_fraction = float(min_mask_fraction)
        if not (_is_number(min_positive_fraction) and 0 <= min_positive_fraction <= 1):
            raise ValueError(f"min_positive_fraction must be a number in [0, 1], "
                             f"got {min_positive_fraction!r}")
        min_positive_fraction = float(min_positive_fraction)
        if ignore_label is not None and not _is_int(ignore_label):
            raise TypeError(f"ignore_label must be an int or None, got {ignore_label!r}")
        ignore_label = None if ignore_label is None else int(ignore_label)
        if positive_fraction is None and (min_positive_fraction or ignore_label is not None):
            raise ValueError(f"min_positive_fraction={min_positive_fraction} and ignore_label="
                             f"{ignore_label!r} say which positions are positive, which only "
                             f"positive_fraction uses: give positive_fraction too")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if batch_size is not None:
            batch_size = _positive_int('batch_size', batch_size)
        if samples_per_region is not None:
            samples_per_region = _positive_int('samples_per_region', samples_per_region)
        open_regions = _positive_int('open_regions', open_regions)
        if not (_is_number(region_mb) and region_mb > 0):
            raise ValueError(f"region_mb must be a positive number, got {region_mb!r}")
        region_mb = float(region_mb)
        self.rank, self.world_size = _resolve_ranks(rank, world_size)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict of fsspec options, "
                            f"got {type(storage_options).__name__}")
        remote = {'storage_options': storage_options,
                  'cache_dir': None if cache_dir is None else os.fspath(cache_dir)}

        region_bytes = region_mb * 2**20 / open_regions
        # Lattice steps: the grid's stride (tiles by default), else every voxel.
        step = (stride or block) if grid else (1, 1, 1)
        self._sources = [
            _Source(_open_source(source, index, **remote), index, _describe(source), block,
                    z_range, step, region_bytes, region_mb * 2**20, samples_per_region,
                    min_mask_fraction, min_positive_fraction, ignore_label)
            for index, source in enumerate(file_paths)]
        if len({source.labels is None for source in self._sources}) > 1:
            raise ValueError("either all sources have labels or none: "
                             + ", ".join(f"source {s.index}: "
                                         f"{'labels' if s.labels is not None else 'none'}"
                                         for s in self._sources))
        for name in ('volume', 'labels'):
            # One dtype per batch: collate would fail, or cast silently. Byte
            # order does not count: items are in native order.
            dtypes = [getattr(s, name).dtype.newbyteorder('=') for s in self._sources
                      if getattr(s, name) is not None]
            if len(set(dtypes)) > 1:
                raise ValueError(f"all sources' {name} must have one dtype: " + ", ".join(
                    f"source {s.index}: {getattr(s, name).dtype}" for s in self._sources))
        self.capacity = sum(source.selection.positions for source in self._sources)
        if self.capacity == 0:
            raise ValueError("the sources have no position: the mask has no block "
                             "with enough papyrus (see min_mask_fraction)")
        if grid:
            if samples_per_epoch is not None:
                raise ValueError("sampling_method='grid' yields every grid position: "
                                 f"pass samples_per_epoch=None, not {samples_per_epoch!r}")
            samples_per_epoch = self.capacity
        elif samples_per_epoch is None:
            raise ValueError("samples_per_epoch=None is for sampling_method='grid'; "
                             "give the number of samples per epoch")
        self.samples_per_epoch = _positive_int('samples_per_epoch', samples_per_epoch)
        if self.samples_per_epoch > self.capacity:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} exceeds the "
                             f"{self.capacity} positions of the sources for block {block}")
        self.block = block
        self.sampling_method = sampling_method
        self.shuffle = bool(shuffle) and not grid
        self.positive_fraction, self._positives = self._positive_split(positive_fraction)
        self._check_weights()
        # The positions the mask and labels select fix the epoch's order: a state saved
        # over another selection (a mask moved, labels edited) would resume another one.
        self._selection = hashlib.sha256(b''.join(
            s.selection.digest for s in self._sources)).hexdigest()[:16]
        self.seed = seed
        self.return_coords = bool(return_coords)
        self.transform = transform
        self.batch_size = batch_size
        self.open_regions = open_regions
        self._region_mb = region_mb
        self._z_range, self._step = z_range, step
        self._min_mask_fraction = min_mask_fraction
        self._min_positive_fraction, self._ignore_label = min_positive_fraction, ignore_label
        # (epoch, skip_batches, batch_size) in shared memory, so that
        # set_epoch reaches persistent DataLoader workers.
        self._epoch = torch.zeros(3, dtype=torch.int64).share_memory_()
        self._resume = None                   # a loaded shard state, for the next iteration
        self._left = None                     # (epoch, part) of a loaded merged state
        self._place = _Place()                # where the running iteration is
        self._writing = None                  # a resuming writer's tilings (see writer)

    def _positive_split(self, fraction):
        """``(fraction, positive items per epoch)``, or (None, None): every source's
        kinds counted, and the epoch's checked to be there."""
        if fraction is None:
            return None, None
        if not (_is_number(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"positive_fraction must be a number in [0, 1], got {fraction!r}")
        if self._sources[0].labels is None:
            raise ValueError("positive_fraction needs labels: give sources with 'labels' (a "
                             "positive block has positive labels in its footprint)")
        if not self.shuffle:
            raise ValueError("positive_fraction applies to random epochs: not to 'grid' or "
                             "shuffle=False")
        ignore, dtype = self._sources[0].selection.ignore_label, self._sources[0].labels.dtype
        if ignore is not None and dtype.kind in 'iu' and not (
                np.iinfo(dtype).min <= ignore <= np.iinfo(dtype).max):
            raise ValueError(f"ignore_label={ignore} cannot occur in labels of dtype {dtype}: "
                             f"give the value your labels use for 'ignore'")
        positives = [int(source.selection.count_positives().sum())
                     for source in self._sources]
        wanted_positives = math.floor(fraction * self.samples_per_epoch + 0.5)  # .5 rounds up
        wanted = {'positive': (wanted_positives, positives),
                  'negative': (self.samples_per_epoch - wanted_positives,
                               [s.selection.positions - p
                                for s, p in zip(self._sources, positives)])}
        for kind, (count, available) in wanted.items():
            if count > sum(available):
                raise ValueError(
                    f"positive_fraction={fraction} asks for {count} {kind} positions per "
                    f"epoch, but the sources have {sum(available)} (" + ", ".join(
                        f"source {i}: {p} positive, {s.selection.positions - p} negative"
                        for i, (s, p) in enumerate(zip(self._sources, positives))) + ")")
        return float(fraction), wanted_positives

    @property
    def shapes(self):
        """Each source's volume shape ``(z, y, x)``, in the order of ``file_paths``: the
        index space of its ``coords``, whatever the source was (path, array, group)."""
        return [source.shape for source in self._sources]

    def _check_weights(self):
        """Refuse per-source weights that ask a source for more positions (of a kind) than
        it has: their counts are fixed (see _weighted_shares)."""
        if isinstance(self.sampling_method, str):
            return
        sources = self._sources
        if self.positive_fraction is None:
            kinds = {'': (self.samples_per_epoch, [s.selection.positions for s in sources])}
        else:
            positives = [int(s.selection.count_positives().sum()) for s in sources]
            negatives = [s.selection.positions - p for s, p in zip(sources, positives)]
            kinds = {'positive ': (self._positives, positives),
                     'negative ': (self.samples_per_epoch - self._positives, negatives)}
        for kind, (total, available) in kinds.items():
            counts = _weighted_shares(total, self.sampling_method)
            for source, count, have in zip(sources, counts, available):
                if count > have:
                    raise ValueError(
                        f"sampling_method weights {list(self.sampling_method)} give source "
                        f"{source.index} ({source.name}) {count} of the {total} {kind}"
                        f"positions per epoch, but it has {have}: lower its weight or "
                        f"samples_per_epoch")

    def __len__(self):
        """Items this rank yields per epoch (``samples_per_epoch`` over all ranks); after
        ``load_state_dict`` of a merged state, its share of what is left of that epoch.
        With ``batch_size``, its batches: ``ceil(items / batch_size)``."""
        part = self._part(int(self._epoch[0]))
        first, stop = _shard_bounds(_length(part, self.samples_per_epoch), self.world_size,
                                    self.rank)
        return stop - first if self.batch_size is None else -(-(stop - first) // self.batch_size)

    def set_epoch(self, epoch, skip_batches=0, batch_size=None):
        """Select the epoch whose positions the next iterations yield.

        ``skip_batches=B, batch_size=S`` resumes that epoch with a plain
        ``DataLoader`` after its first B batches of S items, for the same
        number of workers (and ranks): each worker skips what it delivered in
        those batches. With the dataset's own ``batch_size`` a batch is one of
        its batches and ``batch_size`` may be left out. Until the next
        ``set_epoch``, every iteration skips them. (``torchdata``'s
        ``StatefulDataLoader`` needs none of this: it saves and restores the
        position through ``state_dict``.) Selecting another epoch than a loaded
        merged state's drops that state.
        """
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not _is_int(skip_batches) or skip_batches < 0:
            raise ValueError(f"skip_batches must be an int >= 0, got {skip_batches!r}")
        if self.batch_size is not None:
            if batch_size not in (None, self.batch_size):
                raise ValueError(f"this dataset yields batches of batch_size={self.batch_size}"
                                 f": skip_batches counts those, got batch_size={batch_size!r}")
            batch_size = self.batch_size
        if skip_batches and batch_size is None:
            raise ValueError("skip_batches needs the DataLoader's batch_size")
        batch_size = 0 if batch_size is None else _positive_int('batch_size', batch_size)
        self._epoch[:] = torch.tensor((int(epoch), int(skip_batches), batch_size))
        if self._left is not None and self._left[0] != epoch:
            self._left = None

    def state_dict(self):
        """Where this worker is in its epoch, for ``StatefulDataLoader`` (torchdata).

        A dict of plain values: the epoch, this shard, the items it yielded,
        the part of the epoch its shards split (None: all of it; else what a
        merged state had left) and the configuration it belongs to.
        """
        place = self._place
        if place.shard is None and self._left is not None:   # not begun, a merged state loaded
            place = _Place(epoch=self._left[0], part=self._left[1])
        return {**dataclasses.asdict(place), 'config': self._config()}

    @staticmethod
    def merge_state_dicts(states):
        """One state of an interrupted epoch, from the states of all its shards.

        ``states``: one per rank, as the user has them: each rank's
        ``StatefulDataLoader.state_dict()`` (torchdata; it holds the state of
        each of its workers, or the dataset's with ``num_workers=0``) or its
        ``VesuviusStream.state_dict()`` (``num_workers=0``). Returns a dict of
        plain values (JSON-able): the epoch, the configuration (without rank
        and world size) and the part of the epoch not yet delivered, for
        ``load_state_dict`` of a dataset with any rank, world size and
        ``num_workers``. Delivered means handed to the training loop: batches
        a DataLoader had prefetched and not handed out are not. Raises
        ValueError, naming the states, for states of different epochs or
        configurations, a missing shard or one given twice, and a torchdata
        state saved between two of its snapshots (``snapshot_every_n_steps``
        above 1).
        """
        if not isinstance(states, (list, tuple)):
            raise TypeError(f"states is a list of every rank's state, got "
                            f"{type(states).__name__}")
        found = [shard for index, state in enumerate(states)
                 for shard in _shard_states(state, f"state {index}")]
        if not found:
            raise ValueError("no state to merge: give every rank's state")
        named, config = found[0][0], _epoch_config(found[0][1]['config'])
        for other, state in found[1:]:
            differ = [f"{key}: {_plain(state['config'].get(key))!r} in {other}, "
                      f"{_plain(value)!r} in {named}" for key, value in config.items()
                      if _plain(state['config'].get(key)) != _plain(value)]
            if differ or _epoch_config(state['config']).keys() != config.keys():
                raise ValueError(f"{other} and {named} were saved with other configurations: "
                                 + "; ".join(differ or ["other keys"]))
        begun = [(n, s) for n, s in found if s['epoch'] is not None]
        for other, state in begun[1:]:
            for key in ('epoch', 'shards', 'part'):
                if _plain(state[key]) != _plain(begun[0][1][key]):
                    raise ValueError(
                        f"{other} and {begun[0][0]} are of different iterations ({key} "
                        f"{_plain(state[key])!r} and {_plain(begun[0][1][key])!r}): merge "
                        f"the states every rank saved at one step")
        shards = {s['shards'] for _, s in found}
        if len(shards) > 1:
            counts = ", ".join(f"{state['shards']} in {name}" for name, state in found)
            raise ValueError(f"the states split the epoch into different numbers of shards "
                             f"({counts}): merge the states every rank saved at one step")
        shards, = shards
        by_shard = {}
        for name, state in found:
            if state['shard'] in by_shard:
                raise ValueError(f"shard {state['shard']} of {shards} is given twice, in "
                                 f"{by_shard[state['shard']][0]} and in {name}: give each "
                                 f"rank's state once")
            by_shard[state['shard']] = name, state
        missing = sorted(set(range(shards)) - set(by_shard))
        if missing:
            raise ValueError(f"shards {missing} of {shards} are missing (the states hold "
                             f"{len(by_shard)}): give every rank's state")
        epoch, part = (begun[0][1]['epoch'], begun[0][1]['part']) if begun else (None, None)
        total = config['samples_per_epoch']
        left = [span for shard in range(shards)
                for span in _after(_spans(total, part, shards, shard),
                                   by_shard[shard][1]['yielded'])]
        return {'epoch': epoch, 'part': None if epoch is None else _joined(left),
                'config': config}

    def load_state_dict(self, state):
        """Continue from a ``state_dict()`` or a ``merge_state_dicts()`` state.

        A shard's state (what ``StatefulDataLoader`` saves and loads for each
        worker) resumes that shard at its next iteration, for the same ranks
        and workers. A merged state selects its epoch (as ``set_epoch``) and
        makes this dataset, with any rank, world size and ``num_workers``,
        read only what its shards had not delivered: each of those positions
        once, in shares at most one apart, each a contiguous part of what is
        left. A state saved through JSON (lists for tuples) is accepted.
        Raises TypeError for a value of the wrong type, ValueError for a state
        that is not one, out of range (``yielded`` beyond its shard's share),
        or from another configuration (sources, the mask's and labels'
        counts, block, seed, samples_per_epoch, ...), naming what differs.
        """
        merged = _is_merged(state)
        mine, saved = self._config(), state['config']
        if merged:
            mine, saved = _epoch_config(mine), _epoch_config(saved)
        differ = {key: f"{key}: saved {saved.get(key)!r}, here {value!r}"
                  for key, value in mine.items() if _plain(saved.get(key)) != _plain(value)}
        if differ or saved.keys() != mine.keys():
            ranks = (" (on other ranks, merge every rank's state with merge_state_dicts and "
                     "load that)" if differ.keys() <= {'rank', 'world_size'} else "")
            raise ValueError("this state was saved by a VesuviusStream with another "
                             "configuration: " + "; ".join(differ.values() or [
                                 f"keys {sorted(map(str, saved))}, here {sorted(mine)}"])
                             + ranks)
        if not merged:
            self._resume = _checked_place(state, self.samples_per_epoch)
        elif state['epoch'] is None and state['part'] is None:   # nothing was delivered
            self._left = None
        else:
            if not _is_int(state['epoch']) or state['epoch'] < 0:
                raise TypeError(f"the state's epoch is an int >= 0, got {state['epoch']!r}")
            part = _checked_part(state['part'], self.samples_per_epoch)
            self.set_epoch(state['epoch'])
            self._left = int(state['epoch']), part

    def writer(self, outputs, *, scale=1, blend='gaussian', channels=None, resume=False):
        """A context manager that writes a grid's predictions, blended, into Zarr.

        For a ``'grid'`` dataset built with ``return_coords=True``::

            with grid.writer(["a_ink.zarr"], scale=4) as out:
                for blocks, coords in DataLoader(grid, batch_size=64, num_workers=2):
                    out.add(model(blocks), coords)      # (B, h/4, w/4) per batch

        ``outputs``: one per source, a path (a new float32 Zarr array is made
        there, chunks 256 x 256 in 2D or 64**3 in 3D; an existing path is
        refused unless ``resume=True``) or an opened writable ``zarr.Array`` of
        the right shape (its chunks are kept). ``add(predictions, coords)``
        takes a batch's predictions (torch or numpy, any float dtype) of shape
        ``(B, h', w')``, a 2D output over (y, x) that gathers every z position,
        or ``(B, d', h', w')``, a 3D output over (z, y, x); with
        ``channels=C`` a channel axis after B, and outputs ``(C, ...)``. A
        prediction covers its block at 1/``scale`` (``h' = h / scale``; scale
        divides the block and the stride): the output has ``ceil(size /
        scale)`` voxels along each axis, and a block at corner c covers
        ``[ceil(c / scale), ceil(c / scale) + h')``. Each output voxel is
        sum(w p) / sum(w) over the blocks covering it, w the product over the
        prediction's axes of ``exp(-(i - (n - 1)/2)**2 / (2 (n/8)**2))``, i =
        0 ... n-1 (``blend='gaussian'``), or 1 (``'constant'``); voxels no
        block covers (off the mask) are 0. Sums are float64: the result is
        the in-memory float64 one, rounded to the output's dtype.

        Memory: the writer cuts each output into tiles (its chunks along the
        spatial axes), counts how many grid positions feed each (from the
        geometry and the mask), sums a tile's contributions until all are in,
        then writes it once (no read-modify-write) and forgets it. It holds
        only the tiles of the blocks in flight: in grid order (see
        ``sampling_method``) a band of tiles along the volume's shorter side
        per worker, (channels + 1) x 8 bytes per voxel; beyond 256 MiB the
        least recently fed tiles wait on disk in ``<output>.writer``.
        Predictions may come from any number of workers, in any order.

        Ranks (DDP): every rank runs the same loop over its share; leaving
        the ``with`` block, the ranks put the sums of tiles they share in
        ``<output>.writer``, wait for each other (``torch.distributed``
        barrier), and one rank per tile writes it. If a tile lacks
        predictions at the end, every rank raises ValueError (leaving the
        journal, for ``resume=True``); a rank that leaves the block with an
        error does not wait, and the others wait until torch.distributed's
        timeout.

        Resume: the writer journals each tile written in ``<output>.writer``
        (removed once the output is complete). After a run was killed, the
        same call with ``resume=True`` keeps the tiles journaled and makes
        the dataset yield only the blocks that feed the others: create the
        DataLoader after the writer. The final output is the uninterrupted
        one; a path output without its folder is complete (resuming it yields
        nothing). The writer never deletes what it did not make.

        Raises ValueError for a dataset that is not a grid with coordinates, a
        scale that does not divide the block or stride, predictions or coords
        of another shape, and a tile still lacking predictions at the end;
        FileExistsError for an existing output (or ``<output>.writer``)
        without ``resume=True``.
        """
        return _Writer(self, outputs, scale, blend, channels, resume)

    def __iter__(self):
        epoch, skip_batches, batch_size = self._epoch.tolist()
        worker = get_worker_info()
        # Split over ranks and workers: this shard's spans of the part of the epoch its
        # iteration reads (all of it, or what a merged state left), minus what it already
        # delivered (a loaded shard state, or the skipped batches). Known as soon as the
        # iterator exists: a StatefulDataLoader worker saves its state then.
        workers, shard, shards = _split_by_rank_and_worker(self.rank, self.world_size, worker,
                                                           skip_batches)
        if self._resume is not None:
            part, done = self._resumed(epoch, shard, shards)
        else:
            part = self._part(epoch)
            done = _delivered(_length(part, self.samples_per_epoch), shards, shard, workers,
                              skip_batches, batch_size)
        self._place = _Place(epoch, shard, shards, done, part)
        spans = _after(_spans(self.samples_per_epoch, part, shards, shard), done)
        return self._stream(epoch, spans, worker is not None)

    def _stream(self, epoch, spans, in_worker):
        """The items of ``spans`` of the epoch (or their batches, with ``batch_size``)."""
        _refuse_zarrs_after_fork()
        if in_worker:
            _keep_freed_memory()
        # Reopen remote arrays in a new process; check that remote stores are unchanged.
        for source in self._sources:
            source.attach()
        # The spans' groups of visits, their boxes decoded in a background thread.
        plan = self._plan(epoch)
        groups = itertools.chain.from_iterable(plan.groups(*span) for span in spans)
        if self._writing is not None:    # a writer resuming: blocks that feed unwritten tiles
            groups = _needed_groups(groups, self._sources, self._writing)
        reader = _Reader(self._sources, groups, self._region_mb * 2**20)
        try:
            # Cut, transform and yield the blocks, in the plan's order: items or batches.
            if self.batch_size is None:
                yield from self._items(reader)
            else:
                yield from self._batches(reader, _length(spans, None), shared=in_worker)
        finally:             # an early break, an error, the end: no thread left behind
            reader.close()

    def _cuts(self, reader):
        """``(source, corner, box)`` of each block of the groups ``reader`` gives.

        The blocks of a group come in its interleaved order, each as soon as its
        box is decoded (a worker's first blocks: read alone, see _Reader); a box
        is let go once its last block is cut, when the next is asked for: the
        caller keeps no reference to a box past its cut (``del box``), so that
        the boxes alive are those the reader counts in its budget.
        """
        for group, lanes in reader:
            last = len(group.order) - 1 - np.unique(group.order[::-1, 0], return_index=True)[1]
            for step, (lane, index) in enumerate(group.order):
                visit, (slot, corners) = group.visits[lane], lanes[lane]
                corner = corners[index]
                yield visit.source, corner, reader.box(slot, corner)
                if step == last[lane]:
                    reader.release(slot)

    def _items(self, reader):
        """The items of the groups ``reader`` gives, counted in ``self._place``."""
        for source, corner, box in self._cuts(reader):
            start = time.thread_time()
            item = self._sources[source].cut(box, corner)
            del box
            _COUNTERS.cut_seconds += time.thread_time() - start
            if self.transform is not None:
                item = self._transformed(item, f"the block of source {source} at "
                                               f"{tuple(map(int, corner))}")
            if self.return_coords:
                item = (*item, torch.tensor((source, *corner), dtype=torch.int64))
            self._place.yielded += 1
            yield item if len(item) > 1 else item[0]

    def _batches(self, reader, left, shared):
        """The ``left`` items of the groups ``reader`` gives, as batches of ``batch_size``
        (the last may be smaller), each item counted in ``self._place``.

        Each block (and label) is copied once, from its decoded box into its row
        of the batch. In a DataLoader worker (``shared``) a batch is made in
        shared memory: a reused buffer when there is no transform (see
        _BatchBuffer), else fresh, as collate makes its batches; either way the
        queue to the main process passes it without another copy.
        """
        cuts = self._cuts(reader)
        volume, labels = self._sources[0].volume, self._sources[0].labels
        # (dtype, row shape) of the blocks and labels. Coordinates go apart, so that a
        # loop keeping them keeps no buffer.
        parts = [(volume.dtype.newbyteorder('='), self.block)]
        if labels is not None:
            parts.append((labels.dtype.newbyteorder('='), self.block[3 - labels.ndim:]))
        reuse = shared and self.transform is None
        while left:
            size = min(self.batch_size, left)
            batch, buffer = _batch_memory(parts, self.batch_size, size, shared, reuse)
            rows = [tensor.numpy() for tensor in batch]        # views, to write into
            coords = np.empty((size, 4), dtype=np.int64)
            filled, start = 0, time.thread_time()     # waits for boxes take no CPU time
            for row, (source, corner, box) in zip(range(size), cuts):
                self._sources[source].cut_into(box, corner, [array[row] for array in rows])
                del box
                coords[row, 0], coords[row, 1:] = source, corner
                filled += 1
            _COUNTERS.cut_seconds += time.thread_time() - start
            if filled < size:       # a resuming writer's grid skips blocks: fewer items
                if not filled:
                    return
                batch = [tensor[:filled] for tensor in batch]
                coords, size, left = coords[:filled], filled, filled
            batch = tuple(batch)
            if self.transform is not None:
                batch = self._transformed(batch, f"the batch of {size} blocks from source "
                                                 f"{coords[0, 0]} at {tuple(coords[0, 1:])}")
            left -= size
            self._place.yielded += size
            extra = (torch.from_numpy(coords),) if self.return_coords else ()
            if buffer is not None:
                yield _buffered(batch, extra, buffer, (parts, self.batch_size, size))
            else:
                batch += extra
                yield list(batch) if len(batch) > 1 else batch[0]   # as collate gives it

    def _transformed(self, item, what):
        """``transform(*item)`` as a tuple; None is refused, naming ``what`` it was given."""
        item = self.transform(*item)
        if item is None:
            raise TypeError(f"transform {_name(self.transform)} returned None for {what}; "
                            f"it must return the block, or a (block, label) pair")
        return item if isinstance(item, tuple) else (item,)

    def _resumed(self, epoch, shard, shards):
        """(part, items delivered) of this shard before the loaded shard state (used once)."""
        place, self._resume = self._resume, None
        if place.shard is None:             # saved before this worker yielded anything
            return (place.part if place.epoch == epoch else self._part(epoch)), 0
        if (place.shard, place.shards) != (shard, shards):
            raise ValueError(f"the state was saved by shard {place.shard} of "
                             f"{place.shards} (rank x worker), this is shard {shard} of "
                             f"{shards}: resume with the same num_workers and ranks, or "
                             f"merge every shard's state (merge_state_dicts) and load that")
        if place.epoch != epoch:
            raise ValueError(f"the state was saved in epoch {place.epoch}; call "
                             f"set_epoch({place.epoch}) before resuming it")
        return place.part, place.yielded

    def _part(self, epoch):
        """The part of ``epoch`` that iterations read: what a loaded merged state left of
        it, else None (the whole epoch)."""
        return self._left[1] if self._left is not None and self._left[0] == epoch else None

    def _config(self):
        """What an epoch's order depends on, to check a saved state against (a merged
        state's, as ``_epoch_config`` gives it, without the rank and world size)."""
        return {'sources': [[list(s.shape), str(s.volume.dtype), s.selection.positions]
                            for s in self._sources],
                'selection': self._selection,
                'block': list(self.block), 'samples_per_epoch': self.samples_per_epoch,
                'sampling_method': self.sampling_method, 'shuffle': self.shuffle,
                'seed': self.seed, 'z_range': self._z_range, 'stride': list(self._step),
                'min_mask_fraction': self._min_mask_fraction,
                'positive_fraction': self.positive_fraction,
                'min_positive_fraction': self._min_positive_fraction,
                'ignore_label': self._ignore_label,
                'regions': [list(s.lattice.region) for s in self._sources],
                'samples_per_region': [s.per_visit for s in self._sources],
                'open_regions': self.open_regions,
                'rank': self.rank, 'world_size': self.world_size}

    def _plan(self, epoch):
        """The epoch's order (a pure computation: no array is read but a raster mask)."""
        sources = self._sources
        if self.sampling_method == 'grid':
            streams = [_GridVisits(s.index, s.lattice, s.selection.region_counts,
                                   s.selection.positions)
                       for s in sources]
            return _EpochPlan(streams, 1, interleave=False)
        if not self.shuffle:
            counts = _fixed_shares(self.samples_per_epoch,
                                   [s.selection.positions for s in sources],
                                   self.sampling_method)
            streams = [_RasterVisits(s.index, s.lattice, count,
                                     None if s.mask is None else s.selection.count_selected)
                       for s, count in zip(sources, counts)]
            return _EpochPlan(streams, 1, interleave=False)
        rng = np.random.default_rng([self.seed & _MASK64, epoch])   # any int seed
        if self.positive_fraction is None:
            kinds = [(None, self.samples_per_epoch, [s.selection.region_counts for s in sources])]
        else:
            # Each kind is drawn as a dataset of its own, sources chosen by the method.
            positives = self._positives
            kinds = [(True, positives, [s.selection.positive_counts for s in sources]),
                     (False, self.samples_per_epoch - positives,
                      [s.selection.region_counts - s.selection.positive_counts
                       for s in sources])]
        streams = []
        for kind, total, region_counts in kinds:
            counts = _random_shares(total, [int(c.sum()) for c in region_counts],
                                    self.sampling_method, rng)
            streams += [_ShuffledVisits(s.index, s.lattice, c, s.per_visit, count,
                                        _key(self.seed, epoch, s.index, *_KIND_KEYS[kind]), kind)
                        for s, c, count in zip(sources, region_counts, counts)]
        return _EpochPlan(streams, self.open_regions, interleave=True)


# -- sources: opening what the user gave, checking it; a source's arrays read ----

class _Opened(typing.NamedTuple):
    """The arrays of one source, as given or opened."""
    volume: object
    labels: object = None
    mask: object = None
    mask_scale: tuple = None    # the mask's scale over the volume's, from OME-Zarr metadata


def _open_source(source, index, storage_options=None, cache_dir=None):
    """The arrays of one source; paths and URLs (the source, or a dict's values) opened."""
    remote = {'storage_options': storage_options, 'cache_dir': cache_dir}
    if isinstance(source, (str, os.PathLike)):
        source = _open_path(os.fspath(source), index, **remote)
    if isinstance(source, (np.ndarray, zarr.Array)):
        return _Opened(source)
    if isinstance(source, zarr.Group):
        level = _multiscale_level(source)
        if level is not None and 'volume' not in source:
            return _Opened(source[level])
    mask_scale = None
    if isinstance(source, dict):
        if not set(source) <= {'volume', 'labels', 'mask'}:
            unknown = sorted(map(repr, set(source) - {'volume', 'labels', 'mask'}))
            raise ValueError(f"source {index}: unknown key {', '.join(unknown)} in a dict "
                             f"source; the keys are 'volume', 'labels' and 'mask'")
        # Each path: (the array, (the group holding it as a level, the level's path)).
        opened = {name: _open_level(os.fspath(value), index, name, remote)
                  for name, value in source.items() if isinstance(value, (str, os.PathLike))}
        source = {**source, **{name: array for name, (array, _) in opened.items()}}
        if {'volume', 'mask'} <= opened.keys():
            mask_scale = _levels_scale(opened['volume'][1], opened['mask'][1], index, remote)
    if isinstance(source, (zarr.Group, dict)):
        if 'volume' not in source:
            raise ValueError(f"source {index}: a group or dict needs an array 'volume' (or "
                             f"OME-Zarr 'multiscales'); it has {sorted(source.keys())}")
        return _Opened(*(source[name] if name in source else None
                         for name in ('volume', 'labels', 'mask')), mask_scale)
    raise TypeError(f"source {index}: a source must be a path/URL, a zarr.Array or "
                    f"zarr.Group, a numpy array or a dict of them, got {type(source).__name__}")


def _open_path(path, index, storage_options=None, cache_dir=None):
    """The Zarr array or group at a local path or a URL (remote: retried, cached)."""
    remote = '://' in path
    if not remote and not os.path.exists(path):
        raise FileNotFoundError(f"source {index}: no Zarr store at {path!r}")
    store = _RemoteStore.from_url(path, index, storage_options, cache_dir) if remote else path
    try:
        return zarr.open(store, mode='r')
    except (PermissionError, _GaveUp, _Unreachable):
        raise
    except FileNotFoundError as error:
        if remote:
            raise FileNotFoundError(f"source {index}: no Zarr array or group at {path!r} "
                                    f"(no metadata found there)") from error
        raise ValueError(f"source {index}: {path!r} is not a Zarr array or group") from error
    except Exception as error:
        raise ValueError(f"source {index}: {path!r} is not a Zarr array or group "
                         f"({error})") from error


def _open_level(path, index, name, remote):
    """``(array, (group path, level path))`` of a dict source's path: an array, as a
    level of its parent folder, or an OME-Zarr multiscale group, as its level 0."""
    node = _open_path(path, index, **remote)
    path = path.rstrip('/')
    if isinstance(node, zarr.Array):
        return node, tuple(path.rpartition('/')[::2])
    level = _multiscale_level(node)
    if level is None:
        raise ValueError(f"source {index}: its {name} {path!r} is a Zarr group, not an array; "
                         f"give the path of an array in it")
    return node[level], (path, level)


def _levels_scale(volume_at, mask_at, index, remote):
    """The mask's scale over the volume's per axis when both are levels of one OME-Zarr
    multiscale group (its datasets' ``scale`` transforms), else None.

    ``volume_at``, ``mask_at``: (group path, level path), as _open_level gives them.
    """
    if volume_at[0] != mask_at[0] or not volume_at[0]:
        return None
    try:
        group = _open_path(volume_at[0], index, **remote)
    except (FileNotFoundError, ValueError):      # the levels' folder is no Zarr group
        return None
    multiscale = _multiscale(group) if isinstance(group, zarr.Group) else None
    scales = {}
    for dataset in (multiscale or {}).get('datasets', []):
        for transform in dataset.get('coordinateTransformations', []):
            if transform.get('type') == 'scale':
                scales[str(dataset.get('path'))] = transform['scale']
    if volume_at[1] not in scales or mask_at[1] not in scales:
        return None
    return tuple(m / v for m, v in zip(scales[mask_at[1]], scales[volume_at[1]]))


def _multiscale(group):
    """The first multiscale of an OME-Zarr group's metadata, else None.

    NGFF 0.4 keeps ``multiscales`` in the group's attributes, 0.5 under ``ome``.
    """
    attributes = group.attrs.asdict()
    multiscales = attributes.get('multiscales') or attributes.get('ome', {}).get('multiscales')
    return multiscales[0] if multiscales else None


def _multiscale_level(group):
    """Path of the full-resolution level of an OME-Zarr multiscale group, else None
    (the first dataset of the first multiscale is level 0)."""
    multiscale = _multiscale(group)
    return None if multiscale is None else multiscale['datasets'][0]['path']


def _mask_factor(index, shape, mask_shape, scale):
    """The mask's integer factor per axis of the volume's ``shape``: along each axis the
    mask holds ceil(size / f) voxels. From the OME-Zarr ``scale`` ratio when given,
    else the smallest f giving the mask's size (1: full resolution)."""
    sizes, mask_shape = shape[3 - len(mask_shape):], tuple(mask_shape)
    if scale is not None and len(scale) >= len(mask_shape):
        scale = scale[len(scale) - len(mask_shape):]
        factor = tuple(max(1, round(r)) for r in scale)
        source = f"the OME-Zarr scales give f = {factor}"
        if any(abs(r - f) > 1e-6 for r, f in zip(scale, factor)):
            factor, source = None, f"the OME-Zarr scales' ratio {scale} is not an integer"
    else:
        factor = tuple(-(-v // max(m, 1)) for v, m in zip(sizes, mask_shape))
        source = "no integer f gives that size"
    if (len(mask_shape) in (2, 3) and factor is not None
            and tuple(-(-v // f) for v, f in zip(sizes, factor)) == mask_shape):
        return factor
    raise ValueError(f"source {index}: mask of shape {mask_shape} do not match the volume "
                     f"{shape}; expected {shape[1:]} or {shape}, or coarser by an integer "
                     f"factor f per axis (ceil(size / f) voxels): {source}")


def _describe(source):
    """A source as errors name it: its path or URL, else what it is."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (zarr.Array, zarr.Group)):
        return f"{type(source).__name__} at {source.store_path}"
    return f"a {type(source).__name__}"


def _converter_offset(volume):
    """The ``offset`` converter.py recorded for the group holding ``volume``, else None."""
    if not isinstance(volume, zarr.Array):
        return None
    try:
        group = zarr.open_group(store=volume.store, path=volume.path.rpartition('/')[0],
                                mode='r')
        return group.attrs.get('vesuvius_converter', {}).get('offset')
    except Exception:        # only to enrich an error: no group, no attributes
        return None


def _torch_carries(dtype):
    """Whether torch has a tensor type for numpy ``dtype`` (bool, integers, floats)."""
    try:
        torch.from_numpy(np.empty(0, np.dtype(dtype).newbyteorder('=')))
    except (TypeError, ValueError):
        return False
    return np.dtype(dtype).kind in 'biuf'


class _LocalVersion:
    """What a zarr array in a local store was when the dataset was built, to check reads against.

    The identity is that of the array's folder (device, inode, ctime) and of its metadata
    file (inode, size, mtime): a store replaced (converter.py --overwrite renames a new one
    into place), or deleted and made again (which may get the freed inode back, not the
    ctime), has another folder, and a rewritten metadata file (attributes included: zarr
    writes a new file) another stat. Two ``os.stat`` calls, a few microseconds, after each
    decode. Chunks rewritten in place, leaving the folder's entries as they were, are not
    detected.
    """

    def __init__(self, array):
        name = 'zarr.json' if array.metadata.zarr_format == 3 else '.zarray'
        self.folder = os.path.join(array.store.root, *filter(None, array.path.split('/')))
        self.path = os.path.join(self.folder, name)
        self.identity = self._identity()
        self.metadata = array.metadata

    @classmethod
    def of(cls, array):
        """The version of ``array`` if it is a zarr array in a local store, else None."""
        if isinstance(array, zarr.Array) and isinstance(array.store, zarr.storage.LocalStore):
            return cls(array)
        return None

    def _identity(self):
        folder, file = os.stat(self.folder), os.stat(self.path)
        return (folder.st_dev, folder.st_ino, folder.st_ctime_ns, file.st_ino, file.st_size,
                file.st_mtime_ns)

    def check(self, source, name):
        """Raise, naming ``source`` and its array ``name``, if the array changed since."""
        todo = f"its {name} no longer holds the data this dataset was built on: build it again"
        gone = (f"{source}: the store is gone: {self.path} no longer exists (deleted, moved or "
                f"unmounted?)")
        try:
            identity = self._identity()
        except FileNotFoundError:
            raise FileNotFoundError(gone) from None
        if identity == self.identity:
            return
        try:
            with open(self.path, 'rb') as file:
                metadata = type(self.metadata).from_dict(json.load(file))
        except FileNotFoundError:
            raise FileNotFoundError(gone) from None
        except (OSError, ValueError, TypeError, KeyError) as error:   # half written
            raise OSError(f"{source}: the metadata of {self.path} changed and cannot be read "
                          f"({type(error).__name__}: {error}); {todo}") from error
        changed = _metadata_changes(self.metadata, metadata)
        if changed:
            raise OSError(f"{source}: the metadata of {self.path} changed: "
                          + ", ".join(changed) + f"; {todo}")
        # The same layout, but another folder or file: new chunks may lie behind it.
        raise OSError(f"{source}: the store was replaced or rewritten: {self.folder} is not "
                      f"as it was when the dataset was built (made again, converted again, "
                      f"or its metadata written); {todo}")


def _metadata_changes(old, new):
    """What differs between two metadata of an array, attributes aside, as errors say it:
    shape, dtype and chunks with their values, then codecs and any other field by name."""
    before, after = old.to_dict(), new.to_dict()
    names = {'data_type': 'dtype', 'chunk_grid': 'chunks', 'compressor': 'codecs',
             'filters': 'codecs'}
    changed = {names.get(key, key) for key in before.keys() | after.keys()
               if key != 'attributes' and before.get(key) != after.get(key)}
    values = {'shape': lambda fields: tuple(fields['shape']),
              'dtype': lambda fields: fields.get('data_type', fields.get('dtype')),
              'chunks': lambda fields: tuple(fields['chunks'] if 'chunks' in fields else
                                             fields['chunk_grid']['configuration']['chunk_shape'])}
    order = [*values, 'codecs']
    described = []
    for name in sorted(changed, key=lambda name: (order.index(name) if name in order
                                                  else len(order), name)):
        try:
            described.append(f"{name} {values[name](before)} -> {values[name](after)}")
        except (KeyError, TypeError):     # named only (or chunks of an irregular grid)
            described.append(name)
    return described


def _plain(value):
    """``value`` as JSON gives it back (lists for tuples), to compare a saved state;
    what JSON cannot hold compares as its repr (and so differs from a plain value)."""
    return json.loads(json.dumps(value, default=repr))


def _is_int(value):
    """True for Python and numpy integers (not bools): sizes often come from array shapes."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    """True for Python and numpy reals (not bools): fractions often come from numpy."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _name(function):
    """A callable's name for messages (functions, lambdas, partials, callable objects)."""
    return getattr(function, '__qualname__', None) or repr(function)


def _positive_int(name, value):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _weights(weights, sources):
    """``sampling_method`` given as weights: one non-negative number per source."""
    try:
        weights = tuple(weights)
    except TypeError:
        raise TypeError(f"sampling_method must be a str or a sequence of weights, one per "
                        f"source, got {weights!r}") from None
    if len(weights) != sources:
        raise ValueError(f"sampling_method has {len(weights)} weights for {sources} sources: "
                         f"give one weight per source")
    if not (all(_is_number(w) and 0 <= w < math.inf for w in weights) and any(weights)):
        raise ValueError(f"sampling_method weights must be finite numbers >= 0, not all 0, "
                         f"got {list(weights)}")
    return tuple(w.item() if isinstance(w, np.generic) else w for w in weights)


def _resolve_ranks(rank, world_size):
    """(rank, world_size): explicit values, else torch.distributed's, else (0, 1)."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("give both rank and world_size, or neither")
    world_size = _positive_int('world_size', world_size)
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return int(rank), world_size


class _Box(typing.NamedTuple):
    """Decoded voxels of a visit's lattice box (its region, or a raster run)."""
    origin: np.ndarray    # (3,) voxel coordinates of volume[0, 0, 0]
    volume: np.ndarray
    labels: np.ndarray    # or None


class _Source:
    """One volume with its labels and mask: the checks, its lattice and selection, reading.

    Its arrays are read through ``decode`` only, which checks each read against
    the store the dataset was built on; ``attach`` reopens them in a worker.
    """

    def __init__(self, arrays, index, name, block, z_range, step, region_bytes, band_bytes,
                 samples_per_region, min_mask_fraction, min_positive_fraction=0.0,
                 ignore_label=None):
        self.index, self.name = index, name
        self.volume, self.labels, self.mask, mask_scale = arrays
        self._process = os.getpid()
        shape = self.shape = tuple(int(s) for s in self.volume.shape)
        if len(shape) != 3:
            raise ValueError(f"source {index}: the volume must be 3D (z, y, x), got shape {shape}")
        for name, array in self.arrays():
            if not _torch_carries(array.dtype):
                raise TypeError(f"source {index} ({self.name}): its {name} has dtype "
                                f"{array.dtype}; give bool, integer or float data (what a "
                                f"torch tensor holds)")
        # Local zarr arrays, checked after each read (see _LocalVersion); remote ones at
        # each iteration's start (see attach), against the version zarr's opening fetched,
        # or, for arrays opened from consolidated metadata (no document of their own
        # fetched), the one dated now.
        self._versions = {name: _LocalVersion.of(array) for name, array in self.arrays()}
        _RemoteStore.verify(f"source {index} ({self.name})",
                            [array for _, array in self.arrays() if _RemoteStore.undated(array)])
        if self.labels is not None and tuple(self.labels.shape) not in (shape, shape[1:]):
            raise ValueError(f"source {index}: labels of shape {tuple(self.labels.shape)} do "
                             f"not match the volume {shape}; expected {shape[1:]} or {shape}")
        mask_factor = (None if self.mask is None else
                       _mask_factor(index, shape, self.mask.shape, mask_scale))
        lo, hi = (0, 0, 0), shape
        if z_range is not None:
            if not 0 <= z_range[0] < z_range[1] <= shape[0]:
                offset = _converter_offset(self.volume)
                cropped = ("" if not offset else
                           f"; converter.py cropped it from the scan at layer {offset[0]}: "
                           f"z_range counts stored layers, so scan layers [a, b) are "
                           f"z_range=(a - {offset[0]}, b - {offset[0]})")
                raise ValueError(f"z_range {z_range} must satisfy 0 <= start < end <= "
                                 f"{shape[0]} (source {index} has {shape[0]} layers{cropped})")
            lo, hi = (z_range[0], 0, 0), (z_range[1], *shape[1:])
        if any(b > h - l for b, l, h in zip(block, lo, hi)):
            raise ValueError(f"block {block} does not fit in source {index} of shape {shape}"
                             + (f" within z_range {z_range}" if z_range else ""))
        self.block = block
        chunks = shape if isinstance(self.volume, np.ndarray) else tuple(self.volume.chunks)
        lattice = self.lattice = _Lattice(shape, block, lo, hi, step, chunks, region_bytes,
                                          self.volume.dtype.itemsize)
        if lattice.regions * _PLAN_BYTES_PER_REGION > _PLAN_BYTES:
            box = math.prod(lattice.box(lattice.region)) * self.volume.dtype.itemsize
            raise ValueError(
                f"source {index} ({self.name}) of shape {shape} makes {lattice.regions:,} "
                f"regions of {box / 2**20:.3g} MiB, whose plan would take about "
                f"{lattice.regions * _PLAN_BYTES_PER_REGION / 2**30:.1f} GiB; raise region_mb "
                f"(regions grow with it) or crop the volume")
        self.per_visit = samples_per_region or max(
            1, 4 * math.prod(lattice.box(lattice.region)) // math.prod(block))
        self.selection = _Selection(lattice, block, self.mask, self.labels, min_mask_fraction,
                                    self.decode, band_bytes, mask_factor,
                                    min_positive_fraction, ignore_label)

    def arrays(self):
        """``(name, array)`` of the volume, labels and mask this source has."""
        return [(name, array) for name, array in
                (('volume', self.volume), ('labels', self.labels), ('mask', self.mask))
                if array is not None]

    def attach(self):
        """At the start of each iteration: reopen remote arrays in a new process (a
        DataLoader worker), and check that their stores still hold the version this
        dataset was built on (``_RemoteStore.verify``: two small requests per remote
        array, concurrently, in each worker at each iteration).

        fsspec's HTTP sessions belong to the event loop of the process that
        opened them and fail after a fork; a pickle round trip opens new ones.
        """
        if self._process != os.getpid():
            self._process = os.getpid()
            # The parent's arrays are kept, not collected: collecting them would
            # make aiohttp warn of sessions that cannot be closed from here.
            self._parents_arrays = (self.volume, self.labels, self.mask)
            self.volume, self.labels, self.mask = (
                pickle.loads(pickle.dumps(array))
                if isinstance(array, zarr.Array)
                and not isinstance(array.store, (zarr.storage.LocalStore,
                                                 zarr.storage.MemoryStore))
                else array for array in (self.volume, self.labels, self.mask))
        _RemoteStore.verify(f"source {self.index} ({self.name})",
                            (self.volume, self.labels, self.mask))

    def nbytes(self, origin, end):
        """Bytes that decoding the box ``[origin, end)`` holds (numpy sources: views, none)."""
        size = 0
        for array in (self.volume, self.labels):
            if array is not None and not isinstance(array, np.ndarray):
                size += math.prod(e - o for o, e in zip(origin[3 - array.ndim:],
                                                        end[3 - array.ndim:])) * array.dtype.itemsize
        return size

    def chunk_bytes(self, origin, end):
        """Bytes zarr decodes to read the box ``[origin, end)``: every chunk of the volume
        and labels it overlaps, whole (edge chunks are stored whole); numpy: none."""
        size = 0
        for array in (self.volume, self.labels):
            if isinstance(array, zarr.Array):
                size += math.prod(map(_chunk_span, origin[3 - array.ndim:],
                                      end[3 - array.ndim:], array.chunks)) * array.dtype.itemsize
        return size

    def read(self, origin, end):
        """Decode the voxel box ``[origin, end)`` (volume and labels)."""
        start = time.perf_counter()
        box = tuple(slice(o, e) for o, e in zip(origin, end))
        volume = self.decode('volume', box)
        labels = None if self.labels is None else self.decode('labels',
                                                               box[3 - self.labels.ndim:])
        _COUNTERS.decoded(time.perf_counter() - start, self.chunk_bytes(origin, end))
        return _Box(np.asarray(origin), volume, labels)

    def decode(self, name, box):
        """Array ``name`` at ``box``, in native byte order; a failure names the source,
        the box and the chunk.

        Zarr reads the chunks of a vanished local store as fill value, and those
        of a replaced one under the old metadata: after the decode, the array's
        store is checked to be the one this dataset was built on.
        """
        array = getattr(self, name)
        try:
            data = _native(np.asarray(array[box]))
        except Exception as error:
            where = ', '.join(f"{axis} {s.start}:{s.stop}"
                              for axis, s in zip('zyx'[3 - len(box):], box))
            # Storage errors name their key already, and re-reading would retry.
            chunk = None if isinstance(error, OSError) else _failing_chunk(array, box)
            raise OSError(f"source {self.index} ({self.name}): cannot read its {name} at "
                          f"voxels {where}" + (f", chunk {chunk!r}" if chunk else "")
                          + f": {type(error).__name__}: {error}") from error
        if self._versions.get(name) is not None:
            self._versions[name].check(f"source {self.index} ({self.name})", name)
        return data

    def cut(self, box, corner):
        """``(block,)`` or ``(block, label)`` tensors at ``corner`` from a read box.

        Contiguous copies: the box may be let go at once, and collate stacks
        strided uint16 tensors many times slower than contiguous ones.
        """
        return tuple(torch.from_numpy(np.ascontiguousarray(window))
                     for window in self._windows(box, corner))

    def cut_into(self, box, corner, rows):
        """Copy the block (and label) at ``corner`` of a read box into ``rows``, numpy
        views of a batch's row of blocks (and of labels)."""
        for row, window in zip(rows, self._windows(box, corner)):
            row[...] = window

    def _windows(self, box, corner):
        """Views of the block (and label) at ``corner`` in a read box."""
        (z, y, x), (d, h, w) = (corner - box.origin).tolist(), self.block     # Python ints
        window = slice(z, z + d), slice(y, y + h), slice(x, x + w)
        if box.labels is None:
            return (box.volume[window],)
        return box.volume[window], box.labels[window[3 - box.labels.ndim:]]


# -- geometry: where the positions of a volume are ---------------------------

class _Lattice:
    """The positions of one volume, and their regions: pure geometry, no data.

    Along each axis, position p has the start coordinate
    ``min(lo + p * step, hi - size)``, where [lo, hi) is the usable range
    (``z_range``) and step is 1, or the grid stride: ``extent`` positions in
    all. The lattice is cut into regions of ``region`` positions per axis
    (``regions_per_axis`` of them per axis, ``regions`` in all, numbered in
    raster order), chosen so that a region's box of voxels is made of whole
    chunks and fits ``region_bytes``.

    Example: shape (65, 300, 300), block (26, 64, 64), step 1, chunks (16, 128,
    128): extent (40, 237, 237); a region of (40, 128, 128) positions reads a
    box of (65, 191, 191) voxels.
    """

    def __init__(self, shape, block, lo, hi, step, chunks, region_bytes, itemsize):
        self.block, self.lo, self.hi, self.step = block, lo, hi, step
        self.extent = tuple(-(-(h - l - b) // s) + 1 for l, h, b, s in zip(lo, hi, block, step))
        self.region = self._choose_region(chunks, region_bytes, itemsize)
        self.regions_per_axis = tuple(-(-e // r) for e, r in zip(self.extent, self.region))
        self.regions = math.prod(self.regions_per_axis)
        self.positions = math.prod(self.extent)

    def box(self, region):
        """Voxel span of the blocks of ``region`` positions per axis."""
        return tuple(min((r - 1) * s + b, h - l)
                     for r, s, b, l, h in zip(region, self.step, self.block, self.lo, self.hi))

    def _choose_region(self, chunks, region_bytes, itemsize):
        """Region shape (in positions) whose box is chunk multiples within the budget.

        Starts from one chunk (halved while even that is over budget), then
        grows by whole chunks while the box fits, each step on the axis that
        leaves the least of the decoded chunks unused (what the box overlaps,
        over the box: decoding per sample is proportional to it), the first
        such axis on a tie. Thin boxes of whole chunks in z tend to waste
        least, and spread a region over the plane, where 2D labels vary.
        Example: 65 layers, chunks (16, 256, 256), block (26, 64, 64), 8 MiB:
        the box of one chunk of positions, (41, 319, 319), overlaps (48, 512,
        512) voxels, and any bigger box is over budget; with 16 MiB, growing y
        (to (41, 575, 319) of (48, 768, 512): 2.5x) wastes less than growing z
        (to (57, 319, 319) of (64, 512, 512): 2.9x).
        """
        def fits(region):
            return math.prod(self.box(region)) * itemsize <= region_bytes

        def overlap(region):         # chunks' voxels decoded per voxel of the box
            box = self.box(region)
            return math.prod(map(_chunk_span, self.lo, [l + b for l, b in zip(self.lo, box)],
                                 chunks)) / math.prod(box)

        per_chunk = [max(1, c // s) for c, s in zip(chunks, self.step)]
        region = [min(c, e) for c, e in zip(per_chunk, self.extent)]
        while not fits(region) and max(region) > 1:
            axis = region.index(max(region))
            region[axis] = -(-region[axis] // 2)
        while True:
            bigger = []
            for axis in range(3):
                grown = list(region)
                grown[axis] = min(region[axis] + per_chunk[axis], self.extent[axis])
                if grown != region and fits(grown):
                    bigger.append((overlap(grown), axis, grown))
            if not bigger:
                return tuple(region)
            region = min(bigger)[2]

    def region_bounds(self, index):
        """Origin and shape (in positions) of region ``index``."""
        cell = np.unravel_index(index, self.regions_per_axis)
        return self.span([range(int(c), int(c) + 1) for c in cell])

    def span(self, box):
        """Origin and shape (in positions) of a box of regions (a range of region
        indices per axis)."""
        origin = tuple(r.start * size for r, size in zip(box, self.region))
        return origin, tuple(min(r.stop * size, e) - o
                             for r, size, e, o in zip(box, self.region, self.extent, origin))

    def axis_sizes(self):
        """Positions per region along each axis (border regions are smaller)."""
        return [np.minimum(r, e - np.arange(0, e, r)) for r, e in zip(self.region, self.extent)]

    def region_sizes(self):
        """Positions per region, in region order."""
        return np.einsum('i,j,k->ijk', *self.axis_sizes()).ravel().astype(np.int64)

    def corners(self, positions):
        """Start coordinates (n, 3) of lattice positions (n, 3)."""
        return np.minimum(np.asarray(self.lo) + positions * np.asarray(self.step),
                          np.asarray(self.hi) - np.asarray(self.block))

    def axis_corners(self, origin, shape):
        """Start coordinates along each axis of the lattice box (origin, shape)."""
        return [np.minimum(l + np.arange(o, o + n) * s, h - b)
                for o, n, l, s, h, b in zip(origin, shape, self.lo, self.step, self.hi,
                                            self.block)]

    def voxel_box(self, origin, shape):
        """Voxels ``(start, end)`` per axis that the blocks of the lattice box cover."""
        axes = self.axis_corners(origin, shape)
        return (tuple(int(a[0]) for a in axes),
                tuple(int(a[-1]) + b for a, b in zip(axes, self.block)))


def _chunk_span(start, end, chunk):
    """Voxels along one axis of the chunks that ``[start, end)`` overlaps (zarr decodes
    whole chunks, and stores edge chunks whole)."""
    return (-(-end // chunk) - start // chunk) * chunk


# -- selection: which positions of a volume an epoch may draw -----------------

class _Band:
    """A box of an array read once (``data``, from ``starts`` per axis), sliced as the
    array is (slices within the box)."""

    def __init__(self, data, starts):
        self.data, self.starts = data, starts

    def __getitem__(self, index):
        return self.data[tuple(slice(s.start - a, s.stop - a)
                               for s, a in zip(index, self.starts))]


def _footprint_sums(window, offsets, block, factor):
    """Sums of ``window`` over boxes of ``block`` voxels starting at ``offsets`` (an int
    array per axis; every start along each axis with every other), as if each voxel
    of ``window`` were repeated ``factor[i]`` times along axis i: axis by axis
    (_axis_sums), so a coarse array is never repeated: the work is that of its own
    voxels, then of the starts.
    """
    sums = window
    for axis, (starts, b, f) in enumerate(zip(offsets, block, factor)):
        sums = _axis_sums(sums, axis, starts, b, f)
    return sums


def _axis_sums(array, axis, starts, b, f=1):
    """Sums of ``array`` along ``axis`` over the ``b`` voxels from each of ``starts``,
    as if each voxel were repeated ``f`` times along it (int32).

    From the prefix sums C along the axis (C[k] = sum of the first k, C[0] = 0):
    each sum is P(t + b) - P(t), where P is the repeated array's prefix sum: at
    t = q f + r, P(t) = f C[q] + r a[q] = (f - r) C[q] + r C[q + 1] (C[t] itself
    when f = 1).
    """
    shape = list(array.shape)
    shape[axis] += 1
    prefix = np.zeros(shape, np.int32)                          # sizes < 2**31
    np.cumsum(array, axis=axis, out=prefix[(slice(None),) * axis + (slice(1, None),)])
    ends = []
    for t in (starts + b, starts):
        if f == 1:
            ends.append(np.take(prefix, t, axis=axis))
            continue
        q, r = np.divmod(t, f)
        r = r.astype(np.int32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
        ends.append((f - r) * np.take(prefix, q, axis=axis) + r * np.take(
            prefix, np.minimum(q + 1, shape[axis] - 1), axis=axis))
    return ends[0] - ends[1]


def _sliding_any(array, axis, length, count):
    """Whether any of the ``length`` cells from each of the first ``count`` along
    ``axis`` of the bool ``array`` is set (it holds count + length - 1 cells at least):
    by doubling, about log2(length) ors of the array with itself shifted."""
    def shifted(a, start, size):
        return a[(slice(None),) * axis + (slice(start, start + size),)]
    width, hit = 1, array
    while 2 * width <= length:           # hit[i]: any of the ``width`` cells from i
        size = hit.shape[axis] - width
        hit, width = shifted(hit, 0, size) | shifted(hit, width, size), 2 * width
    if width < length:                   # the last overlapping two windows of width
        size = hit.shape[axis] - (length - width)
        hit = shifted(hit, 0, size) | shifted(hit, length - width, size)
    return shifted(hit, 0, count)


def _count(valid, shape):
    """Positions of a lattice box of ``shape`` given its ``selected`` (None: all)."""
    if valid is None:
        return math.prod(shape)
    return int(valid.sum()) * (shape[0] if valid.ndim == 2 else 1)


class _Selection:
    """Which positions of one volume an epoch may draw: pure, given its mask and labels.

    A position is *on the mask* when its block's mask footprint holds at least
    ``threshold`` mask voxels, and *positive* (kind True) when its label
    footprint holds at least ``positive_threshold`` positive labels (nonzero,
    and not ``ignore_label``), else negative (kind False). A mask coarser than
    the volume by ``factor`` (per axis of the mask) counts as if each of its
    voxels were repeated f times along each axis, cropped to the volume. The
    mask and labels are read through ``decode(name, box)``. ``region_counts``
    holds the positions of each region on the mask (all of them without a
    mask), one integer per region, counted once; ``digest`` is a digest of
    what decided the counting passes' selection (a bit per position, or a hash
    of a coarse mask's nonzero cells: see _owned_cells), which the epoch's order
    depends on too.
    """

    def __init__(self, lattice, block, mask, labels, min_mask_fraction, decode, budget,
                 mask_factor=None, min_positive_fraction=0.0, ignore_label=None):
        self.lattice, self.block, self.decode, self.budget = lattice, block, decode, budget
        # Only their ndim and itemsize (and whether they exist): the arrays themselves
        # are the source's, reopened in each worker.
        arrays = [(name, array) for name, array in (('mask', mask), ('labels', labels))
                  if array is not None]
        self.ndim = {name: array.ndim for name, array in arrays}
        self.itemsize = {name: array.dtype.itemsize for name, array in arrays}
        self.factor = {name: (1,) * ndim for name, ndim in self.ndim.items()}
        self.threshold = self.positive_threshold = None
        if mask is not None:
            footprint = math.prod(block[3 - mask.ndim:])
            self.threshold = max(1, math.ceil(min_mask_fraction * footprint))
            self.factor['mask'] = tuple(mask_factor or self.factor['mask'])
        if labels is not None:
            footprint = math.prod(block[3 - labels.ndim:])
            self.positive_threshold = max(1, math.ceil(min_positive_fraction * footprint))
        self.ignore_label = ignore_label
        self.digest = b''
        self.region_counts = self._count_regions(kind=None)
        self.positions = int(self.region_counts.sum())
        self.positive_counts = None       # per region, counted when positive_fraction asks

    def count_positives(self):
        """Count, once, the positions per region whose label footprint has ink."""
        if self.positive_counts is None:
            self.positive_counts = self._count_regions(kind=True)
        return self.positive_counts

    def _count_regions(self, kind):
        """Positions per region that ``selected`` keeps (one pass over mask and labels).

        Arrays are read in bands, boxes of regions within ``budget`` bytes (see
        _bands): zarr calls cost more than the sums. 2D arrays alone decide for all
        layers at once: regions (y, x), every z.
        """
        if 'mask' not in self.ndim and kind is None:
            return self.lattice.region_sizes()
        digest = hashlib.sha256(self.digest)
        needed = [name for name in self.ndim if name == 'mask' or kind is not None]
        flat = all(self.ndim[name] == 2 for name in needed)
        # A coarse mask alone at threshold 1 in random epochs (lattice step 1) counts in
        # its own cells (_count_touching), a band at a time, holding a few arrays of its
        # cells; else position by position (selected), a region at a time.
        coarse = (kind is None and self.threshold == 1 and set(self.lattice.step) == {1}
                  and set(self.factor['mask']) != {1})
        grid = self.lattice.regions_per_axis
        counts = np.zeros((1 if flat else grid[0], *grid[1:]), dtype=np.int64)
        banded, cell_hash = copy.copy(self), 0
        for box, bands in self._bands(needed, counts.shape,
                                      self.budget // _COARSE_COPIES if coarse else self.budget):
            banded.decode = lambda name, window: bands[name][window]
            if coarse:
                # The digest takes the mask's cells: they decide the selection.
                owned, box_counts = banded._count_touching(box)
                cell_hash = (cell_hash + owned) & _MASK64
            else:
                box_counts = np.zeros([len(r) for r in box], dtype=np.int64)
                for cell in np.ndindex(box_counts.shape):      # a bit per position
                    region = [range(r[c], r[c] + 1) for r, c in zip(box, cell)]
                    valid = banded.selected(*self.lattice.span(region), kind)
                    digest.update(np.packbits(valid))
                    box_counts[cell] = valid.sum()
            counts[tuple(slice(r.start, r.stop) for r in box)] = box_counts
        if coarse:
            digest.update(cell_hash.to_bytes(8, 'little'))
        self.digest = digest.digest()
        if flat:                 # positions (y, x) of a region, on each of its layers
            counts = counts * self.lattice.axis_sizes()[0][:, None, None]
        return counts.ravel()

    def _bands(self, names, grid, budget):
        """``(box, {name: _Band})`` covering ``grid`` (regions per axis) in raster order:
        boxes of regions (a range per axis) as large as fit ``budget`` bytes of the
        arrays ``names``: whole layers of regions, else rows of one layer, else a run
        along x of one row (a region at least); each array's window of the box, read."""
        def windows(box):
            lo, hi = self.lattice.voxel_box(*self.lattice.span(box))
            return {name: self.window(name, lo[3 - self.ndim[name]:], hi[3 - self.ndim[name]:])
                    for name in names}

        def nbytes(box):
            return sum(math.prod(s.stop - s.start for s in window) * self.itemsize[name]
                       for name, window in windows(box).items())

        def split(fixed, axis):     # boxes along ``axis``, within the ranges ``fixed`` before it
            start = 0
            while start < grid[axis]:
                def box(k):
                    return (*fixed, range(start, start + k), *map(range, grid[axis + 1:]))
                low, high = 0, grid[axis] - start             # the most that fit
                while low < high:
                    mid = (low + high + 1) // 2
                    low, high = (mid, high) if nbytes(box(mid)) <= budget else (low, mid - 1)
                if low or axis == 2:
                    yield box(max(low, 1))
                else:                        # not one fits: split it along the next axis
                    yield from split((*fixed, range(start, start + 1)), axis + 1)
                start += max(low, 1)

        for box in split((), 0):
            yield box, {name: _Band(self.decode(name, window), [s.start for s in window])
                        for name, window in windows(box).items()}

    def _count_touching(self, box):
        """``(owned, counts)`` for a coarse mask under ``box`` (a range of regions per
        axis): a hash of the nonzero cells the box owns (see below), and per region of
        it the positions whose block's footprint touches a nonzero cell (per layer, for
        a 2D mask), in work of the cells, not of the positions.

        Along an axis of factor f, the block of b voxels at p = q f + r (0 <= r < f)
        overlaps the cells q .. q + (r + b - 1) // f: L = (b - 1) // f + 1 of them
        while r < f L - b + 1, L + 1 from there on. So the positions fall into two
        classes per axis. For each combination of classes, whether the box of cells
        at q holds a nonzero one (an array over q), summed along each axis over the
        positions of each region in that class: a matrix product per axis.
        """
        ndim, factor = self.ndim['mask'], self.factor['mask']
        origin, shape = self.lattice.span(box)
        axes = self.lattice.axis_corners(origin, shape)[3 - ndim:]
        lo, hi = (bounds[3 - ndim:] for bounds in self.lattice.voxel_box(origin, shape))
        cells = self.window('mask', lo, hi)
        window = self.decode('mask', cells) != 0
        nonzero = bool(window.any())       # outside the papyrus, none: nothing to hash
        owned = self._owned_cells(box, cells, window) if nonzero else 0
        firsts = []             # per axis: (L, per class: positions per (region, first cell))
        for corners, b, f, span, size in zip(axes, self.block[3 - ndim:], factor, cells,
                                             self.lattice.region[3 - ndim:]):
            length = (b - 1) // f + 1
            q, r = np.divmod(corners, f)
            q, late = q - span.start, r >= f * length - b + 1     # first cell, class
            owner, n = np.arange(len(q)) // size, int(q[-1]) + 1   # the box's region
            firsts.append((length, [np.bincount(owner[late == k] * n + q[late == k],
                                                minlength=(owner[-1] + 1) * n).reshape(-1, n)
                                    for k in (0, 1)]))
        if not nonzero or window.all():
            sizes = [early.sum(1) + late.sum(1) for _, (early, late) in firsts]
            return owned, functools.reduce(np.multiply.outer, sizes) * nonzero
        # Whether the box of cells at q holds a nonzero one, per combination of classes
        # so far: axis by axis (any is separable), L cells at q, L + 1 as L at q or at
        # q + 1. The last q's L cells may end one past the window: padded.
        touched = [((), np.pad(window, [(0, 1)] * ndim))]   # (classes, hit)
        for axis, (length, (per_q, _)) in enumerate(firsts):
            n = per_q.shape[1]
            head, tail = ((slice(None),) * axis + (slice(i, i + n),) for i in (0, 1))
            grown = []
            for classes, hit in touched:
                hit = _sliding_any(hit, axis, length, n + 1)                   # L cells at q
                grown += [(classes + (k,), held)
                          for k, held in enumerate((hit[head], hit[head] | hit[tail]))]
            touched = grown
        # Each contracted along every axis with its class's positions per region and q,
        # x first (most cells per region), as matrix products: float32 while the sums
        # (at most the positions of a region along the axes so far) stay below 2**24,
        # then float64 (below 2**53): exact.
        region_shape, counts = self.lattice.region[3 - ndim:], 0
        for classes, hit in touched:
            for axis, k, (_, per_q) in reversed(list(zip(range(ndim), classes, firsts))):
                exact = np.float32 if math.prod(region_shape[axis:]) < 2**24 else np.float64
                hit = np.moveaxis(np.tensordot(hit, per_q[k].astype(exact), axes=(axis, 1)),
                                  -1, axis)
            counts = counts + hit
        return owned, np.rint(counts).astype(np.int64)

    def _owned_cells(self, box, cells, window):
        """A hash of the nonzero cells of the coarse mask's ``window`` (at ``cells``) that
        ``box`` owns: along each axis, from its first position's first cell to the next
        box's (to the window's end for the last box), so that the boxes of any budget
        own every cell once. Each row's cells are packed into bytes aligned to the
        mask's own x (a byte split between two boxes holds disjoint bits in each); a
        byte's value is the sum of a random 64-bit key per bit set (_BYTE_KEYS), and
        the hash the sum, mod 2**64, of each byte's value times a product of odd keys
        per coordinate (the byte's along x): summed over boxes, a hash of the set,
        whatever the bands, in work of the cells / 8 once packed."""
        ndim, owned = self.ndim['mask'], window
        for axis, (regions, size, f, span, total) in enumerate(zip(
                box[3 - ndim:], self.lattice.region[3 - ndim:], self.factor['mask'], cells,
                self.lattice.regions_per_axis[3 - ndim:])):
            end = span.stop - span.start
            if regions.stop < total:
                corner = self.lattice.axis_corners((regions.stop * size,) * 3, (1,) * 3)
                end = int(corner[3 - ndim + axis][0]) // f - span.start
            owned = owned[(slice(None),) * axis + (slice(0, end),)]
        shift = cells[-1].start % 8            # to whole bytes of the mask's own x
        bits = np.pad(owned, [(0, 0)] * (ndim - 1) + [(shift, -(shift + owned.shape[-1]) % 8)])
        hashed = _BYTE_KEYS[np.packbits(bits, axis=-1, bitorder='little')]   # (..., bytes)
        firsts = [span.start for span in cells[:-1]] + [cells[-1].start // 8]
        for axis, first in enumerate(firsts):
            index = np.arange(first, first + hashed.shape[axis], dtype=np.uint64)
            keys = _mix64(index * np.uint64(4) + np.uint64(axis)) | np.uint64(1)
            hashed = hashed * keys.reshape([-1 if a == axis else 1 for a in range(ndim)])
        return int(hashed.sum(dtype=np.uint64))     # uint64: wraps mod 2**64

    def selected(self, origin, shape, kind=None):
        """Which positions of the lattice box (origin, shape) an epoch may draw.

        Those on the mask and, with ``kind``, positive (True) or negative
        (False). A bool array of ``shape`` (of shape[1:] when made of 2D arrays
        only, holding for every layer), or None: every position.
        """
        parts = []
        if 'mask' in self.ndim:
            parts.append(self._footprint_hits('mask', origin, shape) >= self.threshold)
        if kind is not None:
            positive = self._footprint_hits('labels', origin, shape) >= self.positive_threshold
            parts.append(positive if kind else ~positive)
        if not parts:
            return None
        if len({part.ndim for part in parts}) > 1:
            parts = [np.broadcast_to(part, tuple(shape)) for part in parts]
        return np.logical_and.reduce(parts)

    def window(self, name, lo, hi):
        """Slices of array ``name`` holding the volume's voxels [lo, hi) (per axis of it)."""
        return tuple(slice(l // f, -(-h // f)) for l, h, f in zip(lo, hi, self.factor[name]))

    def _footprint_hits(self, name, origin, shape):
        """Positive voxels of array ``name`` under each block's footprint in a lattice box.

        (ny, nx) counts for a 2D array (the block's (y, x) footprint), (nz, ny,
        nx) for a 3D one, from prefix sums of the box's window (of the coarse
        array itself, for a coarse mask: see _footprint_sums).
        """
        ndim, factor = self.ndim[name], self.factor[name]
        axes = self.lattice.axis_corners(origin, shape)[3 - ndim:]
        block = self.block[3 - ndim:]
        lo, hi = (bounds[3 - ndim:] for bounds in self.lattice.voxel_box(origin, shape))
        box = self.window(name, lo, hi)
        data = self.decode(name, box)
        window = data != 0
        if name == 'labels' and self.ignore_label is not None:
            window &= data != self.ignore_label
        if not window.any():         # unwritten label chunks, empty mask: nothing to sum
            return np.zeros([len(a) for a in axes], dtype=np.int64)
        if window.all():             # inside the papyrus: every footprint is full
            return np.full([len(a) for a in axes], math.prod(block), dtype=np.int64)
        # Footprints start at offsets (in the volume's voxels) from the window's first voxel.
        return _footprint_sums(window, [a - s.start * f for a, s, f in zip(axes, box, factor)],
                               block, factor)

    def count_selected(self, origin, shape, kind=None):
        """Positions of the lattice box (origin, shape) that ``selected`` keeps."""
        return _count(self.selected(origin, shape, kind), shape)

    def positions_of(self, visit):
        """Lattice positions (n, 3) of a visit, in its order.

        The box's positions on the mask are numbered in raster order (for a 2D
        mask: layer by layer); a shuffled visit takes them through its
        permutation.
        """
        index = np.arange(visit.first, visit.stop)
        valid = self.selected(visit.origin, visit.shape, visit.kind)
        if visit.key is not None:
            index = _permute(index, _count(valid, visit.shape), visit.key)
        if valid is None:
            local = np.unravel_index(index, visit.shape)
        elif valid.ndim == 2:
            cells = np.flatnonzero(valid)
            z, cell = np.divmod(index, len(cells))
            local = (z, *np.unravel_index(cells[cell], visit.shape[1:]))
        else:
            local = np.unravel_index(np.flatnonzero(valid)[index], visit.shape)
        return np.stack(local, axis=1) + np.asarray(visit.origin)


# -- how many samples each source gives ------------------------------------

def _weighted_shares(total, weights):
    """Per-source counts adding up to ``total``, each its weight's share of it.

    Largest remainder: each source gets the floor of ``total * w / sum(w)``
    (exact rational arithmetic), and the samples left over go one each to the
    sources with the largest fractional parts, ties to the lower source index.
    A weight of 0 gets nothing. Capacities are checked when the dataset is built.
    """
    weights = [fractions.Fraction(w) for w in weights]       # exact, floats included
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in order[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _random_shares(total, capacities, method, rng):
    """Random per-source sample counts adding up to ``total`` (fixed for weights)."""
    if not isinstance(method, str):
        return _weighted_shares(total, method)
    counts = [0] * len(capacities)
    if method == 'proportional':
        # Multivariate hypergeometric: the count of each source among the
        # first ``total`` of one permutation over all positions.
        left, rest = total, sum(capacities)
        for i, capacity in enumerate(capacities):
            rest -= capacity
            if rest == 0:
                counts[i] = left
                break
            if capacity + rest < 10**9:
                count = int(rng.hypergeometric(capacity, rest, left))
            else:  # numpy's limit; binomial differs by O(total / positions)
                count = int(rng.binomial(left, capacity / (capacity + rest)))
                count = min(max(count, left - rest), capacity, left)
            counts[i] = count
            left -= count
        return counts
    # Uniform: each sample picks a source at random among those not yet full.
    left = total
    while left:
        open_ = [i for i, c in enumerate(capacities) if counts[i] < c]
        draws = rng.multinomial(left, [1 / len(open_)] * len(open_))
        for i, drawn in zip(open_, draws):
            taken = min(int(drawn), capacities[i] - counts[i])
            counts[i] += taken
            left -= taken
    return counts


def _fixed_shares(total, capacities, method):
    """Deterministic per-source counts: equal, proportional to capacity, or weighted."""
    if not isinstance(method, str):
        return _weighted_shares(total, method)
    counts = [0] * len(capacities)
    left = total
    while left:
        open_ = [i for i, c in enumerate(capacities) if counts[i] < c]
        weights = [capacities[i] if method != 'uniform' else 1 for i in open_]
        quota = [left * w // sum(weights) for w in weights]
        for j in range(left - sum(quota)):  # remainders go to the first sources
            quota[j] += 1
        for i, q in zip(open_, quota):
            taken = min(q, capacities[i] - counts[i])
            counts[i] += taken
            left -= taken
    return counts


# -- keyed bijections ------------------------------------------------------

def _mix64(x):
    """SplitMix64's finaliser, mod 2**64, on a uint64 array or a Python int."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


# A byte of packed mask cells as the sum of a key per bit set: linear in disjoint bits.
_BYTE_KEYS = (np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1,
                            bitorder='little').astype(np.uint64)
              @ _mix64(np.arange(8, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)))


def _key(*parts):
    """A 64-bit key derived from integers, for seeding one permutation (Python ints:
    numpy's overhead on one number costs more than the arithmetic)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = _mix64(state ^ (int(part) & _MASK64))
    return state


def _uniform(key, ids):
    """A float in [0, 1) for each of the integer ``ids``, fixed by ``key``."""
    state = _mix64(np.asarray(ids, dtype=np.uint64) ^ np.uint64(key))
    return (_mix64(state ^ np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)) / 2.0**53


def _permute(index, n, key):
    """Map ``index`` (int array in [0, n)) through a keyed bijection of [0, n).

    A balanced Feistel network on the smallest even number of bits covering n,
    with cycle walking back into [0, n): O(1) memory, whatever n is.
    """
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return index.astype(np.int64)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    round_keys = [np.uint64(_key(key, r)) for r in range(_FEISTEL_ROUNDS)]

    def encrypt(x):
        left, right = x >> shift, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        return (left << shift) | right

    out = encrypt(index)
    outside = out >= np.uint64(n)
    while outside.any():      # ends: walking a cycle always comes back to [0, n)
        out[outside] = encrypt(out[outside])
        outside = out >= np.uint64(n)
    return out.astype(np.int64)


# -- the plan of an epoch: which positions, in which visits, in which order ----
#
# A *visit* is a lattice box of one source (a region, or a run of raster rows)
# and a range [a, b) of its positions on the mask, counted in the box's own
# (permuted or raster) order. Each source gives a stream of visits whose
# lengths are known from per-region counts alone, so that any sample of the
# epoch is found by arithmetic; the plan merges the streams and groups the
# visits that a worker reads together.

class _Visit(typing.NamedTuple):
    source: int
    origin: tuple       # lattice box (in positions)
    shape: tuple
    first: int          # [first, stop) of the box's positions on the mask (of the kind)
    stop: int
    key: int            # the permutation of the box's positions, or None: raster
    kind: object = None  # True: positive positions only, False: negative, None: all


class _ShuffledVisits:
    """The visits of one source in a random epoch, giving ``total`` positions.

    Round j visits every region with positions in a random order of its own
    and takes, from the region's own random permutation of its N positions (on
    the mask, of the ``kind``), those numbered [floor(j r + u), floor((j + 1) r
    + u)) (capped at N), where r = samples_per_region * N / (the largest N of
    the source) and u is a random offset of the region. So each position has
    the same chance per round wherever it is, border regions included, and a
    visit's length follows from N: the plan never reads the mask or labels.
    """

    def __init__(self, source, lattice, region_counts, per_visit, total, key, kind=None):
        self.source, self.lattice, self.total, self.key = source, lattice, total, key
        self.kind = kind
        self.regions = np.flatnonzero(region_counts)
        self.sizes = region_counts[self.regions]
        self._cached = None
        self.count = 0
        if total == 0:
            return
        self.rate = per_visit * self.sizes / self.sizes.max()
        self.offset = _uniform(_key(key, _ROUNDING), self.regions)
        # After this many rounds every region has given all its positions.
        self.rounds = int(np.max(np.ceil((self.sizes - self.offset) / self.rate))) + 1
        self.count = self.locate(total - 1) + 1

    def _taken(self, round_):
        """Positions each region gave in rounds before ``round_``."""
        return np.minimum(self.sizes, np.floor(round_ * self.rate + self.offset).astype(np.int64))

    def _round(self, round_):
        """(regions in visiting order, their [first, stop), the visits' starts) of a round."""
        if self._cached is None or self._cached[0] != round_:
            order = _permute(np.arange(len(self.regions)), len(self.regions),
                             _key(self.key, _REGION_ORDER, round_))
            before, after = self._taken(round_)[order], self._taken(round_ + 1)[order]
            starts = int(self._taken(round_).sum()) + np.cumsum(after - before) - (after - before)
            self._cached = round_, order, before, after, starts
        return self._cached[1:]

    def locate(self, sample):
        """Index of the visit that gives the stream's ``sample``-th position."""
        low, high = 0, self.rounds      # the round: last one starting at or before sample
        while low < high:
            mid = (low + high + 1) // 2
            if int(self._taken(mid).sum()) <= sample:
                low = mid
            else:
                high = mid - 1
        _, before, after, starts = self._round(low)
        slot = int(np.searchsorted(starts + (after - before), sample, side='right'))
        return low * len(self.regions) + slot

    def start(self, visit):
        """Positions the stream gives before ``visit``."""
        if visit >= self.count:
            return self.total
        round_, slot = divmod(visit, len(self.regions))
        return int(self._round(round_)[3][slot])

    def visit(self, index):
        """The ``index``-th visit, trimmed to the stream's total."""
        round_, slot = divmod(index, len(self.regions))
        order, before, after, starts = self._round(round_)
        region = int(self.regions[order[slot]])
        origin, shape = self.lattice.region_bounds(region)
        first = int(before[slot])
        stop = first + min(int(after[slot] - before[slot]), self.total - int(starts[slot]))
        return _Visit(self.source, origin, shape, first, stop,
                      _key(self.key, _POSITION_ORDER, region), self.kind)


class _GridVisits:
    """Every position on the mask, region by region, raster order within each.

    Regions go along z innermost, then along the shorter of y and x (in
    regions), then the longer: a writer's 2D output is fed by every layer of
    a (y, x) cell in turn, and its tiles waiting for the next row of cells
    span the shorter side only.
    """

    def __init__(self, source, lattice, region_counts, total):
        self.source, self.lattice, self.total = source, lattice, total
        _, rows, columns = lattice.regions_per_axis
        order = np.arange(lattice.regions).reshape(lattice.regions_per_axis).transpose(
            (1, 2, 0) if rows >= columns else (2, 1, 0)).ravel()
        self.regions = order[region_counts[order] > 0]
        self.ends = np.cumsum(region_counts[self.regions])
        self.count = len(self.regions)

    def locate(self, sample):
        return int(np.searchsorted(self.ends, sample, side='right'))

    def start(self, visit):
        return 0 if visit == 0 else int(self.ends[min(visit, self.count) - 1])

    def visit(self, index):
        origin, shape = self.lattice.region_bounds(int(self.regions[index]))
        return _Visit(self.source, origin, shape, 0, self.start(index + 1) - self.start(index),
                      None)


class _RasterVisits:
    """The first ``total`` positions of a source in raster order, in runs.

    A run is a box of consecutive positions within one z plane: as many whole
    x-rows as a region's box allows, or part of a row when one row is too long
    for it. With a mask, a run's length is its count on the mask, which needs
    the mask: raster order is for inspection, and a shard counts the runs
    before its share.
    """

    def __init__(self, source, lattice, total, count_on_mask):
        # count_on_mask(origin, shape), or None without a mask.
        self.source, self.lattice, self.total = source, lattice, total
        self.count_on_mask = count_on_mask
        ez, ey, ex = lattice.extent
        budget = math.prod(lattice.box(lattice.region))
        depth, _, width = lattice.box((1, 1, ex))
        first_row = depth * lattice.block[1] * width
        rows = ((budget - first_row) // (depth * lattice.step[1] * width) + 1
                if budget >= first_row else 0)
        # A run: `rows` whole rows, or `piece` positions of one row.
        self.rows, self.piece = (min(rows, ey), ex) if rows else (1, lattice.region[2])
        self.pieces = -(-ex // self.piece)
        self.per_plane = -(-ey // self.rows) * self.pieces
        # With a mask, the counts so far: (run, positions before it) of the furthest run
        # counted and of the one before, so that a shard walking its runs in order counts
        # each run's mask once (and the runs before its share once).
        self._counted = [(0, 0), (0, 0)]

    def run(self, index):
        """Lattice box (origin, shape) of run ``index``."""
        z, rest = divmod(index, self.per_plane)
        band, piece = divmod(rest, self.pieces)
        origin = (z, band * self.rows, piece * self.piece)
        shape = (1, min(self.rows, self.lattice.extent[1] - origin[1]),
                 min(self.piece, self.lattice.extent[2] - origin[2]))
        return origin, shape

    def start(self, index):
        """Positions before run ``index``."""
        if self.count_on_mask is None:
            (z, y, x), _ = self.run(index)
            _, ey, ex = self.lattice.extent
            return min(self.total, (z * ey + y) * ex + x)
        run, start = max((c for c in self._counted if c[0] <= index), default=(0, 0))
        while run < index and start < self.total:
            self._counted = [self._counted[1], (run, start)]
            start += self.count_on_mask(*self.run(run))
            run += 1
            self._counted[1] = (run, start)
        return min(start, self.total)

    def locate(self, sample):
        """Index of the run that gives the ``sample``-th position."""
        if self.count_on_mask is None:
            _, ey, ex = self.lattice.extent
            z, rest = divmod(sample, ey * ex)
            band, rest = divmod(rest, self.rows * ex)
            return z * self.per_plane + band * self.pieces + rest // self.piece * (self.pieces > 1)
        index = 0
        while self.start(index + 1) <= sample:
            index += 1
        return index

    def visit(self, index):
        origin, shape = self.run(index)
        return _Visit(self.source, origin, shape, 0, self.start(index + 1) - self.start(index),
                      None)


class _EpochPlan:
    """The epoch as one sequence: the sources' visit streams merged, in groups.

    Interleaved (random epochs), the streams are merged by how far through its
    own stream each visit ends, (v + 1) / count for visit v (ties: lower source
    first), so that every source is spread over the whole epoch; a shard reads
    ``group_size`` consecutive visits of its share at a time and takes their
    positions in turn (round robin), so that consecutive items come from
    different places. Otherwise sources follow each other and a group is one
    visit. Either way sample s of the epoch is found by arithmetic on visit
    lengths: a shard starts at once.
    """

    def __init__(self, streams, group_size, interleave):
        self.streams, self.group_size, self.interleave = streams, group_size, interleave
        self.totals = np.cumsum([0] + [s.total for s in streams])

    def groups(self, first, stop, skip=0, end=None):
        """Yield the groups of the share [first, stop), its items [skip, end) only.

        Items are counted in the share's own order (default ``end``: all of
        them). Interleaved, a group is ``group_size`` consecutive visits counted
        from the one holding ``first``, each trimmed to the share, so that
        neighbouring shares read one visit in common at most; the group holding
        item ``skip`` (or ``end``) is read in part, in the order it has in the
        whole share.
        """
        end = stop - first if end is None else end
        if not self.interleave:
            yield from self._one_visit_groups(first + skip, first + end)
            return
        if skip >= end:
            return
        merge = _Merge(self.streams)
        origin = merge.seek(first).ordinal
        if skip:                     # resume at the group holding item ``skip``
            holding = merge.seek(first + skip).ordinal
            merge.seek_ordinal(origin + (holding - origin) // self.group_size * self.group_size)
        while merge.sample < first + end and not merge.done:
            begin, visits = merge.sample, []
            while len(visits) < self.group_size and not merge.done:
                visits.append((merge.sample, merge.advance()))
            lo, hi = max(first, begin), min(stop, merge.sample)
            trimmed = []
            for start, visit in visits:
                a, b = max(first - start, 0), min(stop - start, visit.stop - visit.first)
                if a < b:
                    trimmed.append(visit._replace(first=visit.first + a, stop=visit.first + b))
            if trimmed:              # visits of a round may all be empty (tiny regions)
                yield _Group.of(trimmed, first + skip - lo, min(hi, first + end) - lo)

    def _one_visit_groups(self, first, stop):
        """Sources one after the other, one visit a group, samples [first, stop)."""
        source = int(np.searchsorted(self.totals, first, side='right')) - 1
        index = self.streams[source].locate(first - int(self.totals[source]))
        while first < stop:
            stream = self.streams[source]
            begin = int(self.totals[source]) + stream.start(index)
            if begin >= self.totals[source + 1]:
                source, index = source + 1, 0
                continue
            visit = stream.visit(index)
            if visit.stop > visit.first:
                yield _Group.of([visit], first - begin, stop - begin)
            first, index = max(first, begin + visit.stop - visit.first), index + 1


class _Merge:
    """A place in the merge of visit streams: the next visit of each stream.

    Visit v of stream i ends at fraction (v + 1) / count_i of its stream; the
    merge orders visits by (fraction, i). The visits at or before fraction t
    are a prefix of it, the first floor(t * count_i) of each stream, so a seek
    bisects t = p / scale and then steps through the visits that share the
    next fraction. The scale tells every two fractions apart: their common
    denominator, or past counts**2 when that is smaller. Stepping on is a
    heap of each stream's next visit: O(log streams) a visit.
    """

    def __init__(self, streams):
        self.streams = streams
        self.counts = [s.count for s in streams]
        self._scale = min(math.lcm(*filter(None, self.counts)),
                          1 << (2 * max(self.counts).bit_length() + 1))
        self._place([0] * len(streams))

    def _place(self, nexts):
        self.nexts = list(nexts)
        self.ordinal = sum(nexts)                    # visits before this place
        self.sample = self._samples(nexts)           # samples before it
        self._heap = [(fractions.Fraction(n + 1, c), i)
                      for i, (n, c) in enumerate(zip(nexts, self.counts)) if n < c]
        heapq.heapify(self._heap)

    @property
    def done(self):
        return not self._heap

    def advance(self):
        """The next visit of the merge; step past it."""
        _, source = heapq.heappop(self._heap)
        index = self.nexts[source]
        visit = self.streams[source].visit(index)
        self.nexts[source] = index + 1
        self.ordinal += 1
        self.sample += visit.stop - visit.first
        if index + 1 < self.counts[source]:
            heapq.heappush(self._heap,
                           (fractions.Fraction(index + 2, self.counts[source]), source))
        return visit

    def _length(self):
        """Length of the next visit."""
        source = self._heap[0][1]
        stream, index = self.streams[source], self.nexts[source]
        return stream.start(index + 1) - stream.start(index)

    def _samples(self, nexts):
        """Samples of the visits before ``nexts`` (each stream's next visit)."""
        return sum(s.start(n) for s, n in zip(self.streams, nexts))

    def _prefix(self, p):
        """Each stream's visits at or before fraction ``p / scale``."""
        return [min(c, p * c // self._scale) for c in self.counts]

    def _bisect(self, measure, target):
        """Place at the largest fraction t whose prefix has ``measure(nexts) <= target``."""
        low, high = 0, self._scale
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if measure(self._prefix(mid)) <= target else (low, mid - 1)
        self._place(self._prefix(low))

    def seek(self, sample):
        """Place at the visit holding epoch sample ``sample`` (at the end, if none)."""
        self._bisect(self._samples, sample)
        while not self.done and self.sample + self._length() <= sample:
            self.advance()
        return self

    def seek_ordinal(self, ordinal):
        """Place before visit ``ordinal`` of the merge."""
        self._bisect(sum, ordinal)
        while self.ordinal < ordinal:
            self.advance()
        return self


class _Group(typing.NamedTuple):
    """Visits read together, and the order of their samples: (visit, index)."""
    visits: list
    order: np.ndarray      # (n, 2): the lane (visit) and the index of the visit's position

    @classmethod
    def of(cls, visits, first, stop):
        """The round-robin order of ``visits``, restricted to its samples [first, stop).

        Each visit keeps only the positions the range uses, so that nothing
        outside the shard's share is read.
        """
        lengths = np.array([v.stop - v.first for v in visits])
        lanes = np.repeat(np.arange(len(visits)), lengths)
        index = np.arange(len(lanes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        order = np.argsort(index, kind='stable')[max(first, 0):stop]   # round by round
        lanes, index = lanes[order], index[order]
        kept, low = np.full(len(visits), -1), np.zeros(len(visits), dtype=np.int64)
        trimmed = []
        for lane in np.unique(lanes):
            mine = index[lanes == lane]          # increasing: one run of the visit
            kept[lane], low[lane] = len(trimmed), mine[0]
            visit = visits[lane]
            trimmed.append(visit._replace(first=visit.first + int(mine[0]),
                                          stop=visit.first + int(mine[-1]) + 1))
        return cls(trimmed, np.stack([kept[lanes], index - low[lanes]], axis=1))


# -- a shard's share: the split over ranks and workers ------------------------

# A *span* (first, stop, begin, end) is the items [begin, end) of the share [first,
# stop) of the epoch, counted in the order that share is read in (_EpochPlan.groups). A
# *part* of an epoch is a list of spans, in epoch order; the shards of an iteration
# split the concatenation of its items as they split a whole epoch (part None), into
# contiguous shares at most one apart. What the shards of an interrupted iteration had
# not delivered is such a part (one span per shard of a whole epoch): so a resumed epoch
# is read in its old shards' groups, and its iteration can be interrupted and merged again.

@dataclasses.dataclass
class _Place:
    """Where an iteration is in its epoch: what ``state_dict`` saves (None: not begun)."""
    epoch: int = None
    shard: int = None           # rank * workers + worker, of ``shards``
    shards: int = None
    yielded: int = 0            # items of the shard's share delivered so far
    part: list = None           # the part of the epoch the shards split (None: all of it)


def _split_by_rank_and_worker(rank, world_size, worker, skip_batches):
    """``(workers, shard, shards)`` of this DataLoader worker (``get_worker_info()``).

    Shard ``rank * workers + worker`` of ``world_size * workers``, so that
    shards in rank order are the epoch in order. A DataLoader asks its workers
    for batches in turn from worker 0: after ``skip_batches``, worker 0 takes
    over the share whose turn came next.
    """
    workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
    worker_id = (worker_id + skip_batches) % workers
    return workers, rank * workers + worker_id, world_size * workers


def _shard_bounds(total, shards, shard):
    """``[first, stop)`` of shard ``shard`` of ``shards``: contiguous, sizes at most one apart."""
    return total * shard // shards, total * (shard + 1) // shards


def _length(part, total):
    """Items of ``part`` of an epoch of ``total`` items (None: the whole epoch)."""
    return total if part is None else sum(end - begin for _, _, begin, end in part)


def _spans(total, part, shards, shard):
    """The spans of shard ``shard`` of ``shards`` of ``part`` (None: the whole epoch)."""
    if part is None:
        first, stop = _shard_bounds(total, shards, shard)
        return [(first, stop, 0, stop - first)] if first < stop else []
    lo, hi = _shard_bounds(_length(part, total), shards, shard)
    spans, before = [], 0            # items of the part before the span
    for first, stop, begin, end in part:
        a, b = max(lo - before, 0), min(hi - before, end - begin)
        if a < b:
            spans.append((first, stop, begin + a, begin + b))
        before += end - begin
    return spans


def _after(spans, count):
    """``spans`` without their first ``count`` items."""
    left = []
    for first, stop, begin, end in spans:
        skipped = min(count, end - begin)
        count -= skipped
        if begin + skipped < end:
            left.append((first, stop, begin + skipped, end))
    return left


def _joined(spans):
    """``spans`` with consecutive items of one share in one span."""
    joined = []
    for span in spans:
        if joined and joined[-1][:2] == span[:2] and joined[-1][3] == span[2]:
            joined[-1] = (*span[:2], joined[-1][2], span[3])
        else:
            joined.append(tuple(span))
    return joined


_SHARD_KEYS = {'epoch', 'shard', 'shards', 'yielded', 'part', 'config'}
_MERGED_KEYS = {'epoch', 'part', 'config'}


def _is_merged(state):
    """Whether ``state`` is a merged state (else a shard's); refuses what is neither."""
    if not isinstance(state, dict):
        raise TypeError(f"a VesuviusStream state is a dict, got {type(state).__name__}")
    if state.keys() not in (_SHARD_KEYS, _MERGED_KEYS):
        raise ValueError(f"not a VesuviusStream state: keys {sorted(map(str, state))}, "
                         f"expected {sorted(_SHARD_KEYS)} (a shard's) or "
                         f"{sorted(_MERGED_KEYS)} (merged)")
    if not isinstance(state['config'], dict):
        raise TypeError(f"the state's config is a dict, got "
                        f"{type(state['config']).__name__}")
    return state.keys() == _MERGED_KEYS


def _epoch_config(config):
    """A state's configuration without the rank and world size: what a merged state keeps."""
    return {key: value for key, value in config.items() if key not in ('rank', 'world_size')}


def _checked_part(part, total):
    """``part`` (JSON's lists or tuples) as a list of span tuples, checked: each a
    nonempty part of a share within the epoch's ``total`` items, none overlapping."""
    if part is None:
        return None
    if not isinstance(part, (list, tuple)):
        raise TypeError(f"the state's part is a list of spans, got {type(part).__name__}")
    spans = []
    for span in part:
        if not (isinstance(span, (list, tuple)) and len(span) == 4
                and all(map(_is_int, span))):
            raise TypeError(f"a span of the state's part is 4 ints (first, stop, begin, end), "
                            f"got {span!r}")
        first, stop, begin, end = map(int, span)
        if not (0 <= first < stop <= total and 0 <= begin < end <= stop - first):
            raise ValueError(f"the state's span {list(span)} is not a nonempty part of a share "
                             f"of the epoch's {total} items")
        spans.append((first, stop, begin, end))
    share, reach = (0, 0), 0         # the share met last, and how far its spans went
    for first, stop, begin, end in sorted(spans):
        if (first, stop) != share:
            if first < share[1]:
                raise ValueError(f"the state's part has overlapping shares: [{share[0]}, "
                                 f"{share[1]}) and [{first}, {stop})")
            share, reach = (first, stop), 0
        if begin < reach:
            raise ValueError(f"the state's part has the items of share [{first}, {stop}) "
                             f"from {begin} twice")
        reach = end
    return spans


def _checked_place(state, total):
    """The _Place of a shard's state (keys and config already checked), its types and
    ranges checked: ``yielded`` within its shard's share of the part."""
    if state['shard'] is None:   # saved before this worker yielded anything (of a merged
        epoch = state['epoch']   # state's epoch and part, if one was loaded)
        if ((state['shards'], state['yielded']) != (None, 0)
                or (epoch is None) != (state['part'] is None)
                or not (epoch is None or _is_int(epoch) and epoch >= 0)):
            raise ValueError(f"a state without a shard has shards None, yielded 0, and an "
                             f"epoch and part, or neither, got {state!r}")
        return _Place(epoch=epoch, part=_checked_part(state['part'], total))
    for name in ('epoch', 'shard', 'shards', 'yielded'):
        if not _is_int(state[name]):
            raise TypeError(f"the state's {name} is an int, got {state[name]!r}")
    epoch, shard, shards, yielded = (int(state[name])
                                     for name in ('epoch', 'shard', 'shards', 'yielded'))
    if epoch < 0 or not 0 <= shard < shards:
        raise ValueError(f"the state's epoch {epoch} or shard {shard} of {shards} is out of "
                         f"range")
    part = _checked_part(state['part'], total)
    share = _length(_spans(total, part, shards, shard), total)
    if not 0 <= yielded <= share:
        raise ValueError(f"the state's yielded={yielded} is outside [0, {share}], the share "
                         f"of shard {shard} of {shards}")
    return _Place(epoch, shard, shards, yielded, part)


# torchdata's StatefulDataLoader.state_dict(): with workers, '_snapshot' holds each
# worker's state as of the last batch handed out ('_worker_snapshots', the dataset's
# under 'dataset_state') and '_steps_since_snapshot' the batches handed out since (0 with
# its default snapshot_every_n_steps=1); without workers, 'dataset_state' is the dataset's.

def _shard_states(state, name):
    """``[(name, state)]``: the shard states in a rank's saved ``state``, each checked,
    those saved before their shard began numbered (rank * workers + worker)."""
    if not isinstance(state, dict):
        raise TypeError(f"{name} is a {type(state).__name__}, not a state dict")
    try:
        if '_snapshot' in state:
            if state['_steps_since_snapshot']:
                raise ValueError(
                    f"{name} was saved {state['_steps_since_snapshot']} batches after the "
                    f"StatefulDataLoader's last snapshot: it does not hold what its workers "
                    f"delivered since. Save it when the batches are a multiple of "
                    f"snapshot_every_n_steps (or keep its default, 1)")
            snapshot = state['_snapshot']
            workers = snapshot['_main_snapshot']['_num_workers']
            found = [(f"{name} (worker {worker['worker_id']})", worker['dataset_state'],
                      worker['worker_id'], workers)
                     for worker in snapshot['_worker_snapshots'].values()]
        elif 'dataset_state' in state:
            found = [(name, state['dataset_state'], 0, 1)]
        else:
            found = [(name, state, 0, 1)]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{name} is not a StatefulDataLoader state: no {error}") from None
    shards = []
    for label, shard_state, worker, workers in found:
        try:
            if _is_merged(shard_state):
                raise ValueError("a merged state, not a shard's")
            total, rank, world_size = (shard_state['config'].get(key) for key in
                                       ('samples_per_epoch', 'rank', 'world_size'))
            if not all(map(_is_int, (total, rank, world_size, worker, workers))):
                raise TypeError(f"samples_per_epoch, rank and world_size are ints, got "
                                f"{total!r}, {rank!r}, {world_size!r}")
            place = _checked_place(shard_state, total)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{label}: {error}") from None
        if place.shard is None:
            place.shard, place.shards = rank * workers + worker, world_size * workers
        shards.append((label, {**dataclasses.asdict(place), 'config': shard_state['config']}))
    return shards


def _delivered(total, shards, shard, workers, batches, batch_size):
    """Items shard ``shard`` gave to the first ``batches`` batches of its rank's DataLoader.

    A DataLoader takes batches from its workers in turn (worker 0, 1, ...),
    skipping workers that have none left; shares differ by at most one item,
    so batch counts per worker differ by at most one.
    """
    if not batches:
        return 0
    rank_first = shard - shard % workers
    shares = [_shard_bounds(total, shards, s) for s in range(rank_first, rank_first + workers)]
    counts = [-(-(stop - first) // batch_size) for first, stop in shares]
    fewest = min(counts)
    mine = shard - rank_first
    if batches <= fewest * workers:
        taken = batches // workers + (mine < batches % workers)
    else:
        more = [w for w, c in enumerate(counts) if c > fewest][:batches - fewest * workers]
        taken = fewest + (mine in more)
    first, stop = shares[mine]
    return min(taken * batch_size, stop - first)


# -- reading: boxes decoded ahead in a background thread, within the budget --

class _Counters:
    """What this process spent reading and cutting, summed over its iterations.

    The hook benchmark.py measures through (``streamer._COUNTERS``, one per
    process: a DataLoader worker has its own): seconds decoding boxes and the
    bytes of the chunks they overlap (whole chunks: what zarr decodes), timed
    per box on the clock (zarr decodes in threads of its own), the cutting
    thread's CPU seconds cutting blocks into items (timed per block) or into
    batches (per batch: the plan's steps between blocks too, not its waits for
    boxes), and batches made in fresh shared memory and in reused buffers (see
    _BatchBuffer). ``snapshot()`` gives them as a dict.
    """

    def __init__(self):
        self.decode_seconds = self.decoded_bytes = self.cut_seconds = 0
        self.batches = [0, 0]              # made fresh, cut into a reused buffer
        self._lock = threading.Lock()      # the reader thread and the cutting one decode

    def decoded(self, seconds, nbytes):
        with self._lock:
            self.decode_seconds += seconds
            self.decoded_bytes += nbytes

    def snapshot(self):
        return {'decode_seconds': self.decode_seconds, 'decoded_bytes': self.decoded_bytes,
                'cut_seconds': self.cut_seconds, 'fresh_batches': self.batches[0],
                'buffered_batches': self.batches[1]}


_COUNTERS = _Counters()


class _Slot:
    """A box some lane needs, decoded once and shared by every lane that cuts from it."""

    def __init__(self, key, nbytes):
        self.key, self.nbytes = key, nbytes   # key: (source, voxel origin, voxel end)
        self.users = 0              # lanes of posted groups that still cut from it
        self.future = None          # its decoding, once started
        self.small = nbytes <= _SMALL_BOX


class _Reader:
    """A shard's groups with their boxes, decoded by one background thread.

    Iterate for ``(group, [(slot, corners) per lane])``: a lane's corners are
    those of its visit's blocks, its slot the box they are cut from, keyed by
    source and voxel bounds and so shared by every lane that needs it while
    one does, in this group or the next. One thread decodes the boxes as
    futures, in the order the cutting first needs them: the boxes of the
    group being cut whatever they weigh (so that any block reads), then the
    next group's while the boxes held fit ``budget`` bytes. Everything else
    (planning a group, the budget) runs in the iterating thread.
    ``box(slot, corner)`` gives a box holding the block at ``corner``,
    waiting for it and raising its decoding error (which names the source);
    ``release(slot)`` ends a lane's use of it; ``close()`` ends the thread.

    First batch soon: nothing is ahead at the start, and the first batch
    would wait for most of the first group's boxes, since its items come
    from every lane in turn. So in the first group ``box`` reads the first
    ``_FIRST_BLOCKS`` blocks alone, straight from the store (as per-sample
    reading would), and holds the boxes of more than ``_SMALL_BOX`` back
    meanwhile: decoding them beside those reads would slow the reads down
    several times. Small boxes are decoded at once, and their blocks cut
    from them. A lane may so be done, and released, before its box is
    decoded: the box is then never decoded.
    """

    def __init__(self, sources, groups, budget):
        self._sources, self._groups, self._budget = sources, groups, budget
        self._live = {}             # key -> slot: boxes some posted lane still needs
        self._held = 0              # bytes of live boxes decoded or being decoded
        self._waiting = collections.deque()   # (slot, needed now) not started, in order
        self._first = True          # cutting the first group
        self._alone = 0             # blocks of the first group read alone
        self._pool = concurrent.futures.ThreadPoolExecutor(1, 'VesuviusStream reader')
        self._running = []          # futures started, kept only until done: close() asks

    def __iter__(self):
        groups = iter(self._groups)
        ahead = self._post(groups)
        while ahead is not None:
            if isinstance(ahead, Exception):       # planning it failed: after the items before
                raise ahead
            # The next group is posted before this one is cut, so that the boxes
            # they share stay live while this one's lanes are released.
            (group, lanes), ahead = ahead, self._post(groups)
            self._waiting.clear()
            for planned, now in (((group, lanes), True), (ahead, False)):
                if planned is not None and not isinstance(planned, Exception):
                    slots = [planned[1][lane][0] for lane in
                             np.unique(planned[0].order[:, 0], return_index=True)[1].argsort()]
                    # Small boxes first: the first group's blocks of the others are read
                    # alone while those are held back.
                    self._waiting += [(slot, now) for slot in sorted(slots, key=lambda slot:
                                                                      self._first and
                                                                      not slot.small)]
            self._start()
            yield group, lanes
            self._first = False

    def box(self, slot, corner):
        """A box holding the block at ``corner`` of a lane of ``slot``: the block
        alone, read now (see above), or the slot's box once decoded."""
        if self._holds_back(slot):
            source = self._sources[slot.key[0]]
            block = source.read(corner, corner + source.block)
            self._alone += 1
            self._start()
            return block
        return slot.future.result()

    def release(self, slot):
        """End a lane's use of ``slot``; its box is let go after the last lane's."""
        slot.users -= 1
        if slot.users == 0:
            del self._live[slot.key]
            if slot.future is not None:
                slot.future.cancel()            # if not begun; else dropped once decoded
                self._held -= slot.nbytes
                slot.future = None              # the group's lanes still hold the slot
            self._running = [future for future in self._running if not future.done()]
            self._start()

    def close(self):
        """Cancel what is not begun and end the thread, at once."""
        if any(not future.done() for future in self._running):
            # It may wait on a server that stopped answering (and Ctrl-C does not reach
            # it): cancel the remote requests of its sources, so that it ends now.
            for source in self._sources:
                for array in (source.volume, source.labels, source.mask):
                    if isinstance(getattr(array, 'store', None), _RemoteStore):
                        array.store.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _holds_back(self, slot):
        """Whether blocks of ``slot`` are read alone, its box held back: in the first
        group, until ``_FIRST_BLOCKS`` of them."""
        return self._first and self._alone < _FIRST_BLOCKS and not slot.small

    def _start(self):
        """Start decoding the waiting boxes, in order, as far as they may be: those
        the group being cut needs unless held back, the next group's within budget."""
        while self._waiting:
            slot, now = self._waiting[0]
            if slot.future is None and slot.users:     # else shared and begun, or released
                if self._holds_back(slot) or (
                        not now and self._held + slot.nbytes > self._budget):
                    return
                self._held += slot.nbytes
                slot.future = self._pool.submit(self._sources[slot.key[0]].read, *slot.key[1:])
                self._running.append(slot.future)
            self._waiting.popleft()

    def _post(self, groups):
        """The next group of ``groups`` with its lanes (a live box is shared); None at
        the end; an error planning it, to raise after the items before it."""
        try:
            group = next(groups, None)
            if group is None:
                return None
            lanes = []
            for visit in group.visits:
                source = self._sources[visit.source]
                corners = source.lattice.corners(source.selection.positions_of(visit))
                # The whole lattice box, not just the visit's positions: the visits
                # of one region share one decoded box.
                key = (visit.source, *source.lattice.voxel_box(visit.origin, visit.shape))
                slot = self._live.get(key)
                if slot is None:
                    slot = self._live[key] = _Slot(key, source.nbytes(*key[1:]))
                slot.users += 1
                lanes.append((slot, corners))
            return group, lanes
        except Exception as error:
            return error


def _failing_chunk(array, box):
    """Key of the first stored chunk (or shard) of ``box`` that fails to read, else None.

    Searched only after a read of the box failed, to name the chunk in the error.
    """
    if not isinstance(array, zarr.Array):
        return None
    shape = array.shards or array.chunks
    for cell in itertools.product(*[range(s.start // c, -(-s.stop // c))
                                    for s, c in zip(box, shape)]):
        try:
            array[tuple(slice(i * c, (i + 1) * c) for i, c in zip(cell, shape))]
        except Exception:
            key = array.metadata.encode_chunk_key(cell)
            return f"{array.path}/{key}" if array.path else key
    return None


def _native(array):
    """``array`` in native byte order (torch refuses others): a copy only if it is not."""
    return array.astype(array.dtype.newbyteorder('='), copy=False)


# -- yielding batches: each block copied once, into memory used before -------------
#
# A batch made in fresh shared memory costs more in page faults than in copying
# (on the benchmark's machine 290 us a 26x64x64 uint16 sample into fresh pages, 6 us
# into pages written before). So a DataLoader worker cuts its batches into
# *buffers*, shared memory it keeps (a memfd each), and the DataLoader passes a batch
# as a reference to its buffer (_BufferedBatch), which the receiving process maps
# once (_received_batch): the buffer's file descriptor goes with its batches only
# until the worker's parent, the DataLoader's process, has mapped it (passing one
# costs a connection to the worker's resource sharer, about 0.8 ms here), and
# coordinates go by value, in the pickle, not as tensors in shared memory of their
# own (another descriptor each). A buffer is cut into again only when nothing refers
# to its last batch in either process: the worker's tensors are gone, and the
# receiver let go of every batch it was sent (counted in the buffer's header). With
# no buffer free (a loop that keeps its batches), a batch is made in fresh shared
# memory, as collate makes its own.

_BATCH_BUFFERS = 6          # per worker and batch size: 2 in flight, a few held downstream
_HEADER = mmap.PAGESIZE     # a buffer's first page: its header (see _header)
_BUFFERS = {}               # this process's buffers: (pid, bytes) -> [_BatchBuffer]
_MAPPED = {}                # receiving process: (worker pid, inode) -> mmap of a buffer
_RECEIVED = weakref.WeakValueDictionary()   # (id, worker pid) -> a received batch's bytes
_MAPPED_LOCK = threading.RLock()    # finalizers may run while this thread holds it
_FORKED = []                        # while forking: (bytes, a copy of them) of each batch
_MAP_FIXED = 0x10                   # Linux's mmap flag (Python's mmap module lacks it)


def _empty(shape, dtype, shared):
    """An uninitialised tensor of numpy ``dtype`` (in native byte order); in shared
    memory if ``shared``, made there directly as collate makes its batches (not moved
    there, which would copy it)."""
    dtype = torch.from_numpy(np.empty(0, np.dtype(dtype).newbyteorder('='))).dtype
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _batch_views(data, parts, capacity, rows):
    """numpy views ``(rows, *shape)`` of each part ``(dtype, shape)`` of a batch laid
    out in the bytes ``data``: parts one after the other, each sized for ``capacity``
    rows and 64-byte aligned."""
    views, offset = [], 0
    for dtype, shape in parts:
        row = math.prod(shape) * np.dtype(dtype).itemsize
        views.append(data[offset:offset + rows * row].view(dtype).reshape((rows, *shape)))
        offset += -(-capacity * row // 64) * 64
    return views


def _batch_memory(parts, capacity, rows, shared, reuse):
    """``(tensors, buffer)``: a tensor ``(rows, *shape)`` of each part ``(dtype, shape)``
    to write a batch into, in a free reused buffer if ``reuse`` (buffer), else fresh,
    in shared memory if ``shared`` (buffer None). Counted in _COUNTERS. benchmark.py
    passes such batches, empty, to time the DataLoader's part."""
    nbytes = sum(-(-capacity * math.prod(shape) * np.dtype(dtype).itemsize // 64) * 64
                 for dtype, shape in parts)                  # as _batch_views lays them out
    buffer = _BatchBuffer.free_one(nbytes) if reuse else None
    _COUNTERS.batches[buffer is not None] += 1
    if buffer is not None:
        views = _batch_views(buffer.data(), parts, capacity, rows)
        return [torch.from_numpy(view) for view in views], buffer
    return [_empty((rows, *shape), dtype, shared) for dtype, shape in parts], None


def _header(mapping):
    """The int64 view of a buffer's header (in either process's mapping): batches
    sent, batches let go by the receiver, the pid of the process that mapped it."""
    return np.frombuffer(mapping, np.int64, 3)


class _BatchBuffer:
    """Shared memory a worker cuts its batches into (see above): a memfd of
    ``_HEADER`` bytes, then ``nbytes`` of batch."""

    def __init__(self, nbytes):
        self.fd = os.memfd_create('VesuviusStream batch')
        os.ftruncate(self.fd, _HEADER + nbytes)
        self.map = mmap.mmap(self.fd, _HEADER + nbytes)
        self.inode = os.fstat(self.fd).st_ino
        self.header = _header(self.map)
        self.nbytes = nbytes
        self.held = False           # tensors of this process refer to its batch

    @classmethod
    def free_one(cls, nbytes):
        """A free buffer of ``nbytes`` of this process (a new one while there are fewer
        than _BATCH_BUFFERS), else None."""
        buffers = _BUFFERS.setdefault((os.getpid(), nbytes), [])
        for buffer in buffers:
            if not buffer.held and buffer.header[0] == buffer.header[1]:
                return buffer
        if len(buffers) < _BATCH_BUFFERS and hasattr(os, 'memfd_create'):
            buffers.append(cls(nbytes))
            return buffers[-1]
        return None

    def data(self):
        """The batch's bytes (uint8), held until this array and every view of it are gone
        (numpy views and tensors made from them keep it)."""
        data = np.frombuffer(self.map, np.uint8, self.nbytes, _HEADER)
        self.held = True
        weakref.finalize(data, setattr, self, 'held', False)
        return data


def _buffered(tensors, extra, buffer, layout):
    """The batch ``tensors`` (views of ``buffer``'s data laid out as ``layout``: parts,
    capacity, rows), then the tensors ``extra`` (in no buffer), as the DataLoader
    passes it: a reference to the buffer, with ``extra`` as they are."""
    if extra or len(tensors) > 1:
        batch = _BufferedBatch(tensors + extra)
    else:
        batch = tensors[0].as_subclass(_BufferedBlocks)
    # What the buffer holds: each tensor as it was made (not names a tensor has).
    batch.made_in = [(t, _layout_of(t)) for t in tensors], buffer, layout
    return batch


def _layout_of(tensor):
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.data_ptr()


def _as_made(batch, tensors):
    """Whether ``tensors`` are still the batch's tensors as they were made: the same
    objects, shapes, strides, dtypes and memory (a collate_fn may change them in
    place), so that the buffer's reference stands for them."""
    made = batch.made_in[0]
    return len(tensors) >= len(made) and all(
        t is m and _layout_of(t) == layout for t, (m, layout) in zip(tensors, made))


def _buffer_reference(batch, extra=()):
    """``batch``'s pickle: a reference to its buffer (counted as sent once more; with
    its file descriptor unless the process this worker's batches go to, its parent,
    mapped it), and ``extra`` (see _by_value)."""
    _, buffer, layout = batch.made_in
    buffer.header[0] += 1
    mapped = buffer.header[2] == os.getppid()
    fd = None if mapped else multiprocessing.reduction.DupFd(buffer.fd)
    return _received_batch, ((fd, os.getpid(), buffer.inode, buffer.nbytes), *layout,
                             *map(_by_value, extra))


def _by_value(value):
    """``(True, array)`` for a tensor numpy can hold (its bytes go in the pickle, not in
    shared memory of their own with a descriptor to pass), else ``(False, value)``."""
    if type(value) is torch.Tensor:
        try:
            return True, value.numpy()
        except (RuntimeError, TypeError):       # needs grad, on a GPU, bfloat16...
            pass
    return False, value


def _as_is(value):
    """Unpickle ``value`` itself (a batch changed since it was made goes as its data)."""
    return value


class _BufferedBatch(list):
    """A batch's tensors (blocks, labels, coords: a list, as collate gives them) cut
    into a worker's buffer but the coords (see _buffered)."""

    def __copy__(self):         # collate's default_convert copies a list, then refills it
        batch = _BufferedBatch(self)
        batch.made_in = self.made_in
        return batch

    def __deepcopy__(self, memo):
        return copy.deepcopy(list(self), memo)

    def __reduce__(self):
        if not _as_made(self, self):
            return list, (list(self),)           # changed since it was made: its data
        return _buffer_reference(self, self[len(self.made_in[0]):])


class _BufferedBlocks(torch.Tensor):
    """A batch of blocks alone (no labels or coords) cut into a worker's buffer (see
    _buffered); operations on it give plain tensors."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        return copy.deepcopy(self.as_subclass(torch.Tensor), memo)

    def __reduce_ex__(self, protocol):
        if _layout_of(self) != self.made_in[0][0][1]:    # changed in place: its data
            return _as_is, (self.as_subclass(torch.Tensor),)
        return _buffer_reference(self)


def _received_batch(buffer, parts, capacity, rows, *extra):
    """The batch a worker sent from its ``buffer`` (file descriptor or None, worker
    pid, inode, bytes; the DataLoader's unpickling calls this): tensors over this
    process's mapping of the buffer (kept while the worker lives), then ``extra``
    (see _by_value); it counts as let go once those tensors and their views are
    gone."""
    fd, worker, inode, nbytes = buffer
    fd = None if fd is None else fd.detach()
    try:
        with _MAPPED_LOCK:
            _drop_gone_workers()
            mapped = _MAPPED.get((worker, inode))
            if mapped is None:
                if fd is None:
                    raise RuntimeError(
                        f"VesuviusStream: a batch of DataLoader worker {worker} reached "
                        f"process {os.getpid()}, but the worker's parent received its "
                        f"batches: iterate a DataLoader in the process that made it")
                mapped = _MAPPED[worker, inode] = mmap.mmap(fd, _HEADER + nbytes)
                _header(mapped)[2] = os.getpid()
    finally:
        if fd is not None:
            os.close(fd)
    data = np.frombuffer(mapped, np.uint8, nbytes, _HEADER)
    _RECEIVED[id(data), worker] = data
    weakref.finalize(data, _let_go, mapped, os.getpid()).atexit = False
    tensors = [torch.from_numpy(view) for view in _batch_views(data, parts, capacity, rows)]
    tensors += [torch.from_numpy(value) if by_value else value for by_value, value in extra]
    return tensors if len(tensors) > 1 else tensors[0]


def _let_go(mapped, pid):
    """Count a received batch as let go (not in a process forked since: its copies of
    the tensors are its own, see _after_fork_in_child)."""
    if os.getpid() == pid:
        with _MAPPED_LOCK:
            _header(mapped)[1] += 1


def _alive(pid):
    """Whether process ``pid`` runs (or is not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _drop_gone_workers():
    """Forget the mappings of workers that ended (batches still alive keep theirs)."""
    for gone in [key for key in _MAPPED if not _alive(key[0])]:
        del _MAPPED[gone]


def _before_fork():
    """About to fork: hold the lock of the mappings (so that no child inherits it held
    by another thread), forget gone workers' mappings (no child inherits them), and
    copy the received batches alive, which this process still holds, for the child
    (those of running workers: the buffers of ended ones are never cut into again)."""
    _MAPPED_LOCK.acquire()
    _drop_gone_workers()
    workers = {worker for worker, _ in _MAPPED}
    _FORKED[:] = [(data, data.tobytes()) for (_, worker), data in list(_RECEIVED.items())
                  if worker in workers]


def _after_fork_in_parent():
    _FORKED.clear()
    _MAPPED_LOCK.release()


def _after_fork_in_child():
    """In a forked child: the received batches it inherited become private memory at
    the same addresses, holding what they held at the fork (the parent may let them
    go, and their worker cut others into the buffers), as fork copies private memory;
    the mappings are dropped."""
    if _FORKED:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
    for data, saved in _FORKED:
        address = data.ctypes.data                       # page-aligned: see _HEADER
        length = -(-data.nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        if libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0) != address:
            raise OSError(ctypes.get_errno(), "VesuviusStream: cannot copy a received "
                          "batch into a forked process's own memory")
        ctypes.memmove(address, saved, data.nbytes)
    _FORKED.clear()
    _RECEIVED.clear()
    _MAPPED.clear()
    _MAPPED_LOCK.release()


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


# -- writing predictions: blended output tiles, each written once ----------------
#
# A grid's predictions go back into one output per source: each block's
# prediction covers its footprint at 1/scale (along each output axis, from
# ceil(corner / scale), so that the blocks shifted back to the border end at the
# output's border), weighted by a Gaussian (or 1), and the output is
# sum(w * p) / sum(w). The output is cut into *tiles*, its chunks along the
# spatial axes (all channels together). The number of grid positions feeding a
# tile is known from geometry and the selection alone, so the writer sums a
# tile's contributions (float64) until all are in, writes the tile once and
# forgets it: only the tiles of the blocks in flight are held (the *front*).

class _Tiling:
    """Where the blocks of one source land in its output, and which tiles are done.

    ``dims`` is 2 (an output over (y, x): every z position feeds it) or 3; a
    block's prediction has ``size`` = block / scale along those axes. Pure
    geometry and a bool per tile: it travels to DataLoader workers, which
    skip the blocks that feed only done tiles (``needed``).
    """

    def __init__(self, lattice, selection, scale, dims, shape, tile):
        self.lattice, self.selection, self.scale, self.dims = lattice, selection, scale, dims
        self.shape, self.tile = shape, tile                     # spatial, output voxels
        self.size = tuple(b // scale for b in lattice.block[3 - dims:])
        self.tiles = tuple(-(-s // t) for s, t in zip(shape, tile))
        self.done = np.zeros(self.tiles, dtype=bool)
        self._todo = None                 # summed-area table of tiles not done (needed)
        # Output start of each lattice position, per spatial axis.
        self._starts = [-(-a // scale) for a in lattice.axis_corners(
            (0, 0, 0), lattice.extent)[3 - dims:]]

    def starts(self, corners):
        """Output start (n, dims) of the blocks at voxel ``corners`` (n, 3)."""
        return -(-np.asarray(corners)[:, 3 - self.dims:] // self.scale)

    def tile_ranges(self, starts):
        """First and last tile (n, dims) each of the blocks at output ``starts`` feeds."""
        return starts // self.tile, (starts + self.size - 1) // self.tile

    def box(self, index):
        """Output voxels [start, end) per axis of tile ``index``."""
        start = tuple(i * t for i, t in zip(index, self.tile))
        return start, tuple(min(s + t, n) for s, t, n in zip(start, self.tile, self.shape))

    def expected(self, index):
        """Grid positions on the mask whose footprint overlaps tile ``index``.

        Counted over slabs of a region's depth: a 2D output's tile gathers
        every layer, and a 3D mask is read a slab at a time.
        """
        (start, end), origin, shape = self.box(index), [0, 0, 0], list(self.lattice.extent)
        for axis, s, e, n, starts in zip(range(3 - self.dims, 3), start, end, self.size,
                                         self._starts):
            first = int(np.searchsorted(starts, s - n + 1))     # start + n > s
            origin[axis], shape[axis] = first, int(np.searchsorted(starts, e)) - first
        if not all(shape):
            return 0
        depth, stop = self.lattice.region[0], origin[0] + shape[0]
        return sum(self.selection.count_selected((z, *origin[1:]),
                                                 (min(depth, stop - z), *shape[1:]))
                   for z in range(origin[0], stop, depth))

    def needed(self, corners):
        """Which blocks at ``corners`` (n, 3) feed a tile that is not done."""
        low, high = self.tile_ranges(self.starts(corners))
        if self._todo is None:     # once: tiles done meanwhile only make blocks useless
            self._todo = np.pad(~self.done, [(1, 0)] * self.dims).astype(np.int64)
            for axis in range(self.dims):
                np.cumsum(self._todo, axis=axis, out=self._todo)
        todo = self._todo
        # Tiles not done in each block's range, by inclusion-exclusion on the table.
        count = 0
        for signs in itertools.product((0, 1), repeat=self.dims):
            index = tuple(h + 1 if s else l for s, l, h in zip(signs, low.T, high.T))
            count = count + (-1) ** (self.dims - sum(signs)) * todo[index]
        return count > 0


def _needed_groups(groups, sources, tilings):
    """The grid's groups (one visit each) without the blocks that feed only done tiles
    of a resuming writer's ``tilings`` (None: an output not begun)."""
    for group in groups:
        visit = group.visits[0]
        tiling, source = tilings[visit.source], sources[visit.source]
        if tiling is not None:
            keep = tiling.needed(source.lattice.corners(source.selection.positions_of(visit)))
            group = group._replace(order=group.order[keep[group.order[:, 1]]])
        if len(group.order):
            yield group


def _blend_weights(size, blend):
    """Weights (*size) of a prediction: per axis exp(-(i - (n - 1)/2)**2 / (2 (n/8)**2)),
    multiplied ('gaussian'), or ones ('constant')."""
    weights = np.ones(())
    for n in size:
        along = np.exp(-(np.arange(n) - (n - 1) / 2) ** 2 / (2 * (n / 8) ** 2))
        weights = np.multiply.outer(weights, along if blend == 'gaussian' else np.ones(n))
    return weights


def _writer_folder(output):
    """The writer's working folder beside ``output``: None for an array in no local folder."""
    if not isinstance(output, zarr.Array):
        return os.path.normpath(os.fspath(output)) + '.writer'
    if isinstance(output.store, zarr.storage.LocalStore):
        return os.path.normpath(os.path.join(str(output.store.root), output.path)) + '.writer'
    return None


class _Tile:
    """The sums of one open tile, its output start ``low``, the contributions they
    hold and those expected. ``sums`` (C + 1, *tile) float64: sum(w p) per channel,
    then sum(w)."""

    def __init__(self, sums, low, count, expected):
        self.sums, self.low, self.count, self.expected = sums, low, count, expected


class _Writer:
    """``VesuviusStream.writer``'s context manager (see there).

    Each output has a working folder beside it, ``<output>.writer`` (when the
    output is a path, or an array in a local store): a journal of done tiles per
    rank (one line per tile, appended after the tile is written), open tiles
    spilled beyond ``_FRONT_BYTES``, and each rank's partial tiles at the end
    of a multi-rank run. It is removed once the outputs are complete.
    """

    def __init__(self, dataset, outputs, scale, blend, channels, resume):
        if dataset.sampling_method != 'grid' or not dataset.return_coords:
            raise ValueError("writer needs a 'grid' dataset with return_coords=True (the "
                             "coordinates place each prediction): build it with "
                             "VesuviusStream(..., None, 'grid', return_coords=True)")
        if isinstance(outputs, (str, os.PathLike, zarr.Array)):
            outputs = [outputs]
        outputs = list(outputs)
        if len(outputs) != len(dataset._sources):
            raise ValueError(f"writer needs one output per source: {len(dataset._sources)} "
                             f"sources, {len(outputs)} outputs")
        self.dataset, self.scale = dataset, _positive_int('scale', scale)
        self._check_scale(2)
        if blend not in ('gaussian', 'constant'):
            raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
        self.channels = None if channels is None else _positive_int('channels', channels)
        self.blend = blend
        self.rank, self.world_size = dataset.rank, dataset.world_size
        if self.world_size > 1 and not (torch.distributed.is_available()
                                        and torch.distributed.is_initialized()):
            raise ValueError(f"a writer over {self.world_size} ranks waits for the other "
                             f"ranks at its end: initialize torch.distributed first")
        self.paths = [None if isinstance(o, zarr.Array) else os.fspath(o) for o in outputs]
        self.arrays = [o if isinstance(o, zarr.Array) else None for o in outputs]
        self.folders = [_writer_folder(o) for o in outputs]
        for index, (path, array, folder) in enumerate(zip(self.paths, self.arrays,
                                                          self.folders)):
            if folder is None and (resume or self.world_size > 1):
                raise ValueError(f"output {index} is a zarr array outside a local folder: "
                                 f"resume and several ranks need a folder beside it for "
                                 f"the journal; give a path or an array in a LocalStore")
            if not resume:
                for there in ((path,) if path else ()) + ((folder,) if folder else ()):
                    if os.path.lexists(there):
                        raise FileExistsError(
                            f"output {index}: {there} exists; the writer does not replace "
                            f"what it did not make: pass resume=True to finish an "
                            f"interrupted run, or remove it (or give another path)")
            if array is not None and array.read_only:
                raise ValueError(f"output {index} is opened read-only: open it with "
                                 f"mode='r+' or 'a'")
        self.tilings = [None] * len(outputs)
        self._open = collections.OrderedDict()       # (source, tile) -> _Tile, oldest first
        self._spilled = {}                           # key -> (count, expected), on disk
        self._held = 0                               # bytes of the open tiles in RAM
        self._journals = {}
        self._weights = None
        if resume:
            for index in range(len(outputs)):
                self._resume(index)
            dataset._writing = self.tilings
        self._barrier()            # every rank checked and read the journals before any writes

    def _check_scale(self, dims):
        """Refuse a scale that does not divide the block and stride along the output's axes."""
        for name, sizes in (('block', self.dataset.block), ('stride', self.dataset._step)):
            if any(s % self.scale for s in sizes[3 - dims:]):
                raise ValueError(
                    f"scale={self.scale} must divide the {name} {tuple(sizes)} along the "
                    f"{'yx' if dims == 2 else 'zyx'} axes of a {dims}D output, so that each "
                    f"prediction is the block at 1/{self.scale} and the grid's steps land "
                    f"on output voxels; choose a scale that divides them")

    # -- the outputs: opened or made at the first prediction ----------------------

    def _setup(self, index, dims):
        """Tiling of output ``index`` for ``dims`` spatial axes, its array opened or made."""
        self._check_scale(dims)
        source = self.dataset._sources[index]
        spatial = tuple(-(-s // self.scale) for s in source.shape[3 - dims:])
        shape = spatial if self.channels is None else (self.channels, *spatial)
        array = self.arrays[index]
        if array is None and self.paths[index] is not None and os.path.exists(self.paths[index]):
            array = zarr.open_array(self.paths[index], mode='r+')
        if array is None:
            array = self._create(index, shape, dims)
        if tuple(array.shape) != shape:
            raise ValueError(f"output {index} has shape {tuple(array.shape)}; source {index} "
                             f"of shape {source.shape} at scale={self.scale} with channels="
                             f"{self.channels} and {dims}D predictions needs {shape}")
        self.arrays[index] = array
        tile = tuple(array.chunks[len(shape) - dims:])
        tiling = _Tiling(source.lattice, source.selection, self.scale, dims, spatial, tile)
        if self.tilings[index] is not None:
            tiling.done = self.tilings[index].done
        self.tilings[index] = tiling
        return tiling

    def _create(self, index, shape, dims):
        """A new float32 Zarr array at path ``index``, chunks ``_TILE_2D`` or ``_TILE_3D``.

        Ranks make it at their first prediction, in the working folder, and move
        it into place by a rename: the path never holds a half-made array.
        """
        path, folder = self.paths[index], self.folders[index]
        os.makedirs(folder, exist_ok=True)       # first: an output without it is complete
        spatial = _TILE_2D if dims == 2 else _TILE_3D
        chunks = tuple(min(c, n) for c, n in zip((*shape[:len(shape) - dims], *spatial),
                                                  shape))
        staging = os.path.join(folder, f'array-{self.rank}-{os.getpid()}')
        zarr.create_array(staging, shape=shape, chunks=chunks, dtype='float32', fill_value=0)
        try:
            os.rename(staging, path)            # the path appears with its metadata
        except OSError:                         # another rank's came first
            if not os.path.isfile(os.path.join(path, 'zarr.json')):
                raise
            shutil.rmtree(staging)
        return zarr.open_array(path, mode='r+')

    def _resume(self, index):
        """Read output ``index``'s journal; drop sums an interrupted run left."""
        path, folder = self.paths[index], self.folders[index]
        if not os.path.isdir(folder):
            if path is not None and os.path.exists(path):   # made, then completed
                array = zarr.open_array(path, mode='r')
                dims = array.ndim - (self.channels is not None)
                self._setup(index, dims).done[...] = True
            return
        for name in os.listdir(folder):       # what a run that did not end left unfinished
            if not name.startswith('done-'):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        lines = []
        for name in sorted(os.listdir(folder)):
            if name.startswith('done-'):
                with open(os.path.join(folder, name)) as file:
                    lines += [line.split() for line in file.read().split('\n')[:-1]]
        if path is not None and not os.path.exists(path):
            return
        array = self.arrays[index] or zarr.open_array(path, mode='r')
        tiling = self._setup(index, array.ndim - (self.channels is not None))
        for line in lines:                  # a line is complete: its tile was written
            tiling.done[tuple(map(int, line))] = True

    # -- adding predictions ---------------------------------------------------

    def __enter__(self):
        return self

    def add(self, predictions, coords):
        """Add the predictions ``(B, [C,] [d',] h', w')`` of the blocks at ``coords``
        ``(B, 4)``, as a grid DataLoader yields them."""
        if isinstance(predictions, torch.Tensor):
            predictions = predictions.detach().cpu()
            if predictions.dtype == torch.bfloat16:     # which numpy does not have
                predictions = predictions.float()
            predictions = predictions.numpy()
        if isinstance(coords, torch.Tensor):
            coords = coords.cpu().numpy()
        predictions, coords = np.asarray(predictions), np.asarray(coords)
        block = self.dataset.block
        lead = 1 + (self.channels is not None)
        dims = predictions.ndim - lead
        if coords.ndim != 2 or coords.shape[1] != 4 or len(coords) != len(predictions):
            raise ValueError(f"coords must be (B, 4) (file, z, y, x) for the B = "
                             f"{len(predictions)} predictions, got shape {coords.shape}")
        expected = [(len(coords), *(() if lead == 1 else (self.channels,)),
                     *(b // self.scale for b in block[3 - d:])) for d in (2, 3)]
        if tuple(predictions.shape) not in map(tuple, expected):
            raise ValueError(
                f"predictions of shape {tuple(predictions.shape)} do not fit blocks "
                f"{block} at scale={self.scale} with channels={self.channels}: expected "
                f"{expected[0]} (a 2D output over y, x) or {expected[1]} (3D)")
        if not np.issubdtype(predictions.dtype, np.floating):
            raise TypeError(f"predictions must be floating point, got {predictions.dtype}")
        if self._weights is None or self._weights.ndim != dims:
            self._weights = _blend_weights(expected[dims - 2][lead:], self.blend)
        # (B, C + 1, *size): w p per channel, then w.
        weighted = np.empty((len(coords), (self.channels or 1) + 1, *self._weights.shape))
        np.multiply(predictions.reshape(weighted[:, :-1].shape), self._weights,
                    out=weighted[:, :-1])
        weighted[:, -1] = self._weights
        for index in np.unique(coords[:, 0]):
            if not 0 <= index < len(self.tilings):
                raise ValueError(f"coords name file {index}; the dataset has "
                                 f"{len(self.tilings)} sources")
            tiling = self.tilings[index] or self._setup(index, dims)
            if tiling.dims != dims:
                raise ValueError(f"output {index} is {tiling.dims}D (its shape "
                                 f"{tuple(self.arrays[index].shape)}); got {dims}D predictions")
            mine = np.flatnonzero(coords[:, 0] == index)
            starts = tiling.starts(coords[mine, 1:])
            low, high = tiling.tile_ranges(starts)
            for b, start, first, last in zip(mine.tolist(), starts.tolist(), low.tolist(),
                                              high.tolist()):
                tiles = ((tuple(first),) if first == last else
                         itertools.product(*map(range, first, [h + 1 for h in last])))
                for tile in tiles:
                    if not tiling.done[tile]:
                        self._add_to(index, tiling, tile, start, weighted[b])

    def _add_to(self, index, tiling, tile, start, weighted):
        """Add one block's weighted prediction (C + 1, *size) at output ``start`` to a tile."""
        key = (index, tile)
        sums = self._open.get(key)
        if sums is None:
            sums = self._open[key] = self._load(key, tiling)
        else:
            self._open.move_to_end(key)                     # the newest
        # The block's part [a, b) in the tile, per axis: block [s, s + n), tile [l, l + t).
        into, part = [slice(None)], [slice(None)]
        for s, n, l, t in zip(start, tiling.size, sums.low, tiling.tile):
            a, b = max(s, l), min(s + n, l + t)
            into.append(slice(a - l, b - l))
            part.append(slice(a - s, b - s))
        sums.sums[tuple(into)] += weighted[tuple(part)]
        sums.count += 1
        if sums.count == sums.expected:
            del self._open[key]
            self._held -= sums.sums.nbytes
            self._write(index, tiling, tile, sums)
        elif self._held > _FRONT_BYTES and self.folders[index] is not None:
            self._spill()

    def _load(self, key, tiling):
        """An open tile's sums: spilled ones read back, else new ones."""
        index, tile = key
        if key in self._spilled:
            del self._spilled[key]
            name = self._spill_name(key)
            with np.load(name) as saved:
                sums = _Tile(saved['sums'], tiling.box(tile)[0], int(saved['count']),
                             int(saved['expected']))
            os.remove(name)
        else:
            low, high = tiling.box(tile)
            sums = _Tile(np.zeros(((self.channels or 1) + 1, *(h - l for l, h in zip(low, high)))),
                         low, 0, tiling.expected(tile))
        self._held += sums.sums.nbytes
        return sums

    def _spill(self):
        """Move the least recently fed tiles to disk until the front fits again."""
        while self._held > _FRONT_BYTES // 2 and len(self._open) > 1:
            key, sums = next(iter(self._open.items()))
            if self.folders[key[0]] is None:
                break
            del self._open[key]
            self._held -= sums.sums.nbytes
            name = self._spill_name(key)
            os.makedirs(os.path.dirname(name), exist_ok=True)
            np.savez(name, sums=sums.sums, count=sums.count, expected=sums.expected)
            self._spilled[key] = (sums.count, sums.expected)

    def _spill_name(self, key):
        index, tile = key
        return os.path.join(self.folders[index], 'spill', f'rank-{self.rank}',
                            '.'.join(map(str, tile)) + '.npz')

    def _write(self, index, tiling, tile, sums):
        """Write a complete tile, sum(w p) / sum(w) (0 where no block reached), once;
        then journal it."""
        low, high = tiling.box(tile)
        num, den = sums.sums[:-1], sums.sums[-1]
        result = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        array = self.arrays[index]
        box = tuple(slice(l, h) for l, h in zip(low, high))
        array[box if self.channels is None else (slice(None), *box)] = \
            result[0] if self.channels is None else result
        tiling.done[tile] = True
        if self.folders[index] is not None:
            journal = self._journals.get(index)
            if journal is None:
                os.makedirs(self.folders[index], exist_ok=True)
                journal = self._journals[index] = open(
                    os.path.join(self.folders[index], f'done-{self.rank}'), 'a')
            journal.write(' '.join(map(str, tile)) + '\n')
            journal.flush()                  # a SIGKILL loses no line the kernel has

    # -- the end: tiles several ranks fed, checks, clean-up -------------------------

    def __exit__(self, kind, error, traceback):
        try:
            if kind is None:
                self._finish()
        finally:
            for journal in self._journals.values():
                journal.close()
            self._journals.clear()
            for folder in self.folders:
                if folder is not None:
                    shutil.rmtree(os.path.join(folder, 'spill', f'rank-{self.rank}'),
                                  ignore_errors=True)
            self._open.clear()
            self._spilled.clear()
            self.dataset._writing = None
        return False

    def _finish(self):
        """Merge the tiles left open on several ranks; fail, on every rank, if any tile
        is still incomplete; else remove the working folders."""
        if self.world_size > 1:
            for key in list(self._open) + list(self._spilled):   # each rank's partial sums
                sums = self._open.pop(key, None) or self._load(key, self.tilings[key[0]])
                name = self._partial_name(key, self.rank)
                os.makedirs(os.path.dirname(name), exist_ok=True)
                np.savez(name + '.tmp.npz', sums=sums.sums, count=sums.count)
                os.replace(name + '.tmp.npz', name)
            self._held = 0
            self._barrier()
            incomplete = self._merge()
            total = torch.tensor([len(incomplete)])
            torch.distributed.all_reduce(total)      # also: every rank has merged its tiles
            total = int(total)
        else:
            incomplete = [(index, tile, sums.count, sums.expected)
                          for (index, tile), sums in self._open.items()]
            incomplete += [(*key, *counts) for key, counts in self._spilled.items()]
            total = len(incomplete)
        if total:
            example = (" e.g. output {} tile {}: {} of {} blocks".format(*incomplete[0])
                       if incomplete else "")
            raise ValueError(
                f"{total} output tiles did not get all their blocks' predictions{example}; "
                f"add the predictions of every block the grid yields (on every rank) before "
                f"leaving the writer; resume=True finishes an interrupted run")
        if self.rank == 0:
            for folder, array in zip(self.folders, self.arrays):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)

    def _partial_name(self, key, rank):
        index, tile = key
        return os.path.join(self.folders[index], 'partials', f'rank-{rank}',
                            '.'.join(map(str, tile)) + '.npz')

    def _merge(self):
        """Write the tiles this rank owns (tile number mod ranks) from every rank's
        partial sums; return those still incomplete."""
        incomplete = []
        for index, folder in enumerate(self.folders):
            root = os.path.join(folder, 'partials')
            if not os.path.isdir(root):
                continue
            names = sorted({name for rank in os.listdir(root)
                            for name in os.listdir(os.path.join(root, rank))})
            for name in names:
                tile = tuple(map(int, name[:-len('.npz')].split('.')))
                tiling = self.tilings[index] or self._setup(index, len(tile))
                if int(np.ravel_multi_index(tile, tiling.tiles)) % self.world_size != self.rank:
                    continue
                sums = _Tile(0, tiling.box(tile)[0], 0, tiling.expected(tile))
                for rank in range(self.world_size):
                    part = self._partial_name((index, tile), rank)
                    if os.path.exists(part):
                        with np.load(part) as saved:
                            sums.sums = sums.sums + saved['sums']
                            sums.count += int(saved['count'])
                if sums.count == sums.expected:
                    self._write(index, tiling, tile, sums)
                else:
                    incomplete.append((index, tile, sums.count, sums.expected))
        return incomplete

    def _barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()


# -- process hygiene: forked workers and malloc -------------------------------

def _zarrs_pipeline():
    """Whether zarr decodes with the zarrs codec pipeline (which hangs in a forked process)."""
    return 'zarrs' in str(zarr.config.get('codec_pipeline.path'))


def _refuse_zarrs_after_fork():
    """Raise in a forked process (a DataLoader worker) when zarr decodes with zarrs: its
    Rust thread pools do not survive a fork, and the first read would hang."""
    if os.getpid() != _IMPORTED_BY and _zarrs_pipeline():
        raise RuntimeError("zarr's codec pipeline is zarrs "
                           f"({zarr.config.get('codec_pipeline.path')}), which hangs in a "
                           "forked process (DataLoader workers start by fork on Linux): pass "
                           "multiprocessing_context='spawn' to the DataLoader, or use zarr's "
                           "default codec pipeline")


def _keep_freed_memory():
    """Let glibc's malloc reuse freed buffers in this DataLoader worker (once).

    Decoding a chunk allocates megabytes (its bytes, the decoded copy) and frees
    them at once. With glibc's default thresholds much of that memory goes back
    to the system on each free and comes back as fresh pages on the next chunk:
    a quarter of a worker's decode time went to page faults (measured: 20-24 ms
    CPU a 26x64x64 block with 16x256x256 chunks, 15 with this; on the benchmark's
    store with 2 workers, 3 runs alternating, 1131 samples/s (1114-1496) against
    827 (674-969) without it, and the first batch 0.78 s against 1.49 s). Set here to the
    largest values glibc's own adaptive thresholds reach; a worker so keeps at
    most _TRIM_THRESHOLD freed per malloc arena. Only in DataLoader workers,
    which exist to serve this dataset; skipped when the environment sets these
    thresholds (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_) or the C
    library is not glibc.
    """
    if os.getpid() in _MALLOC_TUNED:
        return
    _MALLOC_TUNED.add(os.getpid())
    if (platform.libc_ver()[0] != 'glibc'
            or {'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_'} & os.environ.keys()):
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


# -- remote stores: retries, timeouts, versions, the chunk cache --------------

class _GaveUp(OSError):
    """A remote read that kept failing with transient errors."""


class _Unreachable(ConnectionError):
    """A host that never answered: its name does not resolve, or it refuses connections."""


class _Cancelled(OSError):
    """A remote read cancelled because the iteration it was for ended (``_Reader.close``)."""


class _StoreChanged(OSError):
    """A remote array whose store no longer holds the version the dataset was built on."""


class _Version(typing.NamedTuple):
    """A remote array's metadata document as fetched, and what the server dates it by."""
    document: bytes
    stamp: dict             # ETag / Last-Modified, as fsspec's info gives them
    digest: str             # the array's folder in cache_dir


class _InFlight:
    """The requests a store (and its copies) has in flight, to cancel from another thread.

    Pickled empty and not cancelled: tasks and locks belong to one process.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.tasks = set()
        self.cancelled = False

    def __reduce__(self):
        return _InFlight, ()


class _RemoteStore(zarr.storage.WrapperStore):
    """An fsspec store that retries transient failures and may cache chunks on disk.

    429, 5xx, dropped connections and timeouts are retried with exponential
    backoff (waiting what Retry-After asks, when the server says); 401 and 403
    fail at once, and so does a host that cannot be reached before it ever
    answered (a wrong URL: nothing to wait for). An HTTP(S) attempt waits at
    most ``_HTTP_TIMEOUT`` unless ``storage_options`` sets aiohttp's timeout.

    Versions: when zarr fetches an array's metadata document (``zarr.json``,
    ``.zarray``), the store keeps it with its ETag / Last-Modified (one HEAD
    request more). With ``cache_dir``, every chunk fetched whole is kept in
    ``cache_dir/<digest of URL, array path, metadata, ETag/Last-Modified>/<key>``
    and read from there afterwards, so that a chunk is only ever used for the
    version of the array it came from; a failed cache write warns once and
    ends caching for this store in this process, the read goes on.
    ``changes(array)`` fetches the document again and says what differs.

    ``cancel()`` (from any thread) cancels the requests in flight and refuses
    new ones until ``resume()``, so that a thread waiting on a server that
    stopped answering can be joined at once.
    """

    def __init__(self, store, url, cache_dir=None, state=None):
        super().__init__(store)
        self.url, self.cache_dir = url, cache_dir
        # Shared by the copies zarr makes of this store (and pickled with them).
        self._state = state or {'answered': False, 'caching': True, 'versions': {},
                                'requests': _InFlight(), 'unstamped': False}

    def _with_store(self, store):
        return type(self)(store, self.url, self.cache_dir, self._state)

    @classmethod
    def from_url(cls, url, index, storage_options, cache_dir):
        scheme = url.split('://', 1)[0]
        try:
            if scheme in ('http', 'https'):
                import aiohttp      # here: s3:// and other URLs do without it
                # Without a timeout a server that accepts and never answers makes
                # each attempt wait for aiohttp's 5 minutes. The user's, if given.
                client = (storage_options or {}).get('client_kwargs') or {}
                if 'timeout' not in client:
                    client = {**client, 'timeout': aiohttp.ClientTimeout(**_HTTP_TIMEOUT)}
                    storage_options = {**(storage_options or {}), 'client_kwargs': client}
            store = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options,
                                                      read_only=True)
        except ImportError as error:
            packages = ' '.join(['fsspec', *filter(None, [_URL_PACKAGES.get(scheme)])])
            raise ImportError(f"source {index}: reading {scheme}:// URLs needs the optional "
                              f"packages {packages} (pip install {packages}); "
                              f"{error}") from error
        return cls(store, url, cache_dir)

    # cancelling (thread-safe)

    def cancel(self):
        """Cancel the requests in flight; refuse new ones until ``resume()``."""
        requests = self._state['requests']
        with requests.lock:
            requests.cancelled = True
            tasks = list(requests.tasks)
        for task in tasks:
            with contextlib.suppress(RuntimeError):     # its loop is closed: nothing runs
                task.get_loop().call_soon_threadsafe(task.cancel)

    def resume(self):
        with self._state['requests'].lock:
            self._state['requests'].cancelled = False

    # reading

    async def get(self, key, prototype, byte_range=None):
        name = key.rsplit('/', 1)[-1]
        if name in _METADATA_KEYS:
            value = await self._request(key, lambda: self._store.get(key, prototype, byte_range))
            if name in ('zarr.json', '.zarray') and byte_range is None and value is not None:
                await self._remember(key, value.to_bytes())
            return value
        cached = self._cached(key) if byte_range is None else None
        if cached and os.path.exists(cached):
            with open(cached, 'rb') as file:
                return prototype.buffer.from_bytes(file.read())
        value = await self._request(key, lambda: self._store.get(key, prototype, byte_range))
        if cached and value is not None and self._state['caching']:
            self._keep(key, cached, value.to_bytes())
        return value

    def _cached(self, key):
        """Where chunk ``key`` is kept in cache_dir: under its array's version (the
        array whose path is the longest prefix of the key); None if not cached."""
        if not self.cache_dir:
            return None
        parts = key.split('/')
        for end in range(len(parts) - 1, -1, -1):
            version = self._state['versions'].get('/'.join(parts[:end]))
            if version is not None:
                return os.path.join(self.cache_dir, version.digest, *parts)
        return None      # its array's metadata was not fetched (consolidated metadata)

    async def _remember(self, key, document, stamp=None):
        """Keep the version of the array whose metadata document ``key`` holds
        ``document`` (not a group's), with the server's ETag / Last-Modified for it:
        ``stamp``, else asked for with a HEAD request."""
        directory = key.rpartition('/')[0]
        known = self._state['versions'].get(directory)
        if known is not None and known.document == document:
            return           # opening a group fetches an array's document more than once
        try:
            array = key.endswith('.zarray') or json.loads(document).get('node_type') == 'array'
        except (ValueError, AttributeError):       # not a JSON object: zarr will say so
            array = False
        if not array:
            return
        stamp = await self._stamp(key) if stamp is None else stamp
        if self.cache_dir and not stamp and not self._state['unstamped']:
            self._state['unstamped'] = True
            warnings.warn(f"cache_dir {self.cache_dir!r}: {self.url}/{key} comes without ETag "
                          f"or Last-Modified, so cached chunks are told apart by the array's "
                          f"metadata alone: a store converted again with the same layout "
                          f"would be read from the old chunks; delete the cache when it changes",
                          RuntimeWarning)
        digest = hashlib.sha256(repr((self.url, key, document, sorted(stamp.items())))
                                .encode()).hexdigest()[:16]
        self._state['versions'][directory] = _Version(document, stamp, digest)

    async def _stamp(self, key):
        """The ETag / Last-Modified the server gives for ``key`` (a HEAD request)."""
        path = f"{self._store.path.rstrip('/')}/{key}"
        info = await self._request(key, lambda: self._store.fs._info(path))
        return {name: str(info[name]) for name in _VERSION_KEYS if info.get(name)}

    async def changes(self, array):
        """What differs in ``array``'s metadata on the server from what it was opened
        with (attributes aside): ``[]`` if nothing. Two small requests, at once."""
        directory = array.path
        key = '/'.join(filter(None, [directory, 'zarr.json' if array.metadata.zarr_format == 3
                                     else '.zarray']))
        # The HEAD for its ETag / Last-Modified goes with the GET: one round trip.
        dated = asyncio.ensure_future(self._stamp(key))
        dated.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen
        try:
            value = await self._request(key, lambda: self._store.get(
                key, zarr.core.buffer.default_buffer_prototype()))
            if value is None:       # the HEAD fails too: not waited for
                return [f"its metadata {key} is gone (deleted, moved, or of another zarr "
                        f"format)"]
            stamp = await dated
        finally:
            dated.cancel()          # if the GET failed first
        document = value.to_bytes()
        try:
            now = type(array.metadata).from_dict(json.loads(document))
        except Exception as error:
            return [f"its metadata {key} no longer describes such an array ({error})"]
        changed = _metadata_changes(array.metadata, now)
        known = self._state['versions'].get(directory)
        if known is None:       # not fetched when opened (consolidated metadata): from now
            await self._remember(key, document, stamp)
        elif not changed and stamp != known.stamp:
            changed = ["replaced (ETag/Last-Modified changed: "
                       f"{_stamp_text(known.stamp)} -> {_stamp_text(stamp)})"]
        return changed

    @staticmethod
    def undated(array):
        """Whether ``array`` is remote and its version is not known yet."""
        return (isinstance(array, zarr.Array) and isinstance(array.store, _RemoteStore)
                and array.path not in array.store._state['versions'])

    @staticmethod
    def verify(source, arrays):
        """Raise unless every remote array of ``source`` (as errors name it) is still the
        version the dataset was built on; let their stores take requests again."""
        remote = [array for array in arrays if isinstance(array, zarr.Array)
                  and isinstance(array.store, _RemoteStore)]
        if not remote:
            return
        for array in remote:
            array.store.resume()

        async def check():
            return await asyncio.gather(*(array.store.changes(array) for array in remote))

        try:
            changes = zarr.core.sync.sync(check())
        except Exception as error:
            raise OSError(f"{source}: cannot check that its remote store still holds "
                          f"the version this dataset was built on: {type(error).__name__}: "
                          f"{error}") from error
        changed = [f"{'/'.join(filter(None, [array.store.url, array.path]))}: "
                   f"{', '.join(change)}" for array, change in zip(remote, changes) if change]
        if changed:
            raise _StoreChanged(f"{source}: the remote store changed since this dataset "
                                f"was built: {'; '.join(changed)}. Its plan and any cached "
                                f"chunks are of the old version: build the dataset again "
                                f"(VesuviusStream(...)) to read the new one")

    def _keep(self, key, cached, data):
        """Write a fetched chunk to the cache; a failure (disk full, read-only) only warns."""
        partial = f"{cached}.{os.getpid()}.partial"
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            with open(partial, 'wb') as file:
                file.write(data)
            os.replace(partial, cached)   # atomic: workers may fetch the same chunk
        except OSError as error:
            with contextlib.suppress(OSError):
                os.remove(partial)
            self._state['caching'] = False
            warnings.warn(f"cache_dir {self.cache_dir!r}: cannot keep {self.url}/{key} "
                          f"({error}); {self.url} is no longer cached by this process",
                          RuntimeWarning)

    async def _request(self, key, request):
        """``await request()`` (a request about ``key``), retried as the class says;
        cancelled by ``cancel()``."""
        requests, task = self._state['requests'], asyncio.current_task()
        ended = f"{self.url}/{key}: not read, the iteration reading it ended"
        with requests.lock:
            if requests.cancelled:
                raise _Cancelled(ended)
            requests.tasks.add(task)
        try:
            return await self._with_retries(key, request)
        except asyncio.CancelledError:
            if not requests.cancelled:      # not by cancel(): let the task be cancelled
                raise
            # An error, not a cancelled read: zarr then raises it as it is, and the
            # failed read is not searched for a corrupt chunk.
            task.uncancel()
            raise _Cancelled(ended) from None
        finally:
            with requests.lock:
                requests.tasks.discard(task)

    async def _with_retries(self, key, request):
        for attempt in range(_ATTEMPTS):
            try:
                value = await request()
                self._state['answered'] = True
                return value
            except Exception as failure:
                # fsspec's HTTP info reports any failure as FileNotFoundError from its cause.
                error = (failure.__cause__ if type(failure) is FileNotFoundError
                         and failure.__cause__ is not None else failure)
                status = getattr(error, 'status', None)
                if not self._state['answered'] and _unreachable(error):
                    raise _Unreachable(f"{self.url}: cannot reach the host, it never "
                                       f"answered: {error}") from error
                if status is not None:
                    self._state['answered'] = True
                if status in (401, 403):
                    raise PermissionError(f"{self.url}/{key}: HTTP {status}, access denied; "
                                          f"check the URL and the credentials in "
                                          f"storage_options") from error
                if not _transient(error, status):
                    raise
                if attempt == _ATTEMPTS - 1:
                    timeout = getattr(self._store.fs, 'client_kwargs', {}).get('timeout')
                    waited = ("" if not isinstance(error, TimeoutError) or timeout is None else
                              f" (no answer within the timeout of an attempt, {timeout!r}; "
                              f"storage_options={{'client_kwargs': {{'timeout': "
                              f"aiohttp.ClientTimeout(...)}}}} sets another)")
                    raise _GaveUp(f"{self.url}/{key}: still failing after {_ATTEMPTS} "
                                  f"attempts{waited}: {error!r}") from error
                await asyncio.sleep(_retry_wait(error, attempt))


def _stamp_text(stamp):
    return ', '.join(f"{name} {value}" for name, value in stamp.items()) or 'none'


def _transient(error, status):
    """Whether a failed request may succeed if tried again."""
    if status is not None:
        return status == 429 or status >= 500
    aiohttp = sys.modules.get('aiohttp')     # loaded if fsspec's HTTP is in use
    kinds = (ConnectionError, TimeoutError)
    if aiohttp is not None:
        kinds += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    return isinstance(error, kinds)


def _unreachable(error):
    """Whether a request failed before reaching the host (unknown name, refused)."""
    aiohttp = sys.modules.get('aiohttp')     # loaded if fsspec's HTTP is in use
    kinds = (ConnectionRefusedError, socket.gaierror)
    if aiohttp is not None:
        kinds += (aiohttp.ClientConnectorError,)
    return isinstance(error, kinds)


def _retry_wait(error, attempt):
    """Seconds to wait before the next attempt: Retry-After, else backoff with jitter."""
    retry_after = (getattr(error, 'headers', None) or {}).get('Retry-After')
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:        # an HTTP date, or garbage
            try:
                seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
        if seconds is not None:
            return min(max(seconds, 0.0), _LONGEST_WAIT)
    return min(_FIRST_BACKOFF * 2**attempt, _LONGEST_WAIT) * random.uniform(0.5, 1.0)
