//! A SQLite VFS shim that hands each commit's WAL frames to the operating system in one
//! write.
//!
//! SQLite writes a WAL frame as two `pwrite`s, its 24-byte header and then its page, so a
//! commit of six pages costs twelve system calls before its `fsync`. On a virtual machine
//! a system call is dear: measured on the 2-core machine switchboard is benchmarked on,
//! twelve such writes cost about 75 µs of CPU and one write of the same bytes about 10 µs,
//! and the `fsync` after them was faster too. This shim keeps the frames a connection
//! appends to its WAL in memory and writes them in one call when SQLite syncs the WAL, which
//! it does at every commit before it makes the commit visible to other connections.
//!
//! # When it is correct
//!
//! Frames stay in memory until the next `xSync` (or a read, truncate, size query, file
//! control or close of the same WAL). Other connections read the WAL through their own file
//! descriptors, so frames must reach the file before SQLite publishes them in the WAL index.
//! With `PRAGMA synchronous = FULL` or `EXTRA` SQLite syncs the WAL at every commit before it
//! updates the index; with `NORMAL` or `OFF` it does not. **Use this VFS only on connections
//! whose `synchronous` is `FULL` or `EXTRA`.** Files whose device does not promise
//! power-safe overwrites (where SQLite pads commits and writes after the sync) are passed
//! through unbuffered, as is every file that is not a WAL.
//!
//! Everything else (locks, shared memory, the database file and journals) goes straight to
//! the default VFS.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

use libsqlite3_sys as ffi;

/// The name the VFS is registered under: pass it as the `vfs` of a connection.
pub const NAME: &str = "switchboard-wal";
const NAME_C: &CStr = c"switchboard-wal";

/// Pending frames past which they are written before more are taken: it bounds the memory
/// of a connection that writes a very large transaction.
const MAX_PENDING: usize = 1 << 20;

/// The most the pending frames are written with in one call: the unix VFS writes at most
/// 0x1ffff bytes per call (it masks the length, since SQLite itself never writes more than a
/// page), so longer writes are cut into pieces below that.
const WRITE_CHUNK: usize = 0x1f000;

/// The VFS this one wraps (the process's default VFS when [`register`] first ran).
static REAL: AtomicPtr<ffi::sqlite3_vfs> = AtomicPtr::new(ptr::null_mut());

/// Why the VFS could not be registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterError(String);

impl std::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registering the {NAME} SQLite VFS: {}", self.0)
    }
}

impl std::error::Error for RegisterError {}

/// Registers the VFS under [`NAME`] (not as the default). Safe to call any number of times
/// from any thread: it registers once and every call returns that outcome.
pub fn register() -> Result<(), RegisterError> {
    static ONCE: OnceLock<Result<(), RegisterError>> = OnceLock::new();
    ONCE.get_or_init(register_now).clone()
}

fn register_now() -> Result<(), RegisterError> {
    // SAFETY: sqlite3_vfs_find with NULL returns the default VFS (initialising the library
    // first), which SQLite keeps for the life of the process.
    let real = unsafe { ffi::sqlite3_vfs_find(ptr::null()) };
    if real.is_null() {
        return Err(RegisterError("SQLite has no default VFS".into()));
    }
    // SAFETY: `real` is a valid, registered VFS (above); it is only read.
    let mut vfs = unsafe { *real };
    let real_size = usize::try_from(vfs.szOsFile)
        .map_err(|_| RegisterError("the default VFS has a negative file size".into()))?;
    vfs.szOsFile = c_int::try_from(REAL_OFFSET + real_size)
        .map_err(|_| RegisterError("the default VFS's file is too large".into()))?;
    vfs.zName = NAME_C.as_ptr();
    vfs.pNext = ptr::null_mut();
    // Only opening changes: every other method of the copy is the default VFS's own, which
    // reads nothing of the struct it is given but `mxPathname` and `pAppData`, kept as is.
    vfs.xOpen = Some(open);
    REAL.store(real, Ordering::Release);
    let vfs: &'static mut ffi::sqlite3_vfs = Box::leak(Box::new(vfs));
    // SAFETY: `vfs` lives for the rest of the process (leaked) and is fully initialised;
    // registering it does not make it the default.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        return Err(RegisterError(format!("sqlite3_vfs_register returned {rc}")));
    }
    Ok(())
}

