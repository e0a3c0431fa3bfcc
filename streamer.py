"""Stream random 3D blocks from Zarr volumes into PyTorch, chunk-aware and exact.

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
        for blocks in loader:          # (32, 26, 64, 64) torch.uint16
            ...

See the class docstring for the guarantees and every argument.
"""

import itertools
import math
import os

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 6


class VesuviusStream(IterableDataset):
    """Random (or raster-ordered) 3D blocks from one or more 3D arrays.

    Each item is a tensor of shape ``(z_size, y_size, x_size)`` cut from one of
    the sources, in the source's own dtype (uint8 -> ``torch.uint8``, uint16 ->
    ``torch.uint16``; convert in your training step, e.g. ``x.float() / 65535``).
    With ``return_coords=True`` an item is ``(block, coords)`` where ``coords``
    is an int64 tensor ``(file_index, z, y, x)``: the block's start corner in
    that array's own index space.

    Guarantees:

    * A *position* is a start corner at which the block fits inside the array.
      An epoch yields exactly ``samples_per_epoch`` items in total over all
      DataLoader workers and all DDP ranks, never the same position twice.
    * Workers and ranks split the epoch into disjoint, contiguous shares whose
      sizes differ by at most one sample. The *set* of positions of an epoch is
      a function of (sources, block size, samples_per_epoch, sampling_method,
      shuffle, seed, epoch) alone: the same for any number of workers or ranks.
    * ``set_epoch(e)`` selects another epoch; the same ``(seed, e)`` always
      gives the same set. It reaches persistent DataLoader workers too.
    * Memory and start-up time do not grow with the number of positions:
      epochs are drawn with keyed bijections (Feistel networks), never from an
      index array. Decoded data is bounded per worker (``region_mb``).

    How an epoch is drawn (``shuffle=True``): the positions of each array are
    partitioned into *regions* aligned to its chunk grid. Each region holds its
    positions in its own random order; the epoch visits regions in a random
    order, taking the next ``samples_per_region`` positions of a region per
    visit (round after round when an epoch needs more). A worker decodes a
    visited region once (region plus the block's halo), cuts all of that
    visit's blocks from it, and interleaves ``open_regions`` such regions so
    that consecutive items come from different places. Every position of an
    array has the same chance to be drawn; positions drawn in one epoch are
    clustered by region, which is what makes reading fast. Lower
    ``samples_per_region`` for more spread (and more decoding per sample).

    Args:
        file_paths (list): the sources. Each is a path or URL (str or
            ``os.PathLike``) to a Zarr array (format 2 or 3), or to a Zarr
            group holding the volume as its array ``volume`` (what
            ``converter.py`` writes); an opened ``zarr.Array``; or a 3D
            ``numpy.ndarray``.
        z_size, y_size, x_size (int): the block shape.
        samples_per_epoch (int): items per epoch, in total over all workers and
            ranks; at most the number of positions of all sources.
        sampling_method (str): ``'uniform'`` (default): each sample picks a
            source uniformly at random (among those with positions left), then
            a position in it. ``'proportional'``: sources are picked with
            probability proportional to their number of positions, i.e. one
            permutation over the positions of all sources.
        shuffle (bool): ``True`` (default) draws random positions. ``False``
            yields positions in raster order (z, then y, then x) within each
            source, sources in the given order, each source's share fixed by
            ``sampling_method`` (equal shares, or proportional ones).
        seed (int): the seed of every random choice. Default 0.
        return_coords (bool): also return the block's ``(file_index, z, y,
            x)``. Default False.
        rank, world_size (int, optional): this process's DDP rank and the
            number of ranks. Default: read from ``torch.distributed`` when it
            is initialized (when this dataset is built), else 0 and 1.
        samples_per_region (int, optional): positions taken per region visit.
            Default: enough that each visit delivers four times the voxels of
            its region (region plus halo).
        region_mb (float): the budget of decoded data per worker, in MiB,
            shared by its ``open_regions`` regions. Default 512. Numpy sources
            are sliced as views and take none of it.
        open_regions (int): regions a worker interleaves. Default 8.

    Example::

        ds = VesuviusStream(["a.zarr", "b.zarr"], 26, 64, 64,
                            samples_per_epoch=50_000, return_coords=True)
        loader = DataLoader(ds, batch_size=32, num_workers=2)
        for epoch in range(3):
            ds.set_epoch(epoch)
            for blocks, coords in loader:   # coords: (32, 4) int64
                x = blocks.float() / 65535

    .. warning::
        Call ``set_epoch(epoch)`` before each epoch, as with
        ``DistributedSampler``; otherwise every epoch repeats the same
        positions (in the same order).
    """

    def __init__(self, file_paths, z_size, y_size, x_size, samples_per_epoch,
                 sampling_method='uniform', shuffle=True, seed=0,
                 return_coords=False, *, rank=None, world_size=None,
                 samples_per_region=None, region_mb=512, open_regions=8):
        super().__init__()
        if isinstance(file_paths, (str, os.PathLike, np.ndarray, zarr.Array)):
            raise TypeError(
                f"file_paths must be a list of sources, got a single "
                f"{type(file_paths).__name__}; wrap it in a list: [source]")
        file_paths = list(file_paths)
        if not file_paths:
            raise ValueError("file_paths is empty: give at least one Zarr path, "
                             "zarr.Array or 3D numpy array")
        block = tuple(_positive_int(name, value) for name, value in
                      (('z_size', z_size), ('y_size', y_size), ('x_size', x_size)))
        if sampling_method not in ('uniform', 'proportional'):
            raise ValueError(f"sampling_method must be 'uniform' or 'proportional', "
                             f"got {sampling_method!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if samples_per_region is not None:
            samples_per_region = _positive_int('samples_per_region', samples_per_region)
        open_regions = _positive_int('open_regions', open_regions)
        if not (isinstance(region_mb, (int, float)) and region_mb > 0):
            raise ValueError(f"region_mb must be a positive number, got {region_mb!r}")
        self.rank, self.world_size = _resolve_ranks(rank, world_size)

        self.arrays = [_open_source(source) for source in file_paths]
        region_bytes = region_mb * 2**20 / open_regions
        self._layouts = []
        for index, array in enumerate(self.arrays):
            if array.ndim != 3:
                raise ValueError(f"source {index} must be 3D (z, y, x), got shape "
                                 f"{tuple(array.shape)}")
            if any(b > s for b, s in zip(block, array.shape)):
                raise ValueError(f"block {block} does not fit in source {index} of "
                                 f"shape {tuple(array.shape)}")
            self._layouts.append(_RegionLayout(array, block, region_bytes,
                                               samples_per_region))
        self.capacity = sum(layout.positions for layout in self._layouts)
        self.samples_per_epoch = _positive_int('samples_per_epoch', samples_per_epoch)
        if self.samples_per_epoch > self.capacity:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} exceeds the "
                             f"{self.capacity} positions of the sources for block "
                             f"{block}")
        self.block = block
        self.sampling_method = sampling_method
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.return_coords = bool(return_coords)
        self.open_regions = open_regions
        # Shared memory, so that set_epoch reaches persistent DataLoader workers.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __len__(self):
        return self.samples_per_epoch

    def set_epoch(self, epoch):
        """Select the epoch whose positions the next iteration yields."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._epoch.fill_(epoch)

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
        d, h, w = self.block
        # Raster order means one region after another, not interleaved.
        open_regions = self.open_regions if self.shuffle else 1
        for file_index, region, (z, y, x), corner in _interleave(
                visits, self.arrays, open_regions, rng):
            item = torch.from_numpy(np.ascontiguousarray(region[z:z + d, y:y + h, x:x + w]))
            if self.return_coords:
                yield item, torch.tensor((file_index, *corner), dtype=torch.int64)
            else:
                yield item

    # -- the epoch plan ---------------------------------------------------

    def _epoch_visits(self, epoch):
        """Yield the epoch's visits in global order, the same in every shard.

        A visit is ``(file_index, region_origin, region_shape, positions)``
        with ``positions`` an (n, 3) int64 array of start corners.
        """
        rng = np.random.default_rng([self.seed, epoch])
        capacities = [layout.positions for layout in self._layouts]
        if not self.shuffle:
            counts = _fixed_shares(self.samples_per_epoch, capacities,
                                   self.sampling_method)
            for file_index, (layout, count) in enumerate(zip(self._layouts, counts)):
                for visit in layout.raster_visits(count):
                    yield (file_index, *visit)
            return
        counts = _random_shares(self.samples_per_epoch, capacities,
                                self.sampling_method, rng)
        streams = [layout.shuffled_visits(count, _key(self.seed, epoch, file_index))
                   for file_index, (layout, count) in enumerate(zip(self._layouts, counts))]
        left = np.array(counts, dtype=np.int64)
        # Interleave the sources' visit streams at random, in proportion to
        # what each still has to give.
        while left.any():
            file_index = int(rng.choice(len(left), p=left / left.sum()))
            visit = next(streams[file_index])
            left[file_index] -= len(visit[2])
            yield (file_index, *visit)


# -- sources ---------------------------------------------------------------

def _open_source(source):
    """Return a 3D array-like (zarr.Array or numpy.ndarray) for one source."""
    if isinstance(source, (np.ndarray, zarr.Array)):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"a source must be a path/URL, a zarr.Array or a numpy "
                        f"array, got {type(source).__name__}")
    path = os.fspath(source)
    if '://' not in path and not os.path.exists(path):
        raise FileNotFoundError(f"no Zarr store at {path!r}")
    try:
        node = zarr.open(path, mode='r')
    except Exception as error:
        raise ValueError(f"{path!r} is not a Zarr array or group ({error})") from error
    if isinstance(node, zarr.Group):
        if 'volume' not in node:
            raise ValueError(f"Zarr group {path!r} has no array 'volume'; its members "
                             f"are {sorted(node.keys())}")
        node = node['volume']
    return node


def _positive_int(name, value):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
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
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return rank, world_size


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
    """Deterministic per-source counts: equal (uniform) or proportional shares."""
    counts = [0] * len(capacities)
    left = total
    while left:
        open_ = [i for i, c in enumerate(capacities) if counts[i] < c]
        weights = [capacities[i] if method == 'proportional' else 1 for i in open_]
        quota = [left * w // sum(weights) for w in weights]
        for j in range(left - sum(quota)):  # remainders go to the first sources
            quota[j] += 1
        for i, q in zip(open_, quota):
            taken = min(q, capacities[i] - counts[i])
            counts[i] += taken
            left -= taken
    return counts


# -- regions: where positions are, and in which order they are visited ----

class _RegionLayout:
    """The positions of one array, partitioned into chunk-aligned regions."""

    def __init__(self, array, block, region_bytes, samples_per_region):
        self.shape = tuple(int(s) for s in array.shape)
        self.block = block
        self.extent = tuple(s - b + 1 for s, b in zip(self.shape, block))
        self.positions = math.prod(self.extent)
        self.itemsize = array.dtype.itemsize
        if isinstance(array, np.ndarray):
            # A view costs nothing: one region, i.e. plain uniform sampling.
            self.region = self.extent
        else:
            self.region = self._grow_region(tuple(array.chunks), region_bytes)
        self.grid = tuple(-(-e // r) for e, r in zip(self.extent, self.region))
        self.regions = math.prod(self.grid)
        if samples_per_region is None:
            box_voxels = math.prod(self._box(self.region))
            samples_per_region = max(1, 4 * box_voxels // math.prod(block))
        self.per_visit = samples_per_region

    def _box(self, region):
        """Shape of the data a region's blocks cover: the region plus the halo."""
        return tuple(min(r + b - 1, s) for r, b, s in zip(region, self.block, self.shape))

    def _grow_region(self, chunks, region_bytes):
        """Region shape (in positions): chunk multiples whose box fits the budget.

        Starts from one chunk (halved while even that is over budget), then
        grows by whole chunks, each step on the axis whose halo costs most
        relative to its size.
        """
        def fits(region):
            return math.prod(self._box(region)) * self.itemsize <= region_bytes

        region = [min(c, e) for c, e in zip(chunks, self.extent)]
        while not fits(region) and max(region) > 1:
            axis = region.index(max(region))
            region[axis] = -(-region[axis] // 2)
        while True:
            growable = [a for a in range(3) if region[a] < self.extent[a]]
            growable.sort(key=lambda a: (region[a] + self.block[a] - 1) / region[a],
                          reverse=True)
            for axis in growable:
                bigger = list(region)
                bigger[axis] = min(region[axis] + chunks[axis], self.extent[axis])
                if fits(bigger):
                    region = bigger
                    break
            else:
                return tuple(region)

    def _region_bounds(self, index):
        """Origin and shape (in positions) of region ``index`` (raster order)."""
        cell = np.unravel_index(index, self.grid)
        origin = tuple(int(c) * r for c, r in zip(cell, self.region))
        shape = tuple(min(r, e - o) for r, e, o in zip(self.region, self.extent, origin))
        return origin, shape

    def shuffled_visits(self, count, key):
        """Yield visits ``(origin, box_shape, positions)`` giving ``count`` positions.

        Round j visits every region in a random order (its own per round) and
        takes the next share of the region's own permutation. Shares are
        proportional to region size (``per_visit`` for a whole region) and
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
                origin, shape = self._region_bounds(region)
                size = math.prod(shape)
                rate = self.per_visit * size / full
                offset = _key(key, 2, region) / 2.0**64     # the random rounding
                first = min(size, math.floor(round_ * rate + offset))
                taken = min(math.floor((round_ + 1) * rate + offset), size) - first
                taken = min(taken, count)
                if taken == 0:
                    continue
                local = _permute(np.arange(first, first + taken), size, _key(key, 1, region))
                positions = np.stack(np.unravel_index(local, shape), axis=1) + origin
                count -= taken
                yield origin, self._box(shape), positions

    def raster_visits(self, count):
        """Yield visits for the first ``count`` positions in raster order.

        A visit is a run of consecutive positions within one z plane: as many
        whole x-rows as the region budget allows, or part of a row when a
        single row is too long for it.
        """
        ez, ey, ex = self.extent
        d, h, w = self.block
        budget = math.prod(self._box(self.region))
        rows = budget // (d * self.shape[2]) - h + 1
        limit = rows * ex if rows >= 1 else max(1, budget // (d * h) - w + 1)
        start = 0
        while start < count:
            stop = min(count, start + limit, (start // (ey * ex) + 1) * ey * ex)
            if limit < ex:
                stop = min(stop, (start // ex + 1) * ex)
            positions = np.stack(np.unravel_index(np.arange(start, stop), self.extent), axis=1)
            origin = positions.min(axis=0)
            shape = positions.max(axis=0) - origin + self.block
            yield tuple(origin.tolist()), tuple(shape.tolist()), positions
            start = stop


# -- cutting blocks from regions -------------------------------------------

def _slice_visits(visits, first, stop):
    """The visits restricted to global samples [first, stop), trimmed at the ends."""
    seen = 0
    for file_index, origin, shape, positions in visits:
        n = len(positions)
        lo, hi = max(first - seen, 0), min(stop - seen, n)
        seen += n
        if lo < hi:
            yield file_index, origin, shape, positions[lo:hi]
        if seen >= stop:
            return


def _interleave(visits, arrays, open_regions, rng):
    """Yield ``(file_index, region, corner_in_region, corner)`` per sample.

    Reads each visit's region once (region plus halo) and keeps
    ``open_regions`` of them open, taking each next sample from one of them
    at random.
    """
    visits = iter(visits)
    open_ = []    # [file_index, region data, corners, corners in region, next]
    while True:
        while len(open_) < open_regions:
            visit = next(visits, None)
            if visit is None:
                break
            file_index, origin, shape, corners = visit
            box = tuple(slice(o, o + s) for o, s in zip(origin, shape))
            open_.append([file_index, np.asarray(arrays[file_index][box]),
                          corners, corners - np.asarray(origin), 0])
        if not open_:
            return
        i = int(rng.integers(len(open_)))
        file_index, region, corners, local, cursor = entry = open_[i]
        entry[4] += 1
        if entry[4] == len(corners):
            open_[i] = open_[-1]
            open_.pop()
        yield file_index, region, local[cursor], corners[cursor].tolist()
