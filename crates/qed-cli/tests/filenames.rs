//! Image names as QEMU's tools take them — `json:{...}` (single quotes too), `file:NAME`,
//! `blkdebug::NAME`, `--image-opts` option strings — run through QEMU's qemu-img and
//! qemu-io and through ours on copies of the same images, the outputs compared.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{code, have_qemu, qed_path, run_in, run_ok, stderr, stdout, without_timing};

/// Two scratch directories with the same images, and `qemu-img`/`qemu-io` links to `qed`.
struct Pair {
    _root: tempfile::TempDir,
    qemu: PathBuf,
    ours: PathBuf,
    bin: PathBuf,
}

fn make(dir: &Path) {
    run_ok(dir, "qemu-img", &["create", "-f", "qed", "base.qed", "4M"]);
    run_ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.qed", "-F", "qed", "top.qed",
        ],
    );
    run_ok(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 1M 8k",
            "base.qed",
        ],
    );
    run_ok(dir, "qemu-io", &["-c", "write -P 0x33 64k 64k", "top.qed"]);
    std::fs::copy(dir.join("top.qed"), dir.join("image:top.qed")).unwrap();
    std::fs::copy(dir.join("top.qed"), dir.join("copy.qed")).unwrap();
    std::fs::copy(dir.join("top.qed"), dir.join("c,d.qed")).unwrap();
    std::fs::create_dir(dir.join("adir")).unwrap();
}

impl Pair {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for tool in ["qemu-img", "qemu-io"] {
            std::os::unix::fs::symlink(qed_path(), bin.join(tool)).unwrap();
        }
        let (qemu, ours) = (root.path().join("qemu"), root.path().join("ours"));
        for dir in [&qemu, &ours] {
            std::fs::create_dir(dir).unwrap();
            make(dir);
        }
        Self {
            _root: root,
            qemu,
            ours,
            bin,
        }
    }

    /// Runs our `tool` only, with the arguments `args(dir)` in our directory (for what QEMU's
    /// tools would never finish: they follow some backing loops for ever).
    fn run_ours(&self, tool: &str, args: impl Fn(&str) -> Vec<String>) -> Run {
        let d = self.ours.display().to_string();
        let args = args(&d);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let program = self.bin.join(tool).display().to_string();
        Run::of(&run_in(&self.ours, &program, &args), &d)
    }

    /// Runs `tool` with the arguments `args(dir)` in each directory; the outputs with the
    /// directory written `DIR`: (QEMU's, ours).
    fn run(&self, tool: &str, args: impl Fn(&str) -> Vec<String>) -> (Run, Run) {
        let one = |dir: &Path, program: String| {
            let d = dir.display().to_string();
            let args = args(&d);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Run::of(&run_in(dir, &program, &args), &d)
        };
        (
            one(&self.qemu, tool.to_string()),
            one(&self.ours, self.bin.join(tool).display().to_string()),
        )
    }
}

/// One run's exit code and output, the scratch directory written `DIR`, timings dropped.
#[derive(Debug, PartialEq)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: &Output, dir: &str) -> Self {
        let clean = |text: String| without_timing(&text.replace(dir, "DIR"));
        Self {
            code: code(out),
            stdout: clean(stdout(out)),
            stderr: clean(stderr(out)),
        }
    }

    /// The lines of `qemu-img info` both tools print alike: the format-specific section
    /// (QED has one only here), disk sizes and child nodes are left out, `json:` names
    /// filtered as QEMU's iotests filter them (QEMU orders their keys by its hash table).
    fn info_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut skipping = false;
        for line in self.stdout.lines() {
            if line.starts_with("Format specific information:") || line.starts_with("Child node") {
                skipping = true;
            } else if !line.starts_with(' ') {
                skipping = false;
            }
            if skipping || line.starts_with("disk size:") || line.starts_with("cluster_size:") {
                continue;
            }
            lines.push(match line.split_once("json:{") {
                Some((head, _)) => format!("{head}json:{{ /* filtered */ }}"),
                None => line.to_string(),
            });
        }
        lines
    }
}

/// The arguments of one case, given the scratch directory.
type Args = Box<dyn Fn(&str) -> Vec<String>>;

