//! A running `qed serve` for the tests that drive it with NBD clients (serve.rs,
//! serve_peers.rs), and the checks of the image after it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{code, qed, qed_path, run_in, stderr, stdout};

/// A running `qed serve`.
pub struct Served {
    pub child: Child,
    pub uri: String,
    pub pid_file: PathBuf,
    /// The Unix socket it listens on (`None` for TCP).
    pub socket: Option<PathBuf>,
}

impl Served {
    /// Starts `qed serve ARGS... FILE` on a Unix socket in `dir` and waits until it listens.
    pub fn unix(dir: &Path, args: &[&str], file: &str) -> Self {
        let socket = dir.join(format!("nbd-{}.sock", std::process::id()));
        let socket_text = socket.to_str().expect("utf-8 path").to_string();
        let uri = format!("nbd+unix:///?socket={}", socket.display());
        let mut served = Self::start(dir, &["-k", &socket_text], args, file, uri);
        served.socket = Some(socket);
        served
    }

    /// Starts `qed serve -p PORT ARGS... FILE` on a free TCP port of 127.0.0.1.
    pub fn tcp(dir: &Path, args: &[&str], file: &str) -> Self {
        let port = free_port().to_string();
        let uri = format!("nbd://127.0.0.1:{port}");
        Self::start(dir, &["-b", "127.0.0.1", "-p", &port], args, file, uri)
    }

    /// Starts the server with `--pid-file` and waits for the file: it is written once the
    /// socket listens (a probe connection would count as a client).
    pub fn start(dir: &Path, endpoint: &[&str], args: &[&str], file: &str, uri: String) -> Self {
        let pid_file = dir.join("qed-serve.pid");
        let _ = std::fs::remove_file(&pid_file);
        let pid_text = pid_file.to_str().expect("utf-8 path").to_string();
        let mut all = vec!["serve", "--pid-file", pid_text.as_str()];
        all.extend_from_slice(endpoint);
        all.extend_from_slice(args);
        all.push(file);
        let child = spawn(dir, &all);
        wait_for(|| std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with('\n')));
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid, child.id());
        Self {
            child,
            uri,
            pid_file,
            socket: None,
        }
    }

    /// The Unix socket's path as text.
    pub fn socket_path(&self) -> &str {
        self.socket
            .as_deref()
            .expect("a Unix socket")
            .to_str()
            .expect("utf-8 path")
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn terminate(self) -> i32 {
        self.signal("-TERM")
    }

    /// Sends a signal (`-INT`, `-TERM`) and returns the exit code.
    pub fn signal(mut self, signal: &str) -> i32 {
        self.send(signal);
        self.wait()
    }

    /// Sends a signal and returns at once.
    pub fn send(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits (bounded) for the server to exit by itself; returns its exit code.
    pub fn wait(&mut self) -> i32 {
        self.wait_within(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("qed serve did not exit within 10 s"))
    }

    /// Waits up to `limit` for the server to exit; its exit code, or `None` (the server is
    /// killed) when it did not.
    pub fn wait_within(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(!self.pid_file.exists(), "the pid file is removed at exit");
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's resident set and its peak so far, in KiB (from /proc).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// A child process killed when dropped (a failed assertion must not leave a server running).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `qed ARGS...` in `dir` (stdin closed).
pub fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(qed_path())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("start qed serve")
}

/// Polls `ready` for up to 10 s.
pub fn wait_for(mut ready: impl FnMut() -> bool) {
    for _ in 0..200 {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("qed serve did not start listening within 10 s");
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("bind port 0")
        .port()
}

/// `qed create -f qed NAME SIZE` in `dir`.
pub fn create(dir: &Path, name: &str, size: &str) -> PathBuf {
    let o = qed(dir, &["create", "-f", "qed", name, size]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    dir.join(name)
}

/// `qemu-img check` exits 0 and `qemu-img info` shows no dirty flag.
pub fn assert_clean(dir: &Path, file: &str) {
    let o = run_in(dir, "qemu-img", &["check", "-f", "qed", file]);
    assert_eq!(code(&o), 0, "qemu-img check: {}{}", stdout(&o), stderr(&o));
    let o = run_in(
        dir,
        "qemu-img",
        &["info", "--output=json", "-f", "qed", file],
    );
    assert_eq!(code(&o), 0, "qemu-img info: {}", stderr(&o));
    let info = stdout(&o);
    assert!(
        !info.contains("\"dirty-flag\": true"),
        "image left dirty: {info}"
    );
}
