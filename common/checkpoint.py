"""Checkpoints: `{out}/ckpt_{step:06d}.pt`, written to a temp file then renamed.

One file holds everything a run needs to continue exactly: the model (unwrapped, uncompiled
parameter names), its GPTConfig, the optimizer, the step, the stage's Config, the data
loader's position and every RNG state. A kill mid-save leaves at worst a stray temp file,
never a broken newest checkpoint.

Loading never runs code: every load is torch.load(weights_only=True), so beside tensors a
checkpoint holds only plain values (dict, list, tuple, str, int, float, bool, None); the RNG
states are stored as tensors and ints (rng_state), and save_checkpoint refuses anything else.
A file that needs more (a pickled object, e.g. one built to run a command when unpickled) is
refused without being unpickled. Checkpoints of the earlier format (numpy RNG states) are
refused with the opt-in conversion, `python -m common.checkpoint --adopt FILE`.

What keeps a run from losing or poisoning its work:
  checksum    every checkpoint stores a sha256 over its content (each tensor's bytes and
              every other value, in a fixed order); loading recomputes it, so a flipped byte
              in the weights, optimizer moments or RNG states is caught. A checkpoint without
              one (written before they carried one) is refused, since it cannot be told apart
              from a damaged one: `python -m common.checkpoint --adopt FILE` adds one.
  full disk   save_checkpoint refuses a save when the disk has less free space than the newest
              checkpoint's size; a save that fails (no space, I/O error) leaves no temp file
              and every earlier checkpoint as it was, and says how much space one needs.
  finite      save_checkpoint refuses non-finite weights or optimizer moments, and
              prune_checkpoints never deletes the newest checkpoint that verifies.
  no fallback load_checkpoint(dir) takes the newest checkpoint and refuses it when it does not
              verify, naming the newest older one that does: silently resuming an older step
              would repeat work and hide the damage, so choosing it is left to the user.
  one writer  RunLock: an exclusive lock on `{out}/.lock` for a run's whole life.
  background  BackgroundSave writes from a copy in host memory (allocated ahead of the first
              save by host_buffers) while training goes on, the same file the same way; its
              temp file is reserved at full size first, so a full disk is said before the
              loop goes on. (No zip CRC-32s: the sha256 covers
              the same bytes, and torch.load never checked them; see _save.)
  temp files  remove_stale_temps deletes what saves killed mid-write left behind.
  settings    check_resume refuses a resume that would change the run, unless asked to.

    python -m common.checkpoint out/          # check every checkpoint in a run directory
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError
from common.model import GPT, GPTConfig

try:
    import fcntl
except ImportError:  # Windows: no flock; RunLock then does not enforce one writer
    fcntl = None

CKPT_RE = re.compile(r"^ckpt_(\d{6,})\.pt$")
TMP_RE = re.compile(r"^\.ckpt_\d{6,}\.pt\.tmp(\d+)$")  # save_checkpoint's temp files
WRAPPERS = re.compile(r"^(?:_orig_mod\.|module\.)+")  # torch.compile and DDP key prefixes
PLAIN = (torch.Tensor, str, int, float, bool, type(None))  # what weights_only=True reads back
# the only objects the earlier format (numpy RNG states) held beside plain values: --adopt
# reads a file that needs these and nothing else, still with the safe loader
OLD_FORMAT = {
    f"numpy.{c}"
    for c in (
        "_core.multiarray._reconstruct",
        "core.multiarray._reconstruct",
        "ndarray",
        "dtype",
        "dtypes.UInt32DType",
    )
}


# --- content checks -------------------------------------------------------------------------


def _leaves(obj, name=""):
    """(name, value) of every leaf of nested dicts/lists/tuples, in a fixed order."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{name}[{i}]")
    else:
        yield name, obj


def content_hash(state):
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes, every other
    value's repr, with the names they sit under. Keys "sha256" and "path" are left out."""
    h = hashlib.sha256()
    for name, v in _leaves({k: v for k, v in state.items() if k not in ("sha256", "path")}):
        h.update(name.encode() + b"\0")
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
        elif isinstance(v, np.ndarray):
            h.update(f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes())
        elif v is None or isinstance(v, (bool, int, float, str, bytes)):
            h.update(repr(v).encode())
        else:  # an object whose repr may hold a memory address: its type alone
            h.update(type(v).__qualname__.encode())
    return h.hexdigest()