fn words(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn info_names_images_as_qemu_img_does() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    let names: Vec<Args> = vec![
        Box::new(|d| {
            vec![
                "info".into(),
                format!(
                    "json:{{'driver':'qed','file':{{'driver':'file','filename':'{d}/top.qed'}}}}"
                ),
            ]
        }),
        Box::new(|_| {
            words(&[
                "info",
                "json:{\"driver\":\"qed\",\"file.filename\":\"top.qed\"}",
            ])
        }),
        Box::new(|_| words(&["info", "file:image:top.qed"])),
        Box::new(|d| words(&["info", &format!("{d}/image:top.qed")])),
        Box::new(|d| {
            vec![
                "info".into(),
                "--backing-chain".into(),
                "--image-opts".into(),
                format!("driver=qed,file.driver=file,file.filename={d}/top.qed"),
            ]
        }),
        Box::new(|d| {
            vec![
                "info".into(),
                format!(
                    "json:{{'driver':'qed','file':{{'driver':'blkdebug','image':{{'driver':\
                     'file','filename':'{d}/top.qed'}},'set-state':[{{'event':'read_aio',\
                     'new_state':42}}]}}}}"
                ),
            ]
        }),
        Box::new(|d| {
            vec![
                "info".into(),
                format!(
                    "json:{{'driver':'qed','file':{{'driver':'quorum','vote-threshold':1,\
                     'children':[{{'driver':'file','filename':'{d}/top.qed'}},{{'driver':\
                     'file','filename':'{d}/copy.qed'}}]}}}}"
                ),
            ]
        }),
        Box::new(|_| {
            words(&[
                "info",
                "json:{'driver':'qed','file.filename':'top.qed','backing':null}",
            ])
        }),
    ];
    for args in &names {
        let (qemu, ours) = pair.run("qemu-img", args);
        assert_eq!(
            qemu.code,
            ours.code,
            "{:?}\n{qemu:?}\n{ours:?}",
            args("DIR")
        );
        assert_eq!(qemu.info_lines(), ours.info_lines(), "{:?}", args("DIR"));
        assert_eq!(qemu.stderr, ours.stderr, "{:?}", args("DIR"));
    }
}

#[test]
fn map_compare_and_convert_take_every_kind_of_name() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    let json = |d: &str| {
        format!("json:{{'driver':'qed','file':{{'driver':'file','filename':'{d}/top.qed'}}}}")
    };
    let opts = |d: &str| format!("driver=qed,file.filename={d}/top.qed");
    let cases: Vec<Args> = vec![
        Box::new(move |d| vec!["map".into(), "--output=json".into(), json(d)]),
        Box::new(move |d| {
            vec![
                "map".into(),
                "--output=json".into(),
                "--image-opts".into(),
                opts(d),
            ]
        }),
        Box::new(|_| words(&["map", "--output=json", "file:image:top.qed"])),
        Box::new(move |d| vec!["compare".into(), json(d), "file:image:top.qed".into()]),
        Box::new(move |d| {
            vec![
                "compare".into(),
                "--image-opts".into(),
                opts(d),
                format!("driver=qed,file.filename={d}/base.qed"),
            ]
        }),
        Box::new(move |d| {
            vec![
                "convert".into(),
                "-O".into(),
                "qed".into(),
                json(d),
                "file:out:1.qed".into(),
            ]
        }),
        Box::new(|_| words(&["compare", "-f", "qed", "-F", "qed", "top.qed", "out:1.qed"])),
        Box::new(|_| words(&["convert", "top.qed", "nosuch:out.raw"])),
        Box::new(|_| words(&["create", "-f", "qed", "file:x:y.qed", "1M"])),
        Box::new(|_| words(&["create", "-f", "qed", "a:b.qed", "1M"])),
        Box::new(move |d| {
            vec![
                "check".into(),
                "-f".into(),
                "qed".into(),
                "--image-opts".into(),
                opts(d),
            ]
        }),
    ];
    for args in &cases {
        let (qemu, ours) = pair.run("qemu-img", args);
        assert_eq!(qemu, ours, "{:?}", args("DIR"));
    }
}

