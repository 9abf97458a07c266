//! `qed serve` driven by real NBD clients: qemu-io, qemu-img and libnbd's nbdinfo and nbdcopy,
//! over Unix sockets and TCP. After the server exits the image must be clean by
//! `qemu-img check` and hold what the clients wrote.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::served::*;
use common::*;

fn run_ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let o = run_in(dir, program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[test]
fn qemu_io_writes_reads_and_the_image_is_clean_after() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "64M");
    // A socket left behind by a server that died is replaced.
    let stale = dir.path().join(format!("nbd-{}.sock", std::process::id()));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let mut served = Served::unix(dir.path(), &[], "d.qed");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            &served.uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 3M 5000",
            "-c",
            "write -z 4M 128k",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 3M 5000",
            "-c",
            "read -P 0 1M 2M",
            "-c",
            "read -P 0 4M 128k",
            "-c",
            "flush",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // Without -t the server leaves with its last client.
    assert_eq!(served.wait(), 0);
    assert_clean(dir.path(), "d.qed");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "qed",
            "-r",
            "d.qed",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 3M 5000",
            "-c",
            "read -P 0 4M 128k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn qemu_img_convert_and_compare_over_tcp_then_sigterm() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "16M");
    // A source with data, a hole and more data.
    run_ok(
        dir.path(),
        "qemu-img",
        &["create", "-f", "raw", "src.raw", "16M"],
    );
    run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "src.raw",
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0x22 9M 1M",
            "-c",
            "write -P 0x33 15M 12345",
        ],
    );
    let served = Served::tcp(dir.path(), &["-t", "-e", "2"], "d.qed");
    run_ok(
        dir.path(),
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "src.raw",
            &served.uri,
        ],
    );
    run_ok(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "src.raw", &served.uri],
    );
    assert_eq!(served.terminate(), 0);
    assert_clean(dir.path(), "d.qed");
    run_ok(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", "src.raw", "d.qed"],
    );
}

/// (start, length, data, zero) runs of `qemu-img map --output=json`, adjacent equal ones
/// merged.
fn map_runs(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(json).expect("map json");
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in entries {
        let start = e["start"].as_u64().unwrap();
        let length = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        match runs.last_mut() {
            Some(last) if last.2 == data && last.3 == zero && last.0 + last.1 == start => {
                last.1 += length
            }
            _ => runs.push((start, length, data, zero)),
        }
    }
    runs
}

#[test]
fn qemu_img_map_over_nbd_agrees_with_the_file() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "8M");
    run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "qed",
            "d.qed",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z 1M 64k",
            "-c",
            "write -P 2 2M 128k",
        ],
    );
    let file_map = run_ok(
        dir.path(),
        "qemu-img",
        &["map", "--output=json", "-f", "qed", "d.qed"],
    );
    let mut served = Served::unix(dir.path(), &["-r"], "d.qed");
    let nbd_map = run_ok(
        dir.path(),
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &served.uri],
    );
    assert_eq!(served.wait(), 0);
    assert_eq!(map_runs(&nbd_map), map_runs(&file_map));
    assert_clean(dir.path(), "d.qed");
}

#[test]
fn read_only_export_serves_reads_and_leaves_the_file_alone() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "qed", "d.qed", "-c", "write -P 7 0 64k"],
    );
    let before = std::fs::read(dir.path().join("d.qed")).unwrap();
    let served = Served::unix(dir.path(), &["-r", "-t"], "d.qed");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &["-r", "-f", "raw", &served.uri, "-c", "read -P 7 0 64k"],
    );
    assert!(!out.contains("failed"), "{out}");
    // A writable open of a read-only export fails or its writes fail; either way nothing
    // reaches the file.
    let o = run_in(
        dir.path(),
        "qemu-io",
        &["-f", "raw", &served.uri, "-c", "write -P 9 0 4k"],
    );
    assert!(
        !o.status.success() || stdout(&o).contains("failed") || stderr(&o).contains("failed"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let code = served.terminate_or_wait();
    assert_eq!(code, 0);
    assert_eq!(std::fs::read(dir.path().join("d.qed")).unwrap(), before);
}

impl Served {
    fn terminate_or_wait(mut self) -> i32 {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.code().unwrap_or(-1);
        }
        self.terminate()
    }
}