def non_finite(state, name=""):
    """The name of the first floating tensor in `state` holding nan or inf, or None."""
    for leaf, v in _leaves(state, name):
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            lo, hi = torch.aminmax(v.detach())  # propagates nan; 10x faster than isfinite().all()
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                return leaf
    return None


def clean_state_dict(state_dict):
    """Parameter names as the bare model has them: torch.compile prefixes `_orig_mod.`, DDP
    `module.`, in either order and any number (a compiled model wrapped in DDP has both)."""
    return {WRAPPERS.sub("", k): v for k, v in state_dict.items()}


def check_plain(state, name=""):
    """Raise TypeError naming the first value in `state` that torch.load(weights_only=True)
    would refuse (a numpy array, a Path, any object): what a checkpoint holds must load safely."""
    for leaf, v in _leaves(state, name):
        if not isinstance(v, PLAIN):
            raise TypeError(
                f"checkpoint value {leaf} is a {type(v).__qualname__}: store plain "
                "values (dict, list, tuple, str, int, float, bool, None, tensors)"
            )


def _unsafe_globals(path):
    """What a file needs beyond plain values, read from its pickle opcodes, never unpickled."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch.save zip at all: torch.load will say it cannot be read
        return set()


def _read(path, map_location="cpu", allow=(), mmap=False):
    """-> (checkpoint dict or None, why it is no good or None). The safe loader only, plus
    the objects in `allow` (adopt's numpy types). With `mmap`, the tensors are the file's
    pages, not copies: reading a checkpoint to check it then allocates nothing of its size."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            state = _load(path, map_location, mmap)
    except Exception as e:  # truncated, damaged, foreign, or more than plain values
        if need := _unsafe_globals(path):
            if need <= OLD_FORMAT:
                return None, "is in the earlier checkpoint format (numpy RNG states)"
            return None, (
                f"is not a plain checkpoint: it needs {', '.join(sorted(need))}, which "
                "only unpickling would build, and that can run any code; not loaded"
            )
        return None, f"cannot be read ({type(e).__name__})"
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        return None, "is not a checkpoint of this project (no model/model_config)"
    if "sha256" not in state:
        return state, "has no checksum"
    if content_hash(state) != state["sha256"]:
        return state, "fails its checksum: its content changed after it was written"
    if bad := non_finite(state["model"]):
        return state, f"holds non-finite weights ({bad})"
    return state, None


def _load(path, map_location, mmap):
    """torch.load(weights_only=True), through mmap when asked and torch can map the file."""
    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception:  # not mappable (torch's legacy format, no mmap here): load it plainly
            pass
    return torch.load(path, map_location=map_location, weights_only=True)


def verify_checkpoint(path):
    """None when the checkpoint at `path` reads, verifies and has finite weights, else why not.
    Read through mmap: the file's pages are hashed in place, not copied first."""
    return _read(path, mmap=True)[1]


# --- saving, listing, pruning ---------------------------------------------------------------


def list_checkpoints(out):
    """Checkpoints in `out`, oldest first (by step)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_good_checkpoint(out, before=None):
    """The newest checkpoint in `out` that verifies (checksum, finite weights), or None.
    With `before` (a checkpoint path), only those of earlier steps. Reads each one it tries,
    newest first: meant for error messages and pruning, not for every step."""
    found = list_checkpoints(out)
    if before is not None and (m := CKPT_RE.match(Path(before).name)):
        found = [p for p in found if int(CKPT_RE.match(p.name).group(1)) < int(m.group(1))]
    skip = Path(before).resolve() if before is not None else None
    for p in reversed(found):
        if p.resolve() != skip and verify_checkpoint(p) is None:
            return p
    return None


def checkpoint_state(step, model, model_config, **extra):
    """What a checkpoint holds before its checksum: the state's own tensors, not copies.
    Raises TypeError for a value the safe loader would refuse (see check_plain)."""
    state = dict(
        step=step,
        model=clean_state_dict(model.state_dict()),
        model_config=asdict(model_config),
        **extra,
    )
    check_plain(state)  # a value the safe loader refuses would make an unloadable file
    return state


def save_checkpoint(out, step, model, model_config, **extra):
    """Write {out}/ckpt_{step:06d}.pt atomically; `extra` holds optimizer, config, loader, rng.

    Refused (UserError, nothing written) when a weight or optimizer moment is nan or inf: such
    a checkpoint could only continue a broken run, and it would push out the good ones."""
    state = checkpoint_state(step, model, model_config, **extra)
    path = Path(out) / f"ckpt_{step:06d}.pt"
    _refuse_non_finite(path, state)
    state["sha256"] = content_hash(state)
    _check_space(path)
    return _write(path, state)


def _refuse_non_finite(path, state):
    if bad := non_finite(state["model"]) or non_finite(state.get("optimizer"), "optimizer"):
        raise UserError(
            f"not saving step {state['step']}: {bad} holds nan/inf; newest good "
            f"checkpoint: {newest_good_checkpoint(path.parent) or 'none'}"
        )


def _check_space(path):
    """Refuse a save the disk obviously has no room for: less free than the newest checkpoint."""
    out = path.parent
    if (found := list_checkpoints(out)) and out.is_dir():
        need, free = found[-1].stat().st_size, shutil.disk_usage(out).free
        if free < need:
            raise UserError(
                f"not saving {path}: {_mib(free)} free in {out}, a checkpoint needs "
                f"{_mib(need)}; earlier checkpoints are intact: free space, then "
                "run again with --resume auto"
            )


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def _nbytes(state):
    """Bytes of tensor data in `state`, each storage once (tied weights share one)."""
    storages = {
        v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
        for _, v in _leaves(state)
        if isinstance(v, torch.Tensor)
    }
    return sum(storages.values())


def _temp(path):
    return path.parent / f".{path.name}.tmp{os.getpid()}"


def _write_failed(path, need, e):
    """The one-line UserError for a write that failed for want of space or an I/O error; any
    other exception is re-raised as it is."""
    cause = e  # torch.save may wrap the OSError: "unexpected pos", "failed writing"
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__context__
    if cause is None and "writ" not in str(e) and "unexpected pos" not in str(e):
        raise e
    why = cause.strerror if cause is not None and cause.strerror else "write failed"
    out = path.parent
    return UserError(
        f"could not write {path} ({why}): a checkpoint needs about "
        f"{_mib(need)}, {_mib(shutil.disk_usage(out).free)} free in "
        f"{out}; earlier checkpoints are intact: free space, then run again with "
        "--resume auto"
    )


def _write(path, state, f=None):
    """torch.save to `.{name}.tmpPID` beside `path` (into `f`, that file already open, when
    given), then rename: all or nothing."""
    tmp = _temp(path)
    try:
        if f is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")
        with f:
            _save(state, f)
            _test_hook(path)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a power cut leaves no empty file
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O: older checkpoints untouched
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, _nbytes(state), e) from None
    return path


def _save(state, f):
    """torch.save(state, f) without the zip's CRC-32 of every record, where torch lets us
    (2.6+): torch.load never checks it, and our sha256 covers the same bytes, so it only
    costs time (a 1.4 GiB checkpoint: 2.6 s with it, 0.4 s without, on a 2-core Xeon).
    `unzip -t` reports the missing CRCs; check a checkpoint with `python -m common.checkpoint`."""
    if not hasattr(torch.serialization, "set_crc32_options"):  # torch < 2.6
        return torch.save(state, f)
    crc = torch.serialization.get_crc32_options()  # a process-wide setting: put back after
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, f)
    finally:
        torch.serialization.set_crc32_options(crc)


def _test_hook(path):
    """For tests only: GPT_FROM_SCRATCH_TEST_SAVE=hold:ckpt_000004.pt stops that write here,
    after torch.save and before fsync and rename, until the process is killed; fail:NAME
    raises an I/O error here instead."""
    what, _, name = os.environ.get("GPT_FROM_SCRATCH_TEST_SAVE", "").partition(":")
    if name == path.name and what == "fail":
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    if name == path.name and what == "hold":
        sys.stdout.write(f"holding the write of {path} until killed\n")  # one write: one line
        sys.stdout.flush()
        threading.Event().wait()


def prune_checkpoints(out, keep_last, good=None):
    """Delete all but the newest `keep_last` checkpoints (0 or less keeps everything), but
    never the newest one that verifies: when the kept ones are all damaged, it stays too.
    Reads back the newest checkpoint(s) to check them, unless `good` names the newest
    checkpoint, just verified."""
    if keep_last > 0:
        doomed = list_checkpoints(out)[:-keep_last]
        good = good or (newest_good_checkpoint(out) if doomed else None)
        for p in doomed:
            if p != good:
                p.unlink(missing_ok=True)


def remove_stale_temps(out):
    """Delete the temp files of saves that never finished (`.ckpt_NNNNNN.pt.tmpPID`: a run
    killed mid-save leaves one, as big as a checkpoint). Returns (files, bytes) removed.

    Call it holding the RunLock of `out`, before the run's first save: only the lock holder
    writes checkpoints there, so every such file is stale, whatever its PID (a restarted
    container often reuses the PID of the run it replaces). Without the lock, only files whose
    PID is no live process on this machine are removed. No other file is touched."""
    out, locked = Path(out), RunLock.held(out)
    files = size = 0
    for p in out.iterdir() if out.is_dir() else []:
        m = TMP_RE.match(p.name)
        if m and p.is_file() and (locked or not _alive(int(m.group(1)))):
            n = p.stat().st_size
            p.unlink(missing_ok=True)
            files, size = files + 1, size + n
    return files, size


def _alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


# --- saving in the background --------------------------------------------------------------
#
# A thread, not torch.distributed.checkpoint.async_save: async_save writes its own format (a
# directory of shards and a .metadata file, read back by its own loader), where ours is one
# file that torch.load(weights_only=True) reads and one checksum covers, written by rank 0
# alone. A thread is enough: the long parts of a write (hashing, torch.save's file writes,
# fsync) run in C, mostly with the GIL released, so the training loop goes on meanwhile.


def snapshot(state, buffers=None):
    """-> (copy, buffers, ready): `state` with every tensor copied into host memory (pinned
    when it lives on a GPU), so training may change the originals while the copy is written.

    Copied storage by storage, so tensors that share one (tied weights) share one in the copy,
    and torch.save writes it once, as it would the originals. `buffers` (source storage ->
    host copy, from the previous snapshot) are reused: allocating (and pinning) a checkpoint's
    worth of memory costs more than copying into it. `ready`: a CUDA event to synchronize on
    before reading the copy (GPU copies run asynchronously), or None."""
    buffers, new, ready = buffers or {}, {}, None

    def copy(v):
        if isinstance(v, dict):
            return {k: copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(copy(x) for x in v)
        if not isinstance(v, torch.Tensor):
            return v  # str, int, float, bool, None: never changed in place
        v = v.detach()
        source = v.untyped_storage()
        if not source.nbytes():
            return v.cpu().clone()
        key = _storage_key(v)
        if key not in new:
            buf = buffers.get(key)
            if buf is None:
                buf = _host_buffer(v)
            raw = torch.empty(0, dtype=torch.uint8, device=v.device).set_(source)
            if v.device.type == "cpu":  # a plain memcpy: copy_ would wake torch's thread pool
                np.copyto(buf.numpy(), raw.numpy())  # for each of ~200 tensors, mostly small
            else:  # a GPU's: asynchronous, yet ordered before the next step's kernels
                buf.copy_(raw, non_blocking=v.is_cuda)
            new[key] = buf
        host = new[key].untyped_storage()
        return torch.empty(0, dtype=v.dtype).set_(host, v.storage_offset(), v.shape, v.stride())

    state = copy(state)
    if any(device.type == "cuda" for device, _, _ in new):
        ready = torch.cuda.Event()
        ready.record()  # after the copies, on the stream that made them
    return state, new, ready


def _storage_key(v):
    """What a snapshot's buffer is found by: the device, address and size of v's storage."""
    source = v.untyped_storage()
    return (v.device, source.data_ptr(), source.nbytes())


def _host_buffer(v):
    """Host memory of v's storage's size, pinned when v lives on a GPU (fast, async copies)."""
    return torch.empty(v.untyped_storage().nbytes(), dtype=torch.uint8, pin_memory=v.is_cuda)


def host_buffers(state):
    """The host memory snapshot(state) copies into, allocated ahead: {storage key: buffer},
    every page touched (pinning touches them too), so that the first snapshot is a plain copy.

    Allocating is most of a first snapshot's time: on the 2-core VM of BENCHMARKS.md, 4.9 s
    for gpt2's 1.39 GiB, where the copy itself took 0.2 s. Run calls this in a thread after its
    first step, while training goes on, so no save stops the loop for more than the copy."""
    buffers = {}
    for _, v in _leaves(state):
        if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes():
            key = _storage_key(v)
            if key not in buffers:
                buf = _host_buffer(v)
                if not v.is_cuda:
                    buf.numpy().fill(0)  # the kernel maps a page at its first write: now
                buffers[key] = buf
    return buffers


class BackgroundSave:
    """Writes one checkpoint in a thread; start it with `begin`.

    In the caller, before it returns: the space check, the temp file with the checkpoint's
    size reserved on disk (so a full disk is said at once, not later from the thread), and
    the snapshot. In the thread: the nan/inf refusal, the checksum, torch.save into the temp
    file, fsync, the rename, with `verify` reading the file back and checking it, dropping
    the file from the page cache, then pruning to `keep_last`. `wait()` returns the path, or
    raises what the thread raised; `write_s` is how long the thread took."""

    def __init__(self, path, state, ready, f, keep_last, verify):
        self.path, self.step, self.write_s, self.error = path, state["step"], None, None
        args = (state, ready, f, keep_last, verify)
        self.thread = threading.Thread(
            target=self._run, args=args, name=f"checkpoint writer {path.name}"
        )
        self.thread.start()  # not a daemon: an ending process waits for the write to finish

    @classmethod
    def begin(
        cls, out, step, model, model_config, keep_last=0, verify=False, buffers=None, **extra
    ):
        """-> (BackgroundSave, buffers to pass to the next one). Raises UserError when the disk
        has no room for it, TypeError for a value the safe loader would refuse."""
        state = checkpoint_state(step, model, model_config, **extra)
        path = Path(out) / f"ckpt_{step:06d}.pt"
        _check_space(path)
        f = _reserve(path, _nbytes(state))
        try:
            state, buffers, ready = snapshot(state, buffers)
        except BaseException:
            f.close()
            _temp(path).unlink(missing_ok=True)
            raise
        return cls(path, state, ready, f, keep_last, verify), buffers

    def _run(self, state, ready, f, keep_last, verify):
        t0 = time.perf_counter()
        try:
            if ready is not None:
                ready.synchronize()  # the GPU -> host copies have landed
            try:
                _refuse_non_finite(self.path, state)
                state["sha256"] = content_hash(state)
            except BaseException:
                f.close()
                _temp(self.path).unlink(missing_ok=True)
                raise
            _write(self.path, state, f)
            if verify and (why := verify_checkpoint(self.path)):
                raise UserError(
                    f"checkpoint {self.path} {why}, read back right after it was "
                    "written: check the disk and memory of this machine"
                )
            _drop_from_cache(self.path)
            prune_checkpoints(self.path.parent, keep_last, good=self.path if verify else None)
        except BaseException as e:  # handed to the training loop by wait()
            self.error = e
        self.write_s = time.perf_counter() - t0

    def done(self, wait=False):
        if wait:
            self.thread.join()
        return not self.thread.is_alive()

    def wait(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.path


def _drop_from_cache(path):
    """Tell the kernel to drop `path`'s pages from its cache (written and fsynced, so they
    are clean): a checkpoint is read again only on a resume, so its memory is better spent on
    the data shards, and freed pages are what the next checkpoint's write reuses. (On the
    2-core VM of BENCHMARKS.md, torch.save into fresh page cache took 3.7-4.4 s, into pages
    freed this way 0.35 s.) Linux and BSD only; elsewhere nothing is done."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # only advice: a filesystem that refuses it changes nothing of the file
        pass
    finally:
        os.close(fd)


