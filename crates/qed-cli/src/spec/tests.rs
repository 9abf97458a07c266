use super::*;

fn spec(name: &str) -> Result<ImageSpec, String> {
    ImageSpec::parse(Some(OsStr::new(name)), Options::default(), None)
}

fn opts(text: &str) -> Result<ImageSpec, String> {
    ImageSpec::from_arg(OsStr::new(text), true, None)
}

fn file_of(spec: &ImageSpec) -> &FileNode {
    match &spec.node {
        Node::Format(FormatNode { file, .. }) => match &**file {
            Node::File(f) => f,
            other => panic!("not a file: {other:?}"),
        },
        other => panic!("not a format: {other:?}"),
    }
}

#[test]
fn plain_names_and_file_prefixes() {
    let s = spec("dir/a:b.qed").unwrap();
    assert_eq!(s.plain(), Some((Path::new("dir/a:b.qed"), None)));
    assert_eq!(s.display_name(), "dir/a:b.qed");
    assert_eq!(s.dirname(), Some(PathBuf::from("dir/")));
    // A protocol-looking rest gets ./ in front, as QEMU does.
    let s = spec("file:image:top.qed").unwrap();
    assert_eq!(s.plain(), Some((Path::new("./image:top.qed"), None)));
    assert_eq!(s.display_name(), "./image:top.qed");
    assert_eq!(s.dirname(), Some(PathBuf::from("./")));
    assert_eq!(
        spec("file:/x/a:b.qed").unwrap().display_name(),
        "/x/a:b.qed"
    );
    assert_eq!(spec("t.qed").unwrap().dirname(), Some(PathBuf::new()));
    assert_eq!(spec("a:b.qed").unwrap_err(), "Unknown protocol 'a'");
    assert_eq!(
        spec("file:").unwrap_err(),
        "The 'file' block driver requires a file name"
    );
    let s = ImageSpec::parse(Some(OsStr::new("x.img")), Options::default(), Some("raw")).unwrap();
    assert_eq!(
        s.plain(),
        Some((Path::new("x.img"), Some(ImageFormat::Raw)))
    );
}