#[test]
fn nbdinfo_lists_and_maps_both_contexts() {
    if !have_qemu() || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "base.qed", "4M");
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "qed", "base.qed", "-c", "write -P 1 1M 1M"],
    );
    let o = qed(
        dir.path(),
        &[
            "create", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "qed", "top.qed", "-c", "write -P 2 0 64k"],
    );
    let served = Served::unix(
        dir.path(),
        &["-t", "-A", "-e", "4", "-x", "disk", "-D", "the test disk"],
        "top.qed",
    );
    let socket = served.uri.split("socket=").nth(1).unwrap().to_string();
    let list = run_ok(
        dir.path(),
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={socket}")],
    );
    assert!(list.contains("export=\"disk\""), "{list}");
    assert!(list.contains("the test disk"), "{list}");
    assert!(list.contains("qemu:allocation-depth"), "{list}");
    let uri = format!("nbd+unix:///disk?socket={socket}");
    let map = run_ok(dir.path(), "nbdinfo", &["--map", "--totals", &uri]);
    assert!(!map.is_empty());
    let base = run_ok(dir.path(), "nbdinfo", &["--map", &uri]);
    let lines: Vec<Vec<String>> = base
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect();
    // 0-64k data on top, 1M-2M data from the backing file, the rest zeros.
    assert_eq!(lines[0][..3], ["0", "65536", "0"]);
    let depth = run_ok(
        dir.path(),
        "nbdinfo",
        &["--map=qemu:allocation-depth", &uri],
    );
    let depths: Vec<(String, String, String)> = depth
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].into(), f[1].into(), f[2].into())
        })
        .collect();
    assert_eq!(
        depths,
        vec![
            ("0".into(), "65536".into(), "1".into()),
            ("65536".into(), "983040".into(), "0".into()),
            ("1048576".into(), "1048576".into(), "2".into()),
            ("2097152".into(), "2097152".into(), "0".into()),
        ],
        "{depth}"
    );
    // Reads of ranges the backing file holds return its data, not holes.
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            &format!("nbd+unix:///disk?socket={socket}"),
            "-c",
            "read -P 2 0 64k",
            "-c",
            "read -P 1 1M 1M",
            "-c",
            "read -P 0 2M 2M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(
        served.signal("-INT"),
        0,
        "SIGINT stops the server as SIGTERM does"
    );
    assert_clean(dir.path(), "top.qed");
}

#[test]
fn nbdcopy_over_several_connections() {
    if !have_qemu() || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "32M");
    run_ok(
        dir.path(),
        "qemu-img",
        &["create", "-f", "raw", "src.raw", "32M"],
    );
    run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "src.raw",
            "-c",
            "write -P 0x5a 0 8M",
            "-c",
            "write -P 0xa5 20M 4M",
        ],
    );
    // Writethrough: every write is flushed before its reply.
    let served = Served::unix(
        dir.path(),
        &["-t", "-e", "4", "--cache", "writethrough"],
        "d.qed",
    );
    run_ok(
        dir.path(),
        "nbdcopy",
        &["--connections=4", "--flush", "src.raw", &served.uri],
    );
    run_ok(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "src.raw", &served.uri],
    );
    assert_eq!(served.terminate(), 0);
    assert_clean(dir.path(), "d.qed");
    run_ok(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", "src.raw", "d.qed"],
    );
}

#[test]
fn several_connections_are_offered_only_to_several_clients() {
    if !have_qemu() || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "8M");
    qemu_io_ok(dir.path(), "qed", "d.qed", &["write -P 0x5a 0 1M"]);
    for (args, multi) in [(&["-t"][..], false), (&["-t", "-e", "2"][..], true)] {
        let served = Served::unix(dir.path(), args, "d.qed");
        let info = run_ok(dir.path(), "nbdinfo", &["--json", &served.uri]);
        let json: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            json["exports"][0]["can_multi_conn"], multi,
            "{args:?}: {info}"
        );
        // nbdcopy opens as many connections as it is offered: with one client at a time it
        // used to wait for ever for its second.
        run_ok(
            dir.path(),
            "timeout",
            &["60", "nbdcopy", &served.uri, "out.raw"],
        );
        assert_eq!(served.terminate(), 0);
        run_ok(
            dir.path(),
            "qemu-img",
            &["compare", "-f", "qed", "-F", "raw", "d.qed", "out.raw"],
        );
        std::fs::remove_file(dir.path().join("out.raw")).unwrap();
    }
}

