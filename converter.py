"""Convert a folder of numbered TIFF slices into the Zarr layout VesuviusStream reads.

    python converter.py SRC_DIR DEST.zarr [options]

Slices are the files ``*.tif`` / ``*.tiff`` whose names are numbers in ASCII
digits (``00.tif``, ``000.tif``, ``0001.tiff``; not ``٢.tif``, nor a name with
anything after the extension), ordered numerically: slice i is the file numbered
i. All slices of the requested z range must exist and share shape and dtype.

The output is a Zarr group: ``DEST/volume`` (z, y, x), and optionally
``DEST/labels`` and ``DEST/mask`` ((y, x), their values as stored in the file:
uint8, or uint16 when a 16-bit image holds values above 255). The group's
attributes record the source folder, the region of interest (its start is the
offset of ``volume[0, 0, 0]`` in the original scan) and the options used.

Every range is half-open, [start, end), as in Python slicing:
``--z_start 17 --z_end 43`` keeps slices 17 to 42 (26 slices).

Guarantees: the whole stack is never held in memory (slabs of a few chunks are
read as bands of rows, decoded and encoded in parallel threads); the output is
written to a hidden sibling ``.DEST.partial-PID`` and renamed into place at the
end, so an interrupted or failed run leaves DEST as it was; DEST is replaced
only if it is still what was checked at the start (nothing, or with
``--overwrite`` the same Zarr store): if it changed meanwhile, the run ends with
one line and writes nothing there; while a run writes it holds the lock file
``.DEST.lock`` beside DEST (an ``flock``, released by the system when the run
dies; there is none on Windows), so a second run to the same DEST refuses at
once, naming the first one's PID; bad input, an unwritable destination or a full
disk end with exit status 2 and one line on stderr; on success one summary line
goes to stdout (unless ``--quiet``).

Example (Python)::

    from converter import convert
    convert("segment/layers", "segment.zarr", z_range=(17, 43), labels="inklabels.png")
"""

import argparse
import concurrent.futures
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import sys
import threading
import time

import numpy as np
import tifffile
import zarr

# Matched whole (fullmatch): ASCII digits only, nothing after the extension.
SLICE_NAME = re.compile(r"([0-9]+)\.tiff?", re.IGNORECASE | re.ASCII)
DEFAULT_CHUNKS = (16, 256, 256)
COMPRESSORS = ("zstd", "lz4", "blosc-zstd", "blosc-lz4", "gzip", "none")
# Largest slab of input (bytes) one thread holds at a time.
SLAB_BYTES = 64 * 2**20


class Parameter(str):
    """The name of an argument of ``convert()`` inside a ``ConversionError`` message."""


