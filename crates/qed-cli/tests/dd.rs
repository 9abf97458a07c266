//! `qemu-img dd` and `qed` invoked as `qemu-img` agree: messages, exit codes, and outputs of
//! the same size and contents (ours sparse, so never larger); every QED output is clean.

mod common;

use common::*;

#[test]
fn same_results_as_qemu_img() {
    if !have_qemu() {
        return;
    }
    let twins = Twins::new(|dir| {
        make_chain(dir);
        made_images(dir);
    });
    let cases: &[(&[&str], Option<&str>)] = &[
        // (arguments, the output made)
        (&["if=top.qed", "of=out.raw"], Some("out.raw")),
        (&["-O", "qed", "if=top.qed", "of=out.qed"], Some("out.qed")),
        // Options after the operands, as QEMU's tests write them (getopt permutes).
        (
            &["if=top.qed", "of=late.qed", "bs=5", "-O", "qed"],
            Some("late.qed"),
        ),
        (
            &[
                "-O",
                "qed",
                "if=top.qed",
                "of=out.qed",
                "bs=64k",
                "count=3",
                "skip=1",
            ],
            Some("out.qed"),
        ),
        (
            &[
                "-O",
                "qed",
                "if=top.qed",
                "of=out.qed",
                "bs=1000",
                "count=1",
            ],
            Some("out.qed"),
        ),
        (
            &["if=top.qed", "of=out.raw", "bs=1000", "count=1"],
            Some("out.raw"),
        ),
        (
            &["if=top.qed", "of=out.raw", "bs=4k", "skip=100", "count=300"],
            Some("out.raw"),
        ),
        (
            &["if=top.qed", "of=out.raw", "skip=100000"],
            Some("out.raw"),
        ),
        (&["if=top.qed", "of=out.raw", "count=0"], Some("out.raw")),
        (
            &["-f", "raw", "if=sparse.raw", "of=out.raw", "bs=1M"],
            Some("out.raw"),
        ),
        (&["-O", "qed", "if=odd.raw", "of=out.qed"], Some("out.qed")),
        (
            &[
                "-U",
                "-O",
                "qed",
                "if=sub/deep.qed",
                "of=sub/out.qed",
                "bs=64k",
                "skip=8",
            ],
            Some("sub/out.qed"),
        ),
        (
            &[
                "-O",
                "qed",
                "if=sparse-1g.qed",
                "of=out.qed",
                "bs=1M",
                "skip=290",
                "count=320",
            ],
            Some("out.qed"),
        ),
        (
            &["-O", "raw", "if=discarded.qed", "of=out.raw", "bs=64k"],
            Some("out.raw"),
        ),
        // Refused: no output is made.
        (&["if=top.qed", "of=out.raw", "bs=0"], None),
        (&["if=top.qed", "of=out.raw", "bs=2G"], None),
        (&["if=top.qed", "of=out.raw", "bs=1x"], None),
        (&["if=top.qed", "of=out.raw", "count=-1"], None),
        (&["if=top.qed", "of=out.raw", "foo=1"], None),
        (&["if=top.qed", "of=out.raw", "seek=1"], None),
        (&["if=top.qed", "of=out.raw", "junk"], None),
        (&["if=top.qed"], None),
        (&["of=out.raw"], None),
        (&["-O", "bogus", "if=top.qed", "of=out.raw"], None),
        (&["if=missing.qed", "of=out.raw"], None),
    ];
    for (args, made) in cases {
        // dd reads its input only: the outputs of the last case go, the inputs stay.
        for dir in [&twins.qemu, &twins.ours] {
            for out in ["out.raw", "out.qed", "sub/out.qed"] {
                let _ = std::fs::remove_file(dir.join(out));
            }
        }
        let mut full = vec!["dd"];
        full.extend_from_slice(args);
        let (q, o) = twins.run(&full);
        let check = if args.contains(&"if=missing.qed") {
            Stderr::Either
        } else {
            Stderr::Same
        };
        assert_same_run(&full, &q, &o, check);
        match made {
            None => {
                for dir in [&twins.qemu, &twins.ours] {
                    assert!(!dir.join("out.raw").exists(), "{full:?}: output made");
                }
            }
            Some(out) => {
                let (qf, of) = (twins.qemu.join(out), twins.ours.join(out));
                assert!(same_contents(&qf, &of), "{full:?}: outputs differ");
                if out.ends_with(".qed") {
                    assert_qemu_check_clean(&twins.ours, out);
                    let info = |dir: &std::path::Path| {
                        let o = run_ok(dir, "qemu-img", &["info", "--output=json", out]);
                        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                        v["virtual-size"].as_u64().unwrap()
                    };
                    assert_eq!(info(&twins.qemu), info(&twins.ours), "{full:?}: sizes");
                    assert!(
                        file_len(&twins.ours, out) <= file_len(&twins.qemu, out),
                        "{full:?}: our output is larger"
                    );
                } else {
                    assert_eq!(
                        file_len(&twins.qemu, out),
                        file_len(&twins.ours, out),
                        "{full:?}: lengths"
                    );
                }
            }
        }
    }
}