#[test]
fn bad_names_fail_in_qemu_words() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    for name in [
        "json:{",
        "json:",
        "json:[1]",
        "json:{'driver':'qed'}",
        "json:{'driver':'qed','file':{'driver':'file'}}",
        "json:{'driver':'qed','file':'top.qed'}",
        "json:{'driver':'nosuch','file':'top.qed'}",
        "json:{'filename':'top.qed'}",
        "json:{'driver':'qed','file':{'driver':'file','filename':'top.qed'}, 'x':1}",
        "json:{'driver':'qed','file':{'driver':'file','filename':'top.qed', 'y':1}}",
        "json:{'driver':'qed','file':{'driver':'file','filename':'top.qed'},'backing':{'driver':'raw','file':{'driver':'file','filename':'base.qed'}}}",
        "json:{'driver':'qed' 'file':1}",
        "json:{'driver':'qed','file':{'driver':'file','filename':'top.qed'}}junk",
        "a:b.qed",
        "file:",
    ] {
        let (qemu, ours) = pair.run("qemu-img", |_| words(&["info", name]));
        assert_eq!(qemu, ours, "{name}");
    }
    for args in [
        &["map", "--output=json", "--image-opts", "top.qed"][..],
        &["info", "--image-opts", "driver=qed,file.filename=top.qed,y"],
        &["info", "-f", "qed", "--image-opts", "driver=qed"],
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=qed,file.filename=c,,d.qed",
        ],
    ] {
        let (qemu, ours) = pair.run("qemu-img", |_| words(args));
        assert_eq!(qemu, ours, "{args:?}");
    }
}

#[test]
fn qemu_io_opens_protocol_nodes_filters_and_formats_over_formats() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    // A QED image whose file is the guest view of another (QEMU's iotest 072).
    for dir in [&pair.qemu, &pair.ours] {
        run_ok(
            dir,
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qed", "base.qed", "nest.qed"],
        );
    }
    let cases: Vec<Args> = vec![
        Box::new(|d| words(&["-c", &format!("open -r -o driver=file,filename={d}/adir")])),
        Box::new(|d| words(&["-c", &format!("open -o driver=file,filename={d}/adir")])),
        Box::new(|d| {
            words(&[
                "-c",
                &format!("open -r -o driver=host_device,filename={d}/adir"),
            ])
        }),
        Box::new(|_| {
            words(&[
                "-c",
                "open -r -o driver=file,filename=/dev/null,locking=off",
            ])
        }),
        Box::new(|_| {
            words(&[
                "-c",
                "open -o driver=host_device,filename=/dev/null,locking=off",
            ])
        }),
        Box::new(|d| {
            words(&[
                "-c",
                &format!("open -o driver=qed,file.driver=qed,file.file.filename={d}/nest.qed"),
                "-c",
                "read -P 0x11 0 64k",
                "-c",
                "read -P 0x22 1M 8k",
            ])
        }),
        Box::new(|d| {
            words(&[
                "-c",
                &format!("open -o driver=qed,file.align=4k blkdebug::{d}/top.qed"),
                "-c",
                "write -P 0x44 0x200 0x400",
                "-c",
                "write -z 0x20200 0x200",
                "-c",
                "read -P 0x44 0x200 0x400",
                "-c",
                "read -P 0x33 64k 0x200",
                "-c",
                "read -P 0 0x20200 0x200",
                "-c",
                "read -P 0x33 0x20400 0x200",
            ])
        }),
        Box::new(|d| {
            words(&[
                "--image-opts",
                "-c",
                "read -P 0x33 64k 64k",
                &format!("driver=qed,file.driver=file,file.filename={d}/copy.qed"),
            ])
        }),
        Box::new(|d| {
            words(&[
                "-c",
                "read -P 0x11 0 64k",
                &format!("json:{{'driver':'qed','file':{{'driver':'file','filename':'{d}/copy.qed'}},'backing':''}}"),
            ])
        }),
        Box::new(|_| {
            words(&[
                "-c",
                "read 0 512",
                "json:{'driver':'qed','file.filename':'copy.qed','read-only':true}",
            ])
        }),
        Box::new(|_| {
            words(&[
                "-c",
                "read 0 512",
                "json:{'driver':'qed','file.filename':'copy.qed','backing':'nonode'}",
            ])
        }),
    ];
    for args in &cases {
        let (qemu, ours) = pair.run("qemu-io", args);
        assert_eq!(qemu, ours, "{:?}", args("DIR"));
    }
}