class ConversionError(Exception):
    """Bad input, an unreadable file or an unwritable destination: one line for the user.

    The parts of the message given as ``Parameter`` name an argument of
    ``convert()``; the command line shows its own flag there instead.
    """

    def __init__(self, *parts):
        super().__init__("".join(parts))
        self.parts = parts


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, from the command line); the message says what is at the destination."""


def convert(src_dir, dest, z_range=None, y_range=None, x_range=None,
            chunks=DEFAULT_CHUNKS, zarr_format=3, compressor="zstd", dtype=None,
            window=None, labels=None, mask=None, overwrite=False, threads=None,
            progress=False):
    """Convert the TIFF slices in ``src_dir`` into a Zarr group at ``dest``.

    Args:
        src_dir: folder of numbered slices.
        dest: path of the Zarr group to create.
        z_range, y_range, x_range: ``(start, end)``, half-open; ``None`` (or a
            ``None`` end) means the whole extent. z counts slice numbers.
        chunks: ``(z, y, x)`` chunk shape of the volume.
        zarr_format: 2 or 3.
        compressor: one of ``COMPRESSORS``.
        dtype: ``None`` keeps the slices' dtype; ``'uint8'`` converts uint16 by
            ``value >> 8``, or by ``window``.
        window: ``(low, high)``, finite, low < high: map [low, high] linearly
            onto 0..255, clipping.
        labels, mask: 2D PNG or TIFF files at the slices' resolution. Their
            values are kept exactly (palette images by index; 1-bit images as
            0 and 1), stored as uint8, or as uint16 when a 16-bit image holds
            values above 255; an image whose values cannot be kept so (a colour
            image whose channels differ, a float image, ...) is refused.
        overwrite: replace an existing Zarr store at ``dest`` (nothing else: a
            destination that is, holds or lies in ``src_dir`` is always
            refused); through a symlink, the store it points to is replaced.
            Only what was there at the start is replaced, never what another
            process put there since.
        threads: decoding/encoding threads (default: the number of CPUs).
        progress: print progress on stderr.

    Returns:
        The written group, opened read-only.

    Raises:
        ConversionError: bad input, the output could not be written (disk
            full, no permission), another conversion to ``dest`` is running,
            or ``dest`` changed during the conversion; ``dest`` is left as
            it was.
        Interrupted: Ctrl-C; its message says what is at ``dest``.
    """
    chunks = _check_options(chunks, zarr_format, compressor, dtype, window, threads)
    if not os.path.isdir(src_dir):
        raise ConversionError(f"source folder {src_dir} does not exist or is not a folder")
    # Only this is ever replaced; taken before the checks, so that no change after them
    # goes unseen.
    checked = _what_is_at(dest)
    _check_dest(src_dir, dest, (("labels", labels), ("mask", mask)), overwrite)

    slices = find_slices(src_dir)
    numbers = sorted(slices)
    z0, z1 = _check_range("z", z_range, numbers[0], numbers[-1] + 1)
    missing = [n for n in range(z0, z1) if n not in slices]
    if missing:
        name = os.path.basename(slices[numbers[0]])
        width, ext = len(SLICE_NAME.fullmatch(name).group(1)), os.path.splitext(name)[1]
        listed = ", ".join(f"{n:0{width}d}{ext}" for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConversionError(f"missing slices in z range [{z0}, {z1}): {listed}{more}")
    paths = [slices[n] for n in range(z0, z1)]
    height, width, source_dtype = _check_slices(paths)
    y0, y1 = _check_range("y", y_range, 0, height)
    x0, x1 = _check_range("x", x_range, 0, width)
    out_dtype = np.dtype(dtype or source_dtype)
    if out_dtype != source_dtype and not (source_dtype == np.uint16 and out_dtype == np.uint8):
        raise ConversionError(f"cannot convert {source_dtype} slices to {out_dtype}; "
                              f"only uint16 -> uint8 is supported")

    shape = (z1 - z0, y1 - y0, x1 - x0)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    attributes = {
        "source": os.fspath(src_dir),
        "slices": [os.path.basename(paths[0]), os.path.basename(paths[-1])],
        "source_shape": [numbers[-1] + 1, height, width],
        "roi": {"z": [z0, z1], "y": [y0, y1], "x": [x0, x1]},
        "offset": [z0, y0, x0],
        "source_dtype": str(source_dtype),
        "dtype": str(out_dtype),
        "uint8_rule": (None if out_dtype == source_dtype else
                       f"window {window[0]}..{window[1]} -> 0..255" if window else
                       "value >> 8"),
        "chunks": list(chunks),
        "compressor": compressor,
        "zarr_format": zarr_format,
        "labels": None if labels is None else os.fspath(labels),
        "mask": None if mask is None else os.fspath(mask),
    }

    # Through a symlink, the store it points to is replaced where it lives.
    target = checked[0]
    partial = _hidden(target, "partial")
    at_dest = f"nothing was written at {dest}"        # updated once the output is in place
    writes, lock = _Gate(), contextlib.ExitStack()
    try:
        lock.enter_context(_locked(dest, target))
        _check_unchanged(dest, checked)    # e.g. another run finished after our checks
        _remove_leftovers(dest, target)
        group = zarr.open_group(_GatedStore(zarr.storage.LocalStore(partial), writes),
                                mode="w", zarr_format=zarr_format)
        group.attrs["vesuvius_converter"] = attributes
        for name, path in (("labels", labels), ("mask", mask)):
            if path is not None:
                # Read, written and freed one at a time, before the long part.
                image = _read_image(path, name, (height, width))[y0:y1, x0:x1]
                group.create_array(name, shape=image.shape, chunks=chunks[1:],
                                   dtype=image.dtype, fill_value=0,
                                   config={"write_empty_chunks": False},
                                   **_codecs(compressor, zarr_format, image.dtype))[...] = image
                del image
        volume = group.create_array("volume", shape=shape, chunks=chunks, dtype=out_dtype,
                                    fill_value=0, config={"write_empty_chunks": False},
                                    **_codecs(compressor, zarr_format, out_dtype))
        _copy_slabs(paths, volume, (y0, x0), source_dtype, window, threads, progress)
        with _signals_held():              # so that DEST is never missing
            _check_unchanged(dest, checked)     # _swap checks what it moves aside too
            old = _swap(partial, target, checked[1])
            at_dest = f"{dest} holds the new output"
            if old is not None:
                at_dest += (f"; the old one is not fully deleted: delete {old}, or the next "
                            f"conversion to {dest} will")
        if old is not None:
            shutil.rmtree(old)
    except KeyboardInterrupt:
        raise Interrupted(at_dest) from None
    except OSError as error:
        raise ConversionError(f"cannot write {dest}: {_cause(error)}; {at_dest}") from error
    finally:
        writes.close()
        shutil.rmtree(partial, ignore_errors=True)
        lock.close()                       # last: the next run finds nothing of this one
    return zarr.open_group(dest, mode="r")


def _check_options(chunks, zarr_format, compressor, dtype, window, threads):
    """Refuse option values that no input could make right; return ``chunks`` as ints."""
    if zarr_format not in (2, 3):
        raise ConversionError(Parameter("zarr_format"), f" must be 2 or 3, got {zarr_format}")
    if compressor not in COMPRESSORS:
        raise ConversionError(Parameter("compressor"), f" must be one of "
                              f"{', '.join(COMPRESSORS)}, got {compressor!r}")
    if len(chunks) != 3:
        raise ConversionError(Parameter("chunks"), f" must be (z, y, x), got {chunks}")
    for index, size in enumerate(chunks):
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ConversionError(Parameter(f"chunks[{index}]"), f" must be >= 1, got {size}")
    if dtype not in (None, "uint8", "uint16"):
        raise ConversionError(Parameter("dtype"), f" must be uint8 or uint16, got {dtype}")
    if window is not None:
        if dtype != "uint8":
            raise ConversionError(Parameter("window"), " applies to ", Parameter("dtype"),
                                  " uint8 only")
        # An infinite or empty window would map every value to 0 (or divide by zero).
        if len(window) != 2 or not all(map(math.isfinite, window)) or window[0] >= window[1]:
            raise ConversionError(Parameter("window"), f" must be (low, high), finite, with "
                                  f"low < high; got {tuple(window)}")
    if threads is not None and threads < 1:
        raise ConversionError(Parameter("threads"), f" must be >= 1, got {threads}")
    return tuple(int(size) for size in chunks)


def _check_dest(src_dir, dest, images, overwrite):
    """Refuse a ``dest`` whose replacement would touch the input, or is not ours to replace.

    The converter deletes only what it could have made: DEST may not be, hold,
    or lie inside the source folder, nor hold the labels or mask file, nor the
    current folder, and ``overwrite`` replaces an existing Zarr store only.
    """
    source, target = os.path.realpath(src_dir), os.path.realpath(dest)
    if target == source or _within(target, source) or _within(source, target):
        relation = ("is" if target == source else
                    "is inside" if _within(target, source) else "contains")
        raise ConversionError(f"destination {dest} {relation} the source folder {src_dir}; "
                              f"choose a destination outside it")
    for name, path in images:
        if path is not None and _within(os.path.realpath(path), target):
            raise ConversionError(f"destination {dest} contains the {name} file {path}; "
                                  f"choose another destination")
    here = os.path.realpath(os.getcwd())
    if target == here or _within(here, target):
        raise ConversionError(f"destination {dest} {'is' if target == here else 'contains'} "
                              f"the current folder; name the store to write, e.g. out.zarr")
    if not os.path.lexists(dest):
        return
    if not overwrite:
        raise ConversionError(f"{dest} exists; pass ", Parameter("overwrite=True"),
                              " to replace it")
    if not _is_zarr_store(dest):
        raise ConversionError(f"{dest} exists and is not a Zarr store; ", Parameter("overwrite"),
                              " replaces only a Zarr store: move or delete it yourself")


def _what_is_at(dest):
    """What ``dest`` names now: (its real path, the identity of what is there, or None).

    The identity is device, inode and ctime: a folder deleted and made again
    may get the freed inode number back, but not its ctime (which also changes
    when entries are added to or removed from the folder).
    """
    target = os.path.realpath(dest)
    try:
        status = os.lstat(target)
    except OSError:                   # nothing there (or nothing we may see: writing fails too)
        return target, None
    return target, (status.st_dev, status.st_ino, status.st_ctime_ns)


def _check_unchanged(dest, checked):
    """Refuse to go on if ``dest`` no longer names what ``_what_is_at`` found at the start."""
    if _what_is_at(dest) != checked:
        raise _changed(dest)


def _changed(dest):
    """The error of a run whose DEST is not what it checked at the start."""
    return ConversionError(f"{dest} changed during the conversion (something else made, "
                           f"replaced or removed it); nothing was written at {dest}: see what "
                           f"is there now, then convert again")


@contextlib.contextmanager
def _locked(dest, target):
    """Hold the lock of the conversions to ``target``: the hidden file ``.NAME.lock`` beside it.

    A second run to the same store (by any path to it) refuses at once, naming
    the PID of the run that holds the lock. The lock is an ``flock``, which the
    system releases when its holder dies: a killed run leaves at most an
    unlocked file, which the next run takes over. Where there is no ``fcntl``
    (Windows), there is no lock: run one conversion to a DEST at a time.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder, name = os.path.split(target)
    path = os.path.join(folder, f".{name}.lock")
    os.makedirs(folder, exist_ok=True)            # zarr would make it for the output anyway
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "not yet written"
            os.close(fd)
            raise ConversionError(f"another conversion to {dest} is running (PID {holder}); "
                                  f"wait for it to end, or choose another destination") from None
        except BaseException:
            os.close(fd)
            raise
        # A holder removes the file while it still holds it: if that came between our open
        # and our flock, we hold a file that no other run will open. Open the one there now.
        if _is_at(fd, path):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if _is_at(fd, path):                      # someone may have removed it meanwhile
            os.unlink(path)
        os.close(fd)


