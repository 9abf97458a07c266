//! Option parsing inside `qed io` commands, as glibc's `getopt` does it for qemu-io: options
//! may be bundled (`-qv`), take their argument attached or as the next word (`-P0x11`,
//! `-P 0x11`), and may come after the operands; `--` ends the options.

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

#[cfg(test)]
mod tests {
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