/// What SQLite allocates for a file opened through this VFS: this header, then (at
/// [`REAL_OFFSET`]) the default VFS's own file.
#[repr(C)]
struct File {
    /// Must come first: SQLite sees a `File` as an `sqlite3_file`.
    base: ffi::sqlite3_file,
    /// The default VFS's file, in the same allocation.
    real: *mut ffi::sqlite3_file,
    /// Frames written but not yet handed to `real`; `None` for files passed through.
    pending: Option<Pending>,
    /// The file's name, to count its writes in the tests.
    #[cfg(test)]
    name: String,
}

/// Bytes written at `start..start + buf.len()` that the file does not have yet.
struct Pending {
    start: i64,
    buf: Vec<u8>,
}

impl Pending {
    /// The offset just past the pending bytes.
    fn end(&self) -> i64 {
        // At most MAX_PENDING bytes are pending: the length fits in an i64.
        self.start + self.buf.len() as i64
    }
}

/// Where the default VFS's file starts in the allocation (8-aligned, as SQLite aligns it).
const REAL_OFFSET: usize = std::mem::size_of::<File>().next_multiple_of(8);

// SQLite aligns the memory of a file to 8 bytes, no more.
const _: () = assert!(std::mem::align_of::<File>() <= 8);

impl File {
    /// The default VFS's methods for this file.
    ///
    /// # Safety
    /// `self` must have been opened by [`open`] and not closed.
    unsafe fn real_methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: `open` stored a successfully opened real file, whose pMethods is non-null
        // and static (the caller guarantees it is not closed).
        unsafe { &*(*self.real).pMethods }
    }

    /// Writes the pending frames to the real file: `SQLITE_OK` or the write's error. The
    /// frames are dropped either way (after an error SQLite rolls the commit back).
    ///
    /// # Safety
    /// As for [`Self::real_methods`].
    unsafe fn flush(&mut self) -> c_int {
        let real = self.real;
        let Some(p) = self.pending.as_mut().filter(|p| !p.buf.is_empty()) else {
            return ffi::SQLITE_OK;
        };
        let mut rc = ffi::SQLITE_OK;
        let mut offset = p.start;
        for chunk in p.buf.chunks(WRITE_CHUNK) {
            // WRITE_CHUNK fits in a c_int and in an i64.
            let len = chunk.len() as c_int;
            // SAFETY: `real` is open (the caller's contract), and `chunk` is valid for `len`
            // bytes.
            rc = unsafe {
                match (*(*real).pMethods).xWrite {
                    Some(write) => write(real, chunk.as_ptr().cast(), len, offset),
                    None => ffi::SQLITE_IOERR_WRITE,
                }
            };
            #[cfg(test)]
            counts::add(&self.name, counts::Kind::Written);
            if rc != ffi::SQLITE_OK {
                break;
            }
            offset += chunk.len() as i64;
        }
        p.buf.clear();
        rc
    }
}

/// The `File` behind a pointer SQLite hands a method.
///
/// # Safety
/// `f` must point to a `File` that [`open`] initialised and that is not closed, and no other
/// reference to it may be live (SQLite calls a file's methods one at a time).
unsafe fn file<'a>(f: *mut ffi::sqlite3_file) -> &'a mut File {
    // SAFETY: the caller's guarantees; `base` is the first field of a repr(C) struct.
    unsafe { &mut *f.cast::<File>() }
}