#[test]
fn raw_files_are_served_too() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        dir.path(),
        "qemu-img",
        &["create", "-f", "raw", "d.raw", "4M"],
    );
    let mut served = Served::unix(dir.path(), &["-f", "raw"], "d.raw");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            &served.uri,
            "-c",
            "write -P 0x42 1M 64k",
            "-c",
            "read -P 0x42 1M 64k",
            "-c",
            "read -P 0 0 1M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(served.wait(), 0);
    let mut served = Served::unix(dir.path(), &["-r"], "d.raw");
    let map = run_ok(
        dir.path(),
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &served.uri],
    );
    assert_eq!(served.wait(), 0);
    let runs = map_runs(&map);
    assert!(
        runs.contains(&(1 << 20, 65536, true, false)),
        "the written range is data: {map}"
    );
    assert!(
        runs.iter().any(|r| !r.2 && r.3),
        "holes read as zeros: {map}"
    );
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-r", "d.raw", "-c", "read -P 0x42 1M 64k"],
    );
}

/// Whether openssl runs (a note, or a failure under CI=true, when it does not).
fn have_openssl() -> bool {
    let found = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("openssl is required when CI=true");
        }
        eprintln!("note: openssl not found; skipping the TLS test");
    }
    found
}

/// A CA, a server certificate for localhost and 127.0.0.1 in `srv/` and a client certificate
/// in `cli/` (both with the CA's certificate), and `nocert/` with the CA's certificate only.
fn make_certificates(dir: &Path) {
    for d in ["srv", "cli", "nocert"] {
        std::fs::create_dir(dir.join(d)).unwrap();
    }
    let openssl = |args: &[&str]| run_ok(dir, "openssl", args);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=qed test CA",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (who, key, cert, ext) in [
        (
            "localhost",
            "srv/server-key.pem",
            "srv/server-cert.pem",
            "server.ext",
        ),
        (
            "qed client",
            "cli/client-key.pem",
            "cli/client-cert.pem",
            "client.ext",
        ),
    ] {
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            "req.csr",
            "-subj",
            &format!("/CN={who}"),
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
    for d in ["srv", "cli", "nocert"] {
        std::fs::copy(dir.join("ca-cert.pem"), dir.join(d).join("ca-cert.pem")).unwrap();
    }
}

/// qemu-io on the TLS export at `port` with the client credentials in `creds`.
fn qemu_io_tls(dir: &Path, creds: &str, port: u16, commands: &[&str]) -> std::process::Output {
    let object = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.join(creds).display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0"
    );
    let mut args = vec!["--object", object.as_str(), "--image-opts", image.as_str()];
    for c in commands {
        args.extend(["-c", c]);
    }
    run_in(dir, "qemu-io", &args)
}