#[test]
fn convert_salvages_what_blkdebug_fails() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    // Errors above the format (block status and reads), as QEMU's iotest 251 injects them.
    let source = |d: &str| {
        let mut rules = Vec::new();
        for sector in [2048 + 16, 4100] {
            rules.push(format!(
                "{{'event':'none','iotype':'block-status','errno':5,'sector':{sector}}}"
            ));
        }
        for sector in [130, 4100, 6000, 6001, 6002] {
            rules.push(format!(
                "{{'event':'none','iotype':'read','errno':5,'sector':{sector}}}"
            ));
        }
        format!(
            "json:{{'driver':'blkdebug','image':{{'driver':'qed','file':{{'driver':'file',\
             'filename':'{d}/top.qed'}}}},'inject-error':[{}]}}",
            rules.join(",")
        )
    };
    let (qemu, ours) = pair.run("qemu-img", |d| {
        vec![
            "convert".into(),
            "--salvage".into(),
            source(d),
            "out.raw".into(),
        ]
    });
    assert_eq!(qemu, ours);
    assert!(
        ours.stderr
            .contains("warning: error while reading offset 66560"),
        "{ours:?}"
    );
    let (qemu, ours) = pair.run("qemu-img", |d| {
        vec!["convert".into(), source(d), "fail.raw".into()]
    });
    assert_eq!(qemu, ours);
    let (qemu, ours) = pair.run("qemu-img", |d| {
        vec![
            "convert".into(),
            "-q".into(),
            "--salvage".into(),
            source(d),
            "quiet.raw".into(),
        ]
    });
    assert_eq!(qemu, ours);
    // The salvaged copies are the same.
    let out = run_in(
        &pair.ours,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "out.raw",
            &pair.qemu.join("out.raw").display().to_string(),
        ],
    );
    assert_eq!(code(&out), 0, "{}", stdout(&out));
}

