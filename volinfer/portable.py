"""Every operating-system-specific call volinfer makes, each with a fallback, so volinfer imports and runs on Linux,
macOS and Windows. Standard library only (``psutil`` is used where installed), and no import of volinfer: the
benchmark spawner loads this file by path without importing the package.

* positioned reads and writes (:func:`pread_into`, :func:`pread`, :func:`pwrite_all`) go in bounded chunks of at most
  :data:`MAX_IO_BYTES` and loop on short transfers: one ``preadv``/``pwrite`` call moves at most 0x7ffff000 bytes on
  Linux (about 2 GiB), so a single call over a larger buffer comes back short and looked like a truncated file;
* :func:`reserve` reserves disk space (``posix_fallocate``, else ``ftruncate``); :func:`disk_free` (``statvfs``, else
  :func:`shutil.disk_usage`);
* memory: :func:`peak_rss_mb` (``getrusage``, else ``psutil``, else ``None``), :func:`memory_status` (VmHWM/VmRSS),
  :func:`available_mb`, :func:`total_mb`, :func:`wait_child` (a child's exit status, peak RSS and CPU time: ``wait4``, else polling);
* locks and processes: :func:`lock_exclusive` (``flock``; callers fall back to ``O_EXCL`` lock files where
  :data:`HAS_FCNTL` is false), :func:`pid_alive` (never ``os.kill(pid, 0)`` on Windows: that kills the process);
* durability: :func:`fsync` (``F_FULLFSYNC`` on macOS), :func:`fsync_path`, :func:`fsync_dir` (skipped on Windows,
  where directories cannot be opened).

The ``HAS_*`` flags say which native call is used; tests set them to ``False`` to run the fallbacks on Linux.
"""

from __future__ import annotations

import errno
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

IS_WINDOWS = os.name == "nt"
IS_MACOS = sys.platform == "darwin"
HAS_PREADV = hasattr(os, "preadv")
HAS_PREAD = hasattr(os, "pread")
HAS_PWRITE = hasattr(os, "pwrite")
HAS_FALLOCATE = hasattr(os, "posix_fallocate")
HAS_RESOURCE = resource is not None
HAS_FCNTL = fcntl is not None
HAS_STATVFS = hasattr(os, "statvfs")
HAS_WAIT4 = hasattr(os, "wait4")
HAS_PROC = os.path.exists("/proc/self/status")
#: Where the Linux control-group file systems are mounted.
CGROUP_ROOT = "/sys/fs/cgroup"
#: This process's control groups, one line per hierarchy (``id:controllers:path``; v2 is ``0::path``).
PROC_CGROUP = "/proc/self/cgroup"

#: Most bytes one positioned read or write call moves (Linux caps one call at 0x7ffff000 bytes).
MAX_IO_BYTES = 256 << 20
#: Binary mode for os.open: without it, Windows translates line ends in os.read/os.write.
O_BINARY = getattr(os, "O_BINARY", 0)
#: Memory assumed available where the OS does not say (MB): conservative, so plans stay small.
DEFAULT_AVAILABLE_MB = 4096.0

_seek_lock = threading.Lock()  # the seek+read/write fallbacks move the shared file offset


def _psutil() -> Any:
    try:
        import psutil
    except ImportError:
        return None
    return psutil


# ---------------------------------------------------------------------------------------------------------- file I/O

def open_fd(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """``os.open`` in binary mode (matters on Windows only)."""
    return os.open(path, flags | O_BINARY, mode)


def _read_at(fd: int, view: memoryview, offset: int) -> int:
    """One read of at most len(view) bytes at ``offset`` into ``view``; returns the count (0 at end of file)."""
    if HAS_PREADV:
        return os.preadv(fd, [view], offset)
    if HAS_PREAD:
        data = os.pread(fd, len(view), offset)
    else:
        with _seek_lock:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def _write_at(fd: int, view: memoryview, offset: int) -> int:
    if HAS_PWRITE:
        return os.pwrite(fd, view, offset)
    with _seek_lock:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, view)


def forget(fd: int, offset: int, nbytes: int) -> None:
    """Tell the OS the file's bytes [offset, offset + nbytes) will not be read again, so their cached pages go
    first (``POSIX_FADV_DONTNEED``; nothing where that cannot be said). Only a hint: a later read still works."""
    if nbytes > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _bytes_view(buf: Any) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def pread_into(fd: int, buf: Any, offset: int) -> int:
    """Fill the writable contiguous buffer ``buf`` with the bytes at ``offset``, in calls of at most
    :data:`MAX_IO_BYTES`, continuing after short reads. Returns the bytes read: less than ``buf``'s size only at the
    end of the file."""
    view = _bytes_view(buf)
    got = 0
    while got < len(view):
        n = _read_at(fd, view[got : got + MAX_IO_BYTES], offset + got)
        if n <= 0:
            break
        got += n
    return got


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    buf = bytearray(n)
    got = pread_into(fd, buf, offset)
    return bytes(buf) if got == n else bytes(buf[:got])