#[test]
fn tls_is_required_and_works_with_qemu_and_libnbd() {
    if !have_qemu() || !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    create(dir.path(), "d.qed", "8M");
    let served = Served::tcp(
        dir.path(),
        &["-t", "--tls-creds", "srv", "--tls-verify-peer"],
        "d.qed",
    );
    let port: u16 = served.uri.rsplit(':').next().unwrap().parse().unwrap();
    let o = qemu_io_tls(
        dir.path(),
        "cli",
        port,
        &["write -P 0x77 0 1M", "read -P 0x77 0 1M", "read -P 0 1M 1M"],
    );
    assert!(
        o.status.success() && !stdout(&o).contains("failed"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    // Without TLS, and with TLS but no client certificate: refused.
    let o = run_in(
        dir.path(),
        "qemu-io",
        &["-f", "raw", &served.uri, "-c", "read 0 4k"],
    );
    assert!(
        stderr(&o).contains("TLS is required"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = qemu_io_tls(dir.path(), "nocert", port, &["read 0 4k"]);
    assert!(!o.status.success(), "{}{}", stdout(&o), stderr(&o));
    if have("nbdinfo") {
        let uri = format!(
            "nbds://127.0.0.1:{port}/?tls-certificates={}",
            dir.path().join("cli").display()
        );
        let info = run_ok(dir.path(), "nbdinfo", &[&uri]);
        assert!(info.contains("with TLS"), "{info}");
    }
    assert_eq!(served.terminate(), 0);
    assert_clean(dir.path(), "d.qed");
}

#[test]
fn fork_returns_once_listening_and_the_server_goes_on() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    let socket = dir.path().join("fork.sock");
    let pid_file = dir.path().join("fork.pid");
    let o = qed(
        dir.path(),
        &[
            "serve",
            "--fork",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "-k",
            socket.to_str().unwrap(),
            "d.qed",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 5 0 64k",
            "-c",
            "read -P 5 0 64k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    // Without -t it leaves with its client.
    wait_for(|| !Path::new(&format!("/proc/{pid}")).exists());
    assert!(!pid_file.exists());
    assert_clean(dir.path(), "d.qed");
    // A failure before listening is the parent's exit status.
    let o = qed(
        dir.path(),
        &["serve", "--fork", "-k", "x.sock", "missing.qed"],
    );
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("missing.qed"), "{}", stderr(&o));
}

#[test]
fn snapshot_mode_keeps_the_image_unchanged() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "qed", "d.qed", "-c", "write -P 3 0 64k"],
    );
    let before = std::fs::read(dir.path().join("d.qed")).unwrap();
    let mut served = Served::unix(dir.path(), &["-s"], "d.qed");
    let pid = served.child.id();
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            &served.uri,
            "-c",
            "read -P 3 0 64k",
            "-c",
            "write -P 9 0 4k",
            "-c",
            "read -P 9 0 4k",
            "-c",
            "read -P 3 4k 60k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(served.wait(), 0);
    assert_eq!(std::fs::read(dir.path().join("d.qed")).unwrap(), before);
    let prefix = format!("qed-snapshot-{pid}-");
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "overlay left behind: {left:?}");
}

#[test]
fn offset_exports_the_rest_of_the_image() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_ok(
        dir.path(),
        "qemu-img",
        &["create", "-f", "raw", "d.raw", "4M"],
    );
    let mut served = Served::unix(dir.path(), &["-f", "raw", "-o", "1M"], "d.raw");
    let info = run_ok(
        dir.path(),
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &served.uri],
    );
    assert!(info.contains("\"virtual-size\": 3145728"), "{info}");
    assert_eq!(served.wait(), 0);
    let mut served = Served::unix(dir.path(), &["-f", "raw", "-o", "1M"], "d.raw");
    run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "raw", &served.uri, "-c", "write -P 0x61 0 4k"],
    );
    assert_eq!(served.wait(), 0);
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "d.raw",
            "-c",
            "read -P 0x61 1M 4k",
            "-c",
            "read -P 0 0 1M",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    let o = qed(
        dir.path(),
        &["serve", "-f", "raw", "-o", "5M", "-k", "x.sock", "d.raw"],
    );
    assert_eq!(code(&o), 1, "an offset past the end");
}

#[test]
fn unsupported_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "1M");
    let o = qed(dir.path(), &["serve", "--tls-hostname", "x", "d.qed"]);
    assert_eq!(code(&o), 1);
    assert!(
        stderr(&o).contains("--tls-hostname is not permitted without --tls-creds"),
        "{}",
        stderr(&o)
    );
    let o = qed(dir.path(), &["serve", "--tls-verify-peer", "d.qed"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("needs --tls-creds"), "{}", stderr(&o));
}

/// A launcher that does what a service manager does for socket activation: binds the socket,
/// then runs the program with it as descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` its own pid.
/// Prints the TCP port (or "ready" for a Unix socket) once the socket listens.
const ACTIVATE: &str = r#"
import os, socket, sys
kind, where = sys.argv[1], sys.argv[2]
if kind == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(where)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
s.listen(8)
print(s.getsockname()[1] if kind == "tcp" else "ready", flush=True)
pid = os.fork()
if pid == 0:
    if s.fileno() != 3:
        os.dup2(s.fileno(), 3)
    os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.argv[3], sys.argv[3:])
