//! The command line of `qed io`, parsed as qemu-io 10 parses its own (`getopt_long` with the
//! same letters, long names and messages), so that it runs qemu-io's command lines unchanged.

use super::console::Console;
use super::flags::OpenFlags;
use super::getopt::{getopt_long, LongOpt};

const OBJECT: char = '\u{100}';
const IMAGE_OPTS: char = '\u{101}';

/// qemu-io's short options.
const SHORT: &str = "hVc:d:f:rsnCmki:t:T:U";

/// qemu-io's long options, in its order (the order of an ambiguity message).
const LONG: &[LongOpt] = &[
    LongOpt {
        name: "help",
        has_arg: false,
        id: 'h',
    },
    LongOpt {
        name: "version",
        has_arg: false,
        id: 'V',
    },
    LongOpt {
        name: "cmd",
        has_arg: true,
        id: 'c',
    },
    LongOpt {
        name: "format",
        has_arg: true,
        id: 'f',
    },
    LongOpt {
        name: "read-only",
        has_arg: false,
        id: 'r',
    },
    LongOpt {
        name: "snapshot",
        has_arg: false,
        id: 's',
    },
    LongOpt {
        name: "nocache",
        has_arg: false,
        id: 'n',
    },
    LongOpt {
        name: "copy-on-read",
        has_arg: false,
        id: 'C',
    },
    LongOpt {
        name: "misalign",
        has_arg: false,
        id: 'm',
    },
    LongOpt {
        name: "native-aio",
        has_arg: false,
        id: 'k',
    },
    LongOpt {
        name: "aio",
        has_arg: true,
        id: 'i',
    },
    LongOpt {
        name: "discard",
        has_arg: true,
        id: 'd',
    },
    LongOpt {
        name: "cache",
        has_arg: true,
        id: 't',
    },
    LongOpt {
        name: "trace",
        has_arg: true,
        id: 'T',
    },
    LongOpt {
        name: "object",
        has_arg: true,
        id: OBJECT,
    },
    LongOpt {
        name: "image-opts",
        has_arg: false,
        id: IMAGE_OPTS,
    },
    LongOpt {
        name: "force-share",
        has_arg: false,
        id: 'U',
    },
];

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Options {
    /// The `-c` commands, in order; none: read commands from stdin.
    pub commands: Vec<String>,
    /// `-f` (the last one given).
    pub format: Option<String>,
    /// The image to open first, if any (an option string with `--image-opts`).
    pub file: Option<String>,
    /// How to open it.
    pub flags: OpenFlags,
    /// `--image-opts`: FILE (and `open`'s argument) is an option string.
    pub image_opts: bool,
}

/// The outcome of parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Run these options.
    Run(Options),
    /// Exit with this code (help or version printed, or an error reported).
    Exit(i32),
}

/// The name the usage text gives the program: `qemu-io`, or `qed io`.
fn usage_name() -> String {
    match crate::prog() {
        "qed" => "qed io".to_string(),
        other => other.to_string(),
    }
}

/// qemu-io's usage text.
pub fn usage_text() -> String {
    let name = usage_name();
    format!(
        "Usage: {name} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qemu-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{name} -c help' for information on available commands.

"
    )
}

/// Parses the arguments (without the program name), reporting errors as qemu-io does.
pub fn parse(args: &[String], con: &mut Console<'_>) -> Parsed {
    let parsed = getopt_long(args, SHORT, LONG);
    let mut options = Options::default();
    let mut read_only = false;
    for (id, value) in parsed.options {
        let value = value.unwrap_or_default();
        let refused = match id {
            'd' => (!options.flags.set_discard(&value)).then_some("discard"),
            'i' => (!options.flags.set_aio(&value)).then_some("aio"),
            't' => (!options.flags.set_cache(&value)).then_some("cache"),
            _ => None,
        };
        if let Some(what) = refused {
            con.error(&format!("Invalid {what} option: {value}"));
            return Parsed::Exit(1);
        }
        match id {
            's' => options.flags.snapshot = true,
            'n' => {
                options.flags.nocache = true;
                options.flags.writethrough = false;
            }
            'C' => options.flags.copy_on_read = true,
            'f' => options.format = Some(value),
            'c' => options.commands.push(value),
            'r' => read_only = true,
            'k' => options.flags.native_aio = true,
            'V' => {
                con.out(&format!(
                    "{} version {} (qed)\n",
                    crate::prog(),
                    env!("CARGO_PKG_VERSION")
                ));
                return Parsed::Exit(0);
            }
            'h' => {
                con.out(&usage_text());
                return Parsed::Exit(0);
            }
            'U' => options.flags.force_share = true,
            IMAGE_OPTS => options.image_opts = true,
            // -d, -i, -t: applied above. -m (misaligned buffers), -T (trace events),
            // --object (secrets): accepted; the engine needs none of them.
            _ => {}
        }
    }
    if let Some(message) = parsed.error {
        con.error(&message);
        con.out(&usage_text());
        return Parsed::Exit(1);
    }
    if parsed.operands.len() > 1 {
        con.out(&usage_text());
        return Parsed::Exit(1);
    }
    if options.format.is_some() && options.image_opts {
        con.error("--image-opts and -f are mutually exclusive");
        return Parsed::Exit(1);
    }
    options.flags.read_only = read_only;
    options.file = parsed.operands.into_iter().next();
    Parsed::Run(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(line: &str) -> (Parsed, String, String) {
        let args: Vec<String> = line
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let parsed = {
            let mut con = Console::new(&mut out, &mut err);
            parse(&args, &mut con)
        };
        (
            parsed,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn options_as_qemu_io() {
        let (parsed, _, _) = run("-f raw -f qed -t writeback -n -d ignore -C img -c length -U -r");
        let Parsed::Run(o) = parsed else { panic!() };
        assert_eq!(o.format.as_deref(), Some("qed"));
        assert_eq!(o.file.as_deref(), Some("img"));
        assert_eq!(o.commands, vec!["length"]);
        assert!(o.flags.nocache && !o.flags.writethrough && !o.flags.unmap);
        assert!(o.flags.copy_on_read && o.flags.force_share && o.flags.read_only);
        let (parsed, out, err) = run("-t bogus img");
        assert_eq!(parsed, Parsed::Exit(1));
        assert!(out.is_empty());
        assert!(err.ends_with(": Invalid cache option: bogus\n"), "{err}");
        let (parsed, out, err) = run("-q img");
        assert_eq!(parsed, Parsed::Exit(1));
        assert!(out.starts_with("Usage: "));
        assert!(err.ends_with(": invalid option -- 'q'\n"), "{err}");
        let (parsed, out, _) = run("a b");
        assert_eq!(parsed, Parsed::Exit(1));
        assert!(out.starts_with("Usage: "));
        let (parsed, _, err) = run("--image-opts -f qed x");
        assert_eq!(parsed, Parsed::Exit(1));
        assert!(err.ends_with("--image-opts and -f are mutually exclusive\n"));
        let (parsed, _, _) = run("--object secret,id=s --snap --cach=unsafe -m -T foo -i io_uring");
        let Parsed::Run(o) = parsed else { panic!() };
        assert!(o.flags.snapshot && o.flags.no_flush && o.file.is_none());
    }
}