def _reserve(path, nbytes):
    """Create `path`'s temp file with `nbytes` reserved on disk, and return it open: ENOSPC
    now rather than halfway through a background write. (Where a filesystem cannot reserve,
    posix_fallocate writes the zeros itself.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp(path)
    f = open(tmp, "wb")
    try:
        if hasattr(os, "posix_fallocate"):  # Linux, BSD; not macOS or Windows
            os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return f  # cannot reserve here: the write will say if the disk fills
        f.close()
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, nbytes, e) from None
    return f


# --- loading --------------------------------------------------------------------------------


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint file, or the newest one when `path` is a directory; verified.

    A checkpoint that does not verify is refused (UserError) with the newest older one that
    does, even for a directory: never a silent fall back to an older step."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"no checkpoint (ckpt_NNNNNN.pt) in {path}: train first or give a file")
        path = found[-1]
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state, why = _read(path, map_location)
    if why == "has no checksum":
        raise UserError(
            f"{path} has no checksum (written before checkpoints carried one), so it cannot be "
            f"verified; if you trust it, add one: python -m common.checkpoint --adopt {path}"
        )
    if why and why.startswith("is in the earlier"):
        raise UserError(
            f"{path} {why}, which the safe loader refuses; if you trust it, convert "
            f"it: python -m common.checkpoint --adopt {path}"
        )
    if why and why.startswith("is not a plain"):  # no older checkpoint offered: not ours
        raise UserError(f"checkpoint {path} {why}")
    if why:
        good = newest_good_checkpoint(path.parent, before=path)
        if good:
            hint = f"the newest older one that verifies is {good}: use it, or move {path.name} away"
        else:
            hint = f"no older checkpoint in {path.parent} verifies"
        raise UserError(f"checkpoint {path} {why}; {hint}")
    state["path"] = str(path)
    return state


def model_from_checkpoint(path, device="cpu"):
    """Rebuild our GPT from a (verified) checkpoint; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except (TypeError, RuntimeError) as e:  # a model_config or key set of another version
        why = " ".join(str(e).split())[:200]
        raise UserError(f"{ckpt['path']}: weights do not fit its model_config ({why})") from None
    return model.to(device), ckpt