s.close()
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// Runs `qed serve ARGS` under the launcher; returns it and the first line it printed.
fn activated(dir: &Path, kind: &str, socket: &str, args: &[&str]) -> (Child, String) {
    use std::io::BufRead;
    let script = dir.join("activate.py");
    std::fs::write(&script, ACTIVATE).unwrap();
    let qed = qed_path();
    let mut all = vec![
        script.to_str().unwrap(),
        kind,
        socket,
        qed.to_str().unwrap(),
        "serve",
    ];
    all.extend_from_slice(args);
    let mut child = Command::new("python3")
        .args(&all)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_string())
}

#[test]
fn socket_activation_serves_the_passed_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    let socket = dir.path().join("passed.sock");
    let (mut child, line) = activated(
        dir.path(),
        "unix",
        socket.to_str().unwrap(),
        &["-f", "qed", "d.qed"],
    );
    assert_eq!(line, "ready");
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            &uri,
        ],
    );
    assert!(!out.contains("fail"), "{out}");
    // Not persistent: the server exits after its one client, and leaves the socket it was
    // given where it was.
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        socket.exists(),
        "a passed socket belongs to whoever made it"
    );
    assert_clean(dir.path(), "d.qed");
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "qed", "-c", "read -P 0x5a 0 64k", "d.qed"],
    );
    assert!(!out.contains("fail"), "{out}");
}

#[test]
fn socket_activation_serves_a_passed_tcp_socket_and_refuses_an_address() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    let (mut child, port) = activated(dir.path(), "tcp", "-", &["-f", "qed", "d.qed"]);
    let info = run_ok(
        dir.path(),
        "qemu-img",
        &["info", "--output=json", &format!("nbd://127.0.0.1:{port}")],
    );
    assert!(info.contains("\"virtual-size\": 4194304"), "{info}");
    assert!(child.wait().unwrap().success());
    for (option, message) in [
        (
            ["-p", "10809"],
            "TCP port number can't be set when using socket activation",
        ),
        (
            ["-b", "::1"],
            "The interface can't be set when using socket activation",
        ),
        (
            ["-k", "x.sock"],
            "Unix socket can't be set when using socket activation",
        ),
    ] {
        let (child, _) = activated(dir.path(), "tcp", "-", &[option[0], option[1], "d.qed"]);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{option:?}");
        assert!(stderr(&o).contains(message), "{option:?}: {}", stderr(&o));
    }
}

/// `--list` of `qed serve` and of qemu-nbd print the same, on both servers.
#[test]
fn list_mode_prints_what_qemu_nbd_prints() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), "d.qed", "4M");
    let socket = dir.path().join("list.sock");
    let socket_text = socket.to_str().unwrap().to_string();
    let list = |program: &str| {
        let args = if program == "qed" {
            vec!["serve", "-L", "-k", &socket_text]
        } else {
            vec!["-L", "-k", &socket_text]
        };
        let o = if program == "qed" {
            qed(dir.path(), &args)
        } else {
            run_in(dir.path(), program, &args)
        };
        assert_eq!(code(&o), 0, "{program}: {}", stderr(&o));
        stdout(&o)
    };
    // Our server, with a description and both contexts.
    let served = Served::start(
        dir.path(),
        &["-k", &socket_text],
        &["-t", "-x", "disk one", "-D", "some text", "-A"],
        "d.qed",
        String::new(),
    );
    let ours = list("qed");
    assert_eq!(ours, list("qemu-nbd"));
    assert!(
        ours.contains(" export: 'disk one'\n  description: some text\n"),
        "{ours}"
    );
    assert!(ours.contains("   qemu:allocation-depth\n"), "{ours}");
    assert_eq!(served.terminate(), 0);
    // qemu-nbd's server, read-only and shared.
    let mut qemu = Command::new("qemu-nbd")
        .args([
            "-t",
            "-r",
            "-e",
            "3",
            "-x",
            "ro",
            "-k",
            &socket_text,
            "-f",
            "qed",
            "d.qed",
        ])
        .current_dir(dir.path())
        .spawn()
        .unwrap();
    wait_for(|| socket.exists());
    let ours = list("qed");
    let theirs = list("qemu-nbd");
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert_eq!(ours, theirs);
    assert!(ours.contains("( readonly "), "{ours}");
}