/// Opens the default VFS's file inside ours; a WAL on a device with power-safe overwrites
/// gets a pending buffer, every other file is passed through.
unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real_vfs = REAL.load(Ordering::Acquire);
    // SAFETY: SQLite allocated `szOsFile` bytes at `f`, of which the real file takes the
    // part from REAL_OFFSET on.
    let real = unsafe { f.cast::<u8>().add(REAL_OFFSET) }.cast::<ffi::sqlite3_file>();
    // SAFETY: `real_vfs` was stored before this VFS was registered, so it is set and valid;
    // `real` has room for its file; the other arguments are SQLite's, passed on.
    let rc = unsafe {
        match (*real_vfs).xOpen {
            Some(open) => open(real_vfs, name, real, flags, out_flags),
            None => ffi::SQLITE_CANTOPEN,
        }
    };
    if rc != ffi::SQLITE_OK {
        // A file whose open failed is closed only if it set its methods; ours stay unset so
        // SQLite never calls them, and the real file is closed here instead.
        // SAFETY: `real` was just handed to the real xOpen; its pMethods is null or valid.
        unsafe {
            let methods = (*real).pMethods;
            if !methods.is_null() {
                if let Some(close) = (*methods).xClose {
                    close(real);
                }
            }
            (*f).pMethods = ptr::null();
        }
        return rc;
    }
    // SAFETY: the real file is open, so its methods are valid.
    let characteristics = unsafe {
        match (*(*real).pMethods).xDeviceCharacteristics {
            Some(dc) => dc(real),
            None => 0,
        }
    };
    let buffered = flags & ffi::SQLITE_OPEN_WAL != 0
        && characteristics & ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE != 0;
    // Our methods take the real ones' version, so that SQLite never calls one the real file
    // lacks.
    // SAFETY: the real file is open, so its methods are valid.
    let version = unsafe { (*(*real).pMethods).iVersion };
    let methods: &'static ffi::sqlite3_io_methods = match version {
        ..=1 => &METHODS_V1,
        2 => &METHODS_V2,
        _ => &METHODS_V3,
    };
    let header = File {
        base: ffi::sqlite3_file { pMethods: methods },
        real,
        pending: buffered.then(|| Pending {
            start: 0,
            buf: Vec::new(),
        }),
        #[cfg(test)]
        name: if name.is_null() {
            String::new()
        } else {
            // SAFETY: a non-null name from SQLite is a NUL-terminated string.
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        },
    };
    // SAFETY: `f` has room for a File at its start (szOsFile) and is suitably aligned; the
    // memory is uninitialised as far as Rust is concerned, so it is written, not assigned.
    unsafe { ptr::write(f.cast::<File>(), header) };
    ffi::SQLITE_OK
}

/// Calls the real file's method `$m` with `$args`, or answers `$missing` if it has none.
macro_rules! forward {
    ($file:expr, $m:ident, $missing:expr $(, $arg:expr)*) => {{
        let file: &mut File = $file;
        // SAFETY: the file is open (the caller's contract), so its real methods are valid.
        match unsafe { file.real_methods() }.$m {
            // SAFETY: as above; the arguments are SQLite's own, passed on unchanged.
            Some(m) => unsafe { m(file.real $(, $arg)*) },
            None => $missing,
        }
    }};
}

/// Writes the pending frames, returning early with the error if that fails.
macro_rules! flush_or_return {
    ($file:expr) => {{
        // SAFETY: the file is open (the caller's contract).
        let rc = unsafe { $file.flush() };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }};
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file once, after its last other call.
    let file = unsafe { file(f) };
    // SAFETY: the file is still open here.
    let flushed = unsafe { file.flush() };
    let closed = forward!(file, xClose, ffi::SQLITE_OK);
    // SAFETY: the header was written by `open` and is not used after this; SQLite frees
    // the memory itself.
    unsafe { ptr::drop_in_place(f.cast::<File>()) };
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn read(
    f: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    forward!(file, xRead, ffi::SQLITE_IOERR_READ, data, amount, offset)
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    if let Some(p) = &file.pending {
        // A write joins the pending bytes if there are none or it starts where they end
        // (SQLite appends frames); anything else writes them out first, keeping the order.
        let joins = p.buf.is_empty() || p.end() == offset;
        if !joins || p.buf.len() + len > MAX_PENDING {
            flush_or_return!(file);
        }
        if let Some(p) = file.pending.as_mut().filter(|_| len <= MAX_PENDING) {
            if p.buf.is_empty() {
                p.start = offset;
            }
            // SAFETY: SQLite passes `amount` readable bytes at `data`.
            let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
            p.buf.extend_from_slice(bytes);
            #[cfg(test)]
            counts::add(&file.name, counts::Kind::Buffered);
            return ffi::SQLITE_OK;
        }
    }
    forward!(file, xWrite, ffi::SQLITE_IOERR_WRITE, data, amount, offset)
}

unsafe extern "C" fn truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    forward!(file, xTruncate, ffi::SQLITE_IOERR_TRUNCATE, size)
}

