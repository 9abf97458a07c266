//! `qed info` reports what `qemu-img info` reports, plus a truthful dirty flag and a QED
//! `format-specific` object.

mod common;

use common::*;
use serde_json::Value;

/// Images QEMU cannot open (on purpose or through its bugs).
const QEMU_REFUSES: &[&str] = &["table-size-1.qed", "unknown-feature.qed"];

/// Removes what differs on purpose: our `format-specific` for QED and the dirty flag.
fn common_fields(mut v: Value) -> Value {
    match &mut v {
        Value::Array(items) => {
            for item in items.iter_mut() {
                *item = common_fields(item.take());
            }
        }
        Value::Object(map) => {
            if map.get("format") == Some(&Value::from("qed")) {
                map.remove("format-specific");
            }
            map.remove("dirty-flag");
        }
        _ => {}
    }
    v
}

/// Human output without what we add on purpose: the QED `Format specific information:`
/// block and `cleanly shut down: no`.
fn without_additions(text: &str) -> String {
    let mut skip = false;
    text.lines()
        .filter(|line| {
            if *line == "Format specific information:" {
                skip = true;
                return false;
            }
            if skip && line.starts_with("    ") {
                return false;
            }
            skip = false;
            *line != "cleanly shut down: no"
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", stdout(out), stderr(out)))
}

#[test]
fn json_matches_qemu_img_on_fixtures() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    for image in images(dir) {
        if QEMU_REFUSES.contains(&image.as_str()) {
            continue;
        }
        for chain in [false, true] {
            let mut args = vec!["info", "--output", "json"];
            if chain {
                args.push("--backing-chain");
            }
            args.push(&image);
            let q = run_in(dir, "qemu-img", &args);
            let m = qed(dir, &args);
            assert_eq!(code(&q), 0, "qemu-img {args:?}: {}", stderr(&q));
            assert_eq!(code(&m), 0, "qed {args:?}: {}", stderr(&m));
            assert_eq!(common_fields(json(&q)), common_fields(json(&m)), "{args:?}");
        }
    }
}

#[test]
fn human_output_matches_qemu_img_but_for_additions() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let additions = without_additions;
    for image in images(dir) {
        if QEMU_REFUSES.contains(&image.as_str()) {
            continue;
        }
        let args = ["info", "--backing-chain", image.as_str()];
        let q = run_in(dir, "qemu-img", &args);
        let m = qed(dir, &args);
        assert_eq!(additions(&stdout(&q)), additions(&stdout(&m)), "{image}");
    }
}

#[test]
fn exact_json_layout() {
    if !have("qemu-img") {
        return;
    }
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    // Byte for byte once our one addition is cut out.
    for image in ["backing-base.raw", "chain-top.qed"] {
        let args = ["info", "--output=json", image];
        let q = stdout(&run_in(dir, "qemu-img", &args));
        let m = stdout(&qed(dir, &args));
        let start = m.find("    \"format-specific\": {\n        \"type\": \"qed\"");
        let m = match start {
            Some(start) => {
                let end = m[start..].find("\n    },\n").expect("end") + start + 8;
                format!("{}{}", &m[..start], &m[end..])
            }
            None => m,
        };
        assert_eq!(q, m, "{image}");
    }
}

#[test]
fn dirty_flag_and_format_specific_are_truthful() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let out = qed(dir, &["info", "--output", "json", "dirty-needcheck.qed"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["dirty-flag"], Value::Bool(true));
    assert_eq!(v["format-specific"]["type"], "qed");
    assert_eq!(v["format-specific"]["data"]["features"], 2);
    assert_eq!(v["format-specific"]["data"]["table-size"], 4);
    assert_eq!(v["format-specific"]["data"]["header-size"], 1);
    // Read-only inspection leaves the flag on disk.
    let bytes = std::fs::read(dir.join("dirty-needcheck.qed")).expect("image");
    assert_eq!(bytes[16], 0x2);
    let out = qed(dir, &["info", "dirty-needcheck.qed"]);
    assert!(stdout(&out).contains("\ncleanly shut down: no\n"));

    let v = json(&qed(
        dir,
        &["info", "--output", "json", "unknown-compat-autoclear.qed"],
    ));
    assert_eq!(v["format-specific"]["data"]["compat-features"], 1);
    assert_eq!(v["format-specific"]["data"]["autoclear-features"], 16);
    assert_eq!(v["dirty-flag"], Value::Bool(false));

    // Spec-valid though QEMU refuses it.
    let v = json(&qed(dir, &["info", "--output=json", "table-size-1.qed"]));
    assert_eq!(v["format-specific"]["data"]["table-size"], 1);
    assert_eq!(v["virtual-size"], 1 << 20);
}

