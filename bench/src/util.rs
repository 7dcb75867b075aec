//! Plumbing shared by the scenarios: temporary directories, free ports, child processes that are
//! always stopped, timed runs with their peak memory, a seeded PRNG, and small file helpers.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

/// A directory removed (with everything in it) when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A fresh, empty directory `<parent>/<name>-<pid>-<nanos>`.
    pub fn new_in(parent: &Path, name: &str) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let path = parent.join(format!("{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Set EPS_BENCH_KEEP=1 to keep every temporary directory (data, logs of the processes) for a look.
fn keep_temp_dirs() -> bool {
    std::env::var_os("EPS_BENCH_KEEP").is_some_and(|v| v == "1")
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if keep_temp_dirs() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bind port 0, read it, release it).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Makes the kernel kill the child when this process dies, even by SIGKILL, so an interrupted
/// benchmark leaves nothing running. (The signal follows the *thread* that spawned the child: the
/// driver spawns every process from its main thread, which lives as long as the process.)
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Points the child's stdout and stderr at one log file.
fn redirect_output(cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
    Ok(())
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A long-running child (a server, a follower). Stopped by [`Proc::stop`], or killed when dropped,
/// whatever path the scenario takes out (error, panic).
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        redirect_output(cmd, log)?;
        die_with_parent(cmd);
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Proc { name: name.to_string(), child: Some(child), log: log.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails (with the end of its log) if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!("{} exited early ({status}); its log ends with:\n{}", self.name, tail(&self.log, 20));
            }
        }
        Ok(())
    }

    /// Waits until the process accepts TCP connections on `addr`.
    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on {addr} after {timeout:?}; its log ends with:\n{}",
                    self.name,
                    tail(&self.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident set size so far (VmHWM), in bytes; must be read before the process is stopped.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        proc_status_bytes(self.pid(), "VmHWM")
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s; waits for it.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("eps-bench: {} did not exit within 5 s of SIGTERM; killed", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `name` (e.g. "VmHWM") of a live process, from `/proc/PID/status`, in bytes.
pub fn proc_status_bytes(pid: u32, name: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))
        .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
    let kb: u64 = line.split_whitespace().nth(1).context("malformed /proc status line")?.parse()?;
    Ok(kb * 1024)
}

/// Outcome of a child run to completion.
pub struct Run {
    /// Exit code, or None when it was killed by a signal.
    pub code: Option<i32>,
    /// Wall time from spawn to exit.
    pub wall: Duration,
    /// Peak resident set size of this child's program (its VmHWM, read every millisecond while it ran),
    /// in bytes.
    pub max_rss: u64,
    /// CPU time (user + system) of this child alone, in seconds.
    pub cpu_secs: f64,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Run {
    pub fn secs(&self) -> f64 {
        self.wall.as_secs_f64()
    }

    /// Fails with the end of its output unless it exited 0.
    pub fn check_success(&self, name: &str) -> anyhow::Result<()> {
        if self.code != Some(0) {
            bail!("{name} failed (exit {:?}); its output ends with:\n{}", self.code, tail(&self.log, 20));
        }
        Ok(())
    }
}

/// Runs `cmd` to completion with its output in `log`, measuring wall time, CPU time (wait4 on its pid,
/// so earlier children do not count) and peak RSS. Killed after `timeout`.
///
/// The peak RSS is the child's `VmHWM`, read every millisecond while it runs (the last reading before it
/// exits), not wait4's `ru_maxrss`: Linux carries the RSS of the image a child replaced at `exec` into
/// `ru_maxrss`, so a child forked from this driver (which holds the expected totals, hundreds of MiB at
/// millions of users) would report the driver's RSS whenever its own peak is smaller. Only a child that
/// exits within its first millisecond falls back to `ru_maxrss`.
pub fn run_measured(cmd: &mut Command, log: &Path, timeout: Duration) -> anyhow::Result<Run> {
    redirect_output(cmd, log)?;
    die_with_parent(cmd);
    let start = Instant::now();
    // The std Child is only used to spawn; we reap it ourselves with wait4 (dropping a Child neither
    // kills nor waits).
    let child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut killed = false;
    let mut hwm = None;
    loop {
        // Before wait4: once the child has exited its memory is gone from /proc.
        if let Ok(bytes) = proc_status_bytes(pid as u32, "VmHWM") {
            hwm = Some(bytes);
        }
        // SAFETY: wait4 on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("wait4 failed: {err}");
        }
        if !killed && start.elapsed() > timeout {
            // SAFETY: the child is not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        // 1 ms polling: negligible next to runs of tens of milliseconds or more.
        std::thread::sleep(Duration::from_millis(1));
    }
    let wall = start.elapsed();
    drop(child);
    if killed {
        bail!("{cmd:?} did not finish within {timeout:?} and was killed; its output ends with:\n{}", tail(log, 20));
    }
    let code = if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu_secs = tv(usage.ru_utime) + tv(usage.ru_stime);
    let max_rss = hwm.unwrap_or(usage.ru_maxrss as u64 * 1024);
    Ok(Run { code, wall, max_rss, cpu_secs, log: log.to_path_buf() })
}

/// SplitMix64: a tiny, fast, well-mixed PRNG. With a fixed seed every run generates the same data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (the modulo bias is below 2^-40 for the small n used here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Number of `\n` bytes in every file of `dir` whose name matches `server-events-*.jsonl`.
pub fn count_log_lines(log_dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for path in log_segments(log_dir)? {
        let mut file = File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok(total)
}

/// The log's segment files, sorted by name (= by position).
pub fn log_segments(log_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !log_dir.exists() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(log_dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("server-events-") && name.ends_with(".jsonl") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Clock ticks per second of /proc's CPU times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU time (user + system) a running process has used so far, in seconds (0 when it is gone).
pub fn process_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(14) + ticks(15)) as f64 / clock_ticks()
}

/// CPU time the whole machine has spent busy so far (every CPU; /proc/stat less idle and iowait), in seconds.
pub fn machine_busy_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return 0.0 };
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = [0usize, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum();
    busy as f64 / clock_ticks()
}

/// A program by name on PATH, else at one of `fallbacks` (root's sbin directories may be off PATH).
pub fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain(fallbacks.iter().map(PathBuf::from)).find(|p| p.is_file())
}

/// Bytes free for an unprivileged user on the file system holding `path` (statvfs).
pub fn free_disk_bytes(path: &Path) -> anyhow::Result<u64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value, filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        bail!("statvfs {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Bytes as mebibytes, for figures.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