unsafe extern "C" fn sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    forward!(file, xSync, ffi::SQLITE_IOERR_FSYNC, flags)
}

unsafe extern "C" fn file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    forward!(file, xFileSize, ffi::SQLITE_IOERR_FSTAT, size)
}

unsafe extern "C" fn lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xLock, ffi::SQLITE_IOERR_LOCK, level)
}

unsafe extern "C" fn unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xUnlock, ffi::SQLITE_IOERR_UNLOCK, level)
}

unsafe extern "C" fn check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(
        file,
        xCheckReservedLock,
        ffi::SQLITE_IOERR_CHECKRESERVEDLOCK,
        out
    )
}

unsafe extern "C" fn file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    forward!(file, xFileControl, ffi::SQLITE_NOTFOUND, op, arg)
}

unsafe extern "C" fn sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xSectorSize, 4096)
}

unsafe extern "C" fn device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xDeviceCharacteristics, 0)
}

unsafe extern "C" fn shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    page_size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(
        file,
        xShmMap,
        ffi::SQLITE_IOERR_SHMMAP,
        page,
        page_size,
        extend,
        out
    )
}

unsafe extern "C" fn shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xShmLock, ffi::SQLITE_IOERR_SHMLOCK, offset, n, flags)
}

unsafe extern "C" fn shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xShmBarrier, ())
}

unsafe extern "C" fn shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xShmUnmap, ffi::SQLITE_OK, delete)
}