#[test]
fn raw_and_forced_formats() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let v = json(&qed(dir, &["info", "--output=json", "backing-base.raw"]));
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual-size"], 262144);
    assert!(v.get("cluster-size").is_none());
    let v = json(&qed(
        dir,
        &["info", "-f", "raw", "--output=json", "basic-64k.qed"],
    ));
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual-size"], 917504);
    let out = qed(dir, &["info", "-f", "qed", "backing-base.raw"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).starts_with("qed: Could not open 'backing-base.raw': "));
    let out = qed(dir, &["info", "-U", "--output=json", "basic-64k.qed"]);
    assert_eq!(code(&out), 0);
}

#[test]
fn backing_chain_lists_every_layer() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let v = json(&qed(
        dir,
        &["info", "--backing-chain", "--output=json", "chain-top.qed"],
    ));
    let layers = v.as_array().expect("array");
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0]["filename"], "chain-top.qed");
    assert_eq!(layers[0]["backing-filename"], "chain-base.qed");
    assert_eq!(layers[1]["filename"], "chain-base.qed");
    assert_eq!(layers[1]["format"], "qed");
    let text = stdout(&qed(
        dir,
        &["info", "--backing-chain", "backing-overlay.qed"],
    ));
    assert!(
        text.contains("\n\nimage: backing-base.raw\nfile format: raw\n"),
        "{text}"
    );
    // Without --backing-chain the backing file is not opened at all.
    std::fs::remove_file(dir.join("chain-base.qed")).expect("remove");
    let out = qed(dir, &["info", "chain-top.qed"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = qed(dir, &["info", "--backing-chain", "chain-top.qed"]);
    assert_eq!(code(&out), 1);
}

#[test]
fn errors_name_the_problem() {
    let Some(dir) = fixtures() else { return };
    let dir = dir.path();
    let out = qed(dir, &["info", "unknown-feature.qed"]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.starts_with("qed: Could not open 'unknown-feature.qed': "),
        "{err}"
    );
    // QEMU's words, as qemu-img prints them.
    assert!(err.ends_with(": Unsupported QED features: 8\n"), "{err}");
    let out = qed(dir, &["info", "missing.qed"]);
    assert_eq!(code(&out), 1);
    assert_eq!(
        stderr(&out),
        "qed: Could not open 'missing.qed': Could not open 'missing.qed': No such file or \
         directory\n"
    );
    let out = qed(dir, &["info", "--output", "xml", "basic-64k.qed"]);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).starts_with("qed: "), "{}", stderr(&out));
}

#[test]
fn backing_chains_as_qemu_img_shows_them() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    make_chain(dir);
    // Three layers down to a raw file, and a chain reached through a relative name in another
    // directory; each layer printed in turn, blank lines between them, or a JSON array.
    for image in ["top.qed", "mid.qed", "sub/deep.qed", "base.raw"] {
        let args = ["info", "--backing-chain", image];
        let q = run_ok(dir, "qemu-img", &args);
        let m = qed(dir, &args);
        assert_eq!(code(&m), 0, "{}", stderr(&m));
        assert_eq!(
            without_additions(&stdout(&q)),
            without_additions(&stdout(&m)),
            "{image}"
        );
        let args = ["info", "--backing-chain", "--output=json", image];
        let q = run_ok(dir, "qemu-img", &args);
        let m = qed(dir, &args);
        assert_eq!(common_fields(json(&q)), common_fields(json(&m)), "{image}");
    }
}
