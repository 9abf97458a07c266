//! Option parsing as glibc's `getopt` and `getopt_long` do it for qemu-io, on its command
//! line and inside its commands: options may be bundled (`-qv`), take their argument
//! attached or as the next word (`-P0x11`, `-P 0x11`), and may come after the operands; `--`
//! ends the options; long options may be abbreviated to a unique prefix (`--snap`).

/// An option the command does not know, or one missing its argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetoptError {
    /// `-x` is not an option of the command.
    Invalid(char),
    /// `-P` needs an argument and none followed.
    MissingArgument(char),
}

impl GetoptError {
    /// The message glibc prints (after `<command>: `).
    pub fn message(&self) -> String {
        match self {
            Self::Invalid(c) => format!("invalid option -- '{c}'"),
            Self::MissingArgument(c) => format!("option requires an argument -- '{c}'"),
        }
    }
}

/// Parsed words of one command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    /// Options in the order given, up to the first error; each with its argument if it takes
    /// one.
    pub options: Vec<(char, Option<String>)>,
    /// The first error, if any (options after it are not parsed).
    pub error: Option<GetoptError>,
    /// The words that are not options.
    pub operands: Vec<String>,
}

/// Parses `args` (without the command name) against `spec` (`"CP:qv"`: a letter followed by
/// `:` takes an argument).
pub fn getopt(args: &[String], spec: &str) -> Parsed {
    let takes_argument = |c: char| -> Option<bool> {
        let pos = spec.find(c).filter(|_| c != ':')?;
        Some(spec[pos + c.len_utf8()..].starts_with(':'))
    };
    let mut parsed = Parsed::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            parsed.operands.extend(words.by_ref().cloned());
            break;
        }
        let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) else {
            parsed.operands.push(word.clone());
            continue;
        };
        if parsed.error.is_some() {
            continue;
        }
        for (i, c) in cluster.char_indices() {
            match takes_argument(c) {
                None => {
                    parsed.error = Some(GetoptError::Invalid(c));
                    break;
                }
                Some(false) => parsed.options.push((c, None)),
                Some(true) => {
                    let attached = &cluster[i + c.len_utf8()..];
                    let argument = if attached.is_empty() {
                        words.next().cloned()
                    } else {
                        Some(attached.to_string())
                    };
                    match argument {
                        Some(argument) => parsed.options.push((c, Some(argument))),
                        None => parsed.error = Some(GetoptError::MissingArgument(c)),
                    }
                    break;
                }
            }
        }
    }
    parsed
}

/// A long option of [`getopt_long`].
#[derive(Debug, Clone, Copy)]
pub struct LongOpt {
    /// The name, without the dashes.
    pub name: &'static str,
    /// Whether it takes an argument (`--cache=none` or `--cache none`).
    pub has_arg: bool,
    /// What it stands for: its short letter, or a code of its own.
    pub id: char,
}

/// What [`getopt_long`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LongParsed {
    /// Options (by id) in the order given, up to the first error.
    pub options: Vec<(char, Option<String>)>,
    /// glibc's message for the first error (`unrecognized option '--foo'`); parsing stops
    /// there.
    pub error: Option<String>,
    /// The words that are not options, up to the first error.
    pub operands: Vec<String>,
}

/// Parses a command line (without the program name) as glibc's `getopt_long` with
/// permutation: `short` as for [`getopt`], `long` the long options.
pub fn getopt_long(args: &[String], short: &str, long: &[LongOpt]) -> LongParsed {
    let mut parsed = LongParsed::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            parsed.operands.extend(words.by_ref().cloned());
            break;
        }
        let result = if let Some(body) = word.strip_prefix("--") {
            long_option(body, long, &mut words)
        } else if let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) {
            short_cluster(cluster, short, &mut words)
        } else {
            parsed.operands.push(word.clone());
            continue;
        };
        match result {
            Ok(options) => parsed.options.extend(options),
            Err((options, message)) => {
                parsed.options.extend(options);
                parsed.error = Some(message);
                break;
            }
        }
    }
    parsed
}

type Found = Vec<(char, Option<String>)>;

fn short_cluster<'w>(
    cluster: &str,
    spec: &str,
    words: &mut impl Iterator<Item = &'w String>,
) -> Result<Found, (Found, String)> {
    let parsed = getopt(&[format!("-{cluster}")], spec);
    let mut options = parsed.options;
    match parsed.error {
        None => Ok(options),
        Some(GetoptError::MissingArgument(c)) => match words.next() {
            Some(next) => {
                options.push((c, Some(next.clone())));
                Ok(options)
            }
            None => Err((options, GetoptError::MissingArgument(c).message())),
        },
        Some(e) => Err((options, e.message())),
    }
}