def _is_at(fd, path):
    """Whether the open file ``fd`` is the one at ``path``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _within(path, folder):
    """Whether ``path`` lies strictly inside ``folder`` (both real, absolute paths)."""
    return path != folder and os.path.commonpath([path, folder]) == folder


def _is_zarr_store(path):
    """A folder with Zarr metadata at its top (format 2 or 3)."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("zarr.json", ".zgroup", ".zarray"))


def find_slices(src_dir):
    """``{number: path}`` of the numbered TIFF files in ``src_dir``."""
    try:
        names = os.listdir(src_dir)
    except OSError as error:
        raise ConversionError(f"cannot read source folder {src_dir}: {error.strerror}") from error
    slices = {}
    for name in names:
        match = SLICE_NAME.fullmatch(name)
        if not match:
            continue
        number = int(match.group(1))
        if number in slices:
            raise ConversionError(f"two files for slice {number}: "
                                  f"{os.path.basename(slices[number])} and {name}")
        slices[number] = os.path.join(src_dir, name)
    if not slices:
        raise ConversionError(f"no slices in {src_dir}: expected files named like "
                              f"00.tif, 000.tif or 0001.tiff")
    return slices


def _check_range(axis, given, low, high):
    """Validate a half-open [start, end) range within [low, high)."""
    start, end = given if given is not None else (None, None)
    start = low if start is None else start
    end = high if end is None else end
    if not (low <= start < high and low < end <= high):
        raise ConversionError(Parameter(f"{axis}_range"), f" [{start}, {end}) is out of "
                              f"range: {axis} must lie within [{low}, {high})")
    if start >= end:
        raise ConversionError(Parameter(f"{axis}_range"), f" [{start}, {end}) is empty")
    return start, end


