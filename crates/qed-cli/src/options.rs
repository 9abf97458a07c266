//! `-o` option strings as QEMU writes them: `key=value,key=value`, with `,,` standing for a
//! literal comma inside a value; several `-o` merge, later values winning.

use crate::error::{CliError, CliResult};

/// Parsed `-o` options, in the order given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OptionList {
    entries: Vec<(String, String)>,
    /// Whether `help` (or `?`) was among them.
    pub help: bool,
}

impl OptionList {
    /// Parses every `-o` argument.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a String>) -> CliResult<Self> {
        let mut list = Self::default();
        for arg in args {
            for item in split_unescaped(arg) {
                if item.is_empty() {
                    continue;
                }
                if item == "help" || item == "?" {
                    list.help = true;
                    continue;
                }
                match item.split_once('=') {
                    Some((key, value)) => list.entries.push((key.to_string(), value.to_string())),
                    None => {
                        return Err(CliError::plain(format!(
                            "Invalid option '{item}': expected key=value"
                        )))
                    }
                }
            }
        }
        Ok(list)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Fails on the first key not in `known`.
    pub fn check_known(&self, known: &[&str]) -> CliResult<()> {
        match self
            .entries
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((key, _)) => Err(CliError::plain(format!("Invalid parameter '{key}'"))),
            None => Ok(()),
        }
    }
}

/// Splits at single commas; `,,` is a literal comma.
fn split_unescaped(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_merges() {
        let args = vec![
            "cluster_size=4k,table_size=2".to_string(),
            "backing_file=a,,b.raw,cluster_size=8k".to_string(),
        ];
        let list = OptionList::parse(&args).unwrap();
        assert_eq!(list.get("cluster_size"), Some("8k"));
        assert_eq!(list.get("table_size"), Some("2"));
        assert_eq!(list.get("backing_file"), Some("a,b.raw"));
        assert!(!list.help);
        assert!(list
            .check_known(&["cluster_size", "table_size", "backing_file"])
            .is_ok());
        assert_eq!(
            list.check_known(&["cluster_size"]).unwrap_err().to_string(),
            "Invalid parameter 'table_size'"
        );
    }

    #[test]
    fn help_and_errors() {
        let list = OptionList::parse(&["help".to_string()]).unwrap();
        assert!(list.help);
        assert!(OptionList::parse(&["novalue".to_string()]).is_err());
    }
}