fn long_option<'w>(
    body: &str,
    long: &[LongOpt],
    words: &mut impl Iterator<Item = &'w String>,
) -> Result<Found, (Found, String)> {
    let (name, value) = match body.split_once('=') {
        Some((name, value)) => (name, Some(value.to_string())),
        None => (body, None),
    };
    let option = match long.iter().find(|o| o.name == name) {
        Some(exact) => *exact,
        None => {
            let matches: Vec<&LongOpt> = long.iter().filter(|o| o.name.starts_with(name)).collect();
            match matches.as_slice() {
                [] => return Err((Vec::new(), format!("unrecognized option '--{body}'"))),
                [only] => **only,
                [first, rest @ ..]
                    if rest
                        .iter()
                        .all(|o| o.id == first.id && o.has_arg == first.has_arg) =>
                {
                    **first
                }
                all => {
                    let names: Vec<String> =
                        all.iter().map(|o| format!("'--{}'", o.name)).collect();
                    return Err((
                        Vec::new(),
                        format!(
                            "option '--{name}' is ambiguous; possibilities: {}",
                            names.join(" ")
                        ),
                    ));
                }
            }
        }
    };
    match (option.has_arg, value) {
        (false, Some(_)) => Err((
            Vec::new(),
            format!("option '--{}' doesn't allow an argument", option.name),
        )),
        (false, None) => Ok(vec![(option.id, None)]),
        (true, Some(value)) => Ok(vec![(option.id, Some(value))]),
        (true, None) => match words.next() {
            Some(next) => Ok(vec![(option.id, Some(next.clone()))]),
            None => Err((
                Vec::new(),
                format!("option '--{}' requires an argument", option.name),
            )),
        },
    }
}

#[cfg(test)]
mod tests {

    const LONG: &[LongOpt] = &[
        LongOpt {
            name: "cmd",
            has_arg: true,
            id: 'c',
        },
        LongOpt {
            name: "copy-on-read",
            has_arg: false,
            id: 'C',
        },
        LongOpt {
            name: "cache",
            has_arg: true,
            id: 't',
        },
        LongOpt {
            name: "snapshot",
            has_arg: false,
            id: 's',
        },
    ];

    #[test]
    fn long_options_as_glibc() {
        let p = getopt_long(
            &words("img --snap --cach=none -c length --cmd=info -cread -s"),
            "c:st:C",
            LONG,
        );
        assert_eq!(p.error, None);
        assert_eq!(p.operands, vec!["img"]);
        assert_eq!(
            p.options,
            vec![
                ('s', None),
                ('t', Some("none".into())),
                ('c', Some("length".into())),
                ('c', Some("info".into())),
                ('c', Some("read".into())),
                ('s', None),
            ]
        );
        let p = getopt_long(&words("--c x"), "c:", LONG);
        assert_eq!(
            p.error.as_deref(),
            Some("option '--c' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'")
        );
        let p = getopt_long(&words("--foo=1"), "c:", LONG);
        assert_eq!(p.error.as_deref(), Some("unrecognized option '--foo=1'"));
        let p = getopt_long(&words("--snapshot=1"), "c:", LONG);
        assert_eq!(
            p.error.as_deref(),
            Some("option '--snapshot' doesn't allow an argument")
        );
        let p = getopt_long(&words("--cmd"), "c:", LONG);
        assert_eq!(
            p.error.as_deref(),
            Some("option '--cmd' requires an argument")
        );
        let p = getopt_long(&words("-c"), "c:", LONG);
        assert_eq!(
            p.error.as_deref(),
            Some("option requires an argument -- 'c'")
        );
        let p = getopt_long(&words("-q"), "c:", LONG);
        assert_eq!(p.error.as_deref(), Some("invalid option -- 'q'"));
        let p = getopt_long(&words("-- -c x"), "c:", LONG);
        assert_eq!(p.operands, vec!["-c", "x"]);
    }
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn bundles_and_arguments() {
        let p = getopt(&words("-qv -P0x11 -s 4 0 512"), "CP:qs:v");
        assert_eq!(
            p.options,
            vec![
                ('q', None),
                ('v', None),
                ('P', Some("0x11".into())),
                ('s', Some("4".into()))
            ]
        );
        assert_eq!(p.operands, vec!["0", "512"]);
        assert_eq!(p.error, None);
    }

    #[test]
    fn permutes_and_stops_at_double_dash() {
        let p = getopt(&words("0 512 -q"), "q");
        assert_eq!(p.options, vec![('q', None)]);
        assert_eq!(p.operands, vec!["0", "512"]);
        let p = getopt(&words("0 -- -5"), "q");
        assert_eq!(p.operands, vec!["0", "-5"]);
        let p = getopt(&words("- 1"), "q");
        assert_eq!(p.operands, vec!["-", "1"]);
    }

    #[test]
    fn errors() {
        let p = getopt(&words("-5 4"), "q");
        assert_eq!(p.error, Some(GetoptError::Invalid('5')));
        assert_eq!(p.error.unwrap().message(), "invalid option -- '5'");
        let p = getopt(&words("0 1 -P"), "P:");
        assert_eq!(p.error, Some(GetoptError::MissingArgument('P')));
        let p = getopt(&words("-:"), "P:");
        assert_eq!(p.error, Some(GetoptError::Invalid(':')));
    }
}