def _check_slices(paths):
    """Shape (height, width) and dtype shared by all slices, read from their headers."""
    expected = None
    for path in paths:
        found = _read_header(path)
        if len(found[0]) != 2:
            raise ConversionError(f"{path} holds an image of shape {found[0]}; "
                                  f"each slice must be one 2D image")
        if expected is None:
            expected, first = found, path
        elif found != expected:
            raise ConversionError(
                f"{path} has shape {found[0]} and dtype {found[1]}, but "
                f"{os.path.basename(first)} has shape {expected[0]} and dtype {expected[1]}")
    return expected[0][0], expected[0][1], expected[1]


def _read_header(path):
    """(shape, dtype) of the image in one slice, from its header (see _held_log)."""
    with _held_log(tifffile.logger()) as held:
        try:
            with tifffile.TiffFile(path) as tif:
                found = tif.series and (tuple(tif.series[0].shape), np.dtype(tif.series[0].dtype))
            reason = "not a readable TIFF image"
        except Exception as error:
            found, reason = None, str(error)
    if found and not held:
        return found
    if held:                                   # tifffile logged why
        reason = f"{reason} ({_first_message(held)})" if not found else _first_message(held)
    raise ConversionError(f"cannot read {path}: {reason}")


def _first_message(records):
    """The first of tifffile's log ``records``, without the "<tifffile.TiffPages @offset> "
    that tifffile puts first."""
    return re.sub(r'^<tifffile[^>]*> ', '', records[0].getMessage())