unsafe extern "C" fn fetch(
    f: *mut ffi::sqlite3_file,
    offset: i64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    flush_or_return!(file);
    // SAFETY: the file is open, so its real methods are valid.
    match unsafe { file.real_methods() }.xFetch {
        // SAFETY: as above; the arguments are SQLite's own, passed on unchanged.
        Some(m) => unsafe { m(file.real, offset, amount, out) },
        None => {
            // Without a real xFetch there is no mapping, and SQLite reads instead.
            // SAFETY: `out` is SQLite's, valid for a write.
            unsafe { *out = ptr::null_mut() };
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn unfetch(f: *mut ffi::sqlite3_file, offset: i64, p: *mut c_void) -> c_int {
    // SAFETY: SQLite calls methods only on open files, one at a time.
    let file = unsafe { file(f) };
    forward!(file, xUnfetch, ffi::SQLITE_OK, offset, p)
}

/// The methods of a file, for real files of method version `version` (1 to 3): SQLite
/// never calls a method past a file's version.
const fn methods(version: c_int) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: version,
        xClose: Some(close),
        xRead: Some(read),
        xWrite: Some(write),
        xTruncate: Some(truncate),
        xSync: Some(sync),
        xFileSize: Some(file_size),
        xLock: Some(lock),
        xUnlock: Some(unlock),
        xCheckReservedLock: Some(check_reserved_lock),
        xFileControl: Some(file_control),
        xSectorSize: Some(sector_size),
        xDeviceCharacteristics: Some(device_characteristics),
        xShmMap: if version >= 2 { Some(shm_map) } else { None },
        xShmLock: if version >= 2 { Some(shm_lock) } else { None },
        xShmBarrier: if version >= 2 {
            Some(shm_barrier)
        } else {
            None
        },
        xShmUnmap: if version >= 2 { Some(shm_unmap) } else { None },
        xFetch: if version >= 3 { Some(fetch) } else { None },
        xUnfetch: if version >= 3 { Some(unfetch) } else { None },
    }
}

static METHODS_V1: ffi::sqlite3_io_methods = methods(1);
static METHODS_V2: ffi::sqlite3_io_methods = methods(2);
static METHODS_V3: ffi::sqlite3_io_methods = methods(3);

/// Per file name: how many writes SQLite made and how many reached the real file, so the
/// tests can see what a commit costs.
#[cfg(test)]
mod counts {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    pub(crate) enum Kind {
        Buffered,
        Written,
    }

    static COUNTS: Mutex<BTreeMap<String, (u64, u64)>> = Mutex::new(BTreeMap::new());

    pub(crate) fn add(name: &str, kind: Kind) {
        let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let entry = counts.entry(name.to_owned()).or_default();
        match kind {
            Kind::Buffered => entry.0 += 1,
            Kind::Written => entry.1 += 1,
        }
    }

    /// (writes SQLite made, writes the real file got) for the file at `name`.
    pub(crate) fn get(name: &str) -> (u64, u64) {
        let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(name).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};
    use std::path::Path;

    fn open_on_shim(path: &Path) -> Connection {
        register().unwrap();
        let conn = Connection::open_with_flags_and_vfs(path, OpenFlags::default(), NAME).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn
    }

    fn wal_name(conn: &Connection) -> String {
        format!("{}-wal", conn.path().unwrap())
    }

    fn insert(conn: &Connection, from: i64, rows: i64, size: usize) {
        let tx = conn.unchecked_transaction().unwrap();
        for i in from..from + rows {
            tx.execute(
                "INSERT INTO t (id, body) VALUES (?1, ?2)",
                rusqlite::params![i, format!("{i:>width$}", width = size)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    #[test]
    fn registering_twice_is_the_same_registration() {
        assert_eq!(register(), Ok(()));
        assert_eq!(register(), Ok(()));
    }

    #[test]
    fn a_commit_reaches_the_wal_in_one_write() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_on_shim(&dir.path().join("one.db"));
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .unwrap();
        let wal = wal_name(&conn);
        let before = counts::get(&wal);
        // About 20 pages: 40 frame writes (a header and a page each) that SQLite makes.
        insert(&conn, 0, 80, 1000);
        let after = counts::get(&wal);
        let made = after.0 - before.0;
        let reached = after.1 - before.1;
        assert!(made >= 40, "SQLite made {made} writes");
        assert_eq!(reached, 1, "of {made} writes, {reached} reached the file");
    }

    #[test]
    fn other_connections_see_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readers.db");
        let writer = open_on_shim(&path);
        writer
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .unwrap();
        // Through the default VFS: what any other process would see.
        let reader = Connection::open(&path).unwrap();
        for round in 0..100 {
            insert(&writer, round * 5, 5, 300);
            let (n, last): (i64, String) = reader
                .query_row("SELECT count(*), max(body) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap();
            assert_eq!(n, (round + 1) * 5);
            assert_eq!(last.trim(), (round * 5 + 4).to_string());
        }
    }

    #[test]
    fn large_and_rolled_back_transactions_leave_a_sound_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.db");
        let conn = open_on_shim(&path);
        // A tiny page cache makes SQLite write frames before the commit (a spill).
        conn.execute_batch(
            "PRAGMA cache_size = 2; CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
        )
        .unwrap();
        // 3 MiB in one transaction: more than the pending limit.
        insert(&conn, 0, 3000, 1000);
        {
            let tx = conn.unchecked_transaction().unwrap();
            for i in 10_000..12_000 {
                tx.execute(
                    "INSERT INTO t (id, body) VALUES (?1, ?2)",
                    rusqlite::params![i, "x".repeat(1000)],
                )
                .unwrap();
            }
            tx.rollback().unwrap();
        }
        insert(&conn, 3000, 10, 1000);
        let reader = Connection::open(&path).unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3010);
        drop(reader);
        drop(conn);
        // Reopened through the default VFS after a clean close.
        let again = Connection::open(&path).unwrap();
        let check: String = again
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
        let n: i64 = again
            .query_row("SELECT count(*) FROM t WHERE id < 10000", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3010);
    }

    #[test]
    fn the_database_file_and_journals_are_not_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollback.db");
        register().unwrap();
        // Rollback-journal mode: no WAL, so nothing is held back.
        let conn = Connection::open_with_flags_and_vfs(&path, OpenFlags::default(), NAME).unwrap();
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            .unwrap();
        insert(&conn, 0, 50, 500);
        let db = conn.path().unwrap().to_owned();
        assert_eq!(counts::get(&db), (0, 0));
        assert_eq!(counts::get(&format!("{db}-journal")), (0, 0));
        let n: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 50);
    }
}
