//! The disk and clock fault shim (`faultshim.c`), built by the tests with the machine's C compiler and
//! preloaded into the `eps` processes under test. [`Shim`] is its control file: arming a fault is a
//! write to that file, which the shim reads on each intercepted call through a shared mapping.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Builds the shim once per test binary; returns the shared object's path.
pub fn shim_library() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/faultshim.c");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("eps-faultshim.so");
        // Built under a name of our own, then renamed: test binaries running at once never load a
        // half-written library.
        let building = dir.join(format!("eps-faultshim-{}.so", std::process::id()));
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(&building)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cannot run cc to build the fault shim (install gcc)");
        assert!(status.success(), "building the fault shim failed");
        std::fs::rename(&building, &out).unwrap();
        out
    })
}

const REALTIME_OFFSET_MS: u64 = 0;
const FAIL_FDATASYNC: u64 = 8;
const FAIL_FSYNC: u64 = 12;
const FAIL_PWRITE: u64 = 16;
const STALL_SYNC_MS: u64 = 20;
const SYNCS_SEEN: u64 = 24;
const STALLED_NOW: u64 = 28;
const COUNT_SYNCS: u64 = 36;
const STALL_PARTIAL_WRITE_MS: u64 = 40;
const FAIL_CREATE: u64 = 44;
const FAIL_WRITE: u64 = 48;
const STALL_READ_MS: u64 = 52;
const FILTER: u64 = 64;

/// One control file; every process started with [`Shim::env`] obeys it.
pub struct Shim {
    ctl: std::fs::File,
    ctl_path: PathBuf,
    trace_path: PathBuf,
}

impl Shim {
    /// A disarmed shim whose control and trace files live in `dir`; faults apply to files whose path
    /// contains `filter` (e.g. "server-events-" for the log's segments).
    pub fn new(dir: &Path, filter: &str) -> Shim {
        shim_library();
        let ctl_path = dir.join(format!("shim-{:08x}.ctl", rand::random::<u32>()));
        let ctl = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&ctl_path).unwrap();
        ctl.set_len(4096).unwrap();
        let shim = Shim { ctl, trace_path: ctl_path.with_extension("trace"), ctl_path };
        assert!(filter.len() < 64);
        shim.ctl.write_all_at(filter.as_bytes(), FILTER).unwrap();
        shim
    }

    /// Environment for a process that must obey this shim.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", shim_library().display().to_string()),
            ("EPS_SHIM_CTL", self.ctl_path.display().to_string()),
            ("EPS_SHIM_TRACE", self.trace_path.display().to_string()),
        ]
    }

    fn set_i32(&self, at: u64, value: i32) {
        self.ctl.write_all_at(&value.to_ne_bytes(), at).unwrap();
    }

    fn get_i32(&self, at: u64) -> i32 {
        let mut b = [0u8; 4];
        self.ctl.read_exact_at(&mut b, at).unwrap();
        i32::from_ne_bytes(b)
    }

    /// The next `n` fdatasync calls on matching files fail with EIO.
    pub fn fail_fdatasync(&self, n: i32) {
        self.set_i32(FAIL_FDATASYNC, n);
    }
    /// The next `n` fsync calls on matching files fail with EIO.
    pub fn fail_fsync(&self, n: i32) {
        self.set_i32(FAIL_FSYNC, n);
    }
    /// The next `n` creations (open with O_CREAT) of matching paths fail with ENOSPC.
    pub fn fail_create(&self, n: i32) {
        self.set_i32(FAIL_CREATE, n);
    }
    /// The next `n` writes to matching files write half their bytes, then fail with ENOSPC.
    pub fn fail_pwrite(&self, n: i32) {
        self.set_i32(FAIL_PWRITE, n);
    }
    /// The next `n` write(2) calls (not pwrite) to matching files write half their bytes, then fail with
    /// ENOSPC (control word at byte 48, see faultshim.c).
    pub fn fail_write(&self, n: i32) {
        self.set_i32(FAIL_WRITE, n);
    }
    /// Every sync of a matching file first sleeps this long (0: no stall).
    pub fn stall_syncs_ms(&self, ms: i32) {
        self.set_i32(STALL_SYNC_MS, ms);
    }
    /// Every write of more than one byte to a matching file writes a part of its bytes (a prefix that
    /// does not end in a newline), then sleeps this long ([`Shim::stalled`] is true meanwhile), then
    /// writes the rest (0: no stall). A SIGKILL during the stall leaves a torn last line.
    pub fn stall_after_partial_write_ms(&self, ms: i32) {
        self.set_i32(STALL_PARTIAL_WRITE_MS, ms);
    }
    /// Every read(2) of a matching file first sleeps this long (0: no stall): a slow disk.
    pub fn stall_reads_ms(&self, ms: i32) {
        self.set_i32(STALL_READ_MS, ms);
    }
    /// Whether a matching sync (or a partial write or a read, see above) is stalled right now.
    pub fn stalled(&self) -> bool {
        self.get_i32(STALLED_NOW) == 1
    }
    /// Forgets a stall whose process was killed during it (the shim had no chance to clear the flag).
    pub fn clear_stalled(&self) {
        self.set_i32(STALLED_NOW, 0);
    }
    /// Count matching syncs from now on (reset to zero).
    pub fn count_syncs(&self) {
        self.set_i32(SYNCS_SEEN, 0);
        self.set_i32(COUNT_SYNCS, 1);
    }
    pub fn syncs_seen(&self) -> i32 {
        self.get_i32(SYNCS_SEEN)
    }
    /// Steps the wall clock (CLOCK_REALTIME) of every shimmed process by `ms` from the true time.
    pub fn wall_clock_offset_ms(&self, ms: i64) {
        self.ctl.write_all_at(&ms.to_ne_bytes(), REALTIME_OFFSET_MS).unwrap();
    }
    /// Disarms every fault (the trace and the sync count go on).
    pub fn disarm(&self) {
        for at in
            [FAIL_FDATASYNC, FAIL_FSYNC, FAIL_PWRITE, FAIL_WRITE, STALL_SYNC_MS, STALL_PARTIAL_WRITE_MS, STALL_READ_MS]
        {
            self.set_i32(at, 0);
        }
        self.wall_clock_offset_ms(0);
    }
    /// The syncs made so far, one "fsync PATH" or "fdatasync PATH" per line.
    pub fn trace(&self) -> String {
        std::fs::read_to_string(&self.trace_path).unwrap_or_default()
    }
}