@contextlib.contextmanager
def _held_log(logger):
    """Hold the records ``logger`` logs in this thread in the block (the list yielded).

    tifffile logs, rather than raises, what is wrong with a file (a tag it
    cannot read, a strip it cannot find and reads as zeros): a slice it logs
    anything about is refused, its one line saying what tifffile said, rather
    than stored as tifffile guessed it. A filter, not a handler, so that no
    handler (the user's on that logger included) sees the records; removed
    after the block. Only this thread's: slices are decoded in several threads.
    """
    held, thread = [], threading.get_ident()

    def hold(record):
        if record.thread != thread:
            return True
        held.append(record)
        return False
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def _read_band(path, rows, cols):
    """Rows and columns of one slice, decoding no more than the strips/tiles needed.

    What tifffile only logs while it decodes (a strip it cannot find, which it
    reads as zeros) fails here: a slice is stored as it is, or not at all.
    """
    with _held_log(tifffile.logger()) as held:
        try:
            try:
                # Uncompressed, contiguous data (scroll slices): map it, copy the band.
                mapped = tifffile.memmap(path, mode="r")
            except ValueError:
                band = tifffile.imread(path, selection=(rows, cols))
            else:
                band = np.array(mapped[rows, cols])
                del mapped
        except Exception as error:
            raise ConversionError(_decode_message(path, error)) from error
        if held:
            raise ConversionError(f"cannot read {path}: {_first_message(held)}")
    return band.astype(band.dtype.newbyteorder("="), copy=False)


def _decode_message(path, error):
    """One line saying why a TIFF could not be decoded, and what to install."""
    text = str(error)
    if isinstance(error, ImportError) or "imagecodecs" in text:
        try:
            with tifffile.TiffFile(path) as tif:
                codec = tif.pages[0].compression.name
        except Exception:
            codec = "its"
        return (f"cannot decode {path}: {codec} compression needs the 'imagecodecs' "
                f"package (pip install imagecodecs)")
    return f"cannot read {path}: {text}"


def _slab_units(shape, chunks, itemsize):
    """Chunk-aligned boxes (z0, z1, y0, y1, x0, x1) of at most ``SLAB_BYTES`` each.

    A unit is one row of chunks in z and y (a band of rows of every slice in a
    z chunk), split along x when too wide. Units never share a chunk, so they
    can be written in parallel.
    """
    depth, height, width = shape
    cz, cy, cx = chunks
    row_bytes = cz * cy * cx * itemsize
    x_step = cx * max(1, SLAB_BYTES // row_bytes)
    for z in range(0, depth, cz):
        for y in range(0, height, cy):
            for x in range(0, width, x_step):
                yield z, min(z + cz, depth), y, min(y + cy, height), x, min(x + x_step, width)


def _copy_slabs(paths, volume, origin, source_dtype, window, threads, progress):
    """Read every unit from the slices and write it into ``volume``, in parallel."""
    y_origin, x_origin = origin
    out_dtype = np.dtype(volume.dtype)
    units = list(_slab_units(volume.shape, volume.chunks, source_dtype.itemsize))

    def copy(unit):
        z0, z1, y0, y1, x0, x1 = unit
        rows = slice(y_origin + y0, y_origin + y1)
        cols = slice(x_origin + x0, x_origin + x1)
        slab = np.stack([_read_band(paths[z], rows, cols) for z in range(z0, z1)])
        volume[z0:z1, y0:y1, x0:x1] = _to_dtype(slab, out_dtype, window)
        return slab.nbytes

    threads = threads or os.cpu_count() or 1
    meter = _Progress(len(units), progress)
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    pending = set()
    try:
        for unit in units:
            if len(pending) >= 2 * threads:       # bounded: memory stays flat
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    meter.update(future.result())
            pending.add(pool.submit(copy, unit))
        for future in concurrent.futures.as_completed(pending):
            meter.update(future.result())
    finally:
        # After a failure or Ctrl-C: drop the queued units, let the running ones end.
        pool.shutdown(cancel_futures=True)
        meter.finish()


def _to_dtype(slab, out_dtype, window):
    """uint16 -> uint8 by ``>> 8`` or a linear window; other dtypes unchanged."""
    if slab.dtype == out_dtype:
        return slab
    if window is None:
        return (slab >> 8).astype(np.uint8)
    low, high = window
    scaled = (slab.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _codecs(compressor, zarr_format, dtype):
    """Keyword arguments of ``create_array`` for a compressor name."""
    if compressor == "none":
        return {"compressors": None}
    if zarr_format == 2:
        import numcodecs
        codec = {"zstd": numcodecs.Zstd(level=3), "lz4": numcodecs.LZ4(),
                 "gzip": numcodecs.GZip(level=5),
                 "blosc-zstd": numcodecs.Blosc("zstd", 5, numcodecs.Blosc.BITSHUFFLE),
                 "blosc-lz4": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.BITSHUFFLE)}
        return {"compressors": codec[compressor]}
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
    typesize = np.dtype(dtype).itemsize
    codec = {"zstd": ZstdCodec(level=3), "gzip": GzipCodec(level=5),
             # Zarr 3 has no plain lz4 codec; Blosc's lz4 is the standard one.
             "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=typesize),
             "blosc-zstd": BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle",
                                      typesize=typesize),
             "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle",
                                     typesize=typesize)}
    return {"compressors": codec[compressor]}