#[test]
fn json_names_nest_and_flatten() {
    let s = spec("json:{'driver':'qed','file':{'driver':'file','filename':'/d/t.qed'}}").unwrap();
    assert_eq!(
        s.plain(),
        Some((Path::new("/d/t.qed"), Some(ImageFormat::Qed)))
    );
    assert_eq!(s.display_name(), "/d/t.qed");
    // Dotted keys are the same as nesting.
    let s = spec("json:{'driver':'qed','file.filename':'t.qed'}").unwrap();
    assert_eq!(
        s.plain(),
        Some((Path::new("t.qed"), Some(ImageFormat::Qed)))
    );
    // A file name given in options is never parsed for a protocol.
    let s = spec("json:{'file':{'filename':'a:b'}}").unwrap();
    assert_eq!(s.plain(), Some((Path::new("a:b"), None)));
    let s = spec(r#"json:{"driver": "qed", "file": {"driver": "file", "filename": "t.qed", "locking": false}, "backing": null}"#).unwrap();
    assert!(s.no_backing());
    assert_eq!(file_of(&s).locking.as_deref(), Some("off"));
    // Explicit options win over the name's.
    let s = ImageSpec::parse(
        Some(OsStr::new("json:{'driver':'raw','file.filename':'t.qed'}")),
        Options::default(),
        Some("qed"),
    )
    .unwrap();
    assert_eq!(
        s.plain(),
        Some((Path::new("t.qed"), Some(ImageFormat::Qed)))
    );
}

#[test]
fn errors_in_qemu_words() {
    for (name, why) in [
        ("json:{", "Could not parse the JSON options: JSON parse error, premature EOI"),
        ("json:", "Could not parse the JSON options: Expecting a JSON value"),
        ("json:[1]", "Invalid JSON object given"),
        ("json:{'driver':'qed'}", "A block device must be specified for \"file\""),
        (
            "json:{'driver':'qed','file':{'driver':'file'}}",
            "The 'file' block driver requires a file name",
        ),
        (
            "json:{'driver':'qed','file':{'driver':'file','filename':1}}",
            "The 'file' block driver requires a file name",
        ),
        (
            "json:{'driver':'qed','file':'t.qed'}",
            "Cannot find device='t.qed' nor node-name='t.qed'",
        ),
        ("json:{'driver':'foo','file':'t.qed'}", "Unknown driver 'foo'"),
        ("json:{'filename':'t.qed'}", "Must specify either driver or file"),
        ("json:{'a':'b'}", "Must specify either driver or file"),
        ("json:{'driver':1}", "Must specify either driver or file"),
        (
            "json:{'driver':'qed','file':{'driver':'file','filename':'t',}}",
            "Could not parse the JSON options: JSON parse error, expecting value",
        ),
        (
            "json:{'driver':'quorum','children':[{'driver':'file','filename':'a'}]}",
            "Parameter 'vote-threshold' expects a value >= 1",
        ),
        (
            "json:{'driver':'quorum','vote-threshold':2,'children':[{'driver':'file','filename':'a'}]}",
            "threshold may not exceed children count",
        ),
        ("blkdebug:x", "blkdebug requires both config file and image path"),
        (
            "json:{'driver':'blkdebug','image.filename':'a','align':3}",
            "Cannot meet constraints with align 3",
        ),
    ] {
        assert_eq!(spec(name).unwrap_err(), why, "{name}");
    }
}

#[test]
fn unknown_options_are_kept_for_after_the_open() {
    let s =
        spec("json:{'driver':'qed','file':{'driver':'file','filename':'t.qed'},'x':[1]}").unwrap();
    match &s.node {
        Node::Format(f) => assert_eq!(f.unknown.as_deref(), Some("x.0")),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.plain(), None);
    let s =
        spec("json:{'driver':'qed','file':{'driver':'file','filename':'t.qed','y':1}}").unwrap();
    assert_eq!(file_of(&s).unknown.as_deref(), Some("y"));
    // Options every node takes are not unknown.
    let s = opts("driver=qed,file.filename=t.qed,read-only=on,cache.direct=off").unwrap();
    assert!(s.plain().is_some());
    assert_eq!(
        s.options.0.get("read-only"),
        Some(&Value::String("on".into()))
    );
}

#[test]
fn option_strings_as_qemu_opts_reads_them() {
    let (pairs, warnings) = parse_option_string("driver=qed,file.filename=a,,b,x,noy", None);
    assert_eq!(
        pairs,
        vec![
            ("driver".to_string(), "qed".to_string()),
            ("file.filename".into(), "a,b".into()),
            ("x".into(), "on".into()),
            ("y".into(), "off".into()),
        ]
    );
    assert_eq!(
        warnings,
        vec![
            "warning: short-form boolean option 'x' deprecated\nPlease use x=on instead"
                .to_string(),
            "warning: short-form boolean option 'noy' deprecated\nPlease use y=off instead".into(),
        ]
    );
    // qemu-img's --image-opts: a first bare word is the file.
    assert_eq!(
        opts("t.qed").unwrap_err(),
        "Cannot find device='t.qed' nor node-name='t.qed'"
    );
    let s = opts("driver=qed,file.driver=file,file.filename=/d/t.qed").unwrap();
    assert_eq!(
        s.given,
        "driver=qed,file.driver=file,file.filename=/d/t.qed"
    );
    assert_eq!(s.display_name(), "/d/t.qed");
    assert_eq!(
        ImageSpec::from_arg(OsStr::new("driver=qed"), true, Some(ImageFormat::Qed)).unwrap_err(),
        "--image-opts and --format are mutually exclusive"
    );
}

#[test]
fn blkdebug_and_quorum_trees() {
    let s = ImageSpec::parse(
        Some(OsStr::new("blkdebug::/d/t.qed")),
        Options::from_pairs([("driver", "qed"), ("file.align", "4k")]),
        None,
    )
    .unwrap();
    let Node::Format(f) = &s.node else {
        panic!("{s:?}")
    };
    let Node::Blkdebug(b) = &*f.file else {
        panic!("{s:?}")
    };
    assert_eq!(b.align, 4096);
    assert!(matches!(&*b.image, Node::File(file) if file.filename == Path::new("/d/t.qed")));
    assert_eq!(s.plain(), None);
    assert!(s.display_name().starts_with("json:{"));
    assert_eq!(s.dirname(), Some(PathBuf::from("/d/")));

    let s = spec(
        "json:{'driver':'blkdebug','image':{'driver':'qed','file':{'driver':'file',\
         'filename':'o'}},'inject-error':[{'event':'none','iotype':'block-status','errno':5,\
         'sector':3},{'event':'none','iotype':'read','once':true}]}",
    )
    .unwrap();
    let Node::Blkdebug(b) = &s.node else {
        panic!("{s:?}")
    };
    assert!(matches!(&*b.image, Node::Format(_)));
    assert_eq!(b.rules.len(), 2);
    assert_eq!(
        b.rules[0].action,
        Action::Inject(Injection {
            iotypes: IoTypes::only(IoType::BlockStatus),
            errno: 5,
            offset: Some(1536),
            once: false,
        })
    );
    assert_eq!(
        b.rules[1].action,
        Action::Inject(Injection {
            iotypes: IoTypes::only(IoType::Read),
            errno: EIO,
            offset: None,
            once: true,
        })
    );

    let s = spec(
        "json:{'driver':'qed','file':{'driver':'quorum','vote-threshold':1,'children':\
         [{'driver':'file','filename':'/a/x'},{'driver':'file','filename':'/b/y'}]}}",
    )
    .unwrap();
    assert_eq!(s.dirname(), None);
    assert!(s.display_name().starts_with("json:{\"driver\": \"qed\""));
    let Node::Format(f) = &s.node else {
        panic!("{s:?}")
    };
    assert!(matches!(&*f.file, Node::Quorum(q) if q.children.len() == 2 && q.threshold == 1));
}

#[test]
fn protocol_nodes_alone_and_backing_overrides() {
    let s = opts("driver=file,filename=/d/x").unwrap();
    assert!(matches!(&s.node, Node::File(f) if f.driver == FileDriver::File));
    assert_eq!(s.display_name(), "/d/x");
    let s = opts("driver=host_device,filename=/dev/null,locking=off").unwrap();
    assert!(matches!(&s.node, Node::File(f) if f.driver == FileDriver::HostDevice));
    let s = spec("json:{'driver':'qed','file.filename':'t','backing':''}").unwrap();
    assert!(s.no_backing());
    assert_eq!(s.warnings.len(), 1);
    let s = spec("json:{'driver':'qed','file.filename':'t','backing':{'driver':'raw','file':{'driver':'file','filename':'r'}}}").unwrap();
    assert!(matches!(&s.node, Node::Format(f) if matches!(f.backing, BackingSpec::Node(_))));
    assert_eq!(s.plain(), None);
}