#[test]
fn backing_files_named_in_json_syntax_open_and_take_commits() {
    if !have_qemu() {
        return;
    }
    let pair = Pair::new();
    // The base over blkdebug, as QEMU's iotest 020 names it; `rule` is its inject-error list.
    let named = |d: &str, rule: &str| {
        format!(
            "json:{{'driver': 'qed', 'file': {{ 'driver': 'blkdebug', 'inject-error': \
             [{rule}], 'image': {{ 'driver': 'file', 'filename': '{d}/base.qed' }}}}}}"
        )
    };
    let failing = "{ 'event': 'write_aio', 'errno': 28, 'once': true }";
    let cases: Vec<(&str, Args)> = vec![
        (
            "qemu-img",
            Box::new(move |d| {
                let mut args = words(&["create", "-f", "qed", "-b"]);
                args.push(named(d, failing));
                args.extend(words(&["-F", "qed", "failing.qed", "4M"]));
                args
            }),
        ),
        // Reads fall through to the base named in json: syntax.
        (
            "qemu-io",
            Box::new(|_| {
                words(&[
                    "-c",
                    "read -P 0x11 0 64k",
                    "-c",
                    "read -P 0x22 1M 8k",
                    "-c",
                    "write -P 0x44 2M 64k",
                    "failing.qed",
                ])
            }),
        ),
        (
            "qemu-img",
            Box::new(|_| words(&["compare", "-f", "qed", "failing.qed", "top.qed"])),
        ),
        // The first write into the base fails with ENOSPC.
        ("qemu-img", Box::new(|_| words(&["commit", "failing.qed"]))),
        (
            "qemu-img",
            Box::new(move |d| {
                let mut args = words(&["create", "-q", "-f", "qed", "-b"]);
                args.push(format!(
                    "json:{{'driver': 'qed', 'file': {{'driver': 'file', 'filename': \
                     '{d}/base.qed'}}}}"
                ));
                args.extend(words(&["-F", "qed", "plain.qed", "4M"]));
                args
            }),
        ),
        (
            "qemu-io",
            Box::new(|_| words(&["-c", "write -P 0x55 3M 64k", "plain.qed"])),
        ),
        ("qemu-img", Box::new(|_| words(&["commit", "plain.qed"]))),
        (
            "qemu-io",
            Box::new(|_| words(&["-c", "read -P 0x55 3M 64k", "base.qed"])),
        ),
    ];
    // A file named inside that is missing, and an option blkdebug does not take.
    for backing in [
        "json:{'driver': 'qed', 'file': {'driver': 'file', 'filename': 'nothere.qed'}}".to_string(),
        named("DIR", ""),
    ] {
        let (qemu, ours) = pair.run("qemu-img", |_| {
            let mut args = words(&["create", "-f", "qed", "-b"]);
            args.push(backing.clone());
            args.extend(words(&["-F", "qed", "bad.qed", "4M"]));
            args
        });
        assert_eq!(qemu, ours);
        assert_eq!(ours.code, 1);
    }
    for (tool, args) in &cases {
        let (qemu, ours) = pair.run(tool, args);
        assert_eq!(qemu, ours, "{tool} {:?}", args("DIR"));
    }
    // A json: name over a plain file is that file, in info and map.
    let (_, ours) = pair.run("qemu-img", |d| {
        let mut args = words(&["create", "-q", "-f", "qed", "-F", "qed", "-b"]);
        args.push(format!(
            "json:{{'driver': 'qed', 'file': {{'driver': 'file', 'filename': '{d}/base.qed'}}}}"
        ));
        args.push("named.qed".into());
        args
    });
    assert_eq!(ours.code, 0, "{ours:?}");
    for args in [
        words(&["info", "--backing-chain", "named.qed"]),
        words(&["map", "named.qed"]),
    ] {
        let (qemu, ours) = pair.run("qemu-img", |_| args.clone());
        assert_eq!(qemu.info_lines(), ours.info_lines(), "{args:?}");
        assert!(ours.stdout.contains("DIR/base.qed"), "{ours:?}");
    }
    // A safe rebase onto a json: name keeps what the image reads.
    let rebase_cases: Vec<(&str, Args)> = vec![
        (
            "qemu-img",
            Box::new(|_| words(&["create", "-q", "-f", "qed", "base2.qed", "4M"])),
        ),
        (
            "qemu-img",
            Box::new(|d| {
                let mut args = words(&["rebase", "-F", "qed", "-b"]);
                args.push(format!(
                    "json:{{'driver': 'qed', 'file': {{'driver': 'file', 'filename': \
                     '{d}/base2.qed'}}}}"
                ));
                args.push("named.qed".into());
                args
            }),
        ),
        (
            "qemu-io",
            Box::new(|_| {
                words(&[
                    "-c",
                    "read -P 0x11 0 64k",
                    "-c",
                    "read -P 0x22 1M 8k",
                    "named.qed",
                ])
            }),
        ),
        (
            "qemu-img",
            Box::new(|_| words(&["compare", "named.qed", "base.qed"])),
        ),
    ];
    for (tool, args) in &rebase_cases {
        let (qemu, ours) = pair.run(tool, args);
        assert_eq!(qemu, ours, "{tool} {:?}", args("DIR"));
        assert_eq!(ours.code, 0, "{ours:?}");
    }
    // Loops through json: names are found, not followed for ever (qemu-img map follows the
    // first for ever, and qemu-img commit the second: ours only).
    let own = |d: &str, file: &str| {
        format!("json:{{'driver': 'qed', 'file': {{'driver': 'file', 'filename': '{d}/{file}'}}}}")
    };
    for image in ["a.qed", "x.qed", "y.qed", "t.qed"] {
        let ours = pair.run_ours("qemu-img", |_| {
            words(&["create", "-q", "-f", "qed", image, "1M"])
        });
        assert_eq!(ours.code, 0, "{ours:?}");
    }
    let loops = [
        ("a.qed", "a.qed"),
        ("x.qed", "y.qed"),
        ("y.qed", "x.qed"),
        ("t.qed", "x.qed"),
    ];
    for (image, backing) in loops {
        let ours = pair.run_ours("qemu-img", |d| {
            let mut args = words(&["rebase", "-u", "-F", "qed", "-b"]);
            args.push(own(d, backing));
            args.push(image.into());
            args
        });
        assert_eq!(ours.code, 0, "{ours:?}");
    }
    for image in ["a.qed", "x.qed"] {
        for args in [
            words(&["map", image]),
            words(&["info", "--backing-chain", image]),
            words(&["convert", "-O", "raw", image, "out.raw"]),
        ] {
            let ours = pair.run_ours("qemu-img", |_| args.clone());
            assert_eq!(ours.code, 1, "{args:?}: {ours:?}");
            assert!(
                ours.stderr.contains("creates an infinite loop"),
                "{args:?}: {ours:?}"
            );
        }
    }
    // commit walks the layers one by one, each opened alone: a loop below the top ends at
    // the depth limit, one back to the top at its lock.
    let ours = pair.run_ours("qemu-img", |_| words(&["commit", "-b", "nothere", "t.qed"]));
    assert_eq!(ours.code, 1, "{ours:?}");
    assert!(ours.stderr.contains("Did not find 'nothere'"), "{ours:?}");
    let ours = pair.run_ours("qemu-img", |_| words(&["commit", "-b", "nothere", "x.qed"]));
    assert_eq!(ours.code, 1, "{ours:?}");
    assert!(ours.stderr.contains("lock"), "{ours:?}");
    // Both bases are clean (qed adds `Image end offset`).
    let (qemu, ours) = pair.run("qemu-img", |_| words(&["check", "base.qed"]));
    assert_eq!((qemu.code, ours.code), (0, 0), "{qemu:?} {ours:?}");
    assert!(ours.stdout.starts_with(&qemu.stdout), "{qemu:?} {ours:?}");
}