def _read_image(path, name, shape):
    """The 2D labels or mask image at ``path``, its values as stored in the file.

    Its declared size is checked against the slices' ``shape`` before it is
    decoded: that is the guard against decompression bombs, in place of
    Pillow's pixel limit, which real segments exceed. Grayscale and palette
    images (by index) keep their values, a colour image only if its channels
    are equal; 1-bit images give 0 and 1. The result is uint8, or uint16 when a
    16-bit image holds values above 255; anything else is refused.
    """
    if not os.path.isfile(path):
        raise ConversionError(f"{name} file {path} does not exist")
    try:
        if os.fspath(path).lower().endswith(".png"):
            image, bands = _decode_png(path, name, shape)
        else:
            image, bands = _decode_tiff(path, name, shape)
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"cannot read {name} {path}: {error}") from error
    image = _one_channel(image, bands, name, path)
    if image.dtype not in (np.bool_, np.uint8, np.uint16):
        raise ConversionError(f"{name} {path} holds {image.dtype} values; labels and masks "
                              f"must be 1-, 8- or 16-bit unsigned integers: save it as such")
    if image.dtype == np.uint16 and image.max() > 255:
        return image
    return image.astype(np.uint8, copy=False)


def _decode_png(path, name, shape):
    """(pixels, band names) of a PNG, decoded by Pillow once its size is that of the slices."""
    try:
        from PIL import Image
    except ImportError:
        raise ConversionError(f"reading {name} {path} needs the 'Pillow' package "
                              f"(pip install Pillow)") from None
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None     # _check_size guards
    try:
        with Image.open(path, formats=["PNG"]) as png:
            _check_size(name, path, (png.height, png.width), shape)
            rawmode = png.tile[0][3]
            # Pillow scales 2- and 4-bit gray to 0..255 and cuts 16-bit colour to 8 bits.
            if rawmode in ("L;2", "L;4") or rawmode.endswith(";16B") and png.mode != "I;16":
                raise ConversionError(
                    f"{name} {path} is a PNG whose values Pillow cannot read exactly (pixel "
                    f"format {rawmode}); save it as an 8- or 16-bit grayscale PNG or a TIFF")
            return np.asarray(png), png.getbands()
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _decode_tiff(path, name, shape):
    """(pixels, None) of a one-image TIFF, decoded once its size is that of the slices."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        _check_size(name, path, (page.imagelength, page.imagewidth), shape)
        if len(tif.pages) > 1:
            raise ConversionError(f"{name} {path} holds {len(tif.pages)} images; it must "
                                  f"hold one 2D image")
        image = page.asarray()
        return (np.moveaxis(image, 0, -1) if page.axes == "SYX" else image), None


def _check_size(name, path, size, shape):
    """Refuse a labels or mask image whose (height, width) is not the slices'."""
    if size != shape:
        raise ConversionError(f"{name} {path} has shape {size}, but the slices are "
                              f"{shape}; it must match them")


def _one_channel(image, bands, name, path):
    """A 2D image from ``image``, (y, x) or (y, x, channel) with ``bands`` naming the channels.

    Several channels are accepted only when they are all equal, an alpha
    channel (band ``A``) aside if it is fully opaque: otherwise which one
    holds the values is not ours to guess.
    """
    if image.ndim == 2:
        return image
    bands = bands or tuple(str(i) for i in range(image.shape[-1]))
    colour = [i for i, band in enumerate(bands) if band != "A"]
    alpha = [i for i, band in enumerate(bands) if band == "A"]
    if (any((image[..., i] != np.iinfo(image.dtype).max).any() for i in alpha) or
            any(not np.array_equal(image[..., i], image[..., colour[0]]) for i in colour[1:])):
        raise ConversionError(
            f"{name} {path} has channels {', '.join(bands)} that differ (an opaque alpha "
            f"aside), so which one holds the {name} is unclear: save that channel as a "
            f"one-channel (grayscale) image")
    return np.ascontiguousarray(image[..., colour[0]])