#[test]
fn list_mode_refuses_server_options() {
    let dir = tempfile::tempdir().unwrap();
    for (args, message) in [
        (
            vec!["-L", "d.qed"],
            "List mode is incompatible with a file name",
        ),
        (
            vec!["-L", "-x", "a"],
            "List mode is incompatible with per-device settings",
        ),
        (
            vec!["-L", "--fork"],
            "List mode is incompatible with forking",
        ),
        (
            vec!["-L", "--tls-hostname", "h"],
            "--tls-hostname is not permitted without --tls-creds",
        ),
    ] {
        let mut all = vec!["serve"];
        all.extend(&args);
        let o = qed(dir.path(), &all);
        assert_eq!(code(&o), 1, "{args:?}");
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
    }
}

/// List mode over TLS: the server's certificate names localhost and 127.0.0.1, so connecting
/// to 127.0.0.1 with `--tls-hostname` naming another host fails, and naming localhost works.
#[test]
fn list_mode_over_tls_checks_the_host_name() {
    if !have_qemu() || !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    create(dir.path(), "d.qed", "8M");
    let served = Served::tcp(
        dir.path(),
        &["-t", "-x", "secure", "--tls-creds", "srv"],
        "d.qed",
    );
    let port = served.uri.rsplit(':').next().unwrap().to_string();
    let list = |hostname: Option<&str>| {
        let mut args = vec![
            "serve",
            "-L",
            "-b",
            "127.0.0.1",
            "-p",
            &port,
            "--tls-creds",
            "cli",
        ];
        if let Some(h) = hostname {
            args.extend(["--tls-hostname", h]);
        }
        qed(dir.path(), &args)
    };
    let o = list(None);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains(" export: 'secure'"), "{}", stdout(&o));
    let o = list(Some("localhost"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = list(Some("elsewhere.example"));
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    // Without TLS the server says TLS is required, and the listing fails.
    let o = qed(dir.path(), &["serve", "-L", "-b", "127.0.0.1", "-p", &port]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert_eq!(served.terminate(), 0);
}

/// A raw file served without `-f` is probed: QEMU's warning, block status in whole sectors,
/// and no write may give its first sector an image header (a guest could otherwise make the
/// file a QED image naming any host file as its backing file).
#[test]
fn probed_raw_exports_guard_the_first_sector() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![b'0'; 1000]).unwrap();
    // A sector that starts like a QED image.
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QED\0");
    std::fs::write(dir.path().join("header.bin"), &header).unwrap();
    let socket = dir.path().join("p.sock");
    let socket_text = socket.to_str().unwrap().to_string();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Killed(
        Command::new(qed_path())
            .args(["serve", "-t", "-k", &socket_text, "d.raw"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for(|| socket.exists());
    let uri = format!("nbd+unix:///?socket={socket_text}");
    let map = run_ok(
        dir.path(),
        "qemu-img",
        &["map", "-f", "raw", "--output=json", &uri],
    );
    assert!(map.contains("\"start\": 0, \"length\": 1024, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{map}");
    let o = run_in(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write -s header.bin 0 512", &uri],
    );
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        said.contains("write failed: Operation not permitted"),
        "{said}"
    );
    let out = run_ok(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 512", &uri],
    );
    assert!(out.contains("wrote 512/512 bytes at offset 0"), "{out}");
    let _ = child.0.kill();
    let _ = child.0.wait();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.starts_with(
            "WARNING: Image format was not specified for 'd.raw' and probing guessed raw."
        ),
        "{log}"
    );
    let file = std::fs::read(dir.path().join("d.raw")).unwrap();
    assert!(file[..512].iter().all(|&b| b == 0x11));
}

/// Under --fork, a warning the server prints while starting still reaches the caller's stderr
/// before the parent exits.
#[test]
fn fork_passes_on_startup_warnings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.raw"), vec![0u8; 4096]).unwrap();
    let o = qed(
        dir.path(),
        &[
            "serve",
            "-t",
            "-k",
            "w.sock",
            "--fork",
            "--pid-file",
            "w.pid",
            "d.raw",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let pid = std::fs::read_to_string(dir.path().join("w.pid")).unwrap();
    let _ = Command::new("kill").arg(pid.trim()).status();
    assert!(
        stderr(&o).starts_with("WARNING: Image format was not specified for 'd.raw'"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
}