def rng_state():
    """Every random number generator a run touches: python, numpy, torch (CPU and CUDA), as
    tensors and plain numbers, which the safe loader reads back."""
    import random

    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _plain_rng(state)


def _plain_rng(state):
    """python's (version, 625 ints, gauss) and numpy's (name, uint32 keys, pos, has_gauss,
    gauss) -> lists of ints, floats and int64 tensors; torch's states are tensors already."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    python = [int(version), torch.tensor(internal, dtype=torch.int64), gauss]
    numpy = [
        str(name),
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]
    return dict(state, python=python, numpy=numpy)


def set_rng_state(state):
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- one writer per --out -------------------------------------------------------------------


class RunLock:
    """One writer per --out: an exclusive flock on `{out}/.lock`, held until release() or until
    the process ends: the OS drops it even on SIGKILL, so a crash never leaves a stale lock.

        lock = RunLock(cfg.out).acquire()   # rank 0, before anything is written to --out
        ...
        lock.release()                      # or `with RunLock(cfg.out):`

    The file says who holds it (pid, host, command, since), for the refusal. It stays after
    release: deleting it could let two runs lock two different files. A lock this process
    already holds (an earlier main() in the same process that raised) is taken over."""

    _held = {}  # lock path -> file descriptor: what this process holds (flock is per process)

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / ".lock"
        self.fd = None

    @classmethod
    def held(cls, out):
        """Whether this process holds the lock of `out`."""
        return str((Path(out) / ".lock").resolve()) in cls._held

    def acquire(self):
        self.out.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        fd = self._held.get(key)
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: another process holds it
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise UserError(
                    f"{self.out} is in use by another run ({_describe(holder)}): "
                    "wait for it to finish, or choose another --out"
                ) from None
            self._held[key] = fd
        info = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            since=time.strftime("%F %T"),
            command=" ".join(sys.argv),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self):
        key = str(self.path.resolve())
        if self.fd is not None and self._held.get(key) == self.fd:
            del self._held[key]
            os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _describe(holder):
    try:
        h = json.loads(holder)
        cmd = h["command"] if len(h["command"]) <= 80 else h["command"][:77] + "..."
        return f"pid {h['pid']} on {h['host']}, since {h['since']}: {cmd}"
    except (ValueError, KeyError, TypeError):  # caught between truncate and write
        return "a process that has not said which yet"


# --- resuming with other settings -----------------------------------------------------------

# What changes a run. batch_size and the number of GPUs are not here: with total_batch fixed
# they only split the same batch into other micro-steps. Paths (data_dir, out) may move.
RESUME_KEYS = (
    "preset",
    "seq_len",
    "total_batch",
    "steps",
    "warmup_steps",
    "max_lr",
    "weight_decay",
    "grad_clip",
    "dtype",
)


def check_resume(saved, new, keys=RESUME_KEYS, allow_change=False):
    """The settings in `keys` (present in both configs) that differ between a checkpoint's
    config and this run's, e.g. ["--max-lr 0.0006 -> 0.0003"]. Any difference is refused
    (UserError) unless allow_change (--allow-config-change); then they are returned, to log."""
    changes = [
        f"--{k.replace('_', '-')} {saved[k]} -> {new[k]}"
        for k in keys
        if k in saved and k in new and saved[k] != new[k]
    ]
    if changes and not allow_change:
        raise UserError(
            f"resuming would change the run ({'; '.join(changes)}): give the checkpoint's "
            "settings, or add --allow-config-change to accept the change"
        )
    return changes


# --- python -m common.checkpoint ------------------------------------------------------------


@dataclass
class Config:
    path: str = "out"  # a checkpoint file or a run directory (also positional)
    adopt: str = ""  # convert this checkpoint of an earlier format (no checksum, numpy RNG states)


def adopt(path):
    """Bring a checkpoint of an earlier format up to date: numpy RNG states -> plain values,
    and a checksum. It is read with the safe loader plus the three numpy types that format
    held, nothing else; a checksum it carries is checked first, and its weights."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    state, why = _read(
        path, allow=[core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    )
    if why not in ("has no checksum", None) and not why.startswith("fails its checksum"):
        raise UserError(f"{path} {why}: not a checkpoint to adopt")
    old_rng = isinstance(state.get("rng", {}).get("numpy"), tuple)
    if why is None and not old_rng:
        raise UserError(f"{path} is already a verified plain checkpoint: nothing to adopt")
    if why and why.startswith("fails"):  # the earlier format's checksum covered the same content
        raise UserError(f"{path} {why}: not adopted")
    if bad := non_finite(state["model"]) or non_finite(state.get("optimizer"), "optimizer"):
        raise UserError(f"{path}: {bad} holds nan/inf; not a checkpoint to continue from")
    state["model"] = clean_state_dict(state["model"])
    if old_rng:
        state["rng"] = _plain_rng(state["rng"])
    check_plain(state)
    state["sha256"] = content_hash(state)
    return _write(Path(path), state)


def main(cfg):
    if cfg.adopt:
        path = Path(cfg.adopt)
        if not CKPT_RE.match(path.name) or not path.is_file():
            raise UserError(f"--adopt needs a checkpoint file named ckpt_NNNNNN.pt, not {path}")
        print(
            f"adopted {adopt(path)}: added a checksum, RNG states as plain values (it was "
            "read with the safe loader and numpy arrays only: nothing else unpickled)"
        )
        return dict(adopted=str(path))
    path = Path(cfg.path)
    found = list_checkpoints(path) if path.is_dir() else [path]
    if not found or not found[0].is_file():
        raise UserError(f"no checkpoint at {path}: give a ckpt_NNNNNN.pt file or a run directory")
    status = {str(p): verify_checkpoint(p) for p in found}
    for p, why in status.items():
        print(f"{p}: {why or 'ok'}")
    if bad := [p for p, why in status.items() if why]:
        raise UserError(f"{len(bad)} of {len(status)} checkpoints do not verify")  # exit code 1
    return status


if __name__ == "__main__":
    from common.cli import parse_args

    argv = sys.argv[1:]
    main(parse_args(Config, ["--path", *argv] if argv and not argv[0].startswith("-") else argv))