def _hidden(dest, kind):
    """The path of this process's hidden ``.NAME.KIND-PID`` beside ``dest``."""
    folder, name = os.path.split(dest)
    return os.path.join(folder, f".{name}.{kind}-{os.getpid()}")


def _remove_leftovers(dest, target):
    """Delete what dead runs to ``target`` left: their ``.NAME.partial-PID`` and ``.NAME.old-PID``.

    Only these names of ours are touched, and only when process PID is gone.
    An ``.old`` left by a run killed between its two renames is the only copy
    of what ``dest`` held: it is named, not deleted.
    """
    folder, name = os.path.split(target)
    if not os.path.isdir(folder):
        return
    ours = re.compile(rf"\.{re.escape(name)}\.(partial|old)-(\d+)")
    for entry in sorted(os.listdir(folder)):
        match = ours.fullmatch(entry)
        if not match or _running(int(match.group(2))):
            continue
        path = os.path.join(folder, entry)
        if match.group(1) == "old" and not os.path.lexists(target):
            raise ConversionError(f"{dest} is missing, and {path} holds what it was (a "
                                  f"conversion was killed while replacing it): rename it back "
                                  f"to {dest}, or delete it")
        shutil.rmtree(path)


def _running(pid):
    """Whether process ``pid`` runs; our own PID is that of an earlier, finished convert()."""
    if pid == os.getpid():
        return False
    if os.name != "posix":            # no harmless way to ask: assume it runs
        return True
    try:
        os.kill(pid, 0)               # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:           # another user's process
        return True
    return True


