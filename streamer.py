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
import email.utils
import hashlib
import itertools
import math
import os
import pickle
import random
import sys
import time

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6
_METHODS = ('uniform', 'proportional', 'grid')
# Remote stores: attempts per request, first backoff and longest wait (s).
_ATTEMPTS, _FIRST_BACKOFF, _LONGEST_WAIT = 10, 0.2, 30.0
# What fsspec needs, per URL scheme, beyond fsspec itself.
_URL_PACKAGES = {'http': 'aiohttp', 'https': 'aiohttp', 's3': 's3fs', 'gs': 'gcsfs',
                 'gcs': 'gcsfs'}
_METADATA_KEYS = ('zarr.json', '.zarray', '.zgroup', '.zattrs', '.zmetadata')


class VesuviusStream(IterableDataset):
    """Random (or raster, or grid) 3D blocks, with labels, from 3D volumes.

    An item is a tensor ``block`` of shape ``(z_size, y_size, x_size)`` in the
    source's own dtype (uint8 -> ``torch.uint8``, uint16 -> ``torch.uint16``),
    so that workers pass no more bytes than the data has. torch supports few
    operations on uint16 (conversion, indexing, stacking, not ``flip`` or
    ``max``): convert before computing, e.g. ``x.float() / 65535``, or
    ``x.to(torch.int32)`` (lossless) in a ``transform``. When the
    sources have labels an item is ``(block, label)``. With
    ``return_coords=True`` the item is a tuple whose last element is an int64
    tensor ``(file_index, z, y, x)``: the block's start corner in that volume's
    own index space.

    Guarantees:

    * A *position* is a start corner at which the block fits inside the volume
      (inside ``z_range``, and touching the mask by the rule below). An epoch
      yields exactly ``samples_per_epoch`` items in total over all DataLoader
      workers and all DDP ranks, never the same position twice.
    * Workers and ranks split the epoch into disjoint, contiguous shares whose
      sizes differ by at most one. The *set* of positions of an epoch is a
      function of (sources, block size, samples_per_epoch, sampling_method,
      shuffle, seed, epoch) alone: the same for any number of workers or ranks.
    * ``set_epoch(e)`` selects another epoch; the same ``(seed, e)`` always
      gives the same set. It reaches persistent DataLoader workers too.
    * Every position of a volume has the same chance to be in an epoch.
    * Memory and start-up time do not grow with the number of positions: the
      epoch is drawn with keyed bijections (Feistel networks), never from an
      index array. Decoded data is bounded per worker by ``region_mb`` (plus
      zarr's buffers for the chunks being decoded); a mask costs one integer
      per region.

    How it reads: the positions of each volume are partitioned into *regions*
    aligned to its chunk grid, each small enough that ``open_regions`` of them
    (plus the block's halo) fit in ``region_mb``. An epoch visits regions in
    random order, each visit taking its next ``samples_per_region`` positions
    (fewer for a smaller border region) from the region's own random order;
    more rounds follow if the epoch needs them. A worker decodes a visit's
    region once, cuts all its blocks from it, and interleaves ``open_regions``
    visits so that consecutive items come from different places. Positions of
    one epoch are therefore clustered by region, which is what makes reading
    fast: lower ``samples_per_region`` for more spread, at more decoding per
    sample.

    Sources and their layout: a source is a path or URL (str or
    ``os.PathLike``) to a Zarr array (format 2 or 3), or to a Zarr group with
    the arrays ``volume`` (z, y, x) and optionally ``labels`` and ``mask``
    (each (y, x) or (z, y, x)), which is what ``converter.py`` writes; an
    opened ``zarr.Array`` or ``zarr.Group``; a 3D ``numpy.ndarray``; or a dict
    ``{'volume': a, 'labels': b, 'mask': c}`` of numpy or zarr arrays. Either
    all sources have labels or none. The label of a block at (z, y, x) is
    ``labels[y:y+h, x:x+w]`` for 2D labels and ``labels[z:z+d, y:y+h, x:x+w]``
    for 3D ones, in the labels' own dtype. The mask is nonzero where papyrus
    is. An OME-Zarr multiscale group (one with ``multiscales`` metadata)
    stands for its full-resolution level; a path to one level
    (``scroll.zarr/2``) reads that level.

    Remote sources: ``http(s)://``, ``s3://`` and other fsspec URLs are read
    through zarr's fsspec store (install ``fsspec aiohttp``, plus ``s3fs`` for
    S3). Transient failures (HTTP 429 and 5xx, dropped connections, timeouts)
    are retried up to 10 times with exponential backoff from 0.2 s, waiting
    what a Retry-After header asks (at most 30 s); 401 and 403 raise
    ``PermissionError`` at once, and a URL without Zarr metadata raises
    ``FileNotFoundError``. Each DataLoader worker opens its own connections.

    Args:
        file_paths (list): the sources (see above).
        z_size, y_size, x_size (int): the block shape.
        samples_per_epoch (int or None): items per epoch in total over all
            workers and ranks, at most the number of positions. ``None`` in
            ``'grid'`` mode (every grid position), and only there.
        sampling_method (str): ``'uniform'`` (default): each sample picks a
            source uniformly at random (among those with positions left), then
            a position in it. ``'proportional'``: sources are picked with
            probability proportional to their number of positions, i.e. one
            permutation over the positions of all sources. ``'grid'``: every
            block of a regular grid with steps ``stride``, the last block along
            each axis shifted back to end at the border, so that every voxel
            (within ``z_range``) is covered; positions off the mask are
            skipped; region by region, for inference and stitching.
        shuffle (bool): ``True`` (default) draws random positions. ``False``
            yields positions in raster order (z, then y, then x) within each
            source, sources in order, each source's share fixed by
            ``sampling_method`` (equal or proportional). Ignored by ``'grid'``.
        seed (int): the seed of every random choice. Default 0.
        return_coords (bool): append the block's ``(file_index, z, y, x)``.
        z_range (tuple, optional): ``(start, end)``: draw blocks from layers
            [start, end) only, e.g. ``z_range=(17, 43), z_size=26`` for the 26
            central layers of a 65-layer segment. Coordinates stay those of the
            whole volume. Default: all layers.
        stride (tuple, optional): ``(sz, sy, sx)`` grid steps of ``'grid'``.
            Default: the block size (tiles that do not overlap).
        min_mask_fraction (float): a position is drawn only if at least this
            fraction of its block's footprint is inside the mask (the (y, x)
            footprint for a 2D mask, the whole block for a 3D one), and always
            at least one voxel: the default 0 means the block touches papyrus,
            1 means it lies wholly on it.
        transform (callable, optional): applied to each item in the worker
            before coordinates are appended: ``transform(block)`` returns a
            block, or ``transform(block, label)`` a ``(block, label)`` pair.
        rank, world_size (int, optional): this process's DDP rank and the
            number of ranks. Default: read from ``torch.distributed`` when it
            is initialized (when this dataset is built), else 0 and 1.
        samples_per_region (int, optional): positions taken per visit of a
            whole region. Default: four times the voxels of the region's box
            (region plus halo) divided by the block's voxels.
        region_mb (float): decoded data per worker, in MiB, shared by its
            ``open_regions`` regions. Default 512. Numpy sources are sliced as
            views and take none of it.
        open_regions (int): regions a worker interleaves. Default 8.
        storage_options (dict, optional): fsspec options for URL sources, e.g.
            ``{'anon': True}`` for a public S3 bucket, or
            ``{'client_kwargs': {'headers': {...}}}`` for HTTP.
        cache_dir (str, optional): a local folder keeping every chunk fetched
            from URL sources (shared by workers, kept across runs; delete it
            yourself). Chunks read in parts (sharded stores) are not cached.

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

        # Inference: every block of a grid, with coordinates for stitching.
        grid = VesuviusStream(["a.zarr"], 26, 64, 64, None, 'grid',
                              z_range=(17, 43), stride=(26, 32, 32), return_coords=True)

    .. warning::
        Call ``set_epoch(epoch)`` before each epoch, as with
        ``DistributedSampler``; otherwise every epoch repeats the same
        positions.
    """

    def __init__(self, file_paths, z_size, y_size, x_size, samples_per_epoch,
                 sampling_method='uniform', shuffle=True, seed=0,
                 return_coords=False, *, z_range=None, stride=None,
                 min_mask_fraction=0.0, transform=None, rank=None, world_size=None,
                 samples_per_region=None, region_mb=512, open_regions=8,
                 storage_options=None, cache_dir=None):
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
        if sampling_method not in _METHODS:
            raise ValueError(f"sampling_method must be one of {', '.join(map(repr, _METHODS))}, "
                             f"got {sampling_method!r}")
        grid = sampling_method == 'grid'
        if stride is not None:
            if not grid:
                raise ValueError("stride applies to sampling_method='grid' only")
            if not (isinstance(stride, (tuple, list)) and len(stride) == 3):
                raise TypeError(f"stride must be a tuple (sz, sy, sx), got {stride!r}")
            stride = tuple(_positive_int('stride', s) for s in stride)
        if z_range is not None:
            if not (isinstance(z_range, (tuple, list)) and len(z_range) == 2
                    and all(map(_is_int, z_range))):
                raise TypeError(f"z_range must be a tuple (start, end) of ints, got {z_range!r}")
            z_range = tuple(map(int, z_range))
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        seed = int(seed)
        if not (isinstance(min_mask_fraction, (int, float)) and 0 <= min_mask_fraction <= 1):
            raise ValueError(f"min_mask_fraction must be a number in [0, 1], "
                             f"got {min_mask_fraction!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if samples_per_region is not None:
            samples_per_region = _positive_int('samples_per_region', samples_per_region)
        open_regions = _positive_int('open_regions', open_regions)
        if not (isinstance(region_mb, (int, float)) and region_mb > 0):
            raise ValueError(f"region_mb must be a positive number, got {region_mb!r}")
        self.rank, self.world_size = _resolve_ranks(rank, world_size)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(f"storage_options must be a dict of fsspec options, "
                            f"got {type(storage_options).__name__}")
        remote = {'storage_options': storage_options,
                  'cache_dir': None if cache_dir is None else os.fspath(cache_dir)}

        region_bytes = region_mb * 2**20 / open_regions
        self._sources = [
            _Source(_open_source(source, index, **remote), index, block, z_range,
                    stride or block if grid else (1, 1, 1), region_bytes, samples_per_region,
                    min_mask_fraction)
            for index, source in enumerate(file_paths)]
        if len({source.labels is None for source in self._sources}) > 1:
            raise ValueError("either all sources have labels or none: "
                             + ", ".join(f"source {s.index}: "
                                         f"{'labels' if s.labels is not None else 'none'}"
                                         for s in self._sources))
        self.capacity = sum(source.positions for source in self._sources)
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
        self.seed = seed
        self.return_coords = bool(return_coords)
        self.transform = transform
        self.open_regions = open_regions
        # Shared memory, so that set_epoch reaches persistent DataLoader workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return self.samples_per_epoch

    def set_epoch(self, epoch):
        """Select the epoch whose positions the next iteration yields."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch.fill_(int(epoch))

    def __iter__(self):
        epoch = int(self._epoch)
        worker = get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        shards = self.world_size * workers
        shard = self.rank * workers + worker_id
        first = self.samples_per_epoch * shard // shards
        stop = self.samples_per_epoch * (shard + 1) // shards
        visits = _slice_visits(self._epoch_visits(epoch), first, stop)
        rng = np.random.default_rng([self.seed, epoch, shard])
        for source in self._sources:
            source.attach()
        # Raster and grid order mean one region after another, not interleaved.
        open_regions = self.open_regions if self.shuffle else 1
        for file_index, boxes, corner in _interleave(visits, self._sources, open_regions, rng):
            item = self._sources[file_index].cut(boxes, corner)
            if self.transform is not None:
                item = self.transform(*item)
                item = item if isinstance(item, tuple) else (item,)
            if self.return_coords:
                item = (*item, torch.tensor((file_index, *corner), dtype=torch.int64))
            yield item if len(item) > 1 else item[0]

    def _epoch_visits(self, epoch):
        """Yield the epoch's visits in global order, the same in every shard.

        A visit is ``(file_index, corners)``: an (n, 3) int64 array of block
        start corners, all within one region.
        """
        capacities = [source.positions for source in self._sources]
        if not self.shuffle:
            counts = _fixed_shares(self.samples_per_epoch, capacities, self.sampling_method)
            for source, count in zip(self._sources, counts):
                visits = (source.grid_visits() if self.sampling_method == 'grid'
                          else source.raster_visits(count))
                for corners in visits:
                    yield source.index, corners
            return
        rng = np.random.default_rng([self.seed, epoch])
        counts = _random_shares(self.samples_per_epoch, capacities, self.sampling_method, rng)
        streams = [source.shuffled_visits(count, _key(self.seed, epoch, source.index))
                   for source, count in zip(self._sources, counts)]
        left = np.array(counts, dtype=np.int64)
        # Interleave the sources' visit streams at random, in proportion to
        # what each still has to give.
        while left.any():
            index = int(rng.choice(len(left), p=left / left.sum()))
            corners = next(streams[index])
            left[index] -= len(corners)
            yield index, corners


# -- sources ---------------------------------------------------------------

class _Source:
    """One volume (with labels and mask): where its positions are, how to read them.

    Positions live on a lattice: along each axis, position p has the start
    coordinate ``min(lo + p * step, hi - size)``, where [lo, hi) is the usable
    range (``z_range``) and step is 1, or the grid stride. The lattice is cut
    into regions of ``region`` positions per axis, numbered in raster order.
    """

    def __init__(self, arrays, index, block, z_range, step, region_bytes,
                 samples_per_region, min_mask_fraction):
        self.index = index
        self.volume, self.labels, self.mask = arrays
        self._process = os.getpid()
        shape = self.shape = tuple(int(s) for s in self.volume.shape)
        if len(shape) != 3:
            raise ValueError(f"source {index}: the volume must be 3D (z, y, x), got shape {shape}")
        for name, array in (('labels', self.labels), ('mask', self.mask)):
            if array is not None and tuple(array.shape) not in (shape, shape[1:]):
                raise ValueError(f"source {index}: {name} of shape {tuple(array.shape)} do not "
                                 f"match the volume {shape}; expected {shape[1:]} or {shape}")
        self.lo, self.hi = (0, 0, 0), shape
        if z_range is not None:
            if not 0 <= z_range[0] < z_range[1] <= shape[0]:
                raise ValueError(f"z_range {z_range} must satisfy 0 <= start < end <= "
                                 f"{shape[0]} (source {index} has {shape[0]} layers)")
            self.lo, self.hi = (z_range[0], 0, 0), (z_range[1], *shape[1:])
        if any(b > h - l for b, l, h in zip(block, self.lo, self.hi)):
            raise ValueError(f"block {block} does not fit in source {index} of shape {shape}"
                             + (f" within z_range {z_range}" if z_range else ""))
        self.block, self.step = block, step
        self.extent = tuple(-(-(h - l - b) // s) + 1
                            for l, h, b, s in zip(self.lo, self.hi, block, step))
        chunks = shape if isinstance(self.volume, np.ndarray) else tuple(self.volume.chunks)
        self.region = self._choose_region(chunks, region_bytes, self.volume.dtype.itemsize)
        self.grid = tuple(-(-e // r) for e, r in zip(self.extent, self.region))
        self.regions = math.prod(self.grid)
        self.per_visit = samples_per_region or max(
            1, 4 * math.prod(self._box(self.region)) // math.prod(block))
        self.threshold = None
        if self.mask is not None:
            footprint = math.prod(block[3 - self.mask.ndim:])
            self.threshold = max(1, math.ceil(min_mask_fraction * footprint))
        self.region_counts = None if self.mask is None else self._count_valid()
        self.positions = (math.prod(self.extent) if self.mask is None
                          else int(self.region_counts.sum()))

    # geometry

    def _box(self, region):
        """Coordinate span of the blocks of a region of ``region`` positions."""
        return tuple(min((r - 1) * s + b, h - l)
                     for r, s, b, l, h in zip(region, self.step, self.block, self.lo, self.hi))

    def _choose_region(self, chunks, region_bytes, itemsize):
        """Region shape (in positions) whose box is chunk multiples within the budget.

        Starts from one chunk (halved while even that is over budget), then
        grows by whole chunks, each step on the axis whose halo costs most
        relative to its size.
        """
        def fits(region):
            return math.prod(self._box(region)) * itemsize <= region_bytes

        per_chunk = [max(1, c // s) for c, s in zip(chunks, self.step)]
        region = [min(c, e) for c, e in zip(per_chunk, self.extent)]
        while not fits(region) and max(region) > 1:
            axis = region.index(max(region))
            region[axis] = -(-region[axis] // 2)
        while True:
            growable = [a for a in range(3) if region[a] < self.extent[a]]
            growable.sort(key=lambda a: self._box(region)[a] / (region[a] * self.step[a]),
                          reverse=True)
            for axis in growable:
                bigger = list(region)
                bigger[axis] = min(region[axis] + per_chunk[axis], self.extent[axis])
                if fits(bigger):
                    region = bigger
                    break
            else:
                return tuple(region)

    def region_bounds(self, index):
        """Origin and shape (in positions) of region ``index``."""
        cell = np.unravel_index(index, self.grid)
        origin = tuple(int(c) * r for c, r in zip(cell, self.region))
        shape = tuple(min(r, e - o) for r, e, o in zip(self.region, self.extent, origin))
        return origin, shape

    def corners(self, positions):
        """Start coordinates (n, 3) of lattice positions (n, 3)."""
        return np.minimum(np.asarray(self.lo) + positions * np.asarray(self.step),
                          np.asarray(self.hi) - np.asarray(self.block))

    def _axis_corners(self, origin, shape):
        return [np.minimum(l + np.arange(o, o + n) * s, h - b)
                for o, n, l, s, h, b in zip(origin, shape, self.lo, self.step, self.hi, self.block)]

    # the mask

    def _count_valid(self):
        """Positions on the mask, per region (one pass over the mask)."""
        counts = np.zeros(self.regions, dtype=np.int64)
        if self.mask.ndim == 3:
            for region in range(self.regions):
                counts[region] = self.valid(*self.region_bounds(region)).sum()
            return counts
        # A 2D mask decides for all layers at once: one (y, x) cell, every z.
        plane = self.grid[1] * self.grid[2]
        for cell in range(plane):
            on_mask = int(self.valid(*self.region_bounds(cell)).sum())
            for z_cell in range(self.grid[0]):
                region = z_cell * plane + cell
                counts[region] = on_mask * self.region_bounds(region)[1][0]
        return counts

    def valid(self, origin, shape):
        """Which positions of the lattice box (origin, shape) are on the mask.

        A bool array of ``shape`` (of shape[1:] for a 2D mask), or None when
        there is no mask. Counts mask voxels under each block's footprint with
        a summed-area table of the box's mask window.
        """
        if self.mask is None:
            return None
        axes = self._axis_corners(origin, shape)[3 - self.mask.ndim:]
        block = self.block[3 - self.mask.ndim:]
        lo = [int(a[0]) for a in axes]
        hi = [int(a[-1]) + b for a, b in zip(axes, block)]
        window = np.asarray(self.mask[tuple(slice(l, h) for l, h in zip(lo, hi))]) != 0
        table = np.pad(window.astype(np.int32), [(1, 0)] * window.ndim)
        for axis in range(window.ndim):
            np.cumsum(table, axis=axis, out=table)
        # Inclusion-exclusion over the 2**ndim corners of every footprint.
        counts = 0
        for signs in itertools.product((0, 1), repeat=window.ndim):
            index = np.ix_(*[a - l + (b if s else 0) for a, l, b, s in zip(axes, lo, block, signs)])
            counts = counts + (-1) ** (window.ndim - sum(signs)) * table[index]
        return counts >= self.threshold

    def _keep_valid(self, positions, origin, valid):
        """The rows of ``positions`` (in the lattice box at ``origin``) on the mask."""
        if valid is None:
            return positions
        local = positions[:, 3 - valid.ndim:] - np.asarray(origin[3 - valid.ndim:])
        return positions[valid[tuple(local.T)]]

    # the visits of an epoch

    def shuffled_visits(self, count, key):
        """Yield the corners of random visits giving ``count`` positions in all.

        Round j visits every region in a random order (its own per round) and
        takes the next share of the region's own permutation of its positions,
        keeping those on the mask. Shares are proportional to region size and
        rounded at random, so that a position in a small border region is
        exactly as likely to be drawn as any other.
        """
        full = math.prod(self.region)
        for round_ in itertools.count():   # ends: count <= positions
            order_key = _key(key, 0, round_)
            for slot in range(self.regions):
                if count == 0:
                    return
                region = int(_permute([slot], self.regions, order_key)[0])
                if self.region_counts is not None and self.region_counts[region] == 0:
                    continue
                origin, shape = self.region_bounds(region)
                size = math.prod(shape)
                rate = self.per_visit * size / full
                offset = _key(key, 2, region) / 2.0**64     # the random rounding
                first = min(size, math.floor(round_ * rate + offset))
                stop = min(size, math.floor((round_ + 1) * rate + offset))
                if first == stop:
                    continue
                local = _permute(np.arange(first, stop), size, _key(key, 1, region))
                positions = np.stack(np.unravel_index(local, shape), axis=1) + origin
                positions = self._keep_valid(positions, origin, self.valid(origin, shape))[:count]
                if len(positions):
                    count -= len(positions)
                    yield self.corners(positions)

    def raster_visits(self, count):
        """Yield the corners of the first ``count`` positions in raster order.

        A visit is a run of consecutive positions within one z plane: as many
        whole x-rows as a region's box allows, or part of a row when a single
        row is too long for it.
        """
        ez, ey, ex = self.extent
        budget = math.prod(self._box(self.region))
        depth, _, width = self._box((1, 1, ex))
        first_row = depth * self.block[1] * width
        rows = (budget - first_row) // (depth * self.step[1] * width) + 1 if budget >= first_row else 0
        limit = rows * ex if rows else self.region[2]
        start = 0
        while count > 0:
            stop = min(math.prod(self.extent), start + limit, (start // (ey * ex) + 1) * ey * ex)
            if limit < ex:
                stop = min(stop, (start // ex + 1) * ex)
            positions = np.stack(np.unravel_index(np.arange(start, stop), self.extent), axis=1)
            origin = positions.min(axis=0)
            shape = positions.max(axis=0) - origin + 1
            positions = self._keep_valid(positions, origin, self.valid(origin, shape))[:count]
            if len(positions):
                count -= len(positions)
                yield self.corners(positions)
            start = stop

    def grid_visits(self):
        """Yield the corners of every position on the mask, region by region."""
        for region in range(self.regions):
            origin, shape = self.region_bounds(region)
            positions = np.stack([a.ravel() for a in np.meshgrid(
                *[np.arange(o, o + n) for o, n in zip(origin, shape)], indexing='ij')], axis=1)
            positions = self._keep_valid(positions, origin, self.valid(origin, shape))
            if len(positions):
                yield self.corners(positions)

    # reading and cutting

    def attach(self):
        """Reopen remote arrays once in a new process (a DataLoader worker).

        fsspec's HTTP sessions belong to the event loop of the process that
        opened them and fail after a fork; a pickle round trip opens new ones.
        """
        if self._process == os.getpid():
            return
        self._process = os.getpid()
        # The parent's arrays are kept, not collected: collecting them would
        # make aiohttp warn of sessions that cannot be closed from here.
        self._parents_arrays = (self.volume, self.labels, self.mask)
        self.volume, self.labels, self.mask = (
            pickle.loads(pickle.dumps(array))
            if isinstance(array, zarr.Array)
            and not isinstance(array.store, (zarr.storage.LocalStore, zarr.storage.MemoryStore))
            else array for array in (self.volume, self.labels, self.mask))

    def read(self, corners):
        """Decode, once, the box covering the blocks at ``corners``.

        Returns ``(origin, volume_box, labels_box)``; labels_box is None
        without labels.
        """
        origin = corners.min(axis=0)
        end = corners.max(axis=0) + np.asarray(self.block)
        box = tuple(slice(int(o), int(e)) for o, e in zip(origin, end))
        volume = np.asarray(self.volume[box])
        labels = None if self.labels is None else np.asarray(self.labels[box[3 - self.labels.ndim:]])
        return origin, volume, labels

    def cut(self, boxes, corner):
        """``(block,)`` or ``(block, label)`` tensors at ``corner`` from read boxes."""
        origin, volume, labels = boxes
        local = [int(c - o) for c, o in zip(corner, origin)]
        window = tuple(slice(l, l + b) for l, b in zip(local, self.block))
        item = (torch.from_numpy(np.ascontiguousarray(volume[window])),)
        if labels is not None:
            item += (torch.from_numpy(np.ascontiguousarray(labels[window[3 - labels.ndim:]])),)
        return item


def _open_source(source, index, storage_options=None, cache_dir=None):
    """``(volume, labels, mask)`` of one source; labels and mask may be None."""
    if isinstance(source, (np.ndarray, zarr.Array)):
        return source, None, None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        remote = '://' in path
        if not remote and not os.path.exists(path):
            raise FileNotFoundError(f"source {index}: no Zarr store at {path!r}")
        store = _RemoteStore.from_url(path, index, storage_options, cache_dir) if remote else path
        try:
            source = zarr.open(store, mode='r')
        except (PermissionError, _GaveUp):
            raise
        except FileNotFoundError as error:
            if remote:
                raise FileNotFoundError(f"source {index}: no Zarr array or group at {path!r} "
                                        f"(no metadata found there)") from error
            raise ValueError(f"source {index}: {path!r} is not a Zarr array or group") from error
        except Exception as error:
            raise ValueError(f"source {index}: {path!r} is not a Zarr array or group "
                             f"({error})") from error
        if isinstance(source, zarr.Array):
            return source, None, None
    if isinstance(source, zarr.Group):
        level = _multiscale_level(source)
        if level is not None and 'volume' not in source:
            return source[level], None, None
    if isinstance(source, (zarr.Group, dict)):
        if 'volume' not in source:
            raise ValueError(f"source {index}: a group or dict needs an array 'volume' (or "
                             f"OME-Zarr 'multiscales'); it has {sorted(source.keys())}")
        return tuple(source[name] if name in source else None
                     for name in ('volume', 'labels', 'mask'))
    raise TypeError(f"source {index}: a source must be a path/URL, a zarr.Array or "
                    f"zarr.Group, a numpy array or a dict of them, got {type(source).__name__}")


def _multiscale_level(group):
    """Path of the full-resolution level of an OME-Zarr multiscale group, else None.

    NGFF 0.4 keeps ``multiscales`` in the group's attributes, 0.5 under ``ome``;
    the first dataset of the first multiscale is level 0.
    """
    attributes = group.attrs.asdict()
    multiscales = attributes.get('multiscales') or attributes.get('ome', {}).get('multiscales')
    if not multiscales:
        return None
    return multiscales[0]['datasets'][0]['path']


class _GaveUp(OSError):
    """A remote read that kept failing with transient errors."""


class _RemoteStore(zarr.storage.WrapperStore):
    """An fsspec store that retries transient failures and may cache chunks on disk.

    429, 5xx, dropped connections and timeouts are retried with exponential
    backoff (waiting what Retry-After asks, when the server says); 401 and 403
    fail at once. With ``cache_dir``, every chunk fetched whole is kept in
    ``cache_dir/<hash of the URL>/<key>`` and read from there afterwards.
    """

    def __init__(self, store, url, cache_dir=None):
        super().__init__(store)
        self.url, self.cache_dir = url, cache_dir

    def _with_store(self, store):
        return type(self)(store, self.url, self.cache_dir)

    @classmethod
    def from_url(cls, url, index, storage_options, cache_dir):
        scheme = url.split('://', 1)[0]
        try:
            store = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options,
                                                      read_only=True)
        except ImportError as error:
            packages = ' '.join(['fsspec', *filter(None, [_URL_PACKAGES.get(scheme)])])
            raise ImportError(f"source {index}: reading {scheme}:// URLs needs the optional "
                              f"packages {packages} (pip install {packages}); "
                              f"{error}") from error
        return cls(store, url, cache_dir)

    async def get(self, key, prototype, byte_range=None):
        cached = None
        if self.cache_dir and byte_range is None and key.rsplit('/', 1)[-1] not in _METADATA_KEYS:
            digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            cached = os.path.join(self.cache_dir, digest, *key.split('/'))
            if os.path.exists(cached):
                with open(cached, 'rb') as file:
                    return prototype.buffer.from_bytes(file.read())
        value = await self._get_with_retries(key, prototype, byte_range)
        if cached and value is not None:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            partial = f"{cached}.{os.getpid()}.partial"
            with open(partial, 'wb') as file:
                file.write(value.to_bytes())
            os.replace(partial, cached)   # atomic: workers may fetch the same chunk
        return value

    async def _get_with_retries(self, key, prototype, byte_range):
        for attempt in range(_ATTEMPTS):
            try:
                return await self._store.get(key, prototype, byte_range)
            except Exception as error:
                status = getattr(error, 'status', None)
                if status in (401, 403):
                    raise PermissionError(f"{self.url}/{key}: HTTP {status}, access denied; "
                                          f"check the URL and the credentials in "
                                          f"storage_options") from error
                if not _transient(error, status):
                    raise
                if attempt == _ATTEMPTS - 1:
                    raise _GaveUp(f"{self.url}/{key}: still failing after {_ATTEMPTS} "
                                  f"attempts: {error!r}") from error
                await asyncio.sleep(_retry_wait(error, attempt))


def _transient(error, status):
    """Whether a failed request may succeed if tried again."""
    if status is not None:
        return status == 429 or status >= 500
    aiohttp = sys.modules.get('aiohttp')     # loaded if fsspec's HTTP is in use
    kinds = (ConnectionError, TimeoutError)
    if aiohttp is not None:
        kinds += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
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


def _is_int(value):
    """True for Python and numpy integers (not bools): sizes often come from array shapes."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_int(name, value):
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


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


# -- keyed bijections ------------------------------------------------------

def _mix64(x):
    """SplitMix64's finaliser on a uint64 array (wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts):
    """A 64-bit key derived from integers, for seeding one permutation."""
    state = np.array([0x9E3779B97F4A7C15], dtype=np.uint64)
    for part in parts:
        state = _mix64(state ^ np.uint64(int(part) & _MASK64))
    return int(state[0])


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


# -- how many samples each source gives ------------------------------------

def _random_shares(total, capacities, method, rng):
    """Random per-source sample counts adding up to ``total``."""
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
    """Deterministic per-source counts: equal, or proportional to capacity."""
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


# -- cutting blocks from regions -------------------------------------------

def _slice_visits(visits, first, stop):
    """The visits restricted to global samples [first, stop), trimmed at the ends."""
    seen = 0
    for file_index, corners in visits:
        n = len(corners)
        lo, hi = max(first - seen, 0), min(stop - seen, n)
        seen += n
        if lo < hi:
            yield file_index, corners[lo:hi]
        if seen >= stop:
            return


def _interleave(visits, sources, open_regions, rng):
    """Yield ``(file_index, boxes, corner)`` per sample.

    Reads each visit's box once and keeps ``open_regions`` visits open,
    taking each next sample from one of them at random.
    """
    visits = iter(visits)
    open_ = []    # [file_index, boxes, corners, next]
    while True:
        while len(open_) < open_regions:
            visit = next(visits, None)
            if visit is None:
                break
            file_index, corners = visit
            open_.append([file_index, sources[file_index].read(corners), corners, 0])
        if not open_:
            return
        i = int(rng.integers(len(open_)))
        file_index, boxes, corners, cursor = entry = open_[i]
        entry[3] += 1
        if entry[3] == len(corners):
            open_[i] = open_[-1]
            open_.pop()
        yield file_index, boxes, corners[cursor].tolist()