def pwrite_all(fd: int, buf: Any, offset: int) -> None:
    """Write all of the contiguous buffer ``buf`` at ``offset``, in calls of at most :data:`MAX_IO_BYTES`,
    continuing after short writes. A call that writes nothing raises ``OSError(ENOSPC)``."""
    view = _bytes_view(buf)
    done = 0
    while done < len(view):
        n = _write_at(fd, view[done : done + MAX_IO_BYTES], offset + done)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write (disk full?)")
        done += n


def reserve(fd: int, size: int) -> None:
    """Make the file ``size`` bytes long, reserving the blocks where the OS can (a full disk or a file-size limit
    then fails here, not hours later). Filesystems without allocation support fall back to ``ftruncate``."""
    if HAS_FALLOCATE:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
                raise
    if os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)


def disk_free(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on the filesystem holding ``path``; None where unknown."""
    try:
        if HAS_STATVFS:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize
        return shutil.disk_usage(path).free
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------------- durability

def fsync(fd: int) -> None:
    """Flush ``fd`` to stable storage (on macOS ``fsync`` only reaches the drive's cache: ``F_FULLFSYNC``)."""
    if IS_MACOS and HAS_FCNTL and hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_path(path: str | os.PathLike) -> bool:
    """fsync the file at ``path``; False when it does not exist (Windows needs write access to flush a file)."""
    try:
        fd = open_fd(path, os.O_RDWR if IS_WINDOWS else os.O_RDONLY)
    except OSError:
        return False
    try:
        fsync(fd)
    finally:
        os.close(fd)
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in directory ``path`` durable. Skipped on Windows (directories cannot be opened or flushed
    there; NTFS journals the rename itself) and wherever the filesystem refuses."""
    if IS_WINDOWS:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- locks and processes

def lock_exclusive(fd: int) -> None:
    """Take an exclusive, non-blocking ``flock`` on ``fd``; raises BlockingIOError when another process holds it.
    Only where :data:`HAS_FCNTL`; elsewhere callers use ``O_EXCL`` lock files."""
    if not HAS_FCNTL:
        raise OSError(errno.ENOSYS, "flock is not available on this platform")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (for stale lock files)."""
    if pid <= 0:
        return False
    if IS_WINDOWS:
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


def _pid_alive_windows(pid: int) -> bool:
    ps = _psutil()
    if ps is not None:
        return bool(ps.pid_exists(pid))
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


# ----------------------------------------------------------------------------------------------------------- memory

def _proc_status(pid: int | str = "self") -> dict[str, float]:
    """VmHWM / VmRSS (MB) from /proc/<pid>/status; empty where there is no /proc."""
    out: dict[str, float] = {}
    if not HAS_PROC:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return out


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (MB), as the OS counts it; None where nothing says."""
    if HAS_RESOURCE:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if IS_MACOS else kb / 1024.0  # macOS counts bytes, Linux kilobytes
    ps = _psutil()
    if ps is not None:
        info = ps.Process().memory_info()
        peak = getattr(info, "peak_wset", None)  # Windows
        if peak is not None:
            return peak / 2**20
    return _proc_status().get("VmHWM")


def memory_status() -> dict[str, float | None]:
    """``peak_mb`` (the current address space's high-water mark: VmHWM, which unlike ``ru_maxrss`` does not carry a
    forking parent's peak) and ``rss_mb`` (resident now) of this process; fallbacks where /proc is missing."""
    st = _proc_status()
    peak, rss = st.get("VmHWM"), st.get("VmRSS")
    if rss is None:
        ps = _psutil()
        rss = ps.Process().memory_info().rss / 2**20 if ps is not None else None
    if peak is None:
        peak = peak_rss_mb()
    return {"peak_mb": peak, "rss_mb": rss if rss is not None else peak}


def rss_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` now (MB); None where unknown or gone."""
    st = _proc_status(pid)
    if "VmRSS" in st:
        return st["VmRSS"]
    ps = _psutil()
    if ps is None:
        return None
    try:
        return ps.Process(pid).memory_info().rss / 2**20
    except Exception:  # psutil.Error: gone, access denied
        return None


def available_mb() -> float:
    """Memory the OS could give this process now (MB): /proc/meminfo's MemAvailable, else ``sysconf``, else
    ``psutil``, else (Windows) GlobalMemoryStatusEx, else :data:`DEFAULT_AVAILABLE_MB`."""
    if HAS_PROC:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        pass
    ps = _psutil()
    if ps is not None:
        return ps.virtual_memory().available / 2**20
    if IS_WINDOWS:
        got = _windows_available_mb()
        if got is not None:
            return got
    return DEFAULT_AVAILABLE_MB


#: glibc's ``mallopt`` parameter for the most malloc arenas (``M_ARENA_MAX``).
_M_ARENA_MAX = -8
#: Arenas kept under a virtual-memory limit: glibc otherwise gives every thread that allocates its own arena, each
#: reserving 64 MB of address space (the layer-streaming engine's compile threads doubled the run's virtual memory).
LIMITED_ARENAS = 2


def virtual_memory_limit_mb() -> float | None:
    """The process's address-space limit (``ulimit -v``, RLIMIT_AS) in MB, or None when unlimited or unknown."""
    if not HAS_RESOURCE or not hasattr(resource, "RLIMIT_AS"):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft / 2**20


def limit_malloc_arenas(arenas: int = LIMITED_ARENAS) -> bool:
    """Under an address-space limit, cap glibc's malloc arenas at ``arenas`` (measured, 64x60x56 volume through a
    streamable U-Net: peak virtual memory of the layer-streaming engine 1506 MB -> 600 MB, tiles 728 -> 444 MB; peak
    RSS unchanged). Nothing without a limit (reserved address space costs nothing then) or outside glibc. Returns
    whether the cap was set; call before threads start."""
    if virtual_memory_limit_mb() is None:
        return False
    return _mallopt(_M_ARENA_MAX, arenas)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where it is not there (not Linux, musl) or refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(int(param), int(value)))


#: glibc's ``mallopt`` parameter for its mmap threshold (``M_MMAP_THRESHOLD``).
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large (bytes) get their own memory map, returned to the system when freed.
MMAP_THRESHOLD = 1 << 20


def lean_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have large allocations returned to the system as soon as they are freed (glibc only; elsewhere nothing).

    glibc raises its mmap threshold each time a large block is freed, after which blocks of up to 32 MB come from
    the heap and stay resident once freed: a streamed run's temporaries (planes read, normalised, post-processed)
    then keep ~90 MB of freed memory in the process (512³ reference U-Net: 471 -> 384 MB peak with a fixed
    threshold). A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``) turns that adjustment off. For processes volinfer
    owns (its command line); returns whether the setting took."""
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


#: What the C and C++ runtimes say when the address space or the thread limit is exhausted (EAGAIN from
#: pthread_create, ENOMEM, std::bad_alloc, a shared object's segment that cannot be mapped), as OpenVINO and Python
#: pass them on; OpenVINO's own allocator says "Failed to allocate N bytes of memory" or, alone on its line, "can't
#: alloc" (seen under ulimit -v on a loaded machine; its "Can't allocate registers for a snippet" is no memory error).
_EXHAUSTED = re.compile(r"resource temporarily unavailable|can't start new thread|cannot allocate memory|bad_alloc|"
                        r"out of memory|failed to map segment|failed to allocate \d+ bytes|(^|:\s*)can't alloc\s*$",
                        re.IGNORECASE | re.MULTILINE)


def exhausted_memory(error: BaseException) -> bool:
    """Whether ``error`` is the runtime running out of memory or threads (not a bug)."""
    if isinstance(error, MemoryError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOMEM, errno.EAGAIN):
        return True
    return isinstance(error, (RuntimeError, OSError, ImportError)) and _EXHAUSTED.search(str(error)) is not None


def total_mb() -> float | None:
    """Physical memory of the machine (MB): /proc/meminfo's MemTotal, else ``sysconf``, else ``psutil``, else
    (Windows) GlobalMemoryStatusEx; None where unknown."""
    if HAS_PROC:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        pass
    ps = _psutil()
    if ps is not None:
        return ps.virtual_memory().total / 2**20
    return _windows_memory_mb("ullTotalPhys") if IS_WINDOWS else None


def cgroup_limit_mb() -> float | None:
    """The memory limit of this process's control group (MB): cgroup v2 ``memory.max`` (the tightest on the path
    from its group up to the root), else cgroup v1 ``memory.limit_in_bytes``; None where there is none (``max``, the
    v1 "unlimited" sentinel, no cgroup file system, other systems)."""
    if not HAS_PROC:
        return None
    try:
        with open(PROC_CGROUP) as f:
            lines = [ln.rstrip("\n").split(":", 2) for ln in f if ln.count(":") >= 2]
    except OSError:
        return None
    limits: list[float] = []
    for _, controllers, path in lines:
        if controllers == "":  # v2: the unified hierarchy; every level may limit
            parts = [p for p in path.split("/") if p]
            for i in range(len(parts), -1, -1):
                limits += _cgroup_value(os.path.join(CGROUP_ROOT, *parts[:i], "memory.max"))
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            for base in (os.path.join(CGROUP_ROOT, "memory", path.lstrip("/")), os.path.join(CGROUP_ROOT, "memory")):
                limits += _cgroup_value(os.path.join(base, "memory.limit_in_bytes"))
    return min(limits) / 2**20 if limits else None


def _cgroup_value(path: str) -> list[float]:
    """A cgroup memory limit file's value in bytes, as a list of none or one (``max``/unreadable: none; v1's
    unlimited sentinel, a page-rounded 2^63, is beyond any machine: none)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return []
    if not text.isdigit() or int(text) >= 2**60:
        return []
    return [float(text)]


def machine_mb() -> float:
    """The memory this process can have at most (MB): the machine's physical memory, capped by its control group's
    limit where there is one. A property of the machine and its configuration, not of the moment: planning on it
    makes the same command plan the same on the same machine (unlike :func:`available_mb`, which moves with every
    other process). :data:`DEFAULT_AVAILABLE_MB` where nothing says."""
    stated = stated_machine_mb()
    return DEFAULT_AVAILABLE_MB if stated is None else stated


def stated_machine_mb() -> float | None:
    """:func:`machine_mb` where the machine says it (its RAM or cgroup limit), else None."""
    figures = [v for v in (total_mb(), cgroup_limit_mb()) if v is not None and v > 0]
    return min(figures) if figures else None


#: Where the kernel says nothing (other systems): the share of memory a file's written pages may take before the OS
#: starts writing them back on its own (Linux's default ``vm.dirty_background_ratio``).
DEFAULT_WRITEBACK_SHARE = 0.10
PROC_VM = "/proc/sys/vm"


def writeback_allowance_mb() -> float:
    """Written file pages (MB) the OS keeps in memory before it starts writing them to disk in the background: Linux's
    ``vm.dirty_background_bytes``, else ``vm.dirty_background_ratio`` % of :func:`machine_mb`. Temporary files whose
    pages stay within it are read back from memory and deleted before they reach the disk; beyond it they are written
    out and may be read back from the disk. A machine setting: the same on every run."""
    def value(name: str) -> float | None:
        try:
            with open(os.path.join(PROC_VM, name)) as f:
                v = float(f.read().strip())
        except (OSError, ValueError):
            return None
        return v if math.isfinite(v) and v >= 0 else None

    if HAS_PROC:
        fixed = value("dirty_background_bytes")
        if fixed:
            return fixed / 2**20
        ratio = value("dirty_background_ratio")
        if ratio is not None:
            return machine_mb() * ratio / 100.0
    return machine_mb() * DEFAULT_WRITEBACK_SHARE


def _windows_available_mb() -> float | None:
    return _windows_memory_mb("ullAvailPhys")


def _windows_memory_mb(field: str) -> float | None:
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    st = MemoryStatusEx()
    st.dwLength = ctypes.sizeof(st)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(st)):  # type: ignore[attr-defined]
            return getattr(st, field) / 2**20
    except (AttributeError, OSError):
        pass
    return None


def wait_child(proc: subprocess.Popen, should_kill: Any = None, poll_s: float = 0.05) -> dict[str, Any]:
    """Wait for ``proc``, killing it once ``should_kill()`` says so. Returns ``rc``, ``peak_mb`` (the finished
    child's peak RSS), ``cpu_s`` (user + system), ``killed``. ``wait4`` where available (exact figures from the
    kernel); elsewhere polling, with psutil samples of the running child (its OS peak where psutil reports one)
    and ``None`` for what cannot be known."""
    killed = False
    if HAS_WAIT4:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if not killed and should_kill is not None and should_kill():
                proc.kill()
                killed = True
            time.sleep(poll_s)
        proc.returncode = os.waitstatus_to_exitcode(status)
        kb = ru.ru_maxrss
        return {"rc": proc.returncode, "peak_mb": kb / 2**20 if IS_MACOS else kb / 1024.0,
                "cpu_s": ru.ru_utime + ru.ru_stime, "killed": killed}
    ps = _psutil()
    handle = None
    if ps is not None:
        try:
            handle = ps.Process(proc.pid)
        except Exception:
            handle = None
    peak: float | None = None
    cpu: float | None = None
    while proc.poll() is None:
        if handle is not None:
            try:
                info = handle.memory_info()
                sample = getattr(info, "peak_wset", None) or info.rss
                peak = max(peak or 0.0, sample / 2**20)
                t = handle.cpu_times()
                cpu = t.user + t.system
            except Exception:
                pass
        if not killed and should_kill is not None and should_kill():
            proc.kill()
            killed = True
        time.sleep(poll_s)
    return {"rc": proc.returncode, "peak_mb": peak, "cpu_s": cpu, "killed": killed}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return platform.processor()