def _swap(partial, dest, checked):
    """Rename the finished ``partial`` to ``dest``; return where the old ``dest`` went, or None.

    ``checked`` is the identity (``_what_is_at``) of what ``dest`` held when
    checked, or None if nothing. What is moved aside is compared with it, so
    that nothing put there since is ever replaced. If the second rename fails,
    the old store is put back: ``dest`` is never left missing by an error (run
    it with signals held for interrupts).
    """
    if checked is None:
        os.rename(partial, dest)      # fails if a file or a non-empty folder is there
        return None
    old = _hidden(dest, "old")
    os.rename(dest, old)
    try:
        moved = os.lstat(old)         # a rename may change the ctime: device and inode
        if (moved.st_dev, moved.st_ino) != checked[:2]:
            raise _changed(dest)
        os.rename(partial, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    return old


@contextlib.contextmanager
def _signals_held():
    """Deliver SIGINT and SIGTERM only when the block is done.

    Only the main thread receives signals; in another one there is nothing to hold.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {number: signal.signal(number, lambda number, frame: held.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in held:
            signal.raise_signal(number)


class _Gate:
    """Counts the writes in flight; once closed, lets no new one start.

    zarr writes the chunks of one assignment concurrently and lets the others
    run on when one fails (or the caller is interrupted): a failed run must
    wait for them before it removes its output, or they would recreate it.
    """

    def __init__(self):
        self._condition = threading.Condition()
        self._in_flight, self._closed = 0, False

    @contextlib.contextmanager
    def write(self):
        with self._condition:
            if self._closed:
                raise RuntimeError("the conversion has ended; nothing more is written")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._condition:
                self._in_flight -= 1
                self._condition.notify_all()

    def close(self):
        """Let no new write start, and wait for those in flight."""
        with self._condition:
            self._closed = True
            self._condition.wait_for(lambda: self._in_flight == 0)


class _GatedStore(zarr.storage.WrapperStore):
    """A store whose writes pass through a ``_Gate``."""

    def __init__(self, store, gate):
        super().__init__(store)
        self._gate = gate

    def _with_store(self, store):
        return type(self)(store, self._gate)

    async def set(self, key, value):
        with self._gate.write():
            await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        with self._gate.write():
            await self._store.set_if_not_exists(key, value)


def _cause(error):
    """What went wrong in an OSError, and on which file, in a few words."""
    cause = error.strerror or str(error)
    if error.filename:
        cause += f": {error.filename}"
    if error.errno == errno.ENAMETOOLONG:
        cause += " (the output is first written under a longer hidden name: choose a shorter one)"
    return cause


class _Progress:
    """Units done, MB/s and ETA on stderr, rewritten in place."""

    def __init__(self, total, enabled):
        self.total, self.enabled = total, enabled
        self.done = self.bytes = 0
        self.start = time.perf_counter()

    def update(self, nbytes):
        self.done += 1
        self.bytes += nbytes
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            rate = self.bytes / max(elapsed, 1e-9)
            eta = elapsed * (self.total - self.done) / self.done
            print(f"\r{self.done}/{self.total} slabs  {rate / 2**20:6.0f} MB/s  "
                  f"ETA {eta:5.0f} s", end="", file=sys.stderr, flush=True)

    def finish(self):
        if self.enabled:
            print(file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Bad arguments: one line and exit status 2, as for bad input."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# The flags of the parameters that convert()'s messages name; any other is --NAME.
FLAGS = {**{f"{axis}_range": f"--{axis}_start/--{axis}_end" for axis in "zyx"},
         **{f"chunks[{index}]": f"--{axis}_chunksize" for index, axis in enumerate("zyx")},
         "overwrite=True": "--overwrite"}


def main(argv=None):
    parser = _Parser(prog="converter.py", description=__doc__.split("\n\n")[0],
                     epilog="Ranges are half-open [start, end), as in Python slicing.")
    parser.add_argument("src_dir", help="folder of numbered TIFF slices (00.tif, 01.tif, ...)")
    parser.add_argument("dest", help="Zarr group to create (e.g. segment.zarr)")
    for axis in "zyx":
        parser.add_argument(f"--{axis}_start", type=int, help=f"first {axis} kept "
                            f"(default: the first{' slice' if axis == 'z' else ''})")
        parser.add_argument(f"--{axis}_end", type=int, help=f"one past the last {axis} kept "
                            f"(default: the end)")
    for axis, default in zip("zyx", DEFAULT_CHUNKS):
        parser.add_argument(f"--{axis}_chunksize", type=int, default=default,
                            help=f"chunk size along {axis} (default {default})")
    parser.add_argument("--zarr_format", type=int, choices=(2, 3), default=3,
                        help="Zarr format (default 3)")
    parser.add_argument("--compressor", choices=COMPRESSORS, default="zstd",
                        help="chunk compression (default zstd)")
    parser.add_argument("--dtype", choices=("uint8", "uint16"),
                        help="output dtype (default: the slices'); uint8 from uint16 is "
                             "value >> 8 unless --window is given")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="with --dtype uint8: map [LOW, HIGH] onto 0..255, clipping")
    parser.add_argument("--labels", help="2D ink labels (PNG or TIFF), stored as DEST/labels "
                        "with their values kept (uint8, or uint16 above 255)")
    parser.add_argument("--mask", help="2D papyrus mask (PNG or TIFF), stored as DEST/mask "
                        "likewise")
    parser.add_argument("--threads", type=int, help="threads (default: number of CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace DEST if it is an "
                        "existing Zarr store, or a symlink to one (never the slices' folder, a "
                        "folder holding it, or another file)")
    parser.add_argument("--quiet", action="store_true", help="no progress line (shown on a "
                        "terminal only) and no summary line (on stdout)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        group = convert(args.src_dir, args.dest,
                        z_range=(args.z_start, args.z_end), y_range=(args.y_start, args.y_end),
                        x_range=(args.x_start, args.x_end),
                        chunks=(args.z_chunksize, args.y_chunksize, args.x_chunksize),
                        zarr_format=args.zarr_format, compressor=args.compressor,
                        dtype=args.dtype, window=args.window, labels=args.labels,
                        mask=args.mask, overwrite=args.overwrite, threads=args.threads,
                        progress=not args.quiet and sys.stderr.isatty())
    except ConversionError as error:
        message = "".join(FLAGS.get(part, f"--{part}") if isinstance(part, Parameter) else part
                          for part in error.parts)
        print(f"converter.py: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        # convert() says what is at DEST; interrupted before it began writing, nothing was.
        at_dest = str(interrupt) or f"nothing was written at {args.dest}"
        print(f"converter.py: interrupted; {at_dest}", file=sys.stderr)
        return 130
    if not args.quiet:
        print(_summary(args.dest, group, time.perf_counter() - started))
    return 0


def _summary(dest, group, seconds):
    """One line on the written store: its arrays, its size on disk and the time taken."""
    volume = group["volume"]
    arrays = [f"volume {'x'.join(map(str, volume.shape))} {volume.dtype}, "
              f"chunks {'x'.join(map(str, volume.chunks))}"]
    arrays += [f"{name} {group[name].dtype}" for name in ("labels", "mask") if name in group]
    size = sum(os.path.getsize(os.path.join(folder, file))
               for folder, _, files in os.walk(dest) for file in files)
    return f"{dest}: {', '.join(arrays)}; {size:,} bytes on disk; {seconds:.1f} s"


if __name__ == "__main__":
    # A polite kill cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
